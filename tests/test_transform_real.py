"""The transform on real models: MiniLM (real all-MiniLM-L6-v2 weights) and a pre-LN ViT.

Measured figures (W8A8, relative L2 error of the output vs float) are printed with
``pytest -s`` and quoted in experiments/RESULTS.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repquant_jax as repquant
from repquant_jax.models import bert, vit

P = repquant.presets
LIGHT_LEARNING = dict(
    dual_clipping=repquant.DualClipping(steps=20), reconstruction=repquant.Reconstruction(steps=20)
)
CALIB = [
    "A man is playing a guitar.", "The weather is cold today in the northern mountains.",
    "Stocks fell sharply after the central bank raised interest rates.", "A child rides a bike down the street.",
    "The committee approved the new budget for schools and hospitals.", "She cooked pasta with tomato sauce.",
    "Scientists discovered a new species of frog in the rainforest.", "The train to Berlin was delayed by an hour.",
    "Quantization maps floats onto a few integers.", "He plays the violin in an orchestra.",
    "The museum opens at nine in the morning.", "Rain is expected over the weekend.",
    "They planted tomatoes in the garden.", "The election results were announced last night.",
    "Our team won the football match.", "A dog is chasing a ball in the park.",
]
EVAL = [
    "Someone plays an acoustic guitar.", "It is freezing in the mountains this morning.",
    "The central bank increased rates and markets dropped.", "A kid is cycling on the road.",
    "Lawmakers passed funding for public services.", "Dinner was spaghetti with a red sauce.",
    "A new frog species was found in the jungle.", "Trains were late because of snow.",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        encoder = bert.SentenceEncoder.from_pretrained(pad_to_multiple_of=32)
    except (ImportError, FileNotFoundError) as err:  # make test installs the package
        pytest.skip(f"MiniLM weights not installed: {err}")
    model = encoder.model
    apply_fn = lambda p, ids, mask: model.apply(p, ids, mask)  # noqa: E731
    calib = encoder.tokenize(CALIB)
    evals = encoder.tokenize(EVAL)
    length = max(calib["input_ids"].shape[1], evals["input_ids"].shape[1])

    def pad(batch):
        extra = length - batch["input_ids"].shape[1]
        return tuple(np.pad(batch[k], ((0, 0), (0, extra))) for k in ("input_ids", "attention_mask"))

    return apply_fn, encoder.variables, [pad(calib)], pad(evals)


def _rel(out, ref):
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def test_minilm_plan_reports_post_ln_groups_unfoldable(minilm):
    apply_fn, variables, calib, _ = minilm
    plan = repquant.inspect(apply_fn, variables, *calib[0])
    assert len(plan.weights) == 36 and len(plan.softmaxes) == 6
    assert len(plan.groups) == 12
    assert all(not g.foldable and "residual" in g.reason for g in plan.groups)


@pytest.mark.parametrize("preset", ["minmax", "percentile", "repq_vit", "repquant"])
def test_minilm_w8a8_stays_close_to_float(minilm, preset):
    apply_fn, variables, calib, evals = minilm
    overrides = LIGHT_LEARNING if preset == "repquant" else {}
    ref = apply_fn(variables, *evals)
    errors = {}
    for bits in (8, 4):
        qparams, qapply = repquant.transform(apply_fn, variables, calib, getattr(P, preset)(bits, bits, **overrides), verbose=False)
        out = qapply(qparams, *evals)
        errors[bits] = (_rel(out, ref), float(jnp.mean(jnp.sum(out * ref, -1) / jnp.linalg.norm(out, axis=-1))))
    print(f"\nMiniLM {preset}: W8A8 rel err {errors[8][0]:.4f} cos {errors[8][1]:.4f}; W4A4 rel err {errors[4][0]:.4f}")
    # Per-tensor 8-bit activations cost MiniLM 5-11% relative error on its normalised
    # embeddings (outlier channels in post-LN BERT; see RESULTS.md), i.e. cosine >= 0.99.
    assert errors[8][1] > 0.99
    assert errors[8][0] < 0.15
    assert errors[8][0] < errors[4][0]


@pytest.mark.parametrize("preset", ["minmax", "percentile", "repq_vit", "repquant"])
def test_pre_ln_vit_w8a8_within_a_few_percent(preset):
    config = vit.get_config("vit_tiny_fashion_mnist_p7") if "vit_tiny_fashion_mnist_p7" in vit.CONFIGS else vit.get_config("vit_tiny_fashion_mnist")
    model = vit.VisionTransformer(config)
    images = jax.random.normal(jax.random.key(0), (48, 28, 28, 1))
    params = model.init(jax.random.key(1), images[:1])
    apply_fn = lambda p, x: model.apply(p, x)  # noqa: E731
    overrides = LIGHT_LEARNING if preset == "repquant" else {}
    qparams, qapply = repquant.transform(apply_fn, params, [images[:32]], getattr(P, preset)(8, 8, **overrides), verbose=False)
    err = _rel(qapply(qparams, images[32:]), apply_fn(params, images[32:]))
    print(f"\nViT (random init) {preset} W8A8 rel err {err:.4f}")
    assert err < 0.05
