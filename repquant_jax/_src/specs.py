"""Per-site settings: the config and its rules resolved for every site of a plan.

Specs are resolved before any evaluation: a per-channel norm point with too few
calibration rows is made per tensor here, from the traced shapes, not mid-forward. The
one change calibration may make is the held-out choice of per tensor for a per-channel
norm point (``QuantConfig.range_selection``), recorded by `chosen_granularities` right
after calibration, before any stage that reads the granularity (dual clipping, the fold).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import numpy as np

from repquant_jax._src.config import QuantConfig, SiteSpec
from repquant_jax._src.graph import Graph
from repquant_jax._src.quantizers import QuantParams, default_log_root
from repquant_jax._src.sites import Plan
from repquant_jax._src.types import LOG_KINDS, Granularity, QuantizerKind

__all__ = ["resolve_specs", "calibration_rows", "chosen_granularities"]


def calibration_rows(graph: Graph, plan: Plan, batches: int) -> dict[str, int]:
    """Point name -> rows per channel that ``batches`` calibration batches give it."""
    rows = {}
    for p in plan.points:
        shape = graph.avals[p.value_id].shape
        rows[p.name] = batches * int(np.prod(shape[:-1])) if shape else batches
    return rows


def _apply_rules(spec: SiteSpec, config: QuantConfig, used: set[int]) -> SiteSpec:
    """``spec`` with the first matching rule applied (its index added to ``used``)."""
    for i, rule in enumerate(config.rules):
        if not rule.matches(spec.name, spec.target):
            continue
        used.add(i)
        if spec.target == "weight" and rule.kind in LOG_KINDS:
            raise ValueError(
                f"rule {rule.pattern!r} asks for a {rule.kind} quantizer on weight site "
                f"{spec.name!r}: log quantizers are for softmax outputs in [0, 1]; give the "
                "rule target='activation'"
            )
        return dataclasses.replace(
            spec,
            bits=rule.bits if rule.bits is not None else spec.bits,
            kind=rule.kind if rule.kind is not None else spec.kind,
            granularity="per_tensor" if rule.kind in LOG_KINDS else spec.granularity,
            skip=rule.skip,
            rule=i,
        )
    return spec


#: The kinds that name a log quantizer's root (the same levels as "log_root" with it).
_ROOT_KINDS: dict[int, QuantizerKind] = {1: "log2", 2: "log_sqrt2"}


def _resolve_log_root(spec: SiteSpec, config: QuantConfig) -> SiteSpec:
    """A ``"log_root"`` spec with its root: ``config.softmax_log_root``, else from the bits.

    Roots 1 and 2 become the kinds ``"log2"`` and ``"log_sqrt2"`` (the same levels, bit for
    bit), so that one quantizer has one name in reports and saved files.
    """
    root = config.softmax_log_root if config.softmax_log_root is not None else default_log_root(spec.bits)
    kind = _ROOT_KINDS.get(root, "log_root")
    return dataclasses.replace(spec, kind=kind, log_root=root if kind == "log_root" else None)


def resolve_specs(
    plan: Plan,
    config: QuantConfig,
    *,
    rows: dict[str, int] | None = None,
    warn_unused: bool = True,
) -> dict[str, SiteSpec]:
    """Per-site settings from the config and its rules (first matching rule wins).

    Args:
      plan: from the analysis.
      config: the quantization config.
      rows: point name -> calibration rows per channel (`calibration_rows`); a
        per-channel point with fewer than ``config.min_rows_per_channel`` is made per
        tensor, with a note. None: no such check.
      warn_unused: warn about rules that match no site.

    Raises:
      ValueError: if a norm group cannot be folded and ``config.unfoldable == "error"``,
        or a rule asks for a log quantizer on a weight.
    """
    groups = {g.name: g for g in plan.groups}
    specs: dict[str, SiteSpec] = {}
    used: set[int] = set()
    for w in plan.weights:
        spec = SiteSpec(
            w.name, "weight", config.w_bits, "uniform", config.weight_granularity, config.weight_calibration
        )
        specs[w.name] = _apply_rules(spec, config, used)
    for p in plan.points:
        kind: QuantizerKind = "uniform"
        granularity: Granularity = "per_tensor"
        bits, note, fixed = config.a_bits, "", False
        if p.source == "softmax":
            kind = config.softmax_quantizer
        elif p.source == "input":
            bits = config.input_bits
        elif p.fold_group is not None and config.norm_quantizer == "per_channel":
            group = groups[p.fold_group]
            granularity = "per_channel"
            if group.kind == "rmsnorm" and config.rmsnorm == "symmetric":
                kind = "symmetric"
            # Only whole folds may become per tensor by the held-out choice; a branch
            # fold or an asked-for per-channel quantizer keeps its granularity.
            fixed = not group.foldable
            if not group.foldable and not (config.unfoldable == "branch" and group.branch_foldable):
                if config.unfoldable == "error":
                    raise ValueError(
                        f"norm group {group.name!r} cannot be folded ({group.reason}); "
                        "set unfoldable='branch', 'per_tensor' or 'per_channel' to quantize it anyway"
                    )
                # "branch" without a legal kernel half falls back to one scale
                if config.unfoldable != "per_channel":
                    granularity, note = "per_tensor", f"per tensor (not foldable: {group.reason})"
        spec = _apply_rules(
            SiteSpec(
                p.name,
                "activation",
                bits,
                kind,
                granularity,
                config.activation_calibration,
                note=note,
                fixed_granularity=fixed,
            ),
            config,
            used,
        )
        if spec.kind == "log_root":  # after the rules, so that a rule's bits choose the root
            spec = _resolve_log_root(spec, config)
        n_rows = None if rows is None else rows[p.name]
        few_rows = n_rows is not None and n_rows < config.min_rows_per_channel
        if spec.granularity == "per_channel" and not spec.skip and few_rows:
            # Per-channel ranges from so few rows overfit the calibration set.
            spec = dataclasses.replace(
                spec,
                granularity="per_tensor",
                note=f"per tensor: {n_rows} calibration rows per channel < min_rows_per_channel "
                f"({config.min_rows_per_channel})",
            )
        specs[p.name] = spec
    unused = [r.pattern for i, r in enumerate(config.rules) if i not in used]
    if unused and warn_unused:
        warnings.warn(f"quantization rules matched no site: {unused}", stacklevel=3)
    return specs


def chosen_granularities(specs: Mapping[str, SiteSpec], activations: Mapping[str, QuantParams]) -> dict[str, SiteSpec]:
    """``specs`` with every per-channel activation whose calibrated quantizer came back
    per tensor (the held-out choice, `repquant_jax._src.fit.calibrate_values`) made per
    tensor, with a note.

    A norm output quantized per tensor needs no fold: the fold stage skips it, as it
    skips the points `resolve_specs` demotes for too few rows, so the norm keeps its γ, β
    and the matmuls after it their kernels.
    """
    out = dict(specs)
    for name, qp in activations.items():
        spec = specs.get(name)
        if spec is not None and spec.granularity == "per_channel" and qp.axis is None:
            out[name] = dataclasses.replace(
                spec,
                granularity="per_tensor",
                note="per tensor: lower error than per channel on held-out calibration samples",
            )
    return out
