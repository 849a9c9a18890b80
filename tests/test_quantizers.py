"""Tests for repquant_jax._src.quantizers (docs/method.md, "Quantizers" and "Softmax")."""

from __future__ import annotations

import dataclasses
import math
import re

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repquant_jax._src import quantizers as qz

# The ops are jitted internally, so every new shape/bit width compiles (~50 ms):
# the example counts keep the file well under a minute on one core.
PROPERTY = settings(max_examples=30, deadline=None)

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
bit_widths = st.integers(2, 8)
seeds = st.integers(0, 2**32 - 1)
uniform_kinds = st.sampled_from(["uniform", "symmetric"])
log_kinds = st.sampled_from(["log2", "log_sqrt2"])


def _uniform_qp(rng, kind, bits, channels=None, axis=None):
    """A random uniform/symmetric quantizer, per tensor or with `channels` channels."""
    size = () if channels is None else (channels,)
    scale = (10.0 ** rng.uniform(-3, 2, size=size)).astype(np.float32)
    if kind == "symmetric":
        return qz.symmetric(scale, bits, axis=axis)
    zero_point = rng.integers(0, 2**bits, size=size).astype(np.float32)
    return qz.uniform(scale, zero_point, bits, axis=axis)


def _clip_range(qp):
    qmin, qmax = qz.code_range(qp)
    s, z = np.asarray(qp.scale), np.asarray(qp.zero_point)
    return (qmin - z) * s, (qmax - z) * s


def _data_around(rng, qp, shape):
    """Values covering the clipping range and 50% beyond it on both sides."""
    lo, hi = _clip_range(qp)
    width = hi - lo
    u = rng.uniform(-0.5, 1.5, size=shape).astype(np.float32)
    return (lo + u * width).astype(np.float32)


def _np_uniform_codes(x, qp):
    qmin, qmax = qz.code_range(qp)
    s = np.float32(qp.scale)
    z = np.float32(qp.zero_point)
    return np.clip(np.round(x / s) + z, qmin, qmax)


# ----------------------------------------------------------------------------
# Uniform / symmetric properties.


@PROPERTY
@given(shape=shapes, bits=bit_widths, seed=seeds, kind=uniform_kinds)
def test_uniform_codes_match_definition_and_error_bound(shape, bits, seed, kind):
    rng = np.random.default_rng(seed)
    qp = _uniform_qp(rng, kind, bits)
    x = _data_around(rng, qp, shape)
    codes = np.asarray(qz.quantize(x, qp))
    xhat = np.asarray(qz.fake_quant(x, qp))
    qmin, qmax = qz.code_range(qp)

    assert codes.dtype == np.int32 and codes.shape == x.shape
    assert codes.min() >= qmin and codes.max() <= qmax
    np.testing.assert_array_equal(codes, _np_uniform_codes(x, qp))
    # The forward value is exactly dequantize(quantize(x)).
    np.testing.assert_array_equal(xhat, np.asarray(qz.dequantize(codes, qp)))
    np.testing.assert_array_equal(qz.quantize(xhat, qp), codes)
    # Inside the clipping range the error is at most half a step.
    lo, hi = _clip_range(qp)
    inside = (x >= lo) & (x <= hi)
    s = float(qp.scale)
    tol = s / 2 + 4 * np.finfo(np.float32).eps * np.maximum(np.abs(x), np.abs(xhat))
    assert np.all(np.abs(x - xhat)[inside] <= tol[inside])
    # Outside it, values clip to the end points.
    np.testing.assert_allclose(xhat[x > hi], hi, rtol=1e-6)
    np.testing.assert_allclose(xhat[x < lo], lo, rtol=1e-6)


@PROPERTY
@given(bits=bit_widths, seed=seeds, kind=uniform_kinds)
def test_uniform_codes_round_trip(bits, seed, kind):
    rng = np.random.default_rng(seed)
    qp = _uniform_qp(rng, kind, bits)
    qmin, qmax = qz.code_range(qp)
    codes = np.arange(qmin, qmax + 1, dtype=np.int32)
    np.testing.assert_array_equal(qz.quantize(qz.dequantize(codes, qp), qp), codes)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, bits=bit_widths, seed=seeds, kind=uniform_kinds, data=st.data())
def test_per_channel_equals_per_tensor_channel_by_channel(shape, bits, seed, kind, data):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    qp = _uniform_qp(rng, kind, bits, channels=channels, axis=axis)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(10.0 ** rng.uniform(-2, 2))
    codes = np.asarray(qz.quantize(x, qp))
    xhat = np.asarray(qz.fake_quant(x, qp))
    for c in range(channels):
        if kind == "symmetric":
            qp_c = qz.symmetric(qp.scale[c], bits)
        else:
            qp_c = qz.uniform(qp.scale[c], qp.zero_point[c], bits)
        x_c = np.take(x, c, axis=axis)
        np.testing.assert_array_equal(np.take(codes, c, axis=axis), qz.quantize(x_c, qp_c))
        np.testing.assert_array_equal(np.take(xhat, c, axis=axis), qz.fake_quant(x_c, qp_c))


@PROPERTY
@given(shape=shapes, bits=bit_widths, seed=seeds, kind=uniform_kinds)
def test_clipped_ste_gradient(shape, bits, seed, kind):
    rng = np.random.default_rng(seed)
    qp = _uniform_qp(rng, kind, bits)
    x = _data_around(rng, qp, shape).reshape(-1)
    lo, hi = _clip_range(qp)
    x[: min(2, x.size)] = np.float32(hi)  # the closed range includes its end points
    x[-1:] = np.float32(lo)
    x = x.reshape(shape)
    grad = np.asarray(jax.grad(lambda v: qz.fake_quant(v, qp).sum())(jnp.asarray(x)))
    # lo/hi as float32, exactly as the quantizer computes them.
    s, z = np.float32(qp.scale), np.float32(qp.zero_point)
    qmin, qmax = qz.code_range(qp)
    lo32, hi32 = (np.float32(qmin) - z) * s, (np.float32(qmax) - z) * s
    expected = ((x >= lo32) & (x <= hi32)).astype(np.float32)
    np.testing.assert_array_equal(grad, expected)


def test_round_half_to_even():
    qp = qz.uniform(0.25, 8.0, bits=8)  # power-of-two scale: exact ties
    x = (np.arange(-6, 7, dtype=np.float32) + 0.5) * np.float32(0.25)
    codes = np.asarray(qz.quantize(x, qp))
    np.testing.assert_array_equal(codes, np.round(np.arange(-6, 7) + 0.5) + 8)
    assert codes[6] == 8 and codes[7] == 10  # 0.5 -> 0, 1.5 -> 2


def test_scale_and_zero_point_get_lsq_gradients():
    x = jnp.array([-3.0, -0.26, 0.0, 0.74, 1.1, 9.0])
    s, z, qmin, qmax = 0.5, 2.0, 0, 7  # clipping range [-1, 2.5]

    def f(scale, zero_point):
        return qz.fake_quant(x, qz.QuantParams(scale, zero_point, bits=3)).sum()

    ds, dz = jax.grad(f, argnums=(0, 1))(jnp.float32(s), jnp.float32(z))
    v = np.asarray(x) / s
    inside = (v + z >= qmin) & (v + z <= qmax)
    expected_ds = np.where(inside, np.round(v) - v, np.where(v + z > qmax, qmax - z, qmin - z))
    expected_dz = np.where(inside, 0.0, -s)
    np.testing.assert_allclose(ds, expected_ds.sum(), rtol=1e-6)
    np.testing.assert_allclose(dz, expected_dz.sum(), rtol=1e-6)
    # stop_gradient on the parameters turns them into constants.
    frozen = jax.grad(lambda sc: qz.fake_quant(x, qz.uniform(jax.lax.stop_gradient(sc), z, 3)).sum())
    assert frozen(jnp.float32(s)) == 0.0


def test_non_finite_inputs_do_not_poison_gradients():
    qp = qz.uniform(0.1, 3.0, bits=4)
    x = jnp.array([jnp.inf, -jnp.inf, 0.3])
    grad_x = jax.grad(lambda v: qz.fake_quant(v, qp).sum())(x)
    np.testing.assert_array_equal(grad_x, [0.0, 0.0, 1.0])
    grad_s = jax.grad(lambda s: qz.fake_quant(x, qz.uniform(s, 3.0, 4)).sum())(jnp.float32(0.1))
    assert np.isfinite(grad_s)
    np.testing.assert_allclose(qz.fake_quant(x, qp), [1.2, -0.3, 0.3], rtol=1e-6)


def test_dtypes():
    qp = qz.uniform(0.5, 1.0, bits=4)
    assert qz.fake_quant(jnp.ones(3, jnp.bfloat16), qp).dtype == jnp.bfloat16
    assert qz.fake_quant(jnp.arange(3), qp).dtype == jnp.float32
    assert qz.quantize(jnp.ones(3, jnp.bfloat16), qp).dtype == jnp.int32
    assert qz.dequantize(jnp.arange(3, dtype=jnp.int8), qp).dtype == jnp.float32


# ----------------------------------------------------------------------------
# Log quantizers.


def _log_data(rng, scale, shape):
    """Softmax-like values: zeros, negatives, underflow, tiny, in-range, above s."""
    n = int(np.prod(shape))
    pool = np.concatenate(
        [
            [0.0, -0.0, -1.0, 1e-38, 1e-30, scale, 2.0 * scale],
            scale * 2.0 ** -rng.uniform(0, 40, size=n),
            scale * rng.uniform(0, 1.5, size=n),
        ]
    ).astype(np.float32)
    return rng.choice(pool, size=shape)


@PROPERTY
@given(shape=shapes, bits=bit_widths, seed=seeds, kind=log_kinds)
def test_log_codes_zero_code_and_half_step_error(shape, bits, seed, kind):
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0 ** rng.uniform(-2, 0.5))
    qp = qz.log2(scale, bits) if kind == "log2" else qz.log_sqrt2(scale, bits)
    x = _log_data(rng, scale, shape)
    codes = np.asarray(qz.quantize(x, qp))
    xhat = np.asarray(qz.fake_quant(x, qp))
    zero_code = 2**bits - 1

    assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() <= zero_code
    assert qz.code_range(qp) == (0, zero_code)
    np.testing.assert_array_equal(xhat, np.asarray(qz.dequantize(codes, qp)))
    np.testing.assert_array_equal(qz.quantize(xhat, qp), codes)  # encode/decode pair
    # x <= 0 gets the reserved code and dequantizes to exactly 0.
    assert np.all(codes[x <= 0] == zero_code) and np.all(xhat[x <= 0] == 0.0)
    # Exactly the zero code gives 0, and nothing is negative.
    np.testing.assert_array_equal(xhat == 0.0, codes == zero_code)
    assert np.all(xhat >= 0)
    # Values at or above s clip to code 0.
    assert np.all(codes[x >= scale] == 0)
    # Within the levels, the error is at most half a step in the log domain.
    step = 1.0 if kind == "log2" else 0.5
    smallest = scale * 2.0 ** (-step * (zero_code - 1))
    mid = (x > 0) & (x < scale) & (codes != zero_code)
    log_err = np.abs(np.log2(xhat[mid].astype(np.float64) / x[mid]))
    assert np.all(log_err <= step / 2 + 1e-5)
    # Below the smallest level by more than half a step: underflow to exact 0.
    deep = (x > 0) & (x < smallest * 2.0 ** (-step / 2 - 1e-3))
    assert np.all(xhat[deep] == 0.0)


@PROPERTY
@given(bits=bit_widths, seed=seeds, kind=log_kinds)
def test_log_codes_round_trip_including_zero_code(bits, seed, kind):
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0 ** rng.uniform(-2, 1))
    qp = qz.log2(scale, bits) if kind == "log2" else qz.log_sqrt2(scale, bits)
    zero_code = 2**bits - 1
    codes = np.arange(0, zero_code + 1, dtype=np.int32)
    values = np.asarray(qz.dequantize(codes, qp))
    back = np.asarray(qz.quantize(values, qp))
    assert values[-1] == 0.0 and back[-1] == zero_code
    representable = values > 0
    np.testing.assert_array_equal(back[representable], codes[representable])
    # Only levels with 2^-e or s·2^-e below float32's normal range fall back to 0.
    exponent = (codes if kind == "log2" else (codes + 1) // 2)[:-1]
    threshold = min(127, 126 + math.floor(math.log2(scale)))
    assert np.all(exponent[~representable[:-1]] >= threshold)
    np.testing.assert_array_equal(back[~representable], zero_code)


@pytest.mark.parametrize("kind, bits, scale", [("log2", 8, 0.7), ("log2", 8, 1.0), ("log_sqrt2", 8, 0.3)])
def test_log_underflow_edge_keeps_encode_decode_consistent(kind, bits, scale):
    qp = qz.log2(scale, bits) if kind == "log2" else qz.log_sqrt2(scale, bits)
    x = np.float32(2.0) ** -np.linspace(100, 130, 3001).astype(np.float32)  # past 2^-126
    codes = qz.quantize(x, qp)
    xhat = qz.fake_quant(x, qp)
    np.testing.assert_array_equal(qz.quantize(xhat, qp), codes)
    np.testing.assert_array_equal(np.asarray(xhat) == 0, np.asarray(codes) == 2**bits - 1)


def test_log_values_are_exact_powers():
    qp = qz.log_sqrt2(1.0, bits=6)
    values = np.asarray(qz.dequantize(np.arange(63), qp), dtype=np.float64)
    np.testing.assert_allclose(values[:-1], 2.0 ** (-np.arange(62) / 2), rtol=1e-7)
    np.testing.assert_array_equal(values[::2][:-1], 2.0 ** -np.arange(31.0))  # even codes
    qp2 = qz.log2(0.75, bits=5)
    np.testing.assert_array_equal(qz.dequantize(np.arange(31), qp2), 0.75 * 2.0 ** -np.arange(31.0))


@pytest.mark.parametrize("kind", ["log2", "log_sqrt2"])
def test_log_identity_ste_is_finite_at_zero(kind):
    qp = qz.log2(1.0, 4) if kind == "log2" else qz.log_sqrt2(1.0, 4)
    x = jnp.array([0.0, -0.5, 1e-30, 0.3, 2.0])
    value, grad = jax.value_and_grad(lambda v: qz.fake_quant(v, qp).sum())(x)
    assert np.isfinite(value)
    np.testing.assert_array_equal(grad, np.ones(5))
    # Also forward-mode.
    _, tangent = jax.jvp(lambda v: qz.fake_quant(v, qp), (x,), (jnp.ones(5),))
    np.testing.assert_array_equal(tangent, np.ones(5))


# ----------------------------------------------------------------------------
# log√2 -> log2 reparameterization.


def test_log_sqrt2_to_log2_terms():
    codes = np.arange(40)
    exponent, odd = qz.log_sqrt2_to_log2_terms(codes)
    np.testing.assert_array_equal(exponent, np.ceil(codes / 2))
    np.testing.assert_array_equal(odd, codes % 2 == 1)
    rebuilt = 2.0 ** -np.asarray(exponent, np.float64) * np.where(odd, math.sqrt(2), 1.0)
    np.testing.assert_allclose(rebuilt, 2.0 ** (-codes / 2), rtol=1e-12)


def _attention(rng, batch, i, j):
    logits = rng.standard_normal(batch + (i, j)) * 3.0
    causal = np.tril(np.ones((i, j), bool), k=j - i)
    logits = np.where(causal, logits, -np.inf)
    return np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)


@pytest.mark.parametrize("attn_bits", [3, 4, 8])
@pytest.mark.parametrize("v_axis", [None, -1])
def test_log_sqrt2_matmul_shift_add_matches_fake_quant(attn_bits, v_axis):
    rng = np.random.default_rng(attn_bits)
    attn = _attention(rng, (2, 3), 5, 7)
    v = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    qa = qz.log_sqrt2(float(attn.max()), attn_bits)
    if v_axis is None:
        qv = qz.uniform(0.05, 7.0, bits=4)
    else:
        qv = qz.uniform(np.array([0.05, 0.1, 0.02, 0.3]), np.array([7.0, 8.0, 3.0, 9.0]), 4, -1)
    attn_codes, v_codes = qz.quantize(attn, qa), qz.quantize(v, qv)
    assert np.any(np.asarray(attn_codes) == 2**attn_bits - 1)  # the causal zeros

    got = np.asarray(qz.log_sqrt2_matmul_shift_add(attn_codes, qa, v_codes, qv))
    want = np.einsum(
        "...ij,...jd->...id",
        np.asarray(qz.fake_quant(attn, qa), np.float64),
        np.asarray(qz.fake_quant(v, qv), np.float64),
    )
    assert got.shape == want.shape == (2, 3, 5, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_log_sqrt2_matmul_shift_add_rejects_wrong_quantizers():
    qa, qv = qz.log_sqrt2(1.0, 4), qz.uniform(0.1, 8.0, 4)
    codes = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="log_sqrt2"):
        qz.log_sqrt2_matmul_shift_add(codes, qv, codes.T, qv)
    with pytest.raises(ValueError, match="'uniform' or 'symmetric'"):
        qz.log_sqrt2_matmul_shift_add(codes, qa, codes.T, qa)
    per_row = qz.uniform(jnp.ones(3), jnp.zeros(3), 4, axis=0)
    with pytest.raises(ValueError, match="last axis"):
        qz.log_sqrt2_matmul_shift_add(codes, qa, codes.T, per_row)


# ----------------------------------------------------------------------------
# jit and non-jit agree.


class JitTest(chex.TestCase):
    """Each public op gives identical results with and without jax.jit."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((3, 4, 5)).astype(np.float32) * 2
        self.attn = _attention(rng, (2,), 4, 6)
        self.v = rng.standard_normal((2, 6, 3)).astype(np.float32)
        self.quantizers = [
            qz.uniform(0.1, 9.0, bits=4),
            qz.uniform(np.linspace(0.05, 0.2, 5), np.arange(5.0), bits=3, axis=-1),
            qz.symmetric(np.linspace(0.01, 0.1, 4), bits=8, axis=1),
            qz.log2(1.5, bits=3),
            qz.log_sqrt2(2.0, bits=4),
        ]

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_dequantize_fake_quant(self):
        for qp in self.quantizers:
            with self.subTest(kind=qp.kind, axis=qp.axis):
                codes = self.variant(qz.quantize)(self.x, qp)
                np.testing.assert_array_equal(codes, qz.quantize(self.x, qp))
                np.testing.assert_array_equal(self.variant(qz.dequantize)(codes, qp), qz.dequantize(codes, qp))
                np.testing.assert_array_equal(self.variant(qz.fake_quant)(self.x, qp), qz.fake_quant(self.x, qp))

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients(self):
        for qp in self.quantizers:
            with self.subTest(kind=qp.kind, axis=qp.axis):
                loss = lambda x, q: jnp.sum(qz.fake_quant(x, q) ** 2)  # noqa: E731
                got = self.variant(jax.grad(loss, argnums=(0, 1)))(self.x, qp)
                want = jax.grad(loss, argnums=(0, 1))(self.x, qp)
                chex.assert_trees_all_close(got, want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_constructors_accept_traced_scales(self):
        def fq(scale):
            return qz.fake_quant(self.x, qz.uniform(scale, 3.0, bits=4))

        np.testing.assert_array_equal(self.variant(fq)(jnp.float32(0.2)), fq(0.2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_shift_add(self):
        qa, qv = qz.log_sqrt2(1.0, bits=4), qz.uniform(0.05, 8.0, bits=4)
        a_codes, v_codes = qz.quantize(self.attn, qa), qz.quantize(self.v, qv)
        got = self.variant(qz.log_sqrt2_matmul_shift_add)(a_codes, qa, v_codes, qv)
        want = qz.log_sqrt2_matmul_shift_add(a_codes, qa, v_codes, qv)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# The pytree and validation.


def test_quant_params_is_a_frozen_pytree():
    qp = qz.uniform(np.array([0.1, 0.2]), np.array([1.0, 2.0]), bits=4, axis=0)
    leaves, treedef = jax.tree_util.tree_flatten(qp)
    assert len(leaves) == 2
    doubled = jax.tree_util.tree_map(lambda a: a * 2, qp)
    assert (doubled.bits, doubled.kind, doubled.axis) == (4, "uniform", 0)
    np.testing.assert_allclose(doubled.scale, [0.2, 0.4])
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.bits, rebuilt.kind, rebuilt.axis) == (qp.bits, qp.kind, qp.axis)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qp.bits = 8  # type: ignore[misc]
    assert qz.uniform(0.1, 2.0, 4).zero_point.dtype == jnp.float32


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_bad_bits(bits):
    for make in (
        lambda: qz.uniform(1.0, 0.0, bits),
        lambda: qz.symmetric(1.0, bits),
        lambda: qz.log2(1.0, bits),
        lambda: qz.log_sqrt2(1.0, bits),
    ):
        with pytest.raises(ValueError, match=f"bits must be in 2..16, got {bits}"):
            make()
    with pytest.raises(ValueError, match="bits must be in 2..16"):
        qz.quantize(jnp.ones(3), qz.QuantParams(jnp.float32(1.0), jnp.float32(0.0), bits=bits))


@pytest.mark.parametrize("bits", [4.0, True, "8"])
def test_bits_must_be_an_int(bits):
    with pytest.raises(ValueError, match="bits must be an int"):
        qz.uniform(1.0, 0.0, bits)


@pytest.mark.parametrize(
    "scale, match",
    [
        (0.0, "scale must be positive"),
        (-0.5, "scale must be positive"),
        (np.array([0.1, -0.1]), "scale must be positive"),
        (np.nan, "scale must be finite"),
        (np.inf, "scale must be finite"),
    ],
)
def test_bad_scale(scale, match):
    axis = None if np.ndim(scale) == 0 else 0
    with pytest.raises(ValueError, match=match):
        qz.uniform(scale, np.zeros(np.shape(scale)), 8, axis=axis)
    with pytest.raises(ValueError, match=match):
        qz.symmetric(scale, 8, axis=axis)
    if axis is None:
        with pytest.raises(ValueError, match=match):
            qz.log_sqrt2(scale, 4)


def test_bad_shapes_and_kinds():
    with pytest.raises(ValueError, match=r"zero_point shape \(3,\) does not match scale shape \(2,\)"):
        qz.uniform(np.ones(2), np.zeros(3), 8, axis=0)
    with pytest.raises(ValueError, match="needs a scalar scale"):
        qz.uniform(np.ones(2), np.zeros(2), 8)
    with pytest.raises(ValueError, match=r"needs a scale of shape \(C,\)"):
        qz.symmetric(1.0, 8, axis=0)
    qp = qz.uniform(np.ones(3), np.zeros(3), 8, axis=-1)
    with pytest.raises(ValueError, match=r"per-channel scale has shape \(3,\) but x.shape\[-1\] = 4"):
        qz.quantize(jnp.ones((2, 4)), qp)
    with pytest.raises(ValueError, match="per-channel scale"):
        qz.fake_quant(jnp.ones((2, 4)), qp)
    with pytest.raises(ValueError, match="out of range"):
        qz.quantize(jnp.ones(3), qz.uniform(np.ones(3), np.zeros(3), 8, axis=2))
    bad_kind = qz.QuantParams(jnp.float32(1.0), jnp.float32(0.0), bits=4, kind="log3")
    for op in (qz.quantize, qz.dequantize, qz.fake_quant):
        with pytest.raises(ValueError, match="unknown quantizer kind 'log3'"):
            op(jnp.ones(3), bad_kind)
    with pytest.raises(ValueError, match="unknown quantizer kind"):
        qz.code_range(bad_kind)


# ----------------------------------------------------------------------------
# Log quantizers of base 2^(1/k) ("log_root"), docs/method.md "Softmax".


@pytest.mark.parametrize("root", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("bits", [4, 8])
def test_log_root_codes_and_levels(root, bits):
    scale = 0.8
    qp = qz.log_root(scale, bits, root)
    assert (qp.kind, qp.root, qz.log_root_of(qp), qz.code_range(qp)) == ("log_root", root, root, (0, 2**bits - 1))
    x = np.concatenate([np.geomspace(1e-6, 1.2, 3001), [0.0, 2.0]]).astype(np.float32)
    codes = np.asarray(qz.quantize(x, qp))
    zero = 2**bits - 1
    # q = clip(round(-k·log2(x/s)), 0, ...), with the top code for 0 and underflow
    want = np.maximum(np.round(-root * np.log2(x[:-2].astype(np.float64) / scale)), 0)
    want = np.where(want < zero, want, zero)
    near_tie = np.abs(-root * np.log2(x[:-2] / scale) % 1 - 0.5) < 1e-3  # float32 vs float64 log2
    np.testing.assert_array_equal(codes[:-2][~near_tie], want[~near_tie])
    assert codes[-2] == zero and codes[-1] == 0
    # levels s·2^(-q/k), the zero code exactly 0
    levels = np.arange(2**bits)
    values = np.asarray(qz.dequantize(levels, qp), np.float64)
    expected = scale * 2.0 ** (-levels[:-1] / root)
    normal = expected >= np.finfo(np.float32).tiny  # levels below float32's normal range are 0
    np.testing.assert_allclose(values[:-1][normal], expected[normal], rtol=2e-7)
    assert values[-1] == 0.0 and np.all(values[:-1][~normal] == 0.0)
    # monotone: codes non-increasing and values non-decreasing in x
    order = np.argsort(x)
    assert np.all(np.diff(codes[order][codes[order] != zero]) <= 0)
    assert np.all(np.diff(np.asarray(qz.fake_quant(x[order], qp))) >= 0)
    # codes round-trip through their levels
    normal = values[:-1] >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(np.asarray(qz.quantize(values[:-1][normal], qp)), levels[:-1][normal])


@pytest.mark.parametrize("bits", [3, 4, 8, 16])
def test_log_root_2_is_log_sqrt2_and_1_is_log2_bit_for_bit(bits):
    rng = np.random.default_rng(bits)
    x = np.concatenate([rng.random(4000) ** 12, np.zeros(5), rng.random(5) + 1]).astype(np.float32)
    for old, root in ((qz.log_sqrt2, 2), (qz.log2, 1)):
        a, b = old(0.7, bits), qz.log_root(0.7, bits, root)
        np.testing.assert_array_equal(qz.quantize(x, a), qz.quantize(x, b))
        np.testing.assert_array_equal(qz.fake_quant(x, a), qz.fake_quant(x, b))
        codes = np.arange(2**bits)
        np.testing.assert_array_equal(qz.dequantize(codes, a), qz.dequantize(codes, b))
        np.testing.assert_array_equal(jax.grad(lambda v, q=b: qz.fake_quant(v, q).sum())(x), np.ones_like(x))


def test_log_root_resolution_grows_with_k():
    # on softmax-like values the error falls with k while the range still covers them
    x = _attention(np.random.default_rng(0), (4,), 16, 16).reshape(-1)
    errors = [float(np.mean((np.asarray(qz.fake_quant(x, qz.log_root(1.0, 8, k))) - x) ** 2)) for k in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_log_root_to_log2_terms():
    for root in (1, 2, 3, 5):
        codes = np.arange(60)
        e, j = qz.log_root_to_log2_terms(codes, root)
        np.testing.assert_array_equal(e, np.ceil(codes / root))
        assert np.all((0 <= np.asarray(j)) & (np.asarray(j) < root))
        c = np.asarray(qz.log_root_multipliers(root), np.float64)
        assert c[0] == 1.0 and np.all((1 <= c) & (c < 2))
        np.testing.assert_allclose(
            2.0 ** -np.asarray(e, np.float64) * c[np.asarray(j)], 2.0 ** (-codes / root), rtol=1e-7
        )
    e2, odd = qz.log_sqrt2_to_log2_terms(np.arange(9))
    np.testing.assert_array_equal(
        (np.asarray(e2), np.asarray(odd)),
        (np.asarray(qz.log_root_to_log2_terms(np.arange(9), 2)[0]), np.arange(9) % 2 == 1),
    )


@pytest.mark.parametrize("root", [1, 2, 3, 4])
def test_log_root_matmul_shift_add_matches_fake_quant(root):
    rng = np.random.default_rng(root)
    attn = _attention(rng, (2, 3), 5, 9)
    v = rng.standard_normal((2, 3, 9, 4)).astype(np.float32)
    qa, qv = qz.log_root(float(attn.max()), 8, root), qz.uniform(0.05, 7.0, bits=8)
    got = np.asarray(qz.log_root_matmul_shift_add(qz.quantize(attn, qa), qa, qz.quantize(v, qv), qv))
    want = np.einsum(
        "...ij,...jd->...id",
        np.asarray(qz.fake_quant(attn, qa), np.float64),
        np.asarray(qz.fake_quant(v, qv), np.float64),
    )
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)


def test_log_root_validation():
    for root in (0, -1, qz.MAX_ROOT + 1, True, 2.0, None):
        with pytest.raises(ValueError, match="root must be an int"):
            qz.log_root(1.0, 4, root)
    with pytest.raises(ValueError, match="only 'log_root' quantizers have a root"):
        qz.quantize(jnp.ones(3), qz.log_sqrt2(1.0, 4).replace(root=3))
    with pytest.raises(ValueError, match="root must be an int"):
        qz.quantize(jnp.ones(3), qz.log_root(1.0, 4, 3).replace(root=None))
    with pytest.raises(ValueError, match="not a log quantizer"):
        qz.log_root_of(qz.uniform(1.0, 0.0, 4))


def test_default_log_root_per_bits():
    roots = [qz.default_log_root(b) for b in range(2, 17)]
    assert all(1 <= r <= qz.MAX_ROOT for r in roots) and roots == sorted(roots)
    # the range 2^-((2^b - 2)/k) of the default stays wide enough for softmax tails: from
    # 6 bits on, below uniform attention over 4096 keys
    assert all((2**b - 2) / r >= 7 for b, r in zip(range(4, 17), roots[2:]))
    assert all((2**b - 2) / r >= 12 for b, r in zip(range(6, 17), roots[4:]))
    assert (qz.default_log_root(4), qz.default_log_root(6), qz.default_log_root(8)) == (2, 4, 12)  # measured


@pytest.mark.parametrize("bits", [4, 6, 8, 16])
def test_presets_resolve_the_softmax_root_from_the_bits(bits):
    import flax.linen as nn

    import repquant_jax as repquant
    from repquant_jax._src import inspect as rq_inspect
    from repquant_jax._src import presets
    from repquant_jax._src.specs import resolve_specs

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q, k, v = (nn.Dense(8, name=n)(x) for n in "qkv")
            return nn.softmax(q @ k.swapaxes(-1, -2), axis=-1) @ v

    x = jnp.ones((2, 4, 8))
    model = Attn()
    params = model.init(jax.random.key(0), x)
    plan = rq_inspect.inspect(lambda p, x: model.apply(p, x), params, x)
    (softmax,) = [p.name for p in plan.points if p.source == "softmax"]
    # roots 1 and 2 are named by their kinds, log2 and log√2
    kinds = {1: ("log2", None), 2: ("log_sqrt2", None)}
    root = qz.default_log_root(bits)
    for preset in (presets.repq_vit, presets.repquant):
        spec = resolve_specs(plan, preset(bits, bits))[softmax]
        assert (spec.kind, spec.log_root) == kinds.get(root, ("log_root", root))
        three = resolve_specs(plan, preset(bits, bits, softmax_log_root=3))[softmax]
        assert (three.kind, three.log_root) == ("log_root", 3)
        old = resolve_specs(plan, preset(bits, bits, softmax_quantizer="log_sqrt2"))[softmax]
        assert (old.kind, old.log_root) == ("log_sqrt2", None)
        # a rule's bits choose the root
        rule = repquant.Rule(pattern=f"^{re.escape(softmax)}$", bits=16)
        assert resolve_specs(plan, preset(bits, bits, rules=(rule,)))[softmax].log_root == qz.default_log_root(16)
