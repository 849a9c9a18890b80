"""A zoo of tiny transformer models for the graph-capture (site discovery) tests.

Every builder is ``name(seed=0, batch=2, seq=5) -> ZooModel``:

* ``apply_fn(params, *inputs) -> array`` is pure (jit-able, traceable by
  ``jax.make_jaxpr``);
* ``params`` is the pytree of float32 arrays a user would hand to the quantizer
  (a Linen variables dict ``{'params': ...}``, a plain nested dict, or an
  ``nnx.State``);
* ``inputs`` are example positional inputs;
* ``expected`` holds the exact site counts the analysis must find. They were
  written by reasoning about each model (not by running any analysis):

  ``weight_matmuls``
      dot_general/conv with one operand derived from a parameter leaf
      (every Dense / DenseGeneral / Linear / LinearGeneral kernel use, including
      the patch projection and the classifier head).
  ``activation_matmuls``
      dot_general with two activation operands: q·kᵀ and attn·V, once per layer.
  ``softmaxes``
      one per attention layer.
  ``fold_groups``
      per-channel affine outputs (LayerNorm with scale & bias, or RMSNorm
      weight) that feed at least one weight matmul.
  ``foldable``
      how many of those feed ONLY weight matmuls that contract over the channel
      axis (the precondition in docs/method.md, "Folding a norm into the matmuls after it").
  ``foldable_names``
      documentation only: ``"norm->consumer,consumer"`` per foldable group.

Conventions shared by the counts:

* Models with ``nn.scan`` are counted per unrolled layer.
* A mean over the token axis between a final norm and the head (models
  ``plain_jax_transformer`` and ``scan_vit``) is treated as transparent for
  folding: ``mean_t(γ⊙x_n + β) = γ⊙mean_t(x_n) + β`` is still the same
  per-channel affine, so the head's input quantizer can be folded into the
  final norm exactly (this holds for a *mean*, not for a plain sum). In the jaxpr
  the mean is ``reduce_sum`` over the token axis followed by ``div`` by the
  token count.
* ``vit_with_head`` takes token 0 *before* the final LayerNorm so its final
  norm feeds the head directly (no slice in between).

All weights are random (seeded); norm scales/biases and Dense biases are
perturbed away from their 1/0 defaults so that folds and bias corrections are
actually exercised, while activations stay O(1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ZooModel(NamedTuple):
    apply_fn: Callable  # apply_fn(params, *inputs) -> array, pure
    params: Any  # pytree of jnp float32 arrays (the thing to quantize)
    inputs: tuple  # example positional inputs (float or int arrays)
    expected: dict  # exact expected site counts


# --------------------------------------------------------------------------- helpers

_NORM_SCALE_NAMES = ("scale", "weight")


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _perturb(params, seed: int):
    """Move norm scales / biases away from 1 / 0, deterministically.

    * norm scale (leaf named 'scale' or 'weight', 1-D): uniform in [0.5, 1.5]
      (per-channel, so per-channel ranges really differ);
    * any bias (1-D or head-shaped): N(0, 0.1²);
    * kernels are left as initialised (lecun normal: O(1) activations).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.key(seed + 1_000_003)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = _key_name(path[-1]) if path else ""
        k = jax.random.fold_in(key, i)
        if name in _NORM_SCALE_NAMES:
            leaf = jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 1.5)
        elif name == "bias":
            leaf = 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _normal(seed: int, salt: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), salt), shape, jnp.float32)


def _dense_init(key, d_in: int, d_out: int, bias: bool = True) -> dict:
    kk, kb = jax.random.split(key)
    p = {"kernel": jax.random.normal(kk, (d_in, d_out), jnp.float32) / math.sqrt(d_in)}
    if bias:
        p["bias"] = 0.1 * jax.random.normal(kb, (d_out,), jnp.float32)
    return p


def _counts(weight, act, soft, groups, foldable_names) -> dict:
    return {
        "weight_matmuls": weight,
        "activation_matmuls": act,
        "softmaxes": soft,
        "fold_groups": groups,
        "foldable": len(foldable_names),
        "foldable_names": list(foldable_names),
    }


# ------------------------------------------------------------- shared Linen modules


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.Dense(self.hidden, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        return nn.Dense(d, name="fc2")(h)


class EinsumAttention(nn.Module):
    """Self-attention with separate q/k/v Dense and explicit einsums."""

    num_heads: int

    @nn.compact
    def __call__(self, x, bias=None):
        b, s, d = x.shape
        hd = d // self.num_heads
        q = nn.Dense(d, name="query")(x).reshape(b, s, self.num_heads, hd)
        k = nn.Dense(d, name="key")(x).reshape(b, s, self.num_heads, hd)
        v = nn.Dense(d, name="value")(x).reshape(b, s, self.num_heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
        if bias is not None:
            scores = scores + bias
        attn = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, d)
        return nn.Dense(d, name="out")(o)


class ViTBlock(nn.Module):
    """Pre-LN block: x + MHA(LN1(x)); x + MLP(LN2(x)) with nn.MultiHeadDotProductAttention."""

    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(h)
        h = nn.LayerNorm(name="ln2")(x)
        return x + MLP(self.mlp_hidden, name="mlp")(h)


class EinsumViTBlock(nn.Module):
    """Same pre-LN block with hand-written einsum attention."""

    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + EinsumAttention(self.num_heads, name="attn")(h)
        h = nn.LayerNorm(name="ln2")(x)
        return x + MLP(self.mlp_hidden, name="mlp")(h)


def _linen_model(module: nn.Module, seed: int, inputs: tuple, expected: dict) -> ZooModel:
    variables = module.init(jax.random.key(seed), *inputs)
    variables = {"params": _perturb(variables["params"], seed)}

    def apply_fn(p, *xs):
        return module.apply(p, *xs)

    return ZooModel(apply_fn, variables, tuple(inputs), expected)


# ---------------------------------------------------------------------- 1. Linen ViT


def linen_vit_block(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    dim, heads = 32, 4
    x = _normal(seed, 1, (batch, seq, dim))
    # q, k, v, out (DenseGeneral kernels [32,4,8] / [4,8,32]) + fc1, fc2.
    expected = _counts(6, 2, 1, 2, ["ln1->query,key,value", "ln2->fc1"])
    return _linen_model(ViTBlock(heads, 4 * dim), seed, (x,), expected)


# ------------------------------------------------------------ 2. einsum attention


def einsum_attention_block(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """Same block as ``linen_vit_block`` with Dense + einsum attention.

    Parameter names and init keys coincide with ``linen_vit_block`` (Dense kernel
    [32, 32] vs DenseGeneral [32, 4, 8] hold the same values), so with the same
    seed both models compute the same function (to ~1e-6).
    """
    dim, heads = 32, 4
    x = _normal(seed, 1, (batch, seq, dim))
    expected = _counts(6, 2, 1, 2, ["ln1->query,key,value", "ln2->fc1"])
    return _linen_model(EinsumViTBlock(heads, 4 * dim), seed, (x,), expected)


# ------------------------------------------------------------------------ 3. NNX


class NNXViTBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads,
            in_features=dim,
            decode=False,
            deterministic=True,
            keep_rngs=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        h = self.fc2(nnx.gelu(self.fc1(self.ln2(x)), approximate=False))
        return x + h


def nnx_vit_block(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """NNX pre-LN block; params is the ``nnx.State`` from ``nnx.split``.

    ``jax.tree_util.tree_leaves(state)`` gives the raw float32 arrays: the
    ``nnx.Param`` wrappers are pytree nodes, so a leaf path (flax 0.12.8) is e.g.
    ``(DictKey('attn'), DictKey('query'), DictKey('kernel'), GetAttrKey('value'))``.
    ``keep_rngs=False`` keeps RNG state out of the split, so every leaf is a Param.
    """
    dim, heads = 32, 4
    model = NNXViTBlock(dim, heads, 4 * dim, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    state = _perturb(state, seed)
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(st, x):
        return nnx.merge(graphdef, st)(x)

    expected = _counts(6, 2, 1, 2, ["ln1->query,key,value", "ln2->fc1"])
    return ZooModel(apply_fn, state, (x,), expected)


# ------------------------------------------------------------------ 4. plain JAX


def _layernorm(p, x, eps=1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p, x):
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def _plain_forward(params, x, *, num_layers: int, heads: int):
    b, s, d = x.shape
    hd = d // heads
    for i in range(num_layers):
        lp = params[f"layer_{i}"]
        h = _layernorm(lp["ln1"], x)
        q = _dense(lp["wq"], h).reshape(b, s, heads, hd)
        k = _dense(lp["wk"], h).reshape(b, s, heads, hd)
        v = _dense(lp["wv"], h).reshape(b, s, heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(hd))
        attn = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, d)
        x = x + _dense(lp["wo"], o)
        h = _layernorm(lp["ln2"], x)
        h = jax.nn.gelu(_dense(lp["fc1"], h), approximate=True)
        x = x + _dense(lp["fc2"], h)
    h = _layernorm(params["final_ln"], x)
    pooled = jnp.mean(h, axis=1)  # final LN -> mean over tokens -> head
    return _dense(params["head"], pooled)


def plain_jax_transformer(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    dim, heads, hidden, layers, classes = 16, 2, 64, 2, 10
    key = jax.random.key(seed)
    params: dict = {f"layer_{i}": _block_params(jax.random.fold_in(key, i), dim, hidden) for i in range(layers)}
    kf, kh = jax.random.split(jax.random.fold_in(key, 1000))
    params["final_ln"] = _ln_params(kf, dim)
    params["head"] = _dense_init(kh, dim, classes)
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        return _plain_forward(p, x, num_layers=layers, heads=heads)

    # per layer: wq, wk, wv, wo, fc1, fc2 (x2) + head = 13.
    expected = _counts(
        13,
        4,
        2,
        5,
        [
            "layer_0/ln1->wq,wk,wv",
            "layer_0/ln2->fc1",
            "layer_1/ln1->wq,wk,wv",
            "layer_1/ln2->fc1",
            "final_ln->(mean over tokens)->head",
        ],
    )
    return ZooModel(apply_fn, params, (x,), expected)


# ----------------------------------------------------------------- 5. BERT (post-LN)


class BertLayer(nn.Module):
    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x, mask):
        # mask [batch, seq] of 0/1 -> additive bias [batch, 1, 1, seq].
        bias = (1.0 - mask.astype(jnp.float32))[:, None, None, :] * jnp.float32(-1e9)
        h = nn.LayerNorm(name="ln1")(x + EinsumAttention(self.num_heads, name="attn")(x, bias))
        # ln1's output feeds fc1 AND the residual add below -> fold group, not foldable.
        y = MLP(self.mlp_hidden, name="mlp")(h)
        # ln2's output is the layer output: feeds no matmul -> not a fold group.
        return nn.LayerNorm(name="ln2")(h + y)


def bert_block(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    dim, heads = 32, 4
    x = _normal(seed, 1, (batch, seq, dim))
    mask = np.ones((batch, seq), np.int32)
    if batch > 1:
        mask[1, -1] = 0  # pad the last token of batch item 1
    mask = jnp.asarray(mask)
    # The input x feeds q/k/v and the residual, but it is not a norm output.
    expected = _counts(6, 2, 1, 1, [])
    return _linen_model(BertLayer(heads, 4 * dim), seed, (x, mask), expected)


# ---------------------------------------------------------------------- 6. LLaMA


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * w


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _rope(x, base: float = 10000.0):
    # x [b, s, h, d]; cos/sin built with broadcasting (no dot_general).
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = jnp.arange(s, dtype=jnp.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    return x * jnp.cos(emb) + _rotate_half(x) * jnp.sin(emb)


class LlamaBlock(nn.Module):
    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x):
        b, s, d = x.shape
        hd = d // self.num_heads
        h = RMSNorm(name="attention_norm")(x)
        q = nn.Dense(d, use_bias=False, name="q_proj")(h).reshape(b, s, self.num_heads, hd)
        k = nn.Dense(d, use_bias=False, name="k_proj")(h).reshape(b, s, self.num_heads, hd)
        v = nn.Dense(d, use_bias=False, name="v_proj")(h).reshape(b, s, self.num_heads, hd)
        q, k = _rope(q), _rope(k)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
        causal = jnp.tril(jnp.ones((s, s), jnp.bool_))[None, None]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attn = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, d)
        x = x + nn.Dense(d, use_bias=False, name="o_proj")(o)
        h = RMSNorm(name="ffn_norm")(x)
        g = nn.Dense(self.mlp_hidden, use_bias=False, name="gate_proj")(h)
        u = nn.Dense(self.mlp_hidden, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(d, use_bias=False, name="down_proj")(nn.silu(g) * u)


def llama_block(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    dim, heads, hidden = 32, 4, 64
    x = _normal(seed, 1, (batch, seq, dim))
    # q, k, v, o, gate, up, down.
    expected = _counts(7, 2, 1, 2, ["attention_norm->q_proj,k_proj,v_proj", "ffn_norm->gate_proj,up_proj"])
    return _linen_model(LlamaBlock(heads, hidden), seed, (x,), expected)


# ------------------------------------------------------------------ 7. nn.scan ViT


class _ScanBody(nn.Module):
    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x, _):
        return EinsumViTBlock(self.num_heads, self.mlp_hidden, name="block")(x), None


class ScanViT(nn.Module):
    num_heads: int
    mlp_hidden: int
    num_layers: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _ScanBody,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
        )(self.num_heads, self.mlp_hidden, name="layers")
        x, _ = stack(x, None)
        h = nn.LayerNorm(name="final_ln")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(h, axis=1))


def scan_vit(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    dim, heads = 16, 2
    x = _normal(seed, 1, (batch, seq, dim))
    names = []
    for i in range(3):
        names += [f"layers/block/ln1[{i}]->query,key,value", f"layers/block/ln2[{i}]->fc1"]
    names.append("final_ln->(mean over tokens)->head")
    # 3 x (q, k, v, out, fc1, fc2) + head = 19, counted per unrolled layer.
    expected = _counts(19, 6, 3, 7, names)
    return _linen_model(ScanViT(heads, 4 * dim), seed, (x,), expected)


# ---------------------------------------------------------------- 8. ViT with head


class ViTWithHead(nn.Module):
    dim: int
    num_heads: int
    mlp_hidden: int
    num_layers: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, name="patch_embed")(x)
        for i in range(self.num_layers):
            x = ViTBlock(self.num_heads, self.mlp_hidden, name=f"block_{i}")(x)
        cls = x[:, 0]  # token 0 BEFORE the final LN: final_ln feeds only the head
        return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="final_ln")(cls))


def vit_with_head(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    in_dim, dim, heads = 24, 32, 4
    x = _normal(seed, 1, (batch, seq, in_dim))
    # patch_embed + 2 x (q, k, v, out, fc1, fc2) + head = 14.
    expected = _counts(
        14,
        4,
        2,
        5,
        [
            "block_0/ln1->query,key,value",
            "block_0/ln2->fc1",
            "block_1/ln1->query,key,value",
            "block_1/ln2->fc1",
            "final_ln->head",
        ],
    )
    return _linen_model(ViTWithHead(dim, heads, 2 * dim), seed, (x,), expected)


# ------------------------------------------------------ 9. weight sharing and masking
# Plain-JAX patterns where a fold or a per-value hook would go wrong unless every reader
# of a parameter is accounted for. Counts follow the conventions above; "foldable" is
# what is *legal* (a fold may only edit leaf elements that nothing outside the group
# reads).


def _ln_params(key, dim):
    ks, kb = jax.random.split(key)
    return {
        "scale": jax.random.uniform(ks, (dim,), jnp.float32, 0.5, 1.5),
        "bias": 0.1 * jax.random.normal(kb, (dim,), jnp.float32),
    }


def _attention(p, h, heads, mask=None, head_mask=None):
    b, s, d = h.shape
    hd = d // heads
    q = _dense(p["wq"], h).reshape(b, s, heads, hd)
    k = _dense(p["wk"], h).reshape(b, s, heads, hd)
    v = _dense(p["wv"], h).reshape(b, s, heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    attn = jax.nn.softmax(scores, axis=-1, where=mask)
    if head_mask is not None:  # FlaxBert's head mask: an einsum without contraction
        attn = jnp.einsum("...hqk,h->...hqk", attn, head_mask)
    return _dense(p["wo"], jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, d))


def _block_params(key, dim, hidden):
    ks = jax.random.split(key, 8)
    return {
        "ln1": _ln_params(ks[0], dim),
        "wq": _dense_init(ks[1], dim, dim),
        "wk": _dense_init(ks[2], dim, dim),
        "wv": _dense_init(ks[3], dim, dim),
        "wo": _dense_init(ks[4], dim, dim),
        "ln2": _ln_params(ks[5], dim),
        "fc1": _dense_init(ks[6], dim, hidden),
        "fc2": _dense_init(ks[7], hidden, dim),
    }


def _block(p, x, heads=2, **attention):
    x = x + _attention(p, _layernorm(p["ln1"], x), heads, **attention)
    return x + _dense(p["fc2"], jax.nn.gelu(_dense(p["fc1"], _layernorm(p["ln2"], x))))


def tied_lm_head(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """GPT-2/Gemma style: the final norm feeds a head that reuses the embedding table,
    which the token lookup also reads: the final norm cannot fold into it."""
    vocab, dim = 24, 16
    key = jax.random.key(seed)
    params = {
        "wte": jax.random.normal(jax.random.fold_in(key, 0), (vocab, dim)) * 0.5,
        "block": _block_params(jax.random.fold_in(key, 1), dim, 32),
        "ln_f": _ln_params(jax.random.fold_in(key, 2), dim),
    }
    ids = jax.random.randint(jax.random.fold_in(key, 3), (batch, seq), 0, vocab)

    def apply_fn(p, ids):
        x = _block(p["block"], p["wte"][ids])
        return _layernorm(p["ln_f"], x) @ p["wte"].T

    return ZooModel(apply_fn, params, (ids,), _counts(7, 2, 1, 3, ["ln1->wq,wk,wv", "ln2->fc1"]))


def shared_kernel(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """One kernel read by two matmuls after two different norms: neither may fold."""
    dim = 16
    key = jax.random.key(seed)
    params = {
        "ln1": _ln_params(jax.random.fold_in(key, 0), dim),
        "ln2": _ln_params(jax.random.fold_in(key, 1), dim),
        "w": _dense_init(jax.random.fold_in(key, 2), dim, dim),
    }
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        y = _dense(p["w"], _layernorm(p["ln1"], x))
        return _dense(p["w"], _layernorm(p["ln2"], x + y))

    return ZooModel(apply_fn, params, (x,), _counts(2, 0, 0, 2, []))


def kernel_and_transpose(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """``h @ W`` and ``h @ W.T`` after one norm: the fold would scale W's rows for one
    and its columns for the other."""
    dim = 16
    key = jax.random.key(seed)
    params = {"ln": _ln_params(jax.random.fold_in(key, 0), dim), "w": _normal(seed, 2, (dim, dim)) / 4}
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        h = _layernorm(p["ln"], x)
        return h @ p["w"] + h @ p["w"].T

    return ZooModel(apply_fn, params, (x,), _counts(2, 0, 0, 1, []))


def block_applied_twice(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """ALBERT-style sharing: one block's params applied twice; every γ, β and kernel is
    read by two norm groups, so no fold is legal."""
    dim = 16
    params = _block_params(jax.random.key(seed), dim, 32)
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        return _block(p, _block(p, x))

    return ZooModel(apply_fn, params, (x,), _counts(12, 4, 2, 4, []))


def scan_closed_over(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """A scan over a block whose params are closed over (not scanned): every iteration
    reads the same weight values, and each must still get its own quantizers."""
    dim = 16
    params = _block_params(jax.random.key(seed), dim, 32)
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        return jax.lax.scan(lambda c, _: (_block(p, c), None), x, None, length=2)[0]

    return ZooModel(apply_fn, params, (x,), _counts(12, 4, 2, 4, []))


def masked_attention(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """``softmax(where=causal)`` followed by a head mask of ones (FlaxBert's einsum
    without contraction): one softmax feeding attn·V, no third activation matmul."""
    dim, heads = 16, 2
    params = _block_params(jax.random.key(seed), dim, 32)
    x = _normal(seed, 1, (batch, seq, dim))
    causal = jnp.tril(jnp.ones((seq, seq), bool))

    def apply_fn(p, x):
        return _block(p, x, heads, mask=causal, head_mask=jnp.ones((heads,)))

    return ZooModel(apply_fn, params, (x,), _counts(6, 2, 1, 2, ["ln1->wq,wk,wv", "ln2->fc1"]))


def derived_weights(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """Weights computed from a parameter (a masked kernel, a slice of a fused kernel):
    still weights (w_bits, per output channel), but the norm cannot fold into them."""
    dim = 16
    key = jax.random.key(seed)
    params = {
        "ln": _ln_params(jax.random.fold_in(key, 0), dim),
        "w": _normal(seed, 2, (dim, dim)) / 4,
        "fused": _normal(seed, 3, (dim, 3 * dim)) / 4,
    }
    x = _normal(seed, 1, (batch, seq, dim))
    mask = jnp.triu(jnp.ones((dim, dim)))

    def apply_fn(p, x):
        h = _layernorm(p["ln"], x)
        y = h @ (p["w"] * mask)
        return y @ jax.lax.dynamic_slice_in_dim(p["fused"], dim, dim, axis=1)

    return ZooModel(apply_fn, params, (x,), _counts(2, 0, 0, 1, []))


def one_plus_scale_rmsnorm(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """Gemma's RMSNorm ``x * rsqrt(mean(x²) + eps) * (1 + scale)`` before a Dense."""
    dim = 16
    key = jax.random.key(seed)
    params = {"scale": 0.3 * _normal(seed, 2, (dim,)), "w": _dense_init(jax.random.fold_in(key, 1), dim, dim)}
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return _dense(p["w"], normed * (1 + p["scale"]))

    return ZooModel(apply_fn, params, (x,), _counts(1, 0, 0, 1, ["scale->w"]))


def eos_pooling(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """CLIP's text head: the final norm's output is pooled at each sequence's
    end-of-text token (a gather) before the projection."""
    dim = 16
    key = jax.random.key(seed)
    params = {
        "ln": _ln_params(jax.random.fold_in(key, 0), dim),
        "proj": _dense_init(jax.random.fold_in(key, 1), dim, 8, bias=False),
    }
    x = _normal(seed, 1, (batch, seq, dim))
    ids = jax.random.randint(jax.random.fold_in(key, 2), (batch, seq), 0, 50)

    def apply_fn(p, x, ids):
        h = _layernorm(p["ln"], x)
        pooled = h[jnp.arange(h.shape[0]), jnp.argmax(ids, axis=-1)]
        return _dense(p["proj"], pooled)

    return ZooModel(apply_fn, params, (x, ids), _counts(1, 0, 0, 1, ["ln->(gather)->proj"]))


def plain_jax_post_ln(seed: int = 0, batch: int = 2, seq: int = 5) -> ZooModel:
    """A post-LN (BERT-style) plain-JAX encoder of two layers and a head: every norm
    but the last also feeds a residual, so only the kernel half of its fold is legal
    (branch fold); the last feeds only the head and folds whole."""
    dim, heads = 16, 2
    key = jax.random.key(seed)
    params = {f"layer_{i}": _block_params(jax.random.fold_in(key, i), dim, 32) for i in range(2)}
    params["head"] = _dense_init(jax.random.fold_in(key, 9), dim, 10)
    x = _normal(seed, 1, (batch, seq, dim))

    def apply_fn(p, x):
        for i in range(2):
            lp = p[f"layer_{i}"]
            x = _layernorm(lp["ln1"], x + _attention(lp, x, heads))
            x = _layernorm(lp["ln2"], x + _dense(lp["fc2"], jax.nn.gelu(_dense(lp["fc1"], x))))
        return _dense(p["head"], x)

    # ln1 -> fc1 (+ residual), layer_0/ln2 -> next layer's q, k, v (+ residual),
    # layer_1/ln2 -> head only.
    return ZooModel(apply_fn, params, (x,), _counts(13, 4, 2, 4, ["layer_1/ln2->head"]))


SHARING: dict[str, Callable[..., ZooModel]] = {
    "tied_lm_head": tied_lm_head,
    "shared_kernel": shared_kernel,
    "kernel_and_transpose": kernel_and_transpose,
    "block_applied_twice": block_applied_twice,
    "scan_closed_over": scan_closed_over,
    "masked_attention": masked_attention,
    "derived_weights": derived_weights,
    "one_plus_scale_rmsnorm": one_plus_scale_rmsnorm,
    "eos_pooling": eos_pooling,
}


ALL: dict[str, Callable[..., ZooModel]] = {
    "linen_vit_block": linen_vit_block,
    "einsum_attention_block": einsum_attention_block,
    "nnx_vit_block": nnx_vit_block,
    "plain_jax_transformer": plain_jax_transformer,
    "bert_block": bert_block,
    "llama_block": llama_block,
    "scan_vit": scan_vit,
    "vit_with_head": vit_with_head,
    "plain_jax_post_ln": plain_jax_post_ln,
    **SHARING,
}


if __name__ == "__main__":
    for _name, _builder in ALL.items():
        _m = _builder()
        _out = _m.apply_fn(_m.params, *_m.inputs)
        _leaves = jax.tree_util.tree_leaves(_m.params)
        _n = sum(int(np.prod(leaf.shape)) for leaf in _leaves)
        print(
            f"{_name:24s} out {tuple(_out.shape)} {_out.dtype} "
            f"finite={bool(jnp.all(jnp.isfinite(_out)))} "
            f"|out|max={float(jnp.max(jnp.abs(_out))):.3g} leaves={len(_leaves)} n={_n}"
        )
