"""Integer export: storage format, bytes, integer matmuls matching fake quant, TPU/GPU readiness."""

import math
import re

import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import repquant_jax as repquant
from repquant_jax._src import export as rqe
from repquant_jax._src import quantizers as qz
from repquant_jax._src.fold import weight_matrix

P = conftest.zoo_presets
MODELS = ("linen_vit_block", "llama_block", "bert_block")
BITS = ((8, 8), (4, 8), (4, 4))
_cache: dict = {}


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _setup(name: str, w_bits: int, a_bits: int, **overrides):
    key = (name, w_bits, a_bits, tuple(sorted(overrides.items())))
    if key not in _cache:
        m = getattr(zoo, name)(batch=4, seq=8)
        qparams, qapply = repquant.transform(
            m.apply_fn, m.params, [m.inputs], P.repq_vit(w_bits, a_bits, **overrides), verbose=False
        )
        _cache[key] = (m, qparams, qapply, rqe.export(qparams, qapply, *m.inputs))
    return _cache[key]


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("name", MODELS)
def test_integer_apply_matches_fake_quant(name, w_bits, a_bits):
    m, qparams, qapply, exported = _setup(name, w_bits, a_bits)
    ref = qapply(qparams, *m.inputs)
    out = rqe.integer_apply(exported, *m.inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) < 1e-4
    modes = rqe.matmul_modes(exported, *m.inputs)
    # every weight matmul and q·kᵀ is int8 x int8 -> int32, attn·V is the log2 shift-add
    assert sorted(set(modes.values())) == ["int8", "log2_shift_add"]
    assert list(modes.values()).count("log2_shift_add") == 1
    assert len(modes) == len(qparams.weights) + 2


@pytest.mark.parametrize("name", MODELS)
def test_storage_format(name):
    m, qparams, _, exported = _setup(name, 4, 8)
    # params keep their tree paths; every kernel became a leafless placeholder
    is_dropped = lambda x: isinstance(x, rqe.Dropped)  # noqa: E731
    flat = dict(jax.tree_util.tree_flatten_with_path(exported.params, is_leaf=is_dropped)[0])
    orig = dict(jax.tree_util.tree_flatten_with_path(qparams.params)[0])
    assert flat.keys() == orig.keys()
    for path, leaf in flat.items():
        name_ = jax.tree_util.keystr(path)
        if "kernel" in name_:
            assert is_dropped(leaf) and leaf.shape == orig[path].shape
        else:
            np.testing.assert_array_equal(leaf, orig[path])
    assert set(exported.weights) == set(qparams.weights)
    for site, wc in exported.weights.items():
        assert wc.storage == "packed_int4" and wc.codes.dtype == jnp.int8
        n = qparams.weights[site].scale.shape[0]
        assert wc.codes.shape == ((wc.rows + 1) // 2, n)
        assert wc.scale.dtype == jnp.float32 and wc.scale.shape == (n,)
        assert jnp.issubdtype(wc.zero_point.dtype, jnp.integer)
        codes = wc.int_codes()
        assert codes.dtype == jnp.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_w8_codes_are_int8_and_dequantize_bitwise_to_fake_quant():
    m, qparams, qapply, exported = _setup("linen_vit_block", 8, 8)
    graph, plan = qapply.analysis(qparams.params, m.inputs)
    leaves = jax.tree_util.tree_leaves(qparams.params)
    for w in plan.weights:
        wc = exported.weights[w.name]
        assert wc.storage == "int8" and wc.codes.dtype == jnp.int8 and wc.codes.shape[0] == wc.rows
        view = jnp.asarray(leaves[w.param_index]).reshape(-1)[w.kernel_index]
        matrix = weight_matrix(view, w.contracting)
        np.testing.assert_array_equal(wc.dequantize(), qz.fake_quant(matrix, qparams.weights[w.name]))


def test_int4_native_storage_gives_the_same_result():
    m, qparams, qapply, packed = _setup("llama_block", 4, 8)
    native = rqe.export(qparams, qapply, *m.inputs, int4="native")
    for site, wc in native.weights.items():
        assert wc.storage == "int4" and wc.codes.dtype == jnp.int4
        np.testing.assert_array_equal(wc.int_codes(), packed.weights[site].int_codes())
    # jnp.int4 counts as half a byte, like the packed format
    assert rqe.nbytes(native) == rqe.nbytes(packed)
    assert rqe.matmul_modes(native, *m.inputs) == rqe.matmul_modes(packed, *m.inputs)


@pytest.mark.parametrize("rows", [1, 6, 7])
def test_int4_packing_round_trips(rows):
    codes = np.random.default_rng(rows).integers(-8, 8, size=(rows, 5))
    packed = rqe._pack_int4(codes)
    assert packed.dtype == np.int8 and packed.shape == ((rows + 1) // 2, 5)
    np.testing.assert_array_equal(jax.jit(rqe._unpack_int4, static_argnums=1)(jnp.asarray(packed), rows), codes)


def test_weight_only_fallback_for_per_channel_activations():
    # BERT's post-LN output cannot be folded; kept per channel, fc1 dequantizes on the fly.
    m, qparams, qapply, exported = _setup("bert_block", 4, 8, unfoldable="per_channel")
    modes = rqe.matmul_modes(exported, *m.inputs)
    assert modes["mlp/fc1"] == "weight_only" and modes["mlp/fc2"] == "int8"
    assert _rel(rqe.integer_apply(exported, *m.inputs), qapply(qparams, *m.inputs)) < 1e-4


@pytest.mark.parametrize("name", ["bert_block", "plain_jax_post_ln"])
def test_branch_folded_post_ln_consumers_run_as_int8(name):
    # The default for post-LN norms (unfoldable="branch"): per-tensor codes on the
    # matmul branch, so every consumer of a norm is an int8 x int8 matmul.
    m, qparams, qapply, exported = _setup(name, 8, 8)
    graph, plan = qapply.analysis(qparams.params, m.inputs)
    consumers = [c.site for g in plan.groups for c in g.consumers]
    assert any(not g.foldable for g in plan.groups) and consumers
    modes = rqe.matmul_modes(exported, *m.inputs)
    assert {modes[c] for c in consumers} == {"int8"}
    assert _rel(rqe.integer_apply(exported, *m.inputs), qapply(qparams, *m.inputs)) < 1e-4


def test_mixed_rules_storage_and_modes():
    rules = (
        repquant.Rule(pattern="mlp/fc1$", target="weight", bits=12),  # int16, weight only
        repquant.Rule(pattern="attn/query$", target="weight", kind="symmetric", bits=6),
        repquant.Rule(pattern="attn/key$", target="weight", bits=3),  # packed nibbles
        repquant.Rule(pattern="attn/out$", target="weight", skip=True),  # stays float
        repquant.Rule(pattern="mlp/fc2:input", bits=16),  # too wide for int8 codes
    )
    m, qparams, qapply, exported = _setup("bert_block", 8, 8, rules=rules)
    storage = {k: (w.storage, w.codes.dtype) for k, w in exported.weights.items()}
    assert storage == {
        "attn/query": ("int8", jnp.int8),
        "attn/key": ("packed_int4", jnp.int8),
        "attn/value": ("int8", jnp.int8),
        "mlp/fc1": ("int16", jnp.int16),
        "mlp/fc2": ("int8", jnp.int8),
    }
    assert not np.asarray(exported.weights["attn/query"].zero_point).any()
    assert not isinstance(exported.params["params"]["attn"]["out"]["kernel"], rqe.Dropped)
    modes = rqe.matmul_modes(exported, *m.inputs)
    assert modes["attn/query"] == modes["attn/key"] == "int8"
    assert modes["mlp/fc1"] == modes["mlp/fc2"] == "weight_only" and modes["attn/out"] == "float"
    assert _rel(rqe.integer_apply(exported, *m.inputs), qapply(qparams, *m.inputs)) < 1e-4


def _log_qp(kind: str, scale: float, bits: int, root: int | None = None) -> qz.QuantParams:
    if kind == "log_root":
        return qz.log_root(scale, bits, root)
    return (qz.log_sqrt2 if kind == "log_sqrt2" else qz.log2)(scale, bits)


# (kind, root, bits, tokens, which operand of the dot_general attn is)
LOG_CASES = [
    ("log_sqrt2", None, 8, 197, 0),
    ("log2", None, 4, 20, 0),
    *[("log_root", k, 8, 197, 0) for k in (1, 2, 3, 4)],
    ("log_root", 3, 4, 20, 1),
    ("log_root", 6, 6, 33, 1),
]


@pytest.mark.parametrize("form", ["pow2", "int8_windows"])
@pytest.mark.parametrize("kind,root,bits,length,log_side", LOG_CASES)
def test_log2_shift_add_matches_float_reference(kind, root, bits, length, log_side, form):
    key = jax.random.key(bits + length + (root or 0))
    attn = jax.nn.softmax(3.0 * jax.random.normal(key, (2, 3, 5, length)), axis=-1)
    v = jax.random.normal(jax.random.fold_in(key, 1), (2, 3, length, 16))
    qa = _log_qp(kind, float(attn.max()), bits, root)
    qv = qz.uniform(float(v.max() - v.min()) / 255.0, 131.0, 8)
    a_codes = rqe._to_codes(attn, qa)
    v_codes = rqe._to_codes(v, qv)
    assert a_codes.dtype == jnp.uint8 and v_codes.dtype == jnp.int8
    log_matmul = jax.jit(rqe._LOG_MATMULS[form], static_argnums=(4, 5))
    if log_side == 0:  # attn (b, h, i, j) · V (b, h, j, d)
        out = log_matmul(a_codes, qa, v_codes, qv, 0, (((3,), (2,)), ((0, 1), (0, 1))))
    else:  # V as lhs, as Flax lowers attn·V: out (b, h, d, i)
        out = jnp.swapaxes(log_matmul(a_codes, qa, v_codes, qv, 1, (((2,), (3,)), ((0, 1), (0, 1)))), -1, -2)
    ref = jnp.einsum("bhij,bhjd->bhid", qz.fake_quant(attn, qa), qz.fake_quant(v, qv), precision="highest")
    assert _rel(out, ref) < 1e-6


@pytest.mark.parametrize("root", [1, 2, 3, 4])
@pytest.mark.parametrize("form", ["pow2", "int8_windows"])
def test_integer_apply_log_root_attn_v_matches_fake_quant(root, form):
    m = zoo.linen_vit_block(batch=4, seq=8)
    config = P.repq_vit(8, 8, softmax_quantizer="log_root", softmax_log_root=root)
    qparams, qapply = repquant.transform(m.apply_fn, m.params, [m.inputs], config, verbose=False)
    # (roots 1 and 2 are stored as the kinds log2 and log_sqrt2)
    assert {qz.log_root_of(qp) for qp in qparams.activations.values() if qp.kind.startswith("log")} == {root}
    exported = rqe.export(qparams, qapply, *m.inputs, log_matmul=form)
    assert list(rqe.matmul_modes(exported, *m.inputs).values()).count("log2_shift_add") == 1
    assert _rel(rqe.integer_apply(exported, *m.inputs), qapply(qparams, *m.inputs)) < 1e-5


CUSTOM_CALL = r"custom_call @(\w+)"


def _lowered_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_lowered_programs_have_no_callbacks_or_custom_calls():
    # lowering under an outer jax.jit also shows that integer_apply is jit-able
    m, qparams, qapply, exported = _setup("linen_vit_block", 4, 8)
    texts = {
        "integer_apply": _lowered_text(rqe.integer_apply, exported, *m.inputs),
        "qapply": _lowered_text(lambda q, *x: qapply(q, *x), qparams, *m.inputs),
    }
    for what, text in texts.items():
        assert "callback" not in text, what  # host_callback, pure_callback, io_callback, ...
        assert "custom_call" not in text, (what, set(re.findall(CUSTOM_CALL, text)))
    # the weight and q·kᵀ matmuls really are int8 x int8 -> int32; the one float dot is
    # attn·V's fast form (exact powers of two times V's integer codes), absent with the
    # int8 windows form
    int_dots = re.findall(r"stablehlo.dot_general.*xi8>, tensor<.*xi8>\) -> tensor<.*xi32>", texts["integer_apply"])
    float_dots = re.findall(r"stablehlo.dot_general.*xf32>\) -> tensor<.*xf32>", texts["integer_apply"])
    assert len(int_dots) >= 7 and len(float_dots) == 1
    windows = _lowered_text(rqe.integer_apply, exported.replace(log_matmul="int8_windows"), *m.inputs)
    assert not re.findall(r"stablehlo.dot_general.*xf32>\) -> tensor<.*xf32>", windows)


def test_vit_w4_exported_bytes_at_most_0_15_of_float():
    from repquant_zoo.models import vit

    model = vit.VisionTransformer(vit.vit_tiny_fashion_mnist())
    x = jax.random.uniform(jax.random.key(1), (1, 28, 28, 1))
    params = model.init(jax.random.key(0), x)
    apply_fn = lambda p, x: model.apply(p, x)  # noqa: E731
    # bytes do not depend on the calibration rule: the fast one will do
    qparams, qapply = repquant.transform(apply_fn, params, [x], P.minmax(4, 8), verbose=False)
    exported = rqe.export(qparams, qapply, x)
    report = rqe.bytes_report(exported)
    assert report.float_params == rqe.nbytes(params)
    parts = report.weight_codes + report.weight_quantizers + report.kept_params + report.activation_state
    assert report.total == rqe.nbytes(exported) == parts
    assert report.ratio <= 0.15, report  # measured 0.147
    assert report.weight_codes == sum(int(np.prod(np.shape(k))) for k in _kernels(params)) // 2


def _kernels(params):
    return [
        leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if "kernel" in jax.tree_util.keystr(path)
    ]


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (2, 2), strides=(2, 2), padding="VALID", name="conv")(x)
        return nn.Dense(4, name="head")(nn.gelu(x.reshape(x.shape[0], -1)))


def test_convolution_is_weight_only_and_matches():
    model = _ConvNet()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    params = model.init(jax.random.key(1), x)
    apply_fn = lambda p, x: model.apply(p, x)  # noqa: E731
    qparams, qapply = repquant.transform(apply_fn, params, [x], P.minmax(4, 8), verbose=False)
    exported = rqe.export(qparams, qapply, x)
    assert rqe.matmul_modes(exported, x) == {"conv": "weight_only", "head": "int8"}
    assert _rel(rqe.integer_apply(exported, x), qapply(qparams, x)) < 1e-4


def test_pytree_and_errors():
    m, qparams, qapply, exported = _setup("linen_vit_block", 8, 8)
    leaves, treedef = jax.tree_util.tree_flatten(exported)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), rqe.Exported)
    with pytest.raises(TypeError):
        rqe.export(qparams.params, qapply, *m.inputs)
    with pytest.raises(TypeError):
        rqe.integer_apply(qparams, *m.inputs)
    with pytest.raises(ValueError, match="int4"):
        rqe.export(qparams, qapply, *m.inputs, int4="bytes")
    with pytest.raises(ValueError, match="log_matmul"):
        rqe.export(qparams, qapply, *m.inputs, log_matmul="shifts")
    assert math.isclose(rqe.bytes_report(exported).ratio, rqe.nbytes(exported) / rqe.nbytes(qparams.params))
