"""How `transform`'s wall time and peak memory grow with model depth and calibration size.

Two sweeps, for the ``repq_vit`` and ``repquant`` presets at W4A4:

* depth 6 / 12 / 24 blocks, with 32 calibration images;
* 8 / 32 / 128 calibration images (one batch), at depth 12.

The default model is ViT-Ti-size so that the whole benchmark finishes in about 15-20
minutes on a couple of busy CPU cores: a ViT with dim 192, 3 heads, MLP ratio 4, 224 x 224
images, patch 16 (197 tokens), 1000 classes, random init. ``--dim``, ``--heads`` and
``--image-size`` change it (``--dim 384 --heads 6`` is the ViT-S/16 of
``transform_cost.py``). Calibration images are seeded random normal arrays: only the
timing matters here.

``repquant`` runs with the preset's default learned steps (DualClipping 100 Adam steps per
fold group, Reconstruction 200 per weight site) unless ``--clip-steps`` /
``--recon-steps`` are given; the header says which were used.

Every configuration runs in a fresh subprocess (``--one``), so its time includes JIT
compilation from a cold start, as a user's first `transform` call would, and its peak
resident set size (``ru_maxrss``) is its own. The child also records the RSS peak just
before `transform` (JAX runtime, parameters, images), so the table shows the memory that
`transform` itself added. Each row gives time per layer (depth sweep) or per sample
(sample sweep) and the ratios to the sweep's smallest configuration next to the ideal
linear ratio.

    python benchmarks/transform_scaling.py                     # both sweeps, both presets
    python benchmarks/transform_scaling.py --presets repq_vit --depths 6 12
    python benchmarks/transform_scaling.py --dim 384 --heads 6 --recon-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from timing import child_result, maxrss_mb


def run_one(args: argparse.Namespace) -> None:
    """Child: one transform, then a JSON line with its time and memory on stdout."""
    import jax

    import repquant_jax as repquant
    from repquant_zoo.models import vit

    config = vit.ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch,
        dim=args.dim,
        num_heads=args.heads,
        depth=args.depth,
        num_classes=1000,
    )
    model = vit.VisionTransformer(config)
    images = jax.random.normal(jax.random.key(0), (args.samples, args.image_size, args.image_size, 3))
    params = model.init(jax.random.key(1), images[:1])
    jax.block_until_ready((images, params))
    apply_fn = lambda p, x: model.apply(p, x)  # noqa: E731

    overrides = {}
    if args.preset == "repquant":
        if args.clip_steps is not None:
            overrides["dual_clipping"] = repquant.DualClipping(steps=args.clip_steps)
        if args.recon_steps is not None:
            overrides["reconstruction"] = repquant.Reconstruction(steps=args.recon_steps)
    preset = getattr(repquant.presets, args.preset)(args.bits, args.bits, **overrides)

    before_mb = maxrss_mb()
    start = time.perf_counter()
    qparams, _ = repquant.transform(apply_fn, params, [images], preset, verbose=False)
    jax.block_until_ready(jax.tree_util.tree_leaves(qparams))
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "preset": args.preset,
                "depth": args.depth,
                "samples": args.samples,
                "transform_s": elapsed,
                "peak_rss_mb": maxrss_mb(),
                "pre_rss_mb": before_mb,
            }
        ),
        flush=True,
    )


def measure(args: argparse.Namespace, preset: str, depth: int, samples: int) -> dict:
    """Parent: runs one configuration in a fresh interpreter and parses its JSON line."""
    cmd = [
        sys.executable,
        __file__,
        "--one",
        "--preset",
        preset,
        "--depth",
        str(depth),
        "--samples",
        str(samples),
        "--bits",
        str(args.bits),
        "--dim",
        str(args.dim),
        "--heads",
        str(args.heads),
        "--image-size",
        str(args.image_size),
        "--patch",
        str(args.patch),
    ]
    if args.clip_steps is not None:
        cmd += ["--clip-steps", str(args.clip_steps)]
    if args.recon_steps is not None:
        cmd += ["--recon-steps", str(args.recon_steps)]
    start = time.perf_counter()
    result = child_result(cmd, f"{preset} depth {depth} samples {samples}")
    wall = time.perf_counter() - start
    print(
        f"  {preset:9s} depth {depth:3d} samples {samples:4d}: transform {result['transform_s']:7.1f} s, "
        f"peak RSS {result['peak_rss_mb']:6.0f} MB (process {wall:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return result


def table(rows: list[dict], axis: str) -> list[str]:
    """Markdown rows for one sweep of one preset; ratios are to the first (smallest) row."""
    base = rows[0]
    base_added = base["peak_rss_mb"] - base["pre_rss_mb"]
    out = []
    for r in rows:
        added = r["peak_rss_mb"] - r["pre_rss_mb"]
        added_ratio = f"{added / base_added:.2f}x" if base_added > 0 else "-"
        out.append(
            f"| {r['preset']} | {r['depth']} | {r['samples']} | {r['transform_s']:.1f} "
            f"| {r['transform_s'] / r[axis]:.2f} | {r['transform_s'] / base['transform_s']:.2f}x "
            f"| {r[axis] / base[axis]:g}x | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x "
            f"| {added:.0f} | {added_ratio} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["repq_vit", "repquant"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--depth-sweep-samples", type=int, default=32)
    parser.add_argument("--sample-counts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--sample-sweep-depth", type=int, default=12)
    parser.add_argument(
        "--clip-steps", type=int, default=None, help="repquant DualClipping steps (preset default if unset)"
    )
    parser.add_argument(
        "--recon-steps", type=int, default=None, help="repquant Reconstruction steps (preset default if unset)"
    )
    # Child mode: one configuration.
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    import jax

    import repquant_jax as repquant

    clip = repquant.DualClipping() if args.clip_steps is None else repquant.DualClipping(steps=args.clip_steps)
    recon = repquant.Reconstruction() if args.recon_steps is None else repquant.Reconstruction(steps=args.recon_steps)
    default = "preset defaults" if args.clip_steps is None and args.recon_steps is None else "reduced from the preset"
    tokens = (args.image_size // args.patch) ** 2 + 1
    header = [
        f"# transform scaling, {time.strftime('%Y-%m-%d')}, {platform.machine()} {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU core(s), load average {os.getloadavg()[0]:.1f} at start, jax {jax.__version__}",
        f"model: ViT dim {args.dim}, {args.heads} heads, MLP ratio 4, image {args.image_size}, patch {args.patch} "
        f"({tokens} tokens), random init; calibration: one batch of seeded random normal images",
        f"W{args.bits}A{args.bits}; presets {', '.join(args.presets)}; repquant learned steps ({default}): "
        f"DualClipping {clip.steps}/fold group, Reconstruction {recon.steps}/weight site",
        f"depth sweep at {args.depth_sweep_samples} samples, sample sweep at depth {args.sample_sweep_depth}; "
        "each configuration in a fresh process (time includes JIT compilation)",
    ]
    print("\n".join(header), flush=True)

    total_start = time.perf_counter()
    results: dict[tuple[str, int, int], dict] = {}

    def get(preset: str, depth: int, samples: int) -> dict:
        key = (preset, depth, samples)
        if key not in results:  # the shared configuration is measured once
            results[key] = measure(args, preset, depth, samples)
        return results[key]

    columns = (
        "| preset | depth | samples | transform (s) | {per} | time ratio | ideal | peak RSS (MB) "
        "| RSS ratio | added by transform (MB) | added ratio |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|"
    depth_lines, sample_lines = [], []
    for preset in args.presets:
        depth_lines += table([get(preset, d, args.depth_sweep_samples) for d in args.depths], "depth")
        sample_lines += table([get(preset, args.sample_sweep_depth, n) for n in args.sample_counts], "samples")

    for title, per, lines in (
        (f"vs depth ({args.depth_sweep_samples} calibration images)", "s / layer", depth_lines),
        (f"vs calibration images (depth {args.sample_sweep_depth})", "s / sample", sample_lines),
    ):
        print(f"\n## {title}\n")
        print(columns.format(per=per))
        print(rule)
        print("\n".join(lines))
    print()
    print(
        "Ratios are to the sweep's smallest configuration of the same preset; 'ideal' is linear growth. "
        "'added by transform' is the peak RSS minus the peak before transform (runtime, parameters, images)."
    )
    print(f"total benchmark time: {time.perf_counter() - total_start:.0f} s")


if __name__ == "__main__":
    main()
