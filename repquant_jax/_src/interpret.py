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

__all__ = [
    "Hook",
    "OperandHook",
    "MatmulFn",
    "Hooks",
    "BatchEvaluation",
    "evaluate",
    "evaluate_batches",
    "evaluate_range",
    "shared_values",
]

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
    evaluation = BatchEvaluation(graph, param_leaves, batches, hooks)
    evaluation.run_to(len(graph.nodes))
    return evaluation.outputs()


class BatchEvaluation:
    """`evaluate_batches` that can stop after any node and go on later.

    Block-by-block calibration runs every chunk of batches through one block before
    the next block: each chunk's evaluation pauses at the block's end, holding only the
    values live there (a value is dropped after its last reader), and resumes from
    there.

    Example:
        >>> import jax.numpy as jnp
        >>> from repquant_jax._src.graph import trace
        >>> graph = trace(lambda p, x: jnp.tanh(x @ p) @ p, jnp.eye(2), jnp.ones((1, 2)))
        >>> evaluation = BatchEvaluation(graph, [jnp.eye(2)], [[jnp.ones((1, 2))]])
        >>> evaluation.run_to(1)  # the first matmul only
        >>> evaluation.run_to(len(graph.nodes))
        >>> evaluation.outputs()[0].shape
        (1, 2)
    """

    def __init__(
        self,
        graph: Graph,
        param_leaves: Sequence[Any],
        batches: Sequence[Sequence[Any]],
        hooks: Hooks | None = None,
    ):
        hooks = hooks or Hooks()
        hooks.check(graph)
        if len(param_leaves) != len(graph.param_ids):
            raise ValueError(f"params have {len(param_leaves)} leaves, the traced function has {len(graph.param_ids)}")
        self.graph, self.n_batches, self.next_node = graph, len(batches), 0
        self._env = _Env(graph, hooks, len(batches))
        for vid, leaf in zip(graph.param_ids, param_leaves):
            self._env.define(vid, [leaf], True)
        for k, vid in enumerate(graph.input_ids):
            self._env.define(vid, [batch[k] for batch in batches], False)
        self._last_use = _last_use(graph)

    def run_to(self, stop: int) -> None:
        """Runs the nodes from where it stopped up to ``stop - 1``."""
        for i in range(self.next_node, stop):
            node = self.graph.nodes[i]
            self._env.run(NodeId(i), node)
            for vid in node.inputs:
                if self._last_use.get(vid) == i:
                    self._env.free(vid)
        self.next_node = max(self.next_node, stop)

    def outputs(self) -> list[Any]:
        """One output pytree per batch (after the last node has run)."""
        if self.next_node < len(self.graph.nodes):
            raise ValueError(f"the evaluation stopped at node {self.next_node} of {len(self.graph.nodes)}")
        return [
            jax.tree_util.tree_unflatten(
                self.graph.output_treedef, [self._env.read(v, b, False) for v in self.graph.output_ids]
            )
            for b in range(self.n_batches)
        ]


def evaluate_range(
    graph: Graph,
    start: int,
    stop: int,
    shared: Mapping[ValueId, Any],
    per_batch: Mapping[ValueId, list[Any]],
    wanted: Sequence[ValueId],
    hooks: Hooks | None = None,
) -> dict[ValueId, list[Any]]:
    """Evaluates nodes ``start .. stop - 1`` from the values they read (a part of the
    graph, e.g. one transformer block), as `evaluate_batches` would.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      start, stop: the node range.
      shared: input-independent values the range reads (params, constants, what
        derives from them).
      per_batch: the other values it reads that are defined before ``start``, one per
        batch. Value hooks apply to them as if they were defined here (rewrites do not:
        they are already applied).
      wanted: the values to return.
      hooks: see `Hooks` (ids outside the range are ignored).

    Returns:
      ``wanted`` value -> one value per batch.
    """
    hooks = hooks or Hooks()
    n_batches = len(next(iter(per_batch.values()))) if per_batch else 1
    env = _Env(graph, hooks, n_batches)
    env.shared.update(shared)
    for vid, values in per_batch.items():
        env.define(vid, list(values), False, rewrite=False)
    for i in range(start, stop):
        env.run(NodeId(i), graph.nodes[i])
    return {v: [env.read(v, b, False) for b in range(n_batches)] for v in wanted}


class _Env:
    """The values of one evaluation: input-independent ones once (``shared``), the
    others once per batch, and the hooked form of each hooked value and of its
    layout-only descendants (``shadow_*``: what matmuls read)."""

    def __init__(self, graph: Graph, hooks: Hooks, n_batches: int):
        self.graph, self.hooks, self.n_batches = graph, hooks, n_batches
        self.shared: dict[ValueId, Any] = dict(graph.consts)
        self.per_batch: dict[ValueId, list[Any]] = {}
        self.shadow_shared: dict[ValueId, Any] = {}
        self.shadow_batch: dict[ValueId, list[Any]] = {}

    def define(self, vid: ValueId, values: list[Any], is_shared: bool, rewrite: bool = True) -> None:
        if rewrite and vid in self.hooks.rewrites:
            values = self.hooks.rewrites[vid](values)
        if is_shared:
            self.shared[vid] = values[0]
        else:
            self.per_batch[vid] = values
        if vid in self.hooks.values:
            self._shadow(vid, self.hooks.values[vid](values), is_shared)

    def _shadow(self, vid: ValueId, values: list[Any], is_shared: bool) -> None:
        if is_shared:
            self.shadow_shared[vid] = values[0]
        else:
            self.shadow_batch[vid] = values

    def read(self, vid: ValueId, b: int, from_shadow: bool) -> Any:
        if from_shadow:
            if vid in self.shadow_shared:
                return self.shadow_shared[vid]
            if vid in self.shadow_batch:
                return self.shadow_batch[vid][b]
        return self.shared[vid] if vid in self.shared else self.per_batch[vid][b]

    def run(self, index: NodeId, node: Any) -> None:
        is_shared = all(v in self.shared for v in node.inputs)
        is_matmul = node.primitive in MATMUL_PRIMITIVES
        n_runs = 1 if is_shared else self.n_batches
        args = [[self.read(v, b, is_matmul) for v in node.inputs] for b in range(n_runs)]
        if index in self.hooks.operands:
            args = self.hooks.operands[index](args)
        results: list[Sequence[Any]]
        if index in self.hooks.matmul_fns:
            results = [(self.hooks.matmul_fns[index](a),) for a in args]
        else:
            results = [node.fn(*a) for a in args]
        # Layout ops carry a shadow forward so that matmuls downstream read the hooked value.
        shadowed = node.primitive in LAYOUT_PRIMITIVES and any(
            v in self.shadow_shared or v in self.shadow_batch for v in node.inputs
        )
        if shadowed:
            shadow_results = [node.fn(*(self.read(v, b, True) for v in node.inputs)) for b in range(n_runs)]
        for k, vid in enumerate(node.outputs):
            self.define(vid, [r[k] for r in results], is_shared)
            if shadowed and vid not in self.hooks.values:
                self._shadow(vid, [r[k] for r in shadow_results], is_shared)

    def free(self, vid: ValueId) -> None:
        for store in (self.per_batch, self.shadow_batch, self.shadow_shared):
            store.pop(vid, None)
        if vid not in self.graph.consts:
            self.shared.pop(vid, None)


def shared_values(graph: Graph, param_leaves: Sequence[Any]) -> dict[ValueId, Any]:
    """Every input-independent value of the graph: params, constants and what the
    graph computes from them alone (transposed kernels, masks from iota)."""
    shared: dict[ValueId, Any] = dict(graph.consts)
    shared.update(zip(graph.param_ids, param_leaves))
    for node in graph.nodes:
        if all(v in shared for v in node.inputs):
            shared.update(zip(node.outputs, node.fn(*(shared[v] for v in node.inputs))))
    return shared


def _last_use(graph: Graph) -> dict[ValueId, NodeId]:
    """Index of the last node reading each value (graph outputs are never freed)."""
    last: dict[ValueId, NodeId] = {}
    for index, node in enumerate(graph.nodes):
        for vid in node.inputs:
            last[vid] = NodeId(index)
    for vid in graph.output_ids:
        last.pop(vid, None)
    return last
