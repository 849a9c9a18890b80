"""Fake quantizers and integer codes: uniform, symmetric and log base 2^(1/k) (log2, log√2).

A quantizer is described by a :class:`QuantParams` pytree (``scale`` and
``zero_point`` are leaves; ``bits``, ``kind`` and ``axis`` are static). Three
pure functions act on it:

* :func:`quantize` maps real values to integer codes (``int32``),
* :func:`dequantize` maps codes back to real values (``float32``),
* :func:`fake_quant` is ``dequantize(quantize(x))`` with a straight-through
  gradient, for use inside a model.

Kinds (docs/method.md, "Quantizers"), with ``s`` the scale, ``z`` the zero point, ``b`` the bits:

* ``"uniform"`` (asymmetric): ``q = clip(round(x/s) + z, 0, 2^b - 1)``,
  ``x̂ = (q - z)·s``. Rounding is half to even (:func:`jax.numpy.round`).
* ``"symmetric"``: the same with ``z = 0`` and signed codes in
  ``[-2^(b-1), 2^(b-1) - 1]``.
* ``"log_sqrt2"`` (for values in ``[0, 1]``, e.g. softmax outputs):
  ``q = round(-2·log2(x/s))``, ``x̂ = s·2^(-q/2)``.
* ``"log2"``: ``q = round(-log2(x/s))``, ``x̂ = s·2^(-q)``.
* ``"log_root"`` with an integer root ``k >= 1`` (static ``QuantParams.root``):
  ``q = round(-k·log2(x/s))``, ``x̂ = s·2^(-q/k)``, levels ``2^(1/k)`` apart. ``k = 1``
  gives the log2 levels and ``k = 2`` the log√2 ones, bit for bit; :func:`log_root_of`
  gives the ``k`` of every log kind.

Uniform and symmetric quantizers are per tensor (``axis=None``, scalar scale)
or per channel (``scale`` and ``zero_point`` of shape ``(C,)`` broadcast along
``axis`` of ``x``; negative axes count from the end of ``x``).

Design decisions:

* **Reserved zero code for the log kinds.** The top code ``2^b - 1`` is
  reserved for an exact zero; the nonzero levels are the codes
  ``0 .. 2^b - 2``. ``x <= 0`` and any positive ``x`` whose rounded code would
  exceed ``2^b - 2`` (underflow) get the code ``2^b - 1``, which dequantizes to
  exactly ``0.0``; values above ``s`` clip to code 0. This makes the zeros of a
  causal mask exactly representable by an integer code and makes
  ``quantize``/``dequantize`` a true encode/decode pair:
  ``quantize(dequantize(q)) == q`` for every code whose level is a normal
  float32 number. Levels with ``e = ceil(q/k) > 126`` or ``s·2^-e`` below float32's
  normal range (only log2 from 7 bits and log√2 from 8 bits reach them)
  dequantize to 0 and are never produced by :func:`quantize`, which sends such
  an underflow to the zero code too. ``x <= 0`` goes through a
  safe argument before ``log2``, so neither the forward nor the backward pass
  produces NaN or Inf at ``x = 0``. NaN inputs are not supported.
* **Exact powers of two.** Log-kind values are built as ``s·c_j·2^(-e)``
  (``e = ceil(q/k)``, ``j = k·e - q`` in ``0..k-1``, ``c_j = 2^(j/k)`` rounded to
  float32 once, :func:`log_root_to_log2_terms`) with the power of two assembled
  bit-exactly (not through ``exp2``), so that the shift-and-add form of
  :func:`log_root_matmul_shift_add` multiplies by the very same numbers.
* **Gradients.** :func:`fake_quant` of the uniform kinds uses the *clipped*
  straight-through estimator: ``∂x̂/∂x = 1`` for ``x`` in the closed clipping
  range ``[(qmin - z)·s, (qmax - z)·s]`` and 0 outside. The forward value is
  exactly ``dequantize(quantize(x))`` (no ``x + (x̂ - x)`` rounding). Scale and
  zero point receive the LSQ gradients (``∂x̂/∂s = round(x/s) - x/s`` inside,
  ``qmax - z`` / ``qmin - z`` above / below; ``∂x̂/∂z = 0`` inside, ``-s``
  outside), so clipping ranges can be learned with optax; wrap them in
  :func:`jax.lax.stop_gradient` to treat them as constants. The log kinds use
  the plain identity STE (``∂x̂/∂x = 1``, no gradient to the scale). The
  estimators are ``jax.custom_jvp`` rules, so the forward pass computes only
  the quantize-dequantize expression and fuses into neighbouring kernels.
* **Validation.** Constructors raise ``ValueError`` for bits outside 2..16,
  badly shaped scales or zero points, and (when the scale is concrete, i.e. not
  traced under ``jit``) non-positive or non-finite scales. :func:`quantize` and
  friends check static fields and per-channel shapes, so every function stays
  jit-able.
* **Zero points** are integer-valued ``float32``. They are not clipped to the
  code range (RepQ-ViT does not clip them). A non-integer zero point (e.g.
  RepQ-ViT's unrounded-mean fold) is accepted: :func:`fake_quant` then follows
  RepQ-ViT's float formula, but :func:`quantize` codes are only meaningful for
  integer zero points.
* **dtypes.** Computation is in ``float32`` (or wider); :func:`fake_quant`
  returns ``x``'s floating dtype.
* **jit.** The ops are wrapped in :func:`jax.jit` (like ``jax.numpy``
  functions), so an eager call compiles one small program per shape instead of
  dispatching some forty primitives; inside a user's ``jit`` they inline.

Example:
    >>> import jax.numpy as jnp
    >>> from repquant_jax._src import quantizers as qz
    >>> qp = qz.uniform(scale=0.5, zero_point=2.0, bits=4)
    >>> qz.quantize(jnp.array([-1.0, 0.26, 100.0]), qp)
    Array([ 0,  3, 15], dtype=int32)
    >>> qz.fake_quant(jnp.array([-1.0, 0.26, 100.0]), qp)
    Array([-1. ,  0.5,  6.5], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from repquant_jax._src import types
from repquant_jax._src.types import MAX_LOG_ROOT, QUANTIZER_KINDS, QuantizerKind, log_zero_code

__all__ = [
    "KINDS",
    "Kind",
    "QuantParams",
    "code_range",
    "default_log_root",
    "dequantize",
    "fake_quant",
    "log2",
    "log_root",
    "log_root_matmul_shift_add",
    "log_root_multipliers",
    "log_root_of",
    "log_root_to_log2_terms",
    "log_sqrt2",
    "log_sqrt2_matmul_shift_add",
    "log_sqrt2_to_log2_terms",
    "quantize",
    "symmetric",
    "uniform",
]

Kind = QuantizerKind
KINDS = QUANTIZER_KINDS
MIN_BITS = 2
MAX_BITS = 16

MAX_ROOT = MAX_LOG_ROOT

_UNIFORM_KINDS = ("uniform", "symmetric")
#: The root k implied by the kinds that have one built in.
_FIXED_ROOTS = {"log2": 1, "log_sqrt2": 2}


@struct.dataclass
class QuantParams:
    """Parameters of one fake quantizer (a pytree: scale/zero_point are leaves).

    Build it with :func:`uniform`, :func:`symmetric`, :func:`log2` or
    :func:`log_sqrt2`, which validate their arguments; the raw constructor does
    not (it is also what ``jax.tree_util`` uses to rebuild the pytree).

    Attributes:
        scale: ``()`` per tensor, or ``(C,)`` per channel. Positive.
        zero_point: same shape as ``scale``; integer-valued ``float32`` (0 for the
            symmetric and log kinds).
        bits: bit width, 2..16 (static).
        kind: one of :data:`KINDS` (static).
        axis: channel axis of ``x`` for per-channel quantizers; ``None`` for per
            tensor (static).
        root: the ``k`` of a ``"log_root"`` quantizer (levels ``2^(-q/k)``), in
            ``1..MAX_ROOT``; ``None`` for the other kinds (static).

    Example:
        >>> qp = symmetric(scale=jnp.array([0.1, 0.2]), bits=8, axis=-1)
        >>> code_range(qp)
        (-128, 127)
    """

    scale: jax.Array
    zero_point: jax.Array
    bits: int = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False, default="uniform")
    axis: int | None = struct.field(pytree_node=False, default=None)
    root: int | None = struct.field(pytree_node=False, default=None)

    if TYPE_CHECKING:  # added by flax.struct.dataclass at runtime

        def replace(self, **changes: Any) -> QuantParams: ...


# ----------------------------------------------------------------------------
# Validation helpers.


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown quantizer kind {kind!r}; expected one of {KINDS}")
    return kind


def _check_axis(axis) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis must be an int or None, got {axis!r}")
    return int(axis)


def _check_scale(scale: jax.Array) -> None:
    if not _is_concrete(scale):
        return
    s = np.asarray(scale)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scale must be finite, got {s if s.size <= 8 else 'non-finite entries'}")
    if np.any(s <= 0):
        raise ValueError(f"scale must be positive, got min(scale) = {s.min()}")


def _check_param_shapes(scale: jax.Array, zero_point: jax.Array, axis: int | None) -> None:
    if axis is None and scale.ndim != 0:
        raise ValueError(f"a per-tensor quantizer (axis=None) needs a scalar scale, got shape {scale.shape}")
    if axis is not None and scale.ndim != 1:
        raise ValueError(f"a per-channel quantizer (axis={axis}) needs a scale of shape (C,), got shape {scale.shape}")
    if zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {zero_point.shape} does not match scale shape {scale.shape}")


def _check_root(root) -> int:
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 1 <= root <= MAX_ROOT:
        raise ValueError(f"root must be an int in 1..{MAX_ROOT}, got {root!r}")
    return int(root)


def _check_static(qp: QuantParams) -> None:
    _check_bits(qp.bits)
    _check_kind(qp.kind)
    _check_axis(qp.axis)
    if qp.kind == "log_root":
        _check_root(qp.root)
    elif qp.root is not None:
        raise ValueError(f"only 'log_root' quantizers have a root, got kind={qp.kind!r} with root={qp.root!r}")


def _as_f32(a) -> jax.Array:
    return jnp.asarray(a, dtype=jnp.float32)


def _make(scale, zero_point, bits, kind, axis, root: int | None = None) -> QuantParams:
    bits = _check_bits(bits)
    axis = _check_axis(axis)
    scale = _as_f32(scale)
    zero_point = _as_f32(zero_point)
    _check_param_shapes(scale, zero_point, axis)
    _check_scale(scale)
    return QuantParams(scale=scale, zero_point=zero_point, bits=bits, kind=kind, axis=axis, root=root)


# ----------------------------------------------------------------------------
# Constructors.


def uniform(scale, zero_point, bits: int, axis: int | None = None) -> QuantParams:
    """Asymmetric uniform quantizer ``q = clip(round(x/s) + z, 0, 2^b - 1)``.

    Args:
        scale: positive scale, ``()`` or ``(C,)``.
        zero_point: integer-valued zero point, same shape as ``scale``.
        bits: bit width in 2..16.
        axis: channel axis of ``x`` for per-channel ``(C,)`` parameters.

    Returns:
        A validated :class:`QuantParams` of kind ``"uniform"``.

    Raises:
        ValueError: bad bits, shapes, or a non-positive / non-finite concrete scale.

    Example:
        >>> qp = uniform(jnp.array([0.1, 1.0]), jnp.array([3.0, 0.0]), bits=8, axis=1)
        >>> quantize(jnp.array([[0.5, 2.0]]), qp)
        Array([[8, 2]], dtype=int32)
    """
    return _make(scale, zero_point, bits, "uniform", axis)


def symmetric(scale, bits: int, axis: int | None = None) -> QuantParams:
    """Symmetric uniform quantizer: ``z = 0``, codes in ``[-2^(b-1), 2^(b-1) - 1]``.

    Args:
        scale: positive scale, ``()`` or ``(C,)``.
        bits: bit width in 2..16.
        axis: channel axis of ``x`` for per-channel ``(C,)`` scales.

    Returns:
        A validated :class:`QuantParams` of kind ``"symmetric"``.

    Example:
        >>> quantize(jnp.array([-1.0, 0.3, 9.0]), symmetric(0.1, bits=4))
        Array([-8,  3,  7], dtype=int32)
    """
    scale = _as_f32(scale)
    return _make(scale, jnp.zeros_like(scale), bits, "symmetric", axis)


def log2(scale, bits: int) -> QuantParams:
    """Per-tensor log2 quantizer ``q = round(-log2(x/s))``, ``x̂ = s·2^(-q)``.

    The code ``2^b - 1`` is reserved for exact zero (see the module docstring).

    Args:
        scale: positive scalar scale (the largest representable value).
        bits: bit width in 2..16.

    Returns:
        A validated :class:`QuantParams` of kind ``"log2"``.

    Example:
        >>> fake_quant(jnp.array([1.0, 0.3, 0.0]), log2(1.0, bits=4))
        Array([1.  , 0.25, 0.  ], dtype=float32)
    """
    scale = _as_f32(scale)
    return _make(scale, jnp.zeros_like(scale), bits, "log2", None)


def log_sqrt2(scale, bits: int) -> QuantParams:
    """Per-tensor log√2 quantizer ``q = round(-2·log2(x/s))``, ``x̂ = s·2^(-q/2)``.

    The code ``2^b - 1`` is reserved for exact zero (see the module docstring).

    Args:
        scale: positive scalar scale (the largest representable value).
        bits: bit width in 2..16.

    Returns:
        A validated :class:`QuantParams` of kind ``"log_sqrt2"``.

    Example:
        >>> quantize(jnp.array([1.0, 0.5, 0.0]), log_sqrt2(1.0, bits=4))
        Array([ 0,  2, 15], dtype=int32)
    """
    scale = _as_f32(scale)
    return _make(scale, jnp.zeros_like(scale), bits, "log_sqrt2", None)


def log_root(scale, bits: int, root: int) -> QuantParams:
    """Per-tensor log quantizer of base ``2^(1/k)``: ``q = round(-k·log2(x/s))``, ``x̂ = s·2^(-q/k)``.

    ``k = root``; its levels are ``2^(1/k)`` apart, so a larger ``k`` trades range
    (``2^-((2^b - 2)/k)`` is the smallest level) for resolution. ``root=1`` has the
    levels of :func:`log2` and ``root=2`` those of :func:`log_sqrt2`. The code
    ``2^b - 1`` is reserved for exact zero (see the module docstring).

    Args:
        scale: positive scalar scale (the largest representable value).
        bits: bit width in 2..16.
        root: ``k``, an integer in ``1..MAX_ROOT``.

    Returns:
        A validated :class:`QuantParams` of kind ``"log_root"``.

    Raises:
        ValueError: bad bits or root, or a non-positive / non-finite concrete scale.

    Example:
        >>> qp = log_root(1.0, bits=4, root=3)
        >>> quantize(jnp.array([1.0, 0.5, 0.63, 0.0]), qp)
        Array([ 0,  3,  2, 15], dtype=int32)
    """
    scale = _as_f32(scale)
    return _make(scale, jnp.zeros_like(scale), bits, "log_root", None, _check_root(root))


def log_root_of(qp: QuantParams) -> int:
    """The root ``k`` of a log quantizer: 1 for ``"log2"``, 2 for ``"log_sqrt2"``, ``qp.root``
    for ``"log_root"``.

    Raises:
        ValueError: ``qp`` is not a log quantizer.

    Example:
        >>> log_root_of(log_sqrt2(1.0, bits=4)), log_root_of(log_root(1.0, bits=8, root=4))
        (2, 4)
    """
    if qp.kind == "log_root":
        return _check_root(qp.root)
    if qp.kind not in _FIXED_ROOTS:
        raise ValueError(f"{qp.kind!r} is not a log quantizer kind")
    return _FIXED_ROOTS[qp.kind]


#: Root k of the default softmax quantizer per bit-width (``"log_root"`` with
#: ``softmax_log_root=None``; the reasons are in `default_log_root`).
_DEFAULT_LOG_ROOTS = {2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 10, 8: 12}


def default_log_root(bits: int) -> int:
    """The root ``k`` a ``"log_root"`` softmax quantizer gets at ``bits`` when none is given.

    Measured at 4, 6 and 8 bits (experiments/results/softmax_base.md, the mean relative
    output error of the shipped ViT and the tiny LLaMA; experiments/RESULTS.md for
    MiniLM), interpolated at 2, 3, 5 and 7:

    * 4 bits: log√2 (k = 2). k = 3 had the lower error on the tiny LLaMA, log√2 on the
      ViT over 3 draws with equal top-1, so RepQ-ViT's log√2 stays.
    * 6 bits: k = 4. k = 8 had a slightly lower error on the ViT and the LLaMA (4.13%
      vs 4.34%, 4.16% vs 4.33%), but its smallest level, 2^-7.75, is about uniform
      attention over 200 keys: on MiniLM's documents of up to 160 tokens it rounds
      many probabilities to zero (cosine to float 97.28 against 97.68 with k = 4).
    * 8 bits: k = 12 (smallest level 2^-21).

    Above 8 bits the resolution doubles with every further bit (``k(b) = k(8)·2^(b-8)``,
    at most ``MAX_ROOT``), which keeps the range ``2^-((2^b - 2)/k)`` about constant
    while the levels get closer; at 16 bits k = 1024 had the lowest softmax error of
    those tried.

    Example:
        >>> [default_log_root(b) for b in (4, 6, 8, 16)]
        [2, 4, 12, 1024]
    """
    bits = _check_bits(bits)
    if bits in _DEFAULT_LOG_ROOTS:
        return _DEFAULT_LOG_ROOTS[bits]
    return min(MAX_ROOT, _DEFAULT_LOG_ROOTS[8] * 2 ** (bits - 8))


def code_range(qp: QuantParams) -> tuple[int, int]:
    """Returns the integer code range ``(qmin, qmax)`` of a quantizer.

    For the log kinds ``qmax = 2^b - 1`` is the reserved exact-zero code.

    Example:
        >>> code_range(symmetric(1.0, bits=8)), code_range(log2(1.0, bits=3))
        ((-128, 127), (0, 7))
    """
    bits = _check_bits(qp.bits)
    return types.code_range(_check_kind(qp.kind), bits)


# ----------------------------------------------------------------------------
# Kernels.


def _broadcast_param(p: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    """Reshapes a ``()`` or ``(C,)`` parameter to broadcast against ``shape``."""
    p = _as_f32(p)
    if axis is None:
        if p.ndim != 0:
            raise ValueError(f"a per-tensor quantizer (axis=None) needs a scalar scale, got shape {p.shape}")
        return p
    ndim = len(shape)
    ax = axis + ndim if axis < 0 else axis
    if not 0 <= ax < ndim:
        raise ValueError(f"quantizer axis {axis} is out of range for x of shape {shape}")
    if p.shape != (shape[ax],):
        raise ValueError(f"per-channel scale has shape {p.shape} but x.shape[{axis}] = {shape[ax]}")
    bshape = [1] * ndim
    bshape[ax] = shape[ax]
    return p.reshape(bshape)


def _compute_dtype(x: jax.Array):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.promote_types(x.dtype, jnp.float32)
    return jnp.float32


def _prepare(x, qp: QuantParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    _check_static(qp)
    x = jnp.asarray(x)
    xc = x.astype(_compute_dtype(x))
    s = _broadcast_param(qp.scale, x.shape, qp.axis)
    z = _broadcast_param(qp.zero_point, x.shape, qp.axis)
    return xc, s, z


def _uniform_codes(x, s, z, qmin: int, qmax: int) -> jax.Array:
    """Float-valued uniform codes ``clip(round(x/s) + z, qmin, qmax)``."""
    return jnp.clip(jnp.round(x / s) + z, qmin, qmax)


def _uniform_forward(x, s, z, qmin: int, qmax: int) -> jax.Array:
    return (_uniform_codes(x, s, z, qmin, qmax) - z) * s


def _log_root_codes(x, s, bits: int, root: int) -> jax.Array:
    """Float-valued codes ``round(-k·log2(x/s))`` (``k = root``), ``2^b - 1`` reserved for zero."""
    zero_code = float(log_zero_code(bits))
    v = x / s
    positive = v > 0  # False for x <= 0, for x/s underflowing to 0, and for NaN.
    safe = jnp.where(positive, v, 1.0)  # keeps log2 (and its gradient) finite
    level = -jnp.log2(safe)
    if root != 1:
        level = float(root) * level
    r = jnp.maximum(jnp.round(level), 0.0)  # values above s clip to code 0
    r = jnp.where(positive & (r < zero_code), r, zero_code)
    # A level whose value underflows float32 (it would dequantize to 0) is an
    # underflow too: send it to the exact-zero code, so that codes round-trip.
    underflow = _log_root_values(r, s, bits, root) <= 0
    return jnp.where(underflow, zero_code, r)


def _pow2_neg(e: jax.Array) -> jax.Array:
    """Exact float32 ``2^(-e)`` for integer ``e`` (0 below the normal range)."""
    e = e.astype(jnp.int32)
    ec = jnp.clip(e, -127, 126)
    bits = jax.lax.shift_left(127 - ec, jnp.int32(23))
    p = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(e > 126, 0.0, p).astype(jnp.float32)


def _root_multiplier(j: jax.Array, root: int) -> jax.Array:
    """``c_j = 2^(j/k)`` in float32 for ``j`` in ``0..k-1`` (each rounded once, from float64)."""
    table = log_root_multipliers(root)
    if root == 1:
        return jnp.ones(j.shape, jnp.float32)
    if root == 2:  # a select, not a gather: the common case stays one fused elementwise op
        return jnp.where(j == 1, jnp.float32(table[1]), jnp.float32(1.0))
    return jnp.asarray(table)[j]


def _log_root_values(codes: jax.Array, s: jax.Array, bits: int, root: int) -> jax.Array:
    codes = codes.astype(jnp.int32)
    zero = codes == log_zero_code(bits)
    if root == 1:
        e, mult = codes, s
    else:
        e, j = log_root_to_log2_terms(codes, root)
        mult = s * _root_multiplier(j, root)
    return jnp.where(zero, 0.0, mult * _pow2_neg(e)).astype(jnp.float32)


# The straight-through estimators are custom JVPs: the forward pass is then exactly the
# quantize-dequantize expression, which XLA fuses into the neighbouring kernels, instead
# of carrying a zero-valued gradient term (``g - stop_gradient(g)``) whose forward
# computation it cannot remove.


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _fake_quant_uniform(x, s, z, qmin: int, qmax: int) -> jax.Array:
    """Uniform fake quant: exact forward, clipped STE for x, LSQ for s and z."""
    return _uniform_forward(x, s, z, qmin, qmax)


@_fake_quant_uniform.defjvp
def _fake_quant_uniform_jvp(qmin, qmax, primals, tangents):
    x, s, z = primals
    dx, ds, dz = tangents
    v = x / s
    hi = (qmax - z) * s
    inside = (x >= (qmin - z) * s) & (x <= hi)
    # Inside: d/dx = 1, d/ds = round(v) - v (LSQ), d/dz = 0. Outside: the clipped value
    # (bound - z)·s. The coefficient is zeroed outside so no Inf/NaN leaks through.
    c = jnp.where(inside, jnp.round(v) - v, 0.0)
    bound = jnp.where(x > hi, float(qmax), float(qmin)) - z
    dy = jnp.where(inside, dx + c * ds, bound * ds - s * dz)
    return _uniform_forward(x, s, z, qmin, qmax), dy.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _fake_quant_log(x, s, bits: int, root: int) -> jax.Array:
    """Log fake quant with an identity STE for x (no gradient to s)."""
    return _log_root_values(_log_root_codes(x, s, bits, root), s, bits, root).astype(x.dtype)


@_fake_quant_log.defjvp
def _fake_quant_log_jvp(bits, root, primals, tangents):
    x, s = primals
    dx, _ = tangents
    return _fake_quant_log(x, s, bits, root), jnp.where(jnp.isfinite(x), dx, 0.0).astype(x.dtype)


# ----------------------------------------------------------------------------
# Public ops.


@jax.jit
def quantize(x, qp: QuantParams) -> jax.Array:
    """Maps values to integer codes.

    Args:
        x: array to quantize. Per-channel parameters broadcast along ``qp.axis``.
        qp: quantizer parameters.

    Returns:
        ``int32`` codes inside :func:`code_range`, with ``x``'s shape.

    Raises:
        ValueError: unknown kind, bad bits, or per-channel parameters whose length
            does not match ``x.shape[qp.axis]``.

    Example:
        >>> quantize(jnp.array([0.0, 0.12, 0.5]), uniform(0.1, 2.0, bits=3))
        Array([2, 3, 7], dtype=int32)
    """
    x, s, z = _prepare(x, qp)
    if qp.kind in _UNIFORM_KINDS:
        qmin, qmax = code_range(qp)
        codes = _uniform_codes(x, s, z, qmin, qmax)
    else:
        codes = _log_root_codes(x, s, qp.bits, log_root_of(qp))
    return codes.astype(jnp.int32)


@jax.jit
def dequantize(codes, qp: QuantParams) -> jax.Array:
    """Maps integer codes back to real values.

    Args:
        codes: integer codes (e.g. from :func:`quantize`).
        qp: quantizer parameters.

    Returns:
        ``float32`` values: ``(q - z)·s`` for the uniform kinds; ``s·2^(-q/k)`` for
        the log kinds (``k = log_root_of(qp)``), with the reserved code ``2^b - 1``
        giving exactly 0.

    Example:
        >>> dequantize(jnp.array([0, 1, 15]), log_sqrt2(1.0, bits=4))
        Array([1.        , 0.70710677, 0.        ], dtype=float32)
    """
    _check_static(qp)
    codes = jnp.asarray(codes)
    s = _broadcast_param(qp.scale, codes.shape, qp.axis)
    if qp.kind in _UNIFORM_KINDS:
        z = _broadcast_param(qp.zero_point, codes.shape, qp.axis)
        return ((codes.astype(jnp.float32) - z) * s).astype(jnp.float32)
    return _log_root_values(codes, s, qp.bits, log_root_of(qp))


@jax.jit
def fake_quant(x, qp: QuantParams) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient.

    The forward value is exactly ``dequantize(quantize(x, qp), qp)`` (cast to
    ``x``'s floating dtype). For the uniform kinds the gradient is the clipped
    STE (1 inside ``[(qmin - z)·s, (qmax - z)·s]``, 0 outside) and the scale and
    zero point get LSQ gradients; for the log kinds it is the identity STE.

    Args:
        x: array to fake-quantize.
        qp: quantizer parameters.

    Returns:
        An array with ``x``'s shape and floating dtype (``float32`` for integer x).

    Example:
        >>> qp = uniform(1.0, 0.0, bits=2)  # levels 0, 1, 2, 3
        >>> jax.grad(lambda x: fake_quant(x, qp).sum())(jnp.array([-0.5, 1.2, 3.0, 4.0]))
        Array([0., 1., 1., 0.], dtype=float32)
    """
    x = jnp.asarray(x)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    xc, s, z = _prepare(x, qp)
    if qp.kind in _UNIFORM_KINDS:
        qmin, qmax = code_range(qp)
        y = _fake_quant_uniform(xc, s.astype(xc.dtype), z.astype(xc.dtype), qmin, qmax)
    else:
        y = _fake_quant_log(xc, s.astype(xc.dtype), qp.bits, log_root_of(qp))
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------
# log 2^(1/k) -> log2 reparameterization (docs/method.md, "Softmax").


@functools.cache
def log_root_multipliers(root: int) -> tuple[float, ...]:
    """The ``k`` mantissa multipliers ``c_j = 2^(j/k)``, ``j = 0..k-1``, each a float32.

    Every level of a root-``k`` log quantizer is ``s·c_j·2^(-e)``
    (:func:`log_root_to_log2_terms`); these are the only non-power-of-two numbers in it.

    Example:
        >>> log_root_multipliers(2)
        (1.0, 1.4142135381698608)
    """
    root = _check_root(root)
    return tuple(float(np.float32(2.0 ** (j / root))) for j in range(root))


@functools.partial(jax.jit, static_argnums=1)
def log_root_to_log2_terms(codes, root: int) -> tuple[jax.Array, jax.Array]:
    """Splits root-``k`` log codes into a power-of-two exponent and a multiplier index.

    With ``e = ceil(q/k)`` and ``j = k·e - q`` (in ``0..k-1``),
    ``x̂ = s·2^(-q/k) = s·2^(-e)·c_j`` with ``c_j = 2^(j/k)`` in ``[1, 2)``
    (:func:`log_root_multipliers`): a log2 quantizer whose scale is one of ``k``
    scales ``s·c_j``, picked by the code's residue. ``k = 2`` is the parity split of
    :func:`log_sqrt2_to_log2_terms`. The reserved exact-zero code ``2^b - 1`` is not
    special here; callers mask it themselves.

    Args:
        codes: non-negative integer log codes.
        root: ``k``.

    Returns:
        ``(exponent, index)``: ``int32`` arrays of ``e`` and ``j``.

    Example:
        >>> log_root_to_log2_terms(jnp.array([0, 1, 2, 3, 4]), 3)
        (Array([0, 1, 1, 1, 2], dtype=int32), Array([0, 2, 1, 0, 2], dtype=int32))
    """
    root = _check_root(root)
    codes = jnp.asarray(codes).astype(jnp.int32)
    e = (codes + (root - 1)) // root
    return e, root * e - codes


@jax.jit
def log_sqrt2_to_log2_terms(codes) -> tuple[jax.Array, jax.Array]:
    """Splits log√2 codes into a power-of-two exponent and a parity mask.

    With ``e = ceil(q/2)`` and ``odd = q % 2 == 1``,
    ``x̂ = s·2^(-q/2) = s·2^(-e)·(√2 if odd else 1)``: a log2 quantizer whose
    scale is ``s`` or ``√2·s`` depending on the code's parity
    (:func:`log_root_to_log2_terms` with ``k = 2``). The reserved exact-zero code
    ``2^b - 1`` is odd; callers must mask it themselves.

    Args:
        codes: non-negative integer log√2 codes.

    Returns:
        ``(exponent, odd_mask)``: ``int32`` exponents and a boolean mask.

    Example:
        >>> log_sqrt2_to_log2_terms(jnp.array([0, 1, 2, 3]))
        (Array([0, 1, 1, 2], dtype=int32), Array([False,  True, False,  True], dtype=bool))
    """
    e, j = log_root_to_log2_terms(codes, 2)
    return e, j == 1


@jax.jit
def log_root_matmul_shift_add(attn_codes, qp_attn: QuantParams, v_codes, qp_v: QuantParams) -> jax.Array:
    """Computes ``attn @ V`` from codes with ``k`` shift-and-add accumulators.

    Implements the log2 form of docs/method.md, "Softmax": with
    ``(e, j) = log_root_to_log2_terms(q)``,
    ``attn @ V = s·s_v·Σ_{r=0}^{k-1} c_r·Σ_{j: j_ij = r} (V_int - z_v)_j·2^(-e_ij)``.
    The powers of two are exact float32 numbers here (an integer path would
    shift instead); reserved zero codes contribute nothing. The result equals
    ``fake_quant(attn) @ fake_quant(V)`` up to float rounding.

    Args:
        attn_codes: log codes of shape ``(..., i, j)``.
        qp_attn: the per-tensor log quantizer (``"log2"``, ``"log_sqrt2"`` or
            ``"log_root"``) of ``attn``.
        v_codes: uniform codes of shape ``(..., j, d)``.
        qp_v: a uniform or symmetric quantizer of ``V``, per tensor or per channel
            along the last axis ``d``.

    Returns:
        ``float32`` array ``(..., i, d)``, like
        ``jnp.einsum('...ij,...jd->...id', attn, v)``.

    Raises:
        ValueError: wrong quantizer kinds, or ``qp_v`` per channel along an axis
            other than the last one.

    Example:
        >>> qa, qv = log_root(1.0, bits=4, root=3), uniform(0.1, 8.0, bits=4)
        >>> a, v = jnp.array([[1.0, 0.0]]), jnp.array([[0.5], [0.2]])
        >>> log_root_matmul_shift_add(quantize(a, qa), qa, quantize(v, qv), qv)
        Array([[0.5]], dtype=float32)
    """
    _check_static(qp_attn)
    _check_static(qp_v)
    if qp_attn.kind not in types.LOG_KINDS or qp_attn.axis is not None:
        raise ValueError(
            f"attn quantizer must be a per-tensor log quantizer ('log2', 'log_sqrt2' or 'log_root'), "
            f"got kind={qp_attn.kind!r}, axis={qp_attn.axis}"
        )
    if qp_v.kind not in _UNIFORM_KINDS:
        raise ValueError(f"V quantizer must be 'uniform' or 'symmetric', got {qp_v.kind!r}")
    attn_codes = jnp.asarray(attn_codes).astype(jnp.int32)
    v_codes = jnp.asarray(v_codes)
    if qp_v.axis is not None and qp_v.axis not in (-1, v_codes.ndim - 1):
        raise ValueError(f"V quantizer must be per tensor or per channel along the last axis, got axis={qp_v.axis}")
    s_v = _broadcast_param(qp_v.scale, v_codes.shape, qp_v.axis)
    z_v = _broadcast_param(qp_v.zero_point, v_codes.shape, qp_v.axis)
    v_centered = v_codes.astype(jnp.float32) - z_v
    s_a = _broadcast_param(qp_attn.scale, attn_codes.shape, None)

    root = log_root_of(qp_attn)
    nonzero = attn_codes != log_zero_code(qp_attn.bits)
    e, j = log_root_to_log2_terms(attn_codes, root)
    p = jnp.where(nonzero, _pow2_neg(e), 0.0)
    mm = functools.partial(jnp.einsum, "...ij,...jd->...id", precision=jax.lax.Precision.HIGHEST)
    # one accumulator per residue r, each scaled by its c_r
    terms = [
        jnp.float32(c) * mm(jnp.where(j == r, p, 0.0), v_centered) for r, c in enumerate(log_root_multipliers(root))
    ]
    acc = sum(terms[1:], terms[0])
    s_out = s_a * (s_v if qp_v.axis is None else s_v.reshape(-1))
    return (s_out * acc).astype(jnp.float32)


@jax.jit
def log_sqrt2_matmul_shift_add(attn_codes, qp_attn: QuantParams, v_codes, qp_v: QuantParams) -> jax.Array:
    """Computes ``attn @ V`` from log√2 codes with two shift-and-add accumulators.

    :func:`log_root_matmul_shift_add` restricted to ``"log_sqrt2"`` quantizers:
    ``s·s_v·(Σ_{j: q_ij even} (V_int - z_v)_j·2^(-e_ij)
    + √2·Σ_{j: q_ij odd} (V_int - z_v)_j·2^(-e_ij))`` with ``e = ceil(q/2)``.

    Raises:
        ValueError: wrong quantizer kinds, or ``qp_v`` per channel along an axis
            other than the last one.

    Example:
        >>> qa, qv = log_sqrt2(1.0, bits=4), uniform(0.1, 8.0, bits=4)
        >>> a, v = jnp.array([[1.0, 0.0]]), jnp.array([[0.5], [0.2]])
        >>> log_sqrt2_matmul_shift_add(quantize(a, qa), qa, quantize(v, qv), qv)
        Array([[0.5]], dtype=float32)
    """
    _check_static(qp_attn)
    if qp_attn.kind != "log_sqrt2" or qp_attn.axis is not None:
        raise ValueError(
            f"attn quantizer must be a per-tensor 'log_sqrt2' quantizer, got kind={qp_attn.kind!r}, axis={qp_attn.axis}"
        )
    return log_root_matmul_shift_add(attn_codes, qp_attn, v_codes, qp_v)
