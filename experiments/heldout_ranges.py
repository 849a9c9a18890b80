"""Ranges that hold on unseen inputs: W16 error on the calibration batch and on held-out batches.

At 16 bits a quantized model should be float up to rounding, also on inputs that
calibration did not see. For every model (the float32 third-party cases of
``tests/thirdparty``, the tiny models of ``tests/zoo.py``, the shipped Fashion-MNIST ViT)
and every preset at W16A16 (16-bit inputs, softmax quantizer uniform) this measures the
relative output error against float on the calibration batch and on held-out batches
(``harness.heldout_batch``: new token ids, new normal inputs; for the ViT, test images).
It also measures the shipped ViT's top-1 with repq_vit at W4A4 and W6A6 (3 calibration
draws of 32 images, as ``experiments/ptq_table.py``), so that the low-bit quality can be
compared before and after a change of the calibration rules.

    python experiments/heldout_ranges.py --label after
    python experiments/heldout_ranges.py --label before --library /path/to/older/copy
    python experiments/heldout_ranges.py --table     # both JSONs -> the results table

``--library`` measures the ``repquant_jax`` package found under another folder (a copy
of an older version) instead of the installed one. Each run writes
``experiments/logs/heldout_ranges_<label>.json``; ``--table`` writes
``experiments/results/heldout_ranges.md`` from the ``before`` and ``after`` files.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "experiments"))
if "--library" in sys.argv:  # before importing repquant_jax: bypass the editable install
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, sys.argv[sys.argv.index("--library") + 1])

import numpy as np  # noqa: E402
import zoo  # noqa: E402
from thirdparty import harness  # noqa: E402

import repquant_jax as repquant  # noqa: E402

LOGS = REPO / "experiments" / "logs"
RESULTS = REPO / "experiments" / "results"
SUITES = ("test_transformers_flax", "test_gemma", "test_equinox", "test_flax_modules")
PRESETS = ("minmax", "percentile", "repq_vit", "repquant")
HELDOUT_BATCHES = 3
#: calibration batches of the test-suite models (their batches hold 1-2 samples): 32
#: samples as RepQ-ViT's calibration set, where the batch size is 2
CALIB_BATCHES = 16
TARGET = 1e-3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def models(selected: set[str] | None):
    """``(name, builder)``: builder returns ``(apply_fn, params, calib_batch, heldout_batches)``."""

    def wanted(name: str) -> bool:
        return selected is None or any(s in name for s in selected)

    for suite in SUITES:
        try:
            module = importlib.import_module(f"thirdparty.{suite}")
        except BaseException as err:  # a missing optional package (pytest.skip is a BaseException)
            log(f"skipping {suite}: {type(err).__name__}: {err}")
            continue
        for name, builder in module.CASES.items():
            if wanted(name):

                def build(builder=builder):
                    case = builder("float32")
                    return case.apply_fn, case.params, *_batches(tuple(case.batch))

                yield name, build
    for name, builder in zoo.ALL.items():
        if wanted(f"zoo:{name}"):

            def build_zoo(builder=builder):
                m = builder()
                return m.apply_fn, m.params, *_batches(tuple(m.inputs))

            yield f"zoo:{name}", build_zoo
    if wanted("vit_fashion_mnist"):

        def build_vit():
            from common import calibration_draw, fashion_mnist_test, load_vit

            apply_fn, variables, _ = load_vit()
            images, _ = fashion_mnist_test()
            calib = [(calibration_draw(32, 0)[0],)]
            held = [(images[i * 32 : (i + 1) * 32],) for i in range(HELDOUT_BATCHES)]
            return apply_fn, variables, calib, held

        yield "vit_fashion_mnist (32 images)", build_vit


def _batches(batch: tuple) -> tuple[list, list]:
    """``(calibration batches, held-out batches)``: the case's own batch and
    ``CALIB_BATCHES - 1`` more like it, and `HELDOUT_BATCHES` others."""
    calib = [batch] + [harness.heldout_batch(batch, 1000 + i) for i in range(CALIB_BATCHES - 1)]
    return calib, [harness.heldout_batch(batch, 100 + i) for i in range(HELDOUT_BATCHES)]


def w16_config(preset: str, repquant_steps: int) -> repquant.QuantConfig:
    overrides: dict = dict(input_bits=16, softmax_quantizer="uniform")
    if preset == "repquant":
        overrides.update(
            dual_clipping=repquant.DualClipping(steps=repquant_steps),
            reconstruction=repquant.Reconstruction(steps=repquant_steps),
        )
    return getattr(repquant.presets, preset)(16, 16, **overrides)


def errors(qapply, qparams, apply_fn, params, batches) -> float:
    """Relative output error over all ``batches`` together."""
    num = den = 0.0
    for b in batches:
        want = [np.asarray(x, np.float64) for x in _leaves(apply_fn(params, *b))]
        got = [np.asarray(x, np.float64) for x in _leaves(qapply(qparams, *b))]
        num += sum(float(np.sum((g - w) ** 2)) for g, w in zip(got, want))
        den += sum(float(np.sum(w**2)) for w in want)
    return (num / max(den, 1e-30)) ** 0.5


def _leaves(tree):
    import jax

    return [x for x in jax.tree_util.tree_leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating)]


def measure_w16(args) -> dict:
    out: dict = {}
    for name, build in models(set(args.models) if args.models else None):
        try:
            apply_fn, params, calib, held = build()
        except Exception as err:
            log(f"{name}: cannot build: {type(err).__name__}: {err}")
            continue
        row = {}
        for preset in args.presets:
            t = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q, qa = repquant.transform(
                        apply_fn, params, calib, w16_config(preset, args.repquant_steps), verbose=False
                    )
                row[preset] = dict(
                    calib=errors(qa, q, apply_fn, params, calib[:1]),
                    heldout=errors(qa, q, apply_fn, params, held),
                    seconds=time.perf_counter() - t,
                )
            except Exception as err:
                traceback.print_exc()
                row[preset] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:100]}")
            log(f"{name} {preset}: {row[preset]}")
        out[name] = row
    return out


def measure_vit_lowbit(args) -> dict:
    import jax
    import jax.numpy as jnp
    from common import calibration_draw, fashion_mnist_test, load_vit, top1

    apply_fn, variables, _ = load_vit()
    images, labels = fashion_mnist_test()
    out: dict = {}
    for bits in (4, 6):
        scores = []
        for seed in range(args.draws):
            t = time.perf_counter()
            calib = [(b,) for b in calibration_draw(32, seed)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q, qa = repquant.transform(apply_fn, variables, calib, repquant.presets.repq_vit(bits, bits))
            fwd = jax.jit(lambda x, q=q, qa=qa: qa(q, x))
            scores.append(top1(lambda x, fwd=fwd: fwd(jnp.asarray(x)), images, labels))
            log(f"vit repq_vit W{bits}A{bits} draw {seed}: {scores[-1]:.2f} ({time.perf_counter() - t:.0f}s)")
        out[f"W{bits}A{bits}"] = scores
    return out


def fmt(v: float) -> str:
    return f"{v:.2g}"


def _load(label: str) -> dict:
    """A run's results: its JSON, else (a run stopped before writing it) its log, and
    the logs of runs of single models with ``--label {label}_<model> --models <model>``."""
    path = LOGS / f"heldout_ranges_{label}.json"
    result = json.loads(path.read_text()) if path.exists() else {"w16": {}}
    pattern = re.compile(r"^\[[\d:]+\] (.+) (" + "|".join(PRESETS) + r"): (\{.*\})$")
    logs = [] if path.exists() else [LOGS / f"heldout_ranges_{label}.log"]
    for log_path in logs + sorted(LOGS.glob(f"heldout_ranges_{label}_*.log")):
        for line in log_path.read_text().splitlines():
            match = pattern.match(line)
            if match:
                result["w16"].setdefault(match[1], {})[match[2]] = ast.literal_eval(match[3])
    return result


def table() -> str:
    before, after = _load("before"), _load("after")
    for label, result in (("before", before), ("after", after)):  # runs with --skip-w16 --label X_lowbit
        lowbit = LOGS / f"heldout_ranges_{label}_lowbit.json"
        if lowbit.exists():
            result["vit_lowbit"] = json.loads(lowbit.read_text())["vit_lowbit"]
    lines = [
        "# Ranges that hold on unseen inputs (W16A16)",
        "",
        "Generated by `python experiments/heldout_ranges.py --table` from "
        "`experiments/logs/heldout_ranges_{before,after}*` (JSON, or the logs of runs stopped early).",
        "",
        "Relative output error against float at W16A16 (16-bit weights, activations and inputs; "
        "softmax quantizer uniform), each preset with its defaults otherwise "
        f"(repquant with 20 learning steps: `--repquant-steps`), float32 models. "
        f"Calibration: {CALIB_BATCHES} batches (the test case's own and more like it; "
        "for the ViT one batch of 32 training images). "
        "`calib`: on the first calibration batch; `held-out`: on "
        f"{HELDOUT_BATCHES} batches calibration did not see (`harness.heldout_batch`: redrawn "
        "token ids and normal inputs, masks kept; for the ViT, Fashion-MNIST test images). "
        f"Target: held-out ≤ {TARGET:g}. Cells: before → after.",
        "",
        "| model | " + " | ".join(f"{p} calib | {p} held-out" for p in PRESETS) + " |",
        "|---|" + "---|---|" * len(PRESETS),
    ]
    worst = {"before": 0.0, "after": 0.0}
    for name in after["w16"]:
        cells = []
        for p in PRESETS:
            b = before["w16"].get(name, {}).get(p, {})
            a = after["w16"][name].get(p, {})
            for key in ("calib", "heldout"):
                bv = fmt(b[key]) if key in b else "-"
                av = fmt(a[key]) if key in a else a.get("error", "-")
                mark = " ✗" if key == "heldout" and key in a and a[key] > TARGET else ""
                cells.append(f"{bv} → {av}{mark}")
                if key == "heldout":
                    worst["before"] = max(worst["before"], b.get(key, 0.0))
                    worst["after"] = max(worst["after"], a.get(key, 0.0))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Worst held-out error over all models and presets: {worst['before']:.3g} before, {worst['after']:.3g} after.",
        "",
        "## Low bit-widths: the shipped ViT, repq_vit, top-1 (%) on the 10k test images",
        "",
        "3 calibration draws of 32 training images (`calibration_draw(32, seed)`), as in `experiments/ptq_table.py`.",
        "",
        "| W/A | before (per draw) | before mean | after (per draw) | after mean |",
        "|---|---|---|---|---|",
    ]
    for key in ("W4A4", "W6A6"):
        b, a = before.get("vit_lowbit", {}).get(key, []), after.get("vit_lowbit", {}).get(key, [])
        if a or b:
            lines.append(
                f"| {key} | {', '.join(f'{x:.2f}' for x in b)} | {np.mean(b) if b else float('nan'):.2f} "
                f"| {', '.join(f'{x:.2f}' for x in a)} | {np.mean(a) if a else float('nan'):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after", help="name of the JSON written to experiments/logs/")
    parser.add_argument("--library", type=Path, default=None, help="folder holding the repquant_jax to measure")
    parser.add_argument("--models", nargs="*", default=None, help="substrings of the model names to run")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--repquant-steps", type=int, default=20, help="dual clipping / AdaRound steps at W16")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws of the ViT W4A4/W6A6 top-1")
    parser.add_argument("--skip-w16", action="store_true")
    parser.add_argument("--skip-lowbit", action="store_true")
    parser.add_argument("--table", action="store_true", help="only write the results table")
    args = parser.parse_args()
    if args.table:
        RESULTS.joinpath("heldout_ranges.md").write_text(table())
        print(table())
        return
    log(f"library: {Path(repquant.__file__).parent.relative_to(Path(repquant.__file__).parents[1])}")
    path = LOGS / f"heldout_ranges_{args.label}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["repquant_steps"] = args.repquant_steps
    if not args.skip_w16:
        result.setdefault("w16", {}).update(measure_w16(args))
        path.write_text(json.dumps(result, indent=1))
    if not args.skip_lowbit:
        result["vit_lowbit"] = measure_vit_lowbit(args)
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
