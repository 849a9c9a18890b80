"""`make demo`: quantize the shipped Fashion-MNIST ViT and compare top-1 with float.

Quantizes the checkpoint in experiments/checkpoints/ with RepQ-ViT and RepQuant at W4A4
and W6A6 from 32 calibration images, and prints float vs quantized top-1 on the 10k
Fashion-MNIST test set.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
from common import calibration_draw, fashion_mnist_test, float_top1, load_vit, log, markdown_table, top1

import repquant_jax as repquant


def main() -> None:
    start = time.perf_counter()
    log("loading the ViT checkpoint and Fashion-MNIST (the dataset is built on first use)")
    apply_fn, variables, info = load_vit()
    images, labels = fashion_mnist_test()
    calib = calibration_draw(32, seed=0)
    print(repquant.inspect(apply_fn, variables, calib[0]).summary())
    float_acc = float_top1(apply_fn, variables, images, labels)
    log(f"float top-1: {float_acc:.2f}%")
    rows = [["float", "32/32", f"{float_acc:.2f}", ""]]
    for preset in ("repq_vit", "repquant"):
        for bits in (6, 4):
            log(f"{preset} W{bits}A{bits}: transform")
            qparams, qapply = repquant.transform(
                apply_fn, variables, calib, getattr(repquant.presets, preset)(bits, bits), verbose=False
            )
            acc = top1(lambda x: qapply(qparams, jnp.asarray(x)), images, labels)
            log(f"{preset} W{bits}A{bits}: top-1 {acc:.2f}%")
            rows.append([preset, f"{bits}/{bits}", f"{acc:.2f}", f"{acc - float_acc:+.2f}"])
    print()
    print(f"ViT `{info['config']}` on the Fashion-MNIST test set (10,000 images), 32 calibration images:")
    print(markdown_table(["method", "W/A", "top-1 (%)", "vs float"], rows))
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
