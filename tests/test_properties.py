"""Property-based tests over random small transformers (hypothesis): the fold is exact,
log√2 equals its log2 shift-add form, disabled quantizers give the float model."""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repquant_jax as repquant
from repquant_jax._src import quantizers as qz
from repquant_jax._src.state import QParams

P = conftest.zoo_presets
SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _layernorm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def _transformer(dim, heads, layers, seed):
    """A random pre-LN transformer in plain JAX with non-trivial norm parameters."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def dense(n_in, n_out):
        return {
            "kernel": jax.random.normal(next(keys), (n_in, n_out)) / np.sqrt(n_in),
            "bias": 0.1 * jax.random.normal(next(keys), (n_out,)),
        }

    def norm():
        return {
            "scale": 1 + 0.5 * jax.random.uniform(next(keys), (dim,), minval=-1),
            "bias": 0.2 * jax.random.normal(next(keys), (dim,)),
        }

    params = {
        f"layer_{i}": {
            "ln1": norm(),
            "qkv": dense(dim, 3 * dim),
            "out": dense(dim, dim),
            "ln2": norm(),
            "fc1": dense(dim, 2 * dim),
            "fc2": dense(2 * dim, dim),
        }
        for i in range(layers)
    }
    params["final"] = norm()
    params["head"] = dense(dim, 5)

    def apply_fn(p, x):
        b, t, _ = x.shape
        for i in range(layers):
            lp = p[f"layer_{i}"]
            h = _layernorm(lp["ln1"], x) @ lp["qkv"]["kernel"] + lp["qkv"]["bias"]
            q, k, v = (a.reshape(b, t, heads, dim // heads) for a in jnp.split(h, 3, axis=-1))
            attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim // heads), axis=-1)
            x = x + jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, dim) @ lp["out"]["kernel"] + lp["out"]["bias"]
            h = jax.nn.gelu(_layernorm(lp["ln2"], x) @ lp["fc1"]["kernel"] + lp["fc1"]["bias"])
            x = x + h @ lp["fc2"]["kernel"] + lp["fc2"]["bias"]
        return _layernorm(p["final"], x).mean(1) @ p["head"]["kernel"] + p["head"]["bias"]

    return apply_fn, params


models = st.tuples(
    st.sampled_from([8, 16, 24]),
    st.sampled_from([1, 2, 4]),
    st.integers(1, 2),
    st.integers(0, 2**16),
    st.integers(2, 6),
    st.sampled_from([2, 3, 4, 6, 8]),
)


@SETTINGS
@given(models)
def test_fold_is_exact_and_disabled_quantizers_give_the_float_model(args):
    dim, heads, layers, seed, seq, bits = args
    apply_fn, params = _transformer(dim, heads, layers, seed)
    x = jax.random.normal(jax.random.key(seed + 1), (3, seq, dim))
    float_weights = (repquant.Rule(pattern=".", target="weight", skip=True),)
    outs = []
    for fold in (False, True):
        config = P.repq_vit(bits, bits, fold_norms=fold, rules=float_weights)
        qparams, qapply = repquant.transform(apply_fn, params, [x], config, verbose=False)
        outs.append(np.asarray(qapply(qparams, x)))
    scale = np.abs(outs[0]).max() + 1e-6
    assert np.abs(outs[1] - outs[0]).max() <= 1e-4 * scale
    # all quantizers off: the folded params are the float model
    off = QParams(qparams.params, {}, {}, qparams.input_offsets, qparams.output_offsets)
    np.testing.assert_allclose(qapply(off, x), apply_fn(params, x), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(st.integers(2, 8), st.integers(0, 2**16), st.integers(1, 3), st.integers(2, 12), st.integers(1, 8))
def test_log_sqrt2_fake_quant_equals_log2_shift_add(bits, seed, heads, tokens, width):
    key_a, key_v, key_s = jax.random.split(jax.random.key(seed), 3)
    attn = jax.nn.softmax(3 * jax.random.normal(key_a, (2, heads, tokens, tokens)), axis=-1)
    v = jax.random.normal(key_v, (2, heads, tokens, width))
    qp_a = qz.log_sqrt2(jnp.float32(jax.random.uniform(key_s, minval=0.3, maxval=1.0)), bits)
    qp_v = qz.uniform(jnp.float32(0.1), jnp.float32(2 ** (bits - 1)), bits)
    fake = qz.fake_quant(attn, qp_a) @ qz.fake_quant(v, qp_v)
    shift_add = qz.log_sqrt2_matmul_shift_add(qz.quantize(attn, qp_a), qp_a, qz.quantize(v, qp_v), qp_v)
    np.testing.assert_allclose(shift_add, fake, rtol=1e-5, atol=1e-6)
