"""Transformer models with real-checkpoint loaders, as plain Flax Linen modules.

* :mod:`~repquant_zoo.models.vit`: ViT / DeiT (timm and Hugging Face checkpoints).
* :mod:`~repquant_zoo.models.bert`: BERT encoder + sentence embeddings (all-MiniLM-L6-v2).
* :mod:`~repquant_zoo.models.llama`: LLaMA-style decoder (Hugging Face checkpoints).
* :mod:`~repquant_zoo.models.checkpoint`: shared safetensors / state-dict helpers.

Loaders return Flax variables ``{"params": ...}`` ready for ``model.apply`` and raise
:class:`CheckpointError` (a ``ValueError``) naming every missing, unexpected or wrongly
shaped tensor.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from repquant_zoo import models
    >>> cfg = models.vit.vit_tiny_fashion_mnist()
    >>> model = models.VisionTransformer(cfg)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> apply_fn = lambda params, images: model.apply(params, images)
"""

from repquant_zoo.models import bert, checkpoint, llama, vit
from repquant_zoo.models.bert import BertConfig, BertEncoder, SentenceEncoder
from repquant_zoo.models.checkpoint import CheckpointError
from repquant_zoo.models.llama import Llama, LlamaConfig
from repquant_zoo.models.vit import VisionTransformer, ViTConfig

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
