"""ViT/DeiT: logits equal timm's and Hugging Face's for the same random weights.

The reference models are PyTorch (timm, transformers), installed by ``make test`` through
the ``reference`` extra. Their state dicts go through a safetensors file, as a user's
checkpoint would, into our loaders.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_reference import import_torch as _import_torch_reference  # noqa: E402

from repquant_zoo.models import vit
from repquant_zoo.models.checkpoint import CheckpointError


def _perturb_(torch, module, scale=0.02):
    """Adds noise to every parameter (LN weights/biases, tokens, biases included), in place.

    Default inits leave LN at (1, 0) and biases at 0; a loader that swapped or dropped
    them would still pass. Noise makes every tensor matter.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _images(n, size, chans=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, size, size, chans)).astype(np.float32)


@pytest.mark.parametrize("name", ["deit_s16_distilled", "vit_s16"])
def test_logits_match_timm(name, tmp_path):
    torch = _import_torch_reference()
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    ref = timm.create_model(vit.TIMM_NAMES[name], pretrained=False).eval()
    _perturb_(torch, ref)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))

    cfg = vit.get_config(name)
    variables = vit.load_safetensors(path, cfg, layout="timm")
    images = _images(2, cfg.image_size)
    with torch.no_grad():
        want = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax.jit(vit.VisionTransformer(cfg).apply)(variables, images))

    diff = float(np.max(np.abs(got - want)))
    print(f"{name}: max |logit| {np.max(np.abs(want)):.3f}, max abs diff vs timm {diff:.2e}")
    assert got.shape == want.shape == (2, 1000)
    assert diff < 1e-4

    # params_to_timm is the exact inverse: it reproduces timm's own state dict.
    back = vit.params_to_timm(variables, cfg)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def _hf_small(distilled: bool):
    _import_torch_reference()
    transformers = pytest.importorskip("transformers")
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
        layer_norm_eps=1e-12,
        attn_implementation="eager",
    )
    if distilled:
        hf_cfg = transformers.DeiTConfig(**kw)
        model = transformers.DeiTForImageClassificationWithTeacher(hf_cfg)
    else:
        hf_cfg = transformers.ViTConfig(**kw)
        model = transformers.ViTForImageClassification(hf_cfg)
    return model.eval()


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit_teacher"])
def test_logits_match_hf(distilled, tmp_path):
    torch = _import_torch_reference()
    ref = _hf_small(distilled)
    _perturb_(torch, ref)
    ref.save_pretrained(tmp_path)  # classic (hub) tensor names + config.json

    cfg = vit.ViTConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.distilled == distilled and cfg.ln_eps == 1e-12 and cfg.num_classes == 5
    variables = vit.load_safetensors(tmp_path / "model.safetensors", cfg, layout="hf")
    images = _images(3, 32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits.numpy()
    got = np.asarray(vit.VisionTransformer(cfg).apply(variables, images))
    diff = float(np.max(np.abs(got - want)))
    print(f"HF {'DeiT' if distilled else 'ViT'}: max abs diff {diff:.2e}")
    assert diff < 1e-4

    # transformers>=5 renames the modules in memory; those names load to the same params.
    in_memory = vit.params_from_hf(ref.state_dict(), cfg)
    jax.tree.map(np.testing.assert_array_equal, in_memory, variables)


def _tiny_timm_state_dict(**overrides):
    cfg = vit.vit_tiny_fashion_mnist(depth=2, **overrides)
    variables = vit.VisionTransformer(cfg).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    return cfg, vit.params_to_timm(variables, cfg)


def test_round_trip_through_safetensors(tmp_path):
    cfg, sd = _tiny_timm_state_dict(distilled=True)
    variables = vit.params_from_timm(sd, cfg)
    vit.save_safetensors(tmp_path / "m.safetensors", variables, cfg)
    again = vit.load_safetensors(tmp_path / "m.safetensors", cfg)
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    images = _images(2, 28, 1)
    model = vit.VisionTransformer(cfg)
    a, b = model.apply(again, images, separate_heads=True)
    np.testing.assert_allclose(model.apply(again, images), (a + b) / 2, rtol=1e-6, atol=1e-6)


def test_missing_tensor_is_named():
    cfg, sd = _tiny_timm_state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(
        ValueError, match=r"missing tensor 'blocks\.1\.attn\.qkv\.weight' \(expected shape \(384, 128\)\)"
    ):
        vit.params_from_timm(sd, cfg)


def test_extra_tensor_is_named():
    cfg, sd = _tiny_timm_state_dict()
    sd["blocks.2.norm1.weight"] = np.ones(128, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.2\.norm1\.weight'") as e:
        vit.params_from_timm(sd, cfg)
    assert e.value.unexpected == ("blocks.2.norm1.weight",)


def test_wrong_shape_is_named():
    cfg, sd = _tiny_timm_state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, :-1]
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 49, 128\), expected \(1, 50, 128\)"):
        vit.params_from_timm(sd, cfg)
    # The HF loader reports in the checkpoint's own names.
    _, hf = _tiny_timm_state_dict()
    with pytest.raises(ValueError, match=r"missing tensor 'embeddings\.cls_token'"):
        vit.params_from_hf({"vit." + k: v for k, v in hf.items()}, cfg)


def test_traced_graph_is_plain_matmuls_and_softmax():
    cfg = vit.vit_tiny_fashion_mnist(depth=2)
    model = vit.VisionTransformer(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    text = str(jax.make_jaxpr(model.apply)(variables, jnp.zeros((2, 28, 28, 1))))
    # per block: q, k, v, out, fc1, fc2 (weight) + q·kᵀ, attn·V (activation); plus the head
    assert text.count("dot_general") == 8 * cfg.depth + 1
    assert text.count("conv_general_dilated") == 1
    assert "erf" in text and "tanh" not in text  # exact GELU
    assert text.count("exp") >= cfg.depth


def test_named_configs():
    assert vit.get_config("deit_s16").dim == 384
    assert vit.get_config("vit_b16").mlp_dim == 3072
    tiny = vit.vit_tiny_fashion_mnist()
    assert (tiny.image_size, tiny.in_chans, tiny.num_tokens, tiny.num_classes) == (28, 1, 50, 10)
    with pytest.raises(ValueError, match="unknown ViT config"):
        vit.get_config("vit_x")
    with pytest.raises(ValueError, match="NHWC"):
        vit.VisionTransformer(tiny).init(jax.random.key(0), jnp.zeros((1, 1, 28, 28)))
