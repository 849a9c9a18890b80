"""GPTQ-style closed-form weight rounding (`repquant_jax._src.gptq`)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import repquant_jax as repquant
from repquant_jax._src import gptq
from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import GPTQ
from repquant_jax._src.learn import adaround_matrix


def _layer(seed: int = 0, k: int = 48, n: int = 24, rows: int = 1024, bits: int = 4):
    """A random ``[k, n]`` weight with a per-column min-max quantizer, and inputs whose
    features are strongly correlated (a random mixing plus a shared component)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(rows, k)) @ mixing + 0.5 * rng.normal(size=(rows, 1))
    w = rng.normal(size=(k, n)) * 0.1
    lo, hi = w.min(0), w.max(0)
    scale = (hi - lo) / (2**bits - 1)
    qp = qz.uniform(scale, np.round(-lo / scale), bits, axis=1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), qp


def _hessian(x):
    return 2.0 * x.T @ x / x.shape[0]


def _reference_gptq(w, h, qp, damping=0.01):
    """GPTQ as published (one row at a time, no blocks), in float64 NumPy."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    h[np.diag_indices_from(h)] += damping * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    s = np.broadcast_to(np.asarray(qp.scale, np.float64), (w.shape[1],))
    z = np.broadcast_to(np.asarray(qp.zero_point, np.float64), (w.shape[1],))
    qmin, qmax = qz.code_range(qp)
    codes = np.zeros_like(w)
    for i in range(w.shape[0]):
        codes[i] = np.clip(np.round(w[i] / s) + z, qmin, qmax)
        err = (w[i] - (codes[i] - z) * s) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    return codes


def _output_error(x, w, qp, codes):
    return float(jnp.linalg.norm(x @ w - x @ gptq.dequantize_codes(codes, qp)))


def test_gptq_lowers_the_output_error_of_correlated_inputs():
    x, w, qp = _layer()
    codes, damping = gptq.matrix_codes(w, _hessian(x), qp, GPTQ())
    assert codes is not None and damping == 0.01
    nearest = gptq.nearest_codes(w, qp)
    assert _output_error(x, w, qp, codes) < 0.85 * _output_error(x, w, qp, nearest)
    qmin, qmax = qz.code_range(qp)
    chex.assert_shape(codes, w.shape)
    chex.assert_trees_all_equal(codes, jnp.round(codes))  # integer codes
    assert qmin <= float(codes.min()) and float(codes.max()) <= qmax
    # the dequantized weight is on the (unchanged) grid: fake quantization keeps it
    on_grid = gptq.dequantize_codes(codes, qp)
    chex.assert_trees_all_close(qz.fake_quant(on_grid, qp), on_grid, atol=0, rtol=0)
    chex.assert_trees_all_equal(qz.quantize(on_grid, qp).astype(jnp.float32), codes)


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_blocks_match_the_row_by_row_algorithm(block_size):
    x, w, qp = _layer(seed=1, k=40, n=12)
    codes, _ = gptq.matrix_codes(w, _hessian(x), qp, GPTQ(block_size=block_size))
    reference = _reference_gptq(w, _hessian(x), qp)
    # float32 vs float64 may flip a code whose value sits on a rounding boundary
    assert np.mean(np.asarray(codes) != reference) < 0.01


def test_identity_hessian_is_nearest_rounding():
    _, w, qp = _layer(seed=2)
    nearest = gptq.nearest_codes(w, qp)
    codes, _ = gptq.matrix_codes(w, jnp.eye(w.shape[0]), qp, GPTQ())
    chex.assert_trees_all_equal(codes, nearest)
    # whitened inputs: X = c·I gives a diagonal H, so no error is fed to other rows
    x = 3.0 * jnp.eye(w.shape[0])
    codes, _ = gptq.matrix_codes(w, _hessian(x), qp, GPTQ(act_order=True))
    chex.assert_trees_all_equal(codes, nearest)


def test_dead_inputs_and_act_order():
    x, w, qp = _layer(seed=3)
    x = x.at[:, 5].set(0.0)  # an input channel that is always zero
    codes, _ = gptq.matrix_codes(w, _hessian(x), qp, GPTQ(act_order=True))
    assert bool(jnp.all(jnp.isfinite(codes)))
    assert _output_error(x, w, qp, codes) < _output_error(x, w, qp, gptq.nearest_codes(w, qp))


def test_per_tensor_and_symmetric_quantizers():
    x, w, _ = _layer(seed=4)
    for qp in (qz.uniform(0.02, 8.0, 4), qz.symmetric(jnp.abs(w).max(0) / 7, 4, axis=1)):
        codes, _ = gptq.matrix_codes(w, _hessian(x), qp, GPTQ())
        qmin, qmax = qz.code_range(qp)
        assert qmin <= float(codes.min()) and float(codes.max()) <= qmax
        assert _output_error(x, w, qp, codes) < _output_error(x, w, qp, gptq.nearest_codes(w, qp))


def test_float_target_corrects_the_input_error():
    x, w, qp = _layer(seed=5)
    x_q = x + 0.05 * jax.random.normal(jax.random.key(0), x.shape)  # the input as quantized upstream
    h = _hessian(x_q)
    cross = 2.0 * x_q.T @ (x - x_q) / x.shape[0]
    plain, _ = gptq.matrix_codes(w, h, qp, GPTQ())
    target = gptq.float_target(w, h, cross, jnp.float32(0.01))
    corrected, _ = gptq.matrix_codes(target, h, qp, GPTQ())

    def error(codes):
        return float(jnp.linalg.norm(x_q @ gptq.dequantize_codes(codes, qp) - x @ w))

    assert error(corrected) < error(plain)


def test_start_rounding_reproduces_the_codes():
    x, w, qp = _layer(seed=6)
    codes, _ = gptq.matrix_codes(w, _hessian(x), qp, GPTQ())
    base, offset = gptq.start_rounding(w, qp, codes)
    assert set(np.unique(np.asarray(offset))) <= {0.0, 1.0}
    qmin, qmax = qz.code_range(qp)
    s, z = jnp.asarray(qp.scale), jnp.asarray(qp.zero_point)
    chex.assert_trees_all_equal(jnp.clip(base + offset + z, qmin, qmax), codes)
    # the other choice is the neighbour towards the float weight
    other = base + (1 - offset)
    assert bool(jnp.all(jnp.abs(other - w / s) <= jnp.abs(codes - z - w / s) + 1))


def test_identical_shapes_compile_once():
    x, w, qp = _layer(seed=7, k=24, n=20)
    gptq.matrix_codes(w, _hessian(x), qp, GPTQ(block_size=5))
    before = gptq.compile_count()
    for seed in range(3):
        x, w, qp = _layer(seed=seed + 8, k=24, n=20)
        gptq.matrix_codes(w, _hessian(x), qp, GPTQ(block_size=5, damping=0.01 * (seed + 1)))
    assert gptq.compile_count() == before


# --------------------------------------------------------------------------------------
# In the pipeline


def _model(layers: int = 2, seed: int = 0):
    """The zoo's plain pre-LN transformer, with correlated input features."""
    key = jax.random.key(seed)
    params = {f"layer_{i}": zoo._block_params(jax.random.fold_in(key, i), 16, 64) for i in range(layers)}
    kf, kh = jax.random.split(jax.random.fold_in(key, 1000))
    params["final_ln"] = zoo._ln_params(kf, 16)
    params["head"] = zoo._dense_init(kh, 16, 10)
    mixing = jax.random.normal(jax.random.key(seed + 5), (16, 16)) / 4.0

    def draw(k, batch=16):
        z = jax.random.normal(jax.random.key(k), (batch, 8, 16))
        return z @ mixing + 0.5 * z[..., :1]

    def apply_fn(p, x):
        return zoo._plain_forward(p, x, num_layers=layers, heads=2)

    return apply_fn, params, draw


def _held_out_error(apply_fn, params, qparams, qapply, x):
    ref = apply_fn(params, x)
    return float(jnp.linalg.norm(qapply(qparams, x) - ref) / jnp.linalg.norm(ref))


@pytest.fixture(scope="module")
def pipeline():
    """The same model and calibration data quantized with nearest and GPTQ rounding."""
    apply_fn, params, draw = _model(layers=2)
    calib = [draw(i) for i in range(3)]
    base = repquant.transform(apply_fn, params, calib, repquant.presets.repq_vit(3, 8))
    before = gptq.compile_count()
    rounded = repquant.transform(apply_fn, params, calib, repquant.presets.repq_vit(3, 8, weight_rounding="gptq"))
    return dict(
        apply_fn=apply_fn,
        params=params,
        calib=calib,
        held=draw(100, batch=64),
        base=base,
        gptq=rounded,
        compiled=gptq.compile_count() - before,
    )


def test_transform_with_gptq_lowers_held_out_error(pipeline):
    p = pipeline
    (base, qa_base), (q, qa) = p["base"], p["gptq"]
    error = _held_out_error(p["apply_fn"], p["params"], q, qa, p["held"])
    assert error < _held_out_error(p["apply_fn"], p["params"], base, qa_base, p["held"])
    # the scales are GPTQ's input: unchanged
    chex.assert_trees_all_equal(q.weights, base.weights)
    notes = [s.note for s in qa.report.sites if s.role == "weight"]
    assert len(notes) == 13 and all(n.startswith("GPTQ rounding") for n in notes)
    # wq/wk/wv/wo, fc1, fc2 and the head: 4 distinct shapes for 13 sites (fewer if
    # another test compiled them already)
    assert pipeline["compiled"] <= 4


def test_gptq_weights_freeze_and_export(pipeline):
    q, qa = pipeline["gptq"]
    x = pipeline["calib"][0]
    out = qa(q, x)
    assert bool(jnp.all(jnp.isfinite(out)))
    frozen = repquant.freeze(qa, q, x)
    chex.assert_trees_all_close(qa(frozen, x), out, atol=1e-6, rtol=1e-6)
    exported = repquant.export(q, qa, x)
    chex.assert_trees_all_close(repquant.integer_apply(exported, x), out, atol=1e-3, rtol=1e-3)


def test_shared_and_tied_kernels_keep_nearest_rounding_with_a_note():
    m = zoo.shared_kernel()
    q, qa = repquant.transform(
        m.apply_fn, m.params, [m.inputs], repquant.presets.repq_vit(4, 4, weight_rounding="gptq")
    )
    weights = [s for s in qa.report.sites if s.role == "weight"]
    shared = [s for s in weights if "shared or tied" in s.note]
    assert shared and all(s.note.startswith("nearest rounding") for s in shared)
    assert bool(jnp.all(jnp.isfinite(qa(q, *m.inputs))))


def test_adaround_starts_from_gptq_and_keeps_the_best_per_column():
    x, w, qp = _layer(seed=9, k=32, n=16, rows=512)
    x_q = x + 0.05 * jax.random.normal(jax.random.key(1), x.shape)
    codes, _ = gptq.matrix_codes(w, _hessian(x_q), qp, GPTQ())
    on_grid = gptq.dequantize_codes(codes, qp)
    nearest = qz.fake_quant(w, qp)

    def column_errors(m):
        return jnp.sum((x_q @ m - x @ w) ** 2, axis=0) / x.shape[0]

    # no steps: the learned rounding is the start, so every column is GPTQ's or nearest's,
    # whichever is better
    chosen, before, after = adaround_matrix(w, qp, x_q, x, repquant.Reconstruction(steps=0), start=codes)
    best = jnp.where(column_errors(on_grid) < column_errors(nearest), on_grid, nearest)
    chex.assert_trees_all_close(chosen, best, atol=1e-6)
    assert after <= before
    # learning from the start never ends worse than the start on the judged rows
    learned, _, after_learning = adaround_matrix(w, qp, x_q, x, repquant.Reconstruction(steps=30), start=codes)
    assert after_learning <= after + 1e-6
    chex.assert_trees_all_close(qz.fake_quant(learned, qp), learned, atol=1e-6)


def test_gptq_as_the_start_of_block_reconstruction():
    apply_fn, params, draw = _model(layers=1)
    calib = [draw(i) for i in range(2)]
    rc = repquant.Reconstruction(granularity="block", steps=10, eval_every=5, held_out=0.0)
    config = repquant.presets.repq_vit(3, 8, weight_rounding="gptq")
    g, qg = repquant.transform(apply_fn, params, calib, config)
    r, qr = repquant.transform(apply_fn, params, calib, dataclasses.replace(config, reconstruction=rc))
    x = jnp.concatenate(calib)
    assert bool(jnp.all(jnp.isfinite(qr(r, x))))
    # judged on the calibration data it trained on, the start (GPTQ) is the fallback
    assert _held_out_error(apply_fn, params, r, qr, x) <= _held_out_error(apply_fn, params, g, qg, x) * 1.02
    frozen = repquant.freeze(qr, r, calib[0])
    chex.assert_trees_all_close(qr(frozen, calib[0]), qr(r, calib[0]), atol=1e-6, rtol=1e-6)
