"""Range estimation: fit a quantizer to observed values (docs/method.md, "Calibration").

Every rule takes observed values (a ``jax.Array`` or a NumPy array) and returns
a :class:`~repquant_jax._src.quantizers.QuantParams`:

* :func:`minmax`: the full range (baseline).
* :func:`percentile`: ``[quantile(x, 1-p), quantile(x, p)]`` (baseline).
* :func:`search_uniform`: the RepQ-ViT rule. For each ``p`` in
  ``percentiles``: ``hi = quantile(x, p)``, ``lo = quantile(x, 1-p)``,
  ``s = (hi - lo)/(2^b - 1)``, ``z = round(-lo/s)``; keep the ``p`` with the
  lowest mean squared quantization error, per channel when ``axis`` is given.
  The default candidates are RepQ-ViT's three percentiles plus ``p = 1``
  (min-max): without it the search clips every range, even at 16 bits.
* :func:`candidate_errors` and :func:`fit_candidates`: the same search split
  in two, so that candidates can be fitted on some values and judged on others
  (held-out calibration samples, `repquant_jax._src.fit`). A candidate is a
  :class:`Candidate`: a percentile range, optionally widened by a factor, which
  only a judgement on other values can prefer.
* :func:`search_log_sqrt2`: candidate ``s = quantile(x, p)`` for a log√2 (or
  log2) quantizer, lowest error wins.

``axis`` is the channel axis that is *kept*: one scale per index along
``axis``, statistics over all the other axes (a Flax Dense kernel
``[in, out]`` per output channel: ``axis=-1``; activations ``[B, T, C]`` per
channel: ``axis=-1``). The returned quantizer stores ``axis`` as given, so a
negative axis keeps working for inputs of another rank.

Design decisions:

* **Zero is not forced into the range** and the zero point is not clipped to
  the code range (as in RepQ-ViT): for all-positive data ``z`` is negative.
* **Degenerate ranges.** If ``hi - lo < 1e-8`` (:data:`MIN_RANGE`), or the
  range is so narrow relative to its offset that ``|z|`` would exceed ``2^20``
  (float32 codes would lose integer precision), the scale falls back to
  ``max(|lo|, |hi|, 1e-8)/(2^b - 1)``. A constant channel ``c`` then lands on a
  code whose value is ``c`` up to float rounding, and an all-zero channel gets
  the tiny scale ``1e-8/(2^b - 1)`` with ``z = 0``. Symmetric scales use
  ``max(|lo|, |hi|, 1e-8)/(2^(b-1) - 1)``. For the log kinds a candidate
  quantile of 0 is replaced by ``max(x)`` (or 1.0 if ``x`` is all zeros).
* **Exact quantiles on any size.** Quantiles use NumPy's default linear
  interpolation with the interpolation positions computed in double precision
  on the host (``jnp.quantile`` computes them in float32, which is inexact past
  2^24 elements). Tail quantiles are read off ``lax.top_k`` when they are a
  small fraction of the data (the RepQ-ViT percentiles always are), otherwise
  off a full sort. Data stays on the device.
* **Validation** of the values themselves (NaN/Inf, negative values for the
  log kinds) needs concrete arrays: calibration is meant to run eagerly on
  observed values. Under ``jax.jit`` the rules still trace and compute, but
  only the static checks (shapes, bits, percentiles) run.
* Ties between candidates go to the first percentile in ``percentiles``.
* **Same result with and without jit.** The passes over the data (order
  statistics, min/max, candidate errors) run jitted; the few numbers per channel
  that define the quantizer (interpolated quantiles, scales, zero points) are
  computed on the host, one float32 rounding per operation, so that
  ``jax.disable_jit()`` gives bitwise the same quantizers.

Example:
    >>> import numpy as np
    >>> from repquant_jax._src import calibration
    >>> x = np.random.default_rng(0).standard_t(3, size=(256, 8)).astype(np.float32)
    >>> qp = calibration.search_uniform(x, bits=4, axis=-1)
    >>> qp.scale.shape, qp.kind, qp.axis
    ((8,), 'uniform', -1)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src import quantizers
from repquant_jax._src.quantizers import QuantParams
from repquant_jax._src.types import code_range

__all__ = [
    "DEFAULT_PERCENTILES",
    "LOG_PERCENTILES",
    "MIN_RANGE",
    "Candidate",
    "candidate_errors",
    "candidates",
    "fit_candidates",
    "minmax",
    "percentile",
    "quantization_mse",
    "search_log_sqrt2",
    "search_uniform",
]

#: The RepQ-ViT candidate percentiles of the log√2 search (docs/method.md, "Calibration").
LOG_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
#: The uniform search's candidate percentiles: RepQ-ViT's, and 1 (the min-max range),
#: without which every range is clipped, even at 16 bits.
DEFAULT_PERCENTILES: tuple[float, ...] = (*LOG_PERCENTILES, 1.0)
#: Smallest range a uniform quantizer is fitted to (see the module docstring).
MIN_RANGE = 1e-8
# Largest |zero point| before a range counts as degenerate (float32 codes stay exact).
_MAX_ZERO_POINT = 2.0**20
# Use lax.top_k for tail quantiles when they need at most 1/_TOPK_FRACTION of the data.
_TOPK_FRACTION = 8


# ----------------------------------------------------------------------------
# Validation.


def _check_percentile(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
        raise ValueError(f"percentiles must be floats in (0.5, 1], got {p!r}")
    p = float(p)
    if not 0.5 < p <= 1.0:
        raise ValueError(f"percentiles must be in (0.5, 1], got {p}")
    return p


def _check_percentiles(percentiles: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(percentiles, (int, float, np.floating)):
        percentiles = (percentiles,)
    ps = tuple(_check_percentile(p) for p in percentiles)
    if not ps:
        raise ValueError("percentiles must not be empty")
    return ps


def _check_axis(axis, ndim: int) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for calibration data with {ndim} dims")
    return int(axis)


def _check_not_empty(data: jax.Array | np.ndarray) -> None:
    if data.size == 0:
        raise ValueError(f"calibration data is empty (shape {data.shape})")


def _check_data(x, *, nonnegative: bool = False) -> jax.Array:
    """Converts to float32 and checks the values (only when they are concrete)."""
    if not isinstance(x, jax.Array):
        host = np.asarray(x)
        if host.dtype.kind not in "fiub":
            raise ValueError(f"calibration data must be real numbers, got dtype {host.dtype}")
        with np.errstate(over="ignore"):  # overflow becomes Inf, reported below
            host = host.astype(np.float32, copy=False)
        _check_not_empty(host)
        if not np.isfinite(host).all():
            raise ValueError("calibration data contains NaN or Inf")
        if nonnegative and (host < 0).any():
            raise ValueError(f"calibration data for a log quantizer must be >= 0, got min {host.min()}")
        return jnp.asarray(host)
    arr = x.astype(jnp.float32)
    _check_not_empty(arr)
    if not isinstance(arr, jax.core.Tracer):
        if not bool(jnp.isfinite(arr).all()):
            raise ValueError("calibration data contains NaN or Inf")
        if nonnegative:
            xmin = float(arr.min())
            if xmin < 0:
                raise ValueError(f"calibration data for a log quantizer must be >= 0, got min {xmin}")
    return arr


# ----------------------------------------------------------------------------
# Building blocks. The data passes (order statistics, min/max, candidate errors) run
# jitted on the device; the few per-channel numbers that define the quantizer are then
# computed on the host in float32 NumPy, one rounding per operation. Fused under jit,
# XLA would contract ``a + d·t`` into an FMA and turn ``/ c`` into ``* (1/c)``, so the
# same rule run with and without ``jax.disable_jit`` would give scales an ulp apart.
# Under a caller's ``jax.jit`` (tracers) the same formulas run in ``jax.numpy``.


def _channels_first(x: jax.Array, axis: int | None) -> jax.Array:
    """Returns ``(C, N)``: the kept axis first (C = 1 per tensor), the rest flattened."""
    if axis is None:
        return x.reshape(1, -1)
    return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _host(*arrays):
    """``(numpy, arrays as NumPy)``, or ``(jax.numpy, arrays)`` when any is a tracer."""
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return (jnp, *arrays)
    return (np, *(np.asarray(a) for a in arrays))


def _quantile_spots(n: int, probs: tuple[float, ...]) -> list[tuple[bool, int, int, float]]:
    """``(upper tail, i, j, t)`` per probability: ``q = lerp(x_(i), x_(j), t)``.

    The positions ``(n - 1)·p`` are Python floats (double), as in ``np.quantile``, so
    the result is exact for any ``n``.
    """
    spots = []
    for p in probs:
        pos = (n - 1) * p
        i = min(int(math.floor(pos)), n - 1)
        spots.append((p >= 0.5, i, min(i + 1, n - 1), pos - i))
    return spots


@functools.partial(jax.jit, static_argnames=("probs",))
def _order_stats(x2d: jax.Array, probs: tuple[float, ...]) -> tuple[jax.Array, jax.Array]:
    """The order statistics ``x_(i)`` and ``x_(j)`` of each spot along the last axis, ``(P, C)`` each."""
    n = x2d.shape[-1]
    spots = _quantile_spots(n, probs)
    k_top = max([n - i for upper, i, _, _ in spots if upper], default=0)
    k_bot = max([j + 1 for upper, _, j, _ in spots if not upper], default=0)

    if (k_top + k_bot) * _TOPK_FRACTION <= n:
        # The barrier keeps XLA from rewriting "top_k, then slice" into a full sort.
        top, bot = jax.lax.optimization_barrier(
            (
                jax.lax.top_k(x2d, k_top)[0] if k_top else None,  # descending
                -jax.lax.top_k(-x2d, k_bot)[0] if k_bot else None,  # ascending
            )
        )

        def order_stat(upper: bool, idx: int) -> jax.Array:
            return top[:, n - 1 - idx] if upper else bot[:, idx]

    else:
        xs = jnp.sort(x2d, axis=-1)

        def order_stat(upper: bool, idx: int) -> jax.Array:
            del upper
            return xs[:, idx]

    lower = jnp.stack([order_stat(upper, i) for upper, i, _, _ in spots])
    higher = jnp.stack([order_stat(upper, j) for upper, _, j, _ in spots])
    return lower, higher


def _quantiles(x2d: jax.Array, probs: tuple[float, ...]):
    """Exact linear-interpolation quantiles along the last axis: ``(len(probs), C)``.

    NumPy's ``_lerp`` (used by ``np.quantile``): ``b - (b - a)·(1 - t)`` for ``t >= 0.5``,
    else ``a + (b - a)·t``, in float32.
    """
    xp, lower, higher = _host(*_order_stats(x2d, probs))
    out = []
    for k, (_, _, _, t) in enumerate(_quantile_spots(x2d.shape[-1], probs)):
        a, b = lower[k], higher[k]
        diff = b - a
        out.append(b - diff * np.float32(1.0 - t) if t >= 0.5 else a + diff * np.float32(t))
    return xp.stack(out)


def _asymmetric_params(lo, hi, bits: int):
    """``s = (hi - lo)/(2^b - 1)``, ``z = round(-lo/s)``, with the degenerate-range guard."""
    xp, lo, hi = _host(lo, hi)
    levels = np.float32(2**bits - 1)
    span = hi - lo
    mag = xp.maximum(xp.abs(lo), xp.abs(hi))
    ok = (span >= MIN_RANGE) & (span * np.float32(_MAX_ZERO_POINT) >= mag * levels)
    scale = xp.where(ok, span, xp.maximum(mag, np.float32(MIN_RANGE))) / levels
    zero_point = xp.round(-lo / scale)
    return scale, xp.where(zero_point == 0, np.float32(0), zero_point)  # no -0.0


def _symmetric_scale(lo, hi, bits: int):
    xp, lo, hi = _host(lo, hi)
    mag = xp.maximum(xp.abs(lo), xp.abs(hi))
    return xp.maximum(mag, np.float32(MIN_RANGE)) / np.float32(2 ** (bits - 1) - 1)


def _range_params(lo, hi, bits: int, symmetric: bool):
    if symmetric:
        xp, scale = _host(_symmetric_scale(lo, hi, bits))
        return scale, xp.zeros_like(scale)
    return _asymmetric_params(lo, hi, bits)


def _code_limits(bits: int, symmetric: bool) -> tuple[int, int]:
    return code_range("symmetric" if symmetric else "uniform", bits)


def _finish(scale, zero_point, bits: int, axis: int | None, symmetric: bool) -> QuantParams:
    if axis is None:
        scale, zero_point = scale[0], zero_point[0]
    if symmetric:
        return quantizers.symmetric(scale, bits, axis=axis)
    return quantizers.uniform(scale, zero_point, bits, axis=axis)


@jax.jit
def _min_max(x2d: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x2d.min(axis=-1), x2d.max(axis=-1)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax"))
def _uniform_mse_table(x2d, scale, zero_point, qmin: int, qmax: int) -> jax.Array:
    """``(P, C)`` MSE of the uniform fake quantizer for ``P`` candidate ``(C,)`` params."""

    def mse(sz):
        s, z = sz
        xhat = quantizers._uniform_forward(x2d, s[:, None], z[:, None], qmin, qmax)
        return jnp.mean(jnp.square(xhat - x2d), axis=-1)

    # One pass over the data per candidate (`lax.map`): XLA's CPU backend fuses each
    # into a single reduction, where the vmapped (P, C, N) form ran 6x slower.
    return jax.lax.map(mse, (jnp.asarray(scale), jnp.asarray(zero_point)))


@functools.partial(jax.jit, static_argnames=("bits", "root"))
def _log_mse_table(x: jax.Array, scales, bits: int, root: int) -> jax.Array:
    """``(P,)`` MSE of the log quantizer of root ``k`` for ``P`` candidate scales."""

    def mse(s):
        xhat = quantizers._log_root_values(quantizers._log_root_codes(x, s, bits, root), s, bits, root)
        return jnp.mean(jnp.square(xhat - x))

    return jax.lax.map(mse, jnp.asarray(scales))  # one fused pass per candidate, as above


def _pick(candidates, errors):
    """Per column, the candidate (row) with the lowest error; ties go to the first."""
    xp, candidates, errors = _host(candidates, errors)
    best = xp.argmin(errors, axis=0)[None]
    return xp.take_along_axis(candidates, best, axis=0)[0]


# ----------------------------------------------------------------------------
# Public rules.


def minmax(x, bits: int, axis: int | None = None, symmetric: bool = False) -> QuantParams:
    """Fits a uniform quantizer to the full range ``[min(x), max(x)]``.

    Asymmetric: ``s = (max - min)/(2^b - 1)``, ``z = round(-min/s)``.
    Symmetric: ``s = max|x|/(2^(b-1) - 1)``, ``z = 0``.

    Args:
        x: observed values (concrete ``jax.Array`` or NumPy array).
        bits: bit width in 2..16.
        axis: channel axis to keep (per-channel quantizer); ``None`` per tensor.
        symmetric: fit a ``"symmetric"`` instead of a ``"uniform"`` quantizer.

    Returns:
        The fitted :class:`QuantParams`.

    Raises:
        ValueError: empty data, NaN/Inf in the data, bits outside 2..16, bad axis.

    Example:
        >>> qp = minmax(np.array([-1.0, 0.0, 2.0]), bits=2)
        >>> float(qp.scale), float(qp.zero_point)
        (1.0, 1.0)
    """
    bits = quantizers._check_bits(bits)
    x = _check_data(x)
    axis = _check_axis(axis, x.ndim)
    lo, hi = _min_max(_channels_first(x, axis))
    scale, zero_point = _range_params(lo, hi, bits, bool(symmetric))
    return _finish(scale, zero_point, bits, axis, symmetric)


def percentile(x, bits: int, p: float = 0.9999, axis: int | None = None, symmetric: bool = False) -> QuantParams:
    """Fits a uniform quantizer to ``[quantile(x, 1-p), quantile(x, p)]``.

    Quantiles use NumPy's default linear interpolation and are exact for
    arrays of any size.

    Args:
        x: observed values (concrete ``jax.Array`` or NumPy array).
        bits: bit width in 2..16.
        p: upper percentile as a fraction in (0.5, 1] (1 is min-max).
        axis: channel axis to keep (per-channel quantizer); ``None`` per tensor.
        symmetric: fit a ``"symmetric"`` quantizer, ``s = max(|lo|, |hi|)/(2^(b-1) - 1)``.

    Returns:
        The fitted :class:`QuantParams`.

    Raises:
        ValueError: empty data, NaN/Inf, bits outside 2..16, p outside (0.5, 1].

    Example:
        >>> qp = percentile(np.arange(101.0), bits=8, p=0.99)
        >>> round(float(qp.scale) * 255, 4)
        98.0
    """
    bits = quantizers._check_bits(bits)
    p = _check_percentile(p)
    x = _check_data(x)
    axis = _check_axis(axis, x.ndim)
    hi, lo = _quantiles(_channels_first(x, axis), (p, 1.0 - p))
    scale, zero_point = _range_params(lo, hi, bits, bool(symmetric))
    return _finish(scale, zero_point, bits, axis, symmetric)


def search_uniform(
    x,
    bits: int,
    axis: int | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    symmetric: bool = False,
) -> QuantParams:
    """The RepQ-ViT rule: the percentile range with the lowest quantization MSE.

    For each ``p``: ``hi = quantile(x, p)``, ``lo = quantile(x, 1-p)``,
    ``s = (hi - lo)/(2^b - 1)``, ``z = round(-lo/s)`` (symmetric:
    ``s = max(|lo|, |hi|)/(2^(b-1) - 1)``, ``z = 0``); the candidate with the
    lowest mean squared error of :func:`~repquant_jax._src.quantizers.fake_quant`
    wins, independently for each channel when ``axis`` is given (vectorized:
    a ``(P, C)`` error table, argmin over ``P``).

    Args:
        x: observed values (concrete ``jax.Array`` or NumPy array).
        bits: bit width in 2..16.
        axis: channel axis to keep (per-channel quantizer); ``None`` per tensor.
        percentiles: candidate upper percentiles, each in (0.5, 1].
        symmetric: fit a ``"symmetric"`` instead of a ``"uniform"`` quantizer.

    Returns:
        The fitted :class:`QuantParams`.

    Raises:
        ValueError: empty data, NaN/Inf, bits outside 2..16, bad percentiles.

    Example:
        >>> x = np.random.default_rng(0).standard_t(2, size=4096).astype(np.float32)
        >>> mse = lambda qp: float(quantization_mse(x, qp))
        >>> mse(search_uniform(x, bits=4)) <= mse(minmax(x, bits=4))
        True
    """
    bits = quantizers._check_bits(bits)
    cands = candidates(_check_percentiles(percentiles))
    x = _check_data(x)
    axis = _check_axis(axis, x.ndim)
    x2d = _channels_first(x, axis)
    scale, zero_point = _candidate_params(x2d, cands, bits, bool(symmetric))  # (P, C)
    errors = _uniform_mse_table(x2d, scale, zero_point, *_code_limits(bits, bool(symmetric)))
    scale, zero_point = _pick(scale, errors), _pick(zero_point, errors)
    return _finish(scale, zero_point, bits, axis, symmetric)


class Candidate(NamedTuple):
    """One candidate range of the uniform search.

    Attributes:
        percentile: the range is ``[quantile(x, 1-p), quantile(x, p)]`` (1: min-max).
        expansion: both ends of that range multiplied by this factor (>= 1), so that
            values a little beyond the observed ones are not clipped. On the values
            it was fitted to a widened range never has a lower error; it can win only
            when judged on other values (`candidate_errors` with held-out samples).
    """

    percentile: float
    expansion: float = 1.0


def candidates(
    percentiles: Sequence[float] = DEFAULT_PERCENTILES, expansions: Sequence[float] = ()
) -> tuple[Candidate, ...]:
    """The percentile ranges, then the min-max range widened by each of ``expansions``.

    Example:
        >>> candidates((0.999, 1.0), expansions=(2.0,))
        (Candidate(percentile=0.999, expansion=1.0), Candidate(percentile=1.0, expansion=1.0), \
Candidate(percentile=1.0, expansion=2.0))
    """
    out = tuple(Candidate(p) for p in _check_percentiles(percentiles))
    for e in expansions:
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating)) or not 1.0 <= e <= 1e3:
            raise ValueError(f"range expansions must be numbers in [1, 1000], got {e!r}")
        out += (Candidate(1.0, float(e)),)
    return out


def _candidate_probs(cands: Sequence[Candidate]) -> tuple[float, ...]:
    """The quantile levels the candidates need: each percentile ``p``, then each ``1 - p``."""
    probs = tuple(dict.fromkeys(c.percentile for c in cands))
    return probs + tuple(1.0 - p for p in probs)


def _candidate_bounds(xp, q, cands: Sequence[Candidate]):
    """``(K, C)`` lower and upper ends of the candidate ranges from the quantiles ``q``
    at `_candidate_probs` (one float32 rounding per widened end, on host or under jit)."""
    n = len(q) // 2
    probs = _candidate_probs(cands)[:n]
    lo = xp.stack([q[n + probs.index(c.percentile)] * np.float32(c.expansion) for c in cands])
    hi = xp.stack([q[probs.index(c.percentile)] * np.float32(c.expansion) for c in cands])
    return lo, hi


def _candidate_params(x2d: jax.Array, cands: Sequence[Candidate], bits: int, symmetric: bool):
    """``(K, C)`` scales and zero points of the candidate ranges of every channel."""
    xp, q = _host(_quantiles(x2d, _candidate_probs(cands)))
    lo, hi = _candidate_bounds(xp, q, cands)
    return _range_params(lo, hi, bits, symmetric)


def candidate_errors(
    fit,
    score,
    bits: int,
    axis: int | None,
    cands: Sequence[Candidate],
    symmetric: bool = False,
) -> np.ndarray:
    """Mean squared error on ``score`` of each candidate range fitted to ``fit``.

    With ``fit`` and ``score`` two disjoint parts of the calibration samples, this is
    the candidates' error on values they did not see: the judgement that makes a range
    hold on new inputs (a range fitted to few samples is too narrow for the next ones).

    It runs on the host in NumPy (quantiles as ``np.quantile``, the fake quantizer's
    formula in float32, the errors summed in float64): it only ranks candidates, the
    chosen one is then fitted by `fit_candidates`, and NumPy compiles nothing for the
    many shapes the held-out parts have. So it is also the same with and without jit.

    Args:
        fit: values the candidate ranges are fitted to (concrete).
        score: values they are judged on (the same size along ``axis``).
        bits: bit width in 2..16.
        axis: channel axis to keep (per channel), or ``None`` (per tensor).
        cands: the candidates (`candidates`).
        symmetric: symmetric quantizers.

    Returns:
        ``(K, C)`` float64 errors, ``C = 1`` per tensor.

    Example:
        >>> x = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
        >>> errors = candidate_errors(x[::2], x[1::2] * 1.5, 16, None, candidates((1.0,), (2.0,)))
        >>> [int(i) for i in errors.argmin(axis=0)]  # the wider range holds the new values
        [1]
    """
    bits = quantizers._check_bits(bits)
    fit2d, score2d = (_host_channels_first(_check_host(v), axis) for v in (fit, score))
    if fit2d.shape[0] != score2d.shape[0]:
        raise ValueError(f"fit and score data have {fit2d.shape[0]} and {score2d.shape[0]} channels")
    q = np.quantile(fit2d, _candidate_probs(cands), axis=1).astype(np.float32)  # (2P, C)
    lo, hi = _candidate_bounds(np, q, cands)
    scale, zero_point = _range_params(lo, hi, bits, bool(symmetric))  # (K, C)
    qmin, qmax = _code_limits(bits, bool(symmetric))
    errors = np.empty(scale.shape, np.float64)
    for k in range(len(cands)):
        s, z = scale[k][:, None], zero_point[k][:, None]
        xhat = (np.clip(np.round(score2d / s) + z, qmin, qmax) - z) * s
        errors[k] = np.mean(np.square(xhat - score2d, dtype=np.float64), axis=1)
    return errors


def _check_host(x) -> np.ndarray:
    host = np.asarray(x, np.float32)
    _check_not_empty(host)
    if not np.isfinite(host).all():
        raise ValueError("calibration data contains NaN or Inf")
    return host


def _host_channels_first(x: np.ndarray, axis: int | None) -> np.ndarray:
    axis = _check_axis(axis, x.ndim)
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def fit_candidates(
    x, bits: int, axis: int | None, cands: Sequence[Candidate], choice, symmetric: bool = False
) -> QuantParams:
    """The quantizer of candidate ``choice[c]`` fitted to ``x``, for every channel ``c``.

    Args:
        x: observed values.
        bits: bit width in 2..16.
        axis: channel axis to keep, or ``None`` (per tensor).
        cands: the candidates.
        choice: index into ``cands``: one per channel, or one for all.
        symmetric: symmetric quantizers.

    Example:
        >>> x = np.array([[-1.0, 0.5], [2.0, 1.0]], np.float32)
        >>> fit_candidates(x, 8, None, candidates((1.0,), (2.0,)), 1).scale * 255
        Array(6., dtype=float32)
    """
    bits = quantizers._check_bits(bits)
    x = _check_data(x)
    axis = _check_axis(axis, x.ndim)
    x2d = _channels_first(x, axis)
    scale, zero_point = _candidate_params(x2d, cands, bits, bool(symmetric))
    index = np.broadcast_to(np.asarray(choice, np.int64), (x2d.shape[0],))[None]
    xp, scale, zero_point = _host(scale, zero_point)
    scale = xp.take_along_axis(scale, index, axis=0)[0]
    zero_point = xp.take_along_axis(zero_point, index, axis=0)[0]
    return _finish(scale, zero_point, bits, axis, symmetric)


def search_log_sqrt2(
    x,
    bits: int,
    percentiles: Sequence[float] = LOG_PERCENTILES,
    kind: str = "log_sqrt2",
    root: int | None = None,
) -> QuantParams:
    """Fits a per-tensor log√2 (or log2) quantizer: ``s = quantile(x, p)``, lowest MSE.

    Args:
        x: observed non-negative values, e.g. softmax outputs (concrete
            ``jax.Array`` or NumPy array).
        bits: bit width in 2..16.
        percentiles: candidate percentiles for the scale, each in (0.5, 1].
        kind: ``"log_sqrt2"``, ``"log2"`` or ``"log_root"``.
        root: ``k`` of a ``"log_root"`` quantizer (levels ``2^(-q/k)``).

    Returns:
        The fitted per-tensor :class:`QuantParams` of the given kind.

    Raises:
        ValueError: empty data, NaN/Inf or negative values, bits outside 2..16,
            bad percentiles, or another kind.

    Example:
        >>> attn = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 16, 16)) * 3)
        >>> qp = search_log_sqrt2(attn, bits=4)
        >>> qp.kind, 0 < float(qp.scale) <= 1
        ('log_sqrt2', True)
    """
    bits = quantizers._check_bits(bits)
    if kind not in ("log_sqrt2", "log2", "log_root"):
        raise ValueError(f"kind must be 'log_sqrt2' or 'log2' (or 'log_root' with a root), got {kind!r}")
    if (kind == "log_root") != (root is not None):
        raise ValueError(f"a root is needed for kind 'log_root' and only for it, got kind={kind!r}, root={root!r}")
    percentiles = _check_percentiles(percentiles)
    x = _check_data(x, nonnegative=True)
    flat = x.reshape(1, -1)
    xp, q, xmax = _host(_quantiles(flat, percentiles)[:, 0], jnp.max(x))
    scales = xp.where(q > 0, q, xp.where(xmax > 0, xmax, np.float32(1)))  # (P,)
    k = root if root is not None else (2 if kind == "log_sqrt2" else 1)
    errors = _log_mse_table(flat, scales, bits, quantizers._check_root(k))
    scale = _pick(scales[:, None], errors[:, None])[0]
    if kind == "log_root":
        return quantizers.log_root(scale, bits, k)
    if kind == "log2":
        return quantizers.log2(scale, bits)
    return quantizers.log_sqrt2(scale, bits)


def quantization_mse(x, qp: QuantParams, axis: int | None = None) -> jax.Array:
    """Mean squared error of :func:`~repquant_jax._src.quantizers.fake_quant`.

    Traceable (no value checks), so it can be used inside ``jax.jit``.

    Args:
        x: values to quantize.
        qp: the quantizer.
        axis: if given, the error is averaged over all other axes and returned
            per index along ``axis``.

    Returns:
        A float32 scalar, or shape ``(x.shape[axis],)`` when ``axis`` is given.

    Example:
        >>> qp = quantizers.uniform(1.0, 0.0, bits=2)
        >>> round(float(quantization_mse(np.array([0.0, 0.4]), qp)), 6)
        0.08
    """
    x = jnp.asarray(x)
    x32 = x.astype(jnp.float32)
    err = jnp.square(quantizers.fake_quant(x32, qp) - x32)
    if axis is None:
        return jnp.mean(err)
    axis = _check_axis(axis, x.ndim)
    ax = axis % x.ndim
    return jnp.mean(err, axis=tuple(d for d in range(x.ndim) if d != ax))
