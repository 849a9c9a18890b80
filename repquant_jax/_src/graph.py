"""Trace a JAX function once and flatten it into a small dataflow graph.

`trace(apply_fn, params, *inputs)` runs `jax.make_jaxpr` and rewrites the result into a
flat list of `Node`s whose inputs and outputs are integer value ids. Nested jaxprs are
inlined so that the analysis in `sites.py` sees one dataflow:

* `jit`/`pjit`, `closed_call`, `core_call`, `remat`/`checkpoint`: inlined.
* `custom_jvp_call`/`custom_vjp_call`: inlined with their primal function. The custom
  derivative rule is dropped, so gradients through `qapply` use ordinary autodiff of the
  primal (the straight-through quantizers supply their own gradients).
* `scan` (e.g. `flax.linen.scan` over layers): unrolled, one copy of the body per
  iteration. Parameters stacked along the scan axis are sliced per iteration, and sites
  inside the body get an iteration suffix (``"layers/Dense_0[2]"``), so every layer has its
  own quantizer state.
* `while`, `cond` and other control flow: kept as one opaque node when their bodies hold
  no matmul; a matmul inside them raises `UnsupportedGraphError`, because a quantizer
  there could not be calibrated per branch or per iteration.

The graph only depends on shapes and dtypes, so it can be built from
`jax.ShapeDtypeStruct`s inside a `jax.jit` trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from repquant_jax._src.types import MATMUL_PRIMITIVES, NodeId, ValueId

__all__ = ["Node", "Graph", "UnsupportedGraphError", "trace", "path_to_str", "LAYOUT_PRIMITIVES"]

#: Primitives that only move data around: a value derived from a parameter through these
#: is still "the parameter" for quantization, and quantization commutes with them.
LAYOUT_PRIMITIVES = frozenset(
    {
        "reshape",
        "transpose",
        "convert_element_type",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "scan_slice",  # synthetic: one iteration's slice of a scanned-over array
    }
)

# Call-like primitives and the parameter that holds their body.
_INLINE_PARAM = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


class UnsupportedGraphError(ValueError):
    """The traced function uses a pattern that cannot be quantized correctly."""


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One operation of the flattened graph.

    Attributes:
      primitive: the primitive's name (``"dot_general"``) or a synthetic name
        (``"scan_slice"``, ``"scan_stack"``).
      inputs: value ids read by the node.
      outputs: value ids written by the node.
      name: the Flax module path (name stack) the operation was traced under.
      iteration: index of the unrolled scan iteration, or None outside a scan.
      params: the primitive's parameters (passed to ``bind``).
      fn: the function evaluating the node: ``fn(*input_values) -> tuple of outputs``.
    """

    primitive: str
    inputs: tuple[ValueId, ...]
    outputs: tuple[ValueId, ...]
    name: str
    iteration: tuple[int, ...]
    params: Mapping[str, Any]
    fn: Callable[..., Sequence[Any]] = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A flat dataflow graph of one traced call of ``apply_fn(params, *inputs)``.

    Attributes:
      nodes: operations in a valid evaluation (forward) order.
      param_ids: value id of each parameter leaf, in ``jax.tree_util`` flatten order.
      param_paths: readable tree path of each parameter leaf (``"params/fc1/kernel"``).
      input_ids: value ids of the flattened positional inputs.
      output_ids: value ids of the flattened outputs.
      consts: values of constants and literals, by value id.
      avals: shape and dtype of every value, by value id.
      params_treedef, inputs_treedef, output_treedef: pytree structures of the call.
    """

    nodes: tuple[Node, ...]
    param_ids: tuple[ValueId, ...]
    param_paths: tuple[str, ...]
    input_ids: tuple[ValueId, ...]
    output_ids: tuple[ValueId, ...]
    consts: Mapping[ValueId, Any]
    avals: Mapping[ValueId, jax.core.ShapedArray]
    params_treedef: Any
    inputs_treedef: Any
    output_treedef: Any

    def producers(self) -> dict[ValueId, NodeId]:
        """Index of the node producing each value id."""
        return {v: NodeId(i) for i, node in enumerate(self.nodes) for v in node.outputs}

    def consumers(self) -> dict[ValueId, list[NodeId]]:
        """Indices of the nodes reading each value id (graph outputs are not included)."""
        out: dict[ValueId, list[NodeId]] = {}
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                out.setdefault(v, []).append(NodeId(i))
        return out


def path_to_str(path: Sequence[Any]) -> str:
    """Formats a `jax.tree_util` key path as ``"params/Block_0/fc1/kernel"``.

    A trailing ``.value`` attribute (the array inside a Flax NNX ``Variable``) is dropped.
    """
    parts = []
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in ("value", "raw_value"):
        path = path[:-1]
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _as_struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def trace(apply_fn: Callable[..., Any], params: Any, *inputs: Any) -> Graph:
    """Traces ``apply_fn(params, *inputs)`` into a flat `Graph`.

    Only shapes and dtypes of ``params`` and ``inputs`` are used.

    Args:
      apply_fn: a pure function ``apply_fn(params, *inputs)``.
      params: the parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
      *inputs: example positional inputs (arrays or `jax.ShapeDtypeStruct`s).

    Returns:
      The inlined, unrolled graph.

    Raises:
      UnsupportedGraphError: if a matmul sits inside control flow that cannot be inlined.

    Example:
      >>> import jax.numpy as jnp
      >>> g = trace(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
      >>> [n.primitive for n in g.nodes]
      ['dot_general']
    """
    param_leaves_with_path, params_treedef = jax.tree_util.tree_flatten_with_path(params)
    input_leaves, inputs_treedef = jax.tree_util.tree_flatten(inputs)
    param_structs = [_as_struct(leaf) for _, leaf in param_leaves_with_path]
    input_structs = [_as_struct(leaf) for leaf in input_leaves]

    def flat_fn(*leaves):
        p = jax.tree_util.tree_unflatten(params_treedef, leaves[: len(param_structs)])
        xs = jax.tree_util.tree_unflatten(inputs_treedef, leaves[len(param_structs) :])
        return apply_fn(p, *xs)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*param_structs, *input_structs)
    output_treedef = jax.tree_util.tree_structure(out_shape)

    builder = _Builder()
    in_ids = [builder.new_value(v.aval) for v in closed.jaxpr.invars]
    out_ids = builder.inline(closed.jaxpr, closed.consts, in_ids, prefix="", iteration=())
    n_params = len(param_structs)
    return Graph(
        nodes=tuple(builder.nodes),
        param_ids=tuple(in_ids[:n_params]),
        param_paths=tuple(path_to_str(path) for path, _ in param_leaves_with_path),
        input_ids=tuple(in_ids[n_params:]),
        output_ids=tuple(out_ids),
        consts=builder.consts,
        avals=builder.avals,
        params_treedef=params_treedef,
        inputs_treedef=inputs_treedef,
        output_treedef=output_treedef,
    )


def _join(prefix: str, name: str) -> str:
    return "/".join(part for part in (prefix, name) if part)


def _contains_matmul(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in MATMUL_PRIMITIVES:
            return True
        for sub in jex_core.jaxprs_in_params(eqn.params):
            if _contains_matmul(sub):
                return True
    return False


def _bind_fn(primitive: Any, params: Mapping[str, Any]) -> Callable[..., Sequence[Any]]:
    def fn(*args):
        out = primitive.bind(*args, **params)
        return tuple(out) if primitive.multiple_results else (out,)

    return fn


class _Builder:
    """Accumulates nodes while inlining nested jaxprs."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.consts: dict[ValueId, Any] = {}
        self.avals: dict[ValueId, Any] = {}
        self._next = 0

    def new_value(self, aval: Any) -> ValueId:
        vid = ValueId(self._next)
        self._next += 1
        self.avals[vid] = aval
        return vid

    def const(self, value: Any) -> ValueId:
        vid = self.new_value(jax.typeof(value))
        self.consts[vid] = value
        return vid

    def add(self, primitive, inputs, out_avals, name, iteration, params, fn) -> list[ValueId]:
        outs = [self.new_value(aval) for aval in out_avals]
        self.nodes.append(Node(primitive, tuple(inputs), tuple(outs), name, iteration, dict(params), fn))
        return outs

    def inline(self, jaxpr, consts, in_ids, prefix: str, iteration: tuple[int, ...]) -> list[ValueId]:
        env: dict[Any, ValueId] = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = self.const(value)
        for var, vid in zip(jaxpr.invars, in_ids):
            env[var] = vid

        def read(atom) -> ValueId:
            if isinstance(atom, jex_core.Literal):
                return self.const(atom.val)
            return env[atom]

        for eqn in jaxpr.eqns:
            name = _join(prefix, str(eqn.source_info.name_stack))
            args = [read(a) for a in eqn.invars]
            prim = eqn.primitive.name
            if prim in _INLINE_PARAM and _INLINE_PARAM[prim] in eqn.params:
                sub = eqn.params[_INLINE_PARAM[prim]]
                sub_jaxpr, sub_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
                if prim.startswith("custom_"):
                    args = args[: len(sub_jaxpr.invars)]
                outs = self.inline(sub_jaxpr, sub_consts, args, name, iteration)
            elif prim == "scan":
                outs = self._unroll_scan(eqn, args, name, iteration)
            else:
                for sub in jex_core.jaxprs_in_params(eqn.params):
                    if _contains_matmul(sub):
                        raise UnsupportedGraphError(
                            f"a matmul inside '{prim}' at {name or '<top level>'} cannot be "
                            "quantized: only jit, remat, custom_jvp/vjp and scan bodies are "
                            "inlined. Move the matmul out of the control flow, or use scan."
                        )
                outs = self.add(
                    prim,
                    args,
                    [v.aval for v in eqn.outvars],
                    name,
                    iteration,
                    eqn.params,
                    _bind_fn(eqn.primitive, eqn.params),
                )
            for var, vid in zip(eqn.outvars, outs):
                env[var] = vid
        return [read(a) for a in jaxpr.outvars]

    def _unroll_scan(self, eqn, args, name, iteration) -> list[ValueId]:
        p = eqn.params
        body = p["jaxpr"]
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = args[:n_consts], args[n_consts : n_consts + n_carry], args[n_consts + n_carry :]
        ys_per_step: dict[int, list[ValueId]] = {}
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for i in order:
            x_i = []
            for x in xs:
                aval = self.avals[x]
                sliced = jax.core.ShapedArray(aval.shape[1:], aval.dtype)
                x_i += self.add(
                    "scan_slice",
                    [x],
                    [sliced],
                    name,
                    iteration + (i,),
                    {"index": i},
                    lambda a, i=i: (a[i],),
                )
            outs = self.inline(body.jaxpr, body.consts, consts + carry + x_i, name, iteration + (i,))
            carry, ys_per_step[i] = outs[:n_carry], outs[n_carry:]
        stacked = []
        n_ys = len(eqn.outvars) - n_carry
        for k in range(n_ys):
            parts = [ys_per_step[i][k] for i in range(length)]
            stacked += self.add(
                "scan_stack",
                parts,
                [eqn.outvars[n_carry + k].aval],
                name,
                iteration,
                {},
                lambda *a: (jnp.stack(a),),
            )
        return carry + stacked
