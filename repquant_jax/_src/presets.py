"""Ready-made configs for the methods compared in docs/method.md, "The compared methods (presets)".

Each preset is ``preset(w_bits=4, a_bits=4, **overrides) -> QuantConfig``; ``overrides``
are any `QuantConfig` fields.

* `minmax`: min-max ranges everywhere, per-tensor norm outputs, uniform softmax.
* `percentile`: the percentile + MSE search (docs/method.md, "Calibration"), per-tensor
  norm outputs ("plain layer-wise"), uniform softmax.
* `repq_vit`: the search, per-channel norm outputs folded to per-tensor (the norm fold),
  a log softmax quantizer of base 2^(1/k) with k chosen from the bits
  (``softmax_quantizer="log_root"``; k = 2, RepQ-ViT's log√2, where that measured best),
  in its log2 form. ``softmax_quantizer="log_sqrt2"`` gives RepQ-ViT's log√2 at every
  width. No learning.
* `repquant`: `repq_vit` plus learnable dual clipping and weight reconstruction
  (docs/method.md, "Learned steps").

Weights are per output channel in every preset (docs/method.md, "What gets quantized").
Every preset rounds weights to nearest; ``weight_rounding="gptq"`` (an override of any
of them) chooses the codes in closed form instead (docs/method.md, "GPTQ rounding"),
and with ``repquant`` AdaRound then starts from them.

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
    """RepQ-ViT: per-channel norm outputs folded to per-tensor, log softmax (k from the bits)."""
    base = dict(norm_quantizer="per_channel", softmax_quantizer="log_root")
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**base, **overrides})


def repquant(w_bits: int = 4, a_bits: int = 4, **overrides: Any) -> QuantConfig:
    """RepQuant: `repq_vit` + learnable dual clipping + weight reconstruction."""
    base = dict(
        norm_quantizer="per_channel",
        softmax_quantizer="log_root",
        dual_clipping=DualClipping(),
        reconstruction=Reconstruction(),
    )
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**base, **overrides})
