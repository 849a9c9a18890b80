"""Folding norm groups with a numerical check: the folded float model must compute
the original function, or the fold is undone (docs/method.md, "Every rewrite is
checked numerically")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from repquant_jax._src import quantizers as qz
from repquant_jax._src.checks import dtype_tolerance, relative_output_error
from repquant_jax._src.config import QuantConfig
from repquant_jax._src.fold import FoldResult, fold_norm_into_dense, leaves_written
from repquant_jax._src.graph import Graph
from repquant_jax._src.hooks import quant_hooks
from repquant_jax._src.interpret import evaluate_batches
from repquant_jax._src.param_edits import leaves_like, writable_copies
from repquant_jax._src.sites import FoldGroup, Plan
from repquant_jax._src.state import QParams

__all__ = ["fold_tolerance", "fold_offsets", "fold_checked"]


def fold_tolerance(graph: Graph, config: QuantConfig) -> float:
    """Relative output error a correct fold may cause: float rounding of the model's
    narrowest float type (1e-4 in float32, 4 ulps of bfloat16 or float16)."""
    if config.fold_check_tolerance is not None:
        return config.fold_check_tolerance
    return dtype_tolerance([a.dtype for v, a in graph.avals.items() if v not in graph.consts], 1e-4)


def fold_offsets(folds: Mapping[str, FoldResult]) -> tuple[dict, dict, dict]:
    """``(input_scales, input_offsets, output_offsets)`` of `QParams` from the
    `FoldResult`s of `fold_checked`."""
    input_scales = {k: jnp.asarray(r.input_scale) for k, r in folds.items() if r.input_scale is not None}
    input_offsets = {k: jnp.asarray(r.input_offset) for k, r in folds.items() if r.input_offset is not None}
    output_offsets = {k: jnp.asarray(v) for r in folds.values() for k, v in r.output_offsets.items()}
    return input_scales, input_offsets, output_offsets


def fold_checked(
    graph: Graph,
    plan: Plan,
    param_leaves: Sequence[Any],
    groups: Sequence[FoldGroup],
    act_qps: Mapping[str, qz.QuantParams],
    batch_leaves: Sequence[Any],
    config: QuantConfig,
) -> tuple[list[Any], dict[str, FoldResult], dict[str, float]]:
    """Folds ``groups`` and checks the folded float model (quantizers off, offsets on)
    against the original on one calibration batch.

    When the folded model's output moves by more than `fold_tolerance`, each group is
    tried on its own and the ones that move it are left unfolded: the safety net for
    patterns the dataflow analysis has not seen.

    Returns:
      ``(leaves, folds, failed)``: the folded leaves as JAX arrays in the leaves'
      dtypes (the leaves no fold edits are ``param_leaves``' own), group point ->
      `FoldResult` of the kept folds, group point -> relative error of the failed ones.
    """
    if not groups:
        return list(param_leaves), {}, {}
    reference = evaluate_batches(graph, param_leaves, [batch_leaves])[0]
    tolerance = fold_tolerance(graph, config)

    def fold(chosen):
        written = set().union(*(leaves_written(plan, g, branch=not g.foldable) for g in chosen))
        leaves = writable_copies(param_leaves, written)
        folds = {
            g.point: fold_norm_into_dense(
                leaves, plan, g, act_qps[g.point], exact_zero_point=config.exact_zero_point, branch=not g.foldable
            )
            for g in chosen
        }
        input_scales, input_offsets, output_offsets = fold_offsets(folds)
        folded = leaves_like(leaves, param_leaves)
        del leaves  # the NumPy copies: one copy of the edited leaves less at the evaluation's peak
        qparams = QParams(
            params=jax.tree_util.tree_unflatten(graph.params_treedef, folded),
            weights={},
            activations={},
            input_offsets=input_offsets,
            output_offsets=output_offsets,
            input_scales=input_scales,
        )
        out = evaluate_batches(graph, folded, [batch_leaves], quant_hooks(graph, plan, qparams, quantize=False))[0]
        return folded, folds, relative_output_error(out, reference)

    leaves, folds, error = fold(groups)
    if error <= tolerance:
        return leaves, folds, {}
    kept: list[FoldGroup] = []
    failed: dict[str, float] = {}
    leaves, folds = list(param_leaves), {}  # nothing folded yet
    for group in groups:
        trial_leaves, trial_folds, error = fold(kept + [group])
        if error <= tolerance:
            kept.append(group)
            leaves, folds = trial_leaves, trial_folds
        else:
            failed[group.point] = error
    return leaves, folds, failed
