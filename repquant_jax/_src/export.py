"""Integer export (docs/method.md, "Integer deployment"): integer weight storage and matmuls.

``export(qparams, qapply, *example_inputs)`` turns the result of `repquant_jax._src.transform`
into an `Exported` pytree that stores every quantized weight as integer codes, and
``integer_apply(exported, *inputs)`` evaluates the same graph as ``qapply`` computing the
matmuls on those integers:

* **W8A8 matmuls** (a weight site with weight bits <= 8 whose input activation point is a
  per-tensor uniform/symmetric quantizer with bits <= 8 and an integer zero point; and the
  same for an activation matmul such as q·kᵀ whose two operands are such points):
  ``jax.lax.dot_general(a_int8, b_int8, dimension_numbers, preferred_element_type=int32)``
  on the *shifted* codes ``q' = q - 2^(b-1)`` (signed, so 8-bit codes fit ``int8``), then the
  zero-point corrections in ``int32``::

      Σ_k (q'_a - z'_a)(q'_b - z'_b) = Σ q'_a q'_b - z'_b Σ_k q'_a - z'_a Σ_k q'_b + K z'_a z'_b

  (``z' = z - 2^(b-1)``; per tensor for activations, per output column for weights), and one
  float rescale by ``s_a·s_b``. The accumulator is exact as long as the true sum fits
  ``int32`` (intermediate wrap-around cancels in two's complement): guaranteed for
  ``K <= 33000`` contracted elements when zero points lie in the code range
  (``|q - z| <= 255``), and in practice far beyond.
* **attn·V with a log attention operand** (log2, log√2 or base ``2^(1/k)``; docs/method.md,
  "Softmax"): with ``e = ceil(q/k)``, ``j = k·e - q`` and ``c_r = 2^(r/k)``,
  ``attn·V = s·s_v·Σ_r c_r·Σ_{j: j_ij = r} (V' - z'_v)_j·2^(-e_ij)``: ``k`` shift-and-add
  accumulators over V's integer codes (V itself is unchanged), in one of two forms
  (``export(..., log_matmul=...)``):

  - ``"pow2"`` (the default, fast): each shift is an exact float32 power of two built from
    its exponent bits and each ``V' - z'_v`` an exact integer, so every product is exact;
    the ``k`` accumulators are one float32 ``dot_general`` whose log operand has the
    residue ``r`` as one more free axis (``k`` disjoint slices, V read once), combined
    with the ``c_r`` by a weighted sum XLA fuses into its output. The sums round in
    float32, like the fake-quant matmul.
  - ``"int8_windows"``: the shifts are realised as ``int8`` matmuls against exact powers of
    two: the exponents are cut into windows of 7 (``e ∈ [7w, 7w + 6]``), where
    ``2^(7w+6-e) ∈ [1, 64]`` is an ``int8``; every (accumulator, window) pair is one slice of
    a stacked operand (accumulator 0 all codes with weight 1, accumulator ``r >= 1`` the
    codes of residue ``r`` with weight ``c_r - 1``), so the whole attn·V is a single
    ``int8 x int8 -> int32`` ``dot_general`` with one extra batch axis (plus the zero-point
    correction ``z'_v·Σ_j 2^(7w+6-e_ij)``); each slice is scaled back by the exact power of
    two ``2^-(7w+6)``. **What is exact:** every product and every window accumulator (an
    exact ``int32`` for ``L < 2^16`` contracted tokens; exactly converted to float while
    below ``2^24``) and every power-of-two scaling; the sum of the windows, the ``c_r``
    combination and the final ``s·s_v`` rescale round in float32, like the fake-quant
    matmul. Exponents above ``min(e_max, 24 + ceil(log2 L))`` are dropped: their total is
    below ``2^-24`` of the largest output the codes can produce (4-bit log codes are
    covered completely). The reserved zero code contributes nothing. 8-bit log√2 with
    ``L = 8`` takes 4 windows x 2 accumulators = 8 slices; ``L = 197``, 5 x 2. It was the
    only form before issue #16, and is 4-5x slower than float on the shipped ViT
    (benchmarks/RESULTS.md).

* **Weight-only sites** (activation not quantized, more than 8 bits, per channel, or a
  non-integer zero point; convolutions; weights of more than 8 bits): the weight is
  dequantized on the fly from its codes and the matmul runs in float, as in ``qapply``.
  Any other matmul reading integer codes dequantizes them first.

Activation quantizers run where ``qapply`` runs them; a quantized point whose codes an
integer matmul can use emits the codes themselves (``int8`` shifted codes, ``uint8`` for
the log kinds), which travel through reshapes and transposes to the matmuls. Non-matmul
consumers still read the float values, exactly as in fake quant.

Storage format of `Exported`:

* ``weights[site]``: a `WeightCodes` with the ``[K, N]`` weight matrix of the site (as
  `repquant_jax._src.fold.weight_matrix` lays it out: contracted axes first) as shifted codes:
  ``int8`` for 5..8 bits; for <= 4 bits two codes per ``int8`` byte (rows ``2i`` in the low
  nibble, ``2i + 1`` in the high nibble; ``int4="packed"``, the default) or ``jnp.int4``
  (``int4="native"``); ``int16`` above 8 bits. Per output column: ``scale`` (float32) and
  ``zero_point`` (``z - 2^(b-1)``, the smallest integer dtype that holds it).
* ``params``: the float params, same tree structure; every kernel leaf whose only uses are
  exported weight matmuls is replaced by a `Dropped` placeholder (a pytree node without
  leaves that remembers shape and dtype). Biases, norms, embeddings, unquantized kernels
  and kernels that are also read elsewhere (tied embeddings) stay float.
* ``activations``, ``input_offsets``, ``output_offsets``, ``input_scales``: as in `QParams`.

Why packed by default: on CPU, XLA keeps ``jnp.int4`` arrays at one byte per element (a
``1000 x 1000`` ``int4`` array occupies 1 MB, like ``int8``) and its CPU/GPU backends reject
``int4`` operands of ``dot_general`` (converting ``int4 -> int8`` works); nibble packing halves the bytes on every backend and unpacks with two
shifts that fuse into the matmul's operand. ``int4="native"`` is for TPUs, where XLA packs
``int4`` itself; it is converted to ``int8`` before the matmul on every backend.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import repquant_jax as repquant
  >>> from repquant_jax._src import export as rqe
  >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(16), nn.gelu, nn.Dense(4)])
  >>> x = jax.random.normal(jax.random.key(0), (8, 16))
  >>> params = model.init(jax.random.key(1), x)
  >>> apply_fn = lambda p, x: model.apply(p, x)
  >>> qparams, qapply = repquant.transform(apply_fn, params, [x], repquant.presets.repq_vit(4, 8),
  ...                                      verbose=False)
  >>> exported = rqe.export(qparams, qapply, x)
  >>> y = jax.jit(rqe.integer_apply)(exported, x)
  >>> bool(jnp.linalg.norm(y - qapply(qparams, x)) <= 1e-4 * jnp.linalg.norm(y))
  True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from repquant_jax._src import quantizers as qz
from repquant_jax._src.fold import weight_from_matrix, weight_matrix
from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Graph
from repquant_jax._src.hooks import affine_input, check_sites_exist, quant_hooks
from repquant_jax._src.interpret import Hook, Hooks, evaluate
from repquant_jax._src.qapply import QApply
from repquant_jax._src.sites import Plan
from repquant_jax._src.state import QParams
from repquant_jax._src.types import LOG_KINDS, MATMUL_PRIMITIVES, NodeId, ValueId, log_zero_code

__all__ = [
    "Dropped",
    "WeightCodes",
    "Exported",
    "BytesReport",
    "export",
    "integer_apply",
    "matmul_modes",
    "nbytes",
    "bytes_report",
]

_UNIFORM = ("uniform", "symmetric")
#: Exponents per window of the integer log2 attn·V path: 2^(0..6) fit int8.
_WINDOW = 7
#: How `integer_apply` computes attn·V from log codes (`Exported.log_matmul`).
LogMatmul = Literal["pow2", "int8_windows"]


@struct.dataclass
class Dropped:
    """Stands in for a kernel leaf whose values live in `Exported.weights` as codes.

    A pytree node without leaves, so the params tree keeps its structure and paths.

    Attributes:
      shape: the leaf's shape.
      dtype: the leaf's dtype name.
    """

    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)


@struct.dataclass
class WeightCodes:
    """Integer codes of one weight site's ``[K, N]`` matrix, with per-column quantizer.

    Attributes:
      codes: shifted codes ``q - offset``: ``int8 [K, N]`` (5..8 bits), packed ``int8
        [ceil(K/2), N]`` or ``jnp.int4 [K, N]`` (<= 4 bits), ``int16 [K, N]`` (> 8 bits).
      scale: ``float32 (N,)`` per output column.
      zero_point: ``(N,)`` shifted zero points ``z - offset``, in the smallest integer
        dtype that holds them (``float32`` if they are not integers).
      bits: weight bits.
      kind: ``"uniform"`` or ``"symmetric"``.
      rows: ``K``.
      storage: ``"int8"``, ``"packed_int4"``, ``"int4"`` or ``"int16"``.
      integer_zero_point: whether the zero points are integers (needed by int8 matmuls).
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    bits: int = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False)
    rows: int = struct.field(pytree_node=False)
    storage: str = struct.field(pytree_node=False)
    integer_zero_point: bool = struct.field(pytree_node=False, default=True)

    @property
    def offset(self) -> int:
        """What was subtracted from the codes (``2^(b-1)``, 0 for symmetric)."""
        return 0 if self.kind == "symmetric" else 2 ** (self.bits - 1)

    def int_codes(self) -> jax.Array:
        """The shifted codes as a ``[K, N]`` ``int8`` (``int16`` above 8 bits) matrix."""
        if self.storage == "packed_int4":
            return _unpack_int4(self.codes, self.rows)
        if self.storage == "int4":
            return self.codes.astype(jnp.int8)
        return self.codes

    def dequantize(self) -> jax.Array:
        """The ``[K, N]`` float32 matrix, bitwise what fake quant of the weight gives."""
        codes = self.int_codes().astype(jnp.float32)
        return ((codes - self.zero_point.astype(jnp.float32)) * self.scale).astype(jnp.float32)


@struct.dataclass
class Exported:
    """An exported model: integer weights, float params and quantizer state.

    Attributes:
      params: the float params with exported kernel leaves replaced by `Dropped`.
      weights: weight site name -> `WeightCodes`.
      activations: activation point name -> quantizer (as in `QParams`).
      input_offsets: activation point name -> offset added before quantizing.
      output_offsets: weight site name -> offset added to the matmul output.
      input_scales: activation point name -> per-channel multiplier applied before the
        offset (branch folds).
      qapply: the `QApply` of the transform (static; provides the traced graph and plan).
      integer_points: names of activation points whose zero point is an integer (static).
      float_nbytes: bytes of the float params ``export`` started from (static).
      log_matmul: how attn·V with a log attention operand runs: ``"pow2"`` (the fast
        form: the ``k`` accumulators as one float32 ``dot_general`` of exact powers of
        two and V's integer codes) or ``"int8_windows"`` (stacked ``int8`` slices with
        exact ``int32`` accumulators; see the module docstring) (static).
    """

    params: Any
    weights: dict[str, WeightCodes]
    activations: dict[str, qz.QuantParams]
    input_offsets: dict[str, jax.Array]
    output_offsets: dict[str, jax.Array]
    input_scales: dict[str, jax.Array]
    qapply: QApply = struct.field(pytree_node=False)
    integer_points: tuple[str, ...] = struct.field(pytree_node=False, default=())
    float_nbytes: int = struct.field(pytree_node=False, default=0)
    log_matmul: LogMatmul = struct.field(pytree_node=False, default="pow2")


class BytesReport(NamedTuple):
    """Bytes of an `Exported`, by part, and the ratio to the float params.

    Attributes:
      total: bytes of every array in the `Exported`.
      float_params: bytes of the params ``export`` started from.
      ratio: ``total / float_params``.
      weight_codes: bytes of the integer codes.
      weight_quantizers: bytes of per-column scales and zero points.
      kept_params: bytes of the float params that stay (biases, norms, embeddings, ...).
      activation_state: bytes of activation quantizers and offsets.
    """

    total: int
    float_params: int
    ratio: float
    weight_codes: int
    weight_quantizers: int
    kept_params: int
    activation_state: int


# --------------------------------------------------------------------------------------
# Bytes


def nbytes(tree: Any) -> int:
    """Bytes of all arrays in a pytree (an `Exported`, a params tree, ...).

    ``jnp.int4`` arrays count half a byte per element (their packed size, as TPUs store
    them; XLA on CPU keeps one byte per element in memory).

    Example:
      >>> nbytes({"a": jnp.zeros((4, 4)), "b": jnp.zeros(3, jnp.int8)})
      67
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        dtype = jnp.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        size = int(np.size(leaf))
        if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
            total += (size + 1) // 2
        else:
            total += size * dtype.itemsize
    return total


def bytes_report(exported: Exported) -> BytesReport:
    """Bytes of ``exported`` by part, and the ratio to the float params it came from.

    Example:
      >>> # r = bytes_report(export(qparams, qapply, x)); print(f"{r.ratio:.3f}x")
    """
    codes = sum(nbytes(w.codes) for w in exported.weights.values())
    wq = sum(nbytes((w.scale, w.zero_point)) for w in exported.weights.values())
    kept = nbytes(exported.params)
    act = nbytes((exported.activations, exported.input_offsets, exported.output_offsets, exported.input_scales))
    total = nbytes(exported)
    floats = exported.float_nbytes
    return BytesReport(total, floats, total / max(floats, 1), codes, wq, kept, act)


# --------------------------------------------------------------------------------------
# int4 packing


def _pack_int4(codes: np.ndarray) -> np.ndarray:
    """``[K, N]`` codes in ``[-8, 7]`` -> ``int8 [ceil(K/2), N]``: row ``2i`` in the low
    nibble, row ``2i + 1`` in the high nibble (a zero row pads an odd K)."""
    codes = np.asarray(codes, np.int32)
    if codes.shape[0] % 2:
        codes = np.concatenate([codes, np.zeros((1, codes.shape[1]), np.int32)])
    lo, hi = codes[0::2] & 0xF, codes[1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8).view(np.int8)


def _unpack_int4(packed: jax.Array, rows: int) -> jax.Array:
    """Inverse of `_pack_int4`: ``int8 [K, N]``, sign-extended by arithmetic shifts."""
    four = jnp.int8(4)
    lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(packed, four), four)
    hi = jax.lax.shift_right_arithmetic(packed, four)
    both = jnp.stack([lo, hi], axis=1).reshape(-1, packed.shape[1])
    return both[:rows]


def _small_int(values: np.ndarray) -> np.ndarray:
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if values.min(initial=0) >= info.min and values.max(initial=0) <= info.max:
            return values.astype(dtype)
    raise ValueError(f"zero points out of int32 range: {values.min()}..{values.max()}")


# --------------------------------------------------------------------------------------
# export


def _is_integer(x: Any) -> bool:
    a = np.asarray(x, np.float64)
    return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)))


def _weight_codes(matrix: jax.Array, qp: qz.QuantParams, int4: str) -> WeightCodes:
    if qp.kind not in _UNIFORM:
        raise ValueError(f"export supports uniform and symmetric weight quantizers, got kind {qp.kind!r}")
    n = matrix.shape[1]
    bits = qp.bits
    offset = 0 if qp.kind == "symmetric" else 2 ** (bits - 1)
    codes = np.asarray(qz.quantize(matrix, qp), np.int32) - offset
    scale = np.broadcast_to(np.asarray(qp.scale, np.float32), (n,)).copy()
    zero = np.broadcast_to(np.asarray(qp.zero_point, np.float64), (n,)) - offset
    integer = _is_integer(zero)
    zero = _small_int(np.round(zero).astype(np.int64)) if integer else zero.astype(np.float32)
    if bits <= 4:
        storage = "packed_int4" if int4 == "packed" else "int4"
        stored = _pack_int4(codes) if int4 == "packed" else jnp.asarray(codes.astype(np.int8)).astype(jnp.int4)
    elif bits <= 8:
        storage, stored = "int8", codes.astype(np.int8)
    else:
        storage, stored = "int16", codes.astype(np.int16)
    return WeightCodes(
        codes=jnp.asarray(stored),
        scale=jnp.asarray(scale),
        zero_point=jnp.asarray(zero),
        bits=bits,
        kind=qp.kind,
        rows=int(matrix.shape[0]),
        storage=storage,
        integer_zero_point=integer,
    )


def _only_read_by(graph: Graph, consumers, vid: ValueId, sites: Mapping[NodeId, Any]) -> bool:
    """Whether value ``vid`` reaches nothing but the weight operands of ``sites`` (node
    index -> weight site), through layout-only ops."""
    outputs = set(graph.output_ids)
    stack, used = [vid], False
    while stack:
        v = stack.pop()
        if v in outputs:
            return False
        for i in consumers.get(v, ()):
            node = graph.nodes[i]
            site = sites.get(i)
            if site is not None and site.weight_id == v and node.inputs[1 - site.weight_operand] != v:
                used = True
                continue
            if node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1:
                stack.append(node.outputs[0])
                continue
            return False
    return used


def export(
    qparams: QParams,
    qapply: QApply,
    *example_inputs: Any,
    int4: Literal["packed", "native"] = "packed",
    log_matmul: LogMatmul = "pow2",
) -> Exported:
    """Exports a transformed model with integer weight storage.

    Args:
      qparams: from `repquant_jax._src.transform`.
      qapply: the `QApply` returned with them.
      *example_inputs: positional inputs of one call (only shapes and dtypes are used,
        to trace the graph and find each weight's layout).
      int4: storage of weights of <= 4 bits: ``"packed"`` (two codes per ``int8`` byte,
        half a byte per weight on every backend) or ``"native"`` (``jnp.int4``; XLA packs
        it on TPU, not on CPU).
      log_matmul: how `integer_apply` runs attn·V with a log attention operand:
        ``"pow2"`` (fast) or ``"int8_windows"`` (exact int32 accumulators); both equal
        the fake-quant matmul up to float rounding. ``exported.replace(log_matmul=...)``
        switches an existing export.

    Returns:
      The `Exported` pytree for `integer_apply` (see the module docstring for its format).

    Raises:
      TypeError: if ``qparams`` or ``qapply`` are not what `transform` returns.
      ValueError: a weight quantizer of a log kind, or an unknown ``int4``.

    Example:
      >>> # exported = export(qparams, qapply, images)
      >>> # logits = jax.jit(integer_apply)(exported, images)
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"export expects the QParams returned by transform, got {type(qparams).__name__}")
    if not isinstance(qapply, QApply):
        raise TypeError(f"export expects the QApply returned by transform, got {type(qapply).__name__}")
    if int4 not in ("packed", "native"):
        raise ValueError(f"int4 must be 'packed' or 'native', got {int4!r}")
    if log_matmul not in _LOG_MATMULS:
        raise ValueError(f"log_matmul must be one of {tuple(_LOG_MATMULS)}, got {log_matmul!r}")
    graph, plan = qapply.analysis(qparams.params, example_inputs)
    leaves, treedef = jax.tree_util.tree_flatten(qparams.params)

    weights: dict[str, WeightCodes] = {}
    for w in plan.weights:
        qp = qparams.weights.get(w.name)
        if qp is None:
            continue
        if w.derived:
            raise ValueError(
                f"weight site {w.name!r} reads a weight computed from {w.param_path} (not the leaf "
                "itself), which has no integer storage; skip it with Rule(pattern=..., "
                "target='weight', skip=True) to export, or use qapply"
            )
        view = jnp.asarray(leaves[w.param_index]).reshape(-1)[w.kernel_index]
        view = view.astype(graph.avals[w.weight_id].dtype)
        weights[w.name] = _weight_codes(weight_matrix(view, w.contracting), qp, int4)

    sites = {w.node: w for w in plan.weights if w.name in weights}
    consumers = graph.consumers()
    new_leaves = []
    for k, leaf in enumerate(leaves):
        if _only_read_by(graph, consumers, graph.param_ids[k], sites):
            new_leaves.append(Dropped(tuple(np.shape(leaf)), jnp.dtype(leaf.dtype).name))
        else:
            new_leaves.append(leaf)
    integer_points = tuple(name for name, qp in qparams.activations.items() if _is_integer(qp.zero_point))
    return Exported(
        params=jax.tree_util.tree_unflatten(treedef, new_leaves),
        weights=weights,
        activations=dict(qparams.activations),
        input_offsets=dict(qparams.input_offsets),
        input_scales=dict(qparams.input_scales),
        output_offsets=dict(qparams.output_offsets),
        qapply=qapply,
        integer_points=integer_points,
        float_nbytes=nbytes(qparams.params),
        log_matmul=log_matmul,
    )


# --------------------------------------------------------------------------------------
# Integer evaluation


class _Operand(NamedTuple):
    """How a matmul operand arrives: float, or integer codes of a point's quantizer."""

    codes: bool
    qp: qz.QuantParams | None = None


def _code_offset(qp: qz.QuantParams) -> int:
    """Subtracted from a point's codes: ``2^(b-1)`` for uniform (signed int8 codes), 0 for
    symmetric (already signed) and the log kinds (``uint8`` codes)."""
    return 2 ** (qp.bits - 1) if qp.kind == "uniform" else 0


def _emits_codes(qp: qz.QuantParams, integer: bool) -> bool:
    """Whether a point hands integer codes to its matmuls (per tensor, <= 8 bits)."""
    if qp.axis is not None or qp.bits > 8:
        return False
    return qp.kind in LOG_KINDS or (qp.kind in _UNIFORM and integer)


def _to_codes(x: jax.Array, qp: qz.QuantParams) -> jax.Array:
    codes = qz.quantize(x, qp) - _code_offset(qp)
    return codes.astype(jnp.uint8 if qp.kind in LOG_KINDS else jnp.int8)


def _from_codes(codes: jax.Array, qp: qz.QuantParams, dtype: Any) -> jax.Array:
    """Exactly the fake-quant value of the codes."""
    return qz.dequantize(codes.astype(jnp.int32) + _code_offset(qp), qp).astype(dtype)


def _shifted_zero(qp: qz.QuantParams) -> jax.Array:
    return (jnp.round(qp.zero_point) - _code_offset(qp)).astype(jnp.int32)


def _to_output(arr: jax.Array, side: int, dn: Any, ndims: tuple[int, int]) -> jax.Array:
    """Places an array over one operand's non-contracted axes (ascending) into the layout
    of ``dot_general``'s output (batch, lhs free, rhs free), with size-1 axes elsewhere."""
    (lc, rc), (lb, rb) = dn
    contract, batch = (lc, lb) if side == 0 else (rc, rb)
    keep = [d for d in range(ndims[side]) if d not in contract]
    free = [d for d in keep if d not in batch]
    arr = jnp.transpose(arr, [keep.index(d) for d in batch] + [keep.index(d) for d in free])
    other = 1 - side
    n_other_free = ndims[other] - len(dn[0][other]) - len(dn[1][other])
    nb = len(batch)
    if side == 0:
        shape = arr.shape + (1,) * n_other_free
    else:
        shape = arr.shape[:nb] + (1,) * n_other_free + arr.shape[nb:]
    return arr.reshape(shape)


def _contract_sum(x: jax.Array, side: int, dn: Any, ndims: tuple[int, int]) -> jax.Array:
    """``Σ`` of an integer operand over its contracted axes, in the output layout (int32)."""
    contract = dn[0][side]
    return _to_output(jnp.sum(x.astype(jnp.int32), axis=tuple(contract)), side, dn, ndims)


def _int_dot(a: jax.Array, b: jax.Array, dn: Any) -> jax.Array:
    return jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.int32)


def _int8_matmul(ops, zeros, scales, dn) -> jax.Array:
    """``Σ_k (a - z_a)(b - z_b)`` on int8 codes with int32 zero-point corrections, then
    ``· s_a·s_b``. ``zeros``/``scales`` are already in the output layout (or scalars)."""
    ndims = (ops[0].ndim, ops[1].ndim)
    k = int(np.prod([ops[0].shape[d] for d in dn[0][0]]))
    acc = _int_dot(ops[0], ops[1], dn)
    acc = acc - zeros[1] * _contract_sum(ops[0], 0, dn, ndims) - zeros[0] * _contract_sum(ops[1], 1, dn, ndims)
    acc = acc + jnp.int32(k) * zeros[0] * zeros[1]
    return acc.astype(jnp.float32) * (scales[0] * scales[1])


def _log_terms(log_codes: jax.Array, qp: qz.QuantParams):
    """``(e, j, nonzero, k)`` of log codes: ``x̂ = s·c_j·2^(-e)`` (`qz.log_root_to_log2_terms`)."""
    a = log_codes.astype(jnp.int32)
    k = qz.log_root_of(qp)
    e, j = qz.log_root_to_log2_terms(a, k)
    return e, j, a != log_zero_code(qp.bits), k


def _float_dot(ops: tuple[jax.Array, jax.Array], dn: Any) -> jax.Array:
    return jax.lax.dot_general(ops[0], ops[1], dn, precision=jax.lax.Precision.HIGHEST)


def _log_matmul_pow2(log_codes, log_qp, v_codes, v_qp, log_side: int, dn) -> jax.Array:
    """attn·V as ``k`` shift-and-add accumulators of V's codes, in float32 (the fast form).

    ``attn·V = s·s_v·Σ_r c_r·Σ_{j: j_ij = r} 2^(-e_ij)·(V' - z'_v)_j``. The shifts are
    exact float32 powers of two, built from their exponent bits (``ldexp``), and
    ``V' - z'_v`` are exact small integers, so every product is exact; the ``k``
    accumulators are one ``dot_general`` whose log operand has one more free axis (the
    residue ``r``: the slices are disjoint, so V is read once, not copied ``k`` times),
    and their combination with the ``c_r`` is one weighted sum that XLA fuses into the
    matmul's output. Accumulation rounds in float32, as the fake-quant matmul does.
    """
    e, j, nonzero, k = _log_terms(log_codes, log_qp)
    p = jnp.where(nonzero, qz._pow2_neg(e), 0.0)
    v = v_codes.astype(jnp.float32) - _shifted_zero(v_qp).astype(jnp.float32)
    if k == 1:
        ops = (p, v) if log_side == 0 else (v, p)
        return _float_dot(ops, dn) * (log_qp.scale * v_qp.scale)
    # P_r = P where j == r: a new last (free) axis of the log operand.
    stacked = jnp.where(j[..., None] == jnp.arange(k, dtype=jnp.int32), p[..., None], 0.0)
    ops = (stacked, v) if log_side == 0 else (v, stacked)
    acc = _float_dot(ops, dn)
    # The residue axis sits last among the log operand's free axes of the output.
    n_batch = len(dn[1][0])
    n_free = [ops[s_].ndim - len(dn[0][s_]) - n_batch for s_ in (0, 1)]
    axis = n_batch + n_free[0] - 1 if log_side == 0 else n_batch + n_free[0] + n_free[1] - 1
    # an elementwise weighted sum (not a dot), so that it fuses into the matmul's output
    terms = [
        jnp.float32(c) * jax.lax.index_in_dim(acc, r, axis, keepdims=False)
        for r, c in enumerate(qz.log_root_multipliers(k))
    ]
    return sum(terms[1:], terms[0]) * (log_qp.scale * v_qp.scale)


def _log_matmul_int8_windows(log_codes, log_qp, v_codes, v_qp, log_side: int, dn) -> jax.Array:
    """attn·V from log codes and int8 V codes as stacked ``int8`` slices (the exact form).

    Every (accumulator, exponent window) pair is one slice of a stacked ``int8`` operand
    ``P[g] = 2^(top_w - e)`` (inside window ``w``, else 0), so all of them run as a single
    ``int8 x int8 -> int32`` ``dot_general`` with one extra batch axis; the exact ``int32``
    results are scaled by ``2^-top_w`` and combined with weights 1 (all codes) and
    ``c_r - 1`` (codes of residue ``r = 1..k-1``; for log√2 the odd codes and ``√2 - 1``).
    """
    e, j, nonzero, k = _log_terms(log_codes, log_qp)
    masks, weights = [nonzero], [1.0]
    for r, c in enumerate(qz.log_root_multipliers(k)[1:], start=1):
        masks.append(nonzero & (j == r))
        weights.append(c - 1.0)
    e_max = -(-(2**log_qp.bits - 2) // k)  # ceil((2^b - 2) / k): the largest exponent
    length = int(np.prod([log_codes.shape[d] for d in dn[0][log_side]]))
    e_cover = min(e_max, 24 + math.ceil(math.log2(max(length, 1))))
    n_windows = (e_cover + _WINDOW) // _WINDOW
    slices, coefs = [], []
    for mask, weight in zip(masks, weights):
        for w in range(n_windows):
            top = _WINDOW * w + _WINDOW - 1
            inside = mask & (e >= _WINDOW * w) & (e <= top)
            shift = jnp.clip(top - e, 0, _WINDOW - 1)
            slices.append(jnp.where(inside, jax.lax.shift_left(jnp.int32(1), shift), 0).astype(jnp.int8))
            coefs.append(weight * 2.0**-top)
    p8 = jnp.stack(slices)
    v8 = jnp.broadcast_to(v_codes.astype(jnp.int8), (len(slices),) + v_codes.shape)
    (lc, rc), (lb, rb) = dn
    up = lambda dims: tuple(d + 1 for d in dims)  # noqa: E731
    dn_g = ((up(lc), up(rc)), ((0,) + up(lb), (0,) + up(rb)))
    ops = (p8, v8) if log_side == 0 else (v8, p8)
    ndims = (ops[0].ndim, ops[1].ndim)
    acc = _int_dot(ops[0], ops[1], dn_g) - _shifted_zero(v_qp) * _contract_sum(p8, log_side, dn_g, ndims)
    coef = jnp.asarray(coefs, jnp.float32).reshape((-1,) + (1,) * (acc.ndim - 1))
    total = jnp.sum(acc.astype(jnp.float32) * coef, axis=0)
    return total * (log_qp.scale * v_qp.scale)


_LOG_MATMULS = {"pow2": _log_matmul_pow2, "int8_windows": _log_matmul_int8_windows}


def _source(graph: Graph, producers: Mapping[ValueId, NodeId], vid: ValueId) -> ValueId:
    """Walks back through single-input layout ops (as `repquant_jax._src.sites` does)."""
    while vid in producers:
        node = graph.nodes[producers[vid]]
        if node.primitive not in LAYOUT_PRIMITIVES or len(node.inputs) != 1:
            break
        vid = node.inputs[0]
    return vid


def matmul_modes(exported: Exported, *inputs: Any) -> dict[str, str]:
    """How `integer_apply` computes each matmul site: ``"int8"``, ``"log2_shift_add"``,
    ``"weight_only"`` (dequantized on the fly) or ``"float"``.

    Example:
      >>> # matmul_modes(exported, x) -> {"attn/query": "int8", ...}
    """
    params = _materialize(exported.params)
    graph, plan = exported.qapply.analysis(params, inputs)
    _, modes = _integer_program(graph, plan, exported)
    return modes


def _integer_program(graph: Graph, plan: Plan, exported: Exported) -> tuple[Hooks, dict[str, str]]:
    """The fake-quant hooks of ``qapply`` with integer codes at the points that emit
    them and integer matmul functions, and the mode of each site."""
    check_sites_exist(plan, exported.weights, exported.activations, "the export")
    float_weights = QParams(
        params=None,
        weights={},
        activations=exported.activations,
        input_offsets=exported.input_offsets,
        output_offsets=exported.output_offsets,
        input_scales=exported.input_scales,
    )
    base = quant_hooks(graph, plan, float_weights)
    integer_points = set(exported.integer_points)
    values = dict(base.values)
    code_points: dict[ValueId, qz.QuantParams] = {}
    for p in plan.points:
        qp = exported.activations.get(p.name)
        if qp is not None and _emits_codes(qp, p.name in integer_points):
            code_points[p.value_id] = qp
            scale, off = exported.input_scales.get(p.name), exported.input_offsets.get(p.name)
            values[p.value_id] = _codes_hook(qp, scale, off)

    producers = graph.producers()
    site_of = {w.node: w for w in plan.weights}
    name_of = {m.node: m.name for m in plan.matmuls}
    fns: dict[NodeId, Callable] = {}
    modes: dict[str, str] = {}
    for i, node in enumerate(graph.nodes):
        index = NodeId(i)
        if node.primitive not in MATMUL_PRIMITIVES:
            continue
        operands = []
        for vid in node.inputs[:2]:
            qp = code_points.get(_source(graph, producers, vid))
            operands.append(_Operand(qp is not None, qp))
        dtypes = [graph.avals[v].dtype for v in node.inputs]
        out_dtype = graph.avals[node.outputs[0]].dtype
        site = site_of.get(index)
        codes = exported.weights.get(site.name) if site is not None else None
        fn, mode = _matmul_fn(node, operands, dtypes, out_dtype, site, codes, exported.log_matmul)
        if fn is not None:
            fns[index] = fn
        if site is not None:
            modes[site.name] = mode
        elif index in name_of:
            modes[name_of[index]] = mode
    return Hooks(values=values, rewrites=base.rewrites, matmul_fns=fns), modes


def _codes_hook(qp: qz.QuantParams, scale: Any, offset: Any) -> Hook:
    """A value hook emitting the integer codes of ``qp`` (after the fold's input affine)."""
    return lambda values: [_to_codes(affine_input(v, scale, offset), qp) for v in values]


def _is_int8_point(op: _Operand) -> bool:
    return op.codes and op.qp is not None and op.qp.kind in _UNIFORM


def _matmul_fn(node, operands, dtypes, out_dtype, site, codes: WeightCodes | None, log_matmul: str):
    """The function computing one matmul node in `integer_apply`, and its mode."""
    is_dot = node.primitive == "dot_general"
    dn = node.params.get("dimension_numbers")

    def dequantized(ops):
        ops = list(ops)
        for i, op in enumerate(operands):
            if op.codes:
                ops[i] = _from_codes(ops[i], op.qp, dtypes[i])
        return ops

    if site is not None and codes is not None:
        w_op, x_op = site.weight_operand, 1 - site.weight_operand
        shape, contracting = site.weight_shape, site.contracting
        x = operands[x_op]
        if is_dot and codes.bits <= 8 and codes.integer_zero_point and _is_int8_point(x):
            free = [shape[d] for d in range(len(shape)) if d not in contracting]

            def int8_site(ops):
                ndims = [0, 0]
                ndims[w_op], ndims[x_op] = len(shape), ops[x_op].ndim
                w8 = weight_from_matrix(codes.int_codes().astype(jnp.int8), shape, contracting)
                zw = _to_output(codes.zero_point.astype(jnp.int32).reshape(free), w_op, dn, tuple(ndims))
                sw = _to_output(codes.scale.reshape(free), w_op, dn, tuple(ndims))
                args, zeros, scales = [None, None], [None, None], [None, None]
                args[w_op], zeros[w_op], scales[w_op] = w8, zw, sw
                args[x_op], zeros[x_op], scales[x_op] = ops[x_op].astype(jnp.int8), _shifted_zero(x.qp), x.qp.scale
                return _int8_matmul(args, zeros, scales, dn).astype(out_dtype)

            return int8_site, "int8"

        def weight_only(ops):
            ops = dequantized(list(ops))
            ops[w_op] = weight_from_matrix(codes.dequantize(), shape, contracting).astype(dtypes[w_op])
            return node.fn(*ops)[0]

        return weight_only, "weight_only"

    a, b = operands
    if is_dot and _is_int8_point(a) and _is_int8_point(b):

        def int8_act(ops):
            args = [ops[0].astype(jnp.int8), ops[1].astype(jnp.int8)]
            zeros = [_shifted_zero(a.qp), _shifted_zero(b.qp)]
            return _int8_matmul(args, zeros, [a.qp.scale, b.qp.scale], dn).astype(out_dtype)

        return int8_act, "int8"
    for log_side in (0, 1):
        lg, v = operands[log_side], operands[1 - log_side]
        if is_dot and lg.codes and lg.qp.kind in LOG_KINDS and _is_int8_point(v):

            def log_act(ops, log_side=log_side, lg=lg, v=v):
                out = _LOG_MATMULS[log_matmul](ops[log_side], lg.qp, ops[1 - log_side], v.qp, log_side, dn)
                return out.astype(out_dtype)

            return log_act, "log2_shift_add"
    if a.codes or b.codes:
        return (lambda ops: node.fn(*dequantized(list(ops)))[0]), "float"
    return None, "float"


def _materialize(params: Any) -> Any:
    """`Dropped` placeholders -> zeros of their shape (unread: XLA removes them)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, Dropped) else x,
        params,
        is_leaf=lambda x: isinstance(x, Dropped),
    )


def _integer_apply(exported: Exported, *inputs: Any) -> Any:
    params = _materialize(exported.params)
    graph, plan = exported.qapply.analysis(params, inputs)
    hooks, _ = _integer_program(graph, plan, exported)
    return evaluate(graph, params, inputs, hooks)


_integer_apply_jit = jax.jit(_integer_apply)


def integer_apply(exported: Exported, *inputs: Any) -> Any:
    """Runs the exported model with integer matmuls (jit-compiled; also jit-able).

    Evaluates the graph ``qapply`` evaluates, with the same activation quantizers, but
    computes W8A8 matmuls as ``int8 x int8 -> int32`` ``dot_general`` s, the log√2 attn·V
    matmul with integer shift-and-add accumulators, and weight-only matmuls from weights
    dequantized on the fly (see the module docstring and `matmul_modes`). A new input
    shape re-traces and re-matches sites by name, as ``qapply`` does.

    Args:
      exported: from `export`.
      *inputs: the model's positional inputs.

    Returns:
      The model's output, matching ``qapply(qparams, *inputs)`` up to float rounding.

    Example:
      >>> # logits = integer_apply(exported, images)
    """
    if not isinstance(exported, Exported):
        raise TypeError(f"integer_apply expects an Exported from export, got {type(exported).__name__}")
    return _integer_apply_jit(exported, *inputs)
