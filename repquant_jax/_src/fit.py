"""Fitting one site's quantizer to what it observed, as its `SiteSpec` asks.

A site's values are kept as a bounded uniform sample (`Reservoir`) across calibration
chunks and dispatched to the range estimators of `calibration`.

With ``QuantConfig.range_selection == "held_out"`` (and, by default, ``"auto"`` for
sites wider than 8 bits or with few rows: `judged_held_out`) an activation's range is chosen on
calibration samples it was not fitted to (docs/method.md, "Calibration"): the rows are
dealt into folds by the sample they came from (`held_out_folds`), every candidate range
of the rule (`range_candidates`) is fitted on all folds but one and judged on that one,
for each fold in turn (cross-validation), and the candidate with the lowest error over
all folds is fitted again on all rows (`calibrate_values`). For a per-channel norm output the same
judgement also picks per channel or per tensor: per-channel ranges fitted on few rows
(a class token before a classifier head) do not cover the next inputs. Weights are
judged on themselves: they are all there is to see.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src import calibration as cal
from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import QuantConfig, SiteSpec
from repquant_jax._src.types import LOG_KINDS

__all__ = [
    "Reservoir",
    "calibrate_values",
    "calibrate_weight",
    "held_out_folds",
    "judged_held_out",
    "point_samples",
    "range_candidates",
    "subsample",
]


class Reservoir:
    """A uniform random sample of at most ``cap`` values (or rows) of a stream.

    Bottom-k sampling: every row gets a random key and the rows of the smallest keys
    (``cap`` values) are kept, which is an exact uniform sample without replacement of
    everything seen. Rows, not single values, are what it keeps and what the held-out
    split divides, also for a per-tensor site, whose rule reads them flattened.
    """

    def __init__(self, cap: int, rng: np.random.Generator):
        self.cap = cap
        self.rng = rng
        self.data: np.ndarray | None = None
        #: the calibration sample each kept row came from (`point_samples`), if given
        self.samples: np.ndarray | None = None
        self.next_sample = 0  # the id of the next calibration sample
        self._keys: np.ndarray | None = None
        self.seen = 0  # values, not rows
        self.kept: int | None = None  # values in the sample (None: nothing added yet)

    def add(self, batches: Sequence[Any]) -> None:
        """Adds one chunk's values of a site: one array per batch, whose rows (along
        the last axis) are kept whole, numbered by sample (`point_samples`).

        Only the rows that enter the sample are moved to the host: the keys decide
        which before any value is read, so at LLM scale a site transfers at most
        ``cap`` values per chunk, not all it sees.
        """
        channels = np.shape(batches[0])[-1] if np.ndim(batches[0]) else 1
        counts = [int(np.size(v)) // max(channels, 1) for v in batches]
        rows = sum(counts)
        keep = max(1, self.cap // max(channels, 1))
        keys = self.rng.random(rows)
        samples = point_samples(batches, self.next_sample)
        self.seen += rows * channels
        if samples.size:
            self.next_sample = max(self.next_sample, int(samples.max()) + 1)
        old = 0 if self.data is None else self.data.shape[0]
        all_keys = keys if self._keys is None else np.concatenate([self._keys, keys])
        index = _smallest(all_keys, keep)
        new_rows = index[index >= old] - old
        data = _gather_rows(batches, counts, channels, new_rows)
        samples = samples[new_rows]
        if self.data is not None:
            assert self.samples is not None
            kept_old = index[index < old]
            data = np.concatenate([self.data[kept_old], data])
            samples = np.concatenate([self.samples[kept_old], samples])
        self.data, self._keys, self.samples = data, all_keys[index], samples
        self.kept = data.size

    def bucket(self) -> tuple[np.ndarray, np.ndarray]:
        """The largest power-of-two number of rows of the sample (with their sample
        ids): those of the smallest keys, itself a uniform sample of everything seen.

        A fit between chunks reads this, so the fitting kernels see a few row counts
        (one per power of two) instead of one per chunk, and compile a few times.
        """
        assert self.data is not None and self._keys is not None and self.samples is not None
        rows = self.data.shape[0]
        size = 1 << (rows.bit_length() - 1)
        if size == rows:
            return self.data, self.samples
        index = _smallest(self._keys, size)
        return self.data[index], self.samples[index]

    def release(self) -> None:
        """Drops the sample (its site is fitted for good); ``kept`` and ``seen`` stay."""
        self.data = self._keys = self.samples = None


def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest keys, in index order (all of them if fewer): the
    bottom-k rule by which a `Reservoir` samples."""
    if keys.size <= k:
        return np.arange(keys.size)
    return np.sort(np.argpartition(keys, k - 1)[:k])


def subsample(x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``rows`` rows of ``x``, chosen at random."""
    if x.shape[0] <= rows:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=rows, replace=False))]


def _gather_rows(batches: Sequence[Any], counts: Sequence[int], channels: int, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, numbered across the batches) of the batches' values as
    ``[len(rows), channels]`` float32 on the host, gathered where the values are."""
    parts, offset = [], 0
    for value, count in zip(batches, counts):
        local = rows[(rows >= offset) & (rows < offset + count)] - offset
        offset += count
        if local.size == count:  # every row: one transfer, no gather
            parts.append(np.asarray(value, np.float32).reshape(-1, channels))
        elif local.size:
            # a power-of-two number of indices (the last one repeated), so the gather
            # compiles once per bucket and value shape, not once per count of kept rows
            size = min(1 << (local.size - 1).bit_length(), count)
            padded = np.pad(local, (0, size - local.size), mode="edge")
            parts.append(np.asarray(_take_rows(value, padded, channels), np.float32)[: local.size])
    return np.concatenate(parts) if parts else np.zeros((0, channels), np.float32)


@functools.partial(jax.jit, static_argnames=("channels",))
def _take_rows(value: jax.Array, rows: jax.Array, channels: int) -> jax.Array:
    return jnp.reshape(value, (-1, channels))[rows]


def point_samples(values: Sequence[Any], first: int) -> np.ndarray:
    """The calibration sample of every row of ``values`` (one array per batch, rows along
    the last axis, batch after batch), numbered from ``first``.

    A value's leading axis is its batch's samples (a value of rank < 2 is one sample).
    """
    ids, start = [], first
    for v in values:
        shape = np.shape(v)
        rows = int(np.prod(shape[:-1])) if len(shape) else 1
        n = shape[0] if len(shape) >= 2 and shape[0] > 0 else 1
        ids.append(start + np.arange(rows, dtype=np.int64) // max(1, rows // n))
        start += n
    return np.concatenate(ids)


#: a per-tensor quantizer replaces a per-channel one only if its held-out error is
#: below this fraction of the per-channel one's (see `_held_out_choice`)
_PER_TENSOR_MARGIN = 0.5


def held_out_folds(samples: np.ndarray, folds: int) -> list[np.ndarray] | None:
    """The held-out rows of each fold: the calibration samples dealt into ``folds``
    parts in calibration order (sample ``i`` to fold ``i mod folds``).

    Every sample is held out once, so a sample whose values lie outside all the others'
    (which is what the next input may do) is seen from outside in one fold, and fewer
    than ``folds`` samples give one fold per sample (leave one out). With a single
    sample its rows (tokens) are dealt instead. None when there is nothing to split
    (fewer than two rows), or when the samples are unknown (ids < 0).

    Example:
        >>> [m.astype(int) for m in held_out_folds(np.array([0, 0, 1, 1, 2]), 2)]
        [array([1, 1, 0, 0, 1]), array([0, 0, 1, 1, 0])]
    """
    if samples.size < 2 or samples.min() < 0:
        return None
    units, position = np.unique(samples, return_inverse=True)
    if units.size < 2:  # one sample: deal its rows
        position = np.arange(samples.size)
    n = int(position.max()) + 1
    k = min(folds, n)
    return [position % k == f for f in range(k)]


#: ``range_selection="auto"`` cross-validates a site's range above this many bits or
#: below this many observed rows (`judged_held_out`).
AUTO_HELD_OUT_BITS = 8
AUTO_HELD_OUT_ROWS = 1024


def judged_held_out(config: QuantConfig, bits: int, values: np.ndarray) -> bool:
    """Whether a site's range is chosen on held-out samples (``config.range_selection``).

    Example:
        >>> rows = np.zeros((2048, 4), np.float32)
        >>> judged_held_out(QuantConfig(), 8, rows), judged_held_out(QuantConfig(), 16, rows)
        (False, True)
    """
    if config.range_selection == "auto":
        rows = values.shape[0] if values.ndim > 1 else values.size
        return bits > AUTO_HELD_OUT_BITS or rows < AUTO_HELD_OUT_ROWS
    return config.range_selection == "held_out"


def range_candidates(method: str, config: QuantConfig) -> tuple[cal.Candidate, ...]:
    """The candidate ranges ``"held_out"`` selection judges for a calibration rule."""
    percentiles = (1.0,) if method == "minmax" else cal.DEFAULT_PERCENTILES
    return cal.candidates(percentiles, config.range_expansions)


def _held_out_choice(
    values: np.ndarray,
    folds: list[np.ndarray],
    spec: SiteSpec,
    config: QuantConfig,
    axis: int | None,
    choose_granularity: bool,
) -> qz.QuantParams:
    """The candidate (and, for a per-channel spec with ``choose_granularity``, the
    granularity) with the lowest squared error summed over the folds' held-out rows,
    fitted again on all rows."""
    symmetric = spec.kind == "symmetric"
    cands = range_candidates(spec.calibration, config)
    best: tuple[float, int | None, np.ndarray] | None = None
    # Per channel first: per tensor replaces it only when clearly better (its error
    # below `_PER_TENSOR_MARGIN` times per channel's), since a per-channel norm
    # quantizer folds exactly and is what dual clipping learns on; on even channels
    # the two are close and the split's noise would otherwise decide.
    for ax in (axis, None) if axis is not None and choose_granularity and not spec.fixed_granularity else (axis,):
        sse = sum(
            cal.candidate_errors(values[~held], values[held], spec.bits, ax, cands, symmetric)
            * (values[held].size if ax is None else int(held.sum()))
            for held in folds
        )  # (K, C): squared error per candidate and channel over all held-out rows
        # One candidate for all channels: picking one per channel on the same held-out
        # rows would overfit them (each channel's best of K on a few rows looks better
        # than it is on the next inputs) and favour per channel in the comparison.
        totals = np.sum(sse, axis=1)
        k = int(np.argmin(totals))
        if best is None or float(totals[k]) < _PER_TENSOR_MARGIN * best[0]:
            best = (float(totals[k]), ax, np.asarray(k))
    assert best is not None
    _, ax, choice = best
    qp = cal.fit_candidates(values, spec.bits, ax, cands, choice, symmetric)
    return qp.replace(axis=-1) if ax is not None else qp


def calibrate_values(
    values: np.ndarray,
    spec: SiteSpec,
    config: QuantConfig,
    axis: int | None,
    samples: np.ndarray | None = None,
) -> qz.QuantParams:
    """Fits a quantizer to observed values (``[rows, C]``, or flat; ``axis=-1`` for per
    channel).

    ``samples`` (the calibration sample of every row) enables the held-out choice of
    the range of a uniform ``"minmax"`` or ``"search"`` site under
    ``config.range_selection`` (`judged_held_out`); a per-channel spec may then come back per
    tensor (``axis`` None), which `repquant_jax._src.specs.chosen_granularities`
    records in the spec.
    """
    method, bits, kind = spec.calibration, spec.bits, spec.kind
    if kind in LOG_KINDS:
        low = float(np.min(values)) if np.size(values) else 0.0
        if low < 0:
            raise ValueError(
                f"a {kind} quantizer needs values >= 0 (softmax outputs), but {spec.name!r} has "
                f"values down to {low:.3g}; use a uniform quantizer there"
            )
        if method == "search":
            return cal.search_log_sqrt2(values, bits, kind=kind, root=spec.log_root)
        top = np.max(values) if method == "minmax" else np.quantile(values, config.percentile)
        top = jnp.float32(max(float(top), 1e-8))
        if kind == "log_root":
            return qz.log_root(top, bits, spec.log_root)  # type: ignore[arg-type]  # (validated there)
        return (qz.log2 if kind == "log2" else qz.log_sqrt2)(top, bits)
    symmetric = kind == "symmetric"
    folds = None
    if samples is not None and method != "percentile" and judged_held_out(config, bits, values):
        folds = held_out_folds(samples, config.range_folds)
    if folds is not None:
        # Dropping a norm output's per-channel quantizer (and with it the fold) takes
        # evidence from at least `range_folds` samples: on two, one held out against
        # the other decides by chance.
        enough = samples is not None and np.unique(samples).size >= config.range_folds
        return _held_out_choice(values, folds, spec, config, axis, enough)
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
