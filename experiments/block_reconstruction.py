"""Block-wise vs layer-wise reconstruction on the shipped Fashion-MNIST ViT (issue #14).

Rows: repq_vit, repquant with its default layer-wise reconstruction, and repquant with
block-wise reconstruction (`Reconstruction(granularity="block")`, with and without
QDrop), at W4A4 and W3A3: top-1 on the 10k test set as mean ± std over calibration
draws of 32 images, the gap closure (repquant − repq_vit) / (float − repq_vit), the
transform time, and how many blocks kept what they learned. Writes
experiments/results/block_reconstruction.md.

    python experiments/block_reconstruction.py              # 3 draws, W4A4 and W3A3
    python experiments/block_reconstruction.py --draws 1 --bits 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax.numpy as jnp
from common import RESULTS, calibration_draw, fashion_mnist_test, float_top1, load_vit, log, machine, markdown_table

import repquant_jax as repquant

P = repquant.presets

VARIANTS = {
    "repq_vit": lambda b: P.repq_vit(b, b),
    "repquant (layer-wise)": lambda b: P.repquant(b, b),
    "repquant, block-wise": lambda b: P.repquant(b, b, reconstruction=repquant.Reconstruction(granularity="block")),
    "repquant, block-wise + QDrop 0.5": lambda b: P.repquant(
        b, b, reconstruction=repquant.Reconstruction(granularity="block", qdrop=0.5)
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    args = parser.parse_args()
    apply_fn, variables, info = load_vit()
    images, labels = fashion_mnist_test()
    float_acc = float_top1(apply_fn, variables, images, labels)
    draws = [calibration_draw(32, seed=seed) for seed in range(args.draws)]
    rows = []
    for bits in args.bits:
        base = None
        for name, make in VARIANTS.items():
            accs, times, kept = [], [], []
            for seed, calib in enumerate(draws):
                start = time.perf_counter()
                qparams, qapply = repquant.transform(apply_fn, variables, calib, make(bits))
                times.append(time.perf_counter() - start)
                correct = 0
                for i in range(0, len(images), 1000):
                    logits = qapply(qparams, jnp.asarray(images[i : i + 1000]))
                    correct += int((jnp.argmax(logits, -1) == labels[i : i + 1000]).sum())
                accs.append(100.0 * correct / len(images))
                units = [n for n in qapply.report.notes if n.startswith("reconstruction ")]
                kept.append(f"{sum(n.endswith('; kept') for n in units)}/{len(units)}" if units else "")
                log(f"W{bits}A{bits} {name} draw {seed}: {accs[-1]:.2f} ({times[-1]:.0f} s) {kept[-1]}")
            mean = statistics.mean(accs)
            std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            if base is None:
                base = mean
            closure = "" if name == "repq_vit" else f"{(mean - base) / (float_acc - base):.2f}"
            rows.append(
                [
                    f"W{bits}A{bits}",
                    name,
                    f"{mean:.2f} ± {std:.2f}",
                    closure,
                    f"{statistics.median(times):.0f}",
                    " ".join(kept),
                ]
            )
    table = markdown_table(
        ["bits", "method", "top-1 (%)", "gap closure", "transform (s, median)", "blocks kept per draw"], rows
    )
    text = (
        f"# Block-wise reconstruction on the Fashion-MNIST ViT\n\n"
        f"`python experiments/block_reconstruction.py --draws {args.draws}` on {machine()}. ViT "
        f"`{info['config']}`, float top-1 {float_acc:.2f}%, 10,000 test images; {args.draws} calibration draws "
        f"of 32 training images (seeds 0..{args.draws - 1}), the same draws for every row. Gap closure = "
        "(method − repq_vit) / (float − repq_vit).\n\n" + table + "\n"
    )
    out = RESULTS / "block_reconstruction.md"
    out.write_text(text)
    print(text)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
