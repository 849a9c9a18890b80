"""Ablation of RepQuant's components on the shipped Fashion-MNIST ViT (issue #4).

Rows: minmax, percentile, repq_vit, repquant at W4A4 and W6A6, on the natural model and
on its stress variant (outlier channels injected into every LayerNorm, function
unchanged: SYNTHETIC), each the mean ± std of top-1 over calibration draws; then a
per-component ablation at W4A4 on both models. Writes experiments/results/ablation_vit.md.

    python experiments/ablation_vit.py                 # 3 draws of 32 calibration images
    python experiments/ablation_vit.py --draws 1       # quicker
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
from common import (
    CHECKPOINT,
    RESULTS,
    calibration_draw,
    fashion_mnist_test,
    float_top1,
    load_vit,
    log,
    machine,
    markdown_table,
    mean_std,
    top1,
)

import repquant_jax as repquant
from repquant_jax._src.diagnostics import channel_range_profile, inject_outliers

P = repquant.presets

MAIN = ["minmax", "percentile", "repq_vit", "repquant"]
COMPONENTS = {
    "percentile (per-tensor LN, uniform softmax)": lambda b: P.percentile(b, b),
    "+ log√2 softmax (no LN fold)": lambda b: P.percentile(b, b, softmax_quantizer="log_sqrt2"),
    "+ per-channel LN, folded = repq_vit": lambda b: P.repq_vit(b, b),
    "repq_vit, per-channel LN kept unfolded": lambda b: P.repq_vit(b, b, fold_norms=False),
    "repq_vit + dual clipping": lambda b: P.repq_vit(b, b, dual_clipping=repquant.DualClipping()),
    "repq_vit + reconstruction": lambda b: P.repq_vit(b, b, reconstruction=repquant.Reconstruction()),  # block-wise
    "repquant (both)": lambda b: P.repquant(b, b),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--factor", type=float, default=16.0)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--out", default=str(RESULTS / "ablation_vit.md"))
    args = parser.parse_args()

    from pathlib import Path

    apply_fn, variables, info = load_vit(Path(args.checkpoint))
    images, labels = fashion_mnist_test()
    draws = [calibration_draw(args.samples, seed) for seed in range(args.draws)]
    stressed = inject_outliers(apply_fn, variables, images[:8], factor=args.factor, channels=4)
    models = {"natural": variables, f"stress ×{args.factor:g} (synthetic)": stressed}
    float_acc = {name: float_top1(apply_fn, p, images, labels) for name, p in models.items()}
    profiles = {name: channel_range_profile(apply_fn, p, images[:500]) for name, p in models.items()}
    log(f"float top-1: {float_acc}")

    def evaluate(params, config) -> list[float]:
        accs = []
        for calib in draws:
            qparams, qapply = repquant.transform(apply_fn, params, calib, config, verbose=False)
            accs.append(top1(lambda x: qapply(qparams, jnp.asarray(x)), images, labels))
        return accs

    start = time.perf_counter()
    main_rows, component_rows = [], []
    for model_name, params in models.items():
        main_rows.append([model_name, "float", f"{float_acc[model_name]:.2f}", f"{float_acc[model_name]:.2f}"])
        for method in MAIN:
            cells = []
            for bits in (4, 6):
                cells.append(mean_std(evaluate(params, getattr(P, method)(bits, bits))))
                log(f"{model_name} {method} W{bits}A{bits}: {cells[-1]}")
            main_rows.append([model_name, method] + cells)
        for label, make in COMPONENTS.items():
            acc = mean_std(evaluate(params, make(4)))
            log(f"{model_name} W4A4 {label}: {acc}")
            component_rows.append([model_name, label, acc])

    profile_rows = [[name] + [f"{v:.1f}" for v in profile.values()] for name, profile in profiles.items()]
    text = "\n\n".join(
        [
            "# Ablation on the Fashion-MNIST ViT",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `python experiments/ablation_vit.py "
            f"--draws {args.draws} --samples {args.samples}` ({(time.perf_counter() - start) / 60:.0f} min). "
            f"Model: `{info['config']}` ({info.get('test_accuracy', '?')} test accuracy at training). "
            f"Top-1 (%) on the 10k test set; mean ± std over {args.draws} draws of {args.samples} calibration "
            "images. The stress rows are SYNTHETIC: 4 channels of every LayerNorm scaled ×"
            f"{args.factor:g} and the following kernel rows divided by it (same float function).",
            "## Methods\n\n" + markdown_table(["model", "method", "W4A4", "W6A6"], main_rows),
            "## Components (W4A4)\n\n" + markdown_table(["model", "configuration", "W4A4"], component_rows),
            "## LayerNorm-output channel range (max / median), 500 test images\n\n"
            + markdown_table(["model"] + list(next(iter(profiles.values()))), profile_rows),
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
