"""Adapters (repquant_jax/_src/adapters.py): `from_nnx` and the closed-over weights check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from flax import nnx

import repquant_jax as repquant
from repquant_jax._src.adapters import as_apply_fn, check_reads_params, closed_over_weights, from_nnx, reads_params
from repquant_jax._src.graph import path_to_str, trace
from repquant_jax._src.sites import analyze

DIM, HEADS, HIDDEN, CLASSES = 32, 4, 64, 10


class HandAttention(nnx.Module):
    """Self-attention with separate q/k/v ``nnx.Linear`` and explicit einsums."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        b, s, d = x.shape
        split = lambda t: t.reshape(b, s, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, d))


class Net(nnx.Module):
    """Two pre-LN blocks (library attention, hand-written attention), dropout and a head.

    ``nnx.MultiHeadAttention`` keeps its RNG state and ``nnx.Dropout`` holds one too, so
    the module has non-``Param`` state that `from_nnx` must keep out of the params.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(DIM, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, dropout_rate=0.1, rngs=rngs)
        self.ln2 = nnx.LayerNorm(DIM, rngs=rngs)
        self.attn2 = HandAttention(DIM, HEADS, rngs=rngs)
        self.ln3 = nnx.LayerNorm(DIM, rngs=rngs)
        self.fc1 = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, DIM, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.attn2(self.ln2(x))
        x = x + self.drop(self.fc2(nnx.gelu(self.fc1(self.ln3(x)))))
        return self.head(x)


LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral)


def _net(eval_mode: bool = True) -> Net:
    model = Net(rngs=nnx.Rngs(0))
    # Move norm scales/biases off 1/0 so that folds matter.
    for i, (_, ln) in enumerate((p, m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.LayerNorm)):
        ln.scale[...] = jax.random.uniform(jax.random.key(10 + i), (DIM,), minval=0.5, maxval=1.5)
        ln.bias[...] = 0.1 * jax.random.normal(jax.random.key(20 + i), (DIM,))
    # Residual-branch projections scaled down (as GPT-2's init does): random attention is
    # near uniform, where the log-sqrt2 softmax quantizer is at its coarsest, and full-size
    # branches would make the W8A8 error a property of these random weights.
    for proj in (model.attn.out, model.attn2.out, model.fc2):
        proj.kernel[...] = 0.5 * proj.kernel[...]
    if eval_mode:
        model.eval()
    else:
        model.train()
    return model


def _x(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (8, 16, DIM))


def _snapshot(model: nnx.Module) -> list[tuple[str, np.ndarray]]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    for _, leaf in leaves:
        assert isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    return [(path_to_str(path), np.array(leaf)) for path, leaf in leaves]


def _linear_paths(model: nnx.Module) -> set[str]:
    return {"/".join(map(str, path)) for path, m in nnx.iter_modules(model) if isinstance(m, LINEAR_TYPES)}


@pytest.fixture(scope="module")
def quantized():
    model = _net()
    before = _snapshot(model)
    apply_fn, params = from_nnx(model)
    calib = [_x(seed) for seed in (1, 2, 3)]
    qparams, qapply = repquant.transform(apply_fn, params, calib, repquant.presets.repq_vit(8, 8), verbose=False)
    return model, before, apply_fn, params, qparams, qapply


# ---------------------------------------------------------------------------------- from_nnx


def test_from_nnx_reproduces_the_module_exactly():
    model = _net()
    apply_fn, params = from_nnx(model)
    x = _x()
    want = np.asarray(model(x))
    np.testing.assert_array_equal(np.asarray(apply_fn(params, x)), want)
    np.testing.assert_allclose(np.asarray(jax.jit(apply_fn)(params, x)), want, rtol=1e-5, atol=1e-5)


def test_from_nnx_params_hold_exactly_the_nnx_params():
    model = _net()
    _, params = from_nnx(model)
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert paths == [p for p, _ in _snapshot(model)]
    assert not any("rngs" in p or "count" in p for p in paths)  # RNG state is closed over
    assert all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in jax.tree_util.tree_leaves(params))
    # Copies of the module's Variables, not the module's own objects.
    assert params["fc1"]["kernel"] is not model.fc1.kernel


def test_from_nnx_apply_fn_reads_its_params():
    model = _net()
    apply_fn, params = from_nnx(model)
    x = _x()
    moved = jax.tree_util.tree_map(lambda leaf: leaf * 0.5, params)
    assert not np.allclose(np.asarray(apply_fn(moved, x)), np.asarray(model(x)))
    check_reads_params(trace(apply_fn, params, x))


def test_from_nnx_is_pure_and_leaves_the_module_untouched():
    model = _net(eval_mode=False)  # dropout active: every call of the module advances its RNG
    before = _snapshot(model)
    rng_before = [np.asarray(jax.random.key_data(k)) for k in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngKey))]
    counts_before = [np.asarray(c) for c in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngCount))]
    apply_fn, params = from_nnx(model)
    x = _x()
    first = np.asarray(apply_fn(params, x))
    np.testing.assert_array_equal(np.asarray(apply_fn(params, x)), first)  # no state carried between calls
    jax.jit(apply_fn)(params, x)
    trace(apply_fn, params, x)
    after = _snapshot(model)
    assert [p for p, _ in after] == [p for p, _ in before]
    for (_, a), (_, b) in zip(after, before):
        np.testing.assert_array_equal(a, b)
    counts_after = [np.asarray(c) for c in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngCount))]
    rng_after = [np.asarray(jax.random.key_data(k)) for k in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngKey))]
    assert len(counts_after) == len(counts_before) > 0
    for a, b in zip(counts_after + rng_after, counts_before + rng_before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "bad, name",
    [({"kernel": jnp.ones((2, 2))}, "dict"), (nn.Dense(4), "Dense"), (nnx.Linear, "Linear"), (lambda x: x, "function")],
)
def test_from_nnx_rejects_non_modules(bad, name):
    with pytest.raises(TypeError, match=name):
        from_nnx(bad)


def test_from_nnx_rejects_a_module_without_params():
    with pytest.raises(ValueError, match="no nnx.Param"):
        from_nnx(nnx.Dropout(0.1, rngs=nnx.Rngs(0)))


def test_as_apply_fn_splits_a_module_and_passes_functions_through():
    model = _net()
    apply_fn, params = as_apply_fn(model, None)
    x = _x()
    np.testing.assert_array_equal(np.asarray(apply_fn(params, x)), np.asarray(model(x)))
    fn, p = lambda p, x: x @ p["w"], {"w": jnp.ones((DIM, 2))}
    assert as_apply_fn(fn, p) == (fn, p)
    with pytest.raises(ValueError, match="params=None"):
        as_apply_fn(model, params)
    with pytest.raises(ValueError, match="params is None"):
        as_apply_fn(fn, None)
    with pytest.raises(TypeError, match="Linen module"):
        as_apply_fn(nn.Dense(4), {"params": {}})


# ------------------------------------------------------------------------- transform on NNX


def test_transform_quantizes_every_linear_kernel(quantized):
    model, _, apply_fn, params, qparams, qapply = quantized
    linears = _linear_paths(model)
    assert len(linears) == 11  # q, k, v, out in both attentions, fc1, fc2, head
    plan = analyze(trace(apply_fn, params, _x()))
    assert {w.name for w in plan.weights} == linears
    assert set(qparams.weights) == linears
    weight_sites = [s for s in qapply.report.sites if s.role == "weight"]
    assert sorted(s.name for s in weight_sites) == sorted(linears)
    assert all(s.bits == 8 for s in weight_sites)


def test_transform_output_is_close_to_float(quantized):
    model, _, _, _, qparams, qapply = quantized
    x = _x(seed=7)  # not a calibration batch
    want = np.asarray(model(x))
    got = np.asarray(qapply(qparams, x))
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-3 < error < 0.05, error  # > 1e-3: the kernels really were quantized


def test_transform_leaves_the_module_untouched(quantized):
    model, before, *_ = quantized
    after = _snapshot(model)
    assert [p for p, _ in after] == [p for p, _ in before]
    for (_, a), (_, b) in zip(after, before):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------- check_reads_params


def test_nnx_module_called_in_a_closure_is_reported():
    model = _net()
    graph = trace(lambda p, x: model(x), nnx.state(model), _x())
    assert not reads_params(graph)
    with pytest.raises(ValueError, match=r"ignores its params argument(.|\n)*closed over(.|\n)*from_nnx"):
        check_reads_params(graph)


def test_transform_refuses_a_closure_over_an_nnx_module():
    model = _net()
    with pytest.raises(ValueError, match="ignores its params argument"):
        repquant.transform(lambda p, x: model(x), nnx.state(model), [_x()], repquant.presets.repq_vit(8, 8))


def test_linen_variables_closed_over_are_reported():
    model = nn.Sequential([nn.LayerNorm(), nn.Dense(HIDDEN), nn.gelu, nn.Dense(CLASSES)])
    x = _x()
    variables = model.init(jax.random.key(0), x)
    graph = trace(lambda p, x: model.apply(variables, x), variables, x)
    with pytest.raises(ValueError, match=r"ignores its params argument.*\[32,64\]"):
        check_reads_params(graph)


def test_kernels_closed_over_without_params_are_reported():
    w = jax.random.normal(jax.random.key(0), (DIM, HIDDEN))
    with pytest.raises(ValueError, match="ignores its params argument"):
        check_reads_params(trace(lambda p, x: x @ w, {}, _x()))


@pytest.mark.parametrize(
    "use",
    [
        lambda x, w: x @ w,
        lambda x, w: x @ w.T.T,
        lambda x, w: x @ w.astype(jnp.bfloat16).astype(jnp.float32),
        lambda x, w: jnp.einsum("bsd,dh->bsh", x, w.reshape(DIM, HIDDEN)),
    ],
    ids=["direct", "transposed", "cast", "reshaped"],
)
def test_one_closed_over_kernel_next_to_params_is_reported(use):
    key = jax.random.key(0)
    params = {"w1": jax.random.normal(key, (DIM, DIM))}
    w2 = jax.random.normal(jax.random.fold_in(key, 1), (DIM, HIDDEN))

    def apply_fn(p, x):
        return use(jax.nn.gelu(x @ p["w1"]), w2)

    graph = trace(apply_fn, params, _x())
    assert reads_params(graph)
    assert [w.shape for w in closed_over_weights(graph)] == [(DIM, HIDDEN)]
    with pytest.raises(ValueError, match=r"would silently stay unquantized") as info:
        check_reads_params(graph)
    assert "[32,64] float32 read by dot_general" in str(info.value)


def test_small_masks_and_tables_are_not_reported():
    """Closed-over constants that are not weights: a causal mask (bool), a float
    position table added to the input, a float mask multiplied into a kernel (a derived
    weight, still quantized), an int one-hot table and a small token-mixing matrix."""
    s = 8
    causal = jnp.tril(jnp.ones((s, s), bool))
    positions = jnp.sin(jnp.arange(s * DIM, dtype=jnp.float32).reshape(s, DIM))  # [8, 32] float
    kernel_mask = jnp.triu(jnp.ones((DIM, DIM)))  # [32, 32] float, used through a multiply
    one_hot = jnp.eye(s, dtype=jnp.int32)  # selects each token's own position
    mixing = jnp.full((s, s), 1.0 / s)  # 64 elements: below the size threshold
    params = {"wq": jnp.eye(DIM) * 0.5, "wk": jnp.eye(DIM), "w": jnp.ones((DIM, DIM)) / DIM}

    def apply_fn(p, x):
        x = x + positions[jnp.argmax(one_hot, axis=-1)]
        scores = jnp.where(causal, (x @ p["wq"]) @ (x @ p["wk"]).swapaxes(-1, -2), -1e9)
        x = jax.nn.softmax(scores, axis=-1) @ x
        x = jnp.einsum("ts,bsd->btd", mixing, x)
        return x @ (p["w"] * kernel_mask)

    graph = trace(apply_fn, params, jax.random.normal(jax.random.key(0), (2, s, DIM)))
    assert set(map(str, (graph.avals[v].dtype for v in graph.consts))) >= {"bool", "float32", "int32"}
    assert closed_over_weights(graph) == ()
    check_reads_params(graph)
    # The threshold is what spares the mixing matrix:
    assert [w.shape for w in closed_over_weights(graph, min_elements=1)] == [(s, s)]


@pytest.mark.parametrize("builder", ["nnx_vit_block", "masked_attention", "derived_weights"])
def test_zoo_models_pass(builder):
    model = zoo.ALL[builder]()
    check_reads_params(trace(model.apply_fn, model.params, *model.inputs))
