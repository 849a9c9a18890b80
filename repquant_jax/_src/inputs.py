"""Calibration batches: read lazily in chunks, each checked against the first."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src.checks import has_non_finite

__all__ = ["BatchStream"]


class BatchStream:
    """Reads calibration batches lazily, in chunks, checking each against the first.

    Each item of ``calib_batches`` is a tuple of the model's positional inputs, or a
    single array for one input; all must have one structure, shapes and dtypes.
    """

    def __init__(self, calib_batches: Iterable[Any]):
        if calib_batches is None:
            raise ValueError("calib_batches is None: pass an iterable of calibration batches")
        self._iter = iter(calib_batches)
        self.count = 0
        #: number of batches when ``calib_batches`` has a length (for progress), else None
        self.total: int | None = len(calib_batches) if isinstance(calib_batches, Sized) else None
        self._signature: tuple[Any, Any] | None = None

    def chunk(self, size: int) -> list[tuple[Any, ...]]:
        """Up to ``size`` more batches (empty at the end)."""
        out = []
        for item in self._iter:
            batch = tuple(item) if isinstance(item, (tuple, list)) else (item,)
            self._check(batch)
            out.append(batch)
            self.count += 1
            if len(out) == size:
                break
        if not out and self.count == 0:
            raise ValueError("calib_batches is empty: at least one calibration batch is needed")
        return out

    def chunks(self, size: int) -> Iterator[list[tuple[Any, ...]]]:
        """The remaining batches, ``size`` at a time."""
        while chunk := self.chunk(size):
            yield chunk

    def _check(self, batch: tuple[Any, ...]) -> None:
        b = self.count
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        shapes = [(np.shape(x), jnp.result_type(x)) for x in leaves]
        if self._signature is None:
            self._signature = (treedef, shapes)
        elif treedef != self._signature[0]:
            raise ValueError(f"calibration batch {b} has structure {treedef}, batch 0 has {self._signature[0]}")
        elif shapes != self._signature[1]:
            raise ValueError(
                f"calibration batch {b} has input shapes/dtypes {shapes}, batch 0 has {self._signature[1]}; "
                "all calibration batches must have the same shapes (pad them to one length)"
            )
        for i, leaf in enumerate(leaves):
            if has_non_finite(leaf):
                raise ValueError(f"calibration batch {b}, input {i} contains NaN or Inf")
