"""LLaMA-style decoder as a Flax Linen module, with a Hugging Face checkpoint loader.

Matches ``transformers``' ``LlamaForCausalLM``:

* token embedding (``nn.Embed``), no position embedding;
* ``n_layers`` pre-norm blocks ``x + attn(rms1(x))``, ``x + mlp(rms2(x))`` with RMSNorm
  (weight only, ``nn.RMSNorm``);
* causal self-attention with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``
  ``nn.Dense`` layers (no bias unless ``attention_bias``), rotary position embedding in
  HF's ``rotate_half`` convention (the two halves of each head, not interleaved pairs),
  grouped-query attention when ``n_kv_heads < n_heads`` (each key/value head serves
  ``n_heads // n_kv_heads`` consecutive query heads), an additive large-negative causal
  bias before a plain ``jax.nn.softmax``;
* SwiGLU MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``;
* final RMSNorm and an untied ``lm_head`` (or tied to the embedding).

Parameter tree of ``Llama(cfg).init(...)["params"]``::

    embed_tokens: {embedding [vocab_size, dim]}
    layers_{i}:                                         # i = 0 .. n_layers-1
        input_layernorm: {scale [dim]}
        self_attn: {q_proj: {kernel [dim, n_heads*head_dim]},
                    k_proj: {kernel [dim, n_kv_heads*head_dim]},
                    v_proj: {kernel [dim, n_kv_heads*head_dim]},
                    o_proj: {kernel [n_heads*head_dim, dim]}}   # (+ bias if attention_bias)
        post_attention_layernorm: {scale [dim]}
        mlp: {gate_proj: {kernel [dim, ffn_dim]}, up_proj: {kernel [dim, ffn_dim]},
              down_proj: {kernel [ffn_dim, dim]}}               # (+ bias if mlp_bias)
    norm: {scale [dim]}
    lm_head: {kernel [dim, vocab_size]}                 # absent if tie_embeddings

The q/k/v kernels' output features are ordered (head, head_dim).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = llama_tiny_bytes(n_layers=1)
    >>> model = Llama(cfg)
    >>> tokens = jnp.array([list(b"hello")])
    >>> variables = model.init(jax.random.key(0), tokens)
    >>> model.apply(variables, tokens).shape
    (1, 5, 256)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repquant_zoo.models.checkpoint import (
    CheckpointError,
    TensorReader,
    load_state_dict,
    save_state_dict,
)

__all__ = [
    "LlamaConfig",
    "Llama",
    "Attention",
    "Mlp",
    "Block",
    "llama_tiny_bytes",
    "rope_cos_sin",
    "apply_rope",
    "params_from_hf",
    "params_to_hf",
    "load_safetensors",
    "load_pretrained",
    "save_pretrained",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA-style decoder.

    Attributes:
        vocab_size: number of tokens.
        dim: model width (HF ``hidden_size``).
        n_layers: number of blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA); ``None`` means ``n_heads``. Must divide
            ``n_heads``.
        ffn_dim: SwiGLU hidden width (HF ``intermediate_size``).
        head_dim: per-head width; ``None`` means ``dim // n_heads``.
        rms_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        max_seq_len: longest supported sequence (informational; RoPE is computed on the fly).
        tie_embeddings: use the token embedding as the output projection.
        attention_bias: q/k/v/o projections have biases.
        mlp_bias: gate/up/down projections have biases.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    ffn_dim: int = 11008
    head_dim: int | None = None
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.dims_per_head % 2:
            raise ValueError(f"head_dim={self.dims_per_head} must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from a Hugging Face ``LlamaConfig`` dict (``config.json``).

        Raises:
            ValueError: for features this model does not implement (a non-SiLU
                activation, RoPE scaling other than the default).
        """
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"only the 'silu' (SwiGLU) activation is supported, got {act!r}")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        for spec in (rope, scaling):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind not in ("default", None):
                raise ValueError(f"RoPE type {kind!r} is not supported (only 'default')")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or 0)
        kw: dict[str, Any] = dict(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=int(hf["num_attention_heads"]),
            n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            ffn_dim=int(hf["intermediate_size"]),
            head_dim=head_dim if head_dim and head_dim != hidden // heads else None,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``config.json`` dict (``model_type`` ``llama``)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.ffn_dim,
            "head_dim": self.dims_per_head,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        }


def llama_tiny_bytes(**overrides: Any) -> LlamaConfig:
    """A small byte-level decoder to train from scratch: vocab 256, dim 256, 4 layers, 4 heads.

    SwiGLU width 768 (LLaMA's ``2/3 * 4 * dim`` rounded up to a multiple of 256), untied
    head, RoPE base 10000, sequences up to 512 bytes.
    """
    kw: dict[str, Any] = dict(
        vocab_size=256,
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=768,
        rms_eps=1e-5,
        max_seq_len=512,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """RoPE tables as HF computes them: ``[..., seq, head_dim]`` with the frequencies repeated.

    ``inv_freq[j] = theta ** (-2j / head_dim)``; angle = position * inv_freq, laid out as
    ``concat(angles, angles)`` (the ``rotate_half`` convention).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[batch, seq, heads, head_dim]``.

    ``cos``/``sin`` are ``[batch or 1, seq, head_dim]``.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


_dense_init = nn.initializers.normal(stddev=0.02)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped-query key/value heads."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask_bias: Array) -> Array:
        cfg = self.config
        b, s, _ = x.shape
        h, kv, d = cfg.n_heads, cfg.kv_heads, cfg.dims_per_head
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=cfg.attention_bias, kernel_init=_dense_init, name=name
        )
        q = dense(h * d, "q_proj")(x).reshape(b, s, h, d)
        k = dense(kv * d, "k_proj")(x).reshape(b, s, kv, d)
        v = dense(kv * d, "v_proj")(x).reshape(b, s, kv, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv != h:  # GQA: key/value head j serves query heads j*rep .. (j+1)*rep-1
            k = jnp.repeat(k, h // kv, axis=2)
            v = jnp.repeat(v, h // kv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5) + mask_bias
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, h * d)
        return dense(cfg.dim, "o_proj")(out)


class Mlp(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=cfg.mlp_bias, kernel_init=_dense_init, name=name
        )
        gate = dense(cfg.ffn_dim, "gate_proj")(x)
        up = dense(cfg.ffn_dim, "up_proj")(x)
        return dense(cfg.dim, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(rms(x))``, then ``x + mlp(rms(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask_bias: Array) -> Array:
        cfg = self.config
        rms = lambda name: nn.RMSNorm(epsilon=cfg.rms_eps, name=name)  # noqa: E731
        x = x + Attention(cfg, name="self_attn")(rms("input_layernorm")(x), cos, sin, mask_bias)
        x = x + Mlp(cfg, name="mlp")(rms("post_attention_layernorm")(x))
        return x


class Llama(nn.Module):
    """LLaMA-style causal language model returning next-token logits.

    Call signature: ``model.apply(variables, input_ids, positions=None,
    attention_mask=None)`` with ``input_ids`` ``[batch, seq]`` integers returns logits
    ``[batch, seq, vocab_size]``. ``positions`` (``[batch, seq]``, default
    ``0 .. seq-1``) feed RoPE; ``attention_mask`` (``[batch, seq]``, 1 = token,
    0 = padding) additionally hides padded keys. There is no KV cache: this model is
    for scoring (perplexity) and training, not fast generation.

    Attributes:
        config: the :class:`LlamaConfig`.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
    ) -> Array:
        cfg = self.config
        _, s = input_ids.shape
        embed = nn.Embed(cfg.vocab_size, cfg.dim, embedding_init=_dense_init, name="embed_tokens")
        x = embed(input_ids)
        if positions is None:
            positions = jnp.arange(s)[None, :]
        cos, sin = rope_cos_sin(positions, cfg.dims_per_head, cfg.rope_theta)
        allowed = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        mask_bias = jnp.where(allowed, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"layers_{i}")(x, cos, sin, mask_bias)
        x = nn.RMSNorm(epsilon=cfg.rms_eps, name="norm")(x)
        if cfg.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=_dense_init, name="lm_head")(x)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict[str, Any]:
    """Converts a Hugging Face ``LlamaForCausalLM`` state dict into Flax variables.

    Names: ``model.embed_tokens.weight``, ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``,
    ``model.layers.N.mlp.{gate,up,down}_proj.weight``, ``model.layers.N.input_layernorm.weight``,
    ``model.layers.N.post_attention_layernorm.weight``, ``model.norm.weight``,
    ``lm_head.weight``. Linear weights are ``(out, in)`` and are transposed. With
    ``tie_embeddings`` a ``lm_head.weight`` may be present but must equal the embedding.
    Rotary ``inv_freq`` buffers are ignored.

    Returns:
        ``{"params": ...}`` for :meth:`Llama.apply`.

    Raises:
        CheckpointError: (a ``ValueError``) naming every missing, unexpected or wrongly
            shaped tensor with its expected and actual shape.
    """
    cfg = config
    r = TensorReader(
        state_dict, ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")
    )
    dim, hd = cfg.dim, cfg.dims_per_head

    def dense(name: str, n_in: int, n_out: int, bias: bool) -> dict[str, np.ndarray]:
        out = {"kernel": r.take(f"{name}.weight", (n_out, n_in)).T}
        if bias:
            out["bias"] = r.take(f"{name}.bias", (n_out,))
        return out

    def rms(name: str) -> dict[str, np.ndarray]:
        return {"scale": r.take(f"{name}.weight", (dim,))}

    embedding = r.take("model.embed_tokens.weight", (cfg.vocab_size, dim))
    params: dict[str, Any] = {"embed_tokens": {"embedding": embedding}}
    for i in range(cfg.n_layers):
        b = f"model.layers.{i}"
        ab, mb = cfg.attention_bias, cfg.mlp_bias
        params[f"layers_{i}"] = {
            "input_layernorm": rms(f"{b}.input_layernorm"),
            "self_attn": {
                "q_proj": dense(f"{b}.self_attn.q_proj", dim, cfg.n_heads * hd, ab),
                "k_proj": dense(f"{b}.self_attn.k_proj", dim, cfg.kv_heads * hd, ab),
                "v_proj": dense(f"{b}.self_attn.v_proj", dim, cfg.kv_heads * hd, ab),
                "o_proj": dense(f"{b}.self_attn.o_proj", cfg.n_heads * hd, dim, ab),
            },
            "post_attention_layernorm": rms(f"{b}.post_attention_layernorm"),
            "mlp": {
                "gate_proj": dense(f"{b}.mlp.gate_proj", dim, cfg.ffn_dim, mb),
                "up_proj": dense(f"{b}.mlp.up_proj", dim, cfg.ffn_dim, mb),
                "down_proj": dense(f"{b}.mlp.down_proj", cfg.ffn_dim, dim, mb),
            },
        }
    params["norm"] = rms("model.norm")
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": r.take("lm_head.weight", (cfg.vocab_size, dim)).T}
    elif "lm_head.weight" in r:
        head = r.take("lm_head.weight", (cfg.vocab_size, dim))
        if not np.array_equal(head, embedding):
            raise CheckpointError(
                "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but the "
                "config ties them (tie_embeddings=True)",
                unexpected=["lm_head.weight"],
            )
    r.finish()
    return {"params": jax.tree.map(np.ascontiguousarray, params)}


def params_to_hf(variables: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Converts Flax variables (or their ``params``) to a HF ``LlamaForCausalLM`` state dict.

    The inverse of :func:`params_from_hf`; with :func:`save_pretrained` the result loads
    with ``transformers.LlamaForCausalLM.from_pretrained``.
    """
    cfg = config
    p = variables["params"] if "params" in variables else variables
    f32 = lambda x: np.asarray(jax.device_get(x), dtype=np.float32)  # noqa: E731
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": f32(p["embed_tokens"]["embedding"])}

    def dense(name: str, node: Mapping[str, Any]) -> None:
        sd[f"{name}.weight"] = f32(node["kernel"]).T
        if "bias" in node:
            sd[f"{name}.bias"] = f32(node["bias"])

    for i in range(cfg.n_layers):
        layer, b = p[f"layers_{i}"], f"model.layers.{i}"
        sd[f"{b}.input_layernorm.weight"] = f32(layer["input_layernorm"]["scale"])
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            dense(f"{b}.self_attn.{n}", layer["self_attn"][n])
        sd[f"{b}.post_attention_layernorm.weight"] = f32(layer["post_attention_layernorm"]["scale"])
        for n in ("gate_proj", "up_proj", "down_proj"):
            dense(f"{b}.mlp.{n}", layer["mlp"][n])
    sd["model.norm.weight"] = f32(p["norm"]["scale"])
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = f32(p["lm_head"]["kernel"]).T
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def load_safetensors(path: str | os.PathLike[str], config: LlamaConfig) -> dict[str, Any]:
    """Loads a HF-layout ``.safetensors`` file as Flax variables (see :func:`params_from_hf`)."""
    return params_from_hf(load_state_dict(path), config)


def load_pretrained(path: str | os.PathLike[str]) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a HF model folder (``config.json`` + ``model.safetensors``).

    Returns:
        ``(config, variables)``.

    Example:
        >>> config, variables = load_pretrained("my_llama")  # doctest: +SKIP
        >>> logits = Llama(config).apply(variables, tokens)  # doctest: +SKIP
    """
    folder = Path(path)
    config = LlamaConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    return config, load_safetensors(folder / "model.safetensors", config)


def save_pretrained(path: str | os.PathLike[str], variables: Mapping[str, Any], config: LlamaConfig) -> None:
    """Writes ``config.json`` + ``model.safetensors`` in HF layout into folder ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    save_state_dict(params_to_hf(variables, config), folder / "model.safetensors", metadata={"format": "pt"})
