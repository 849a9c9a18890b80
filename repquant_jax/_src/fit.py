"""Fitting one site's quantizer to what it observed, as its `SiteSpec` asks.

A site's values are kept as a bounded uniform sample (`Reservoir`) across calibration
chunks and dispatched to the range estimators of `calibration`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from repquant_jax._src import calibration as cal
from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import QuantConfig, SiteSpec
from repquant_jax._src.types import LOG_KINDS

__all__ = ["Reservoir", "calibrate_values", "calibrate_weight", "point_values", "subsample"]


class Reservoir:
    """A uniform random sample of at most ``cap`` values (or rows) of a stream.

    Bottom-k sampling: every value gets a random key and the ``cap`` smallest keys are
    kept, which is an exact uniform sample without replacement of everything seen.
    """

    def __init__(self, cap: int, rng: np.random.Generator):
        self.cap = cap
        self.rng = rng
        self.data: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self.seen = 0  # values, not rows

    def add(self, values: np.ndarray) -> None:
        """Adds values: a flat array, or ``[rows, C]`` (whole rows are kept)."""
        row_size = int(np.prod(values.shape[1:]))
        keep = max(1, self.cap // row_size)
        keys = self.rng.random(int(values.shape[0]))
        self.seen += values.size
        if self.data is not None:
            values = np.concatenate([self.data, values])
            keys = np.concatenate([self._keys, keys])
        if values.shape[0] > keep:
            index = np.sort(np.argpartition(keys, keep - 1)[:keep])
            values, keys = values[index], keys[index]
        self.data, self._keys = values, keys


def subsample(x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``rows`` rows of ``x``, chosen at random."""
    if x.shape[0] <= rows:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=rows, replace=False))]


def point_values(values: list[Any], spec: SiteSpec) -> np.ndarray:
    """A site's observed values over a chunk: flat, or ``[rows, C]`` for per channel."""
    if spec.granularity == "per_channel":
        channels = np.shape(values[0])[-1]
        return np.concatenate([np.asarray(v, np.float32).reshape(-1, channels) for v in values])
    return np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values])


def calibrate_values(values: np.ndarray, spec: SiteSpec, config: QuantConfig, axis: int | None) -> qz.QuantParams:
    """Fits a quantizer to observed values (flat for per tensor, ``[rows, C]`` with
    ``axis=-1`` for per channel)."""
    method, bits, kind = spec.calibration, spec.bits, spec.kind
    if kind in LOG_KINDS:
        low = float(np.min(values)) if np.size(values) else 0.0
        if low < 0:
            raise ValueError(
                f"a {kind} quantizer needs values >= 0 (softmax outputs), but {spec.name!r} has "
                f"values down to {low:.3g}; use a uniform quantizer there"
            )
        if method == "search":
            return cal.search_log_sqrt2(values, bits, kind=kind)
        top = np.max(values) if method == "minmax" else np.quantile(values, config.percentile)
        make = qz.log2 if kind == "log2" else qz.log_sqrt2
        return make(jnp.float32(max(float(top), 1e-8)), bits)
    symmetric = kind == "symmetric"
    if method == "minmax":
        qp = cal.minmax(values, bits, axis=axis, symmetric=symmetric)
    elif method == "percentile":
        qp = cal.percentile(values, bits, p=config.percentile, axis=axis, symmetric=symmetric)
    else:
        qp = cal.search_uniform(values, bits, axis=axis, symmetric=symmetric)
    return qp.replace(axis=-1) if axis is not None else qp


def calibrate_weight(matrix: Any, spec: SiteSpec, config: QuantConfig) -> qz.QuantParams:
    """Per-output-channel (column) quantizer of a ``[K, N]`` weight matrix."""
    axis = 1 if spec.granularity == "per_channel" else None
    qp = calibrate_values(np.asarray(matrix, np.float32), spec, config, axis)
    return qp.replace(axis=1) if axis is not None else qp
