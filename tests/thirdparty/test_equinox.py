"""Equinox: pre-LN transformer blocks built from equinox's own modules.

``eqx.nn.MultiheadAttention``, ``eqx.nn.LayerNorm``, ``eqx.nn.Linear`` and
``eqx.nn.MLP`` act on unbatched inputs; as an equinox user would, the model maps them
over tokens and the batch with `jax.vmap`, and is made pure with
``eqx.partition(model, eqx.is_array)`` / ``eqx.combine(params, static)``.

The model: input ``[B, S, D]`` -> 2 x (``x + attn(LN1(x))``, ``x + MLP(LN2(x))``) ->
final LayerNorm -> ``Linear`` head. Expected counts, from equinox/nn/_attention.py,
_mlp.py, _linear.py (``Linear`` computes ``weight @ x``):

* weight matmuls: per block query/key/value/output projections and the MLP's two
  ``Linear`` layers (6), plus the head: 2 * 6 + 1 = 13.
* activation matmuls: ``einsum("sd,Sd->sS")`` (q.k) and ``einsum("sS,Sd->sd")``
  (weights.v) per block: 4.
* softmaxes: one per block (equinox computes it in float32 even for bf16 logits:
  ``jax.nn.softmax(logits.astype(float32)).astype(logits.dtype)``): 2.
* fold groups: LN1 (-> q, k, v), LN2 (-> fc1) per block and the final LN (-> head), all
  read only by weight matmuls contracting over channels: 5 groups, 5 foldable.
* every one of those matmuls adds its bias: under `jax.vmap`, ``weight @ x`` is a
  ``dot_general(W, x)`` followed by a ``transpose`` and then ``add(bias)``; the plan must
  find that bias so the fold edits it (``b - (s*r2) @ W``).

The ``causal`` case passes a ``[S, S]`` causal mask to ``MultiheadAttention`` (equinox
applies it with ``jnp.where(mask, logits, finfo.min)`` before the softmax).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

from thirdparty import harness

DIM, HEADS, HIDDEN, OUT = 32, 4, 64, 16
BATCH, LENGTH = 4, 8
DTYPES = ("float32", "bfloat16")


def _modules():
    import equinox as eqx

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP

        def __init__(self, key, dtype):
            k1, k2 = jax.random.split(key)
            self.ln1 = eqx.nn.LayerNorm(DIM, dtype=dtype)
            self.attn = eqx.nn.MultiheadAttention(
                HEADS,
                DIM,
                use_query_bias=True,
                use_key_bias=True,
                use_value_bias=True,
                use_output_bias=True,
                dtype=dtype,
                key=k1,
            )
            self.ln2 = eqx.nn.LayerNorm(DIM, dtype=dtype)
            self.mlp = eqx.nn.MLP(DIM, DIM, HIDDEN, depth=1, activation=jax.nn.gelu, dtype=dtype, key=k2)

        def __call__(self, x, mask=None):  # x: [S, D], unbatched
            h = jax.vmap(self.ln1)(x)
            x = x + self.attn(h, h, h, mask=mask)
            h = jax.vmap(self.ln2)(x)
            return x + jax.vmap(self.mlp)(h)

    class Model(eqx.Module):
        blocks: list
        ln_f: eqx.nn.LayerNorm
        head: eqx.nn.Linear
        causal: bool = eqx.field(static=True)

        def __init__(self, key, dtype, causal):
            keys = jax.random.split(key, 3)
            self.blocks = [Block(k, dtype) for k in keys[:2]]
            self.ln_f = eqx.nn.LayerNorm(DIM, dtype=dtype)
            self.head = eqx.nn.Linear(DIM, OUT, dtype=dtype, key=keys[2])
            self.causal = causal

        def __call__(self, x):  # x: [S, D]
            mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool)) if self.causal else None
            for block in self.blocks:
                x = block(x, mask)
            return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))

    return eqx, Model


def _norms(model, eqx):
    """The model's LayerNorms (their weight/bias start at 1/0; `_build` randomizes them so
    the fold has something to move)."""
    return [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_f]


def _build(dtype: str, causal: bool) -> harness.Case:
    eqx, Model = _modules()
    dt = jnp.dtype(dtype)
    model = Model(jax.random.key(0), dt, causal)
    norms = _norms(model, eqx)
    keys = jax.random.split(jax.random.key(1), len(norms))
    for i, k in enumerate(keys):
        kw, kb = jax.random.split(k)
        model = eqx.tree_at(
            lambda m, i=i: _norms(m, eqx)[i].weight, model, (1 + 0.3 * jax.random.normal(kw, (DIM,))).astype(dt)
        )
        model = eqx.tree_at(
            lambda m, i=i: _norms(m, eqx)[i].bias, model, (0.2 * jax.random.normal(kb, (DIM,))).astype(dt)
        )
    params, static = eqx.partition(model, eqx.is_array)

    def apply_fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    x = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, DIM), jnp.float32).astype(dt)
    counts = dict(weight_matmuls=2 * 6 + 1, activation_matmuls=2 * 2, softmaxes=2, fold_groups=5, foldable=5)
    return harness.Case(apply_fn, params, (x,), counts, dtype)


def eqx_prenorm(dtype: str) -> harness.Case:
    """2 pre-LN blocks + final LN + head, no mask."""
    return _build(dtype, causal=False)


def eqx_causal(dtype: str) -> harness.Case:
    """The same with a causal ``[S, S]`` mask passed to ``MultiheadAttention``."""
    return _build(dtype, causal=True)


def consumers_without_bias(plan) -> list[str]:
    """Weight matmuls reading a fold group whose bias ``add`` the plan did not find."""
    return [c.site for g in plan.groups for c in g.consumers if getattr(c, "bias_param_index", None) is None]


CASES: dict[str, Callable[[str], harness.Case]] = {
    "eqx_prenorm": eqx_prenorm,
    "eqx_causal": eqx_causal,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_equinox(name: str, dtype: str) -> None:
    pytest.importorskip("equinox", reason="equinox is not installed")
    case = CASES[name](dtype)
    outcome = harness.check_case(case)
    print(f"{name} {dtype}: W16 relative error {outcome.w16_error:.3g}")
    # Every matmul here adds a bias, so the fold's shift (s*r2) @ W belongs in that bias
    # (docs: b~ = b - (s*r2) @ W), not in a separate output offset of the QParams.
    missing = consumers_without_bias(outcome.plan)
    assert not missing, f"fold consumers whose bias the analysis did not find: {missing}"
