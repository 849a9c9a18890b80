"""Vision Transformer (ViT) and DeiT as Flax Linen modules, with timm / HF loaders.

The architecture follows timm's ``VisionTransformer`` (and ``VisionTransformerDistilled``
for DeiT with a distillation token) exactly, so that timm and Hugging Face checkpoints
load bit-for-bit:

* patch embedding: ``nn.Conv`` with kernel = stride = patch size, on NHWC float images;
* a class token (and for distilled DeiT a distillation token) prepended, then a learned
  position embedding over all tokens;
* ``depth`` pre-LN blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with LayerNorm
  eps 1e-6 (timm), separate ``query``/``key``/``value``/``out`` ``nn.Dense`` layers around
  an einsum attention with a plain ``jax.nn.softmax``, and a GELU MLP using the exact
  erf GELU;
* final LayerNorm, classifier ``head`` on the class token; distilled models average
  ``head`` (class token) and ``head_dist`` (distillation token) as timm does at
  inference.

Parameter tree of ``VisionTransformer(cfg).init(...)["params"]``::

    patch_embed: {kernel [p, p, in_chans, dim], bias [dim]}
    cls_token [1, 1, dim]
    dist_token [1, 1, dim]                      # distilled only
    pos_embed [1, num_patches + num_prefix_tokens, dim]
    blocks_{i}:                                 # i = 0 .. depth-1
        norm1: {scale [dim], bias [dim]}
        attn:  {query, key, value, out: {kernel [dim, dim], bias [dim]}}
        norm2: {scale [dim], bias [dim]}
        mlp:   {fc1: {kernel [dim, mlp_dim], bias}, fc2: {kernel [mlp_dim, dim], bias}}
    norm: {scale [dim], bias [dim]}
    head: {kernel [dim, num_classes], bias}     # absent if num_classes == 0
    head_dist: {kernel [dim, num_classes], bias}  # distilled only

The query/key/value kernels' output features are ordered (head, head_dim), as timm's
fused ``qkv`` rows are.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = vit_tiny_fashion_mnist()
    >>> model = VisionTransformer(cfg)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repquant_zoo.models.checkpoint import (
    TensorReader,
    load_state_dict,
    save_state_dict,
)

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "Attention",
    "Mlp",
    "Block",
    "CONFIGS",
    "TIMM_NAMES",
    "get_config",
    "vit_s16",
    "vit_b16",
    "deit_t16",
    "deit_s16",
    "deit_b16",
    "deit_t16_distilled",
    "deit_s16_distilled",
    "deit_b16_distilled",
    "vit_tiny_fashion_mnist",
    "params_from_timm",
    "params_to_timm",
    "params_from_hf",
    "load_safetensors",
    "save_safetensors",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Hyper-parameters of a ViT / DeiT.

    Attributes:
        image_size: input height = width in pixels.
        patch_size: patch height = width (also the patch conv's stride).
        in_chans: input channels (last axis of the NHWC input).
        num_classes: classifier outputs; 0 for no head (the model returns the
            normalised class-token features).
        dim: embedding width.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: whether query/key/value have a bias.
        distilled: DeiT distillation token and second head (``head_dist``).
        ln_eps: LayerNorm epsilon (timm: 1e-6; HF ViT configs often use 1e-12).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False
    ln_eps: float = 1e-6

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> ViTConfig:
        """Builds a config from a Hugging Face ViT/DeiT ``config.json`` dict.

        A DeiT config becomes ``distilled=True`` when its architectures name
        ``DeiTForImageClassificationWithTeacher``.
        """
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"only the exact 'gelu' activation is supported, got {act!r}")
        archs = hf.get("architectures") or []
        num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 0
        kw: dict[str, Any] = dict(
            image_size=int(hf.get("image_size", 224)),
            patch_size=int(hf.get("patch_size", 16)),
            in_chans=int(hf.get("num_channels", 3)),
            num_classes=int(num_labels),
            dim=int(hf["hidden_size"]),
            depth=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            mlp_ratio=int(hf["intermediate_size"]) / int(hf["hidden_size"]),
            qkv_bias=bool(hf.get("qkv_bias", True)),
            distilled=any("WithTeacher" in a for a in archs),
            ln_eps=float(hf.get("layer_norm_eps", 1e-12)),
        )
        kw.update(overrides)
        return cls(**kw)


def _cfg(**kw: Any):
    def make(**overrides: Any) -> ViTConfig:
        return ViTConfig(**{**kw, **overrides})

    return make


#: ViT-S/16 (timm ``vit_small_patch16_224``).
vit_s16 = _cfg(dim=384, depth=12, num_heads=6)
#: ViT-B/16 (timm ``vit_base_patch16_224``).
vit_b16 = _cfg(dim=768, depth=12, num_heads=12)
#: DeiT-T/16 (timm ``deit_tiny_patch16_224``).
deit_t16 = _cfg(dim=192, depth=12, num_heads=3)
#: DeiT-S/16 (timm ``deit_small_patch16_224``).
deit_s16 = _cfg(dim=384, depth=12, num_heads=6)
#: DeiT-B/16 (timm ``deit_base_patch16_224``).
deit_b16 = _cfg(dim=768, depth=12, num_heads=12)
#: Distilled DeiT-T/16 (timm ``deit_tiny_distilled_patch16_224``).
deit_t16_distilled = _cfg(dim=192, depth=12, num_heads=3, distilled=True)
#: Distilled DeiT-S/16 (timm ``deit_small_distilled_patch16_224``).
deit_s16_distilled = _cfg(dim=384, depth=12, num_heads=6, distilled=True)
#: Distilled DeiT-B/16 (timm ``deit_base_distilled_patch16_224``).
deit_b16_distilled = _cfg(dim=768, depth=12, num_heads=12, distilled=True)
#: Small DeiT-style ViT for 28x28 grey images (Fashion-MNIST): 7x7 patches of 4x4 pixels.
vit_tiny_fashion_mnist = _cfg(image_size=28, patch_size=4, in_chans=1, num_classes=10, dim=128, depth=4, num_heads=4)
#: Its 7x7-pixel-patch variant (4x4 = 16 patches + class token): ~3x cheaper, trained as
#: the shipped checkpoint ``experiments/checkpoints/vit_fashion_mnist.safetensors``.
vit_tiny_fashion_mnist_p7 = _cfg(image_size=28, patch_size=7, in_chans=1, num_classes=10, dim=128, depth=4, num_heads=4)

CONFIGS = {
    "vit_s16": vit_s16,
    "vit_b16": vit_b16,
    "deit_t16": deit_t16,
    "deit_s16": deit_s16,
    "deit_b16": deit_b16,
    "deit_t16_distilled": deit_t16_distilled,
    "deit_s16_distilled": deit_s16_distilled,
    "deit_b16_distilled": deit_b16_distilled,
    "vit_tiny_fashion_mnist": vit_tiny_fashion_mnist,
    "vit_tiny_fashion_mnist_p7": vit_tiny_fashion_mnist_p7,
}

#: timm model names of the named configs (``timm.create_model(TIMM_NAMES[name])``).
TIMM_NAMES = {
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "deit_t16": "deit_tiny_patch16_224",
    "deit_s16": "deit_small_patch16_224",
    "deit_b16": "deit_base_patch16_224",
    "deit_t16_distilled": "deit_tiny_distilled_patch16_224",
    "deit_s16_distilled": "deit_small_distilled_patch16_224",
    "deit_b16_distilled": "deit_base_distilled_patch16_224",
}


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """Returns the named config (see :data:`CONFIGS`) with optional field overrides.

    Example:
        >>> get_config("deit_s16", num_classes=10).num_classes
        10
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown ViT config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name](**overrides)


_dense_init = nn.initializers.truncated_normal(stddev=0.02)


class Attention(nn.Module):
    """Multi-head self-attention: separate q/k/v Dense, einsum scores, softmax, out Dense.

    Attributes:
        num_heads: number of heads.
        qkv_bias: whether query/key/value have a bias.
    """

    num_heads: int
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        dense = lambda name, bias: nn.Dense(  # noqa: E731
            c, use_bias=bias, kernel_init=_dense_init, name=name
        )
        q = dense("query", self.qkv_bias)(x).reshape(b, n, h, d)
        k = dense("key", self.qkv_bias)(x).reshape(b, n, h, d)
        v = dense("value", self.qkv_bias)(x).reshape(b, n, h, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5)
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return dense("out", True)(out)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.Dense(self.hidden_dim, kernel_init=_dense_init, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], kernel_init=_dense_init, name="fc2")(y)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=cfg.ln_eps, use_fast_variance=False, name=name
        )
        x = x + Attention(cfg.num_heads, cfg.qkv_bias, name="attn")(ln("norm1")(x))
        x = x + Mlp(cfg.mlp_dim, name="mlp")(ln("norm2")(x))
        return x


class VisionTransformer(nn.Module):
    """ViT / DeiT classifier on NHWC float images.

    Call signature: ``model.apply(variables, images, separate_heads=False)`` with
    ``images`` of shape ``[batch, image_size, image_size, in_chans]`` returns logits
    ``[batch, num_classes]`` (or the final class-token features ``[batch, dim]`` when
    ``num_classes == 0``). For a distilled DeiT the logits are the mean of the class
    and distillation heads; ``separate_heads=True`` returns both as a tuple instead
    (for distillation training).

    Attributes:
        config: the :class:`ViTConfig`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = VisionTransformer(deit_t16_distilled(image_size=32, patch_size=8, depth=1))
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        >>> cls_logits, dist_logits = model.apply(
        ...     variables, jnp.ones((1, 32, 32, 3)), separate_heads=True)
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array, *, separate_heads: bool = False) -> Array | tuple[Array, Array]:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"expected NHWC images of shape [batch, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}"
            )
        p = cfg.patch_size
        x = nn.Conv(cfg.dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(images)
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.dim)
        prefix_init = nn.initializers.normal(stddev=1e-6)
        tokens = [self.param("cls_token", prefix_init, (1, 1, cfg.dim))]
        if cfg.distilled:
            tokens.append(self.param("dist_token", prefix_init, (1, 1, cfg.dim)))
        tokens = [jnp.broadcast_to(t, (b, 1, cfg.dim)).astype(x.dtype) for t in tokens]
        x = jnp.concatenate([*tokens, x], axis=1)
        x = x + self.param("pos_embed", _dense_init, (1, cfg.num_tokens, cfg.dim))
        for i in range(cfg.depth):
            x = Block(cfg, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, use_fast_variance=False, name="norm")(x)
        if cfg.num_classes == 0:
            return x[:, 0]
        logits = nn.Dense(cfg.num_classes, kernel_init=_dense_init, name="head")(x[:, 0])
        if not cfg.distilled:
            return logits
        logits_dist = nn.Dense(cfg.num_classes, kernel_init=_dense_init, name="head_dist")(x[:, 1])
        if separate_heads:
            return logits, logits_dist
        return (logits + logits_dist) / 2


# ----------------------------------------------------------------------------------------
# Checkpoint conversion
# ----------------------------------------------------------------------------------------


def _unwrap(variables: Mapping[str, Any]) -> Mapping[str, Any]:
    return variables["params"] if "params" in variables else variables


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float32)


def _torch_layer_readers(r: TensorReader, dim: int):
    """Readers of a PyTorch ``Linear`` (weights ``(out, in)``, transposed for Flax) and a
    ``LayerNorm`` of width ``dim`` from a state dict."""

    def dense(name: str, n_in: int, n_out: int, bias: bool = True) -> dict[str, np.ndarray]:
        out = {"kernel": r.take(f"{name}.weight", (n_out, n_in)).T}
        if bias:
            out["bias"] = r.take(f"{name}.bias", (n_out,))
        return out

    def ln(name: str) -> dict[str, np.ndarray]:
        return {"scale": r.take(f"{name}.weight", (dim,)), "bias": r.take(f"{name}.bias", (dim,))}

    return dense, ln


def params_from_timm(state_dict: Mapping[str, Any], config: ViTConfig) -> dict[str, Any]:
    """Converts a timm ``VisionTransformer`` state dict into Flax variables.

    Args:
        state_dict: tensor name → array (numpy, or torch tensors), timm names:
            ``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``,
            ``blocks.N.norm1.weight``, ``blocks.N.attn.qkv.weight`` (fused ``[3*dim, dim]``),
            ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``/``fc2``, ``norm``, ``head``, and
            for distilled DeiT ``dist_token`` and ``head_dist``. A ``module.`` prefix
            (DataParallel) is stripped.
        config: the model's :class:`ViTConfig`.

    Returns:
        ``{"params": ...}`` for :meth:`VisionTransformer.apply`.

    Raises:
        CheckpointError: (a ``ValueError``) naming every missing, unexpected or wrongly
            shaped tensor with its expected and actual shape.

    Example:
        >>> from repquant_zoo.models import vit
        >>> cfg = vit.vit_tiny_fashion_mnist(depth=1)
        >>> sd = vit.params_to_timm(vit.VisionTransformer(cfg).init(
        ...     jax.random.key(0), jnp.zeros((1, 28, 28, 1))), cfg)
        >>> variables = vit.params_from_timm(sd, cfg)
    """
    cfg = config
    r = TensorReader(state_dict, strip_prefixes=("module.",))
    d, p, c, m = cfg.dim, cfg.patch_size, cfg.in_chans, cfg.mlp_dim

    dense, ln = _torch_layer_readers(r, d)

    params: dict[str, Any] = {
        "patch_embed": {
            "kernel": r.take("patch_embed.proj.weight", (d, c, p, p)).transpose(2, 3, 1, 0),
            "bias": r.take("patch_embed.proj.bias", (d,)),
        },
        "cls_token": r.take("cls_token", (1, 1, d)),
    }
    if cfg.distilled:
        params["dist_token"] = r.take("dist_token", (1, 1, d))
    params["pos_embed"] = r.take("pos_embed", (1, cfg.num_tokens, d))
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        qkv_w = r.take(f"{b}.attn.qkv.weight", (3 * d, d))
        qkv_b = r.take(f"{b}.attn.qkv.bias", (3 * d,)) if cfg.qkv_bias else None
        attn: dict[str, Any] = {}
        for j, name in enumerate(("query", "key", "value")):
            attn[name] = {"kernel": qkv_w[j * d : (j + 1) * d].T}
            if qkv_b is not None:
                attn[name]["bias"] = qkv_b[j * d : (j + 1) * d]
        attn["out"] = dense(f"{b}.attn.proj", d, d)
        params[f"blocks_{i}"] = {
            "norm1": ln(f"{b}.norm1"),
            "attn": attn,
            "norm2": ln(f"{b}.norm2"),
            "mlp": {"fc1": dense(f"{b}.mlp.fc1", d, m), "fc2": dense(f"{b}.mlp.fc2", m, d)},
        }
    params["norm"] = ln("norm")
    if cfg.num_classes:
        params["head"] = dense("head", d, cfg.num_classes)
        if cfg.distilled:
            params["head_dist"] = dense("head_dist", d, cfg.num_classes)
    r.finish()
    return {"params": jax.tree.map(np.ascontiguousarray, params)}


def params_to_timm(variables: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    """Converts Flax variables (or their ``params``) to a timm-layout state dict of numpy arrays.

    The inverse of :func:`params_from_timm`: the result loads into
    ``timm.create_model(TIMM_NAMES[...])`` with ``load_state_dict`` (after
    ``torch.from_numpy``) and can be written with :func:`save_safetensors`.
    """
    cfg = config
    p = _unwrap(variables)
    sd: dict[str, np.ndarray] = {}

    def dense(name: str, node: Mapping[str, Any]) -> None:
        sd[f"{name}.weight"] = _np(node["kernel"]).T
        if "bias" in node:
            sd[f"{name}.bias"] = _np(node["bias"])

    def ln(name: str, node: Mapping[str, Any]) -> None:
        sd[f"{name}.weight"] = _np(node["scale"])
        sd[f"{name}.bias"] = _np(node["bias"])

    sd["cls_token"] = _np(p["cls_token"])
    if cfg.distilled:
        sd["dist_token"] = _np(p["dist_token"])
    sd["pos_embed"] = _np(p["pos_embed"])
    sd["patch_embed.proj.weight"] = _np(p["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = _np(p["patch_embed"]["bias"])
    for i in range(cfg.depth):
        blk, b = p[f"blocks_{i}"], f"blocks.{i}"
        ln(f"{b}.norm1", blk["norm1"])
        a = blk["attn"]
        sd[f"{b}.attn.qkv.weight"] = np.concatenate([_np(a[n]["kernel"]).T for n in ("query", "key", "value")], axis=0)
        if cfg.qkv_bias:
            sd[f"{b}.attn.qkv.bias"] = np.concatenate([_np(a[n]["bias"]) for n in ("query", "key", "value")])
        dense(f"{b}.attn.proj", a["out"])
        ln(f"{b}.norm2", blk["norm2"])
        dense(f"{b}.mlp.fc1", blk["mlp"]["fc1"])
        dense(f"{b}.mlp.fc2", blk["mlp"]["fc2"])
    ln("norm", p["norm"])
    if cfg.num_classes:
        dense("head", p["head"])
        if cfg.distilled:
            dense("head_dist", p["head_dist"])
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# transformers >= 5 renames ViT/DeiT modules in memory (``state_dict()``); files written
# by ``save_pretrained`` and the hub keep the classic names. Both are accepted.
_HF_V5_RENAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)


def _hf_rename(name: str) -> str:
    if name.startswith("layers."):
        name = "encoder.layer." + name[len("layers.") :]
        for new, old in _HF_V5_RENAMES:
            name = name.replace(new, old)
    return name


def params_from_hf(state_dict: Mapping[str, Any], config: ViTConfig) -> dict[str, Any]:
    """Converts a Hugging Face ``ViTModel``/``ViTForImageClassification`` (or DeiT) state dict.

    Classic (hub / ``save_pretrained``) names are expected:
    ``vit.embeddings.cls_token``, ``vit.embeddings.position_embeddings``,
    ``vit.embeddings.patch_embeddings.projection.weight``,
    ``vit.encoder.layer.N.layernorm_before``, ``...attention.attention.query/key/value``,
    ``...attention.output.dense``, ``...layernorm_after``, ``...intermediate.dense``,
    ``...output.dense``, ``vit.layernorm``, ``classifier``. The prefix may be ``vit.``,
    ``deit.`` or absent; DeiT's ``distillation_token`` and its ``cls_classifier`` /
    ``distillation_classifier`` heads are read for a distilled config. The renamed
    modules of ``transformers>=5``'s in-memory ``state_dict()`` (``layers.N.attention.q_proj``,
    ``mlp.fc1``, ...) are accepted too. ``pooler.*`` tensors are ignored.

    Note that HF ViT configs usually set ``layer_norm_eps=1e-12``; build the config with
    :meth:`ViTConfig.from_hf_config` to match.

    Returns:
        ``{"params": ...}`` for :meth:`VisionTransformer.apply`.

    Raises:
        CheckpointError: (a ``ValueError``) naming every missing, unexpected or wrongly
            shaped tensor.
    """
    cfg = config
    r = TensorReader(state_dict, strip_prefixes=("vit.", "deit."), rename=_hf_rename, ignore=(r"pooler\..*",))
    d, p, c, m = cfg.dim, cfg.patch_size, cfg.in_chans, cfg.mlp_dim

    dense, ln = _torch_layer_readers(r, d)

    e = "embeddings"
    params: dict[str, Any] = {
        "patch_embed": {
            "kernel": r.take(f"{e}.patch_embeddings.projection.weight", (d, c, p, p)).transpose(2, 3, 1, 0),
            "bias": r.take(f"{e}.patch_embeddings.projection.bias", (d,)),
        },
        "cls_token": r.take(f"{e}.cls_token", (1, 1, d)),
    }
    if cfg.distilled:
        params["dist_token"] = r.take(f"{e}.distillation_token", (1, 1, d))
    params["pos_embed"] = r.take(f"{e}.position_embeddings", (1, cfg.num_tokens, d))
    for i in range(cfg.depth):
        b = f"encoder.layer.{i}"
        params[f"blocks_{i}"] = {
            "norm1": ln(f"{b}.layernorm_before"),
            "attn": {
                "query": dense(f"{b}.attention.attention.query", d, d, cfg.qkv_bias),
                "key": dense(f"{b}.attention.attention.key", d, d, cfg.qkv_bias),
                "value": dense(f"{b}.attention.attention.value", d, d, cfg.qkv_bias),
                "out": dense(f"{b}.attention.output.dense", d, d),
            },
            "norm2": ln(f"{b}.layernorm_after"),
            "mlp": {
                "fc1": dense(f"{b}.intermediate.dense", d, m),
                "fc2": dense(f"{b}.output.dense", m, d),
            },
        }
    params["norm"] = ln("layernorm")
    if cfg.num_classes:
        if cfg.distilled:
            params["head"] = dense("cls_classifier", d, cfg.num_classes)
            params["head_dist"] = dense("distillation_classifier", d, cfg.num_classes)
        else:
            params["head"] = dense("classifier", d, cfg.num_classes)
    r.finish()
    return {"params": jax.tree.map(np.ascontiguousarray, params)}


def load_safetensors(
    path: str | os.PathLike[str], config: ViTConfig, layout: Literal["timm", "hf"] = "timm"
) -> dict[str, Any]:
    """Loads a ``.safetensors`` checkpoint in timm or HF layout as Flax variables.

    Example:
        >>> variables = load_safetensors("deit_s.safetensors", deit_s16())  # doctest: +SKIP
    """
    state_dict = load_state_dict(path)
    if layout == "timm":
        return params_from_timm(state_dict, config)
    if layout == "hf":
        return params_from_hf(state_dict, config)
    raise ValueError(f"layout must be 'timm' or 'hf', got {layout!r}")


def save_safetensors(path: str | os.PathLike[str], variables: Mapping[str, Any], config: ViTConfig) -> None:
    """Saves Flax variables as a timm-layout ``.safetensors`` file (see :func:`params_to_timm`)."""
    save_state_dict(params_to_timm(variables, config), path, metadata={"format": "pt"})
