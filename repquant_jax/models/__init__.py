"""Transformer models with real-checkpoint loaders, as plain Flax Linen modules.

* :mod:`~repquant_jax.models.vit`: ViT / DeiT (timm and Hugging Face checkpoints).
* :mod:`~repquant_jax.models.bert`: BERT encoder + sentence embeddings (all-MiniLM-L6-v2).
* :mod:`~repquant_jax.models.llama`: LLaMA-style decoder (Hugging Face checkpoints).
* :mod:`~repquant_jax.models.checkpoint`: shared safetensors / state-dict helpers.

Loaders return Flax variables ``{"params": ...}`` ready for ``model.apply`` and raise
:class:`CheckpointError` (a ``ValueError``) naming every missing, unexpected or wrongly
shaped tensor.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from repquant_jax import models
    >>> cfg = models.vit.vit_tiny_fashion_mnist()
    >>> model = models.VisionTransformer(cfg)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> apply_fn = lambda params, images: model.apply(params, images)
"""

from repquant_jax.models import bert, checkpoint, llama, vit
from repquant_jax.models.bert import BertConfig, BertEncoder, SentenceEncoder
from repquant_jax.models.checkpoint import CheckpointError
from repquant_jax.models.llama import Llama, LlamaConfig
from repquant_jax.models.vit import ViTConfig, VisionTransformer

__all__ = [
    "bert",
    "checkpoint",
    "llama",
    "vit",
    "BertConfig",
    "BertEncoder",
    "SentenceEncoder",
    "CheckpointError",
    "Llama",
    "LlamaConfig",
    "ViTConfig",
    "VisionTransformer",
]
