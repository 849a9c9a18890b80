"""repquant-jax: post-training quantization of transformers in JAX with RepQuant.

Example:
  >>> import repquant_jax as repquant
  >>> config = repquant.presets.repquant(w_bits=4, a_bits=4)
  >>> # qparams, qapply = repquant.transform(apply_fn, params, calib_batches, config)
  >>> # logits = qapply(qparams, images)
"""

from repquant_jax import presets
from repquant_jax.config import DualClipping, QuantConfig, Reconstruction, Rule
from repquant_jax.graph import UnsupportedGraphError
from repquant_jax.inspect import inspect
from repquant_jax.io import load, save
from repquant_jax.quantizers import QuantParams
from repquant_jax.report import TransformReport
from repquant_jax.sites import Plan
from repquant_jax.transform import QApply, QParams, transform

__all__ = [
    "transform",
    "inspect",
    "save",
    "load",
    "presets",
    "QuantConfig",
    "Rule",
    "DualClipping",
    "Reconstruction",
    "QParams",
    "QApply",
    "QuantParams",
    "Plan",
    "TransformReport",
    "UnsupportedGraphError",
]
__version__ = "0.1.0.dev0"
