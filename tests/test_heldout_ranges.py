"""Ranges that hold on unseen inputs (docs/method.md, "Calibration"): the min-max
candidate, the cross-validated choice of range and granularity, and a model whose W16
error on held-out batches the old rule leaves above 1e-3."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import zoo
from thirdparty import harness

import repquant_jax as repquant
from repquant_jax._src import calibration as cal
from repquant_jax._src import fit
from repquant_jax._src.config import QuantConfig, SiteSpec

NORM = SiteSpec("ln:input", "activation", 16, "uniform", "per_channel", "search")


def test_min_max_is_a_search_candidate_so_16_bits_do_not_clip():
    assert 1.0 in cal.DEFAULT_PERCENTILES
    x = np.random.default_rng(0).standard_t(2, size=(512, 4)).astype(np.float32)
    for axis in (None, -1):
        qp = cal.search_uniform(x, 16, axis=axis)
        s, z = np.asarray(qp.scale), np.asarray(qp.zero_point)
        lo, hi = -z * s, (2**16 - 1 - z) * s
        reduce = {} if axis is None else {"axis": 0}
        assert np.all(lo <= x.min(**reduce) + s) and np.all(hi >= x.max(**reduce) - s)


def test_folds_deal_samples_and_hold_each_out_once():
    samples = np.repeat(np.arange(6), 3)
    folds = fit.held_out_folds(samples, 4)
    assert len(folds) == 4 and np.all(sum(f.astype(int) for f in folds) == 1)
    assert [np.unique(samples[f]).tolist() for f in folds] == [[0, 4], [1, 5], [2], [3]]
    assert len(fit.held_out_folds(np.array([0, 0, 1, 1]), 4)) == 2  # leave one out
    assert fit.held_out_folds(np.zeros(3, np.int64), 4)[0].tolist() == [True, False, False]  # tokens
    assert fit.held_out_folds(np.array([-1, -1]), 4) is None


def _rows(rows: int, channels: int, seed: int, spread: np.ndarray | None = None):
    x = np.random.default_rng(seed).normal(size=(rows, channels)).astype(np.float32)
    return x * spread if spread is not None else x


def test_held_out_choice_widens_the_range_beyond_what_calibration_saw():
    x = _rows(64, 1, 0)
    qp = fit.calibrate_values(
        x, dataclasses.replace(NORM, granularity="per_tensor"), QuantConfig(), None, np.arange(64)
    )
    s, z = float(qp.scale), float(qp.zero_point)
    assert (2**16 - 1 - z) * s > 1.2 * x.max() and -z * s < 1.2 * x.min()
    judged_on_itself = fit.calibrate_values(
        x, dataclasses.replace(NORM, granularity="per_tensor"), QuantConfig(range_selection="calibration"), None
    )
    assert float(judged_on_itself.scale) < s


def test_held_out_choice_picks_per_tensor_when_per_channel_overfits_few_rows():
    # One row per sample (a class token before a head), 8 samples: per-channel ranges
    # from 6 rows miss the next ones; one range over all channels holds them.
    x = _rows(8, 64, 1)
    qp = fit.calibrate_values(x, NORM, QuantConfig(), -1, np.arange(8))
    assert qp.axis is None
    # Many rows and channels of very different ranges: per channel stays.
    spread = np.float32(10.0) ** np.random.default_rng(2).uniform(-1, 1, size=64).astype(np.float32)
    y = _rows(2048, 64, 3, spread)
    assert fit.calibrate_values(y, NORM, QuantConfig(), -1, np.arange(2048) // 64).axis == -1
    # The old rule keeps per channel whatever the rows.
    assert fit.calibrate_values(x, NORM, QuantConfig(range_selection="calibration"), -1, np.arange(8)).axis == -1


def test_auto_selection_cross_validates_wide_or_few_row_sites_only():
    spec8 = dataclasses.replace(NORM, bits=8, granularity="per_tensor")
    many = _rows(2048, 4, 4)
    samples = np.arange(2048) // 64

    def fitted(x, spec, selection):
        return fit.calibrate_values(x, spec, QuantConfig(range_selection=selection), None, samples[: len(x)])

    for spec, x, like in [(spec8, many, "calibration"), (NORM, many, "held_out"), (spec8, many[:512], "held_out")]:
        auto, same = fitted(x, spec, "auto"), fitted(x, spec, like)
        np.testing.assert_array_equal(np.asarray(auto.scale), np.asarray(same.scale))
    # the two rules do differ on these rows, so the equalities above say something
    assert float(fitted(many, NORM, "held_out").scale) != float(fitted(many, NORM, "calibration").scale)
    assert float(fitted(many[:512], spec8, "held_out").scale) != float(fitted(many[:512], spec8, "calibration").scale)


def test_held_out_choice_is_the_same_with_and_without_jit():
    x = _rows(256, 8, 4, np.linspace(0.1, 3.0, 8, dtype=np.float32))
    samples = np.arange(256) // 16
    for bits in (4, 16):
        spec = dataclasses.replace(NORM, bits=bits)
        a = fit.calibrate_values(x, spec, QuantConfig(), -1, samples)
        with jax.disable_jit():
            b = fit.calibrate_values(x, spec, QuantConfig(), -1, samples)
        assert a.axis == b.axis
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
        np.testing.assert_array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))


W16 = dict(input_bits=16, softmax_quantizer="uniform")


def test_w16_holds_on_held_out_batches_and_the_head_input_goes_per_tensor():
    # A pre-LN block and a head reading the class token through the final LayerNorm:
    # 32 calibration samples give the head's per-channel input range 32 rows.
    model = zoo.vit_with_head()
    batch = tuple(model.inputs)
    calib = [batch] + [harness.heldout_batch(batch, 1000 + i) for i in range(15)]  # 32 samples
    held = [harness.heldout_batch(batch, 100 + i) for i in range(3)]
    want = [model.apply_fn(model.params, *b) for b in held]

    def transform(**overrides):
        config = repquant.presets.repq_vit(16, 16, **W16, **overrides)
        q, qa = repquant.transform(model.apply_fn, model.params, calib, config)
        num = sum(float(np.sum((qa(q, *b) - w) ** 2)) for b, w in zip(held, want))
        return q, qa, (num / sum(float(np.sum(w**2)) for w in want)) ** 0.5

    *_, old = transform(range_selection="calibration")  # ranges fitted to what calibration saw
    assert old > 1e-3
    q, qa, new = transform()
    assert new <= 1e-3
    chosen = [s.name for s in qa.report.sites if "held-out" in s.note]
    assert chosen == ["head:input"]
    # per tensor, so not folded: the head keeps its kernel, the norm its γ and β
    assert q.activations["head:input"].axis is None and "head:input" not in q.input_scales
    assert all(s.fold == "folded" for s in qa.report.sites if s.name.endswith(("query:input", "fc1:input")))
