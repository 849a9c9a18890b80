"""The per-site report of a transform: what was done at each site, and its error."""

from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np

from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import SiteSpec

__all__ = ["SiteReport", "TransformReport"]


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One quantized (or skipped) site.

    Attributes:
      name: site name.
      role: ``"weight"`` or ``"activation/<source>"``.
      bits: bit-width (0 when left in float).
      quantizer: ``"<kind> per_tensor|per_channel"`` or ``"float"``.
      scale_min, scale_max: range of the scales.
      mse: mean squared quantization error on the calibration data (activations).
      relative_mse: ``mse`` over the mean square of the values.
      note: what the fold did, if anything.
      values_kept, values_seen: calibration values the quantizer was fitted to, and all
        values observed over the calibration stream (activations).
      fold: for a norm group's point, what the fold stage did (``"folded"``,
        ``"branch"``, ``"per_channel"``), else None.
    """

    name: str
    role: str
    bits: int
    quantizer: str
    scale_min: float | None
    scale_max: float | None
    mse: float | None
    relative_mse: float | None
    note: str
    values_kept: int | None = None
    values_seen: int | None = None
    fold: str | None = None

    @classmethod
    def make(
        cls,
        name: str,
        role: str,
        spec: SiteSpec,
        qp: qz.QuantParams | None,
        mse: float | None = None,
        rel: float | None = None,
        note: str = "",
        samples: tuple[int, int] | None = None,
        fold: str | None = None,
    ) -> SiteReport:
        """The row of one site from its spec and fitted quantizer (None: float)."""
        kept, seen = samples if samples is not None else (None, None)
        if qp is None:
            note = note or ("skipped by rule" if spec.skip else "")
            return cls(name, role, 0, "float", None, None, None, None, note, kept, seen, fold)
        scale = np.asarray(qp.scale)
        granularity = "per_tensor" if qp.axis is None else "per_channel"
        return cls(
            name,
            role,
            qp.bits,
            f"{qp.kind} {granularity}",
            float(scale.min()),
            float(scale.max()),
            mse,
            rel,
            note,
            kept,
            seen,
            fold,
        )


@dataclasses.dataclass(frozen=True)
class TransformReport:
    """All sites of one transform. ``str(report)`` is a table.

    Attributes:
      sites: one row per site.
      notes: what the stages decided beyond the sites' rows (folds undone, blocks not kept).
      stage_seconds: ``(stage, wall seconds)`` in pipeline order, as `transform` ran them.
    """

    sites: tuple[SiteReport, ...]
    notes: tuple[str, ...] = ()
    stage_seconds: tuple[tuple[str, float], ...] = ()

    def site(self, name: str) -> SiteReport:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def summary(self) -> str:
        """A few lines: counts and the worst activation sites."""
        acts = [s for s in self.sites if s.relative_mse is not None]
        worst = sorted(acts, key=lambda s: -cast(float, s.relative_mse))[:3]
        lines = [
            f"{sum(s.bits > 0 for s in self.sites)} of {len(self.sites)} sites quantized; "
            f"{sum(s.fold in ('folded', 'branch') for s in self.sites)} norm groups folded",
        ]
        lines += [
            f"  highest relative MSE: {s.name} {s.relative_mse:.3g} ({s.quantizer}, {s.bits} bits)" for s in worst
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [("site", "role", "bits", "quantizer", "scale range", "rel. MSE", "note")]
        for s in self.sites:
            scale = "" if s.scale_min is None else f"{s.scale_min:.3g}..{s.scale_max:.3g}"
            rel = "" if s.relative_mse is None else f"{s.relative_mse:.3g}"
            rows.append((s.name, s.role, str(s.bits), s.quantizer, scale, rel, s.note))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(6)) + "  " + r[6] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])
