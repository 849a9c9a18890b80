"""The stages of `transform`, each ``(traced, state, ...) -> state``.

::

    trace → specs → calibrate (forward order, upstream quantizers active)
          → learn dual clipping (repquant) → fold norms → re-calibrate folded weights
          → round weights (nearest or GPTQ) → reconstruct weight rounding (repquant)
          → report

Each stage reads what it needs from the frozen `QuantState` and returns the next one,
so each can be run and tested on its own.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src import quantizers as qz
from repquant_jax._src.adapters import check_reads_params
from repquant_jax._src.block_recon import ModelCheck, held_out_samples, reconstruct_blocks, stacked_inputs
from repquant_jax._src.config import QuantConfig, SiteSpec
from repquant_jax._src.fit import (
    Reservoir,
    calibrate_values,
    calibrate_weight,
    subsample,
)
from repquant_jax._src.fold import weight_matrix
from repquant_jax._src.fold_check import fold_checked, fold_offsets
from repquant_jax._src.gptq import dequantized_view, gptq_round
from repquant_jax._src.graph import trace
from repquant_jax._src.hooks import affine_input, fake_quant_weight, quant_hooks, weight_operand_hook
from repquant_jax._src.interpret import BatchEvaluation, Hook, Hooks, evaluate_batches, shared_values
from repquant_jax._src.learn import always_compiled, learn_dual_clipping, reconstruct_weights
from repquant_jax._src.param_edits import params_with_weights, weight_view
from repquant_jax._src.report import SiteReport, TransformReport
from repquant_jax._src.sites import WeightSite, analyze
from repquant_jax._src.specs import calibration_rows, chosen_granularities, resolve_specs
from repquant_jax._src.state import ClippingRows, GroupOutcome, QParams, QuantState, Traced

__all__ = [
    "trace_model",
    "initial_state",
    "calibrate",
    "learn_clipping",
    "fold_norms",
    "refit_folded_weights",
    "round_weights",
    "reconstruct",
    "report",
]

Progress = Callable[..., None]


def trace_model(apply_fn: Callable[..., Any], params: Any, first_chunk: Sequence[tuple[Any, ...]]) -> Traced:
    """Traces ``apply_fn`` on the first calibration batch and analyzes its sites.

    Raises:
      ValueError: if ``apply_fn`` does not read the weights in ``params`` (closed over).
    """
    graph = trace(apply_fn, params, *first_chunk[0])
    check_reads_params(graph)
    return Traced(
        graph=graph,
        plan=analyze(graph),
        param_leaves=tuple(jax.tree_util.tree_leaves(params)),
        first_chunk=tuple(tuple(jax.tree_util.tree_leaves(b)) for b in first_chunk),
    )


def initial_state(traced: Traced, config: QuantConfig) -> QuantState:
    """Final per-site specs (rows per channel counted on the first chunk) and the
    user's parameter leaves."""
    rows = calibration_rows(traced.graph, traced.plan, len(traced.first_chunk))
    return QuantState(specs=resolve_specs(traced.plan, config, rows=rows), leaves=traced.param_leaves)


class _Calibrator:
    """Calibration hooks: each site fits its quantizer when the forward reaches it, and
    each activation point keeps a bounded sample of its values across chunks."""

    def __init__(self, traced: Traced, specs: dict[str, SiteSpec], config: QuantConfig, rng: np.random.Generator):
        self.specs, self.config = specs, config
        self.weights: dict[str, qz.QuantParams] = {}
        self.activations: dict[str, qz.QuantParams] = {}
        self.reservoirs = {p.name: Reservoir(config.max_calibration_values, rng) for p in traced.plan.points}
        #: whether the chunk being evaluated is the last: earlier fits only feed the
        #: downstream sites of their chunk, so they read a power-of-two bucket of the
        #: sample (`Reservoir.bucket`) and the fitting kernels compile a few times
        self.last_chunk = True
        active = [w for w in traced.plan.weights if not specs[w.name].skip]
        self.hooks = Hooks(
            values={p.value_id: self._point_hook(p.name) for p in traced.plan.points if not specs[p.name].skip},
            operands={w.node: weight_operand_hook(w, self._weight_fn(w)) for w in active},
        )

    def _weight_fn(self, w: WeightSite) -> Callable[[Any], Any]:
        def quantize(view):
            if w.name not in self.weights:
                self.weights[w.name] = calibrate_weight(
                    weight_matrix(view, w.contracting), self.specs[w.name], self.config
                )
            return fake_quant_weight(view, self.weights[w.name], w.contracting)

        return quantize

    def _point_hook(self, name: str) -> Hook:
        spec = self.specs[name]
        axis = -1 if spec.granularity == "per_channel" else None

        def hook(values):
            reservoir = self.reservoirs[name]
            reservoir.add(values)
            data, samples = (reservoir.data, reservoir.samples) if self.last_chunk else reservoir.bucket()
            try:
                qp = calibrate_values(data, spec, self.config, axis, samples)
            except ValueError as err:
                raise ValueError(f"calibrating {name!r}: {err}") from None
            self.activations[name] = qp
            return [qz.fake_quant(v, qp).astype(v.dtype) for v in values]

        return hook


def calibrate(
    traced: Traced,
    state: QuantState,
    chunks: Iterable[Sequence[tuple[Any, ...]]],
    config: QuantConfig,
    progress: Progress,
    total: int | None = None,
) -> QuantState:
    """Fits every site's quantizer in forward order, every upstream quantizer active.

    Batches are evaluated side by side a chunk at a time; each activation point keeps a
    bounded sample of its values across chunks and is re-fitted to it after each chunk.
    The chunks go through the whole model one after the other, or all through one block
    before the next (``config.calibration_order``). Also samples the calibration rows of
    the per-channel norm points for dual clipping.
    ``total`` (the number of batches, when known) is for the progress bar only.
    """
    rng = np.random.default_rng(config.seed)
    calibrator = _Calibrator(traced, dict(state.specs), config, rng)
    order, chunks = _calibration_order(config, chunks)
    if order == "chunks":
        seen = 0
        for chunk, last in _with_last(chunks):
            calibrator.last_chunk = last
            seen += len(chunk)
            evaluate_batches(
                traced.graph, state.leaves, [jax.tree_util.tree_leaves(b) for b in chunk], calibrator.hooks
            )
            progress(
                f"calibrated {len(calibrator.activations)} activation and {len(calibrator.weights)} weight "
                f"quantizers on {seen} batches",
                seen,
                total,
            )
    else:
        _calibrate_block_by_block(traced, state, list(chunks), calibrator, config, progress)
    specs = chosen_granularities(state.specs, calibrator.activations)
    clipping_rows = {}
    clipping = config.dual_clipping
    if clipping is not None:
        held = None
        if clipping.accept == "model":
            held = held_out_samples(traced.graph, traced.plan, len(traced.first_chunk), clipping.held_out, config.seed)
        points = {p.name: p for p in traced.plan.points}
        for group in traced.plan.groups:
            qp = calibrator.activations.get(group.point)
            if qp is not None and qp.axis is not None and group.consumers:
                shape = traced.graph.avals[points[group.point].value_id].shape
                per_batch = shape[0] if len(shape) >= 2 else 1  # as `fit.point_samples` numbers them
                rows, excluded = _training_rows(calibrator.reservoirs[group.point], held, per_batch)
                clipping_rows[group.point] = ClippingRows(subsample(rows, clipping.max_rows, rng), excluded)
    return state.replace(
        specs=specs,
        weights=calibrator.weights,
        activations=calibrator.activations,
        samples={n: (r.kept, r.seen) for n, r in calibrator.reservoirs.items() if r.kept is not None},
        clipping_rows=clipping_rows,
    )


def _calibration_order(
    config: QuantConfig, chunks: Iterable[Sequence[tuple[Any, ...]]]
) -> tuple[str, Iterable[Sequence[tuple[Any, ...]]]]:
    """``config.calibration_order`` with ``"auto"`` decided (``"blocks"`` for a single
    chunk), and the chunks, none of them lost to the look-ahead."""
    if config.calibration_order != "auto":
        return config.calibration_order, chunks
    iterator = iter(chunks)
    ahead = list(itertools.islice(iterator, 2))
    return ("blocks" if len(ahead) < 2 else "chunks"), itertools.chain(ahead, iterator)


def _with_last(items: Iterable[Any]) -> Iterable[tuple[Any, bool]]:
    """``(item, whether it is the last)`` for each item, one item read ahead."""
    iterator = iter(items)
    ahead = next(iterator, _END)
    while ahead is not _END:
        item, ahead = ahead, next(iterator, _END)
        yield item, ahead is _END


_END = object()


def _calibrate_block_by_block(
    traced: Traced,
    state: QuantState,
    chunks: list[Sequence[tuple[Any, ...]]],
    calibrator: _Calibrator,
    config: QuantConfig,
    progress: Progress,
) -> None:
    """Runs every chunk through one block before the next, each chunk's evaluation
    paused at the block's end, and drops the samples of the sites the block fitted
    for good (dual clipping's norm points keep theirs: it learns from them)."""
    graph = traced.graph
    evaluations = [
        BatchEvaluation(graph, state.leaves, [jax.tree_util.tree_leaves(b) for b in chunk], calibrator.hooks)
        for chunk in chunks
    ]
    stops = sorted({u.stop for u in traced.plan.blocks} | {len(graph.nodes)})
    producers = graph.producers()
    keep = {g.point for g in traced.plan.groups} if config.dual_clipping is not None else set()
    pending = [p for p in traced.plan.points if p.name not in keep]
    batches = sum(len(c) for c in chunks)
    for k, stop in enumerate(stops):
        for i, evaluation in enumerate(evaluations):
            calibrator.last_chunk = i == len(evaluations) - 1
            evaluation.run_to(stop)
        for point in [p for p in pending if producers.get(p.value_id, -1) < stop]:
            calibrator.reservoirs[point.name].release()
            pending.remove(point)
        progress(
            f"calibrated block {k + 1} of {len(stops)}: {len(calibrator.activations)} activation and "
            f"{len(calibrator.weights)} weight quantizers on {batches} batches",
            k + 1,
            len(stops),
        )


def _training_rows(reservoir: Reservoir, held: np.ndarray | None, samples_per_batch: int) -> tuple[np.ndarray, bool]:
    """The reservoir's rows from samples the model's check does not judge on, and
    whether they could be told apart: the point's batches must lead with the model
    outputs' samples (``held`` is ``[batches, samples]`` of the first chunk, whose
    samples the reservoir numbers from 0; later chunks are all training samples)."""
    data, ids = reservoir.data, reservoir.samples
    assert data is not None and ids is not None  # the point was calibrated
    if held is None or samples_per_batch != held.shape[1]:
        return data, False
    flat = held.reshape(-1)
    judged = (ids >= 0) & (ids < flat.size) & flat[np.clip(ids, 0, flat.size - 1)]
    return data[~judged], True


@always_compiled
def learn_clipping(traced: Traced, state: QuantState, config: QuantConfig, progress: Progress) -> QuantState:
    """Learns the per-channel clipping bounds of each norm quantizer (RepQuant), from
    the calibration rows, to match the following matmuls' outputs; with
    ``accept="model"`` each group keeps them only if the quantized model's output error
    on the held-out calibration samples falls too."""
    clipping = config.dual_clipping
    if clipping is None or not state.clipping_rows:
        return state
    check = None
    if clipping.accept == "model" and any(c.held_out_excluded for c in state.clipping_rows.values()):
        graph, qparams = traced.graph, state.qparams(traced)
        shared = shared_values(graph, list(jax.tree_util.tree_leaves(qparams.params)))
        env = stacked_inputs(graph, traced.first_chunk)
        check = ModelCheck.build(graph, traced.plan, qparams, shared, env, clipping.held_out, config.seed)
    groups = {g.point: g for g in traced.plan.groups}
    activations = dict(state.activations)
    notes = []
    for i, (point, (rows, excluded)) in enumerate(state.clipping_rows.items()):
        group = groups[point]
        consumers = [(traced.plan.weight(c.site), c) for c in group.consumers]
        if not all(w.name in state.weights for w, _ in consumers):
            continue
        # rows of each weight matrix in channel order
        matrices = [
            weight_matrix(jnp.asarray(weight_view(state.leaves, w)), w.contracting)[np.argsort(c.contract_channel)]
            for w, c in consumers
        ]
        wqps = [state.weights[w.name] for w, _ in consumers]
        learned, before, after = learn_dual_clipping(rows, activations[point], matrices, wqps, clipping)
        note = f"{group.name}: output MSE {before:.3g} -> {after:.3g}"
        if learned is activations[point]:
            note += "; not kept (its output error did not fall)"
        elif check is not None and excluded:
            candidate = check.with_activation(point, learned)
            note += f", model {check.judged_error:.3g} -> {candidate.judged_error:.3g}"
            if candidate.judged_error < check.judged_error:
                check, activations[point] = candidate, learned
                note += "; kept"
            else:
                note += "; not kept (the model's held-out output error did not fall)"
        else:
            activations[point] = learned
            note += "; kept" if check is None else "; kept (not checked on the model: its samples are not the model's)"
        notes.append(note)
        progress(f"dual clipping {note}", i + 1, len(state.clipping_rows))
    return state.replace(activations=activations, clipping=tuple(notes))


def fold_norms(traced: Traced, state: QuantState, config: QuantConfig, progress: Progress) -> QuantState:
    """Folds each per-channel norm quantizer into per-tensor form (the whole group, or
    the kernel half for a branch fold), each fold checked numerically on a calibration
    batch and undone if it moves the float model's output."""
    plan, outcomes = traced.plan, {}
    to_fold = []
    for group in plan.groups:
        spec = state.specs.get(group.point)
        if spec is None or spec.skip or spec.granularity != "per_channel":
            continue
        branch = not group.foldable and group.branch_foldable and config.unfoldable == "branch"
        if not (group.foldable or branch) or not config.fold_norms:
            reason = "fold_norms=False" if not config.fold_norms else group.reason
            outcomes[group.point] = GroupOutcome("per_channel", f"kept per channel: {reason}")
            continue
        to_fold.append(group)
    leaves, folds, failed = fold_checked(
        traced.graph, plan, state.leaves, to_fold, state.activations, traced.first_chunk[0], config
    )
    input_scales, input_offsets, output_offsets = fold_offsets(folds)
    activations = dict(state.activations)
    refit: set[str] = set()
    for group in to_fold:
        if group.point in failed:
            outcomes[group.point] = GroupOutcome(
                "per_channel",
                f"kept per channel: the fold failed its numerical check (relative output error "
                f"{failed[group.point]:.3g} of the folded float model)",
            )
            warnings.warn(
                f"the fold of norm group {group.name!r} changed the float model's output "
                f"(relative error {failed[group.point]:.3g}); it was undone and the group is "
                "quantized per channel. Please report this model pattern.",
                stacklevel=3,
            )
            continue
        result = folds[group.point]
        activations[group.point] = result.quantizer
        refit.update(c.site for c in group.consumers)
        if group.foldable:
            outcomes[group.point] = GroupOutcome(
                "folded", f"folded {group.name} into {len(group.consumers)} matmuls (max |r2| {result.max_abs_r2:g})"
            )
        else:
            outcomes[group.point] = GroupOutcome(
                "branch",
                f"folded {group.name}'s kernel half (branch fold) into {len(group.consumers)} matmuls, "
                f"max |r2| {result.max_abs_r2:g}; the norm stays: {group.reason}",
            )
    if outcomes:
        progress(f"folded {sum(o.folded for o in outcomes.values())} norm groups")
    return state.replace(
        leaves=tuple(leaves),
        activations=activations,
        input_scales=input_scales,
        input_offsets=input_offsets,
        output_offsets=output_offsets,
        outcomes=outcomes,
        refit=frozenset(refit),
    )


def refit_folded_weights(traced: Traced, state: QuantState, config: QuantConfig) -> QuantState:
    """Re-calibrates the weight quantizers of the kernels the folds rescaled."""
    weights = dict(state.weights)
    for w in traced.plan.weights:
        if w.name in state.refit and w.name in weights:
            matrix = weight_matrix(weight_view(state.leaves, w), w.contracting)
            weights[w.name] = calibrate_weight(matrix, state.specs[w.name], config)
    return state.replace(weights=weights)


def round_weights(traced: Traced, state: QuantState, config: QuantConfig, progress: Progress) -> QuantState:
    """Chooses the weights' integer codes in closed form (``weight_rounding="gptq"``),
    in forward order on the quantized model's inputs, the scales unchanged.

    The codes go to ``state.rounding`` (the leaves stay float: reconstruction's targets
    and AdaRound's start need the float weights); `reconstruct` stores them.
    """
    if config.weight_rounding != "gptq" or state.rounding_notes:  # not chosen, or done already
        return state
    results = gptq_round(
        traced.graph, traced.plan, state.qparams(traced), traced.first_chunk, config.gptq, config.seed, progress
    )
    return state.replace(
        rounding={name: r.codes for name, r in results.items() if r.codes is not None},
        rounding_notes={name: r.note for name, r in results.items()},
    )


def _with_rounding(traced: Traced, state: QuantState) -> QuantState:
    """``state`` with the codes of ``state.rounding`` stored in its leaves (dequantized:
    each weight on its grid, so fake quantization keeps it)."""
    if not state.rounding:
        return state
    qparams = state.qparams(traced)
    views = [
        (w, dequantized_view(w, state.rounding[w.name], state.weights[w.name]))
        for w in traced.plan.weights
        if w.name in state.rounding
    ]
    return state.replace(leaves=tuple(jax.tree_util.tree_leaves(params_with_weights(qparams.params, views))))


def reconstruct(traced: Traced, state: QuantState, config: QuantConfig, progress: Progress) -> QuantState:
    """Chooses the weights' rounding: GPTQ's closed form first (`round_weights`, with
    ``weight_rounding="gptq"``), then, with ``config.reconstruction``, learned rounding
    (RepQuant) starting from it: per weight matmul in forward order, or per block
    jointly with the block's activation scales."""
    state = round_weights(traced, state, config, progress)
    rc = config.reconstruction
    if rc is None:
        return _with_rounding(traced, state)
    if rc.granularity == "layer":
        qparams = reconstruct_weights(
            traced.graph, traced.plan, state.qparams(traced), traced.first_chunk, config, progress, state.rounding
        )
        return state.replace(leaves=tuple(jax.tree_util.tree_leaves(qparams.params)))
    qparams, results = reconstruct_blocks(
        traced.graph, traced.plan, state.qparams(traced), traced.first_chunk, rc, config.seed, progress, state.rounding
    )
    return state.replace(
        leaves=tuple(jax.tree_util.tree_leaves(qparams.params)),
        activations=qparams.activations,
        reconstruction=tuple(str(r) for r in results),
    )


def _measured(hooks: Hooks, state: QuantState, names: dict[Any, str], errors: dict[str, tuple[float, float]]) -> Hooks:
    """``hooks`` with each quantized point also recording its quantization error (of
    the quantizer alone: against its input after the fold's scale and offset)."""

    def measuring(vid, hook):
        def run(values):
            out = hook(values)
            if vid in names:
                name = names[vid]
                values = [affine_input(v, state.input_scales.get(name), state.input_offsets.get(name)) for v in values]
                sq = sum(float(jnp.sum((o - v) ** 2)) for o, v in zip(out, values))
                ref = sum(float(jnp.sum(v**2)) for v in values)
                count = sum(int(np.size(v)) for v in values)
                errors[name] = (sq / count, sq / max(ref, 1e-30))
            return out

        return run

    return hooks.replace(values={vid: measuring(vid, h) for vid, h in hooks.values.items()})


def report(traced: Traced, state: QuantState, config: QuantConfig, qparams: QParams | None = None) -> TransformReport:
    """Every site's settings, what the fold did, and the quantization error of each
    activation point on the first calibration chunk (``qparams``: ``state.qparams(traced)``,
    when the caller has it: one copy of the params fewer)."""
    graph, plan = traced.graph, traced.plan
    qparams = qparams if qparams is not None else state.qparams(traced)
    errors: dict[str, tuple[float, float]] = {}
    names = {p.value_id: p.name for p in plan.points if p.name in qparams.activations}
    hooks = _measured(quant_hooks(graph, plan, qparams), state, names, errors)
    evaluate_batches(graph, jax.tree_util.tree_leaves(qparams.params), traced.first_chunk, hooks)
    rows = [
        SiteReport.make(
            w.name,
            "weight",
            state.specs[w.name],
            qparams.weights.get(w.name),
            note=state.rounding_notes.get(w.name, ""),
        )
        for w in plan.weights
    ]
    for p in plan.points:
        spec, outcome = state.specs[p.name], state.outcomes.get(p.name)
        mse, rel = errors.get(p.name, (None, None))
        rows.append(
            SiteReport.make(
                p.name,
                f"activation/{p.source}",
                spec,
                qparams.activations.get(p.name),
                mse,
                rel,
                outcome.note if outcome is not None else spec.note,
                state.samples.get(p.name),
                fold=outcome.form if outcome is not None else None,
            )
        )
    used_rules = {s.rule for s in state.specs.values() if s.rule is not None}
    notes = plan.notes + tuple(
        f"rule {r.pattern!r} matched no site" for i, r in enumerate(config.rules) if i not in used_rules
    )
    notes += tuple(f"dual clipping {line}" for line in state.clipping)
    notes += tuple(f"reconstruction {line}" for line in state.reconstruction)
    return TransformReport(tuple(rows), notes)
