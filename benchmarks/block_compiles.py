"""Compiled training loops of block-wise reconstruction: one per distinct block shape.

Transforms plain-JAX pre-LN transformers of 2, 5 and 8 identical blocks and the shipped
Fashion-MNIST ViT with `Reconstruction(granularity="block")` (2 steps: the count, not the
result, is measured) and prints how many executables each transform compiled. The cache
is shared across calls: a block shape compiled once is reused by later models.

    python benchmarks/block_compiles.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "experiments")]

import test_block_recon as blocks  # noqa: E402
from common import calibration_draw, load_vit  # noqa: E402

import repquant_jax as repquant  # noqa: E402
from repquant_jax._src import block_recon  # noqa: E402


def main() -> None:
    config = blocks._block_config(steps=2, eval_every=2)
    for layers in (2, 5, 8):
        apply_fn, params, x = blocks._deep_plain(layers)
        before = block_recon.compile_count()
        repquant.transform(apply_fn, params, [x], config)
        print(f"plain-JAX transformer, {layers} blocks: {block_recon.compile_count() - before} new compiled loops")
    apply_fn, variables, info = load_vit()
    before = block_recon.compile_count()
    repquant.transform(apply_fn, variables, calibration_draw(32, 0), config)
    print(f"ViT {info['config']} (4 blocks): {block_recon.compile_count() - before} new compiled loops")


if __name__ == "__main__":
    main()
