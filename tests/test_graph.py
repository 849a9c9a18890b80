"""Tracing and inlining (repquant_jax/_src/graph.py) and the identity interpreter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

from repquant_jax._src.graph import UnsupportedGraphError, path_to_str, trace
from repquant_jax._src.interpret import evaluate


@pytest.mark.parametrize("builder", sorted(zoo.ALL))
def test_identity_interpreter_reproduces_apply_fn_under_jit(builder):
    model = zoo.ALL[builder]()
    graph = trace(model.apply_fn, model.params, *model.inputs)
    got = jax.jit(lambda p, *x: evaluate(graph, p, x))(model.params, *model.inputs)
    want = jax.jit(model.apply_fn)(model.params, *model.inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_nested_calls_are_inlined():
    @jax.custom_jvp
    def scaled_tanh(x):
        return jnp.tanh(x) * 2.0

    scaled_tanh.defjvp(lambda primals, tangents: (scaled_tanh(primals[0]), tangents[0]))

    @jax.custom_vjp
    def cube(x):
        return x**3

    cube.defvjp(lambda x: (cube(x), x), lambda x, g: (3 * x**2 * g,))

    def fn(p, x):
        h = jax.jit(lambda a, w: a @ w)(x, p["w1"])
        h = jax.checkpoint(lambda a: scaled_tanh(a) @ p["w2"])(h)
        return cube(h)

    params = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 2)) * 0.2}
    x = jnp.arange(6.0).reshape(2, 3)
    graph = trace(fn, params, x)
    prims = [n.primitive for n in graph.nodes]
    assert prims.count("dot_general") == 2
    assert not {"jit", "pjit", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call"} & set(prims)
    np.testing.assert_allclose(evaluate(graph, params, (x,)), fn(params, x), rtol=1e-6)


def test_scan_is_unrolled_with_per_iteration_names():
    model = zoo.scan_vit()
    graph = trace(model.apply_fn, model.params, *model.inputs)
    assert "scan" not in {n.primitive for n in graph.nodes}
    iterations = {n.iteration for n in graph.nodes if n.primitive == "dot_general"}
    assert iterations == {(), (0,), (1,), (2,)}


def test_while_loop_without_matmul_stays_opaque():
    def fn(p, x):
        x = jax.lax.while_loop(lambda a: a.sum() < 100.0, lambda a: a * 2.0 + 1.0, x)
        return x @ p

    p, x = jnp.ones((3, 2)), jnp.ones((4, 3))
    graph = trace(fn, p, x)
    assert "while" in {n.primitive for n in graph.nodes}
    np.testing.assert_allclose(evaluate(graph, p, (x,)), fn(p, x))


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: jax.lax.while_loop(lambda a: a.sum() < 9.0, lambda a: jnp.tanh(a @ p) + 1.0, x),
        lambda p, x: jax.lax.cond(x.sum() > 0, lambda a: a @ p, lambda a: a, x),
    ],
    ids=["while", "cond"],
)
def test_matmul_inside_control_flow_is_a_clear_error(fn):
    with pytest.raises(UnsupportedGraphError, match="matmul inside"):
        trace(fn, jnp.ones((3, 3)), jnp.ones((2, 3)))


def test_param_paths_and_input_structure():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, scale):
            return nn.Dense(2, name="proj")(x) * scale["s"]

    model = Tiny()
    x = jnp.ones((1, 3))
    variables = model.init(jax.random.key(0), x, {"s": 2.0})
    graph = trace(lambda p, x, s: model.apply(p, x, s), variables, x, {"s": jnp.float32(2.0)})
    assert graph.param_paths == ("params/proj/bias", "params/proj/kernel")
    assert len(graph.input_ids) == 2


def test_path_to_str_drops_nnx_value_attribute():
    path = (jax.tree_util.DictKey("attn"), jax.tree_util.DictKey("kernel"), jax.tree_util.GetAttrKey("value"))
    assert path_to_str(path) == "attn/kernel"
