"""GPTQ-style closed-form weight rounding vs nearest rounding, alone and as AdaRound's start (issue #14).

Rows: repq_vit (nearest rounding), repq_vit + GPTQ (``weight_rounding="gptq"``, matching
the quantized input's own output ``X_q W`` as published, or the float model's ``X_f W``,
the default; with act order), repquant with layer-wise AdaRound from nearest rounding and
from GPTQ's codes, and block-wise reconstruction from each (the gptq starts use the
default `GPTQ`). Cells: the model's metric as mean ± std over calibration draws
(the models and metrics of `ptq_table.py`), the gap closure (method − repq_vit) /
(float − repq_vit) of the mean, the median transform time, and the share of output
columns that kept GPTQ's codes (the others were better with nearest rounding on the
judged calibration rows). Writes experiments/results/weight_rounding.md.

    python experiments/weight_rounding.py                      # ViT W4A4, 3 draws
    python experiments/weight_rounding.py --models vit llama
"""

from __future__ import annotations

import re

from block_reconstruction import comparison_args, write_comparison

import repquant_jax as repquant

P = repquant.presets
LAYER = repquant.Reconstruction(granularity="layer")

VARIANTS = {
    "repq_vit": lambda b: P.repq_vit(b, b),
    "repq_vit + gptq (quantized target)": lambda b: P.repq_vit(
        b, b, weight_rounding="gptq", gptq=repquant.GPTQ(target="quantized")
    ),
    "repq_vit + gptq (float target)": lambda b: P.repq_vit(b, b, weight_rounding="gptq"),
    "repq_vit + gptq (float target, act order)": lambda b: P.repq_vit(
        b, b, weight_rounding="gptq", gptq=repquant.GPTQ(act_order=True)
    ),
    "repquant (layer-wise, nearest start)": lambda b: P.repquant(b, b, reconstruction=LAYER),
    "repquant (layer-wise, gptq start)": lambda b: P.repquant(b, b, weight_rounding="gptq", reconstruction=LAYER),
    "repquant, block-wise (nearest start)": lambda b: P.repquant(b, b),
    "repquant, block-wise (gptq start)": lambda b: P.repquant(b, b, weight_rounding="gptq"),
}

_KEPT = re.compile(r"(\d+)/(\d+) columns kept GPTQ's codes")


def gptq_columns(report: repquant.TransformReport) -> str:
    """``kept/total`` output columns that kept GPTQ's codes, over all weight sites."""
    kept = total = 0
    for site in report.sites:
        match = _KEPT.search(site.note)
        if match:
            kept, total = kept + int(match.group(1)), total + int(match.group(2))
    return f"{kept / total:.0%}" if total else ""


def main() -> None:
    args = comparison_args(__doc__.splitlines()[0], VARIANTS, [4], "weight_rounding.md")
    write_comparison(
        args,
        "weight_rounding.py",
        "Weight rounding: nearest vs GPTQ, alone and as AdaRound's start",
        "; the last column is the share of output columns per draw that kept GPTQ's codes (the others kept "
        "nearest rounding, better for them on the judged calibration rows)",
        VARIANTS,
        gptq_columns,
        "columns on GPTQ codes",
    )


if __name__ == "__main__":
    main()
