"""Trains the tiny byte-level LLaMA on packaged English text; writes the project's checkpoint.

Data: :func:`repquant_zoo.data.text.training_corpus` (Lee background news + the Wikipedia
extract of gensim's test data + WordNet glosses), split by
:func:`repquant_zoo.data.text.byte_split` into training bytes and 5% held-out bytes by whole
documents/paragraphs. Model: :func:`repquant_zoo.models.llama.llama_tiny_bytes` (vocab 256,
4 layers, 4 heads) shrunk by default to dim 192 and SwiGLU width 512 (1.87 M parameters) so
that training fits in about 25 minutes on 2 shared CPU cores (``--dim 256 --ffn 768`` gives
the unshrunk 3.54 M-parameter model, about twice as slow per step; the shipped 800-step run
took 28 minutes at a load average of 8-11, about 2.1 s/step, against 1.2 s/step measured at
a load of 4-5). Training: random windows of ``--seq-len + 1`` bytes from the training part,
next-byte cross entropy, AdamW (linear warmup + cosine decay, global-norm clipping 1.0,
weight decay on Dense kernels and the embedding only, not on RMSNorm scales). Everything is
seeded: the same seed (and jax/XLA version, on the same backend) gives the same checkpoint.

Held-out perplexity is per byte: ``exp(mean next-byte NLL)``. During training it is measured
on ``--eval-windows`` fixed held-out windows; at the end on ``--final-eval-windows``
(non-overlapping windows spread evenly over the held-out bytes).

Writes (``--out``, default ``experiments/checkpoints/tiny_llama/``):

* ``config.json`` + ``model.safetensors`` (HF LLaMA layout, float32) through
  :func:`repquant_zoo.models.llama.save_pretrained`; load with ``llama.load_pretrained``;
* ``training.json``: config, steps, seed, optimizer, corpus sizes, held-out perplexity,
  training minutes, the eval history, and the RMSNorm-output channel-range profile
  (:func:`repquant_jax._src.diagnostics.channel_range_profile` on ``--profile-windows`` held-out
  windows: per norm output feeding matmuls, max over channels of (max - min) divided by the
  median channel range; DeiT-S has about 30, a model without outliers 1-3).

Usage::

    python experiments/train_tiny_llama.py            # the shipped checkpoint (800 steps)
    python experiments/train_tiny_llama.py --steps 30 --out /tmp/tl   # timing run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from repquant_jax._src.diagnostics import channel_range_profile  # noqa: E402
from repquant_zoo.data import text  # noqa: E402
from repquant_zoo.models import llama  # noqa: E402

DEFAULT_OUT = REPO / "experiments" / "checkpoints" / "tiny_llama"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=192, help="llama_tiny_bytes' dim is 256")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (4)")
    p.add_argument("--heads", type=int, default=None, help="override n_heads (4)")
    p.add_argument("--ffn", type=int, default=512, help="llama_tiny_bytes' ffn_dim is 768")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--split-seed", type=int, default=0, help="seed of byte_split")
    p.add_argument("--sources", nargs="+", default=list(text.SOURCES), choices=text.SOURCES)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--final-eval-windows", type=int, default=1024)
    p.add_argument("--profile-windows", type=int, default=32)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def decay_mask(params):
    """True where weight decay applies: Dense kernels and the token embedding."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] in ("kernel", "embedding") for k in flat})


def heldout_windows(data: np.ndarray, n: int, length: int) -> np.ndarray:
    """``n`` non-overlapping windows of ``length`` bytes spread evenly over ``data``."""
    n = min(n, len(data) // length)
    starts = np.linspace(0, len(data) - length, n).astype(np.int64)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int32)


def rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (keeps logs machine-neutral)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in dict(
            dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads, ffn_dim=args.ffn
        ).items()
        if v is not None
    }
    cfg = llama.llama_tiny_bytes(**overrides)
    log(f"host: {platform.node() or '?'} | jax {jax.__version__} | devices {jax.devices()} | cpus {os.cpu_count()}")
    log(f"config: {cfg}")
    log(f"args: { {k: rel(v) if isinstance(v, Path) else v for k, v in vars(args).items()} }")

    t_data = time.perf_counter()
    sizes = text.corpus_sizes(args.sources)
    corpus = text.training_corpus(args.sources)
    train, heldout = text.byte_split(corpus, args.heldout_fraction, seed=args.split_seed)
    log(
        f"corpus: {sizes}; {len(corpus.encode('utf-8')):,} bytes -> train {len(train):,}, "
        f"held-out {len(heldout):,} ({time.perf_counter() - t_data:.1f} s)"
    )

    window = args.seq_len + 1
    eval_x = heldout_windows(heldout, args.eval_windows, window)
    final_x = heldout_windows(heldout, args.final_eval_windows, window)

    model = llama.Llama(cfg)
    k_init = jax.random.key(args.seed)
    params = model.init(k_init, jnp.zeros((1, args.seq_len), jnp.int32))["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log(f"parameters: {n_params:,}")

    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=min(warmup, args.steps - 1),
        decay_steps=args.steps,
        end_value=args.lr * 0.05,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
    )
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def train_step(p, o, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def nll_sum(p, batch):
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum()

    def perplexity(p, windows: np.ndarray, chunk: int = 64) -> float:
        total = 0.0
        for s in range(0, len(windows), chunk):
            total += float(nll_sum(p, windows[s : s + chunk]))
        return math.exp(total / (windows.shape[0] * args.seq_len))

    rng = np.random.default_rng([args.seed, 1])
    offsets = np.arange(window)

    def sample_batch() -> np.ndarray:
        starts = rng.integers(0, len(train) - window, size=args.batch_size)
        return train[starts[:, None] + offsets].astype(np.int32)

    log(
        f"training: {args.steps} steps x batch {args.batch_size} x seq {args.seq_len} "
        f"({args.steps * args.batch_size * args.seq_len / len(train):.2f} passes over the "
        f"training bytes), warmup {warmup}, peak lr {args.lr}, wd {args.weight_decay}"
    )
    history = []
    t_train = time.perf_counter()
    eval_seconds = 0.0
    recent = []
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, sample_batch())
        recent.append(loss)
        if step in (1, 10) or step % 50 == 0:
            jax.block_until_ready(loss)
            el = time.perf_counter() - t_train - eval_seconds
            log(
                f"  step {step}/{args.steps} loss {float(loss):.4f} lr {float(schedule(step)):.2e} "
                f"({el / step:.3f} s/step)"
            )
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.perf_counter()
            ppl = perplexity(params, eval_x)
            eval_seconds += time.perf_counter() - t_eval
            train_loss = float(np.mean(jax.device_get(recent)))
            recent = []
            elapsed = time.perf_counter() - t_train
            history.append(
                {
                    "step": step,
                    "train_loss": round(train_loss, 4),
                    "train_ppl": round(math.exp(train_loss), 4),
                    "heldout_ppl": round(ppl, 4),
                    "elapsed_minutes": round(elapsed / 60, 2),
                }
            )
            log(
                f"eval step {step}: train loss {train_loss:.4f} (ppl {math.exp(train_loss):.3f}) | "
                f"held-out ppl/byte {ppl:.3f} on {len(eval_x)} windows | "
                f"elapsed {elapsed / 60:.1f} min"
            )
    train_seconds = time.perf_counter() - t_train

    t_final = time.perf_counter()
    final_ppl = perplexity(params, final_x)
    log(
        f"final held-out perplexity per byte: {final_ppl:.4f} on {len(final_x)} windows "
        f"({len(final_x) * args.seq_len:,} predicted bytes; {time.perf_counter() - t_final:.0f} s)"
    )

    variables = {"params": jax.device_get(params)}
    out = Path(args.out)
    llama.save_pretrained(out, variables, cfg)
    cfg2, reloaded = llama.load_pretrained(out)
    check = final_x[:8, :-1]
    same = cfg2 == cfg and np.array_equal(
        np.asarray(model.apply(reloaded, check)), np.asarray(model.apply(variables, check))
    )
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    log(f"wrote {rel(out)} ({size_mb:.2f} MB); reload gives the same logits: {same}")

    t_prof = time.perf_counter()
    prof_x = heldout_windows(heldout, args.profile_windows, args.seq_len)
    profile = channel_range_profile(lambda p, ids: model.apply(p, ids), variables, prof_x)
    for name, ratio in profile.items():
        log(f"  RMSNorm range profile {name}: max/median {ratio:.2f}")
    log(f"profile: {time.perf_counter() - t_prof:.0f} s")

    meta = {
        "model": "llama_tiny_bytes" + (f" with {overrides}" if overrides else ""),
        "config": cfg.to_hf_config(),
        "parameters": n_params,
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "bytes_seen": args.steps * args.batch_size * args.seq_len,
        "passes_over_train": round(args.steps * args.batch_size * args.seq_len / len(train), 3),
        "optimizer": {
            "name": "adamw",
            "peak_lr": args.lr,
            "b1": 0.9,
            "b2": 0.95,
            "weight_decay": args.weight_decay,
            "decay_on": "Dense kernels and the token embedding (not RMSNorm scales)",
            "schedule": "linear warmup + cosine to 5% of peak",
            "warmup_steps": warmup,
            "grad_clip_global_norm": 1.0,
        },
        "data": {
            "sources": list(sizes),
            "corpus_sizes": sizes,
            "split": f"repquant_zoo.data.text.byte_split(training_corpus({list(sizes)}), "
            f"heldout_fraction={args.heldout_fraction}, seed={args.split_seed})",
            "train_bytes": int(len(train)),
            "heldout_bytes": int(len(heldout)),
        },
        "heldout_perplexity_per_byte": round(final_ppl, 4),
        "heldout_bits_per_byte": round(math.log2(final_ppl), 4),
        "heldout_eval": f"{len(final_x)} non-overlapping windows of {window} bytes spread evenly "
        f"over the held-out bytes, {len(final_x) * args.seq_len} predictions",
        "train_seconds": round(train_seconds, 1),
        "train_minutes": round(train_seconds / 60, 2),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "reload_same_logits": bool(same),
        "checkpoint_mb": round(size_mb, 2),
        "history": history,
        "rmsnorm_range_profile": {
            "definition": "repquant_jax._src.diagnostics.channel_range_profile on held-out windows: "
            "per norm output feeding matmuls, max over channels of (max - min) / "
            "median over channels of (max - min)",
            "windows": int(len(prof_x)),
            "seq_len": args.seq_len,
            "groups": {k: round(v, 3) for k, v in profile.items()},
        },
    }
    meta_path = out / "training.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {rel(meta_path)}")
    log(
        f"done: held-out perplexity/byte {final_ppl:.3f} after {args.steps} steps, "
        f"{train_seconds / 60:.1f} min of training"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
