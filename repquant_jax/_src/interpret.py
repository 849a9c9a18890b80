"""Evaluate a `Graph` with hooks on chosen values.

A hook replaces the value that *matmuls* see, and only them: it is applied where the
value is produced, the result travels through layout-only operations (reshape,
transpose, ...) to the matmul operands that read it, and every other consumer (a residual
add, a LayerNorm) keeps reading the float value. That is exactly the fake-quant semantics
of DESIGN.md §2.3: only matmul inputs are quantized.

`evaluate` runs one call and is what `qapply` wraps in `jax.jit`. `evaluate_batches`
runs several calibration batches side by side, node by node, so that a hook sees the
value of every batch at once (calibration of one site from all batches, in forward order,
with every upstream hook already active). Values that do not depend on the inputs
(parameters and what derives from them) are computed once, not once per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Graph

__all__ = ["Hook", "MatmulFn", "evaluate", "evaluate_batches"]

#: ``hook(values) -> values``: one value per batch in, one replacement per batch out.
Hook = Callable[[list[Any]], list[Any]]
#: ``fn(operands) -> value``: computes a single-output node from its operands.
MatmulFn = Callable[[list[Any]], Any]


def evaluate(
    graph: Graph,
    params: Any,
    inputs: Sequence[Any],
    hooks: Mapping[int, Hook] | None = None,
    rewrites: Mapping[int, Hook] | None = None,
    matmul_fns: Mapping[int, MatmulFn] | None = None,
    matmul_hooks: Mapping[int, Callable[[list[list[Any]]], list[list[Any]]]] | None = None,
) -> Any:
    """Evaluates the graph on one call's inputs.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      params: the parameter pytree (same structure as traced).
      inputs: the positional inputs (same structure as traced).
      hooks: value id -> hook; see the module docstring.
      rewrites: value id -> hook replacing the value for *every* consumer (used for the
        output offsets of a fold into a matmul without a bias).
      matmul_fns: node index -> function computing that matmul node; see
        `evaluate_batches`.
      matmul_hooks: node index -> hook on that matmul's operands; see
        `evaluate_batches`.

    Returns:
      The output pytree, as ``apply_fn`` returns it.
    """
    param_leaves = jax.tree_util.tree_leaves(params)
    input_leaves = jax.tree_util.tree_leaves(tuple(inputs))
    (out,) = evaluate_batches(
        graph, param_leaves, [input_leaves], hooks, rewrites, matmul_hooks=matmul_hooks, matmul_fns=matmul_fns
    )
    return out


def evaluate_batches(
    graph: Graph,
    param_leaves: Sequence[Any],
    batches: Sequence[Sequence[Any]],
    hooks: Mapping[int, Hook] | None = None,
    rewrites: Mapping[int, Hook] | None = None,
    matmul_hooks: Mapping[int, Callable[[list[list[Any]]], list[list[Any]]]] | None = None,
    matmul_fns: Mapping[int, MatmulFn] | None = None,
) -> list[Any]:
    """Evaluates the graph on several batches at once, node by node.

    Args:
      graph: from `repquant_jax._src.graph.trace`.
      param_leaves: flattened parameter leaves.
      batches: for each batch, its flattened input leaves.
      hooks: value id -> hook, called once per hooked value with the list of that
        value over all batches (a single element for input-independent values).
      rewrites: value id -> hook whose result replaces the value for every consumer.
      matmul_hooks: node index -> hook called with the operands of that matmul, as it
        reads them (one list of operands per batch), returning the operands to use.
      matmul_fns: node index -> ``fn(operands) -> value`` computing that (matmul) node
        in place of its primitive, once per batch, from the operands as matmuls read
        them (hooked values, after ``matmul_hooks``). Used by `repquant_jax._src.export` for
        integer matmuls. Default None: every node runs its own primitive.

    Returns:
      One output pytree per batch.
    """
    hooks = dict(hooks or {})
    rewrites = dict(rewrites or {})
    matmul_hooks = dict(matmul_hooks or {})
    matmul_fns = dict(matmul_fns or {})
    if len(param_leaves) != len(graph.param_ids):
        raise ValueError(
            f"params have {len(param_leaves)} leaves, the traced function has {len(graph.param_ids)}"
        )
    n_batches = len(batches)
    last_use = _last_use(graph)
    # shared: input-independent values (one copy); per_batch: a list of n_batches values.
    shared: dict[int, Any] = dict(graph.consts)
    per_batch: dict[int, list[Any]] = {}
    # Hooked values and their layout-only descendants, as matmuls should read them.
    shadow_shared: dict[int, Any] = {}
    shadow_batch: dict[int, list[Any]] = {}

    def define(vid: int, values: list[Any], is_shared: bool) -> None:
        if vid in rewrites:
            values = rewrites[vid](values)
        if is_shared:
            shared[vid] = values[0]
        else:
            per_batch[vid] = values
        if vid in hooks:
            replaced = hooks[vid](values)
            if is_shared:
                shadow_shared[vid] = replaced[0]
            else:
                shadow_batch[vid] = replaced

    for vid, leaf in zip(graph.param_ids, param_leaves):
        define(vid, [leaf], True)
    for k, vid in enumerate(graph.input_ids):
        define(vid, [batch[k] for batch in batches], False)

    for index, node in enumerate(graph.nodes):
        is_shared = all(v in shared for v in node.inputs)
        is_matmul = node.primitive in ("dot_general", "conv_general_dilated")
        n_runs = 1 if is_shared else n_batches

        def read(vid: int, b: int, from_shadow: bool) -> Any:
            if from_shadow:
                if vid in shadow_shared:
                    return shadow_shared[vid]
                if vid in shadow_batch:
                    return shadow_batch[vid][b]
            return shared[vid] if vid in shared else per_batch[vid][b]

        args = [[read(v, b, is_matmul) for v in node.inputs] for b in range(n_runs)]
        if index in matmul_hooks:
            args = matmul_hooks[index](args)
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
            if shadowed and vid not in hooks:
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


def _last_use(graph: Graph) -> dict[int, int]:
    """Index of the last node reading each value (graph outputs are never freed)."""
    last: dict[int, int] = {}
    for index, node in enumerate(graph.nodes):
        for vid in node.inputs:
            last[vid] = index
    for vid in graph.output_ids:
        last.pop(vid, None)
    return last
