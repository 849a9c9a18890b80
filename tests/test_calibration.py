"""Tests for repquant_jax._src.calibration (docs/method.md, "Calibration (the RepQ-ViT rule)")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repquant_jax._src import calibration as cal
from repquant_jax._src import quantizers as qz

PERCENTILES = cal.DEFAULT_PERCENTILES
LOG_PERCENTILES = cal.LOG_PERCENTILES


# ----------------------------------------------------------------------------
# A slow, plain NumPy reference of the RepQ-ViT rules: loops over channels and
# percentiles, float64 quantiles, float32 quantization as in the library.


def np_quantile(x, p):
    return float(np.quantile(np.asarray(x, np.float64).ravel(), p))


def ref_fake_quant_uniform(x, scale, zero_point, qmin, qmax):
    s, z = np.float32(scale), np.float32(zero_point)
    q = np.clip(np.round(x / s) + z, qmin, qmax)
    return (q - z) * s


def ref_search_uniform(x, bits, axis=None, percentiles=PERCENTILES, symmetric=False):
    if axis is None:
        channels = [x]
    else:
        channels = [np.take(x, c, axis=axis) for c in range(x.shape[axis])]
    scales, zero_points = [], []
    for xc in channels:
        xc = xc.ravel()
        best = None
        for p in percentiles:
            hi, lo = np_quantile(xc, p), np_quantile(xc, 1 - p)
            if symmetric:
                s, z = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 0.0
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            else:
                s = (hi - lo) / (2**bits - 1)
                z = float(np.round(-lo / s))
                qmin, qmax = 0, 2**bits - 1
            xhat = ref_fake_quant_uniform(xc, s, z, qmin, qmax)
            err = np.mean((xhat.astype(np.float64) - xc) ** 2)
            if best is None or err < best[0]:
                best = (err, s, z)
        scales.append(best[1])
        zero_points.append(best[2])
    return np.array(scales), np.array(zero_points)


def ref_search_log(x, bits, percentiles=LOG_PERCENTILES, kind="log_sqrt2"):
    x = np.asarray(x, np.float64).ravel()
    k = 2.0 if kind == "log_sqrt2" else 1.0
    zero_code = 2**bits - 1
    best = None
    for p in percentiles:
        s = np_quantile(x, p)
        with np.errstate(divide="ignore"):
            code = np.maximum(np.round(-k * np.log2(x / s)), 0.0)
        zero = (x <= 0) | (code >= zero_code)
        xhat = np.where(zero, 0.0, s * 2.0 ** (-code / k))
        err = np.mean((xhat - x) ** 2)
        if best is None or err < best[0]:
            best = (err, s)
    return best[1]


def heavy_tailed(seed, shape, df=3, spread_axis=None):
    """Student-t data; with `spread_axis`, channels get very different ranges."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df, size=shape)
    if spread_axis is not None:
        bshape = [1] * len(shape)
        bshape[spread_axis] = shape[spread_axis]
        x = x * 10.0 ** rng.uniform(-1, 1, size=bshape)
    return x.astype(np.float32)


def attention_probs(seed, shape=(4, 8, 32, 32)):
    rng = np.random.default_rng(seed)
    logits = rng.standard_t(3, size=shape) * 2.0
    causal = np.tril(np.ones(shape[-2:], bool))
    probs = jax.nn.softmax(np.where(causal, logits, -np.inf), axis=-1)
    return np.asarray(probs, np.float32)


# ----------------------------------------------------------------------------
# The search against the reference.


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_search_uniform_per_tensor_matches_reference(bits, symmetric):
    x = heavy_tailed(bits, (64, 96), df=2)
    qp = cal.search_uniform(x, bits, symmetric=symmetric)
    s_ref, z_ref = ref_search_uniform(x, bits, symmetric=symmetric)
    assert qp.kind == ("symmetric" if symmetric else "uniform") and qp.axis is None
    assert qp.scale.shape == qp.zero_point.shape == ()
    np.testing.assert_allclose(qp.scale, s_ref[0], rtol=1e-6)
    np.testing.assert_allclose(qp.zero_point, z_ref[0], rtol=1e-6)


@pytest.mark.parametrize("shape, axis", [((512, 24), -1), ((512, 24), 1), ((12, 16, 40), 0), ((6, 10, 80), -2)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_search_uniform_per_channel_matches_reference(shape, axis, symmetric):
    x = heavy_tailed(len(shape) + axis, shape, df=3, spread_axis=axis)
    qp = cal.search_uniform(x, 4, axis=axis, symmetric=symmetric)
    s_ref, z_ref = ref_search_uniform(x, 4, axis=axis, symmetric=symmetric)
    assert qp.axis == axis and qp.scale.shape == (shape[axis],)
    np.testing.assert_allclose(qp.scale, s_ref, rtol=1e-6)
    np.testing.assert_allclose(qp.zero_point, z_ref, rtol=1e-6)


def test_search_picks_the_best_percentile_per_channel():
    rng = np.random.default_rng(0)
    n = 20_000
    x = np.stack(
        [
            rng.standard_normal(size=n),  # light tails at 4 bits: the 0.99 range wins
            rng.standard_t(1.5, size=n),  # wild outliers: clipping them costs too much
        ],
        axis=-1,
    ).astype(np.float32)
    percentiles = (0.99, 0.9999, 1.0)
    qp = cal.search_uniform(x, 4, axis=-1, percentiles=percentiles)
    s_ref, z_ref = ref_search_uniform(x, 4, axis=-1, percentiles=percentiles)
    np.testing.assert_allclose(qp.scale, s_ref, rtol=1e-6)
    np.testing.assert_allclose(qp.zero_point, z_ref, rtol=1e-6)
    # The Gaussian channel took p = 0.99, the wild one a wider range.
    candidates = (
        np.array([[np_quantile(x[:, c], p) - np_quantile(x[:, c], 1 - p) for p in percentiles] for c in (0, 1)]) / 15
    )
    chosen = np.argmin(np.abs(candidates - np.asarray(qp.scale)[:, None]), axis=1)
    assert chosen[0] == 0 and chosen[1] > 0


@pytest.mark.parametrize("df", [2, 3])
@pytest.mark.parametrize("bits", [3, 4])
def test_search_is_no_worse_than_minmax_on_heavy_tails(df, bits):
    x = heavy_tailed(df * 10 + bits, (2048, 8), df=df)
    mse = cal.quantization_mse
    # Per tensor.
    assert mse(x, cal.search_uniform(x, bits)) <= mse(x, cal.minmax(x, bits))
    # Per channel, on average: one channel whose single huge outlier is worth
    # keeping can prefer min-max, which the default candidates do not include.
    searched = mse(x, cal.search_uniform(x, bits, axis=-1), axis=-1)
    baseline = mse(x, cal.minmax(x, bits, axis=-1), axis=-1)
    assert np.mean(searched) <= np.mean(baseline)
    # With p = 1 (min-max) among the candidates, no channel can do worse.
    with_minmax = cal.search_uniform(x, bits, axis=-1, percentiles=PERCENTILES + (1.0,))
    assert np.all(np.asarray(mse(x, with_minmax, axis=-1)) <= np.asarray(baseline))


@pytest.mark.parametrize("kind", ["log_sqrt2", "log2"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_search_log_matches_reference(kind, bits):
    probs = attention_probs(bits)
    qp = cal.search_log_sqrt2(probs, bits, kind=kind)
    assert qp.kind == kind and qp.axis is None and qp.scale.shape == ()
    np.testing.assert_allclose(qp.scale, ref_search_log(probs, bits, kind=kind), rtol=1e-6)
    # Causal-mask zeros stay exactly zero.
    assert np.all(np.asarray(qz.fake_quant(probs, qp))[probs == 0] == 0.0)


def test_search_log_percentiles_pick_lowest_error():
    probs = attention_probs(7)
    percentiles = (0.6, 0.9, 0.999, 1.0)
    qp = cal.search_log_sqrt2(probs, 4, percentiles=percentiles)
    errors = [float(cal.quantization_mse(probs, qz.log_sqrt2(np_quantile(probs, p), 4))) for p in percentiles]
    np.testing.assert_allclose(qp.scale, np_quantile(probs, percentiles[int(np.argmin(errors))]), rtol=1e-6)
    assert float(cal.quantization_mse(probs, qp)) <= min(errors) * (1 + 1e-6)


# ----------------------------------------------------------------------------
# Min-max, percentile and exact quantiles.


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_minmax(axis):
    x = heavy_tailed(1, (50, 6), spread_axis=1)
    qp = cal.minmax(x, 8, axis=axis)
    lo = x.min(axis=None if axis is None else 1 - axis % 2)
    hi = x.max(axis=None if axis is None else 1 - axis % 2)
    np.testing.assert_allclose(qp.scale, (hi - lo) / 255, rtol=1e-6)
    np.testing.assert_array_equal(qp.zero_point, np.round(-lo / np.asarray(qp.scale)))
    sym = cal.minmax(x, 8, axis=axis, symmetric=True)
    np.testing.assert_allclose(sym.scale, np.maximum(-lo, hi) / 127, rtol=1e-6)
    assert np.all(np.asarray(sym.zero_point) == 0) and sym.kind == "symmetric"
    # The full range is representable: nothing clips.
    lo_q, hi_q = qz.code_range(qp)
    codes = np.asarray(qz.quantize(x, qp))
    assert codes.min() >= lo_q and codes.max() <= hi_q
    assert np.max(np.abs(np.asarray(qz.fake_quant(x, qp)) - x)) <= np.max(qp.scale) * 0.5001


def test_zero_point_is_not_forced_into_range():
    x = np.linspace(2.0, 3.0, 101, dtype=np.float32)  # all positive, RepQ-ViT keeps [2, 3]
    qp = cal.minmax(x, 4)
    np.testing.assert_allclose(qp.scale, 1 / 15, rtol=1e-6)
    assert float(qp.zero_point) == -30.0
    np.testing.assert_allclose(np.asarray(qz.fake_quant(x, qp))[[0, -1]], [2.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("p", [0.51, 0.9, 0.999, 0.99999, 1.0])
@pytest.mark.parametrize("axis", [None, -1])
def test_percentile_matches_numpy(p, axis):
    x = heavy_tailed(2, (3000, 4), spread_axis=1)
    qp = cal.percentile(x, 6, p=p, axis=axis)
    np_axis = None if axis is None else 0
    hi = np.quantile(x.astype(np.float64), p, axis=np_axis)
    lo = np.quantile(x.astype(np.float64), 1 - p, axis=np_axis)
    np.testing.assert_allclose(qp.scale, (hi - lo) / 63, rtol=1e-6)
    np.testing.assert_allclose(qp.zero_point, np.round(-lo / ((hi - lo) / 63)), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257, 10_000])
def test_quantiles_are_exact_for_tails_and_middles(n):
    x = heavy_tailed(n, (3, n))
    probs = (1.0, 0.99999, 0.999, 0.75, 0.5001, 0.3, 0.001, 0.0)
    got = np.asarray(cal._quantiles(jnp.asarray(x), probs))  # sort path
    tails = probs[:3] + probs[-2:]
    got_tails = np.asarray(cal._quantiles(jnp.asarray(x), tails))  # top_k path when n is large
    want = np.quantile(x.astype(np.float64), probs, axis=-1)
    want_tails = np.quantile(x.astype(np.float64), tails, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_tails, want_tails, rtol=1e-6, atol=1e-7)


def test_more_than_2_pow_24_elements():
    n = 17_000_001  # > 16,777,216
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    x[123] = 50.0  # one outlier the search must clip away
    qp = cal.percentile(x, 8, p=0.9999)
    hi, lo = np.quantile(x.astype(np.float64), [0.9999, 1 - 0.9999])
    np.testing.assert_allclose(qp.scale, (hi - lo) / 255, rtol=1e-6)
    assert float(qp.zero_point) == np.round(-lo / ((hi - lo) / 255))
    searched = cal.search_uniform(x, 4)
    assert float(searched.scale) < (x.max() - x.min()) / 15 / 4
    # An interpolation position past 2^24 is kept exactly (float32 would round it
    # to an even index: jnp.quantile returns 0.0 here).
    k = n - 2001
    step = np.zeros(n, np.float32)
    step[k + 1 :] = 1000.0
    p = (k + 0.5) / (n - 1)
    assert float(cal._quantiles(jnp.asarray(step)[None], (p,))[0, 0]) == np.quantile(step, p) == 500.0


# ----------------------------------------------------------------------------
# Degenerate ranges.


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0, 1e-12])
@pytest.mark.parametrize("rule", ["minmax", "search", "symmetric"])
def test_constant_channels_get_a_sane_scale(value, rule):
    x = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32)
    x[:, 1] = value
    if rule == "minmax":
        qp = cal.minmax(x, 4, axis=-1)
    elif rule == "search":
        qp = cal.search_uniform(x, 4, axis=-1)
    else:
        qp = cal.search_uniform(x, 4, axis=-1, symmetric=True)
    scale = np.asarray(qp.scale)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    xhat = np.asarray(qz.fake_quant(x, qp))
    np.testing.assert_allclose(xhat[:, 1], value, rtol=1e-6, atol=scale[1])
    if value == 0.0:
        assert np.all(xhat[:, 1] == 0.0)
        np.testing.assert_allclose(scale[1], cal.MIN_RANGE / (15 if rule != "symmetric" else 7))


def test_all_zero_softmax_data():
    qp = cal.search_log_sqrt2(np.zeros((4, 4), np.float32), 4)
    assert float(qp.scale) == 1.0
    mostly_zero = np.zeros(1_000_000, np.float32)
    mostly_zero[:5] = [0.5, 0.25, 0.1, 0.9, 0.3]  # every candidate quantile is 0
    qp = cal.search_log_sqrt2(mostly_zero, 4)
    np.testing.assert_allclose(qp.scale, 0.9)


# ----------------------------------------------------------------------------
# quantization_mse and properties.


def test_quantization_mse():
    x = heavy_tailed(5, (7, 9, 5), spread_axis=2)
    qp = cal.minmax(x, 3, axis=-1)
    err = (np.asarray(qz.fake_quant(x, qp), np.float64) - x) ** 2
    np.testing.assert_allclose(cal.quantization_mse(x, qp), err.mean(), rtol=1e-5)
    per_channel = cal.quantization_mse(x, qp, axis=-1)
    assert per_channel.shape == (5,)
    np.testing.assert_allclose(per_channel, err.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(cal.quantization_mse(x, qp, axis=1), err.mean(axis=(0, 2)), rtol=1e-5)
    jitted = jax.jit(cal.quantization_mse, static_argnames="axis")(x, qp, axis=-1)
    np.testing.assert_allclose(jitted, per_channel, rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(
    channels=st.integers(1, 4),
    rows=st.integers(1, 60),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**32 - 1),
    symmetric=st.booleans(),
)
def test_per_channel_search_equals_per_tensor_search_by_channel(channels, rows, bits, seed, symmetric):
    x = heavy_tailed(seed, (rows, channels), spread_axis=1)
    qp = cal.search_uniform(x, bits, axis=1, symmetric=symmetric)
    for c in range(channels):
        qp_c = cal.search_uniform(x[:, c], bits, symmetric=symmetric)
        np.testing.assert_allclose(qp.scale[c], qp_c.scale, rtol=1e-6)
        np.testing.assert_array_equal(qp.zero_point[c], qp_c.zero_point)


def test_inputs_may_be_numpy_jax_or_lists_and_rules_trace_under_jit():
    x = heavy_tailed(9, (200, 3), spread_axis=1)
    ref = cal.search_uniform(x, 4, axis=-1)
    for x_in in (jnp.asarray(x), x.astype(np.float64), x.tolist()):
        other = cal.search_uniform(x_in, 4, axis=-1)
        np.testing.assert_array_equal(other.scale, ref.scale)
        np.testing.assert_array_equal(other.zero_point, ref.zero_point)
    traced = jax.jit(lambda v: cal.search_uniform(v, 4, axis=-1))(jnp.asarray(x))
    np.testing.assert_array_equal(traced.scale, ref.scale)
    np.testing.assert_array_equal(traced.zero_point, ref.zero_point)
    traced_log = jax.jit(lambda v: cal.search_log_sqrt2(v, 4).scale)(attention_probs(1))
    np.testing.assert_array_equal(traced_log, cal.search_log_sqrt2(attention_probs(1), 4).scale)


# ----------------------------------------------------------------------------
# Bad input.

RULES = {
    "minmax": lambda x, **kw: cal.minmax(x, **{"bits": 8, **kw}),
    "percentile": lambda x, **kw: cal.percentile(x, **{"bits": 8, **kw}),
    "search_uniform": lambda x, **kw: cal.search_uniform(x, **{"bits": 8, **kw}),
    "search_log_sqrt2": lambda x, **kw: cal.search_log_sqrt2(x, **{"bits": 4, **kw}),
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("bits", [1, 17])
def test_bad_bits(rule, bits):
    with pytest.raises(ValueError, match=f"bits must be in 2..16, got {bits}"):
        RULES[rule](np.ones(10, np.float32), bits=bits)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize(
    "empty", [np.zeros((0,)), np.zeros((3, 0)), jnp.zeros((0, 4)), []], ids=["0", "3x0", "jax", "list"]
)
def test_empty_data(rule, empty):
    with pytest.raises(ValueError, match="calibration data is empty"):
        RULES[rule](empty)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("as_jax", [False, True])
def test_non_finite_data(rule, bad, as_jax):
    x = np.full((5, 3), 0.5, np.float32)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="calibration data contains NaN or Inf"):
        RULES[rule](jnp.asarray(x) if as_jax else x)


def test_float64_overflowing_float32_is_reported():
    with pytest.raises(ValueError, match="NaN or Inf"):
        cal.minmax(np.array([1.0, 1e300]), 8)


@pytest.mark.parametrize("bad", [0.5, 0.3, 1.0001, -1.0, 2])
def test_bad_percentiles(bad):
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match=r"percentiles must be in \(0.5, 1\]"):
        cal.percentile(x, 8, p=bad)
    with pytest.raises(ValueError, match=r"percentiles must be in \(0.5, 1\]"):
        cal.search_uniform(x, 8, percentiles=(0.999, bad))
    with pytest.raises(ValueError, match=r"percentiles must be in \(0.5, 1\]"):
        cal.search_log_sqrt2(x, 4, percentiles=(bad,))


def test_other_bad_arguments():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="percentiles must not be empty"):
        cal.search_uniform(x, 8, percentiles=())
    with pytest.raises(ValueError, match="must be >= 0"):
        cal.search_log_sqrt2(np.array([0.5, -1e-3], np.float32), 4)
    with pytest.raises(ValueError, match="must be >= 0"):
        cal.search_log_sqrt2(jnp.array([0.5, -1e-3]), 4)
    with pytest.raises(ValueError, match="kind must be 'log_sqrt2' or 'log2'"):
        cal.search_log_sqrt2(x, 4, kind="uniform")
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        cal.minmax(x, 8, axis=2)
    with pytest.raises(ValueError, match="axis must be an int"):
        cal.search_uniform(x, 8, axis=(0, 1))
    with pytest.raises(ValueError, match="real numbers"):
        cal.minmax(np.array(["a", "b"]), 8)
