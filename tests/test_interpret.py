"""Hooks of the interpreter (repquant_jax/_src/interpret.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import zoo

from repquant_jax._src.graph import trace
from repquant_jax._src.interpret import Hooks, evaluate, evaluate_batches
from repquant_jax._src.sites import analyze


def _post_ln():
    class PostLN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(name="ln")(x)
            return nn.Dense(8, name="fc")(h) + h  # LN output feeds a matmul and a residual

    model = PostLN()
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    return model, model.init(jax.random.key(0), x), x


def test_hook_changes_only_what_matmuls_read():
    model, variables, x = _post_ln()
    graph = trace(lambda p, x: model.apply(p, x), variables, x)
    plan = analyze(graph)
    point = plan.point("fc:input")
    out = evaluate(graph, variables, (x,), Hooks(values={point.value_id: lambda vs: [v * 2.0 for v in vs]}))
    h = nn.LayerNorm().apply({"params": variables["params"]["ln"]}, x)
    fc = variables["params"]["fc"]
    want = (2.0 * h) @ fc["kernel"] + fc["bias"] + h
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_weight_hook_sees_the_kernel_once():
    model, variables, x = _post_ln()
    graph = trace(lambda p, x: model.apply(p, x), variables, x)
    (site,) = analyze(graph).weights
    calls = []

    def zero_kernel(values):
        calls.append(len(values))
        return [jnp.zeros_like(v) for v in values]

    outs = evaluate_batches(
        graph, jax.tree_util.tree_leaves(variables), [[x], [x + 1.0]], Hooks(values={site.weight_id: zero_kernel})
    )
    assert calls == [1]  # input-independent values are computed and hooked once
    h = nn.LayerNorm().apply({"params": variables["params"]["ln"]}, x + 1.0)
    np.testing.assert_allclose(outs[1], variables["params"]["fc"]["bias"] + h, rtol=1e-5, atol=1e-5)


def test_batches_give_the_same_result_as_single_calls():
    model = zoo.bert_block()
    graph = trace(model.apply_fn, model.params, *model.inputs)
    x, mask = model.inputs
    batches = [[x, mask], [x * 0.5, mask]]
    outs = evaluate_batches(graph, jax.tree_util.tree_leaves(model.params), batches)
    for out, (xb, mb) in zip(outs, batches):
        np.testing.assert_allclose(out, model.apply_fn(model.params, xb, mb), rtol=1e-5, atol=1e-6)
