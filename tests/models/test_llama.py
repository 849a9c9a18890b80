"""LLaMA: logits equal ``transformers.LlamaForCausalLM``'s for small random configs (GQA too).

The reference model writes its weights with ``save_pretrained`` (``config.json`` +
``model.safetensors``), which our loader reads back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_reference import import_torch as _import_torch_reference  # noqa: E402

from repquant_zoo.models import llama
from repquant_zoo.models.checkpoint import CheckpointError

CASES = {
    # GQA: 4 query heads share 2 key/value heads; untied head.
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # plain multi-head attention, tied head, q/k/v/o biases, another RoPE base.
    "mha_tied_bias": dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, rope_theta=500000.0
    ),
}


def _hf_model(case):
    torch = _import_torch_reference()
    transformers = pytest.importorskip("transformers")
    kw = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    kw.update(CASES[case])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise on every weight, so that norms and biases matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return torch, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_llama(case, tmp_path):
    torch, ref = _hf_model(case)
    ref.save_pretrained(tmp_path)
    cfg, variables = llama.load_pretrained(tmp_path)
    assert cfg.kv_heads == CASES[case]["num_key_value_heads"]
    assert cfg.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert cfg.rope_theta == CASES[case].get("rope_theta", 10000.0)

    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(jax.jit(llama.Llama(cfg).apply)(variables, jnp.asarray(ids, jnp.int32)))
    diff = float(np.max(np.abs(got - want)))
    print(f"{case}: max |logit| {np.max(np.abs(want)):.3f}, max abs diff vs transformers {diff:.2e}")
    assert got.shape == want.shape == (2, 24, 97)
    assert diff < 1e-4

    # params_to_hf reproduces the reference's own tensors (the tied head is not stored).
    back = llama.params_to_hf(variables, cfg)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_save_pretrained_loads_in_transformers(tmp_path):
    cfg = llama.llama_tiny_bytes(n_layers=2, n_kv_heads=2)
    ids = jnp.asarray([list(b"quantize me, gently")], jnp.int32)
    variables = llama.Llama(cfg).init(jax.random.key(0), ids)
    llama.save_pretrained(tmp_path, variables, cfg)
    torch = _import_torch_reference()
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", local_files_only=True
    ).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()
    got = np.asarray(llama.Llama(cfg).apply(variables, ids))
    assert float(np.max(np.abs(got - want))) < 1e-4


def test_causal_and_masks():
    cfg = llama.llama_tiny_bytes(n_layers=1, dim=64, n_heads=4, n_kv_heads=1, ffn_dim=96)
    model = llama.Llama(cfg)
    a = jnp.asarray([list(b"abcdefgh")], jnp.int32)
    variables = model.init(jax.random.key(0), a)
    b = a.at[0, 5].set(ord("z"))
    la, lb = model.apply(variables, a), model.apply(variables, b)
    np.testing.assert_array_equal(la[:, :5], lb[:, :5])  # the future does not leak
    assert not np.allclose(la[:, 5:], lb[:, 5:])
    ones = jnp.ones_like(a)
    np.testing.assert_array_equal(model.apply(variables, a, attention_mask=ones), la)
    pos = jnp.arange(8)[None]
    np.testing.assert_array_equal(model.apply(variables, a, positions=pos), la)


def _tiny_state_dict():
    cfg = llama.llama_tiny_bytes(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96)
    variables = llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return cfg, llama.params_to_hf(variables, cfg)


def test_missing_tensor_is_named():
    cfg, sd = _tiny_state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(expected shape \(96, 64\)\)"
    ):
        llama.params_from_hf(sd, cfg)


def test_extra_tensor_is_named():
    cfg, sd = _tiny_state_dict()
    sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        llama.params_from_hf(sd, cfg)


def test_wrong_shape_is_named():
    cfg, sd = _tiny_state_dict()
    # a checkpoint without GQA (4 key heads) for a GQA config (2 key heads)
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), expected \(32, 64\)"
    ):
        llama.params_from_hf(sd, cfg)


def test_unsupported_hf_features_are_refused():
    base = llama.llama_tiny_bytes().to_hf_config()
    assert llama.LlamaConfig.from_hf_config(base) == llama.llama_tiny_bytes()
    with pytest.raises(ValueError, match="RoPE type 'llama3'"):
        llama.LlamaConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(ValueError, match="silu"):
        llama.LlamaConfig.from_hf_config({**base, "hidden_act": "gelu"})
