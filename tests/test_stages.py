"""Each stage of the pipeline on its own: ``(traced, state, ...) -> state``, inputs
never mutated, and the stages composed as `transform` composes them give its result."""

from __future__ import annotations

import dataclasses

import chex
import conftest
import jax
import numpy as np
import pytest
import zoo

import repquant_jax as repquant
from repquant_jax._src import quantizers as qz
from repquant_jax._src import stages
from repquant_jax._src.block_recon import ModelCheck, stacked_inputs
from repquant_jax._src.fold import weight_matrix
from repquant_jax._src.interpret import Hooks, evaluate_batches, shared_values
from repquant_jax._src.specs import calibration_rows, resolve_specs
from repquant_jax._src.state import QuantState

P = conftest.zoo_presets


def _quiet(*_args, **_kwargs):
    pass


def _chunk(model, n=2):
    return [tuple(a * (1.0 + 0.1 * i) for a in model.inputs) for i in range(n)]


@pytest.fixture(scope="module")
def vit():
    m = zoo.linen_vit_block(batch=4, seq=8)
    chunk = _chunk(m)
    return m, chunk, stages.trace_model(m.apply_fn, m.params, chunk)


def _calibrated(vit, config):
    m, chunk, traced = vit
    state = stages.initial_state(traced, config)
    return traced, stages.calibrate(traced, state, [chunk], config, _quiet)


def test_trace_model_keeps_the_users_leaves_and_the_first_chunk(vit):
    m, chunk, traced = vit
    assert len(traced.first_chunk) == len(chunk)
    for got, want in zip(traced.param_leaves, jax.tree_util.tree_leaves(m.params)):
        assert got is want
    assert len(traced.plan.weights) == m.expected["weight_matmuls"]


def test_trace_model_refuses_closed_over_weights(vit):
    m, chunk, _ = vit
    with pytest.raises(ValueError, match="ignores its params"):
        stages.trace_model(lambda p, *x: m.apply_fn(m.params, *x), m.params, chunk)


def test_initial_state_has_final_specs_for_every_site(vit):
    _, _, traced = vit
    state = stages.initial_state(traced, P.repq_vit(4, 4))
    names = {w.name for w in traced.plan.weights} | {p.name for p in traced.plan.points}
    assert set(state.specs) == names
    assert not state.weights and not state.activations


def test_few_rows_make_a_per_channel_point_per_tensor_before_evaluation(vit):
    _, _, traced = vit
    config = dataclasses.replace(P.repq_vit(4, 4), min_rows_per_channel=10**6)
    specs = resolve_specs(traced.plan, config, rows=calibration_rows(traced.graph, traced.plan, 2))
    group_points = {g.point for g in traced.plan.groups}
    assert group_points and all(specs[p].granularity == "per_tensor" for p in group_points)
    assert all("min_rows_per_channel" in specs[p].note for p in group_points)


def test_calibrate_fits_every_site_and_does_not_change_its_input(vit):
    _, _, traced = vit
    config = P.repq_vit(4, 4)
    state = stages.initial_state(traced, config)
    after = stages.calibrate(traced, state, [_chunk(vit[0])], config, _quiet)
    assert not state.weights and not state.activations  # the input state is untouched
    assert set(after.weights) == {w.name for w in traced.plan.weights}
    assert set(after.activations) == {p.name for p in traced.plan.points}
    assert all(seen >= kept > 0 for kept, seen in after.samples.values())


def test_learn_clipping_is_a_no_op_without_dual_clipping(vit):
    traced, state = _calibrated(vit, P.repq_vit(4, 4))
    assert stages.learn_clipping(traced, state, P.repq_vit(4, 4), _quiet) is state


def test_learn_clipping_changes_only_norm_quantizers(vit):
    config = P.repquant(4, 4)
    traced, state = _calibrated(vit, config)
    after = stages.learn_clipping(traced, state, config, _quiet)
    assert state.clipping_rows
    changed = {n for n in state.activations if after.activations[n] is not state.activations[n]}
    assert changed <= set(state.clipping_rows)
    assert after.weights == state.weights


def test_dual_clipping_learns_on_training_samples_and_keeps_what_lowers_the_models_held_out_error(vit):
    config = P.repquant(4, 4)  # accept="model"
    traced, state = _calibrated(vit, config)
    # 2 batches of 4 samples of 8 tokens; a quarter of the samples is held out
    assert all(c.held_out_excluded and c.rows.shape[0] == 6 * 8 for c in state.clipping_rows.values())
    after = stages.learn_clipping(traced, state, config, _quiet)
    assert len(after.clipping) == len(state.clipping_rows)
    qparams = state.qparams(traced)
    shared = shared_values(traced.graph, jax.tree_util.tree_leaves(qparams.params))
    env = stacked_inputs(traced.graph, traced.first_chunk)
    check = ModelCheck.build(
        traced.graph, traced.plan, qparams, shared, env, config.dual_clipping.held_out, config.seed
    )
    for point, line in zip(state.clipping_rows, after.clipping):
        if after.activations[point] is state.activations[point]:
            assert "not kept" in line
            continue
        assert line.endswith("; kept")
        candidate = check.with_activation(point, after.activations[point])
        assert candidate.judged_error < check.judged_error  # replayed in forward order
        check = candidate


def test_dual_clipping_judged_by_its_own_error_learns_on_every_sample(vit):
    config = P.repquant(4, 4, dual_clipping=repquant.DualClipping(accept="unit"))
    traced, state = _calibrated(vit, config)
    assert all(not c.held_out_excluded and c.rows.shape[0] == 8 * 8 for c in state.clipping_rows.values())
    after = stages.learn_clipping(traced, state, config, _quiet)
    assert all("model" not in line for line in after.clipping)


def test_fold_norms_keeps_the_float_function(vit):
    config = P.repq_vit(4, 4)
    traced, state = _calibrated(vit, config)
    folded = stages.fold_norms(traced, state, config, _quiet)
    assert folded.outcomes and all(o.folded for o in folded.outcomes.values())
    assert folded.refit
    for name in folded.outcomes:  # per channel before, per tensor after
        assert state.activations[name].axis is not None and folded.activations[name].axis is None
    # the folded params with offsets (quantizers off) compute the original function
    float_only = dataclasses.replace(folded, weights={}, activations={})
    hooks = repquant._src.hooks.quant_hooks(traced.graph, traced.plan, float_only.qparams(traced), quantize=False)
    want = evaluate_batches(traced.graph, traced.param_leaves, traced.first_chunk, Hooks())
    got = evaluate_batches(traced.graph, list(folded.leaves), traced.first_chunk, hooks)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # the user's leaves are untouched
    for a, b in zip(traced.param_leaves, jax.tree_util.tree_leaves(vit[0].params)):
        np.testing.assert_array_equal(a, b)


def test_refit_recalibrates_exactly_the_rescaled_kernels(vit):
    config = P.repq_vit(4, 4)
    traced, state = _calibrated(vit, config)
    folded = stages.fold_norms(traced, state, config, _quiet)
    refit = stages.refit_folded_weights(traced, folded, config)
    changed = {n for n in folded.weights if refit.weights[n] is not folded.weights[n]}
    assert changed == set(folded.refit)


def test_reconstruct_is_a_no_op_without_reconstruction(vit):
    traced, state = _calibrated(vit, P.repq_vit(4, 4))
    assert stages.reconstruct(traced, state, P.repq_vit(4, 4), _quiet) is state


def test_round_weights_keeps_the_leaves_float_and_reconstruct_stores_the_codes(vit):
    config = P.repq_vit(4, 4, weight_rounding="gptq")
    traced, state = _calibrated(vit, config)
    state = stages.refit_folded_weights(traced, stages.fold_norms(traced, state, config, _quiet), config)
    rounded = stages.round_weights(traced, state, config, _quiet)
    assert rounded.leaves is state.leaves  # the codes wait beside the float weights
    assert set(rounded.rounding) == {w.name for w in traced.plan.weights}
    assert all(n.startswith("GPTQ rounding") for n in rounded.rounding_notes.values())
    stored = stages.reconstruct(traced, state, config, _quiet)
    for w in traced.plan.weights:
        qp = stored.weights[w.name]
        view = stored.qparams(traced).params
        leaf = np.asarray(jax.tree_util.tree_leaves(view)[w.param_index]).reshape(-1)[w.kernel_index]
        matrix = np.asarray(weight_matrix(leaf, w.contracting))
        np.testing.assert_array_equal(np.asarray(qz.quantize(matrix, qp)), np.asarray(rounded.rounding[w.name]))


def test_report_has_a_row_per_site_and_the_fold_outcomes(vit):
    config = P.repq_vit(4, 4)
    traced, state = _calibrated(vit, config)
    state = stages.fold_norms(traced, state, config, _quiet)
    report = stages.report(traced, state, config)
    assert len(report.sites) == len(state.specs)
    for name, outcome in state.outcomes.items():
        assert report.site(name).fold == outcome.form and report.site(name).note == outcome.note


def test_stages_composed_give_transforms_result(vit):
    m, chunk, traced = vit
    config = P.repquant(4, 4)
    state = stages.initial_state(traced, config)
    state = stages.calibrate(traced, state, [chunk], config, _quiet)
    state = stages.learn_clipping(traced, state, config, _quiet)
    state = stages.fold_norms(traced, state, config, _quiet)
    state = stages.refit_folded_weights(traced, state, config)
    state = stages.reconstruct(traced, state, config, _quiet)
    qparams, _ = repquant.transform(m.apply_fn, m.params, chunk, config)
    by_stage = state.qparams(traced)
    for a, b in zip(jax.tree_util.tree_leaves(by_stage), jax.tree_util.tree_leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(state, QuantState)


@pytest.fixture(scope="module")
def plain():
    m = zoo.plain_jax_transformer(batch=4, seq=8)
    chunks = [_chunk(m, 2), [tuple(a * 0.7 for a in m.inputs), tuple(a * 1.3 for a in m.inputs)]]
    return m, chunks, stages.trace_model(m.apply_fn, m.params, chunks[0])


def _calibrated_in_order(plain, config, chunks, progress=_quiet):
    _, _, traced = plain
    return stages.calibrate(traced, stages.initial_state(traced, config), chunks, config, progress)


@pytest.mark.parametrize("clipping", [None, repquant.DualClipping(steps=2)])
def test_block_by_block_calibration_of_one_chunk_is_exactly_the_whole_models(plain, clipping):
    _, chunks, traced = plain
    assert len(traced.plan.blocks) == 2
    by_order = {}
    for order in ("chunks", "blocks", "auto"):
        config = P.repq_vit(4, 4, calibration_order=order, dual_clipping=clipping)
        by_order[order] = _calibrated_in_order(plain, config, chunks[:1])
    for order in ("blocks", "auto"):
        got, want = by_order[order], by_order["chunks"]
        chex.assert_trees_all_equal(got.activations, want.activations)
        chex.assert_trees_all_equal(got.weights, want.weights)
        chex.assert_trees_all_equal(got.clipping_rows, want.clipping_rows)
        assert got.samples == want.samples


def test_block_by_block_calibration_drops_each_blocks_samples_when_the_block_is_done(plain):
    _, chunks, traced = plain
    config = P.repq_vit(4, 4, calibration_order="blocks")
    state = stages.initial_state(traced, config)
    calibrator = stages._Calibrator(traced, dict(state.specs), config, np.random.default_rng(0))
    producers = traced.graph.producers()
    stops = [u.stop for u in traced.plan.blocks]
    held = []

    def progress(_message, done, _total):  # after each block: which points still hold a sample
        stop = stops[done - 1]
        for p in traced.plan.points:
            reservoir = calibrator.reservoirs[p.name]
            if producers.get(p.value_id, -1) < stop:  # fitted for good: sample dropped
                assert reservoir.data is None and reservoir.kept is not None, (p.name, done)
            else:  # a later block's: not reached yet
                assert reservoir.kept is None, (p.name, done)
        held.append(done)

    stages._calibrate_block_by_block(traced, state, chunks, calibrator, config, progress)
    assert held == [1, 2]
    assert all(r.seen > 0 for r in calibrator.reservoirs.values())


def test_block_by_block_calibration_of_several_chunks_sees_every_batch(plain):
    m, chunks, traced = plain
    results = {}
    for order in ("chunks", "blocks"):
        config = P.repq_vit(4, 4, calibration_order=order)
        results[order] = _calibrated_in_order(plain, config, chunks)
    assert results["blocks"].samples == results["chunks"].samples  # every value seen, every value kept
    # The first site reads the inputs, so its quantizer cannot depend on the order.
    first = min(traced.plan.points, key=lambda p: traced.graph.producers().get(p.value_id, -1)).name
    chex.assert_trees_all_equal(results["blocks"].activations[first], results["chunks"].activations[first])
    assert set(results["blocks"].activations) == set(results["chunks"].activations)


def test_calibration_order_is_validated():
    with pytest.raises(ValueError, match="calibration_order"):
        P.repq_vit(4, 4, calibration_order="layers")


def test_calibrating_many_chunks_compiles_the_fitting_kernels_per_power_of_two_rows_not_per_chunk(monkeypatch):
    m = zoo.linen_vit_block(batch=2, seq=8)
    config = P.repq_vit(4, 4, calibration_chunk=1)
    rows_fitted: dict[str, set[int]] = {}
    calibrate_values = stages.calibrate_values

    def spy(values, spec, *args):
        rows_fitted.setdefault(spec.name, set()).add(values.shape[0])
        return calibrate_values(values, spec, *args)

    monkeypatch.setattr(stages, "calibrate_values", spy)
    compiles = [0]

    def listener(event, _duration, **_kwargs):
        compiles[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for n in (8, 64):  # the first run compiles the kernels for the small buckets
            chunks = [[tuple(a * (1 + 0.01 * i) for a in m.inputs)] for i in range(n)]
            traced = stages.trace_model(m.apply_fn, m.params, chunks[0])
            rows_fitted.clear()
            before = compiles[0]
            after = stages.calibrate(traced, stages.initial_state(traced, config), chunks, config, _quiet)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(kept == seen for kept, seen in after.samples.values())  # the last fits read every row
    for name, counts in rows_fitted.items():
        earlier = counts - {max(counts)}
        assert all(c & (c - 1) == 0 for c in earlier), (name, counts)  # the others a power of two
        assert len(counts) <= max(counts).bit_length() + 1, (name, counts)
    assert compiles[0] - before < 64, "about one compilation per chunk: the reservoir sizes are not bucketed"
