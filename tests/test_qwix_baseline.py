"""The qwix PTQ baseline adapter (experiments/qwix_baseline.py) on tiny random models.

Errors are relative L2 against the float model. The random BERT keeps its default init
(truncated normal 0.02): its post-LN residual stream dominates every output, so its
errors are small; the ViT's are the informative ones.
"""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("qwix")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import qwix_baseline as qb  # noqa: E402

from repquant_zoo.models import bert, vit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # qwix's nnx.VariableState use

_cache: dict = {}


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _vit():
    if "vit" not in _cache:
        model = vit.VisionTransformer(vit.get_config("vit_tiny_fashion_mnist_p7"))
        calib = [(jax.random.normal(jax.random.key(i), (4, 28, 28, 1)),) for i in (1, 2)]
        x = (jax.random.normal(jax.random.key(9), (4, 28, 28, 1)),)
        variables = jax.jit(model.init)(jax.random.key(0), *x)
        _cache["vit"] = (model, variables, calib, x, jax.jit(model.apply)(variables, *x))
    return _cache["vit"]


def _bert_inputs(key, seq):
    ids = jax.random.randint(key, (4, seq), 1, 100)
    mask = (jnp.arange(seq)[None, :] < jnp.array([seq, seq - 3, seq - 1, seq - 5])[:, None]).astype(jnp.int32)
    return ids * mask, mask


def _bert():
    if "bert" not in _cache:
        cfg = bert.BertConfig(
            vocab_size=100, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, max_position_embeddings=32
        )
        model = bert.BertEncoder(cfg)
        calib = [_bert_inputs(jax.random.key(i), 12) for i in (1, 2)]
        x = _bert_inputs(jax.random.key(9), 9)  # another sequence length than calibration
        variables = jax.jit(model.init)(jax.random.key(0), *x)
        # Unpooled hidden states: the L2-normalised pooled output would hide scale errors.
        ref = jax.jit(lambda v, *a: model.apply(v, *a, pooled=False))(variables, *x)
        _cache["bert"] = (model, variables, calib, x, ref)
    return _cache["bert"]


MODELS = {"vit": _vit, "bert": _bert}
KW = {"vit": {}, "bert": {"pooled": False}}
# BERT is evaluated at another sequence length than it was calibrated at: per-tensor scales.
GRANULARITY = {"vit": "qwix_default", "bert": "per_tensor"}


def _error(name, w_bits, a_bits, static):
    key = (name, w_bits, a_bits, static)
    if key not in _cache:
        model, variables, calib, x, ref = MODELS[name]()
        # Eager static builds skip three compiles (calibration, scale collection, apply).
        apply, notes = qb.qwix_ptq(
            model,
            variables,
            calib,
            w_bits=w_bits,
            a_bits=a_bits,
            static=static,
            static_granularity=GRANULARITY[name],
            jit=not static,
        )
        _cache[key] = (_rel(apply(*x, **KW[name]), ref), notes)
        print(f"{name} W{w_bits}A{a_bits} {'static' if static else 'dynamic'}: rel L2 {_cache[key][0]:.4f}")
    return _cache[key]


@pytest.mark.parametrize("name", ["vit", "bert"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_w8a8_close_to_float(name, static):
    err, notes = _error(name, 8, 8, static)
    # Dynamic: per-token scales. Static: qwix sets a scale to the *mean* of per-row absmax
    # values, so the largest activations are clipped (a few % more on the ViT).
    assert err < (0.03 if not static else 0.08), (err, notes)
    assert not any("excluded" in n for n in notes), notes


@pytest.mark.parametrize("name,static", [("vit", False), ("vit", True), ("bert", False)])
def test_w4a4_worse_than_w8a8(name, static):
    err8, _ = _error(name, 8, 8, static)
    err4, notes = _error(name, 4, 4, static)
    assert err4 > 2 * err8, (err4, err8)
    assert err4 < 1.0, notes  # quantized, not broken
    assert not any("excluded" in n for n in notes), notes  # int4 conv and matmul run (widened on CPU)


def test_w6a6_between():
    err8, err4 = _error("vit", 8, 8, False)[0], _error("vit", 4, 4, False)[0]
    err6, notes = _error("vit", 6, 6, False)
    assert err8 < err6 < err4, (err8, err6, err4)
    assert "int6" in notes[0]


def test_static_notes_record_qwix_workarounds():
    _, notes = _error("vit", 8, 8, True)
    text = "\n".join(notes)
    assert "QtProvider quant_stats" in text and "swaps" in text and "conv_general_qt" in text


class _AttnV(nn.Module):
    """attn·V with probabilities in [0, 1] and V about 100x larger (the swap trap)."""

    @nn.compact
    def __call__(self, x):
        b, n, _ = x.shape
        v = nn.Dense(16, name="value")(x).reshape(b, n, 2, 8) * 100.0
        scores = nn.Dense(2 * n, name="scores")(x).reshape(b, n, 2, n).transpose(0, 2, 1, 3)
        attn = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", attn, v)


def test_static_attention_scales_not_swapped():
    # Through qwix's QtProvider stats, attn would get V's scale (and round to 0) and V attn's
    # (clipped to about ±1), silently with per-tensor scales: relative error near 1.
    # "absmax,2" keeps qwix's mean-of-absmax clipping out of the measurement.
    model = _AttnV()
    calib = [(jax.random.normal(jax.random.key(i), (2, 6, 16)),) for i in (1, 2)]
    variables = model.init(jax.random.key(0), *calib[0])
    apply, _ = qb.qwix_ptq(
        model,
        variables,
        calib,
        w_bits=8,
        a_bits=8,
        static=True,
        static_granularity="per_tensor",
        act_calibration_method="absmax,2",
        jit=False,
    )
    assert _rel(apply(*calib[0]), model.apply(variables, *calib[0])) < 0.1


def test_qwix_qtprovider_swaps_attn_v_stats():
    """The qwix 0.1.8 bug that the adapter avoids; if this fails, qwix fixed it."""
    import qwix

    model = _AttnV()
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    variables = model.init(jax.random.key(0), x)
    rule = dict(
        module_path=".*",
        op_names=("einsum",),
        weight_qtype="int8",
        act_qtype="int8",
        act_static_scale=True,
        act_batch_axes=(0, 1, 2, 3),
    )
    qt = qwix.quantize_model(model, qwix.QtProvider([qwix.QtRule(**rule)]))
    _, new = qt.apply(variables, x, mutable=["quant_stats"])
    stats = new["quant_stats"]
    # The einsum's lhs is the attention (|p| <= 1), but its "lhs" stat is V's (~100x).
    assert float(stats["einsum0_lhs"]["sum_of_absmax"].max()) > 10
    assert float(stats["einsum0_rhs"]["sum_of_absmax"].max()) <= 1


def test_qwix_default_static_needs_calibration_length():
    model, variables, calib, x, _ = _bert()
    apply, _ = qb.qwix_ptq(model, variables, calib[:1], w_bits=8, a_bits=8, static=True)
    assert apply(*calib[0]).shape == (4, 32)
    with pytest.raises(ValueError, match="per_tensor"):
        apply(*x)  # length 9, calibrated at 12


def test_weight_only_leaves_conv_float():
    model, variables, calib, x, ref = _vit()
    apply, notes = qb.qwix_ptq(model, variables, calib[:1], w_bits=8, a_bits=None, static=False)
    assert _rel(apply(*x), ref) < 0.02
    assert any("convs (if any: ViT patch embedding) left in float" in n for n in notes)


def test_widening_int4_is_exact():
    """The CPU workaround (int4 qvalues as int8 in qwix's integer matmul/conv) changes no value."""
    from qwix._src.core import conv_general as qcg
    from qwix._src.core import dot_general as qdg
    from qwix._src.core import qarray

    a, b = jax.random.normal(jax.random.key(2), (5, 64)), jax.random.normal(jax.random.key(3), (64, 8))
    qa = qarray.quantize(a, qarray.HowToQuantize(qtype="int4", channelwise_axes=[0], calibration_method="absmax"))
    qw = qarray.quantize(b, qarray.HowToQuantize(qtype="int4", channelwise_axes=[1], calibration_method="absmax"))
    x, w = jax.random.normal(jax.random.key(0), (2, 14, 14, 1)), jax.random.normal(jax.random.key(1), (7, 7, 1, 4))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    how = lambda lhs: qcg.get_how_to_quantize(
        dimension_numbers=dn,
        for_lhs=lhs,
        qtype="int4",  # noqa: E731
        calibration_method="absmax",
    )
    qx, qk = qarray.quantize(x, how(True)), qarray.quantize(w, how(False))
    assert qa.qvalue.dtype == jnp.int4
    with qb._widened_sub_byte():
        dot = qdg.dot_general(qa, qw, (((1,), (0,)), ((), ())))
        conv = qcg.conv_general_dilated(qx, qk, (7, 7), "VALID", dimension_numbers=dn)
    deq = qarray.dequantize
    assert jnp.allclose(dot, deq(qa) @ deq(qw), atol=1e-5)
    ref = jax.lax.conv_general_dilated(deq(qx), deq(qk), (7, 7), "VALID", dimension_numbers=dn)
    assert jnp.allclose(conv, ref, atol=1e-4)


def test_supported_bits():
    sup = qb.supported_bits()
    assert set(sup) == {(4, 4), (6, 6), (8, 8)}
    assert sup[(8, 8)] and sup[(4, 4)]
    assert qb.qwix_qtype(6) == "int6"  # qwix 0.1.8: synthetic int6 in an int8 container


@pytest.mark.parametrize("w_bits,a_bits", [(16, 8), (8, 12), (1, 8), (8, 0)])
def test_unsupported_bits_raise(w_bits, a_bits):
    model, variables, calib, _, _ = _vit()
    with pytest.raises(qb.UnsupportedBitsError, match="bit"):
        qb.qwix_ptq(model, variables, calib, w_bits=w_bits, a_bits=a_bits, static=False)


def test_static_needs_activation_bits():
    model, variables, calib, _, _ = _vit()
    with pytest.raises(ValueError, match="a_bits"):
        qb.qwix_ptq(model, variables, calib, w_bits=8, a_bits=None, static=True)
