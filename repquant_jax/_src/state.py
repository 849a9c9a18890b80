"""The pipeline's state: what `transform` knows after each stage, and its result.

`Traced` is fixed once the model is traced; `QuantState` is passed through the stages
``(traced, state, ...) -> state`` and never mutated (`dataclasses.replace` makes the
next one). `QParams` is what users get: a pytree of arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import numpy as np
from flax import struct

from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import SiteSpec
from repquant_jax._src.graph import Graph
from repquant_jax._src.param_edits import leaves_like
from repquant_jax._src.sites import Plan

__all__ = ["QParams", "Traced", "GroupOutcome", "FoldForm", "ClippingRows", "QuantState"]


@struct.dataclass
class QParams:
    """Quantized parameters: folded float params plus per-site quantizer state.

    Attributes:
      params: the folded float parameters, same tree structure as the input params.
      weights: weight site name -> per-output-channel quantizer of its ``[K, N]`` matrix.
      activations: activation point name -> quantizer.
      input_offsets: activation point name -> ``(C,)`` added before quantizing
        (RMSNorm folds with an asymmetric quantizer, branch folds).
      output_offsets: weight site name -> array added to the matmul output (folds into
        matmuls without a bias parameter).
      input_scales: activation point name -> ``(C,)`` multiplying the value before
        the offset and the quantizer, for the matmuls only (branch folds of norms
        whose output also feeds a residual).
    """

    params: Any
    weights: dict[str, qz.QuantParams]
    activations: dict[str, qz.QuantParams]
    input_offsets: dict[str, jax.Array]
    output_offsets: dict[str, jax.Array]
    input_scales: dict[str, jax.Array] = struct.field(default_factory=dict)

    if TYPE_CHECKING:  # added by flax.struct.dataclass at runtime

        def replace(self, **changes: Any) -> QParams: ...


@dataclasses.dataclass(frozen=True)
class Traced:
    """The model as traced on the first calibration batch.

    Attributes:
      graph: the inlined jaxpr.
      plan: its sites, from the dataflow analysis.
      param_leaves: the user's parameter leaves (never modified).
      first_chunk: input leaves of each batch of the first calibration chunk (the
        report and reconstruction run on it; the fold check on its first batch).
    """

    graph: Graph
    plan: Plan
    param_leaves: tuple[Any, ...]
    first_chunk: tuple[tuple[Any, ...], ...]

    @property
    def params_treedef(self) -> Any:
        return self.graph.params_treedef


#: What happened to a norm group: folded (docs/method.md, "Folding a norm"), its kernel half folded
#: (branch fold), kept per channel, or quantized per tensor.
FoldForm = Literal["folded", "branch", "per_channel", "per_tensor"]


@dataclasses.dataclass(frozen=True)
class GroupOutcome:
    """The fold stage's outcome for one norm group's activation point."""

    form: FoldForm
    note: str

    @property
    def folded(self) -> bool:
        """True if (some of) the per-channel quantizer was folded into parameters."""
        return self.form in ("folded", "branch")


class ClippingRows(NamedTuple):
    """A norm point's calibration rows for dual clipping.

    Attributes:
      rows: ``[tokens, channels]``, a random sample.
      held_out_excluded: the rows come from training samples only: none from the
        samples the model's check judges on (`block_recon.held_out_samples`).
    """

    rows: np.ndarray
    held_out_excluded: bool


@dataclasses.dataclass(frozen=True)
class QuantState:
    """Everything the stages have decided so far.

    Attributes:
      specs: site name -> resolved settings, final before any evaluation except for
        the held-out per-tensor choice of a norm output, which `calibrate` records.
      leaves: the current parameter leaves (folded by the fold stage).
      weights, activations, input_offsets, output_offsets, input_scales: as in
        `QParams`.
      outcomes: norm group point -> what the fold stage did with it.
      samples: activation point -> (values kept, values seen) during calibration.
      clipping_rows: norm group point -> calibration rows for dual clipping.
      clipping: one line per norm group whose clipping was learned (losses, the model's
        check, kept or not), for the report.
      refit: weight sites whose kernels the folds rescaled (to be re-calibrated).
      reconstruction: one line per block reconstruction unit (losses before/after on
        both splits, kept or not), for the report.
      rounding: weight site -> integer codes of its ``[K, N]`` matrix chosen before
        reconstruction (GPTQ), which AdaRound starts from; sites absent round to
        nearest.
      rounding_notes: weight site -> what the rounding stage did there, for the report.
    """

    specs: Mapping[str, SiteSpec]
    leaves: tuple[Any, ...]
    weights: Mapping[str, qz.QuantParams] = dataclasses.field(default_factory=dict)
    activations: Mapping[str, qz.QuantParams] = dataclasses.field(default_factory=dict)
    input_offsets: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    output_offsets: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    input_scales: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    outcomes: Mapping[str, GroupOutcome] = dataclasses.field(default_factory=dict)
    samples: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    clipping_rows: Mapping[str, ClippingRows] = dataclasses.field(default_factory=dict)
    clipping: tuple[str, ...] = ()
    refit: frozenset[str] = frozenset()
    reconstruction: tuple[str, ...] = ()
    rounding: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    rounding_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> QuantState:
        """The next state."""
        return dataclasses.replace(self, **changes)

    def qparams(self, traced: Traced) -> QParams:
        """The state as `QParams` (leaves in the user's dtypes)."""
        return QParams(
            params=jax.tree_util.tree_unflatten(traced.params_treedef, leaves_like(self.leaves, traced.param_leaves)),
            weights=dict(self.weights),
            activations=dict(self.activations),
            input_offsets=dict(self.input_offsets),
            output_offsets=dict(self.output_offsets),
            input_scales=dict(self.input_scales),
        )
