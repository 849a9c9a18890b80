"""Exactness of the norm fold, the branch fold and the log√2 → log2 form (docs/method.md)."""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import repquant_jax as repquant
from repquant_jax._src import quantizers as qz
from repquant_jax._src.state import QParams

P = conftest.zoo_presets
FLOAT_WEIGHTS = (repquant.Rule(pattern=".", target="weight", skip=True),)


def _calib(model, n=2):
    return [
        tuple(jax.tree_util.tree_map(lambda a, i=i: a * (1.0 + 0.1 * i) if a.dtype.kind == "f" else a, model.inputs))
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "builder", ["linen_vit_block", "scan_vit", "vit_with_head", "plain_jax_transformer", "nnx_vit_block"]
)
def test_folded_params_reproduce_the_float_model(builder):
    model = zoo.ALL[builder]()
    qparams, _ = repquant.transform(model.apply_fn, model.params, _calib(model), P.repq_vit(4, 4), verbose=False)
    assert not qparams.input_offsets and not qparams.output_offsets
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), model.params, qparams.params)
    assert any(jax.tree_util.tree_leaves(changed)), "the fold changed nothing"
    np.testing.assert_allclose(
        model.apply_fn(qparams.params, *model.inputs), model.apply_fn(model.params, *model.inputs), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("rmsnorm", ["bias", "symmetric"])
def test_rmsnorm_fold_reproduces_the_float_model_with_quantizers_off(rmsnorm):
    model = zoo.llama_block()
    qparams, qapply = repquant.transform(
        model.apply_fn, model.params, _calib(model), P.repq_vit(4, 4, rmsnorm=rmsnorm), verbose=False
    )
    if rmsnorm == "bias":
        assert qparams.input_offsets and qparams.output_offsets  # no β and no Dense bias
    else:
        assert not qparams.input_offsets and not qparams.output_offsets
    disabled = QParams(qparams.params, {}, {}, qparams.input_offsets, qparams.output_offsets)
    np.testing.assert_allclose(
        qapply(disabled, *model.inputs), model.apply_fn(model.params, *model.inputs), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("builder", ["linen_vit_block", "llama_block", "scan_vit"])
@pytest.mark.parametrize("bits", [4, 6])
def test_per_channel_and_folded_per_tensor_models_agree(builder, bits):
    model = zoo.ALL[builder](batch=4, seq=8)
    calib = _calib(model)
    outs = []
    for fold in (False, True):
        config = P.repq_vit(bits, bits, fold_norms=fold, rules=FLOAT_WEIGHTS)
        qparams, qapply = repquant.transform(model.apply_fn, model.params, calib, config, verbose=False)
        granularity = {qp.axis is None for name, qp in qparams.activations.items() if name.endswith(":input")}
        assert granularity == ({True} if fold else {True, False})
        outs.append(np.asarray(qapply(qparams, *model.inputs)))
    scale = np.abs(outs[0]).max()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * scale)


def test_float_mean_zero_point_mode_is_close_but_not_exact():
    model = zoo.linen_vit_block(batch=4, seq=8)
    calib = _calib(model)
    ref_q, ref_apply = repquant.transform(
        model.apply_fn, model.params, calib, P.repq_vit(4, 4, fold_norms=False, rules=FLOAT_WEIGHTS), verbose=False
    )
    ref = np.asarray(ref_apply(ref_q, *model.inputs))
    q, qa = repquant.transform(
        model.apply_fn,
        model.params,
        calib,
        P.repq_vit(4, 4, exact_zero_point=False, rules=FLOAT_WEIGHTS),
        verbose=False,
    )
    rel = np.linalg.norm(np.asarray(qa(q, *model.inputs)) - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.2


def test_log_sqrt2_fake_quant_equals_two_accumulator_shift_add_on_real_attention():
    model = zoo.linen_vit_block(batch=4, seq=8)
    config = P.repq_vit(4, 4, softmax_quantizer="log_sqrt2")  # (the preset's default root at 4 bits is 3)
    qparams, qapply = repquant.transform(model.apply_fn, model.params, _calib(model), config, verbose=False)
    plan = qapply.report
    name = next(s.name for s in plan.sites if s.role == "activation/softmax")
    qp_attn = qparams.activations[name]
    assert qp_attn.kind == "log_sqrt2"
    logits = jax.random.normal(jax.random.key(0), (4, 2, 8, 8)) * 3
    attn = jax.nn.softmax(logits, axis=-1)
    v = jax.random.normal(jax.random.key(1), (4, 2, 8, 16))
    qp_v = qz.uniform(jnp.float32(0.05), jnp.float32(7.0), 4)
    fake = qz.fake_quant(attn, qp_attn) @ qz.fake_quant(v, qp_v)
    shift_add = qz.log_sqrt2_matmul_shift_add(qz.quantize(attn, qp_attn), qp_attn, qz.quantize(v, qp_v), qp_v)
    np.testing.assert_allclose(shift_add, fake, rtol=1e-5, atol=1e-6)


def _point_values(graph, plan, qparams, inputs, names):
    """The values at activation points of the folded float model (offsets and input
    scales on, quantizers off), before the affine in front of their quantizer."""
    from repquant_jax._src.hooks import quant_hooks
    from repquant_jax._src.interpret import evaluate

    hooks = quant_hooks(graph, plan, qparams, quantize=False)
    values = dict(hooks.values)
    seen = {}

    def recorder(name, hook):
        def record(values):
            seen[name] = values[0]
            return hook(values) if hook is not None else values

        return record

    for n in names:
        vid = plan.point(n).value_id
        values[vid] = recorder(n, values.get(vid))
    evaluate(graph, qparams.params, inputs, hooks.replace(values=values))
    return seen


@pytest.mark.parametrize("builder", ["bert_block", "plain_jax_post_ln"])
def test_branch_fold_keeps_the_per_channel_codes_and_outputs(builder):
    # Weights in float, activations at 4 bits: the branch-folded model (per-tensor
    # quantizers, a per-channel multiply-add on the matmul branch) must compute what the
    # per-channel calibration-time model computes.
    m = zoo.ALL[builder]()
    q_pc, qa_pc = repquant.transform(
        m.apply_fn, m.params, [m.inputs], P.repq_vit(4, 4, rules=FLOAT_WEIGHTS, unfoldable="per_channel"), verbose=False
    )
    q_br, qa_br = repquant.transform(
        m.apply_fn, m.params, [m.inputs], P.repq_vit(4, 4, rules=FLOAT_WEIGHTS), verbose=False
    )
    graph, plan = qa_br.analysis(q_br.params, m.inputs)
    branch = [g.point for g in plan.groups if not g.foldable and g.branch_foldable]
    assert branch and set(q_br.input_scales) == set(branch)
    x_pc = _point_values(graph, plan, q_pc, m.inputs, branch)
    x_br = _point_values(graph, plan, q_br, m.inputs, branch)
    for name in branch:
        assert q_pc.activations[name].axis == -1 and q_br.activations[name].axis is None
        codes_pc = qz.quantize(x_pc[name], q_pc.activations[name])
        shifted = x_br[name] * q_br.input_scales[name] + q_br.input_offsets[name]
        codes_br = qz.quantize(shifted, q_br.activations[name])
        np.testing.assert_array_equal(np.asarray(codes_br), np.asarray(codes_pc))
    out_pc, out_br = qa_pc(q_pc, *m.inputs), qa_br(q_br, *m.inputs)
    assert float(jnp.linalg.norm(out_br - out_pc) / jnp.linalg.norm(out_pc)) <= 1e-5


@pytest.mark.parametrize("rmsnorm", ["bias", "symmetric"])
def test_branch_fold_of_a_post_rmsnorm_reached_through_a_reshape(rmsnorm):
    # An RMSNorm whose output feeds a residual and, through a reshape, a DenseGeneral
    # kernel [C, heads, head_dim]: the kernel half folds with either RMSNorm option.
    dim = 16
    key = jax.random.key(0)
    params = {
        "scale": jax.random.uniform(jax.random.fold_in(key, 0), (dim,), minval=0.2, maxval=3.0),
        "w": jax.random.normal(jax.random.fold_in(key, 1), (dim, 2, 8)) / 4,
    }
    x = jax.random.normal(jax.random.fold_in(key, 2), (3, 6, dim))

    def apply_fn(p, x):
        h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * p["scale"]
        y = jnp.einsum("btc,chd->bthd", h.reshape(3, 6, dim), p["w"]).reshape(3, 6, dim)
        return h + y

    plan = repquant.inspect(apply_fn, params, x)
    (group,) = plan.groups
    assert group.kind == "rmsnorm" and not group.foldable and group.branch_foldable
    outs = []
    for unfoldable in ("per_channel", "branch"):
        config = P.repq_vit(4, 4, rules=FLOAT_WEIGHTS, rmsnorm=rmsnorm, unfoldable=unfoldable)
        q, qa = repquant.transform(apply_fn, params, [(x,)], config, verbose=False)
        outs.append(qa(q, x))
    assert "branch fold" in qa.report.site(group.point).note
    assert float(jnp.linalg.norm(outs[1] - outs[0]) / jnp.linalg.norm(outs[0])) <= 1e-5
