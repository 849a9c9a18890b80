"""Figures for the README/RESULTS: LayerNorm fold, softmax quantizer levels, PTQ vs bit width.

Writes three PNGs into ``experiments/figures/`` (matplotlib, Agg backend):

* ``ln_channel_ranges.png``: per-channel range (max - min over the calibration tokens) of
  a LayerNorm output feeding q/k/v (block 0's ``norm1`` by default), before the norm fold (docs/method.md, "Folding a norm")
  (original params) and after it (the folded params ``qparams.params`` of
  ``repquant_jax._src.transform(..., presets.repq_vit(b, b))``), for the shipped Fashion-MNIST
  ViT and its outlier stress variant (SYNTHETIC: ``diagnostics.inject_outliers``, as in
  ``ablation_vit.py``). Reference lines: the per-channel quantizer's clipping range
  ``s_c·(2^b - 1)`` before the fold, the folded per-tensor range ``s̃·(2^b - 1)`` after it,
  and the range a per-tensor quantizer fitted to the unfolded output would use.
* ``softmax_levels.png``: histogram of the attention probabilities of one attention layer
  on the calibration batch (log x axis) with the b-bit levels of the uniform, log2 and
  log√2 quantizers fitted by ``repquant_jax._src.calibration``.
* ``accuracy_vs_bits.png``: the first metric of each model of ``experiments/results/
  ptq_table.md`` (written by ``ptq_table.py``) against the bit width, one panel per model,
  mean ± std over calibration draws, float as a horizontal line.

    python experiments/figures.py
    python experiments/figures.py --table experiments/results/ptq_table_minilm160.md

The activations are read with ``repquant_jax._src.diagnostics.point_values`` at the activation
points repquant's quantizers use (``repquant_jax._src.inspect`` names them), so they are exactly
the tensors the quantizers were fitted to (in float: the figure shows no upstream
quantization).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, calibration_draw, load_vit, log  # noqa: E402

from repquant_jax._src.diagnostics import channel_ranges, point_values  # noqa: E402
from repquant_zoo.models import vit  # noqa: E402

FIGURES = REPO / "experiments" / "figures"

# Fallback metric names of the ptq_table sections that have a single metric (no ### title).
SINGLE_METRIC = {"vit": "top-1 (%)", "llama": "ppl/byte"}
# Models whose metric is better when lower.
LOWER_IS_BETTER = ("ppl",)
METHOD_COLORS = {
    "minmax": "tab:gray",
    "percentile": "tab:blue",
    "repq_vit": "tab:orange",
    "repquant": "tab:red",
    "qwix dynamic": "tab:green",
    "qwix static": "tab:olive",
}
EXTRA_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:cyan")
QUANTIZER_COLORS = {"uniform": "tab:blue", "log2": "tab:green", "log√2": "tab:red"}


# ---------------------------------------------------------------------------------------
# Activations at repquant's quantizer points


def softmax_point(apply_fn: Callable[..., Any], params: Any, inputs: Sequence[Any], block: int) -> str:
    """Name of the activation point holding block ``block``'s attention probabilities."""
    from repquant_jax._src.inspect import inspect

    plan = inspect(apply_fn, params, *inputs)
    names = [p.name for p in plan.points if p.source == "softmax" and p.name.startswith(f"blocks_{block}/")]
    if not names:
        raise ValueError(f"no softmax activation point in blocks_{block}")
    return names[0]


# ---------------------------------------------------------------------------------------
# Figure 1: LayerNorm-output channel ranges before / after the fold


@dataclasses.dataclass
class RangePanel:
    """Per-channel ranges of one norm output before and after the fold.

    Attributes:
        label: the model, e.g. ``"natural"`` or ``"stress ×16 (SYNTHETIC)"``.
        before: ``(C,)`` channel ranges of the original norm output.
        after: ``(C,)`` channel ranges of the folded norm output.
        channel_scale: ``(C,)`` the per-channel quantizer's scales (before the fold).
        tensor_scale: the folded per-tensor scale ``s̃ = mean(s)``.
        per_tensor_scale: scale of a per-tensor quantizer fitted to the unfolded output
            (what a per-tensor preset would use), or None.
        bits: activation bit width.
    """

    label: str
    before: np.ndarray
    after: np.ndarray
    channel_scale: np.ndarray
    tensor_scale: float
    per_tensor_scale: float | None
    bits: int

    def ratios(self) -> dict[str, float]:
        """Max / median channel range before and after the fold."""
        return {
            "before max/median": float(self.before.max() / np.median(self.before)),
            "after max/median": float(self.after.max() / np.median(self.after)),
        }


def ln_range_panel(
    apply_fn: Callable[..., Any], params: Any, calib: list[np.ndarray], point: str, bits: int, label: str
) -> RangePanel:
    """Computes one `RangePanel`: two transforms (folded and unfolded repq_vit) and two traces.

    Args:
        apply_fn: ``apply_fn(params, images)``.
        params: the model's parameters.
        calib: the calibration batches.
        point: the activation point of the norm output, e.g. ``"blocks_0/attn/query:input"``.
        bits: weight and activation bits of the ``repq_vit`` preset.
        label: the panel's model label.
    """
    import repquant_jax as repquant
    from repquant_jax._src import calibration

    folded, _ = repquant.transform(apply_fn, params, calib, repquant.presets.repq_vit(bits, bits), verbose=False)
    unfolded, _ = repquant.transform(
        apply_fn, params, calib, repquant.presets.repq_vit(bits, bits, fold_norms=False), verbose=False
    )
    channel_qp, tensor_qp = unfolded.activations[point], folded.activations[point]
    if channel_qp.axis is None or tensor_qp.axis is not None:
        raise ValueError(
            f"{point}: expected a per-channel quantizer folded to per tensor, got "
            f"axis {channel_qp.axis} (unfolded) and {tensor_qp.axis} (folded)"
        )
    batch = np.concatenate(calib)
    x = point_values(apply_fn, params, batch, names=[point])[point]
    x_folded = point_values(apply_fn, folded.params, batch, names=[point])[point]
    per_tensor = calibration.search_uniform(x, bits)
    return RangePanel(
        label=label,
        before=channel_ranges(x),
        after=channel_ranges(x_folded),
        channel_scale=np.asarray(channel_qp.scale, np.float64),
        tensor_scale=float(tensor_qp.scale),
        per_tensor_scale=float(per_tensor.scale),
        bits=bits,
    )


def plot_ln_channel_ranges(panels: Sequence[RangePanel], out: Path, title: str = "") -> Path:
    """One row per model: channel ranges before (left) and after (right) the fold.

    Args:
        panels: the models' `RangePanel`s.
        out: the PNG to write.
        title: figure title.

    Returns:
        ``out``.
    """
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.4 * len(panels)), squeeze=False, sharex=True)
    for row, panel in zip(axes, panels):
        levels = 2**panel.bits - 1
        channels = np.arange(len(panel.before))
        top = 1.6 * max(
            panel.before.max(),
            panel.after.max(),
            panel.channel_scale.max() * levels,
            panel.per_tensor_scale * levels if panel.per_tensor_scale else 0.0,
        )
        r = panel.ratios()
        ax = row[0]
        ax.bar(channels, panel.before, width=1.0, color="tab:blue", alpha=0.75, label="channel range (max − min)")
        ax.plot(
            channels,
            panel.channel_scale * levels,
            ".",
            color="black",
            ms=3,
            label=f"per-channel quantizer range $s_c(2^{{{panel.bits}}}-1)$",
        )
        if panel.per_tensor_scale:
            ax.axhline(
                panel.per_tensor_scale * levels,
                color="tab:purple",
                ls="--",
                lw=1.2,
                label=f"per-tensor {panel.bits}-bit range (no fold)",
            )
        ax.set_title(f"{panel.label}: before the fold (max/median {r['before max/median']:.1f})")
        ax = row[1]
        ax.bar(channels, panel.after, width=1.0, color="tab:orange", alpha=0.75, label="channel range (max − min)")
        ax.axhline(
            panel.tensor_scale * levels,
            color="black",
            ls="--",
            lw=1.2,
            label=f"folded per-tensor range $\\tilde s(2^{{{panel.bits}}}-1)$",
        )
        ax.set_title(f"{panel.label}: after the fold (max/median {r['after max/median']:.1f})")
        for ax in row:
            ax.set_ylim(0, top)
            ax.set_xlim(-0.5, len(channels) - 0.5)
            ax.set_ylabel("range of the norm output")
            ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    for ax in axes[-1]:
        ax.set_xlabel("channel")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------------------
# Figure 2: softmax values and quantizer levels


@dataclasses.dataclass
class QuantizerLevels:
    """The levels of one fitted quantizer, for the plot.

    Attributes:
        levels: every dequantized level (including 0).
        scale: the quantizer's scale.
        mse: its quantization MSE on the plotted values.
        zero_fraction: fraction of the (positive) values it maps to exactly 0.
    """

    levels: np.ndarray
    scale: float
    mse: float
    zero_fraction: float


def quantizer_levels(qp: Any, values: np.ndarray) -> QuantizerLevels:
    """All levels of a fitted `QuantParams` and its error on ``values``."""
    import jax.numpy as jnp

    from repquant_jax._src import quantizers as qz

    lo, hi = qz.code_range(qp)
    levels = np.asarray(qz.dequantize(jnp.arange(lo, hi + 1), qp), np.float64)
    fq = np.asarray(qz.fake_quant(jnp.asarray(values, jnp.float32), qp), np.float64)
    positive = values > 0
    return QuantizerLevels(
        levels=np.unique(levels),
        scale=float(qp.scale),
        mse=float(np.mean((fq - values) ** 2)),
        zero_fraction=float(np.mean(fq[positive] == 0)) if positive.any() else 0.0,
    )


def softmax_quantizers(values: np.ndarray, bits: int) -> dict[str, QuantizerLevels]:
    """Fits the uniform, log2 and log√2 quantizers as `repquant_jax._src.calibration` does."""
    from repquant_jax._src import calibration

    flat = np.asarray(values, np.float32).reshape(-1)
    fitted = {
        "uniform": calibration.search_uniform(flat, bits),
        "log2": calibration.search_log_sqrt2(flat, bits, kind="log2"),
        "log√2": calibration.search_log_sqrt2(flat, bits),
    }
    return {name: quantizer_levels(qp, flat) for name, qp in fitted.items()}


def plot_softmax_levels(
    values: np.ndarray, quantizers: Mapping[str, QuantizerLevels], bits: int, out: Path, title: str = ""
) -> Path:
    """Histogram of softmax values (log x) above rug rows of each quantizer's levels.

    Args:
        values: the attention probabilities (any shape).
        quantizers: name -> its `QuantizerLevels`.
        bits: the quantizers' bit width (for labels).
        out: the PNG to write.
        title: figure title.

    Returns:
        ``out``.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    positive = v[v > 0]
    all_levels = np.concatenate([q.levels[q.levels > 0] for q in quantizers.values()] + [positive[:1]])
    lo = 10 ** math.floor(math.log10(max(min(positive.min(), all_levels.min()), 1e-12)))
    bins = np.logspace(math.log10(lo), math.log10(max(1.0, positive.max()) * 1.001), 90)
    fig, (ax, rug) = plt.subplots(2, 1, figsize=(10, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ax.hist(positive, bins=bins, color="0.55", edgecolor="0.35", lw=0.3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("count")
    n_zero = int(v.size - positive.size)
    ax.set_title(title or "softmax values", fontsize=11)
    ax.text(
        0.01,
        0.96,
        f"{v.size:,} values" + (f" ({n_zero:,} exactly 0, not shown)" if n_zero else ""),
        transform=ax.transAxes,
        va="top",
        fontsize=9,
    )
    for name, q in quantizers.items():
        ax.axvline(
            q.levels.max(),
            color=QUANTIZER_COLORS.get(name, "black"),
            ls=":",
            lw=1.4,
            label=f"{name}: largest level {q.levels.max():.3g}",
        )
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9), fontsize=8, title="values above clip to", title_fontsize=8)
    labels = []
    for row, (name, q) in enumerate(quantizers.items()):
        color = QUANTIZER_COLORS.get(name, "black")
        shown = q.levels[q.levels > 0]
        rug.vlines(shown, row - 0.38, row + 0.38, color=color, lw=1.6)
        labels.append(f"{name}  s={q.scale:.3g}\nMSE {q.mse:.2e}, {100 * q.zero_fraction:.0f}% → 0")
    rug.set_yticks(range(len(labels)), labels, fontsize=8)
    rug.set_ylim(-0.6, len(labels) - 0.4)
    rug.invert_yaxis()
    rug.set_xlabel("attention probability (log scale)")
    rug.set_title(
        f"{bits}-bit nonzero levels (each quantizer also has the level 0; log kinds reserve their top code for it)",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------------------
# Figure 3: PTQ metric vs bit width, from ptq_table.md


@dataclasses.dataclass
class ModelTable:
    """The first metric table of one model section of ``ptq_table.md``.

    Attributes:
        model: the section name (``vit``, ``minilm``, ``llama``).
        metric: the metric's name.
        bits: the bit widths of the columns.
        rows: method -> per-column ``(mean, std)``; None for a failed or unreadable cell.
    """

    model: str
    metric: str
    bits: list[int]
    rows: dict[str, list[tuple[float, float] | None]]


_CELL = re.compile(r"^\s*(-?[0-9.]+(?:[eE][-+]?\d+)?)\s*(?:±\s*([0-9.]+(?:[eE][-+]?\d+)?))?\s*$")


def parse_cell(cell: str) -> tuple[float, float] | None:
    """``"88.92 ± 0.12"`` -> ``(88.92, 0.12)``, ``"88.92"`` -> ``(88.92, 0.0)``, else None."""
    m = _CELL.match(cell)
    if not m:
        return None
    return float(m.group(1)), float(m.group(2) or 0.0)


def parse_ptq_table(text: str) -> dict[str, ModelTable]:
    """Reads the first metric table of every ``## model`` section of a ptq_table markdown.

    Args:
        text: the markdown.

    Returns:
        Model -> its `ModelTable`, in file order.
    """
    tables: dict[str, ModelTable] = {}
    model, metric, lines = None, None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("## "):
            model, metric = line[3:].strip(), None
        elif line.startswith("### "):
            metric = line[4:].strip()
        elif line.startswith("|") and model is not None and model not in tables:
            header = [c.strip() for c in line.strip("|").split("|")]
            block = []
            i += 1
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            bits = [int(m.group(1)) if (m := re.match(r"W(\d+)", h)) else None for h in header[1:]]
            if header[0] == "method" and bits and all(b is not None for b in bits):
                rows = {r[0]: [parse_cell(c) for c in r[1:]] for r in block if not set(r[0]) <= set("-")}
                tables[model] = ModelTable(model, metric or SINGLE_METRIC.get(model, "metric"), bits, rows)
            continue
        i += 1
    return tables


def plot_accuracy_vs_bits(tables: Mapping[str, ModelTable], out: Path, title: str = "") -> Path:
    """One panel per model: metric vs bit width per method, float as a horizontal line.

    Methods are slightly offset along x so that their error bars do not overlap; one
    legend below the panels covers every method.

    Args:
        tables: from `parse_ptq_table`.
        out: the PNG to write.
        title: figure title.

    Returns:
        ``out``.
    """
    if not tables:
        raise ValueError("no model tables to plot")
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.6), squeeze=False)
    colors = dict(METHOD_COLORS)
    legend: dict[str, Any] = {}
    for ax, table in zip(axes[0], tables.values()):
        methods = [m for m in table.rows if m != "float"]
        width = 0.5 / max(len(methods), 1)
        for k, method in enumerate(methods):
            if method not in colors:
                colors[method] = EXTRA_COLORS[(len(colors) - len(METHOD_COLORS)) % len(EXTRA_COLORS)]
            cells = table.rows[method]
            xs = [b + (k - (len(methods) - 1) / 2) * width for b, c in zip(table.bits, cells) if c]
            ys = [c[0] for c in cells if c]
            es = [c[1] for c in cells if c]
            if not xs:
                continue
            ls = "-" if method in METHOD_COLORS else "--"
            handle = ax.errorbar(
                xs, ys, yerr=es, marker="o", ms=4, capsize=3, lw=1.3, ls=ls, color=colors[method], label=method
            )
            legend.setdefault(method, handle)
        float_cells = [c for c in table.rows.get("float", []) if c]
        if float_cells:
            value = float_cells[0][0]
            legend.setdefault("float", ax.axhline(value, color="black", ls=":", lw=1.4, label="float"))
            ax.annotate(
                f"float {value:g}",
                (0.0, value),
                xycoords=("axes fraction", "data"),
                xytext=(3, 3),
                textcoords="offset points",
                ha="left",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(table.bits, [f"W{b}A{b}" for b in table.bits])
        lower = any(key in table.metric.lower() for key in LOWER_IS_BETTER)
        ax.set_ylabel(f"{table.metric} ({'lower' if lower else 'higher'} is better)")
        ax.set_xlabel("bit width (weights / activations)")
        ax.set_title(table.model)
        ax.grid(alpha=0.3)
    fig.legend(
        list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 5), fontsize=8, frameon=False
    )
    if title:
        fig.suptitle(title, fontsize=11)
    rows = math.ceil(len(legend) / 5)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))
    return _save(fig, out)


def load_ptq_table(path: Path) -> dict[str, ModelTable]:
    """Parses ``path``; raises FileNotFoundError with a hint if it does not exist."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `python experiments/ptq_table.py` first, or pass "
            "--table with another table it wrote"
        )
    tables = parse_ptq_table(path.read_text())
    if not tables:
        raise ValueError(f"{path}: no '## model' section with a '| method | W.. |' table")
    return tables


# ---------------------------------------------------------------------------------------


def _save(fig: Any, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=str(RESULTS / "ptq_table.md"), help="ptq_table markdown to plot")
    parser.add_argument("--out-dir", default=str(FIGURES))
    parser.add_argument("--samples", type=int, default=32, help="calibration images")
    parser.add_argument("--seed", type=int, default=0, help="calibration draw")
    parser.add_argument("--bits", type=int, default=4, help="bit width of figures 1 and 2")
    parser.add_argument("--factor", type=float, default=16.0, help="outlier factor of the stress variant")
    parser.add_argument("--norm-block", type=int, default=0, help="block whose norm1 output figure 1 shows")
    parser.add_argument("--softmax-block", type=int, default=0, help="block whose softmax figure 2 shows")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    table_path = Path(args.table)
    try:  # fail before the slow part
        tables = load_ptq_table(table_path)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")

    from repquant_jax._src.diagnostics import inject_outliers

    start = time.perf_counter()
    apply_fn, variables, info = load_vit()
    calib = calibration_draw(args.samples, args.seed)
    stressed = inject_outliers(apply_fn, variables, calib[0][:8], factor=args.factor, channels=4)
    point = f"blocks_{args.norm_block}/attn/query:input"
    panels = []
    for label, params in (("natural", variables), (f"stress ×{args.factor:g} (SYNTHETIC)", stressed)):
        panel = ln_range_panel(apply_fn, params, calib, point, args.bits, label)
        log(
            f"{label}: channel range max {panel.before.max():.2f} / median {np.median(panel.before):.2f} before the "
            f"fold, max {panel.after.max():.2f} / median {np.median(panel.after):.2f} after; "
            f"s̃·(2^b-1) = {panel.tensor_scale * (2**args.bits - 1):.2f}, per-tensor (no fold) "
            f"{panel.per_tensor_scale * (2**args.bits - 1):.2f}; {panel.ratios()}"
        )
        panels.append(panel)
    written = [
        plot_ln_channel_ranges(
            panels,
            out_dir / "ln_channel_ranges.png",
            title=f"Fashion-MNIST ViT ({info['config']}), blocks_{args.norm_block}.norm1 output (input of q/k/v), "
            f"{args.samples} calibration images × {vit.get_config(info['config']).num_tokens} tokens;\n"
            f"fold of repquant_jax._src.transform(..., presets.repq_vit({args.bits}, {args.bits}))",
        )
    ]

    sm_point = softmax_point(apply_fn, variables, calib, args.softmax_block)
    values = point_values(apply_fn, variables, np.concatenate(calib), names=[sm_point])[sm_point]
    quantizers = softmax_quantizers(values, args.bits)
    for name, q in quantizers.items():
        log(
            f"softmax {name}: s={q.scale:.4g} MSE={q.mse:.3e} zero fraction={q.zero_fraction:.3f} "
            f"smallest level {q.levels[q.levels > 0].min():.3g}"
        )
    written.append(
        plot_softmax_levels(
            values,
            quantizers,
            args.bits,
            out_dir / "softmax_levels.png",
            title=f"Attention probabilities of blocks_{args.softmax_block} (all heads, {args.samples} calibration images)\n"
            f"and the {args.bits}-bit levels of the quantizers fitted to them by repquant_jax._src.calibration",
        )
    )

    written.append(
        plot_accuracy_vs_bits(
            tables,
            out_dir / "accuracy_vs_bits.png",
            title=f"PTQ: first metric vs bit width (from {table_path.name}; mean ± std over calibration draws)",
        )
    )
    log(
        f"wrote {', '.join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in written)} "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
