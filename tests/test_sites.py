"""Site discovery and fold legality (repquant_jax/_src/sites.py) on the model zoo."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import zoo

import repquant_jax as repquant

COUNTED = ("weight_matmuls", "activation_matmuls", "softmaxes", "fold_groups", "foldable")


@pytest.mark.parametrize("builder", sorted(zoo.ALL))
def test_exact_site_counts(builder):
    model = zoo.ALL[builder]()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    summary = plan.summary()
    assert {k: summary[k] for k in COUNTED} == {k: model.expected[k] for k in COUNTED}, str(plan)


def _groups(plan):
    return {g.name: (g.foldable, sorted(c.site for c in g.consumers)) for g in plan.groups}


def test_pre_ln_vit_block_plan():
    model = zoo.linen_vit_block()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    assert _groups(plan) == {
        "ln1": (True, ["attn/key", "attn/query", "attn/value"]),
        "ln2": (True, ["mlp/fc1"]),
    }
    (softmax,) = plan.softmaxes
    assert softmax.axis == -1
    assert plan.point(softmax.point).source == "softmax"
    # q, k and v read one shared quantizer
    assert len({plan.weight(n).input_point for n in ("attn/query", "attn/key", "attn/value")}) == 1
    text = str(plan)
    assert "ln1" in text and "foldable" in text and "softmax" in text


def test_post_ln_bert_group_is_not_foldable_because_of_the_residual():
    model = zoo.bert_block()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    (group,) = plan.groups
    assert not group.foldable
    assert "add" in group.reason and "residual" in group.reason


def test_llama_rmsnorm_groups_are_foldable():
    model = zoo.llama_block()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    assert {g.kind for g in plan.groups} == {"rmsnorm"}
    assert all(g.foldable and g.bias_param_index is None for g in plan.groups)


@pytest.mark.parametrize("builder", ["vit_with_head", "scan_vit", "plain_jax_transformer"])
def test_final_norm_feeding_only_the_head_is_foldable(builder):
    model = zoo.ALL[builder]()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    head_groups = [g for g in plan.groups if [c.site for c in g.consumers] == ["head"]]
    assert len(head_groups) == 1 and head_groups[0].foldable, str(plan)


def test_norm_feeding_head_and_output_is_not_foldable():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(name="norm")(x)
            return nn.Dense(3, name="head")(h), h

    model = Model()
    x = jnp.ones((2, 4, 8))
    variables = model.init(jax.random.key(0), x)
    plan = repquant.inspect(lambda p, x: model.apply(p, x), variables, x)
    (group,) = plan.groups
    assert not group.foldable and "output" in group.reason


def test_sum_pooling_blocks_the_fold_but_mean_pooling_does_not():
    def make(pool):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3, name="head")(pool(nn.LayerNorm(name="norm")(x), axis=1))

        return Model()

    x = jnp.ones((2, 4, 8))
    for pool, expected_groups in ((jnp.mean, 1), (jnp.sum, 0)):
        model = make(pool)
        variables = model.init(jax.random.key(0), x)
        plan = repquant.inspect(lambda p, x, m=model: m.apply(p, x), variables, x)
        assert len(plan.groups) == expected_groups


@pytest.mark.parametrize("builder", sorted(zoo.ALL))
def test_site_names_are_stable_across_batch_and_sequence_length(builder):
    def names(plan):
        return (
            [w.name for w in plan.weights],
            [m.name for m in plan.matmuls],
            [p.name for p in plan.points],
            [s.name for s in plan.softmaxes],
            [g.name for g in plan.groups],
        )

    small = zoo.ALL[builder](batch=2, seq=5)
    large = zoo.ALL[builder](batch=3, seq=9)
    plan_small = repquant.inspect(small.apply_fn, small.params, *small.inputs)
    plan_large = repquant.inspect(large.apply_fn, large.params, *large.inputs)
    assert names(plan_small) == names(plan_large)


def test_fold_consumer_maps_kernel_rows_to_channels():
    model = zoo.linen_vit_block()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    ln1 = next(g for g in plan.groups if g.name == "ln1")
    query = next(c for c in ln1.consumers if c.site == "attn/query")
    kernel = model.params["params"]["attn"]["query"]["kernel"]  # [dim, heads, head_dim]
    rows = query.row_channel.reshape(kernel.shape)
    assert (rows == jnp.arange(kernel.shape[0])[:, None, None]).all()
    assert query.bias_param_index is not None and query.bias_index.shape == (kernel.shape[1] * kernel.shape[2],)


def test_activation_sites_of_module_path_free_traces_are_named_after_their_layer():
    # NNX (and equinox, plain JAX) name stacks hold transformations such as
    # "vmap(BTNH,BSNH->BNTS)", not module paths: the layer's path comes from the weight
    # sites feeding the matmul, so that rules can target it.
    model = zoo.nnx_vit_block()
    plan = repquant.inspect(model.apply_fn, model.params, *model.inputs)
    names = [m.name for m in plan.matmuls] + [s.name for s in plan.softmaxes]
    assert names and all(n.startswith("attn/") for n in names), names
    plain = zoo.plain_jax_transformer()
    plan = repquant.inspect(plain.apply_fn, plain.params, *plain.inputs)
    assert [s.name for s in plan.softmaxes] == ["layer_0/softmax", "layer_1/softmax"]
