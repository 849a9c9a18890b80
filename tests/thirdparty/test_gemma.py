"""Google DeepMind's `gemma` library (PyPI ``gemma==3.3.0``): tiny random-init transformers.

The models are `gemma.gm.nn.Transformer` with a `TransformerConfig` far below any real
Gemma (embed dim 32, vocab 64; 2 layers, 1 in the Gemma 2/3 layouts to keep the file's
run time down), so the traced graph is the library's own: the fused ``qkv_einsum`` (or
``q_einsum`` + ``kv_einsum``), RoPE, ``jnp.where`` masking, the gated-GELU
``gating_einsum``, RMSNorm ``x * rsqrt(mean(x^2) + eps) * (1 + scale)`` and the LM head
``jnp.dot(x, input_embedding.T)`` tied to the embedding table.

Expected counts, from gemma/gm/nn/_modules.py and _transformer.py (per layer):

* weight matmuls: the attention input projection (``qkv_einsum`` when ``num_kv_heads ==
  num_heads``: one einsum over a stacked ``[3, N, D, H]`` kernel; else ``q_einsum`` and
  ``kv_einsum``: two), ``attn_vec_einsum``, ``gating_einsum`` (one einsum over the stacked
  ``[2, D, F]`` gate/up kernel) and ``linear``; plus one tied LM head for the model.
* activation matmuls: ``BTNH,BSNH->BTNS`` (q.k) and ``BTNS,BSNH->BTNH`` (probs.v); with
  GQA ``BTKGH,BSKH->BTKGS`` and ``BTKGS,BSKH->BTKGH``.
* softmaxes: one per layer.
* fold groups: ``pre_attention_norm`` (-> q/k/v kernels) and ``pre_ffw_norm`` (->
  ``gating_einsum``), both foldable; ``final_norm`` feeds the tied LM head, whose table
  is also read by the embedding gather: a group, NOT foldable. The post-attention /
  post-FFW norms (Gemma 2/3) feed the residual, and the QK norms feed RoPE and q.k, not a
  weight matmul: no groups.

Install (see BUILD.md): gemma, kauldron and clu with ``--no-deps`` plus
lark, typeguard, ml_collections and sentencepiece. ``kauldron.typing`` imports
TensorFlow only to name ``tf.Tensor`` in type aliases; when TensorFlow is not installed
the import below lends it a stand-in module for the duration of the import only.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thirdparty import harness

VOCAB, EMBED, HIDDEN, HEAD_DIM = 64, 32, 64, 16
BATCH, LENGTH = 4, 8
DTYPES = ("float32", "bfloat16")


@functools.cache
def _gemma() -> types.SimpleNamespace:
    """Imports gemma's transformer modules (``ImportError`` when not installed)."""
    stub = None
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        # kauldron/typing/array_types.py does ``import tensorflow as tf`` and only reads
        # ``tf.Tensor`` (for TfArray aliases that gemma never uses).
        stub = types.ModuleType("tensorflow")
        stub.Tensor = type("Tensor", (), {})
        sys.modules["tensorflow"] = stub
    import flax.linen as nn

    # gemma.gm.utils._dtype_params replaces flax's nn.Module.param, on import, by a wrapper
    # with another signature (it passes `dtype` positionally to the init function), which
    # breaks other Flax models in the same process (transformers' FlaxLlama and FlaxCLIP
    # fail with "takes 2 positional arguments but 3 were given"). gemma needs it when it
    # initializes (that is how its `dtype` reaches the params), so it is put back only
    # around gemma's own init (`_gemma_init`).
    original_param = nn.Module.param
    try:
        from gemma.gm.nn import _config, _modules, _transformer
    finally:
        gemma_param, nn.Module.param = nn.Module.param, original_param
        if stub is not None and sys.modules.get("tensorflow") is stub:
            del sys.modules["tensorflow"]
    return types.SimpleNamespace(config=_config, modules=_modules, transformer=_transformer, param=gemma_param)


def _gemma_init(model, *args):
    """``jax.eval_shape(model.init, *args)`` with gemma's own ``nn.Module.param``."""
    import flax.linen as nn

    original, nn.Module.param = nn.Module.param, _gemma().param
    try:
        return jax.eval_shape(model.init, *args)
    finally:
        nn.Module.param = original


def _random_params(shapes, seed: int):
    """Random values in gemma's parameter tree (``model.init`` traced with
    `jax.eval_shape`, filled with NumPy draws: a real ``init`` costs seconds per case).

    Kernels and the embedding table get N(0, 1/EMBED) entries (every contraction here is
    over 16..64 channels), RMSNorm scales N(0, 0.5^2): gemma initialises them to zero,
    where ``1 + scale == 1`` would leave the fold nothing to move.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, leaf in leaves:
        std = 0.5 if jax.tree_util.keystr(path).endswith("['scale']") else EMBED**-0.5
        out.append(jnp.asarray(std * rng.standard_normal(leaf.shape), dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _build(dtype: str, counts: dict[str, int], w16: tuple[float, str] | None = None, **config) -> harness.Case:
    g = _gemma()
    cfg = g.config.TransformerConfig(
        **{"num_embed": VOCAB, "embed_dim": EMBED, "hidden_dim": HIDDEN, "head_dim": HEAD_DIM, **config}
    )
    model = g.transformer.Transformer(config=cfg, dtype=jnp.dtype(dtype))
    # token 0 is gemma's padding id (masked out): draw from 1..VOCAB-1
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, VOCAB, (BATCH, LENGTH)), jnp.int32)
    params = _random_params(_gemma_init(model, jax.random.key(0), tokens), seed=2)

    def apply_fn(params, tokens):
        return model.apply(params, tokens).logits

    tolerance, reason = w16 if w16 is not None and dtype == "float32" else (None, "")
    return harness.Case(apply_fn, params, (tokens,), counts, dtype, tolerance, reason)


def gemma_tiny(dtype: str) -> harness.Case:
    """Plain pre-norm Gemma: MHA through the fused ``qkv_einsum``, global attention."""
    g = _gemma()
    return _build(
        dtype,
        # per layer: qkv, attn_vec, gating, linear = 4 weight matmuls; + tied LM head
        dict(weight_matmuls=2 * 4 + 1, activation_matmuls=2 * 2, softmaxes=2, fold_groups=5, foldable=4),
        # 1.1e-4 with folds on and 1.1e-4 with fold_norms=False: the gated FFN's hidden
        # state gelu(gate) * up (max about 20x its RMS) at one 16-bit min-max scale costs
        # 6-9e-5 alone, the 16-bit weights 4-5e-5
        w16=(2e-4, "gated-FFN hidden state and weights at 16 bits, not a fold"),
        num_heads=2,
        num_kv_heads=2,
        final_logit_softcap=None,
        use_post_attn_norm=False,
        use_post_ffw_norm=False,
        attention_types=(g.modules.AttentionType.GLOBAL,) * 2,
    )


def gemma2_tiny(dtype: str) -> harness.Case:
    """Gemma 2 layout, 1 layer: GQA (4 query heads, 2 KV heads), post-attention/post-FFW
    norms, tanh soft-caps on attention logits and final logits, local-sliding attention."""
    g = _gemma()
    t = g.modules.AttentionType
    return _build(
        dtype,
        # q, kv, attn_vec, gating, linear = 5; + tied LM head. Groups: pre_attention_norm,
        # pre_ffw_norm (foldable), final_norm (not foldable).
        dict(weight_matmuls=5 + 1, activation_matmuls=2, softmaxes=1, fold_groups=3, foldable=2),
        num_heads=4,
        num_kv_heads=2,
        head_dim=HEAD_DIM // 2,  # num_heads * head_dim = EMBED, as the other cases
        final_logit_softcap=30.0,
        attn_logits_soft_cap=50.0,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        attention_types=(t.LOCAL_SLIDING,),
        sliding_window_size=4,
    )


def gemma3_tiny(dtype: str) -> harness.Case:
    """Gemma 3 layout (as Gemma3_1B), 1 layer: one KV head (MQA), QK RMSNorm, post norms,
    transposed gating einsum, local-sliding attention."""
    g = _gemma()
    t = g.modules.AttentionType
    return _build(
        dtype,
        # q, kv, attn_vec, gating, linear = 5; + tied LM head. Groups as gemma2_tiny: the
        # QK norms (-> RoPE -> q.k) and post norms (-> residual) feed no weight matmul.
        dict(weight_matmuls=5 + 1, activation_matmuls=2, softmaxes=1, fold_groups=3, foldable=2),
        num_heads=2,
        num_kv_heads=1,
        final_logit_softcap=None,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        transpose_gating_einsum=True,
        attention_types=(t.LOCAL_SLIDING,),
        sliding_window_size=4,
    )


CASES: dict[str, Callable[[str], harness.Case]] = {
    "gemma_tiny": gemma_tiny,
    "gemma2_tiny": gemma2_tiny,
    "gemma3_tiny": gemma3_tiny,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_gemma(name: str, dtype: str) -> None:
    pytest.importorskip("gemma", reason="gemma is not installed (see BUILD.md)")
    try:
        _gemma()
    except ImportError as err:
        pytest.skip(f"gemma's transformer modules do not import: {err} (see BUILD.md)")
    case = CASES[name](dtype)
    outcome = harness.check_case(case)
    print(f"{name} {dtype}: W16 relative error {outcome.w16_error:.3g}")
