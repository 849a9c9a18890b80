"""Evaluate a `Graph` with hooks on chosen values.

A hook replaces the value that *matmuls* see, and only them: it is applied where the
value is produced, the result travels through layout-only operations (reshape,
transpose, ...) to the matmul operands that read it, and every other consumer (a residual
add, a LayerNorm) keeps reading the float value. That is exactly the fake-quant semantics
of docs/method.md, "What gets quantized": only matmul inputs are quantized.

`evaluate` runs one call and is what `qapply` wraps in `jax.jit`. `evaluate_batches`
runs several calibration batches side by side, node by node, so that a hook sees the
value of every batch at once (calibration of one site from all batches, in forward order,
with every upstream hook already active). Values that do not depend on the inputs
(parameters and what derives from them) are computed once, not once per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Graph
from repquant_jax._src.types import MATMUL_PRIMITIVES, NodeId, ValueId

__all__ = ["Hook", "OperandHook", "MatmulFn", "Hooks", "evaluate", "evaluate_batches"]

#: ``hook(values) -> values``: one value per batch in, one replacement per batch out.
Hook = Callable[[list[Any]], list[Any]]
#: ``hook(operands) -> operands``: a matmul's operands, one list per batch, in and out.
OperandHook = Callable[[list[list[Any]]], list[list[Any]]]
#: ``fn(operands) -> value``: computes a single-output node from its operands.
MatmulFn = Callable[[list[Any]], Any]


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Everything the interpreter changes in a graph's evaluation.

    Values and nodes have distinct id types (`ValueId`, `NodeId`); `evaluate_batches`
    refuses an id the graph does not have, or a node hook on a node that is no matmul.

    Attributes:
      values: value id -> hook on what *matmuls* read of that value (fake-quant of an
        activation); every other consumer keeps the float value.
      rewrites: value id -> hook whose result replaces the value for *every* consumer
        (the output offsets of a fold into a matmul without a bias).
      operands: matmul node -> hook on its operands as it reads them (weight
        quantizers, recorders of reconstruction inputs).
      matmul_fns: matmul node -> function computing it in place of its primitive, from
        the operands after ``operands`` (integer matmuls of the export).
    """

    values: Mapping[ValueId, Hook] = dataclasses.field(default_factory=dict)
    rewrites: Mapping[ValueId, Hook] = dataclasses.field(default_factory=dict)
    operands: Mapping[NodeId, OperandHook] = dataclasses.field(default_factory=dict)
    matmul_fns: Mapping[NodeId, MatmulFn] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> Hooks:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    def check(self, graph: Graph) -> None:
        """Raises ValueError if a hook names a value or node ``graph`` does not have."""
        for field in ("values", "rewrites"):
            unknown = [v for v in getattr(self, field) if v not in graph.avals]
            if unknown:
                raise ValueError(f"Hooks.{field} names values the graph does not have: {unknown[:5]}")
        for field in ("operands", "matmul_fns"):
            for n in getattr(self, field):
                if not (0 <= n < len(graph.nodes)) or graph.nodes[n].primitive not in MATMUL_PRIMITIVES:
                    raise ValueError(f"Hooks.{field} names node {n}, which is not a matmul of the graph")


def evaluate(graph: Graph, params: Any, inputs: Sequence[Any], hooks: Hooks | None = None) -> Any:
    """Evaluates the graph on one call's inputs.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      params: the parameter pytree (same structure as traced).
      inputs: the positional inputs (same structure as traced).
      hooks: see `Hooks` and the module docstring.

    Returns:
      The output pytree, as ``apply_fn`` returns it.
    """
    param_leaves = jax.tree_util.tree_leaves(params)
    input_leaves = jax.tree_util.tree_leaves(tuple(inputs))
    (out,) = evaluate_batches(graph, param_leaves, [input_leaves], hooks)
    return out


def evaluate_batches(
    graph: Graph,
    param_leaves: Sequence[Any],
    batches: Sequence[Sequence[Any]],
    hooks: Hooks | None = None,
) -> list[Any]:
    """Evaluates the graph on several batches at once, node by node.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      param_leaves: flattened parameter leaves.
      batches: for each batch, its flattened input leaves.
      hooks: see `Hooks`. A value hook is called once per hooked value with the list of
        that value over all batches (a single element for input-independent values); an
        operand hook once per matmul with one list of operands per batch; a matmul
        function once per batch.

    Returns:
      One output pytree per batch.
    """
    hooks = hooks or Hooks()
    hooks.check(graph)
    rewrites, matmul_hooks, matmul_fns = hooks.rewrites, hooks.operands, hooks.matmul_fns
    value_hooks = hooks.values
    if len(param_leaves) != len(graph.param_ids):
        raise ValueError(f"params have {len(param_leaves)} leaves, the traced function has {len(graph.param_ids)}")
    n_batches = len(batches)
    last_use = _last_use(graph)
    # shared: input-independent values (one copy); per_batch: a list of n_batches values.
    shared: dict[ValueId, Any] = dict(graph.consts)
    per_batch: dict[ValueId, list[Any]] = {}
    # Hooked values and their layout-only descendants, as matmuls should read them.
    shadow_shared: dict[ValueId, Any] = {}
    shadow_batch: dict[ValueId, list[Any]] = {}

    def define(vid: ValueId, values: list[Any], is_shared: bool) -> None:
        if vid in rewrites:
            values = rewrites[vid](values)
        if is_shared:
            shared[vid] = values[0]
        else:
            per_batch[vid] = values
        if vid in value_hooks:
            replaced = value_hooks[vid](values)
            if is_shared:
                shadow_shared[vid] = replaced[0]
            else:
                shadow_batch[vid] = replaced

    for vid, leaf in zip(graph.param_ids, param_leaves):
        define(vid, [leaf], True)
    for k, vid in enumerate(graph.input_ids):
        define(vid, [batch[k] for batch in batches], False)

    for i, node in enumerate(graph.nodes):
        index = NodeId(i)
        is_shared = all(v in shared for v in node.inputs)
        is_matmul = node.primitive in MATMUL_PRIMITIVES
        n_runs = 1 if is_shared else n_batches

        def read(vid: ValueId, b: int, from_shadow: bool) -> Any:
            if from_shadow:
                if vid in shadow_shared:
                    return shadow_shared[vid]
                if vid in shadow_batch:
                    return shadow_batch[vid][b]
            return shared[vid] if vid in shared else per_batch[vid][b]

        args = [[read(v, b, is_matmul) for v in node.inputs] for b in range(n_runs)]
        if index in matmul_hooks:
            args = matmul_hooks[index](args)
        results: list[Sequence[Any]]
        if index in matmul_fns:
            results = [(matmul_fns[index](a),) for a in args]
        else:
            results = [node.fn(*a) for a in args]
        # Layout ops carry a shadow forward so that matmuls downstream read the hooked value.
        shadowed = node.primitive in LAYOUT_PRIMITIVES and any(
            v in shadow_shared or v in shadow_batch for v in node.inputs
        )
        if shadowed:
            shadow_results = [node.fn(*(read(v, b, True) for v in node.inputs)) for b in range(n_runs)]
        for k, vid in enumerate(node.outputs):
            define(vid, [r[k] for r in results], is_shared)
            if shadowed and vid not in value_hooks:
                values = [r[k] for r in shadow_results]
                if is_shared:
                    shadow_shared[vid] = values[0]
                else:
                    shadow_batch[vid] = values
        for vid in node.inputs:
            if last_use.get(vid) == index:
                for store in (per_batch, shadow_batch, shadow_shared):
                    store.pop(vid, None)
                if vid not in graph.consts:
                    shared.pop(vid, None)

    outputs = []
    for b in range(n_batches):
        leaves = [shared[v] if v in shared else per_batch[v][b] for v in graph.output_ids]
        outputs.append(jax.tree_util.tree_unflatten(graph.output_treedef, leaves))
    return outputs


def _last_use(graph: Graph) -> dict[ValueId, NodeId]:
    """Index of the last node reading each value (graph outputs are never freed)."""
    last: dict[ValueId, NodeId] = {}
    for index, node in enumerate(graph.nodes):
        for vid in node.inputs:
            last[vid] = NodeId(index)
    for vid in graph.output_ids:
        last.pop(vid, None)
    return last
