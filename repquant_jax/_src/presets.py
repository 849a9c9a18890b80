"""Ready-made configs for the methods compared in docs/method.md, "The compared methods (presets)".

Each preset is ``preset(w_bits=4, a_bits=4, **overrides) -> QuantConfig``; ``overrides``
are any `QuantConfig` fields.

* `minmax`: min-max ranges everywhere, per-tensor norm outputs, uniform softmax.
* `percentile`: the percentile + MSE search (docs/method.md, "Calibration"), per-tensor
  norm outputs ("plain layer-wise"), uniform softmax.
* `repq_vit`: the search, per-channel norm outputs folded to per-tensor (the norm fold),
  log√2 softmax (in its log2 form). No learning.
* `repquant`: `repq_vit` plus learnable dual clipping and weight reconstruction
  (docs/method.md, "Learned steps").

Weights are per output channel in every preset (docs/method.md, "What gets quantized").

Example:
  >>> from repquant_jax._src import presets
  >>> presets.repquant(w_bits=6, a_bits=6).reconstruction is not None
  True
"""

from __future__ import annotations

from typing import Any

from repquant_jax._src.config import DualClipping, QuantConfig, Reconstruction

__all__ = ["minmax", "percentile", "repq_vit", "repquant"]


def minmax(w_bits: int = 4, a_bits: int = 4, **overrides: Any) -> QuantConfig:
    """Min-max calibration, per-tensor activations, uniform softmax."""
    base = dict(
        weight_calibration="minmax",
        activation_calibration="minmax",
        norm_quantizer="per_tensor",
        softmax_quantizer="uniform",
    )
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**base, **overrides})


def percentile(w_bits: int = 4, a_bits: int = 4, **overrides: Any) -> QuantConfig:
    """The percentile + MSE search, per-tensor norm outputs, uniform softmax."""
    base = dict(norm_quantizer="per_tensor", softmax_quantizer="uniform")
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**base, **overrides})


def repq_vit(w_bits: int = 4, a_bits: int = 4, **overrides: Any) -> QuantConfig:
    """RepQ-ViT: per-channel norm outputs folded to per-tensor, log√2 softmax."""
    base = dict(norm_quantizer="per_channel", softmax_quantizer="log_sqrt2")
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**base, **overrides})


def repquant(w_bits: int = 4, a_bits: int = 4, **overrides: Any) -> QuantConfig:
    """RepQuant: `repq_vit` + learnable dual clipping + weight reconstruction."""
    base = dict(
        norm_quantizer="per_channel",
        softmax_quantizer="log_sqrt2",
        dual_clipping=DualClipping(),
        reconstruction=Reconstruction(),
    )
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**base, **overrides})
