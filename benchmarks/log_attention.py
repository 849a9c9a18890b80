"""integer_apply W8A8 vs float on the shipped ViT: the two forms of the log attn·V (issue #16).

`integer_apply` computes attn·V with a log attention operand as ``k`` shift-and-add
accumulators of V's integer codes (docs/method.md, "Softmax"), in one of two forms
(``export(..., log_matmul=...)``):

* ``int8_windows`` (the form before issue #16): the exponents cut into windows of 7,
  every (accumulator, window) pair one slice of a stacked ``int8`` operand, one
  ``int8 x int8 -> int32`` ``dot_general`` with an extra batch axis over those slices (8
  slices for 8-bit log√2 on 17 tokens) and V broadcast to each;
* ``pow2`` (the fast form): exact float32 powers of two (built from exponent bits) times
  V's integer codes, the ``k`` accumulators as one ``dot_general`` with one more free
  axis, combined with the ``k`` constants in a fused weighted sum.

Rows, all from the same model and the same 32 calibration images: float (``jax.jit``);
``minmax`` integer (every matmul int8); ``repq_vit`` (log√2, k = 2) integer in both forms;
``repq_vit`` with the default ``"log_root"`` softmax at 8 bits (k = ``default_log_root(8)``)
in both forms. Timing: one batch of ``--batch`` test images, ``--repeats`` interleaved
rounds (``benchmarks/timing.interleaved_times``), medians; the ratio is the median over
rounds of (candidate / float in the same round). Also top-1 on the 10k test set and the
relative difference of ``integer_apply`` to ``qapply`` on the timed batch.

    nice python benchmarks/log_attention.py        # ~2 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # common.py puts REPO itself on sys.path

from common import calibration_draw, fashion_mnist_test, load_vit, markdown_table  # noqa: E402
from qwix_compare import top1_padded  # noqa: E402
from timing import interleaved_times  # noqa: E402

import repquant_jax as repquant  # noqa: E402
from repquant_jax._src import export as rqe  # noqa: E402
from repquant_jax._src.quantizers import default_log_root  # noqa: E402

BITS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    t_start = time.perf_counter()
    apply_fn, variables, info = load_vit()
    images, labels = fashion_mnist_test()
    calib = [(b,) for b in calibration_draw(32, 0)]
    x = jax.device_put(jnp.asarray(images[: args.batch]))
    k8 = default_log_root(BITS)
    P = repquant.presets
    configs = {
        "minmax": P.minmax(BITS, BITS),
        "repq_vit log√2 (k = 2)": P.repq_vit(BITS, BITS, softmax_quantizer="log_sqrt2"),
        f"repq_vit log_root (k = {k8})": P.repq_vit(BITS, BITS, softmax_quantizer="log_root", softmax_log_root=k8),
    }
    float_fn = jax.jit(apply_fn)
    candidates = {"float": lambda: float_fn(variables, x)}
    forwards = {"float": lambda xb: float_fn(variables, xb)}
    agreement: dict[str, str] = {}
    for name, config in configs.items():
        qparams, qapply = repquant.transform(apply_fn, variables, calib, config, verbose=False)
        ref = qapply(qparams, x)
        forms = ("int8",) if name == "minmax" else ("int8_windows", "pow2")
        for form in forms:
            exported = rqe.export(qparams, qapply, x, log_matmul="pow2" if form == "int8" else form)
            row = f"{name} integer" + ("" if form == "int8" else f", {form}")
            fn = jax.jit(rqe.integer_apply)
            candidates[row] = lambda fn=fn, e=exported: fn(e, x)
            forwards[row] = lambda xb, fn=fn, e=exported: fn(e, xb)
            out = fn(exported, x)
            agreement[row] = f"{float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)):.1e}"
    names = list(candidates)
    times = interleaved_times([candidates[n] for n in names], args.repeats)
    rows = []
    for name, ts in zip(names, times):
        ratio = statistics.median(t / f for t, f in zip(ts, times[0]))
        p25, p75 = np.percentile(np.asarray(ts) * 1e3, [25, 75])
        acc = top1_padded(forwards[name], images, labels, args.batch)
        rows.append(
            [
                name,
                f"{acc:.2f}",
                f"{1e3 * statistics.median(ts):.1f}",
                f"{p25:.1f}–{p75:.1f}",
                f"{ratio:.2f}x",
                agreement.get(name, ""),
            ]
        )
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"# integer_apply W{BITS}A{BITS} vs float, log attn·V forms, {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}, model `{info['config']}`, "
        f"batch {args.batch}, {args.repeats} interleaved rounds, load {load} at the end, "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    print()
    print(
        markdown_table(
            ["row", "top-1 (%)", "median (ms)", "p25–p75 (ms)", "ratio vs float", "rel. diff. to qapply"], rows
        )
    )


if __name__ == "__main__":
    main()
