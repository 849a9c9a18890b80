"""RepQuant's learned steps on small problems: each improves its objective or backs off."""

import jax.numpy as jnp
import numpy as np
import pytest

import repquant_jax as repquant
from repquant_jax._src import calibration as cal
from repquant_jax._src import quantizers as qz
from repquant_jax._src.learn import adaround_matrix, learn_dual_clipping


def _matmul_problem(rows: int, k: int = 32, n: int = 16, seed: int = 0, correlated: bool = True):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
    x = rng.normal(size=(rows, k))
    if correlated:  # as real activations are; for white inputs nearest rounding is optimal
        x = rng.normal(size=(rows, 4)) @ rng.normal(size=(4, k)) + 0.1 * x
    x_fp = jnp.asarray(x.astype(np.float32))
    x_q = x_fp + 0.01 * jnp.asarray(rng.normal(size=(rows, k)).astype(np.float32))  # upstream error
    return w, cal.search_uniform(w, bits=3, axis=1), x_q, x_fp


def _grid_codes(w_on_grid, qp):
    return np.asarray(qz.quantize(w_on_grid, qp))


def test_adaround_lowers_the_output_error_and_stays_on_the_grid():
    w, qp, x_q, x_fp = _matmul_problem(rows=512)
    new, before, after = adaround_matrix(w, qp, x_q, x_fp, repquant.Reconstruction(steps=200))
    assert after < 0.9 * before
    # The result is exactly representable: fake quant leaves it unchanged.
    np.testing.assert_array_equal(np.asarray(qz.fake_quant(new, qp)), np.asarray(new))
    # Each weight is rounded down or up, never further.
    codes, exact = _grid_codes(new, qp), np.asarray(w / qp.scale + qp.zero_point)
    assert np.all((codes == np.floor(exact)) | (codes == np.ceil(exact)) | (codes == 0) | (codes == 7))


def test_adaround_falls_back_to_nearest_rounding_when_it_overfits():
    # White inputs, where nearest rounding is optimal in expectation, and 4 training rows
    # for 32x16 rounding choices: the learned rounding fits them but not fresh rows, and
    # the held-out check must reject it (column by column).
    w, qp, x_q, x_fp = _matmul_problem(rows=4 + 2048, correlated=False)
    train, held = slice(0, 4), slice(4, None)
    config = repquant.Reconstruction(steps=300, learning_rate=0.1, reg_weight=1e-4)
    fitted, b_train, a_train = adaround_matrix(w, qp, x_q[train], x_fp[train], config)
    assert a_train < b_train  # it did fit the training rows
    new, before, after = adaround_matrix(w, qp, x_q[train], x_fp[train], config, (x_q[held], x_fp[held]))
    assert after <= before
    nearest, overfit = np.asarray(qz.fake_quant(w, qp)), np.asarray(fitted)
    assert np.all(np.asarray(new) == nearest, axis=0).mean() > 0.5  # most columns fall back

    def held_out_error(m):
        return float(jnp.sum((x_q[held] @ m - x_fp[held] @ w) ** 2) / (x_q.shape[0] - 4))

    assert held_out_error(jnp.asarray(new)) == pytest.approx(after, rel=1e-5)
    assert held_out_error(jnp.asarray(new)) < held_out_error(jnp.asarray(overfit))


def test_learned_steps_refuse_bad_settings():
    with pytest.raises(ValueError, match="held_out"):
        repquant.Reconstruction(held_out=1.0)
    with pytest.raises(ValueError, match="batches_per_step"):
        repquant.Reconstruction(batches_per_step=0)
    with pytest.raises(ValueError, match="DualClipping.held_out"):
        repquant.DualClipping(held_out=0.0)
    with pytest.raises(ValueError, match="DualClipping.accept"):
        repquant.DualClipping(accept="block")


def test_dual_clipping_lowers_the_next_matmul_error_on_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype(np.float32)
    x[:, :2] *= 8.0  # two wide channels
    x[rng.random(x.shape) < 0.002] *= 6.0  # rare spikes that the range search half-covers
    w = rng.normal(size=(16, 8)).astype(np.float32)
    qp = cal.search_uniform(x, bits=3, axis=-1).replace(axis=-1)
    wq = cal.search_uniform(w, bits=4, axis=1)
    learned, before, after = learn_dual_clipping(x, qp, [jnp.asarray(w)], [wq], repquant.DualClipping(steps=100))
    assert after < 0.9 * before
    assert learned.scale.shape == qp.scale.shape and learned.axis == -1
    assert not np.array_equal(np.asarray(learned.scale), np.asarray(qp.scale))
    # The reported loss is the learned quantizer's.
    xq = qz.fake_quant(jnp.asarray(x), learned)
    err = float(jnp.mean((xq @ jnp.asarray(qz.fake_quant(w, wq)) - x @ w) ** 2) / (jnp.mean((x @ w) ** 2) + 1e-12))
    assert err == pytest.approx(after, rel=1e-4)
