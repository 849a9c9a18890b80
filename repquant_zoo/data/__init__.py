"""Datasets and batch iterators (TFDS data sources; TensorFlow is not needed).

* :mod:`repquant_zoo.data.fashion_mnist`: Fashion-MNIST as a local TFDS dataset built from
  the Debian package ``dataset-fashion-mnist`` (``load(split)`` → data source).
* :mod:`repquant_zoo.data.batches`: ``calibration_batches`` / ``eval_batches`` turn any
  TFDS data source into numpy batches; ``fashion_mnist_preprocess``.

``fashion_mnist`` imports ``tensorflow_datasets`` (the ``data`` extra) when first used;
``batches`` needs numpy only.

Example:
    >>> from repquant_zoo import data
    >>> test = data.fashion_mnist.load("test")  # doctest: +SKIP
    >>> batches = data.eval_batches(test, preprocess=data.fashion_mnist_preprocess)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from repquant_zoo.data.batches import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    calibration_batches,
    eval_batches,
    fashion_mnist_preprocess,
)

__all__ = [
    "fashion_mnist",
    "batches",
    "calibration_batches",
    "eval_batches",
    "fashion_mnist_preprocess",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
]


def __getattr__(name: str) -> Any:
    if name == "fashion_mnist":  # imports tensorflow_datasets: only on first use
        return importlib.import_module("repquant_zoo.data.fashion_mnist")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
