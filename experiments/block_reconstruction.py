"""Block-wise vs layer-wise reconstruction (issue #14) on the shipped models.

Rows: repq_vit, and repquant with layer-wise reconstruction
(`Reconstruction(granularity="layer")`), its default block-wise reconstruction (a block
keeps what it learned only if its own and the model's held-out error fall), block-wise
judged on the block's error alone (`accept="unit"`), with dual clipping judged by its
own error (`DualClipping(accept="unit")`), with QDrop, and with the whole model as one
unit (`granularity="model"`). Cells: the model's
metric as mean ± std over calibration draws (the models and metrics of `ptq_table.py`:
ViT top-1, tiny LLaMA perplexity per byte, MiniLM cosine to the float embeddings),
the gap closure (method − repq_vit) / (float − repq_vit), the median transform time, and
how many blocks kept what they learned per draw. Writes
experiments/results/block_reconstruction.md.

    python experiments/block_reconstruction.py                          # ViT W4A4 and W3A3, 3 draws
    python experiments/block_reconstruction.py --models llama --bits 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from common import RESULTS, log, machine, markdown_table
from ptq_table import SETUPS

import repquant_jax as repquant

P = repquant.presets

R = repquant.Reconstruction

VARIANTS = {
    "repq_vit": lambda b: P.repq_vit(b, b),
    "repquant, layer-wise": lambda b: P.repquant(b, b, reconstruction=R(granularity="layer")),
    "repquant, block-wise (the default)": lambda b: P.repquant(b, b),
    "repquant, block-wise, unit acceptance": lambda b: P.repquant(b, b, reconstruction=R(accept="unit")),
    "repquant, dual clipping judged by its own error": lambda b: P.repquant(
        b, b, dual_clipping=repquant.DualClipping(accept="unit")
    ),
    "repquant, block-wise + QDrop 0.5": lambda b: P.repquant(b, b, reconstruction=R(qdrop=0.5)),
    "repquant, whole model as one unit": lambda b: P.repquant(b, b, reconstruction=R(granularity="model")),
}

#: The metric the gap closure is computed on, where it is not the setup's first one: for
#: MiniLM the mean cosine to the float embeddings (issue #14), Spearman moves by ±2
#: between methods of equal cosine.
GAP_METRIC = {"minilm": "cos(quant, float) ×100"}


def kept_units(report) -> str:
    """How many reconstruction units kept what they learned, ``"kept/units"``."""
    units = [n for n in report.notes if n.startswith("reconstruction ")]
    return f"{sum(n.endswith('; kept') for n in units)}/{len(units)}" if units else ""


def run_model(name: str, args, variants=VARIANTS, detail=kept_units) -> tuple[str, list[list[str]]]:
    """One model's rows: per bit-width, repq_vit then each of ``args.variants`` over the
    draws, with ``detail(report)`` per draw in the last column."""
    m = SETUPS[name](args)
    apply_fn, variables, evaluate = m["apply_fn"], m["variables"], m["evaluate"]
    metric = GAP_METRIC.get(name, m["metrics"][0])
    float_jit = jax.jit(apply_fn)
    float_score = evaluate(lambda *x: float_jit(variables, *x))[metric]
    log(f"{name} float {metric}: {float_score:.4g}")
    rows = []
    for bits in args.bits:
        base = None
        for variant, make in variants.items():
            if variant != "repq_vit" and variant not in args.variants:
                continue
            scores, times, kept = [], [], []
            for seed, calib in enumerate(m["draws"]):
                start = time.perf_counter()
                qparams, qapply = repquant.transform(apply_fn, variables, calib, make(bits))
                times.append(time.perf_counter() - start)
                result = evaluate(lambda *x, q=qparams, f=qapply: f(q, *x))
                scores.append(result[metric])
                kept.append(detail(qapply.report))
                others = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != metric)
                log(
                    f"{name} W{bits}A{bits} {variant} draw {seed}: {scores[-1]:.4g} ({others}; "
                    f"{times[-1]:.0f} s) {kept[-1]}"
                )
            mean = statistics.mean(scores)
            std = statistics.pstdev(scores) if len(scores) > 1 else 0.0
            base = mean if base is None else base
            closure = "" if variant == "repq_vit" else f"{(mean - base) / (float_score - base):.2f}"
            rows.append(
                [
                    name,
                    f"W{bits}A{bits}",
                    variant,
                    f"{mean:.4g} ± {std:.2g}",
                    closure,
                    f"{statistics.median(times):.0f}",
                    " ".join(kept),
                ]
            )
    return f"- {name}: float {metric} {float_score:.4g}. {m['description']}", rows


def comparison_args(description: str, variants, bits: list[int], out: str) -> argparse.Namespace:
    """The command line of a comparison of ``variants`` against repq_vit (this script's,
    and `weight_rounding.py`'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", choices=list(SETUPS), default=["vit"])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=bits)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--minilm-tokens", type=int, default=64)
    parser.add_argument("--llama-windows", type=int, default=128)
    parser.add_argument(
        "--variants", nargs="+", choices=list(variants), default=list(variants), help="repq_vit is always run first"
    )
    parser.add_argument("--out", default=str(RESULTS / out))
    args = parser.parse_args()
    # the data options that differ from their defaults, for the command the table records
    args.data_options = "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}"
        for k in ("samples", "minilm_tokens", "llama_windows")
        if getattr(args, k) != parser.get_default(k)
    )
    return args


def write_comparison(args, script: str, title: str, note: str, variants, detail, detail_header: str) -> None:
    """Runs ``variants`` on each of ``args.models`` (`run_model`) and writes the table to
    ``args.out``, rewritten after each model so that a long run keeps what it has."""
    command = f"python experiments/{script} --models {' '.join(args.models)} --bits {' '.join(map(str, args.bits))}"
    command += args.data_options
    if set(args.variants) != set(variants):
        command += " --variants " + " ".join(f'"{v}"' for v in args.variants)
    descriptions, rows = [], []
    for name in args.models:
        description, model_rows = run_model(name, args, variants, detail)
        descriptions.append(description)
        rows += model_rows
        table = markdown_table(
            ["model", "bits", "method", "metric", "gap closure", "transform (s, median)", detail_header], rows
        )
        text = (
            f"# {title}\n\n`{command} --draws {args.draws}` on {machine()}. {args.draws} calibration draws (the "
            "same for every row); gap closure = (method − repq_vit) / (float − repq_vit) of the mean"
            f"{note}.\n\n" + "\n".join(descriptions) + "\n\n" + table + "\n"
        )
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    log(f"wrote {args.out}")


def main() -> None:
    args = comparison_args(__doc__.splitlines()[0], VARIANTS, [4, 3], "block_reconstruction.md")
    write_comparison(
        args, "block_reconstruction.py", "Block-wise reconstruction", "", VARIANTS, kept_units, "blocks kept per draw"
    )


if __name__ == "__main__":
    main()
