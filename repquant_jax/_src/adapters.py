"""Adapters from framework models to ``apply_fn(params, *inputs)``, and a check that
``apply_fn`` really reads the weights it is given.

`repquant_jax.transform` quantizes the parameter pytree it is handed: a weight is
quantized where a matmul reads it *from the params argument*. An array that
``apply_fn`` closes over instead (``lambda p, x: model(x)`` on an NNX module, a Linen
``model.apply(variables, x)`` that ignores ``p``) is a constant of the traced function,
and stays in float without any error. Two helpers prevent that:

* `from_nnx(model)` turns a Flax NNX module into ``(apply_fn, params)`` whose params
  hold every ``nnx.Param`` of the module.
* `check_reads_params(graph)`, called on the `Graph` that `trace` returns, raises a
  `ValueError` when the traced function ignores its params or closes over a matrix that
  a matmul reads as its weight.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from repquant_jax._src.graph import trace
  >>> model = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
  >>> apply_fn, params = from_nnx(model)
  >>> x = jnp.ones((4, 32))
  >>> check_reads_params(trace(apply_fn, params, x))  # fine
  >>> check_reads_params(trace(lambda p, x: model(x), nnx.state(model), x))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: apply_fn ignores its params argument: ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Graph
from repquant_jax._src.types import MATMUL_PRIMITIVES, NodeId, ValueId

__all__ = ["from_nnx", "as_apply_fn", "ClosedOverWeight", "closed_over_weights", "reads_params", "check_reads_params"]


#: Float constants with at least this many elements (and ``ndim >= 2``) count as weights.
DEFAULT_MIN_ELEMENTS = 256

_NNX_FIX = (
    "For a Flax NNX module use `apply_fn, params = repquant_jax.from_nnx(model)`, or "
    "`graphdef, params = nnx.split(model)` with `apply_fn = lambda p, *xs: nnx.merge(graphdef, p)(*xs)`; "
    "for Linen, `lambda p, *xs: model.apply(p, *xs)` with the variables as params; "
    "in plain JAX, read every weight from apply_fn's params argument."
)


# --------------------------------------------------------------------------------------
# Flax NNX


def from_nnx(model: nnx.Module) -> tuple[Callable[..., Any], nnx.State]:
    """Splits a Flax NNX module into a pure ``apply_fn`` and its params.

    ``params`` is the ``nnx.State`` of every ``nnx.Param`` of the module (kernels,
    biases, norm scales; ``nnx.LoRAParam`` too), which is what `repquant_jax.transform`
    quantizes: every ``nnx.Linear``/``nnx.LinearGeneral``/``nnx.Conv`` kernel becomes a
    weight site named by its module path (``"attn/query"``). The rest of the state (RNG
    keys and counts, ``nnx.BatchStat``, caches, custom ``nnx.Variable`` types) is not a
    parameter to quantize: ``apply_fn`` closes over a snapshot of it. A weight held in a
    non-``Param`` variable therefore stays in float, which `check_reads_params` reports;
    make such a weight an ``nnx.Param``.

    ``apply_fn(params, *inputs, **kwargs)`` merges a fresh copy of the module from
    ``params`` and the snapshot and calls it. It is pure: state the call writes (an RNG
    count, batch statistics) is discarded, so call ``model.eval()`` before `from_nnx`
    for a model with dropout or batch norm. The user's module is never modified: its
    variables are copied here and not shared with ``apply_fn`` or ``params``.

    Args:
      model: an ``nnx.Module`` instance with a ``__call__``.

    Returns:
      ``(apply_fn, params)``. After `repquant_jax.transform`, ``qparams.params`` has the
      structure of ``params``; ``nnx.update(copy, qparams.params)`` loads its (folded)
      float weights into a copy made with ``copy = nnx.clone(model)``.

    Raises:
      TypeError: if ``model`` is not an ``nnx.Module`` instance, or is not callable.
      ValueError: if the module has no ``nnx.Param`` (nothing to quantize).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> apply_fn, params = from_nnx(model)
      >>> bool((apply_fn(params, jnp.ones((1, 4))) == model(jnp.ones((1, 4)))).all())
      True
    """
    _require_nnx_module(model)
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    (rest,) = others
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(
            f"{type(model).__name__} has no nnx.Param variables, so there is nothing to quantize "
            "(weights held in other nnx.Variable types are not treated as parameters)"
        )
    # nnx.split hands out the module's own Variable objects: copy them, so that neither
    # params nor the closed-over rest aliases the user's module.
    params, rest = _copy_state(params), _copy_state(rest)

    def apply_fn(params: nnx.State, *inputs: Any, **kwargs: Any) -> Any:
        return nnx.merge(graphdef, params, rest, copy=True)(*inputs, **kwargs)

    return apply_fn, params


def as_apply_fn(apply_fn: Callable[..., Any] | nnx.Module, params: Any) -> tuple[Callable[..., Any], Any]:
    """The ``(apply_fn, params)`` pair `repquant_jax.transform` works on.

    An ``nnx.Module`` given as ``apply_fn`` (with ``params=None``) goes through
    `from_nnx`; a function is returned as it is.

    Args:
      apply_fn: ``apply_fn(params, *inputs)``, or an ``nnx.Module`` instance.
      params: the parameter pytree; None with a module.

    Returns:
      ``(apply_fn, params)``.

    Raises:
      TypeError: ``apply_fn`` is a Flax Linen module, a class, or not callable.
      ValueError: a module with params that are not None, or a function with
        ``params=None``.
    """
    if isinstance(apply_fn, nnx.Module):
        if params is not None:
            raise ValueError(
                f"apply_fn is an nnx.Module ({type(apply_fn).__name__}) and params is not None: pass "
                "params=None to quantize the module's nnx.Param state, or pass the pair from "
                "repquant_jax.from_nnx(model)"
            )
        return from_nnx(apply_fn)
    if isinstance(apply_fn, type):
        raise TypeError(f"apply_fn is the class {apply_fn.__name__}, not a function or a module instance")
    if isinstance(apply_fn, linen.Module):
        raise TypeError(
            f"apply_fn is a Flax Linen module ({type(apply_fn).__name__}): pass "
            "`lambda p, *xs: model.apply(p, *xs)` and its variables as params"
        )
    if not callable(apply_fn):
        raise TypeError(
            f"apply_fn must be a function apply_fn(params, *inputs) or an nnx.Module, got {type(apply_fn).__name__}"
        )
    if params is None:
        raise ValueError(
            "params is None: pass the parameter pytree apply_fn reads its weights from "
            "(only an nnx.Module given as apply_fn brings its own params)"
        )
    return apply_fn, params


def _require_nnx_module(model: Any) -> None:
    if isinstance(model, type):
        raise TypeError(
            f"from_nnx expects an nnx.Module instance, got the class {model.__name__}; instantiate it first"
        )
    if not isinstance(model, nnx.Module):
        hint = ""
        if isinstance(model, linen.Module):
            hint = "; for a Flax Linen module use `lambda p, *xs: model.apply(p, *xs)` with its variables as params"
        raise TypeError(
            f"from_nnx expects a flax.nnx.Module, got {type(model).__module__}.{type(model).__qualname__}{hint}"
        )
    if not callable(model):
        raise TypeError(f"{type(model).__name__} has no __call__: from_nnx wraps the module's __call__")


def _copy_state(state: nnx.State) -> nnx.State:
    """The same state with new ``Variable`` objects (the arrays are shared, immutable)."""
    return jax.tree_util.tree_map(lambda leaf: leaf, state)


# --------------------------------------------------------------------------------------
# The closed-over weights check


@dataclasses.dataclass(frozen=True)
class ClosedOverWeight:
    """A float constant of the traced function that a matmul reads as an operand.

    Attributes:
      value_id: the constant's value id in the graph.
      shape: its shape.
      dtype: its dtype name.
      node: index of the matmul node reading it (directly or through layout-only ops).
      primitive: that node's primitive, ``"dot_general"`` or ``"conv_general_dilated"``.
      matmul: that node's module path, or ``"<top level>"``.
    """

    value_id: ValueId
    shape: tuple[int, ...]
    dtype: str
    node: NodeId
    primitive: str
    matmul: str

    def describe(self) -> str:
        """``"[64,32] float32 read by dot_general at 'block/fc1'"``."""
        shape = "[" + ",".join(str(d) for d in self.shape) + "]"
        return f"{shape} {self.dtype} read by {self.primitive} at '{self.matmul}'"


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


def _is_weight_like(aval: Any, min_elements: int) -> bool:
    return _is_float(aval) and len(aval.shape) >= 2 and int(aval.size) >= min_elements


def closed_over_weights(graph: Graph, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> tuple[ClosedOverWeight, ...]:
    """Constants that would be quantizable weights if they were params.

    A constant is reported when it is a real float array with ``ndim >= 2`` and at
    least ``min_elements`` elements, and a ``dot_general``/``conv_general_dilated``
    reads it directly or through layout-only ops (reshape, transpose, dtype cast, ...).
    Masks, position tables and small mixing matrices are not reported: they are bool
    or int, feed no matmul, are combined with other values first (``W * mask``), or are
    small.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      min_elements: smallest constant size reported.

    Returns:
      One entry per (constant, first matmul reading it), in graph order.
    """
    source: dict[ValueId, ValueId] = {
        vid: vid for vid, aval in graph.avals.items() if vid in graph.consts and _is_weight_like(aval, min_elements)
    }
    found: dict[ValueId, ClosedOverWeight] = {}
    for i, node in enumerate(graph.nodes):
        if node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1 and node.inputs[0] in source:
            for out in node.outputs:
                source[out] = source[node.inputs[0]]
        elif node.primitive in MATMUL_PRIMITIVES:
            for operand in node.inputs[:2]:
                const = source.get(operand)
                if const is not None and const not in found:
                    aval = graph.avals[const]
                    found[const] = ClosedOverWeight(
                        const, tuple(aval.shape), str(aval.dtype), NodeId(i), node.primitive, node.name or "<top level>"
                    )
    return tuple(found.values())


def reads_params(graph: Graph) -> bool:
    """Whether any float leaf of the params reaches an operation or an output."""
    read = {v for node in graph.nodes for v in node.inputs} | set(graph.output_ids)
    return any(vid in read for vid in graph.param_ids if _is_float(graph.avals[vid]))


def check_reads_params(graph: Graph, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
    """Raises if the traced ``apply_fn`` would leave closed-over weights in float.

    Call it on the graph that ``trace(apply_fn, params, *inputs)`` returns, before
    analysing it. Two mistakes are caught:

    * ``apply_fn`` ignores its params argument (no float param leaf is read) while it
      closes over float matrices: ``lambda p, x: model(x)`` with
      ``nnx.state(model)`` as params, or a Linen ``model.apply(variables, x)`` that
      does not use ``p``. Nothing would be quantized.
    * ``apply_fn`` reads its params but a matmul also reads a closed-over float matrix
      (see `closed_over_weights`): that weight would silently stay in float.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      min_elements: smallest constant size that counts as a weight.

    Raises:
      ValueError: in either case, naming the constants' shapes and how to fix it.
    """
    weights = closed_over_weights(graph, min_elements=min_elements)
    if not reads_params(graph):
        large = [
            aval for vid, aval in graph.avals.items() if vid in graph.consts and _is_weight_like(aval, min_elements)
        ]
        has_float_params = any(_is_float(graph.avals[vid]) for vid in graph.param_ids)
        if weights or (has_float_params and large):
            n_params = sum(_is_float(graph.avals[vid]) for vid in graph.param_ids)
            what = _listing(weights) if weights else f"{len(large)} float constant(s) of shapes {_shapes(large)}"
            raise ValueError(
                f"apply_fn ignores its params argument: none of its {n_params} float parameter "
                f"leaves is read, while the kernels are closed over as constants ({what}). "
                "transform quantizes the params it is given, so nothing would be quantized. " + _NNX_FIX
            )
        return
    if weights:
        raise ValueError(
            f"apply_fn reads its params, but {len(weights)} float matrix(es) that matmuls read as "
            f"weights are closed over as constants ({_listing(weights)}); they would silently stay "
            "unquantized. Pass them through apply_fn's params argument (from repquant_jax.from_nnx: "
            "make them nnx.Param, not another nnx.Variable type). " + _NNX_FIX
        )


def _listing(weights: tuple[ClosedOverWeight, ...], limit: int = 4) -> str:
    text = "; ".join(w.describe() for w in weights[:limit])
    return text + (f"; and {len(weights) - limit} more" if len(weights) > limit else "")


def _shapes(avals: list[Any], limit: int = 4) -> str:
    text = ", ".join("[" + ",".join(str(d) for d in a.shape) + "]" for a in avals[:limit])
    return text + (f" and {len(avals) - limit} more" if len(avals) > limit else "")
