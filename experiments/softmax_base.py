"""Which base 2^(1/k) the softmax log quantizer should have at each bit-width (issue #14).

log√2 (k = 2) levels are √2 apart at every width, so its resolution does not grow with the
bits. This sweeps the root k of the ``"log_root"`` softmax quantizer (levels ``2^(-q/k)``,
docs/method.md "Softmax") with everything else as the ``repq_vit`` preset, on the two models
of ``experiments/ptq_table.py`` SETUPS ``"vit"`` and ``"llama"``:

* relative L2 output error against float on held-out inputs (ViT: logits of the first 256
  test images; LLaMA: logits of the first 16 held-out windows), and the model metric (ViT
  top-1 on the 10k test set, LLaMA perplexity per byte on the held-out windows), at W4A4,
  W6A6, W8A8, one calibration draw (seed 0); rows ``uniform`` (the softmax quantized
  uniformly, as in minmax/percentile) and ``k = 1, 2, 3, ...``;
* the relative error at W16A16 for larger k;
* the same errors with only the softmax outputs quantized (every other site float), which
  isolates the softmax quantizer's own error;
* the chosen k (lowest mean relative error of the two models per width, softmax-only at
  16 bits where the other sites dominate; ties to the smaller k) against log√2 on the ViT
  over 3 calibration draws.

Writes ``experiments/results/softmax_base.md``. With ``--resume LOG`` the sweep cells of an
earlier run's log are reused (they are logged as they finish) and the rest is measured;
the 3-draw comparison is always measured anew, every draw in the same process.

    nice python experiments/softmax_base.py            # ~60 min on 2 shared cores
    nice python experiments/softmax_base.py --resume LOG  # reuses the sweep cells of an interrupted run's log
    nice python experiments/softmax_base.py --smoke    # 4 and 8 bits, a few k
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from common import RESULTS, log, machine, markdown_table, mean_std
from ptq_table import SETUPS

import repquant_jax as repquant
from repquant_jax._src.quantizers import default_log_root

#: The roots swept per bit-width (a k with (2^b - 2)/k below ~2 leaves no range: not tried).
GRID = {4: (1, 2, 3, 4), 6: (1, 2, 3, 4, 6, 8), 8: (1, 2, 3, 4, 6, 8, 12, 16), 16: (2, 32, 256, 1024)}
SMOKE_GRID = {4: (1, 2, 4), 8: (2, 4), 16: (1024,)}
LINE = re.compile(r"\] (\w+) W(\d+)A\d+ (uniform|k = \d+)[^:]*: (\{.*\}) \(")


def relative_error(out, ref) -> float:
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def config(bits: int, root: int | None, only: tuple[str, ...] = ()):
    """repq_vit at ``bits`` with a uniform (``root=None``) or root-k log softmax quantizer;
    with ``only`` (softmax point names), every other site stays float."""
    rules = ()
    if only:
        keep = "|".join(f"^{re.escape(n)}$" for n in only)
        rules = (repquant.Rule(pattern=keep, target="activation"), repquant.Rule(pattern=".*", skip=True))
    if root is None:
        return repquant.presets.repq_vit(bits, bits, softmax_quantizer="uniform", rules=rules)
    return repquant.presets.repq_vit(bits, bits, softmax_quantizer="log_root", softmax_log_root=root, rules=rules)


def load(name: str, draws: int):
    m = SETUPS[name](SimpleNamespace(samples=32, draws=draws, llama_windows=128, minilm_tokens=64))
    if name == "vit":
        from common import fashion_mnist_test

        images, _ = fashion_mnist_test()
        m["error_inputs"] = (jnp.asarray(images[:256]),)
    else:  # the first 16 held-out windows the metric evaluates
        float_fn, captured = jax.jit(m["apply_fn"]), []

        def forward(ids):
            captured.append(ids)
            return float_fn(m["variables"], ids)

        m["evaluate"](forward)
        m["error_inputs"] = (captured[0][:16],)
    plan = repquant.inspect(m["apply_fn"], m["variables"], *m["draws"][0][0])
    m["softmax_points"] = tuple(p.name for p in plan.points if p.source == "softmax")
    m["float_out"] = jax.jit(m["apply_fn"])(m["variables"], *m["error_inputs"])
    return m


def measure(m, calib, cfg, metric: bool) -> dict[str, float]:
    qparams, qapply = repquant.transform(m["apply_fn"], m["variables"], calib, cfg, verbose=False)
    out = {"error": relative_error(qapply(qparams, *m["error_inputs"]), m["float_out"])}
    if metric:
        out.update(m["evaluate"](lambda *x: qapply(qparams, *x)))
    return out


def label(root: int | None) -> str:
    return "uniform" if root is None else f"k = {root}" + (" (log2)" if root == 1 else " (log√2)" if root == 2 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--resume", help="a log of an interrupted run: its sweep cells are reused")
    parser.add_argument("--out", default=str(RESULTS / "softmax_base.md"))
    args = parser.parse_args()
    grid = SMOKE_GRID if args.smoke else GRID
    bits_list = tuple(b for b in grid if b != 16)
    all_roots = tuple(sorted({r for b in bits_list for r in grid[b]}))
    done: dict[tuple[str, int, int | None], dict[str, float]] = {}
    if args.resume:
        for match in LINE.finditer(Path(args.resume).read_text()):
            name, bits, what, result = match.groups()
            root = None if what == "uniform" else int(what.split("=")[1])
            done[(name, int(bits), root)] = ast.literal_eval(result)
    start = time.perf_counter()
    command = "python experiments/softmax_base.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    models = {name: load(name, draws=3) for name in ("vit", "llama")}
    sweep: dict[str, dict[int, dict[int | None, dict[str, float]]]] = {}
    for name, m in models.items():
        metric = m["metrics"][0]
        float_score = m["evaluate"](lambda *x, m=m: jax.jit(m["apply_fn"])(m["variables"], *x))[metric]
        m["float_score"] = float_score
        log(f"{name} float {metric} {float_score:.3f}")
        sweep[name] = {}
        for bits in bits_list + (16,):
            sweep[name][bits] = {}
            for root in (None,) + grid[bits]:
                t = time.perf_counter()
                r = done.get((name, bits, root))
                if r is None:
                    r = measure(m, m["draws"][0], config(bits, root), metric=bits != 16)
                    only = measure(m, m["draws"][0], config(bits, root, m["softmax_points"]), metric=False)
                    r["softmax_only_error"] = only["error"]
                sweep[name][bits][root] = r
                log(f"{name} W{bits}A{bits} {label(root)}: {r} ({time.perf_counter() - t:.0f}s)")

    chosen: dict[int, int] = {}
    for bits in bits_list + (16,):
        # at 16 bits the other sites' errors dominate the whole-model error: judge the softmax alone
        key = "softmax_only_error" if bits == 16 else "error"
        errors = {root: np.mean([sweep[n][bits][root][key] for n in models]) for root in grid[bits]}
        chosen[bits] = min(errors, key=lambda r: (round(errors[r], 4), r))

    sections = []
    for name, m in models.items():
        metric = m["metrics"][0]
        header = (
            ["softmax quantizer"]
            + [f"W{b}A{b} error" for b in bits_list]
            + [f"A{b} softmax-only error" for b in bits_list]
            + [f"W{b}A{b} {metric}" for b in bits_list]
        )
        rows = []
        for root in (None,) + all_roots:
            cell = lambda b, key, fmt, root=root: fmt(sweep[name][b][root][key]) if root in sweep[name][b] else "—"  # noqa: E731
            cells = [cell(b, "error", lambda v: f"{100 * v:.2f}%") for b in bits_list]
            cells += [cell(b, "softmax_only_error", lambda v: f"{100 * v:.3f}%") for b in bits_list]
            cells += [cell(b, metric, lambda v: f"{v:.2f}") for b in bits_list]
            rows.append([label(root)] + cells)
        sections.append(f"## {name} (float {metric} {m['float_score']:.2f})\n\n" + markdown_table(header, rows))
    rows16 = [
        [label(root)]
        + [f"{100 * sweep[n][16][root]['error']:.4f}%" for n in models]
        + [f"{100 * sweep[n][16][root]['softmax_only_error']:.5f}%" for n in models]
        for root in (None,) + grid[16]
    ]
    header16 = ["softmax quantizer"] + [f"{n} W16A16" for n in models] + [f"{n} A16 softmax only" for n in models]
    sections.append("## W16A16 relative error\n\n" + markdown_table(header16, rows16))
    sections.append(
        "## Chosen k (lowest mean relative error of the two models; at 16 bits softmax-only; ties to the smaller k)\n\n"
        + markdown_table(
            ["bits", "chosen k", "library default `default_log_root(bits)`"],
            [[str(b), str(chosen[b]), str(default_log_root(b))] for b in bits_list + (16,)],
        )
    )

    vit = models["vit"]
    metric = vit["metrics"][0]
    rows = []
    for bits in bits_list:
        for root in sorted({2, chosen[bits], default_log_root(bits)}) + [None]:
            t = time.perf_counter()
            # every draw anew (draw 0 too), so that a resumed run compares like with like
            results = [measure(vit, calib, config(bits, root), metric=True) for calib in vit["draws"]]
            errs = [100 * r["error"] for r in results]
            scores = [r[metric] for r in results]
            rows.append([f"W{bits}A{bits}", label(root), mean_std(errs) + "%", mean_std(scores)])
            log(f"vit 3 draws W{bits}A{bits} {label(root)}: {rows[-1][2:]} ({time.perf_counter() - t:.0f}s)")
    sections.append(
        f"## ViT, chosen and default k vs log√2, 3 calibration draws (mean ± std; float {metric} {vit['float_score']:.2f})\n\n"
        + markdown_table(["W/A", "softmax quantizer", "relative error", metric], rows)
    )
    intro = [
        "# Softmax quantizer: the base 2^(1/k) per bit-width",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `{command.strip()}` "
        f"({(time.perf_counter() - start) / 60:.1f} min). Everything as the `repq_vit` preset except the "
        'softmax quantizer: `softmax_quantizer="uniform"`, or `"log_root"` with `softmax_log_root=k` '
        "(levels 2^(-q/k); k = 1 is log2, k = 2 is log√2, RepQ-ViT's). Relative error: L2 of the quantized "
        "output minus float over L2 of float, on held-out inputs (ViT: logits of the first 256 test images; "
        "LLaMA: logits of the first 16 held-out windows). One calibration draw (seed 0) per cell in the sweep.",
    ]
    sections = intro + sections
    text = "\n\n".join(sections) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
