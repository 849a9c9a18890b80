"""Transform cost at LLM shape: time per stage, peak memory and compile count against depth.

LLaMA-style decoders (`repquant_zoo.models.llama`, random init) of ``--depths`` layers at
``--dim`` (heads of 64, SwiGLU width ``--ffn``, vocabulary ``--vocab``), calibrated on
``--sequences`` random token sequences of ``--tokens`` tokens in batches of ``--batch``.
Each configuration runs in a fresh process, so its time includes compilation from a cold
start, as a user's first `transform` call would, and its peak resident set size is its own.

Per row: the transform's wall time and its ratio to one float forward of the calibration
set (jitted, compiled beforehand, median of 3), the time of each stage
(`TransformReport.stage_seconds`), the peak RSS the transform added over what the process
held before it (the model's params, the batches, the JAX runtime) and that minus the bytes
of the returned params' new leaves (the leaves the transform changed; the others are the
user's own arrays, shared), and the number of XLA compilations during the transform.

``--orders`` compares the calibration orders (``QuantConfig.calibration_order``):
``blocks`` (the default for one chunk of batches) drops each block's samples when the
block is done; ``chunks`` keeps every site's sample to the end of calibration, as the
library did before block-by-block calibration. With one chunk both give the same
quantizers.

    python benchmarks/llm_scale.py                              # repq_vit, 2/4/8/12 layers, both orders
    python benchmarks/llm_scale.py --depths 2 4 --presets repq_vit repquant_budget --orders blocks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from timing import child_result, maxrss_mb, median_time


def run_one(args: argparse.Namespace) -> None:
    """Child: one transform, then a JSON line with its figures on stdout."""
    import jax
    import numpy as np

    import repquant_jax as repquant
    from repquant_zoo.models import llama

    config = llama.LlamaConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.depth,
        n_heads=args.dim // 64,
        ffn_dim=args.ffn,
        max_seq_len=args.tokens,
    )
    model = llama.Llama(config)
    rng = np.random.default_rng(0)
    batches = [
        jax.numpy.asarray(rng.integers(0, args.vocab, (args.batch, args.tokens)), jax.numpy.int32)
        for _ in range(args.sequences // args.batch)
    ]
    params = model.init(jax.random.key(1), batches[0][:1])
    jax.block_until_ready((batches, params))
    apply_fn = lambda p, ids: model.apply(p, ids)  # noqa: E731

    presets = repquant.presets
    order = {"calibration_order": args.order, "calibration_chunk": max(16, len(batches))}
    if args.preset == "repquant_budget":
        preset = presets.repquant(
            args.bits,
            args.bits,
            reconstruction=repquant.Reconstruction(steps=50, batches_per_step=1),
            **order,
        )
    else:
        preset = getattr(presets, args.preset)(args.bits, args.bits, **order)

    compiles = [0]

    def listener(event: str, _duration: float, **_kwargs) -> None:
        compiles[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    before_mb = maxrss_mb()
    start = time.perf_counter()
    qparams, qapply = repquant.transform(apply_fn, params, batches, preset, verbose=False)
    jax.block_until_ready(jax.tree_util.tree_leaves(qparams))
    elapsed = time.perf_counter() - start
    peak_mb = maxrss_mb()
    n_compiles = compiles[0]

    float_fn = jax.jit(apply_fn)
    forward_s = median_time(lambda: [float_fn(params, b) for b in batches], repeats=3)
    param_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**20
    # The returned params share the leaves the transform left unchanged with `params`.
    pairs = zip(jax.tree_util.tree_leaves(qparams.params), jax.tree_util.tree_leaves(params))
    new_mb = sum(q.nbytes for q, p in pairs if q is not p) / 2**20
    print(
        json.dumps(
            {
                "preset": args.preset,
                "order": args.order,
                "depth": args.depth,
                "transform_s": elapsed,
                "float_forward_s": forward_s,
                "stages": dict(qapply.report.stage_seconds),
                "peak_rss_mb": peak_mb,
                "pre_rss_mb": before_mb,
                "param_mb": param_mb,
                "new_param_mb": new_mb,
                "compiles": n_compiles,
            }
        ),
        flush=True,
    )


def measure(args: argparse.Namespace, preset: str, order: str, depth: int) -> dict:
    """Parent: runs one configuration in a fresh interpreter and parses its JSON line."""
    flags = ["--vocab", "--dim", "--ffn", "--tokens", "--sequences", "--batch", "--bits"]
    cmd = [sys.executable, __file__, "--one", "--preset", preset, "--order", order, "--depth", str(depth)]
    for flag in flags:
        cmd += [flag, str(getattr(args, flag[2:]))]
    result = child_result(cmd, f"{preset} {order} depth {depth}")
    print(
        f"  {preset} {order} depth {depth}: transform {result['transform_s']:.1f} s "
        f"({result['transform_s'] / result['float_forward_s']:.1f}x float), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
        flush=True,
    )
    return result


def table(rows: list[dict]) -> list[str]:
    """Markdown rows; "per layer" is the growth per layer of the memory beyond the params."""
    stages = list(rows[0]["stages"])  # in pipeline order, as the report keeps them
    header = (
        "| preset | calibration order | layers | params (MB) | transform (s) | / float forward | "
        + " | ".join(stages)
        + " | new leaves (MB) | RSS added (MB) | added − new leaves (MB) | per layer (MB) | compiles |"
    )
    out = [header, "|" + "---|" * (header.count("|") - 1)]
    previous = None
    for r in rows:
        added = r["peak_rss_mb"] - r["pre_rss_mb"]
        beyond = added - r["new_param_mb"]
        growth = "-"
        if previous is not None and previous["preset"] == r["preset"] and previous["order"] == r["order"]:
            prev_beyond = previous["peak_rss_mb"] - previous["pre_rss_mb"] - previous["new_param_mb"]
            growth = f"{(beyond - prev_beyond) / (r['depth'] - previous['depth']):+.0f}"
        stage_cells = " | ".join(f"{r['stages'].get(s, 0.0):.1f}" for s in stages)
        out.append(
            f"| {r['preset']} | {r['order']} | {r['depth']} | {r['param_mb']:.0f} | {r['transform_s']:.1f} "
            f"| {r['transform_s'] / r['float_forward_s']:.1f}x | {stage_cells} | {r['new_param_mb']:.0f} "
            f"| {added:.0f} | {beyond:.0f} "
            f"| {growth} | {r['compiles']} |"
        )
        previous = r
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["repq_vit"])
    parser.add_argument("--orders", nargs="+", default=["chunks", "blocks"], choices=["chunks", "blocks"])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--order", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    import jax

    command = "python benchmarks/llm_scale.py " + " ".join(sys.argv[1:])
    lines = [
        f"# LLM-shape transform cost, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
        f"{jax.devices()[0].platform}, {os.cpu_count()} CPU core(s), load average {os.getloadavg()[0]:.1f} "
        f"at start, jax {jax.__version__}",
        f"# `{command.strip()}`: LLaMA-style, dim {args.dim}, ffn {args.ffn}, vocab {args.vocab}, "
        f"{args.sequences} x {args.tokens} calibration tokens in batches of {args.batch}, W{args.bits}A{args.bits}; "
        "stage columns in seconds",
        "",
    ]
    rows = [
        measure(args, preset, order, depth)
        for preset in args.presets
        for order in args.orders
        for depth in sorted(args.depths)
    ]
    print("\n".join(lines + table(rows)))


if __name__ == "__main__":
    main()
