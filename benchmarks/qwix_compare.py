"""W8A8 on the shipped Fashion-MNIST ViT (or ViT-S/16): float vs qwix vs repquant-jax, accuracy and speed in one run.

``--model vit_s16`` runs the same rows on a random-init ViT-S/16 (224 x 224 inputs, 197
tokens) with random normal images, batch 8: the speed at a size where matmuls dominate;
its accuracy column is the top-1 agreement with the float model.

Every row uses the SAME model (``experiments/checkpoints/vit_fashion_mnist``, loaded by
``experiments/common.load_vit``) and the SAME calibration data (``--samples`` training images,
``common.calibration_draw(samples, seed)``, one batch). Rows:

* ``float``: the jitted float model (``jax.jit(apply_fn)``).
* ``qwix dynamic``: qwix PTQ W8A8 (``experiments/qwix_baseline.qwix_ptq(..., static=False)``):
  weights int8 symmetric absmax per output channel, quantized once; activations int8
  symmetric absmax with *dynamic* scales, computed at run time for every token (every row
  of every non-contracting axis). Quantizes every ``nn.Dense``, the attention einsums
  (q·kᵀ, attn·V) and the patch-embedding conv; norms, softmax, GELU stay float. Runs
  qwix's integer ``dot_general`` / conv on the CPU.
* ``qwix static``: the same with *static* activation scales calibrated on the calibration
  batch (qwix SRQ, ``static=True``, qwix's default ``act_batch_axes=(0,)``: one scale per
  token position, the mean of per-row absmax; see ``qwix_baseline``'s docstring).
* ``<preset> qapply``: ``repquant_jax._src.transform(apply_fn, variables, calib,
  presets.<preset>(8, 8))`` and the fake-quant ``qapply(qparams, x)`` (weights are
  re-quantized on every call; values stay float32). Presets: ``repq_vit`` and ``minmax`` by
  default (``--presets``); ``repq_vit_log2`` / ``repq_vit_log_sqrt2`` are repq_vit with the
  softmax quantizer's root k = 1 (pure log2) / 2 (log√2) instead of the 8-bit default 12.
* ``<preset> qapply frozen``: ``qapply`` on ``repquant.freeze(qapply, qparams, x)``: the weights baked
  onto their grids once (what qwix does with its weights), same outputs.
* ``<preset> integer``: ``repquant_jax._src.export.export(qparams, qapply, x)`` +
  ``integer_apply(exported, x)``: weights stored as int8 codes; every W8A8 site (per-tensor
  activation quantizer with integer zero point, 8-bit weight) is an ``int8 x int8 -> int32``
  ``dot_general`` with int32 zero-point corrections and one float rescale; repq_vit's
  log√2 attention probabilities times V is an integer shift-and-add (``int8`` matmuls
  against powers of two); other sites (the patch-embedding conv) dequantize their int8
  weights on the fly. The notes below the table count the sites per mode
  (``export.matmul_modes``).

Columns:

* top-1 (%): on the Fashion-MNIST test set (all 10,000 images by default; ``--eval-images``
  takes the first N), evaluated in batches of ``--batch`` (the last one zero-padded, so
  each candidate compiles one shape only).
* Δ vs float: top-1 minus float's top-1, in percentage points.
* median (ms): median wall time of one jitted call on the first ``--batch`` test images
  (inputs already on the device; output blocked on). Compile time is excluded (every
  candidate is warmed up before timing). The candidates are interleaved
  (``benchmarks/timing.interleaved_times``): round ``r`` times every candidate once, for
  ``--repeats`` rounds, each timed call right after an untimed one of the same candidate.
* p25–p75 (ms): the interquartile range of those timings (noise on a shared machine).
* ratio vs float: median over rounds of (candidate time / float time in the same round).
* build (s): wall time to make the candidate from the float model (calibration, quantize,
  freeze or export; includes the compiles these steps do), not counted in the above.

A row whose build or run raises reads ``fails: <reason>`` (traceback on stderr).

    python benchmarks/qwix_compare.py                    # ~2-3 min on 2 busy CPU cores
    python benchmarks/qwix_compare.py --repeats 5 --eval-images 2000   # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # common.py puts REPO itself on sys.path

from common import calibration_draw, fashion_mnist_test, load_vit, markdown_table, short_reason  # noqa: E402
from qwix_baseline import qwix_ptq  # noqa: E402
from timing import interleaved_times  # noqa: E402

import repquant_jax as repquant  # noqa: E402
from repquant_jax._src import export as rqe  # noqa: E402
from repquant_zoo.models import vit  # noqa: E402

BITS = 8
#: rows with a preset's softmax quantizer changed: k = 1 is pure log2 (a shift per
#: probability, one accumulator), k = 2 RepQ-ViT's log√2; the presets' 8-bit default is k = 12
PRESET_VARIANTS = {
    "repq_vit_log2": ("repq_vit", {"softmax_log_root": 1}),
    "repq_vit_log_sqrt2": ("repq_vit", {"softmax_log_root": 2}),
}


def top1_padded(forward: Callable[[jax.Array], jax.Array], images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """Top-1 (%) with every call on a ``[batch, ...]`` input (the last chunk zero-padded)."""
    correct = 0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        logits = np.asarray(forward(jnp.asarray(chunk)))[:n]
        correct += int((logits.argmax(-1) == labels[start : start + n]).sum())
    return 100.0 * correct / len(images)


def mode_counts(modes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for m in modes.values():
        counts[m] = counts.get(m, 0) + 1
    return ", ".join(f"{m}: {c}" for m, c in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timing rounds (each times every candidate once)")
    parser.add_argument(
        "--model",
        choices=["fashion_vit", "vit_s16"],
        default="fashion_vit",
        help="the shipped Fashion-MNIST ViT, or a random-init ViT-S/16 (224 x 224, 197 tokens) on random "
        "images, whose accuracy column is the top-1 agreement with the float model",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per timed call and per evaluation call (256; ViT-S: 8)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=0, help="first N test images (0: all 10,000; ViT-S: 64 random images)"
    )
    parser.add_argument("--samples", type=int, default=32, help="calibration images")
    parser.add_argument("--seed", type=int, default=0, help="calibration draw seed")
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["repq_vit", "minmax"],
        choices=["minmax", "percentile", "repq_vit", "repquant", *PRESET_VARIANTS],
    )
    args = parser.parse_args()
    t_start = time.perf_counter()

    import qwix

    dev = jax.devices()[0]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"# W{BITS}A{BITS}: float vs qwix vs repquant-jax on {'the Fashion-MNIST ViT' if args.model == 'fashion_vit' else 'ViT-S/16'}"
    )
    print()
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU core(s), jax device: {dev.platform} "
        f"({dev.device_kind}), load average at start {load}"
    )
    print(
        f"- jax {jax.__version__}, qwix {qwix.__version__}, repquant-jax {repquant.__version__}, "
        f"Python {platform.python_version()}"
    )

    if args.model == "fashion_vit":
        args.batch = args.batch or 256
        apply_fn, variables, info = load_vit()
        module = vit.VisionTransformer(vit.get_config(info["config"]))
        images, labels = fashion_mnist_test()
        if args.eval_images:
            images, labels = images[: args.eval_images], labels[: args.eval_images]
        calib = calibration_draw(args.samples, args.seed)  # one batch of `samples` training images
        model_line = (
            f"- model: `{info['config']}`; calibration: {args.samples} training images "
            f"(`calibration_draw({args.samples}, {args.seed})`), the same for every row; "
            f"top-1 on {len(images):,} test images"
            + (" (the full test set)" if len(images) == 10000 else f" (the first {len(images):,} of 10,000)")
        )
    else:
        args.batch = args.batch or 8
        module = vit.VisionTransformer(vit.get_config("vit_s16"))
        rng = np.random.default_rng(args.seed)
        images = rng.standard_normal((args.eval_images or 64, 224, 224, 3), np.float32)
        calib = [rng.standard_normal((args.samples, 224, 224, 3), np.float32)]  # one batch
        variables = module.init(jax.random.key(0), jnp.asarray(images[:1]))
        apply_fn = lambda p, x: module.apply(p, x)  # noqa: E731
        classes = jax.jit(lambda x: apply_fn(variables, x).argmax(-1))
        # the float model's classes: "top-1" is agreement with float
        labels = np.concatenate(
            [np.asarray(classes(images[i : i + args.batch])) for i in range(0, len(images), args.batch)]
        )
        model_line = (
            f"- model: random-init ViT-S/16 (dim 384, 12 blocks, 197 tokens, 1000 classes); calibration: "
            f"{args.samples} random normal images, the same for every row; top-1 column: agreement (%) with the "
            f"float model's class on {len(images)} other random images"
        )
    calib_batches = [(b,) for b in calib]
    x_time = jax.device_put(jnp.asarray(images[: args.batch]))
    print(model_line + f"; timing: batch of {args.batch} images, {args.repeats} interleaved rounds")
    print(flush=True)

    # ------------------------------------------------------------------ candidates
    rows: list[str] = []
    forwards: dict[str, Callable[[jax.Array], jax.Array]] = {}
    build_s: dict[str, float] = {}
    failed: dict[str, str] = {}
    notes: list[str] = []

    def add(name: str, build: Callable[[], Callable[[jax.Array], jax.Array]]) -> None:
        rows.append(name)
        t = time.perf_counter()
        try:
            forwards[name] = build()
        except Exception as e:  # noqa: BLE001 - a failing row is reported, not fatal
            traceback.print_exc(file=sys.stderr)
            failed[name] = f"fails: {short_reason(e)}"
        build_s[name] = time.perf_counter() - t

    float_jit = jax.jit(apply_fn)
    add("float", lambda: lambda x: float_jit(variables, x))

    for label, static in (("qwix dynamic", False), ("qwix static", True)):

        def build_qwix(static=static, label=label):
            qapply, n = qwix_ptq(module, variables, calib_batches, w_bits=BITS, a_bits=BITS, static=static)
            notes.append(f"{label} (`qwix_ptq` notes): " + "; ".join(n))
            return qapply

        add(label, build_qwix)

    for preset in args.presets:
        state: dict = {}

        def build_qapply(preset=preset, state=state):
            name, overrides = PRESET_VARIANTS.get(preset, (preset, {}))
            config = getattr(repquant.presets, name)(BITS, BITS, **overrides)
            qparams, qapply = repquant.transform(apply_fn, variables, calib_batches, config, verbose=False)
            state.update(qparams=qparams, qapply=qapply)
            return lambda x: qapply(qparams, x)

        add(f"{preset} qapply", build_qapply)

        def build_frozen(state=state):
            frozen = repquant.freeze(state["qapply"], state["qparams"], x_time)
            qapply = state["qapply"]
            return lambda x: qapply(frozen, x)

        def build_integer(preset=preset, state=state):
            exported = rqe.export(state["qparams"], state["qapply"], x_time)
            modes = rqe.matmul_modes(exported, x_time)
            notes.append(
                f"{preset} integer: matmul sites by mode: {mode_counts(modes)}; "
                + ", ".join(f"`{k}` {v}" for k, v in modes.items() if v != "int8")
            )
            return lambda x: rqe.integer_apply(exported, x)

        if f"{preset} qapply" in failed:
            for suffix in ("qapply frozen", "integer"):
                rows.append(f"{preset} {suffix}")
                failed[f"{preset} {suffix}"] = f"fails: transform failed ({failed[f'{preset} qapply'][7:]})"
                build_s[f"{preset} {suffix}"] = 0.0
            continue
        add(f"{preset} qapply frozen", build_frozen)
        add(f"{preset} integer", build_integer)

    # ------------------------------------------------------------------ accuracy (also compiles)
    acc: dict[str, float] = {}
    eval_s: dict[str, float] = {}
    for name in rows:
        if name in failed:
            continue
        t = time.perf_counter()
        try:
            acc[name] = top1_padded(forwards[name], images, labels, args.batch)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            failed[name] = f"fails: {short_reason(e)}"
            forwards.pop(name)
        eval_s[name] = time.perf_counter() - t
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: build {build_s[name]:.1f}s, top-1 "
            f"{acc.get(name, float('nan')):.2f}% ({eval_s[name]:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------ timing, interleaved
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for name, fwd in list(forwards.items()):  # warm-up: compiled by the evaluation already; once more
        try:
            jax.block_until_ready(fwd(x_time))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            failed[name] = f"fails: {short_reason(e)}"
            forwards.pop(name)
            times.pop(name)
    t_timing = time.perf_counter()
    names = list(forwards)
    measured = interleaved_times([lambda fwd=forwards[name]: fwd(x_time) for name in names], args.repeats)
    times.update(zip(names, measured))
    timing_s = time.perf_counter() - t_timing

    # ------------------------------------------------------------------ table
    float_acc = acc.get("float")
    float_times = times.get("float")
    table = []
    for name in rows:
        if name in failed:
            table.append([name, failed[name], "", "", "", "", f"{build_s[name]:.1f}"])
            continue
        ts = times[name]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        delta = "" if float_acc is None else f"{acc[name] - float_acc:+.2f}"
        ratio = "" if float_times is None else f"{statistics.median(t / f for t, f in zip(ts, float_times)):.2f}x"
        table.append(
            [
                name,
                f"{acc[name]:.2f}",
                delta,
                f"{1e3 * statistics.median(ts):.1f}",
                f"{1e3 * q[0]:.1f}–{1e3 * q[2]:.1f}",
                ratio,
                f"{build_s[name]:.1f}",
            ]
        )
    print(
        markdown_table(
            ["row", "top-1 (%)", "Δ vs float (pp)", "median (ms)", "p25–p75 (ms)", "ratio vs float", "build (s)"], table
        )
    )
    print()
    for n in notes:
        print(f"- {n}")
    print()
    print(f"Total run time {time.perf_counter() - t_start:.0f} s (timing rounds {timing_s:.0f} s).")


if __name__ == "__main__":
    main()
