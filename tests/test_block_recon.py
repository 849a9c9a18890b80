"""Reconstruction units and block-wise reconstruction."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import repquant_jax as repquant
from repquant_jax._src import block_recon
from repquant_jax._src.graph import trace
from repquant_jax._src.sites import analyze
from repquant_jax._src.units import find_units


def _deep_plain(layers: int, seed: int = 0, batch: int = 8, seq: int = 8):
    """The zoo's plain-JAX pre-LN transformer with ``layers`` identical blocks."""
    key = jax.random.key(seed)
    params = {f"layer_{i}": zoo._block_params(jax.random.fold_in(key, i), 16, 64) for i in range(layers)}
    kf, kh = jax.random.split(jax.random.fold_in(key, 1000))
    params["final_ln"] = zoo._ln_params(kf, 16)
    params["head"] = zoo._dense_init(kh, 16, 10)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, seq, 16))

    def apply_fn(p, x):
        return zoo._plain_forward(p, x, num_layers=layers, heads=2)

    return apply_fn, params, x


@pytest.mark.parametrize("builder", ["linen_vit_block", "bert_block", "llama_block", "plain_jax_transformer"])
def test_units_cover_the_graph_in_order(builder):
    m = getattr(zoo, builder)()
    graph = trace(m.apply_fn, m.params, *m.inputs)
    plan = analyze(graph)
    for granularity in ("block", "sub_block"):
        units = find_units(graph, plan, granularity)
        assert units[0].start == 0 and units[-1].stop == len(graph.nodes)
        assert all(a.stop == b.start for a, b in zip(units, units[1:]))
        assert sorted(n for u in units for n in u.weights) == sorted(w.name for w in plan.weights)
        assert all(u.weights and u.outputs for u in units)


def test_one_block_per_layer_and_two_sub_blocks_each():
    apply_fn, params, x = _deep_plain(3)
    graph = trace(apply_fn, params, x)
    plan = analyze(graph)
    assert len(find_units(graph, plan, "block")) == 3  # the head joins the last block
    assert len(find_units(graph, plan, "sub_block")) == 7  # attention, MLP per layer; head
    assert plan.blocks == find_units(graph, plan, "block") and len(plan.sub_blocks) == 7
    assert "reconstruction unit block 2: nodes" in str(plan) and "(3 sub-blocks)" in str(plan)


def test_a_mask_every_block_reads_does_not_hide_the_block_boundaries():
    """Post-LN BERT layers that all read one mask made before them, then a mean pooling
    that reads the input mask: both are live across the block boundaries, the first not
    after the last attention, so counting them would leave no cut between the blocks."""
    layers = 3

    def apply_fn(p, x, mask):
        every_block = mask.astype(x.dtype)
        for i in range(layers):
            x = zoo.BertLayer(4, 128).apply(p[i], x, every_block)
        weights = mask.astype(x.dtype)[..., None]
        return (x * weights).sum(1) / weights.sum(1)

    m = zoo.bert_block()
    params = [zoo.BertLayer(4, 128).init(jax.random.key(i), *m.inputs) for i in range(layers)]
    graph = trace(apply_fn, params, *m.inputs)
    plan = analyze(graph)
    blocks = find_units(graph, plan, "block")
    assert [len(u.weights) for u in blocks] == [6] * layers
    assert len(find_units(graph, plan, "sub_block")) == 2 * layers


def _block_config(**kw):
    return repquant.presets.repquant(4, 4, reconstruction=repquant.Reconstruction(**{"granularity": "block", **kw}))


def _figures(line: str, label: str) -> tuple[float, float] | None:
    """``(before, after)`` of a report line's ``label`` figures, None when absent."""
    if f"{label} " not in line:
        return None
    before, after = line.split(f"{label} ")[1].split(";")[0].split(",")[0].split(" -> ")
    return float(before), float(after)


@pytest.mark.parametrize("accept", ["unit", "model"])
def test_blocks_are_never_kept_worse_on_held_out_samples(accept):
    apply_fn, params, x = _deep_plain(2)
    calib = [x * (1.0 + 0.1 * i) for i in range(2)]
    q, qa = repquant.transform(apply_fn, params, calib, _block_config(steps=30, accept=accept))
    lines = [n for n in qa.report.notes if n.startswith("reconstruction block")]
    assert len(lines) == 2
    checks = []  # (before, after, kept) of each model check
    for line in lines:
        held, model = _figures(line, "held-out"), _figures(line, "model")
        assert (model is None) == (accept == "unit" or held[1] >= held[0])
        if line.endswith("; kept"):
            assert held[1] < held[0]
            assert model is None or model[1] < model[0]
        if model is not None:
            checks.append((*model, line.endswith("; kept")))
    # each check starts from the model as the earlier units left it
    for (before, after, kept), (next_before, _, _) in zip(checks, checks[1:]):
        np.testing.assert_allclose(next_before, after if kept else before, rtol=1e-6)
    out = qa(q, x)
    assert np.isfinite(np.asarray(out)).all()
    assert out.shape == apply_fn(params, x).shape


def test_a_step_on_one_of_identical_batches_learns_what_all_of_them_teach():
    apply_fn, params, x = _deep_plain(1)

    def learned(batches_per_step):
        reconstruction = repquant.Reconstruction(
            steps=10, held_out=0.0, accept="unit", batches_per_step=batches_per_step
        )
        config = repquant.presets.repq_vit(4, 4, reconstruction=reconstruction)  # no dual clipping: faster
        return repquant.transform(apply_fn, params, [x] * 2, config)[0].params

    chex.assert_trees_all_close(learned(1), learned(None), rtol=1e-5, atol=1e-6)


def test_the_whole_model_as_one_unit_matches_its_outputs():
    apply_fn, params, x = _deep_plain(2)
    graph = trace(apply_fn, params, x)
    (unit,) = find_units(graph, analyze(graph), "model")
    assert (unit.start, unit.stop) == (0, len(graph.nodes)) and unit.outputs == tuple(graph.output_ids)
    q, qa = repquant.transform(apply_fn, params, [x], _block_config(granularity="model", steps=30, eval_every=10))
    (line,) = [n for n in qa.report.notes if n.startswith("reconstruction ")]
    assert line.startswith("reconstruction model 0:")
    assert np.isfinite(np.asarray(qa(q, x))).all()


def test_identical_blocks_share_one_compiled_training_loop():
    apply_fn, params, x = _deep_plain(5)
    before = block_recon.compile_count()
    repquant.transform(apply_fn, params, [x], _block_config(steps=2, eval_every=2))
    compiled = block_recon.compile_count() - before
    # blocks 1..3 are identical; block 0 reads the function's input, block 4 holds the head
    assert 1 <= compiled <= 3


def test_without_learning_the_model_is_the_repq_vit_one():
    apply_fn, params, x = _deep_plain(2)
    base, qa = repquant.transform(apply_fn, params, [x], repquant.presets.repq_vit(4, 4))
    blocks, qb = repquant.transform(
        apply_fn,
        params,
        [x],
        repquant.presets.repq_vit(4, 4, reconstruction=repquant.Reconstruction(granularity="block", steps=0)),
    )
    np.testing.assert_allclose(np.asarray(qb(blocks, x)), np.asarray(qa(base, x)), rtol=1e-6, atol=1e-6)


def test_outputs_broadcast_over_the_samples_leave_them_the_unit_of_the_split():
    # a block that also hands on a causal mask or position tables of leading length 1
    per_sample, broadcast = jnp.zeros((2, 8, 4)), jnp.zeros((2, 1, 1, 4, 4))
    assert block_recon._sample_rows([per_sample, broadcast]) == 8
    mask, has_held = block_recon._split_mask([per_sample, broadcast], 0.25, 0)
    assert mask.shape == (2, 8) and has_held and float(mask.sum()) == 12
    assert block_recon._per_sample_mse([per_sample + 1, broadcast], [per_sample, broadcast]).shape == (2, 8)
    # outputs that disagree: whole batches are the samples
    assert block_recon._sample_rows([per_sample, jnp.zeros((2, 5))]) is None
    assert block_recon._split_mask([per_sample, jnp.zeros((2, 5))], 0.5, 0)[0].shape == (2, 1)
