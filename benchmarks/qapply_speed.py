"""Speed of the fake-quant `qapply` relative to the float apply, measured in one run.

For a ViT-S-size model (12 layers, dim 384, 197 tokens, batch 8), a BERT-base-size
encoder (12 layers, dim 768, 128 tokens, batch 8) and a small LLaMA (4 layers, dim 256,
256 tokens, batch 8): median wall time of the jitted float apply and of `qapply` at W4A4
(repq_vit quantizers: per-tensor activations after the fold, log√2 softmax, per-channel
weights; the learned presets have the same quantizer structure), and their ratio, also
with the weights frozen onto their grids (`qapply.freeze`, inference only). The three
are timed round by round (float, qapply, frozen, float, ...), so that load drift on a
shared machine hits them alike. Also counts the kernels (top-level fusions) of the
optimized float and qapply programs: the difference is the number of extra passes over
memory that quantization costs (quantize/dequantize work that XLA did not fuse into the
kernels producing or consuming the activations).

    python benchmarks/qapply_speed.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
from timing import interleaved_times

import repquant_jax as repquant
from repquant_zoo.models import bert, llama, vit


def hlo_stats(compiled_text: str) -> str:
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    kernels = len(re.findall(r"^\s*\S+ = \S+ fusion\(", entry, flags=re.M))
    return f"{kernels} kernels, {compiled_text.count('custom-call')} custom-calls"


def models():
    key = jax.random.key(0)
    cfg = vit.get_config("vit_s16")
    m = vit.VisionTransformer(cfg)
    x = jax.random.normal(key, (8, 224, 224, 3))
    yield "ViT-S/16 (b8, 197 tok)", (lambda p, x: m.apply(p, x)), m.init(key, x[:1]), (x,)

    cfg = bert.BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    m = bert.BertEncoder(cfg)
    ids = jax.random.randint(key, (8, 128), 0, cfg.vocab_size)
    mask = jnp.ones((8, 128), jnp.int32)
    yield "BERT-base (b8, 128 tok)", (lambda p, i, a: m.apply(p, i, a)), m.init(key, ids, mask), (ids, mask)

    cfg = llama.llama_tiny_bytes()
    m = llama.Llama(cfg)
    ids = jax.random.randint(key, (8, 256), 0, cfg.vocab_size)
    yield "LLaMA tiny (b8, 256 tok)", (lambda p, i: m.apply(p, i)), m.init(key, ids), (ids,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(
        f"# qapply speed, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    print(
        "| model | float (ms) | qapply W4A4 (ms) | ratio | frozen qapply (ms) | ratio | float HLO | qapply HLO "
        "| frozen HLO |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, apply_fn, params, inputs in models():
        qparams, qapply = repquant.transform(apply_fn, params, [inputs], repquant.presets.repq_vit(4, 4), verbose=False)
        forward = jax.jit(apply_fn)
        frozen = repquant.freeze(qapply, qparams, *inputs)
        t_float, t_quant, t_frozen = (
            statistics.median(t)
            for t in interleaved_times(
                [lambda: forward(params, *inputs), lambda: qapply(qparams, *inputs), lambda: qapply(frozen, *inputs)],
                args.repeats,
            )
        )
        float_hlo = forward.lower(params, *inputs).compile().as_text()
        quant_hlo, frozen_hlo = (jax.jit(qapply._call).lower(q, *inputs).compile().as_text() for q in (qparams, frozen))
        print(
            f"| {name} | {1e3 * t_float:.1f} | {1e3 * t_quant:.1f} | {t_quant / t_float:.2f}x | "
            f"{1e3 * t_frozen:.1f} | {t_frozen / t_float:.2f}x | "
            f"{hlo_stats(float_hlo)} | {hlo_stats(quant_hlo)} | {hlo_stats(frozen_hlo)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
