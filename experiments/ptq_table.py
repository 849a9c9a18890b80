"""PTQ table (issue #6): float, minmax, percentile, repq_vit, repquant and qwix on three models.

Models and metrics:

* ``vit``: the shipped Fashion-MNIST ViT; top-1 (%) on the 10k test set. Calibration: images
  from the training split (``common.calibration_draw(samples, seed)``).
* ``minilm``: all-MiniLM-L6 sentence encoder on gensim's Lee benchmark (50 documents, 1225
  pairs): Spearman and Pearson correlation (×100) of the cosine similarity of each pair's
  embeddings with the mean human score, and the mean cosine (×100) between each document's
  quantized and float embedding. The Lee documents are padded to the longest one (rounded up
  to 8). Calibration: ``samples`` documents of ``lee_background`` (none of them in the
  benchmark), each truncated and padded to ``--minilm-tokens``. Extra rows keep the
  post-LN norm quantizers per tensor and per channel (``unfoldable="per_tensor"``,
  ``"per_channel"``; the presets branch-fold them).
* ``llama``: the tiny byte-level LLaMA (``experiments/checkpoints/tiny_llama``); perplexity
  per byte on ``--llama-windows`` fixed non-overlapping held-out windows of 129 bytes spread
  evenly over the held-out bytes (as ``train_tiny_llama.py``; exp of the mean next-byte
  cross-entropy over 128 predictions per window). Calibration: ``samples`` random 128-byte
  windows of the TRAIN split.

Rows: float, minmax, percentile, repq_vit, repquant (``repquant_jax._src.presets``), qwix dynamic
and qwix static (``experiments/qwix_baseline.qwix_ptq`` on the Linen module, same calibration
data). Columns W4A4, W6A6, W8A8. Each quantized cell: mean ± std over ``--draws`` calibration
draws (seeds 0..draws-1) of ``--samples`` samples, one calibration batch per draw. A qwix
cell that fails reads ``fails: <reason>``. Writes ``experiments/results/ptq_table.md``.

    python experiments/ptq_table.py                                   # full table (~45 min on 2 cores)
    python experiments/ptq_table.py --models vit --bits 8 --draws 1   # smoke
    python experiments/ptq_table.py --models llama --bits 8 --draws 1 --repquant-steps 5
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    REPO,
    RESULTS,
    calibration_draw,
    fashion_mnist_test,
    load_vit,
    log,
    machine,
    markdown_table,
    mean_std,
    short_reason,
    top1,
)
from qwix_baseline import qwix_ptq

import repquant_jax as repquant
from repquant_zoo.models import bert, llama, vit

P = repquant.presets
METHODS = ["minmax", "percentile", "repq_vit", "repquant"]
QWIX = {"qwix dynamic": False, "qwix static": True}
LLAMA_DIR = REPO / "experiments" / "checkpoints" / "tiny_llama"


# ----------------------------------------------------------------------------------------
# Models: each returns a dict with
#   apply_fn(params, *inputs), variables, module (Linen), draws (list of calib batch lists),
#   evaluate(forward) -> dict[metric, float] where forward(*inputs) -> outputs,
#   eval_inputs (for a forward pass), metrics (names), fmt, description, qwix_kwargs.
# ----------------------------------------------------------------------------------------


def setup_vit(args) -> dict:
    apply_fn, variables, info = load_vit()
    images, labels = fashion_mnist_test()
    module = vit.VisionTransformer(vit.get_config(info["config"]))
    draws = [[(b,) for b in calibration_draw(args.samples, seed)] for seed in range(args.draws)]

    def evaluate(forward):
        return {"top-1 (%)": top1(lambda x: forward(jnp.asarray(x)), images, labels)}

    return dict(
        apply_fn=apply_fn,
        variables=variables,
        module=module,
        draws=draws,
        evaluate=evaluate,
        metrics=["top-1 (%)"],
        qwix_kwargs={},
        description=(
            f"Model `{info['config']}` ({info.get('test_accuracy', '?')} test accuracy at training). "
            f"Top-1 (%) on the 10k Fashion-MNIST test set. Calibration: {args.samples} training images "
            "per draw (`calibration_draw(samples, seed)`)."
        ),
    )


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):  # average ranks of ties
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Spearman, Pearson) of a and b."""
    try:
        from scipy import stats

        return float(stats.spearmanr(a, b).statistic), float(stats.pearsonr(a, b).statistic)
    except ImportError:
        return float(np.corrcoef(_rank(a), _rank(b))[0, 1]), float(np.corrcoef(a, b)[0, 1])


def setup_minilm(args) -> dict:
    from repquant_zoo.data import text

    enc = bert.SentenceEncoder.from_pretrained()
    cfg, variables = enc.config, enc.variables
    module = bert.BertEncoder(cfg)
    docs = text.lee_documents()
    pairs, scores = text.lee_similarity_pairs()
    background = text.lee_background_documents()

    lee_encs = enc.tokenizer.encode_batch(docs)
    length = max(len(e.ids) for e in lee_encs)
    length = min(-(-length // 8) * 8, cfg.max_position_embeddings)

    def pad(id_lists, length=length):
        ids = np.full((len(id_lists), length), cfg.pad_token_id, np.int32)
        mask = np.zeros((len(id_lists), length), np.int32)
        for r, seq in enumerate(id_lists):
            seq = list(seq)[:length]
            ids[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
        return ids, mask

    lee_ids, lee_mask = pad([e.ids for e in lee_encs])
    bg_encs = enc.tokenizer.encode_batch(background)
    n_tok = args.minilm_tokens

    def truncated(e):
        ids = list(e.ids)
        return ids if len(ids) <= n_tok else ids[: n_tok - 1] + [ids[-1]]  # keep [SEP]

    draws = []
    for seed in range(args.draws):
        pick = np.random.default_rng([seed, 6]).choice(len(background), args.samples, replace=False)
        # Padded to the truncation length only: padding positions are computed but never
        # used, and must not dominate the calibration statistics.
        draws.append([pad([truncated(bg_encs[i]) for i in pick], n_tok)])

    float_forward = jax.jit(lambda ids, mask: module.apply(variables, ids, mask))
    ref = np.asarray(float_forward(lee_ids, lee_mask))

    def evaluate(forward):
        emb = np.asarray(forward(jnp.asarray(lee_ids), jnp.asarray(lee_mask)), np.float64)
        emb_n = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        cos = np.sum(emb_n[pairs[:, 0]] * emb_n[pairs[:, 1]], axis=1)
        spearman, pearson = correlations(cos, scores)
        ref_n = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        to_float = float(np.mean(np.sum(emb_n * ref_n, axis=1)))
        return {
            "Spearman ×100": 100 * spearman,
            "Pearson ×100": 100 * pearson,
            "cos(quant, float) ×100": 100 * to_float,
        }

    return dict(
        apply_fn=lambda p, ids, mask: module.apply(p, ids, mask),
        variables=variables,
        module=module,
        draws=draws,
        evaluate=evaluate,
        metrics=["Spearman ×100", "Pearson ×100", "cos(quant, float) ×100"],
        # Calibration documents are truncated, so their later positions are padding: qwix's default
        # static scales (one per token position) would be fit on padding there. Per-tensor instead.
        qwix_kwargs={"static": {"static_granularity": "per_tensor"}},
        # The post-LN norms cannot be folded whole (they also feed the residual): the
        # presets branch-fold them (unfoldable="branch"); rows with the other policies.
        variants={
            f"{x}, unfoldable {policy}": (x, {"unfoldable": policy})
            for policy in ("per_tensor", "per_channel")
            for x in ("repq_vit", "repquant")
        },
        description=(
            "Model: all-MiniLM-L6 (mean-pooled, normalised). Lee benchmark (gensim test data): 50 documents, "
            "1225 pairs. Spearman / Pearson: correlation (×100) between the cosine similarity of each pair's "
            "embeddings and the mean human similarity; cos(quant, float): mean over the 50 documents of the "
            f"cosine (×100) between quantized and float embedding. Lee documents padded to {length} tokens "
            f"(longest Lee document, rounded up to 8). Calibration: {args.samples} `lee_background` documents "
            f"per draw, each truncated and padded to {n_tok} tokens (ending in [SEP]). qwix static uses "
            "`static_granularity='per_tensor'` (shorter calibration documents end in padding). The presets "
            "branch-fold the post-LN norms (`unfoldable='branch'`: per-tensor codes equal to the per-channel "
            "ones on the matmul branch)"
            + (
                "; rows 'unfoldable per_tensor' (the fallback before branch folds) and 'unfoldable per_channel' "
                "(the calibration-time quantizers, no integer path) for comparison."
                if args.variants
                else "."
            )
        ),
    )


def heldout_windows(data: np.ndarray, n: int, length: int) -> np.ndarray:
    """``n`` non-overlapping windows of ``length`` bytes spread evenly over ``data`` (train_tiny_llama.py)."""
    n = min(n, len(data) // length)
    starts = np.linspace(0, len(data) - length, n).astype(np.int64)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int32)


def setup_llama(args) -> dict:
    import json

    from repquant_zoo.data import text

    info = json.loads((LLAMA_DIR / "training.json").read_text())
    cfg, variables = llama.load_pretrained(LLAMA_DIR)
    module = llama.Llama(cfg)
    sources = info["data"]["sources"]
    train, heldout = text.byte_split(text.training_corpus(sources), heldout_fraction=0.05, seed=0)
    seq = int(info.get("seq_len", 128))
    windows = heldout_windows(heldout, args.llama_windows, seq + 1)
    draws = []
    for seed in range(args.draws):
        starts = np.random.default_rng([seed, 7]).integers(0, len(train) - seq, args.samples)
        draws.append([(np.stack([train[s : s + seq] for s in starts]).astype(np.int32),)])

    def evaluate(forward, chunk: int = 64):
        total = 0.0
        for s in range(0, len(windows), chunk):
            w = windows[s : s + chunk]
            logits = jnp.asarray(forward(jnp.asarray(w[:, :-1])), jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            total -= float(jnp.take_along_axis(logp, jnp.asarray(w[:, 1:, None]), axis=-1).sum())
        return {"ppl/byte": math.exp(total / (windows.shape[0] * seq))}

    return dict(
        apply_fn=lambda p, ids: module.apply(p, ids),
        variables=variables,
        module=module,
        draws=draws,
        evaluate=evaluate,
        metrics=["ppl/byte"],
        qwix_kwargs={},
        description=(
            f"Model: tiny byte-level LLaMA ({info['model']}, {info['parameters']:,} parameters, held-out "
            f"ppl/byte {info['heldout_perplexity_per_byte']} at training on 1024 windows). Perplexity per byte "
            f"(lower is better) = exp(mean next-byte cross-entropy) on {len(windows)} non-overlapping held-out "
            f"windows of {seq + 1} bytes spread evenly over the held-out bytes ({len(windows) * seq} "
            f"predictions; `byte_split(training_corpus({sources}), 0.05, seed=0)`). Calibration: {args.samples} "
            f"random {seq}-byte windows of the TRAIN split per draw."
        ),
    )


SETUPS: dict[str, Callable[..., dict]] = {"vit": setup_vit, "minilm": setup_minilm, "llama": setup_llama}


# ----------------------------------------------------------------------------------------


def config_for(method: str, bits: int, steps: int | None, **overrides):
    if method == "repquant" and steps is not None:
        overrides = dict(
            dual_clipping=repquant.DualClipping(steps=steps),
            reconstruction=repquant.Reconstruction(steps=steps),
            **overrides,
        )
    return getattr(P, method)(bits, bits, **overrides)


def run_model(name: str, args) -> str:
    t_model = time.perf_counter()
    log(f"{name}: loading model and data")
    m = SETUPS[name](args)
    apply_fn, variables, evaluate, metrics = m["apply_fn"], m["variables"], m["evaluate"], m["metrics"]
    float_jit = jax.jit(apply_fn)
    t = time.perf_counter()
    float_scores = evaluate(lambda *x: float_jit(variables, *x))
    log(f"{name} float: {fmt_scores(float_scores)} ({time.perf_counter() - t:.0f}s)")

    rows: dict[str, dict[int, dict[str, str]]] = {}
    cell_times: list[str] = []
    columns = [f"W{b}A{b}" for b in args.bits]

    def cell(row: str, bits: int, per_draw: Callable[[list], dict]) -> None:
        t = time.perf_counter()
        values: dict[str, list[float]] = {k: [] for k in metrics}
        try:
            for calib in m["draws"]:
                for k, v in per_draw(calib).items():
                    values[k].append(v)
            out = {k: mean_std(v) for k, v in values.items()}
        except Exception as e:  # noqa: BLE001 - a failing cell is reported, not fatal
            traceback.print_exc(file=sys.stderr)
            out = {k: f"fails: {short_reason(e)}" for k in metrics}
        dt = time.perf_counter() - t
        rows.setdefault(row, {})[bits] = out
        cell_times.append(f"{row} W{bits}A{bits}: {dt:.0f}s")
        log(f"{name} {row} W{bits}A{bits}: {fmt_scores(out)} ({dt:.0f}s, {len(m['draws'])} draw(s))")

    variants = m.get("variants", {}) if args.variants else {}  # extra rows: label -> (preset, overrides)
    for row, (method, overrides) in {**{x: (x, {}) for x in METHODS}, **variants}.items():
        for bits in args.bits:
            config = config_for(method, bits, args.repquant_steps, **overrides)

            def per_draw(calib, config=config):
                qparams, qapply = repquant.transform(apply_fn, variables, calib, config, verbose=False)
                return evaluate(lambda *x: qapply(qparams, *x))

            cell(row, bits, per_draw)
    notes: dict[str, list[str]] = {}
    for row, static in QWIX.items():
        kwargs = m["qwix_kwargs"].get("static" if static else "dynamic", {})
        for bits in args.bits:

            def per_draw(calib, bits=bits, static=static, kwargs=kwargs, row=row):
                qapply, n = qwix_ptq(m["module"], variables, calib, w_bits=bits, a_bits=bits, static=static, **kwargs)
                notes.setdefault(row, n)
                return evaluate(qapply)

            cell(row, bits, per_draw)

    sections = [
        f"## {name}",
        m["description"]
        + (
            f" Quantized cells: mean ± std over {args.draws} calibration draw(s) of {args.samples} samples"
            + (
                f"; repquant with {args.repquant_steps} DualClipping and Reconstruction steps"
                if args.repquant_steps is not None
                else "; repquant with the preset's default steps"
            )
            + "."
        ),
    ]
    for metric in metrics:
        table_rows = [["float"] + [fmt_value(float_scores[metric])] * len(args.bits)]
        for row in METHODS + list(variants) + list(QWIX):
            table_rows.append([row] + [rows[row][b][metric] for b in args.bits])
        title = f"### {metric}\n\n" if len(metrics) > 1 else ""
        sections.append(title + markdown_table(["method"] + columns, table_rows))
    for row, n in notes.items():
        sections.append(
            f"{row} (notes from `qwix_ptq`, first bit width and draw):\n\n" + "\n".join(f"- {x}" for x in n)
        )
    sections.append(
        f"Time for {name}: {(time.perf_counter() - t_model) / 60:.1f} min; per cell: " + "; ".join(cell_times) + "."
    )
    return "\n\n".join(sections)


def fmt_value(v: float) -> str:
    return f"{v:.2f}"


def fmt_scores(scores: dict) -> str:
    return ", ".join(f"{k} {v if isinstance(v, str) else fmt_value(v)}" for k, v in scores.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 6, 8])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--repquant-steps",
        type=int,
        default=None,
        help="steps of repquant's DualClipping and Reconstruction (default: preset defaults)",
    )
    parser.add_argument("--minilm-tokens", type=int, default=64, help="calibration documents truncated to this")
    parser.add_argument("--llama-windows", type=int, default=128, help="held-out windows of 129 bytes")
    parser.add_argument(
        "--no-variants",
        dest="variants",
        action="store_false",
        help="only the presets' and qwix's rows (MiniLM's unfoldable-policy rows take most of its time)",
    )
    parser.add_argument("--out", default=str(RESULTS / "ptq_table.md"))
    args = parser.parse_args()

    start = time.perf_counter()
    command = "python experiments/ptq_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    sections: list[str] = []
    for name in args.models:  # the file is rewritten after each model, so a long run keeps what it has
        sections.append(run_model(name, args))
        done = "" if len(sections) == len(args.models) else f", {len(sections)} of {len(args.models)} models so far"
        text = "\n\n".join(
            [
                "# PTQ table: float, RepQuant presets and qwix",
                f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `{command.strip()}` "
                f"({(time.perf_counter() - start) / 60:.1f} min{done}). Same model, same calibration data for every "
                "row; qwix via `experiments/qwix_baseline.qwix_ptq` on the Linen module. A cell reading `fails: ...` "
                "raised that error (traceback on stderr).",
                *sections,
            ]
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
