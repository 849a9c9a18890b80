"""Numpy batches from any TFDS random-access data source.

A *data source* is anything with ``len()`` and integer indexing that returns example dicts,
as :func:`tensorflow_datasets.data_source` gives (for :mod:`repquant_zoo.data.fashion_mnist`,
or a real TFDS dataset such as ``imagenet2012`` prepared in your own ``data_dir``). A plain
list of dicts works too. Examples are fetched with the source's ``__getitems__`` when it has
one (one read per batch), else one by one.

``preprocess`` maps **one** example's image (a numpy array) to a numpy array; the results
are stacked into the batch. Per example, so that sources with images of different sizes
(ImageNet) can be resized/cropped to one shape. Without it the raw images are stacked.

Example:
    >>> from repquant_zoo.data import fashion_mnist, batches
    >>> train = fashion_mnist.load("train")  # doctest: +SKIP
    >>> calib = list(batches.calibration_batches(
    ...     train, num_samples=32, preprocess=batches.fashion_mnist_preprocess))  # doctest: +SKIP
    >>> calib[0].shape, calib[0].dtype  # doctest: +SKIP
    ((32, 28, 28, 1), dtype('float32'))
    >>> for images, labels in batches.eval_batches(
    ...         fashion_mnist.load("test"), preprocess=batches.fashion_mnist_preprocess):
    ...     pass  # doctest: +SKIP
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "fashion_mnist_preprocess",
    "calibration_batches",
    "eval_batches",
]

#: Mean and standard deviation of Fashion-MNIST training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

Preprocess = Callable[[np.ndarray], Any]


def fashion_mnist_preprocess(image: Any) -> np.ndarray:
    """uint8 pixels → float32 in [0, 1] → ``(x - 0.2860) / 0.3530``; shape kept (NHWC).

    Works on one image ``[28, 28, 1]`` or a whole batch ``[N, 28, 28, 1]`` alike.
    """
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (x - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)


def _fetch(source: Any, indices: Sequence[int]) -> list[Any]:
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        return list(getitems([int(i) for i in indices]))
    return [source[int(i)] for i in indices]


def _stack(items: list[Any], preprocess: Preprocess | None, image_key: str) -> np.ndarray:
    fn = preprocess if preprocess is not None else np.asarray
    try:
        return np.stack([np.asarray(fn(it[image_key])) for it in items])
    except KeyError:
        raise KeyError(
            f"examples have no {image_key!r} feature (keys: {sorted(items[0])}); pass image_key=..."
        ) from None
    except ValueError as e:
        raise ValueError(
            f"cannot stack the examples' {image_key!r} into one batch ({e}); "
            "give a preprocess function that maps every image to one shape"
        ) from None


def _check_source(source: Any) -> int:
    try:
        return len(source)
    except TypeError:
        raise TypeError(
            f"source must be a random-access data source with len() and indexing "
            f"(tfds.data_source(...)), got {type(source).__name__}"
        ) from None


def _positive_int(name: str, value: Any) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def calibration_batches(
    source: Any,
    num_samples: int = 32,
    batch_size: int = 32,
    seed: int = 0,
    preprocess: Preprocess | None = None,
    *,
    image_key: str = "image",
) -> Iterator[np.ndarray]:
    """Yields image batches of a seeded random draw of ``num_samples`` distinct examples.

    The draw is ``numpy.random.default_rng(seed).choice(len(source), num_samples,
    replace=False)``: the same seed gives the same examples in the same order, another
    seed another draw. Labels are not yielded (calibration needs none); each item is one
    array ``[batch, ...]``, the form ``repquant_jax._src.transform`` takes for a one-input
    ``apply_fn``.

    Args:
        source: a TFDS data source (or any sequence of example dicts).
        num_samples: how many examples to draw (RepQ-ViT: 32), ``1 <= num_samples <=
            len(source)``.
        batch_size: examples per batch. All batches have the same shape (the transform
            requires it), so ``num_samples`` must be a multiple of ``batch_size``; a
            ``batch_size >= num_samples`` gives a single batch of ``num_samples``.
        seed: seed of the draw.
        preprocess: per-image function (e.g. :func:`fashion_mnist_preprocess`); default:
            the raw image.
        image_key: the image feature's name.

    Raises:
        ValueError: ``num_samples`` or ``batch_size`` not positive, ``num_samples >
            len(source)``, or ``num_samples`` not a multiple of a smaller ``batch_size``.
            Raised at the call, not at the first ``next()``.
    """
    n = _check_source(source)
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    if num_samples > n:
        raise ValueError(f"num_samples={num_samples} is larger than the data source ({n} examples)")
    batch_size = min(batch_size, num_samples)
    if num_samples % batch_size:
        raise ValueError(
            f"num_samples={num_samples} is not a multiple of batch_size={batch_size}: "
            "calibration batches must all have the same shape"
        )
    indices = np.random.default_rng(seed).choice(n, size=num_samples, replace=False)

    def gen() -> Iterator[np.ndarray]:
        for start in range(0, num_samples, batch_size):
            items = _fetch(source, indices[start : start + batch_size])
            yield _stack(items, preprocess, image_key)

    return gen()


def eval_batches(
    source: Any,
    batch_size: int = 256,
    preprocess: Preprocess | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images, labels)`` over the whole source in order, each example once.

    The last batch holds the remainder (it is smaller when ``batch_size`` does not divide
    ``len(source)``; a jitted model re-traces once for it). Labels are ``int64 [batch]``.

    Raises:
        ValueError: ``batch_size`` not positive (at the call).
    """
    n = _check_source(source)
    batch_size = _positive_int("batch_size", batch_size)

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, n, batch_size):
            items = _fetch(source, range(start, min(start + batch_size, n)))
            images = _stack(items, preprocess, image_key)
            try:
                labels = np.asarray([it[label_key] for it in items], dtype=np.int64)
            except KeyError:
                raise KeyError(
                    f"examples have no {label_key!r} feature (keys: {sorted(items[0])}); pass label_key=..."
                ) from None
            yield images, labels

    return gen()
