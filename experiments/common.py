"""Shared pieces of the experiments: the shipped ViT, Fashion-MNIST, evaluation, tables.

Run experiments from the repository root, e.g. ``python experiments/ablation_vit.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from repquant_zoo.data import batches as data_batches  # noqa: E402
from repquant_zoo.data import fashion_mnist  # noqa: E402
from repquant_zoo.models import vit  # noqa: E402

CHECKPOINT = REPO / "experiments" / "checkpoints" / "vit_fashion_mnist.safetensors"
RESULTS = REPO / "experiments" / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_vit(path: Path = CHECKPOINT) -> tuple[Callable[..., Any], Any, dict]:
    """The shipped Fashion-MNIST ViT: ``(apply_fn, variables, info)``."""
    info = json.loads(path.with_suffix(".json").read_text())
    config = vit.get_config(info["config"])
    variables = vit.load_safetensors(path, config, layout="timm")
    model = vit.VisionTransformer(config)
    return (lambda p, x: model.apply(p, x)), variables, info


def fashion_mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10k test images (normalised float32 NHWC) and labels."""
    images, labels = fashion_mnist.load_arrays("test")
    return data_batches.fashion_mnist_preprocess(images), labels


def calibration_draw(num_samples: int, seed: int) -> list[np.ndarray]:
    """``num_samples`` random training images (one batch), drawn with ``seed``."""
    train = fashion_mnist.load("train")
    return list(
        data_batches.calibration_batches(
            train,
            num_samples=num_samples,
            batch_size=num_samples,
            seed=seed,
            preprocess=data_batches.fashion_mnist_preprocess,
        )
    )


def top1(apply: Callable[[np.ndarray], Any], images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy in percent of ``apply(images) -> logits``."""
    correct = 0
    for start in range(0, len(images), batch):
        logits = np.asarray(apply(images[start : start + batch]))
        correct += int((logits.argmax(-1) == labels[start : start + batch]).sum())
    return 100.0 * correct / len(images)


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def short_reason(e: BaseException) -> str:
    """One table-safe line naming an exception (for cells that read ``fails: ...``)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:120]}".replace("|", "/")


def machine() -> str:
    import platform

    return f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"


def float_top1(apply_fn, variables, images, labels) -> float:
    forward = jax.jit(apply_fn)
    return top1(lambda x: forward(variables, jnp.asarray(x)), images, labels)
