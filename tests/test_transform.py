"""The public transform: API shape, purity, determinism, rules, errors, fine-tuning."""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zoo

import repquant_jax as repquant

P = conftest.zoo_presets


@pytest.fixture(scope="module")
def vit_block():
    return zoo.linen_vit_block(batch=4, seq=8)


def _calib(model, n=2):
    return [tuple(a * (1.0 + 0.1 * i) for a in model.inputs) for i in range(n)]


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("preset", ["minmax", "percentile", "repq_vit", "repquant"])
def test_every_preset_runs_and_w8a8_is_close(vit_block, preset):
    m = vit_block
    qparams, qapply = repquant.transform(m.apply_fn, m.params, _calib(m), getattr(P, preset)(8, 8), verbose=False)
    assert isinstance(qparams, repquant.QParams)
    assert jax.tree_util.tree_structure(qparams.params) == jax.tree_util.tree_structure(m.params)
    out = qapply(qparams, *m.inputs)
    assert _rel(out, m.apply_fn(m.params, *m.inputs)) < 0.05
    assert len(qparams.weights) == 6 and len(qparams.activations) == 8


def test_w4a4_is_worse_than_w8a8(vit_block):
    m = vit_block
    ref = m.apply_fn(m.params, *m.inputs)
    errs = {}
    for bits in (4, 8):
        q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(bits, bits), verbose=False)
        errs[bits] = _rel(qa(q, *m.inputs), ref)
    assert errs[8] < errs[4]


def test_calib_batches_may_be_a_generator_of_single_arrays(vit_block):
    m = vit_block
    q, qa = repquant.transform(
        m.apply_fn, m.params, (x for x in [m.inputs[0], m.inputs[0] * 2]), P.repq_vit(), verbose=False
    )
    assert qa(q, m.inputs[0]).shape == m.inputs[0].shape


def test_same_seed_gives_bitwise_identical_qparams_and_inputs_are_untouched():
    m = zoo.linen_vit_block(batch=4, seq=8)
    params_np = jax.tree_util.tree_map(lambda a: np.array(a), m.params)
    for leaf in jax.tree_util.tree_leaves(params_np):
        leaf.setflags(write=False)
    before = jax.tree_util.tree_map(np.copy, params_np)
    batch = np.array(m.inputs[0])
    batch.setflags(write=False)
    config = P.repquant(
        4, 4, dual_clipping=repquant.DualClipping(steps=10), reconstruction=repquant.Reconstruction(steps=10)
    )
    runs = [repquant.transform(m.apply_fn, params_np, [batch], config, verbose=False)[0] for _ in range(2)]
    a, b = (jax.tree_util.tree_leaves(r) for r in runs)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    for x, y in zip(jax.tree_util.tree_leaves(params_np), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(x, y)


def test_qparams_share_the_leaves_the_transform_left_unchanged():
    # Copying only what the folds edit keeps a deep model's untouched leaves out of
    # the transform's memory; the user's arrays stay as they were.
    m = zoo.linen_vit_block(batch=4, seq=8)
    before = [np.array(x) for x in jax.tree_util.tree_leaves(m.params)]
    qparams, _ = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4), verbose=False)
    users, ours = jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(qparams.params)
    shared = [q is u for q, u in zip(ours, users)]
    assert any(shared) and not all(shared)
    for q, u, b, is_shared in zip(ours, users, before, shared):
        np.testing.assert_array_equal(u, b)
        assert is_shared == np.array_equal(q, b)  # a new array only where the values changed


@pytest.mark.parametrize("preset", ["minmax", "percentile", "repq_vit", "repquant"])
def test_qparams_are_bitwise_identical_with_and_without_jit(preset):
    m = zoo.linen_vit_block(batch=4, seq=8)
    small = {"dual_clipping": repquant.DualClipping(steps=5), "reconstruction": repquant.Reconstruction(steps=5)}
    config = getattr(P, preset)(4, 4, **(small if preset == "repquant" else {}))
    jitted = repquant.transform(m.apply_fn, m.params, [m.inputs], config, verbose=False)[0]
    with jax.disable_jit():
        eager = repquant.transform(m.apply_fn, m.params, [m.inputs], config, verbose=False)[0]
    a, b = (jax.tree_util.tree_leaves(r) for r in (jitted, eager))
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_qapply_retraces_for_new_shapes_and_checks_the_params_structure(vit_block):
    m = vit_block
    q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(), verbose=False)
    big = zoo.linen_vit_block(batch=3, seq=11)
    assert qa(q, *big.inputs).shape == big.inputs[0].shape
    bad = q.replace(params={"params": {}})
    with pytest.raises(TypeError, match="tree structure"):
        qa(bad, *m.inputs)
    with pytest.raises(TypeError, match="QParams"):
        qa(m.params, *m.inputs)


def test_rules_set_bits_skip_and_warn_when_unused(vit_block):
    m = vit_block
    rules = (
        repquant.Rule(pattern=r"mlp/fc2$", target="weight", bits=8),
        repquant.Rule(pattern=r"softmax|->.*:rhs", target="activation", skip=True),
        repquant.Rule(pattern=r"no_such_site"),
    )
    with pytest.warns(UserWarning, match="no_such_site"):
        q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4, rules=rules), verbose=False)
    assert q.weights["mlp/fc2"].bits == 8 and q.weights["mlp/fc1"].bits == 4
    assert not any(name.endswith(":rhs") for name in q.activations)
    assert any("no_such_site" in n for n in qa.report.notes)


def test_report_covers_every_site(vit_block):
    m = vit_block
    q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4), verbose=False)
    report = qa.report
    assert {s.name for s in report.sites} == set(q.weights) | set(q.activations)
    ln = report.site("attn/query:input")
    assert ln.note.startswith("folded") and ln.quantizer == "uniform per_tensor" and ln.relative_mse > 0
    softmax = next(s for s in report.sites if s.role == "activation/softmax")
    assert softmax.quantizer.startswith("log_sqrt2")
    assert "rel. MSE" in str(report)
    stages = [name for name, _ in report.stage_seconds]
    assert stages[:2] == ["trace", "calibrate"] and stages[-1] == "report" and len(set(stages)) == len(stages)
    assert all(seconds >= 0 for _, seconds in report.stage_seconds)


def test_post_ln_policies():
    m = zoo.bert_block()
    with pytest.raises(ValueError, match="cannot be folded"):
        repquant.transform(m.apply_fn, m.params, [m.inputs], P.repq_vit(unfoldable="error"), verbose=False)
    q, qa = repquant.transform(m.apply_fn, m.params, [m.inputs], P.repq_vit(unfoldable="per_channel"), verbose=False)
    assert q.activations["mlp/fc1:input"].axis == -1
    assert "kept per channel" in qa.report.site("mlp/fc1:input").note
    q, qa = repquant.transform(m.apply_fn, m.params, [m.inputs], P.repq_vit(unfoldable="per_tensor"), verbose=False)
    assert q.activations["mlp/fc1:input"].axis is None and not q.input_scales
    assert "not foldable" in qa.report.site("mlp/fc1:input").note
    q, qa = repquant.transform(m.apply_fn, m.params, [m.inputs], P.repq_vit(), verbose=False)  # "branch"
    assert q.activations["mlp/fc1:input"].axis is None
    assert q.input_scales["mlp/fc1:input"].shape == (32,)
    assert "branch fold" in qa.report.site("mlp/fc1:input").note


def test_fine_tuning_qparams_through_qapply_lowers_a_loss(vit_block):
    m = vit_block
    q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4), verbose=False)
    target = m.apply_fn(m.params, *m.inputs)

    def loss(params):
        return jnp.mean((qa(q.replace(params=params), *m.inputs) - target) ** 2)

    opt = optax.adam(1e-3)
    params, state = q.params, opt.init(q.params)
    losses = []
    for _ in range(3):
        value, grads = jax.value_and_grad(loss)(params)
        assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(value))
    assert float(loss(params)) < losses[0]


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "empty"),
        ([(jnp.full((4, 8, 32), jnp.nan),)], "NaN"),
        ([(jnp.ones((4, 8, 32)),), (jnp.ones((4, 9, 32)),)], "same shapes"),
        (None, "None"),
    ],
)
def test_bad_calibration_data(vit_block, batches, message):
    m = vit_block
    with pytest.raises(ValueError, match=message):
        repquant.transform(m.apply_fn, m.params, batches, P.repq_vit(), verbose=False)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: P.repq_vit(w_bits=1), "w_bits"),
        (lambda: P.repq_vit(a_bits=17), "a_bits"),
        (lambda: P.repq_vit(softmax_quantizer="log3"), "softmax_quantizer"),
        (lambda: repquant.Rule(pattern="(", bits=4), "regex"),
        (lambda: repquant.Rule(pattern="x", bits=40), "bits"),
    ],
)
def test_bad_config(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_nan_params_are_rejected(vit_block):
    m = vit_block
    bad = jax.tree_util.tree_map(lambda a: a, m.params)
    bad["params"]["mlp"]["fc1"]["bias"] = bad["params"]["mlp"]["fc1"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match="fc1.*NaN or Inf"):
        repquant.transform(m.apply_fn, bad, _calib(m), P.repq_vit(), verbose=False)


def test_progress_output_can_be_silenced(vit_block, capsys):
    m = vit_block
    repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(), verbose=True)
    assert "[repquant" in capsys.readouterr().out
    repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(), verbose=False)
    assert capsys.readouterr().out == ""


def test_calibration_memory_is_bounded_by_the_config():
    m = zoo.linen_vit_block(batch=2, seq=8)
    cap, chunk = 1024, 2
    n_batches = 100 * chunk
    key = jax.random.key(3)
    stream = (jax.random.normal(jax.random.fold_in(key, i), m.inputs[0].shape) for i in range(n_batches))
    config = P.repq_vit(4, 4, calibration_chunk=chunk, max_calibration_values=cap)
    q, qa = repquant.transform(m.apply_fn, m.params, stream, config, verbose=False)
    acts = [s for s in qa.report.sites if s.values_seen is not None]
    assert acts
    for site in acts:
        assert site.values_kept <= cap, site
        per_batch = int(np.prod(qa.analysis(m.params, m.inputs)[1].point(site.name).shape))
        assert site.values_seen == n_batches * per_batch
    out = qa(q, *m.inputs)
    assert _rel(out, m.apply_fn(m.params, *m.inputs)) < 0.5


def test_streaming_calibration_in_chunks_is_close_to_one_chunk(vit_block):
    m = vit_block
    calib = _calib(m, n=4)
    ref = m.apply_fn(m.params, *m.inputs)
    errors = []
    for chunk in (16, 1):
        q, qa = repquant.transform(
            m.apply_fn, m.params, calib, P.repq_vit(6, 6, calibration_chunk=chunk), verbose=False
        )
        errors.append(_rel(qa(q, *m.inputs), ref))
    assert abs(errors[0] - errors[1]) < 0.5 * errors[0]


def test_log_quantizer_on_signed_values_names_the_site(vit_block):
    m = vit_block
    rule = (repquant.Rule(pattern=r"mlp/fc2:input", kind="log_sqrt2"),)
    with pytest.raises(ValueError, match="mlp/fc2:input"):
        repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4, rules=rule), verbose=False)


def test_qapply_under_jit_and_without_jit_agree(vit_block):
    m = vit_block
    q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4), verbose=False)
    jitted = np.asarray(qa(q, *m.inputs))
    with jax.disable_jit():
        eager = np.asarray(qa(q, *m.inputs))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_frozen_weights_give_identical_outputs(vit_block):
    m = vit_block
    q, qa = repquant.transform(m.apply_fn, m.params, _calib(m), P.repq_vit(4, 4), verbose=False)
    frozen = repquant.freeze(qa, q, *m.inputs)
    assert not frozen.weights and q.weights
    np.testing.assert_array_equal(np.asarray(qa(frozen, *m.inputs)), np.asarray(qa(q, *m.inputs)))


def test_too_few_rows_for_per_channel_falls_back_to_per_tensor_and_says_so():
    m = zoo.linen_vit_block(batch=1, seq=8)  # 8 rows per channel < the default 16
    q, qa = repquant.transform(m.apply_fn, m.params, [m.inputs], repquant.presets.repq_vit(4, 4), verbose=False)
    site = qa.report.site("attn/query:input")
    assert site.quantizer == "uniform per_tensor"
    assert "min_rows_per_channel" in site.note
