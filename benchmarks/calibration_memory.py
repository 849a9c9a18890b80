"""Peak memory of streaming calibration: many batches vs one chunk.

Runs `transform` (repq_vit, W4A4) on a ViT-S-size model (6 layers to keep it short) with
``--batches`` calibration batches of 8 images, ``calibration_chunk=4``; prints the peak
resident set size of the process. Compare ``--batches 4`` (one chunk) with
``--batches 64``: memory is bounded by the chunk and the per-site reservoirs, not by the
number of batches.

    python benchmarks/calibration_memory.py --batches 64
"""

from __future__ import annotations

import argparse
import resource
import time

import jax

import repquant_jax as repquant
from repquant_zoo.models import vit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    args = parser.parse_args()
    model = vit.VisionTransformer(vit.get_config("vit_s16", depth=args.depth))
    params = model.init(jax.random.key(0), jax.numpy.zeros((1, 224, 224, 3)))
    stream = (jax.random.normal(jax.random.key(i), (8, 224, 224, 3)) for i in range(args.batches))
    config = repquant.presets.repq_vit(4, 4, calibration_chunk=4, max_calibration_values=1 << 20)
    start = time.perf_counter()
    _, qapply = repquant.transform(lambda p, x: model.apply(p, x), params, stream, config, verbose=False)
    kept = max(s.values_kept for s in qapply.report.sites if s.values_kept is not None)
    seen = max(s.values_seen for s in qapply.report.sites if s.values_seen is not None)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.batches} batches x 8 images, chunk 4: peak RSS {peak_mb:.0f} MB, "
        f"max values kept per site {kept:,} of {seen:,} seen, {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
