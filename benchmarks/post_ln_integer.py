"""Post-LN BERT-base at W8A8: `integer_apply` vs the float model, timed in one run.

A BERT-base-size encoder (random init, 12 post-LN layers, dim 768, batch 8 x 128 tokens)
is quantized with the presets' defaults, which branch-fold every post-LN norm
(``unfoldable="branch"``): the matmuls after a norm get per-tensor int8 codes, so all of
them run as ``int8 x int8 -> int32``. Rows: the jitted float apply, `integer_apply` of
the export (weights stored as int8 codes), and the frozen fake-quant `qapply`; medians of
``--repeats`` interleaved rounds (`timing.interleaved_times`) and their ratio to float.
The matmul modes (`export.matmul_modes`) are counted per preset; with
``unfoldable="per_channel"`` (the only other exact policy) the norm consumers fall back to
dequantized float weights, which is shown for comparison.

    python benchmarks/post_ln_integer.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from timing import interleaved_times

import repquant_jax as repquant
from repquant_jax._src import export as rqe
from repquant_zoo.models import bert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    key = jax.random.key(0)
    cfg = bert.BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    model = bert.BertEncoder(cfg)
    ids = jax.random.randint(key, (8, 128), 0, cfg.vocab_size)
    mask = jnp.ones((8, 128), jnp.int32)
    params = model.init(key, ids, mask)
    apply_fn = lambda p, i, a: model.apply(p, i, a)  # noqa: E731
    inputs = (ids, mask)
    forward = jax.jit(apply_fn)
    print(
        f"# post-LN BERT-base W8A8, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}, {args.repeats} interleaved rounds"
    )
    print(
        "| preset | unfoldable | matmul modes | float (ms) | integer_apply (ms) | ratio | frozen qapply (ms) | ratio "
        "| integer vs qapply (rel.) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, unfoldable in (("repq_vit", "branch"), ("minmax", "branch"), ("repq_vit", "per_channel")):
        config = getattr(repquant.presets, preset)(8, 8, unfoldable=unfoldable)
        qparams, qapply = repquant.transform(apply_fn, params, [inputs], config, verbose=False)
        exported = rqe.export(qparams, qapply, *inputs)
        frozen = repquant.freeze(qapply, qparams, *inputs)
        integer = jax.jit(rqe.integer_apply)
        modes = collections.Counter(rqe.matmul_modes(exported, *inputs).values())
        ref, got = qapply(qparams, *inputs), integer(exported, *inputs)
        agreement = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        t_float, t_int, t_frozen = (
            statistics.median(t)
            for t in interleaved_times(
                [lambda: forward(params, *inputs), lambda: integer(exported, *inputs), lambda: qapply(frozen, *inputs)],
                args.repeats,
            )
        )
        mode_text = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
        print(
            f"| {preset} | {unfoldable} | {mode_text} | {1e3 * t_float:.0f} | {1e3 * t_int:.0f} | "
            f"{t_int / t_float:.2f}x | {1e3 * t_frozen:.0f} | {t_frozen / t_float:.2f}x | {agreement:.2g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
