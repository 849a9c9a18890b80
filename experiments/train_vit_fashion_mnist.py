"""Trains the small ViT on Fashion-MNIST and writes the project's default checkpoint.

Recipe: AdamW (linear warmup + cosine decay, no weight decay on LayerNorm, biases,
class token and position embedding), label smoothing, global-norm gradient clipping,
light augmentation (random shifts by up to 2 pixels with zero padding, horizontal flips).
Everything is seeded: the same seed (and jax/XLA version, on the same backend) gives the
same checkpoint.

Writes (``--out``, default ``experiments/checkpoints/vit_fashion_mnist.safetensors``):

* the weights in timm layout (``repquant_zoo.models.vit.save_safetensors``); load with
  ``vit.load_safetensors(path, vit.get_config(<config name>))``;
* ``<out stem>.json``: config name, epochs, seed, test accuracy, training time, per-epoch
  history, and the LayerNorm channel-range profile (for each LayerNorm output on
  ``--profile-images`` test images: max over channels of (max - min) divided by the median
  channel range; DeiT-S has about 30, a model without LN outliers 1-3).

Usage::

    python experiments/train_vit_fashion_mnist.py --epochs 22 --seed 0
    python experiments/train_vit_fashion_mnist.py --max-steps 200 --out /tmp/t.safetensors  # timing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from repquant_jax._src.diagnostics import channel_ranges
from repquant_zoo.data import batches as data_batches
from repquant_zoo.data import fashion_mnist
from repquant_zoo.models import vit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "checkpoints" / "vit_fashion_mnist.safetensors"


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vit_tiny_fashion_mnist_p7", help="named ViT config (vit.CONFIGS)")
    p.add_argument("--epochs", type=int, default=22)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="disable shifts and flips")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: repo data_cache/)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (timing runs); still evaluates and writes",
    )
    p.add_argument("--profile-images", type=int, default=512)
    return p.parse_args(argv)


def decay_mask(params):
    """True where weight decay applies: Dense/Conv kernels only."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def augment(key, images):
    """Random shift by up to 2 pixels (zero padding) and random horizontal flip."""
    b, h, w, c = images.shape
    k_shift, k_flip = jax.random.split(key)
    # Padding value: what a black (0) pixel becomes after normalization.
    zero = (0.0 - data_batches.FASHION_MNIST_MEAN) / data_batches.FASHION_MNIST_STD
    padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=zero)
    offs = jax.random.randint(k_shift, (b, 2), 0, 5)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    shifted = jax.vmap(crop)(padded, offs)
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    return jnp.where(flip, shifted[:, :, ::-1, :], shifted)


def ln_range_profile(model, variables, images) -> dict[str, dict[str, float]]:
    """Per LayerNorm output: max channel range / median channel range (and the raw numbers)."""
    _, state = model.apply(
        variables,
        images,
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.LayerNorm),
        mutable=["intermediates"],
    )
    flat = flax.traverse_util.flatten_dict(state["intermediates"])
    out = {}
    for path, (value,) in sorted(flat.items()):
        name = "/".join(path[:-1])  # drop "__call__"
        rng = channel_ranges(value)
        med = float(np.median(rng))
        out[name] = {
            "max_over_median": float(rng.max() / med),
            "max_range": float(rng.max()),
            "median_range": med,
            "min_range": float(rng.min()),
        }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = vit.get_config(args.config)
    log(f"host: {platform.node() or '?'} | jax {jax.__version__} | devices {jax.devices()} | cpus {os.cpu_count()}")
    log(f"config {args.config}: {cfg}")
    log(f"args: {vars(args)}")

    t_data = time.perf_counter()
    x_train_u8, y_train = fashion_mnist.load_arrays("train", args.data_dir)
    x_test_u8, y_test = fashion_mnist.load_arrays("test", args.data_dir)
    x_train = data_batches.fashion_mnist_preprocess(x_train_u8)
    x_test = data_batches.fashion_mnist_preprocess(x_test_u8)
    log(f"data: train {x_train.shape}, test {x_test.shape} ({time.perf_counter() - t_data:.1f} s)")

    model = vit.VisionTransformer(cfg)
    root = jax.random.key(args.seed)
    k_init, k_train = jax.random.split(root)
    variables = model.init(k_init, jnp.zeros((1, *x_train.shape[1:]), jnp.float32))
    params = variables["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log(f"parameters: {n_params:,}")

    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=min(warmup, total_steps - 1),
        decay_steps=total_steps,
        end_value=args.lr * 1e-3,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=args.weight_decay, mask=decay_mask),
    )
    opt_state = tx.init(params)
    augment_on = not args.no_augment

    def loss_fn(p, images, labels):
        logits = model.apply({"params": p}, images)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, cfg.num_classes), args.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    @jax.jit
    def train_step(p, o, images, labels, key):
        if augment_on:
            images = augment(key, images)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, images, labels)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss, acc

    @jax.jit
    def predict(p, images):
        return model.apply({"params": p}, images).argmax(-1)

    def evaluate(p) -> float:
        correct = 0
        for start in range(0, len(x_test), 1000):
            pred = predict(p, x_test[start : start + 1000])
            correct += int((np.asarray(pred) == y_test[start : start + 1000]).sum())
        return correct / len(x_test)

    log(
        f"training: {args.epochs} epochs x {steps_per_epoch} steps (batch {args.batch_size}), "
        f"warmup {warmup} steps, peak lr {args.lr}, wd {args.weight_decay}, "
        f"label smoothing {args.label_smoothing}, augment {augment_on}"
    )
    history = []
    step = 0
    t_train = time.perf_counter()
    stop = False
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        perm = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
        losses, accs = [], []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            key = jax.random.fold_in(k_train, step)
            params, opt_state, loss, acc = train_step(params, opt_state, x_train[idx], y_train[idx], key)
            losses.append(loss)
            accs.append(acc)
            step += 1
            if step in (1, 20) or step % 100 == 0:
                jax.block_until_ready(loss)
                el = time.perf_counter() - t_epoch
                log(
                    f"  epoch {epoch} step {i + 1}/{steps_per_epoch} loss {float(loss):.4f} "
                    f"lr {float(schedule(step)):.2e} ({el:.1f} s in epoch, {el / (i + 1):.3f} s/step)"
                )
            if args.max_steps is not None and step >= args.max_steps:
                stop = True
                break
        train_loss = float(np.mean(jax.device_get(losses)))
        train_acc = float(np.mean(jax.device_get(accs)))
        epoch_s = time.perf_counter() - t_epoch
        t_eval = time.perf_counter()
        test_acc = evaluate(params)
        eval_s = time.perf_counter() - t_eval
        history.append(
            {
                "epoch": epoch,
                "steps": step,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_acc": test_acc,
                "epoch_seconds": round(epoch_s, 1),
                "eval_seconds": round(eval_s, 1),
            }
        )
        log(
            f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
            f"test acc {test_acc:.4f} | {epoch_s:.0f} s + eval {eval_s:.0f} s | "
            f"elapsed {(time.perf_counter() - t_train) / 60:.1f} min"
        )
        if stop:
            break
    train_seconds = time.perf_counter() - t_train
    final_acc = history[-1]["test_acc"]

    variables = {"params": jax.device_get(params)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vit.save_safetensors(out, variables, cfg)
    # Round trip: the file must load back to the same predictions.
    reloaded = vit.load_safetensors(out, cfg)
    check = x_test[:256]
    same = np.array_equal(np.asarray(predict(reloaded["params"], check)), np.asarray(predict(params, check)))
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); reload gives same predictions: {same}")

    profile = ln_range_profile(model, variables, x_test[: args.profile_images])
    for name, v in profile.items():
        log(
            f"  LN range profile {name}: max/median {v['max_over_median']:.2f} "
            f"(max {v['max_range']:.2f}, median {v['median_range']:.2f})"
        )

    meta = {
        "config": args.config,
        "config_fields": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "epochs": len(history),
        "epochs_requested": args.epochs,
        "steps": step,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "optimizer": {
            "name": "adamw",
            "peak_lr": args.lr,
            "weight_decay": args.weight_decay,
            "no_decay": "LayerNorm, biases, cls_token, pos_embed",
            "schedule": "linear warmup + cosine",
            "warmup_steps": warmup,
            "grad_clip_global_norm": 1.0,
        },
        "label_smoothing": args.label_smoothing,
        "augmentation": "random shift <= 2 px (zero pad) + horizontal flip" if augment_on else "none",
        "preprocess": {
            "mean": data_batches.FASHION_MNIST_MEAN,
            "std": data_batches.FASHION_MNIST_STD,
            "scale": "uint8 / 255",
        },
        "parameters": n_params,
        "test_accuracy": final_acc,
        "test_examples": int(len(x_test)),
        "train_seconds": round(train_seconds, 1),
        "train_minutes": round(train_seconds / 60, 2),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "reload_same_predictions": bool(same),
        "history": history,
        "ln_range_profile": {
            "definition": "per LayerNorm output over test images x tokens: "
            "max over channels of (max - min) / median over channels of (max - min)",
            "images": int(min(args.profile_images, len(x_test))),
            "layers": profile,
        },
    }
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {meta_path}")
    log(f"done: test accuracy {final_acc:.4f} after {len(history)} epochs, {train_seconds / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
