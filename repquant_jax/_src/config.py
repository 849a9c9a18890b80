"""Quantization config: frozen keyword-only dataclasses, rules on site names, presets.

A `QuantConfig` says how every site is quantized; `Rule`s override it for the sites
whose name matches a regular expression (first match wins, like qwix). The presets in
`repquant_jax._src.presets` build the configs of the methods compared in
docs/method.md, "The compared methods (presets)".

Example:
  >>> import repquant_jax as repquant
  >>> config = repquant.presets.repq_vit(w_bits=6, a_bits=6, rules=(
  ...     repquant.Rule(pattern=r"^head", bits=8),))
  >>> config.norm_quantizer
  'per_channel'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from repquant_jax._src.types import MAX_LOG_ROOT, QUANTIZER_KINDS, CalibrationMethod, Granularity, QuantizerKind, Target

__all__ = ["Rule", "DualClipping", "GPTQ", "Reconstruction", "QuantConfig", "SiteSpec"]

_CALIBRATIONS = ("minmax", "percentile", "search")
SoftmaxQuantizer = Literal["uniform", "log2", "log_sqrt2", "log_root"]
_SOFTMAX_QUANTIZERS: tuple[SoftmaxQuantizer, ...] = ("uniform", "log2", "log_sqrt2", "log_root")


def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 16):
        raise ValueError(f"{name} must be an integer in 2..16, got {bits!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Overrides the config for sites whose name matches ``pattern`` (`re.search`).

    Attributes:
      pattern: regular expression matched against site names as printed by
        `repquant_jax._src.inspect` (``"Block_3/attn/query"``, ``"fc1:input"``).
      target: ``"weight"``, ``"activation"`` or ``"any"``: which sites the rule is for.
      bits: bit-width for the matched sites.
      kind: quantizer kind for the matched sites: ``"uniform"`` or ``"symmetric"``
        for weights and activations; ``"log2"``, ``"log_sqrt2"`` or ``"log_root"`` (its
        root from `QuantConfig.softmax_log_root`) for activations in [0, 1] only
        (softmax outputs): a rule giving a log kind to a weight site is refused.
      skip: leave the matched sites in float.
    """

    pattern: str
    target: Literal["weight", "activation", "any"] = "any"
    bits: int | None = None
    kind: QuantizerKind | None = None
    skip: bool = False

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {err}") from None
        _check_choice("Rule.target", self.target, ("weight", "activation", "any"))
        _check_bits("Rule.bits", self.bits)
        if self.kind is not None:
            _check_choice("Rule.kind", self.kind, QUANTIZER_KINDS)

    def matches(self, name: str, target: str) -> bool:
        return self.target in ("any", target) and re.search(self.pattern, name) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DualClipping:
    """Learnable per-channel lower/upper clipping of norm outputs (docs/method.md, "Dual clipping").

    Attributes:
      steps: Adam steps per fold group.
      learning_rate: Adam learning rate on the clipping logits.
      max_rows: calibration tokens (rows of the ``[tokens, channels]`` activation)
        sampled per group for the loss.
      accept: how a group's learned clipping is judged: ``"unit"`` keeps it when the
        following matmuls' output error falls on the rows it learned from; ``"model"``
        (the default) learns from the rows of the training samples only and also
        requires the whole quantized model's output error on the held-out samples to
        fall, groups judged in forward order, each with the earlier groups as decided.
        A lower matmul error did not mean a better model: on the Fashion-MNIST ViT
        clipping judged by its own loss cost 0.18 points of top-1
        (experiments/results/ablation_vit.md). Costs one forward pass of the model
        over the first calibration chunk per group.
      held_out: the fraction of calibration samples ``"model"`` judges on; with the
        same fraction and seed as `Reconstruction.held_out` both judge on the same
        samples.
    """

    steps: int = 100
    learning_rate: float = 5e-2
    max_rows: int = 1024
    accept: Literal["unit", "model"] = "model"
    held_out: float = 0.25

    def __post_init__(self):
        _check_choice("DualClipping.accept", self.accept, ("unit", "model"))
        if not 0 < self.held_out < 1:
            raise ValueError(f"DualClipping.held_out must be in (0, 1), got {self.held_out}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ:
    """Settings of GPTQ-style closed-form weight rounding (docs/method.md, "GPTQ rounding").

    Used with ``QuantConfig(weight_rounding="gptq")``: each weight matmul's integer codes
    are chosen from its inputs' second moments ``H = 2 XᵀX``, with error feedback
    through ``H⁻¹``, the weight quantizer's scales and zero points unchanged.

    Attributes:
      damping: ``λ``: ``λ·mean(diag H)`` is added to the diagonal of ``H`` (GPTQ's
        "percdamp"); larger trusts the calibration inputs less.
      block_size: input rows per lazy block (the speed of the closed form, not its
        result beyond float rounding).
      act_order: quantize input rows in order of decreasing ``diag H`` (GPTQ's act
        order) instead of their order in the kernel.
      max_rows: calibration rows (tokens) sampled per site, paired between the float
        and the quantized model: for the float target's cross moment and to judge each
        output column.
      held_out: the fraction of the sampled rows kept out of ``H`` and the cross moment:
        each output column keeps, of nearest rounding and GPTQ's codes, the one with the
        lowest output error against the float model on them (on the fitted rows when
        too few rows). ``H`` uses every other row of the first chunk.
      target: the output GPTQ matches on the quantized model's input ``X_q``:
        ``"quantized"``: ``X_q W`` (GPTQ as published: only the weight's own error);
        ``"float"``: also the float model's ``X_f W``, so the codes also correct the
        error of the input's quantization (GPTQ of a weight shifted by the cross moment
        ``X_qᵀ(X_f - X_q)``). The correction is fitted to the calibration rows' input
        errors and can overfit few rows, so with ``"float"`` each column chooses among
        nearest rounding and both targets' codes.
    """

    damping: float = 0.01
    block_size: int = 128
    act_order: bool = False
    max_rows: int = 2048
    held_out: float = 0.25
    target: Literal["quantized", "float"] = "float"

    def __post_init__(self):
        if not self.damping > 0:
            raise ValueError(f"GPTQ.damping must be > 0, got {self.damping}")
        if self.block_size < 1 or self.max_rows < 1:
            raise ValueError(f"GPTQ.block_size and max_rows must be >= 1, got {self.block_size}, {self.max_rows}")
        _check_choice("GPTQ.target", self.target, ("quantized", "float"))
        if not 0 <= self.held_out < 1:
            raise ValueError(f"GPTQ.held_out must be in [0, 1), got {self.held_out}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reconstruction:
    """Weight rounding reconstruction after the fold (AdaRound-style, docs/method.md).

    With ``granularity="block"`` (the default) each transformer block, in forward order,
    learns jointly whether to round every weight of its matmuls up or down and the scales
    of its activation quantizers, so that its output on the quantized model's inputs
    matches the float model's; with ``"layer"`` each weight matmul learns its rounding
    alone. Block-wise with the model's check (``accept="model"``) was at least as good
    as layer-wise on the ViT, the tiny LLaMA and MiniLM
    (experiments/results/block_reconstruction.md), and costs more time.
    It fits the calibration data closely: calibrate on inputs like those of inference
    (for text, the same sequence lengths; MiniLM calibrated on 64-token truncations and
    evaluated on documents of up to 160 tokens got worse with it, see
    experiments/RESULTS.md).

    Attributes:
      steps: Adam steps per weight site.
      learning_rate: Adam learning rate on the rounding logits.
      reg_weight: weight of the regularizer pushing the soft rounding to 0 or 1.
      beta_start, beta_end: annealing range of the regularizer's exponent.
      warmup: fraction of steps without the regularizer.
      max_rows: calibration tokens sampled per site for the loss (layer-wise).
      held_out: tokens kept out of training, as a fraction of ``max_rows`` (when the
        calibration data has them): each output column keeps its learned rounding only
        if that lowers the column's error on them, so that overfitting falls back to
        nearest rounding. 0 judges on the training tokens.
      granularity: ``"layer"``: each weight matmul alone, matching its own output;
        ``"block"`` / ``"sub_block"``: per transformer block (or sub-block), the
        rounding of all its matmuls and the scales of its per-tensor activation
        quantizers learned jointly to match the block's output
        (`repquant_jax._src.block_recon`). With ``"block"``, ``held_out`` is the
        fraction of calibration samples a block is judged on, and ``steps`` are per
        block. ``"model"``: the whole graph as one unit, matching the model's outputs
        (as much memory as the graph's activations; on MiniLM, whose block outputs
        carry a few huge channels that dominate a block's squared error, it beat
        block-wise with ``accept="unit"``; on the ViT and the LLaMA it was worse than
        block-wise: experiments/results/block_reconstruction.md).
      scale_learning_rate: Adam learning rate on the log activation scales (blocks).
      qdrop: probability that an activation element skips quantization during block
        training (QDrop); 0 disables it.
      eval_every: block training steps between evaluations on the held-out samples;
        a block keeps the learned state that was best there (early stopping).
      batches_per_step: calibration batches each training step of a block (or
        sub-block, or the model) runs on, drawn at random per step; None: every batch
        of the first calibration chunk. A step's time grows with it: the budget of
        block-wise reconstruction together with ``steps``.
      accept: how a block (or sub-block) is judged on the held-out samples: ``"unit"``
        keeps what it learned when its own output error falls; ``"model"`` also
        requires the whole model's output error to fall (earlier units as decided,
        later ones not yet learned). A block's error can fall while the model's rises:
        on MiniLM every block's did and the model got worse (experiments/RESULTS.md).
        Costs one forward pass of the model over the calibration set per unit.
    """

    steps: int = 200
    learning_rate: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    max_rows: int = 1024
    held_out: float = 0.25
    granularity: Literal["layer", "block", "sub_block", "model"] = "block"
    scale_learning_rate: float = 1e-3
    qdrop: float = 0.0
    eval_every: int = 25
    batches_per_step: int | None = None
    accept: Literal["unit", "model"] = "model"

    def __post_init__(self):
        if not 0 <= self.held_out < 1:
            raise ValueError(f"Reconstruction.held_out must be in [0, 1), got {self.held_out}")
        if self.batches_per_step is not None and self.batches_per_step < 1:
            raise ValueError(f"Reconstruction.batches_per_step must be None or >= 1, got {self.batches_per_step}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize a model. Build one with `repquant_jax._src.presets`.

    Attributes:
      w_bits: weight bit-width (per output channel, asymmetric uniform).
      a_bits: activation bit-width for matmul inputs.
      input_bits: bit-width for matmul inputs that are the function's own inputs
        (the patch-embedding input; docs/method.md, "What gets quantized").
      weight_calibration: ``"minmax"``, ``"percentile"`` or ``"search"``
        (docs/method.md, "Calibration").
      activation_calibration: same choices, for activations.
      weight_granularity: ``"per_channel"`` (per output channel) or ``"per_tensor"``.
      norm_quantizer: ``"per_tensor"``, or ``"per_channel"`` for norm outputs during
        calibration, folded into per-tensor by the norm fold (docs/method.md).
      unfoldable: what to do with a per-channel norm quantizer whose group cannot be
        folded because the norm output also feeds something else (the residual of a
        post-LN BERT block): ``"branch"`` folds the kernel half only (the matmul
        branch quantizes ``x / r1 + s⊙r2 / r1`` per tensor, with the per-channel
        codes; docs/method.md), falling back to one per-tensor quantizer where even
        that is illegal; ``"per_tensor"``; ``"per_channel"`` (keep it, no integer
        path); or ``"error"``.
      fold_norms: fold per-channel norm quantizers into per-tensor ones (the norm fold). False
        keeps them per channel: the calibration-time model, for comparisons.
      min_rows_per_channel: a per-channel norm quantizer needs at least this many
        calibration rows (tokens) per channel, else it is quantized per tensor
        (reported). Few rows make per-channel ranges overfit (the class token before a
        classifier head gives one row per image: at W8A8 on the Fashion-MNIST ViT the
        per-channel head input costs 3.5% logit error vs 1.5% per tensor), but a
        per-tensor quantizer on a norm with outlier channels collapses at 4 bits (the
        stress variant: 67 ± 18% top-1 vs 88.8%), so the default is low.
      exact_zero_point: fold with z̃ = round(mean(z)) (bit-exact) instead of RepQ-ViT's
        unrounded mean.
      fold_check_tolerance: every fold is checked on a calibration batch: the folded
        float model (quantizers off) must match the original to this relative output
        error, else the fold is undone and reported. None: 1e-4, or 4 ulps of the
        model's narrowest float type (bfloat16: 0.031).
      rmsnorm: ``"bias"`` (asymmetric per-channel quantizer; the fold adds a norm bias)
        or ``"symmetric"`` (symmetric per-channel quantizer; a pure scale fold).
      softmax_quantizer: the quantizer of softmax outputs feeding a matmul:
        ``"uniform"``, ``"log2"``, ``"log_sqrt2"`` (RepQ-ViT's), or ``"log_root"``: the
        log quantizer of base ``2^(1/k)`` (levels ``2^(-q/k)``; docs/method.md,
        "Softmax"), with ``k`` from ``softmax_log_root``.
      softmax_log_root: ``k`` of the ``"log_root"`` softmax quantizer, an integer
        >= 1 (1 is log2's levels, 2 log√2's). None: chosen from the site's bits by
        `repquant_jax._src.quantizers.default_log_root` (measured per bit-width,
        experiments/results/softmax_base.md).
      percentile: the percentile of the ``"percentile"`` calibration.
      range_selection: how an activation quantizer's range is chosen among the
        candidates of its calibration rule (docs/method.md, "Calibration"):
        ``"auto"`` (the default) is ``"held_out"`` for a site wider than 8 bits or
        with fewer than 1024 observed rows, and ``"calibration"`` otherwise (at 4-8
        bits on well-sampled sites cross-validation picked wider ranges, which cost
        MiniLM 0.5 points of cosine to float at W6A6; where few rows or 16-bit
        resolution make clipping new values the larger error, it is needed: W16 is
        within 1e-3 of float on held-out inputs only with it). ``"held_out"``
        cross-validates: the calibration samples are dealt into
        ``range_folds`` folds, each candidate is fitted on all folds but one and judged
        on that one, and the candidate with the lowest error over all folds is fitted
        again on all samples, so that ranges hold on inputs calibration did not see;
        for a per-channel norm output it also chooses per channel or per tensor that
        way, given at least ``range_folds`` samples. ``"calibration"`` judges the candidates on the values they are fitted to
        (the RepQ-ViT rule). Weights are always judged on themselves.
      range_folds: folds of ``"held_out"`` (samples are the rows of a batch's leading
        axis, or the tokens when there is a single sample; fewer samples than folds:
        leave one out).
      range_expansions: besides the percentile ranges, ``"held_out"`` tries the
        min-max range with both ends multiplied by each of these factors (the
        ``"minmax"`` rule tries only these and 1): a wider range costs resolution
        but clips fewer new values, which only the held-out samples can show.
      dual_clipping: learn per-channel clipping of norm outputs before the fold.
      weight_rounding: how weight codes are chosen before any reconstruction:
        ``"nearest"`` (round to nearest) or ``"gptq"`` (closed form from the
        calibration inputs' second moments, with error feedback; settings in
        ``gptq``). With ``reconstruction``, AdaRound starts from that rounding and
        each output column (layer-wise) or block keeps it unless learning beats it.
      gptq: the settings of ``weight_rounding="gptq"``.
      reconstruction: learn weight rounding after the fold.
      rules: per-site overrides, first match wins.
      seed: seeds every random choice (subsampling, learning).
      calibration_chunk: calibration batches evaluated side by side. Memory grows with
        it; more batches are streamed through in further chunks. The learned steps and
        the report use the first chunk.
      max_calibration_values: values (or rows × channels) each site keeps, as a uniform
        random sample, to fit its quantizer; below the cap the fit is exact.
      calibration_order: how the calibration batches go through the model.
        ``"chunks"``: each chunk of ``calibration_chunk`` batches through the whole
        model; memory is bounded in the number of batches, but every site's sample is
        kept to the end, so it grows with depth. ``"blocks"``: every chunk through one
        transformer block (`repquant_jax._src.units`) before the next block, as
        GPTQ-style LLM tools do; a block's samples are dropped when it is done, so
        memory does not grow with depth, but the values at a block boundary are kept
        for every batch. ``"auto"``: ``"blocks"`` when the batches fit in one chunk
        (the quantizers are then exactly those of ``"chunks"``), else ``"chunks"``.
    """

    w_bits: int = 4
    a_bits: int = 4
    input_bits: int = 8
    weight_calibration: CalibrationMethod = "search"
    activation_calibration: CalibrationMethod = "search"
    weight_granularity: Granularity = "per_channel"
    norm_quantizer: Granularity = "per_channel"
    unfoldable: str = "branch"
    fold_norms: bool = True
    min_rows_per_channel: int = 16
    exact_zero_point: bool = True
    fold_check_tolerance: float | None = None
    rmsnorm: str = "bias"
    softmax_quantizer: SoftmaxQuantizer = "log_sqrt2"
    softmax_log_root: int | None = None
    percentile: float = 0.9999
    range_selection: Literal["auto", "held_out", "calibration"] = "auto"
    range_folds: int = 4
    range_expansions: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 4.0, 8.0)
    dual_clipping: DualClipping | None = None
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    gptq: GPTQ = GPTQ()
    reconstruction: Reconstruction | None = None
    rules: tuple[Rule, ...] = ()
    seed: int = 0
    calibration_chunk: int = 16
    max_calibration_values: int = 1 << 22
    calibration_order: Literal["auto", "chunks", "blocks"] = "auto"

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "input_bits"):
            _check_bits(name, getattr(self, name))
        _check_choice("weight_calibration", self.weight_calibration, _CALIBRATIONS)
        _check_choice("activation_calibration", self.activation_calibration, _CALIBRATIONS)
        _check_choice("weight_granularity", self.weight_granularity, ("per_channel", "per_tensor"))
        _check_choice("norm_quantizer", self.norm_quantizer, ("per_tensor", "per_channel"))
        _check_choice("unfoldable", self.unfoldable, ("branch", "per_tensor", "per_channel", "error"))
        _check_choice("rmsnorm", self.rmsnorm, ("bias", "symmetric"))
        _check_choice("softmax_quantizer", self.softmax_quantizer, _SOFTMAX_QUANTIZERS)
        root = self.softmax_log_root
        if root is not None and (isinstance(root, bool) or not isinstance(root, int) or not 1 <= root <= MAX_LOG_ROOT):
            raise ValueError(f"softmax_log_root must be None or an integer in 1..{MAX_LOG_ROOT}, got {root!r}")
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1], got {self.percentile}")
        _check_choice("range_selection", self.range_selection, ("auto", "held_out", "calibration"))
        if isinstance(self.range_folds, bool) or not isinstance(self.range_folds, int) or self.range_folds < 2:
            raise ValueError(f"range_folds must be an integer >= 2, got {self.range_folds!r}")
        if not isinstance(self.range_expansions, tuple) or not all(
            isinstance(e, (int, float)) and 1 <= e <= 1e3 for e in self.range_expansions
        ):
            raise ValueError(f"range_expansions must be a tuple of numbers in [1, 1000], got {self.range_expansions!r}")
        if self.calibration_chunk < 1:
            raise ValueError(f"calibration_chunk must be >= 1, got {self.calibration_chunk}")
        _check_choice("calibration_order", self.calibration_order, ("auto", "chunks", "blocks"))
        if self.max_calibration_values < 1024:
            raise ValueError(f"max_calibration_values must be >= 1024, got {self.max_calibration_values}")
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise TypeError("rules must be a tuple of repquant_jax.Rule")


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """The resolved settings of one site (after rules).

    Attributes:
      name: the site's name.
      target: weight or activation.
      bits: bit-width.
      kind: quantizer kind.
      granularity: one scale, or one per channel (the last axis; weights: per output
        channel).
      calibration: the range estimator.
      skip: left in float by a rule.
      rule: index of the rule that matched, if any.
      log_root: ``k`` of a ``"log_root"`` quantizer (None for other kinds).
      note: why the settings differ from the config's (e.g. per tensor for a norm
        group that cannot be folded), for the report.
      fixed_granularity: the held-out choice of ``range_selection`` keeps the
        granularity: a norm group that cannot be folded whole (a branch fold, or kept
        per channel by ``unfoldable="per_channel"``).
    """

    name: str
    target: Target
    bits: int
    kind: QuantizerKind
    granularity: Granularity
    calibration: CalibrationMethod
    skip: bool = False
    rule: int | None = None
    note: str = ""
    fixed_granularity: bool = False
    log_root: int | None = None
