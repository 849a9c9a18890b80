"""Where the W8A8 error comes from (issue #4's "within 2% of float" check).

Relative L2 error of the quantized output vs float, on the same data as
``tests/test_transform_real.py`` (ViT: 32 training images to calibrate, the first 256 test
images to measure; MiniLM: 16 calibration sentences, 8 evaluation sentences):

* ViT, ``repq_vit(8, 8)``: as is, with a uniform softmax quantizer, with the final norm's
  quantizer per tensor (``min_rows_per_channel=64``: 32 class tokens are too few rows), both.
* MiniLM, ``repq_vit(8, 8)`` with only one kind of site quantized (weights, or one kind of
  activation), everything else float; and the presets with the post-LN norm outputs per
  tensor (default) or per channel.

Writes ``experiments/results/w8a8_breakdown.md``.

    python experiments/w8a8_breakdown.py        # ~3 min on 2 cores
"""

from __future__ import annotations

import sys
import time

import jax.numpy as jnp
import numpy as np
from common import REPO, RESULTS, load_vit, log, machine, markdown_table

import repquant_jax as repquant
from repquant_zoo.data import batches, fashion_mnist
from repquant_zoo.models import bert

sys.path.insert(0, str(REPO / "tests"))
from test_transform_real import CALIB, EVAL  # noqa: E402  (the sentences the test uses)

P = repquant.presets
SKIP_ACTIVATIONS = repquant.Rule(pattern=".*", target="activation", skip=True)
MINILM_SITES = {
    "weights only": None,
    "embedding / output LayerNorm outputs (q, k, v input)": r".*attn/query:input",
    "attention-output LayerNorm outputs (fc1 input)": r".*mlp/fc1:input",
    "GELU outputs (fc2 input)": r".*mlp/fc2:input",
    "softmax (attn of attn·V)": r".*bhqk,bkhd->bqhd:rhs",
    "V (of attn·V)": r".*bhqk,bkhd->bqhd:lhs",
    "q·kᵀ operands": r".*bqhd,bkhd->bhqk:.*",
    "attention-output projection input": r".*attn/out:input",
}


def relative_error(out, ref) -> float:
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def measure(apply_fn, variables, calib, evals, ref, config) -> str:
    qparams, qapply = repquant.transform(apply_fn, variables, calib, config, verbose=False)
    return f"{100 * relative_error(qapply(qparams, *evals), ref):.1f}%"


def vit_rows() -> list[list[str]]:
    apply_fn, variables, _ = load_vit()
    train, _ = fashion_mnist.load_arrays("train")
    test, _ = fashion_mnist.load_arrays("test")
    calib = [batches.fashion_mnist_preprocess(train[:32])]
    evals = (batches.fashion_mnist_preprocess(test[:256]),)
    ref = apply_fn(variables, *evals)
    variants = {
        "repq_vit(8, 8)": {},
        "uniform softmax quantizer": {"softmax_quantizer": "uniform"},
        "final norm per tensor (min_rows_per_channel=64)": {"min_rows_per_channel": 64},
        "both": {"softmax_quantizer": "uniform", "min_rows_per_channel": 64},
    }
    rows = []
    for name, overrides in variants.items():
        rows.append([name, measure(apply_fn, variables, calib, evals, ref, P.repq_vit(8, 8, **overrides))])
        log(f"ViT {name}: {rows[-1][1]}")
    return rows


def minilm_rows() -> tuple[list[list[str]], list[list[str]]]:
    encoder = bert.SentenceEncoder.from_pretrained(pad_to_multiple_of=32)
    model = encoder.model

    def apply_fn(p, ids, mask):
        return model.apply(p, ids, mask)

    calib, evals = encoder.tokenize(CALIB), encoder.tokenize(EVAL)
    length = max(calib["input_ids"].shape[1], evals["input_ids"].shape[1])

    def pad(batch):
        extra = length - batch["input_ids"].shape[1]
        return tuple(np.pad(batch[k], ((0, 0), (0, extra))) for k in ("input_ids", "attention_mask"))

    calib, evals = [pad(calib)], pad(evals)
    ref = apply_fn(encoder.variables, *evals)
    sites = []
    for name, pattern in MINILM_SITES.items():
        rules = (
            (SKIP_ACTIVATIONS,)
            if pattern is None
            else (
                repquant.Rule(pattern=".*", target="weight", skip=True),
                repquant.Rule(pattern=pattern, target="activation"),
                SKIP_ACTIVATIONS,
            )
        )
        sites.append([name, measure(apply_fn, encoder.variables, calib, evals, ref, P.repq_vit(8, 8, rules=rules))])
        log(f"MiniLM {name}: {sites[-1][1]}")
    light = {"dual_clipping": repquant.DualClipping(steps=20), "reconstruction": repquant.Reconstruction(steps=20)}
    presets = []
    for preset in ("minmax", "percentile", "repq_vit", "repquant"):
        row = [preset]
        for policy in ("per_tensor", "per_channel"):
            overrides = dict(light if preset == "repquant" else {}, unfoldable=policy)
            row.append(measure(apply_fn, encoder.variables, calib, evals, ref, getattr(P, preset)(8, 8, **overrides)))
        presets.append(row)
        log(f"MiniLM {preset}: {row[1:]}")
    return sites, presets


def main() -> None:
    start = time.perf_counter()
    vit = vit_rows()
    sites, presets = minilm_rows()
    text = "\n\n".join(
        [
            "# W8A8 error breakdown",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `python experiments/w8a8_breakdown.py` "
            f"({(time.perf_counter() - start) / 60:.1f} min). Relative L2 error of the output vs float, the data of "
            "`tests/test_transform_real.py`.",
            "## ViT (Fashion-MNIST), logits",
            markdown_table(["repq_vit W8A8 variant", "relative error"], vit),
            "## MiniLM, sentence embeddings: one kind of site quantized at 8 bits (repq_vit), the rest float",
            markdown_table(["quantized", "relative error"], sites),
            "## MiniLM, W8A8 presets by post-LN policy (repquant with 20 learning steps, as the test)",
            markdown_table(["preset", 'unfoldable="per_tensor"', 'unfoldable="per_channel"'], presets),
            "minmax and percentile quantize norm outputs per tensor anyway (`norm_quantizer`), so the policy "
            "changes nothing for them.",
        ]
    )
    out = RESULTS / "w8a8_breakdown.md"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
