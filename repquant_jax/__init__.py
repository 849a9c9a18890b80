"""repquant-jax: post-training quantization of transformers in JAX with RepQuant.

Example:
  >>> import repquant_jax as repquant
  >>> config = repquant.presets.repquant(w_bits=4, a_bits=4)
  >>> # qparams, qapply = repquant.transform(apply_fn, params, calib_batches, config)
  >>> # logits = qapply(qparams, images)
"""

from repquant_jax._src import presets
from repquant_jax._src.config import DualClipping, QuantConfig, Reconstruction, Rule
from repquant_jax._src.graph import UnsupportedGraphError
from repquant_jax._src.inspect import inspect
from repquant_jax._src.io import load, save
from repquant_jax._src.quantizers import QuantParams
from repquant_jax._src.report import TransformReport
from repquant_jax._src.sites import Plan
from repquant_jax._src.transform import QApply, QParams, transform

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
