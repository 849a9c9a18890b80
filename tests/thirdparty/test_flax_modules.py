"""Flax's own attention modules: NNX (`nnx.MultiHeadAttention`, `nnx.LayerNorm`,
`nnx.Linear`) and Linen (`nn.MultiHeadDotProductAttention`, `nn.LayerNorm`, `nn.Dense`).

Both models: input ``[B, S, D]`` -> L pre-LN blocks (``x + attn(LN1(x))``,
``x + fc2(gelu(fc1(LN2(x))))``) -> final LayerNorm -> ``Dense`` head; L = 2, and L = 1
in the ``causal`` cases (to keep the file's run time down). NNX is made pure
with ``nnx.split(model)`` -> ``nnx.merge(graphdef, state)(x)``; Linen through
``model.apply``. Expected counts, from flax/nnx/nn/attention.py and flax/linen/attention.py
(q/k/v are ``DenseGeneral``/``LinearGeneral`` to ``[N, H]`` heads, out contracts
``[N, H]``):

* weight matmuls: per block query, key, value, out, fc1, fc2 (6), plus the head: 6L + 1.
* activation matmuls: q.k and probs.v per block: 2L. Linen's own
  ``dot_product_attention`` writes them ``einsum('...qhd,...khd->...hqk')`` /
  ``einsum('...hqk,...khd->...qhd')``; NNX's hands over to `jax.nn.dot_product_attention`
  (``'BTNH,BSNH->BNTS'`` / ``'BNTS,BSNH->BTNH'``, softmax in float32).
* softmaxes: one per block: L.
* fold groups: LN1 (-> q, k, v), LN2 (-> fc1) per block and the final LN (-> head), all
  read only by weight matmuls contracting over channels: 2L + 1 groups, all foldable.

The ``causal`` cases pass a causal mask (``make_causal_mask``, ``[B, 1, S, S]``) to the
attention modules, which apply it with ``jnp.where`` before the softmax (Linen:
``finfo(dtype).min``; jax.nn: a large negative float32-safe number): NNX builds it inside
the model from the input's shape, Linen takes it as a second input of ``apply_fn``
(``model.apply(params, x, mask)``). In bfloat16, jax.nn's q.k is a bf16 x bf16 -> f32
``dot_general`` (``preferred_element_type=float32``, ``BF16_BF16_F32`` precision).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from thirdparty import harness

DIM, HEADS, HIDDEN, OUT = 32, 4, 64, 16
BATCH, LENGTH = 4, 8
DTYPES = ("float32", "bfloat16")


def _counts(layers: int) -> dict[str, int]:
    return dict(
        weight_matmuls=6 * layers + 1,
        activation_matmuls=2 * layers,
        softmaxes=layers,
        fold_groups=2 * layers + 1,
        foldable=2 * layers + 1,
    )


def _randomize_norms(tree, key):
    """LayerNorm scale/bias start at 1/0; random values give the fold something to move."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "ln" in name.lower() or "LayerNorm" in name:
            if name.endswith("['scale']") or name.endswith("['scale'].value"):
                leaf = (1 + 0.3 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
            elif name.endswith("['bias']") or name.endswith("['bias'].value"):
                leaf = (0.2 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _input(dtype: str) -> jax.Array:
    return jax.random.normal(jax.random.key(2), (BATCH, LENGTH, DIM), jnp.float32).astype(dtype)


# ---------------------------------------------------------------------------- NNX


class NNXBlock(nnx.Module):
    def __init__(self, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.ln1 = nnx.LayerNorm(DIM, **kw)
        self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, **kw)
        self.ln2 = nnx.LayerNorm(DIM, **kw)
        self.fc1 = nnx.Linear(DIM, HIDDEN, **kw)
        self.fc2 = nnx.Linear(HIDDEN, DIM, **kw)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NNXModel(nnx.Module):
    def __init__(self, dtype, causal: bool, layers: int, rngs: nnx.Rngs):
        self.blocks = nnx.List([NNXBlock(dtype, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(DIM, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(DIM, OUT, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.causal = causal

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if self.causal else None
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def _nnx(dtype: str, causal: bool, layers: int) -> harness.Case:
    model = NNXModel(jnp.dtype(dtype), causal, layers, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = _randomize_norms(state, jax.random.key(1))

    def apply_fn(state, x):
        return nnx.merge(graphdef, state)(x)

    return harness.Case(apply_fn, state, (_input(dtype),), _counts(layers), dtype)


def nnx_prenorm(dtype: str) -> harness.Case:
    """2 blocks, no mask."""
    return _nnx(dtype, causal=False, layers=2)


def nnx_causal(dtype: str) -> harness.Case:
    """1 block; the causal mask is built inside the model (``nnx.make_causal_mask``)."""
    return _nnx(dtype, causal=True, layers=1)


# -------------------------------------------------------------------------- Linen


class LinenBlock(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        h = nn.LayerNorm(name="ln1", **kw)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn", **kw)(h, h, mask=mask)
        h = nn.LayerNorm(name="ln2", **kw)(x)
        h = nn.Dense(DIM, name="fc2", **kw)(nn.gelu(nn.Dense(HIDDEN, name="fc1", **kw)(h)))
        return x + h


class LinenModel(nn.Module):
    dtype: jnp.dtype
    layers: int

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.layers):
            x = LinenBlock(self.dtype, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_f", dtype=self.dtype, param_dtype=self.dtype)(x)
        return nn.Dense(OUT, name="head", dtype=self.dtype, param_dtype=self.dtype)(x)


def _linen(dtype: str, causal: bool, layers: int) -> harness.Case:
    model = LinenModel(jnp.dtype(dtype), layers)
    x = _input(dtype)
    batch = (x, nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))) if causal else (x,)
    params = jax.jit(model.init)(jax.random.key(0), *batch)
    params = _randomize_norms(params, jax.random.key(1))

    def apply_fn(params, *inputs):
        return model.apply(params, *inputs)

    return harness.Case(apply_fn, params, batch, _counts(layers), dtype)


def linen_prenorm(dtype: str) -> harness.Case:
    """2 blocks, no mask."""
    return _linen(dtype, causal=False, layers=2)


def linen_causal(dtype: str) -> harness.Case:
    """1 block; the causal mask is ``apply_fn``'s second input."""
    return _linen(dtype, causal=True, layers=1)


def consumers_without_bias(plan) -> list[str]:
    """Weight matmuls reading a fold group whose bias ``add`` the plan did not find."""
    return [c.site for g in plan.groups for c in g.consumers if getattr(c, "bias_param_index", None) is None]


CASES: dict[str, Callable[[str], harness.Case]] = {
    "nnx_prenorm": nnx_prenorm,
    "nnx_causal": nnx_causal,
    "linen_prenorm": linen_prenorm,
    "linen_causal": linen_causal,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_flax_modules(name: str, dtype: str) -> None:
    case = CASES[name](dtype)
    outcome = harness.check_case(case)
    print(f"{name} {dtype}: W16 relative error {outcome.w16_error:.3g}")
    # Every matmul here adds a bias, so the fold's shift (s*r2) @ W belongs in that bias
    # (docs: b~ = b - (s*r2) @ W), not in a separate output offset of the QParams.
    missing = consumers_without_bias(outcome.plan)
    assert not missing, f"fold consumers whose bias the analysis did not find: {missing}"
