"""repquant-jax: post-training quantization of transformers in JAX with RepQuant.

Example:
  >>> import jax, flax.linen as nn
  >>> import repquant_jax as repquant
  >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(16), nn.gelu, nn.Dense(4)])
  >>> x = jax.random.normal(jax.random.key(0), (8, 16))
  >>> params = model.init(jax.random.key(1), x)
  >>> qparams, qapply = repquant.transform(model.apply, params, [x], repquant.presets.repq_vit(8, 8))
  >>> frozen = repquant.freeze(qapply, qparams, x)       # weights stored on their grids
  >>> exported = repquant.export(qparams, qapply, x)     # int8 weights, integer matmuls
  >>> repquant.integer_apply(exported, x).shape
  (8, 4)
"""

from repquant_jax._src import presets
from repquant_jax._src.adapters import from_nnx
from repquant_jax._src.config import GPTQ, DualClipping, QuantConfig, Reconstruction, Rule
from repquant_jax._src.export import Exported, export, integer_apply, matmul_modes
from repquant_jax._src.graph import UnsupportedGraphError
from repquant_jax._src.inspect import inspect
from repquant_jax._src.io import load, save
from repquant_jax._src.qapply import QApply, freeze
from repquant_jax._src.quantizers import QuantParams
from repquant_jax._src.report import SiteReport, TransformReport
from repquant_jax._src.sites import Plan
from repquant_jax._src.state import QParams
from repquant_jax._src.transform import transform

__all__ = [
    # the pipeline
    "transform",
    "inspect",
    "freeze",
    "export",
    "integer_apply",
    "matmul_modes",
    "save",
    "load",
    "from_nnx",
    # configs
    "presets",
    "QuantConfig",
    "Rule",
    "DualClipping",
    "GPTQ",
    "Reconstruction",
    # results
    "QParams",
    "QApply",
    "QuantParams",
    "Exported",
    "Plan",
    "TransformReport",
    "SiteReport",
    "UnsupportedGraphError",
]
__version__ = "0.1.0.dev0"
