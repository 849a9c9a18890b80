"""The trust table: third-party models and weight-sharing patterns at 16 bits.

For every case (the third-party suites in ``tests/thirdparty`` and the sharing patterns
in ``tests/zoo.py``) it prints the plan's counts, what happened to each norm group, and
the relative output error on the calibration batch of a near-lossless config (16 bits,
min-max, uniform softmax) with folds on and with ``fold_norms=False``. A correct library
gives errors at float rounding (about 1e-6 in float32) in both columns.

    python experiments/trust_table.py [--out experiments/results/trust_table.md]
    python experiments/trust_table.py --library /path/to/older/checkout   # "before"

``--library`` measures the ``repquant_jax`` package of another checkout (e.g. a
``git worktree`` of an older commit) instead of the installed one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
if "--library" in sys.argv:  # before importing repquant_jax: bypass the editable install
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, sys.argv[sys.argv.index("--library") + 1])

import zoo  # noqa: E402
from thirdparty import harness  # noqa: E402

import repquant_jax as repquant  # noqa: E402

SUITES = ("test_transformers_flax", "test_gemma", "test_equinox", "test_flax_modules")


def cases():
    """(name, builder returning a harness.Case) for every case that can be built here."""
    for name, builder in zoo.SHARING.items():

        def build(builder=builder):
            m = builder()
            return harness.Case(m.apply_fn, m.params, tuple(m.inputs), {})

        yield f"pattern: {name}", build
    for suite in SUITES:
        try:
            module = importlib.import_module(f"thirdparty.{suite}")
        except Exception as err:  # a missing optional package: say so in the table
            print(f"skipping {suite}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        for name, builder in module.CASES.items():
            for dtype in ("float32", "bfloat16"):
                yield f"{name} ({dtype})", lambda builder=builder, dtype=dtype: builder(dtype)


def measure(case: harness.Case) -> dict:
    plan = repquant.inspect(case.apply_fn, case.params, *case.batch)
    want = case.apply_fn(case.params, *case.batch)
    row = {"counts": plan.summary()}
    for label, config in (("fold", harness.w16_config()), ("no_fold", harness.w16_config(fold_norms=False))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q, qa = repquant.transform(case.apply_fn, case.params, [case.batch], config, verbose=False)
        row[label] = harness.relative_error(qa(q, *case.batch), want)
        if label == "fold":
            row["folded"] = sum(s.note.startswith("folded") for s in qa.report.sites)
            row["check_failed"] = sum("numerical check" in s.note for s in qa.report.sites)
            row["warnings"] = len(caught)
    row["not_foldable"] = sorted({g.reason.split(";")[0] for g in plan.groups if not g.foldable})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--library", type=Path, default=None, help="checkout whose repquant_jax to measure")
    args = parser.parse_args()
    print(f"library: {Path(repquant.__file__).parent}", file=sys.stderr)
    lines = [
        "| case | weights / act-matmuls / softmaxes / groups / foldable | folded | W16 error, folds on | W16 error, fold_norms=False | why groups are not foldable |",
        "|---|---|---|---|---|---|",
    ]
    for name, build in cases():
        try:
            row = measure(build())
        except Exception as err:
            lines.append(f"| {name} | error: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | | |")
            traceback.print_exc(file=sys.stderr)
            print(lines[-1], flush=True)
            continue
        c = row["counts"]
        counts = f"{c['weight_matmuls']} / {c['activation_matmuls']} / {c['softmaxes']} / {c['fold_groups']} / {c['foldable']}"
        folded = f"{row['folded']}" + (f" ({row['check_failed']} undone by the check)" if row["check_failed"] else "")
        why = "; ".join(row["not_foldable"])[:160]
        lines.append(f"| {name} | {counts} | {folded} | {row['fold']:.2g} | {row['no_fold']:.2g} | {why} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
