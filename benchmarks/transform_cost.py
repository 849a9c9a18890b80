"""Cost of tracing and of `transform` on a ViT-S-size model, as ratios to a float forward.

Prints, for a 12-layer ViT-S/16 (dim 384, 6 heads, 197 tokens, random init) and 32
calibration images: the time to trace + analyse the apply function, and each preset's
transform time divided by one float forward of the calibration batch (jitted, median of
several runs). Everything is measured in one run, so the ratios are comparable even on a
busy machine.

    python benchmarks/transform_cost.py                  # all presets
    python benchmarks/transform_cost.py --presets repq_vit --depth 12 --samples 32

``repquant_budget`` is repquant with the reconstruction budget of ``--budget-steps``
steps per block on ``--budget-batches`` calibration batches per step
(`Reconstruction.batches_per_step`); ``--batch`` splits the calibration images into
batches of that size (the same images for every preset).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
from timing import median_time

import repquant_jax as repquant
from repquant_zoo.models import vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets",
        nargs="+",
        choices=["minmax", "percentile", "repq_vit", "repquant", "repquant_budget"],
        default=["minmax", "percentile", "repq_vit", "repquant", "repquant_budget"],
    )
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="images per calibration batch (default: all)")
    parser.add_argument("--budget-steps", type=int, default=50)
    parser.add_argument("--budget-batches", type=int, default=1)
    args = parser.parse_args()
    budget = {
        "repquant_budget": lambda w, a: repquant.presets.repquant(
            w, a, reconstruction=repquant.Reconstruction(steps=args.budget_steps, batches_per_step=args.budget_batches)
        ),
    }

    config = vit.get_config("vit_s16", depth=args.depth)
    model = vit.VisionTransformer(config)
    images = jax.random.normal(jax.random.key(0), (args.samples, 224, 224, 3))
    params = model.init(jax.random.key(1), images[:1])
    apply_fn = lambda p, x: model.apply(p, x)  # noqa: E731

    start = time.perf_counter()
    plan = repquant.inspect(apply_fn, params, images)
    trace_s = time.perf_counter() - start
    forward = jax.jit(apply_fn)
    forward_s = median_time(lambda: forward(params, images))

    print(
        f"# transform cost, {time.strftime('%Y-%m-%d')}, {platform.machine()} {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s), jax {jax.__version__}"
    )
    batch = args.batch or args.samples
    batches = [images[i : i + batch] for i in range(0, args.samples, batch)]
    print(
        f"model: ViT-S/16 depth {args.depth}, {args.samples} calibration images in batches of {batch}, "
        f"W{args.bits}A{args.bits}"
    )
    if "repquant_budget" in args.presets:
        print(f"repquant_budget: {args.budget_steps} steps per block on {args.budget_batches} batch(es) per step")
    print(f"trace + analysis: {trace_s:.2f} s ({plan.summary()})")
    print(f"float forward of the calibration batch (jit, median of 5): {forward_s:.3f} s")
    print()
    print("| preset | transform (s) | / float forward | / repq_vit |")
    print("|---|---|---|---|")
    make = {name: getattr(repquant.presets, name) for name in ("minmax", "percentile", "repq_vit", "repquant")}
    make.update(budget)
    times: dict[str, float] = {}
    for name in args.presets:
        start = time.perf_counter()
        qparams, _ = repquant.transform(apply_fn, params, batches, make[name](args.bits, args.bits), verbose=False)
        jax.block_until_ready(jax.tree_util.tree_leaves(qparams))
        times[name] = time.perf_counter() - start
        vs = f"{times[name] / times['repq_vit']:.1f}x" if "repq_vit" in times else ""
        print(f"| {name} | {times[name]:.1f} | {times[name] / forward_s:.1f}x | {vs} |", flush=True)


if __name__ == "__main__":
    main()
