"""Weight sharing, masking and derived weights: every rewrite stays exact.

The patterns are in ``zoo.SHARING``. With every quantizer nearly lossless (16 bits,
min-max, uniform softmax) and every legal fold applied, the quantized model must equal
the float one; an illegal fold (into a tied embedding, a shared kernel, a block applied
twice) would move it by 10-70%.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from thirdparty import harness

import repquant_jax as repquant
from repquant_jax._src import sites


def _transform(m, config):
    return repquant.transform(m.apply_fn, m.params, [m.inputs], config, verbose=False)


@pytest.mark.parametrize("builder", sorted(zoo.SHARING))
def test_sharing_patterns_reproduce_the_float_model_at_16_bits(builder):
    m = zoo.SHARING[builder]()
    q, qa = _transform(m, harness.w16_config())
    error = harness.relative_error(qa(q, *m.inputs), m.apply_fn(m.params, *m.inputs))
    assert error <= 1e-4, (builder, error)
    folded = [s for s in qa.report.sites if s.note.startswith("folded")]
    assert len(folded) == m.expected["foldable"]


def test_sites_reading_one_weight_value_each_get_a_quantizer_and_a_rule():
    m = zoo.scan_closed_over()  # both iterations read the same (closed-over) kernels
    rule = repquant.Rule(pattern=r"^wq\[1\]$", bits=8)
    q, qa = _transform(m, repquant.presets.repq_vit(4, 4, min_rows_per_channel=1, rules=(rule,)))
    names = [w.name for w in qa.analysis(m.params, m.inputs)[1].weights]
    assert len(names) == 12 and set(q.weights) == set(names)
    assert q.weights["wq[1]"].bits == 8 and q.weights["wq[0]"].bits == 4
    assert all(qa.report.site(n).bits > 0 for n in names)


def test_a_softmax_with_where_and_a_head_mask_keeps_its_log_quantizer():
    m = zoo.masked_attention()
    plan = repquant.inspect(m.apply_fn, m.params, *m.inputs)
    (softmax,) = plan.softmaxes
    (_, attn_v) = plan.matmuls
    # jnp.einsum may put the probabilities on either side of the dot_general
    assert softmax.point in (attn_v.lhs_point, attn_v.rhs_point)
    assert plan.point(softmax.point).source == "softmax"
    q, _ = _transform(m, repquant.presets.repq_vit(4, 4, min_rows_per_channel=1))
    assert q.activations[softmax.point].kind == "log_sqrt2"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_is_found_when_its_exp_is_summed_in_float32(dtype):
    x = jnp.ones((2, 4, 8), dtype)
    p = {"w": jnp.ones((8, 8), dtype)}

    def apply_fn(p, x):
        scores = jnp.einsum("bqd,bkd->bqk", x @ p["w"], x)
        return jax.nn.softmax(scores).astype(dtype) @ x

    plan = repquant.inspect(apply_fn, p, x)
    assert len(plan.softmaxes) == 1 and plan.point(plan.softmaxes[0].point).source == "softmax"


def test_derived_weights_are_quantized_as_weights_per_output_channel():
    m = zoo.derived_weights()
    plan = repquant.inspect(m.apply_fn, m.params, *m.inputs)
    assert [w.derived for w in plan.weights] == [True, True]
    assert any("more than layout ops" in n for n in plan.notes)
    q, qa = _transform(m, repquant.presets.repq_vit(4, 8, min_rows_per_channel=1))
    for w in plan.weights:
        assert q.weights[w.name].bits == 4 and q.weights[w.name].axis == 1
    frozen = repquant.freeze(qa, q, *m.inputs)  # derived weights keep their quantizers
    assert set(frozen.weights) == set(q.weights)


def test_freeze_keeps_the_quantizer_of_a_kernel_read_outside_matmuls():
    m = zoo.tied_lm_head()
    q, qa = _transform(m, repquant.presets.repq_vit(4, 4, min_rows_per_channel=1))
    frozen = repquant.freeze(qa, q, *m.inputs)
    assert set(frozen.weights) == {"wte"}  # the table the lookup reads stays float
    np.testing.assert_array_equal(np.asarray(frozen.params["wte"]), np.asarray(q.params["wte"]))
    np.testing.assert_allclose(np.asarray(qa(frozen, *m.inputs)), np.asarray(qa(q, *m.inputs)), rtol=1e-6, atol=1e-6)


def test_a_fold_that_changes_the_model_is_undone_and_reported(monkeypatch):
    # Pretend the analysis missed the residual of a post-LN block: the numerical check
    # must catch the fold, undo it and say so.
    m = zoo.bert_block()
    original = sites._Analysis._fold_consumers

    def blind(self, *args):
        consumers, _, matmul_reason = original(self, *args)
        return consumers, "", matmul_reason

    monkeypatch.setattr(sites._Analysis, "_fold_consumers", blind)
    plan = repquant.inspect(m.apply_fn, m.params, *m.inputs)
    assert all(g.foldable for g in plan.groups)
    with pytest.warns(UserWarning, match="changed the float model"):
        q, qa = _transform(m, harness.w16_config())
    notes = [s.note for s in qa.report.sites if "numerical check" in s.note]
    assert len(notes) == len(plan.groups)
    assert harness.relative_error(qa(q, *m.inputs), m.apply_fn(m.params, *m.inputs)) <= 1e-4


def test_legal_folds_pass_the_check_silently():
    m = zoo.plain_jax_transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, qa = _transform(m, repquant.presets.repq_vit(4, 4, min_rows_per_channel=1))
    assert sum(s.note.startswith("folded") for s in qa.report.sites) == m.expected["foldable"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_non_finite_half_precision_params_are_rejected_by_name(dtype):
    m = zoo.one_plus_scale_rmsnorm()
    bad = jax.tree_util.tree_map(lambda a: a.astype(dtype), m.params)
    bad["w"]["bias"] = bad["w"]["bias"].at[3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"\['w'\]\['bias'\].*NaN or Inf"):
        repquant.transform(m.apply_fn, bad, [m.inputs], repquant.presets.repq_vit(), verbose=False)


def test_log_quantizers_are_rejected_on_weights():
    m = zoo.one_plus_scale_rmsnorm()
    rule = repquant.Rule(pattern="w", kind="log2")
    with pytest.raises(ValueError, match="log2 quantizer on weight site 'w'"):
        _transform(m, repquant.presets.repq_vit(rules=(rule,)))


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "search"])
def test_log_quantizers_are_rejected_on_signed_activations(calibration):
    m = zoo.one_plus_scale_rmsnorm()
    rule = repquant.Rule(pattern="w:input", kind="log_sqrt2", target="activation")
    config = repquant.presets.repq_vit(activation_calibration=calibration, rules=(rule,))
    with pytest.raises(ValueError, match="needs values >= 0"):
        _transform(m, config)
