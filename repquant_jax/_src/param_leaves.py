"""Parameter-leaf tracking: which elements of which leaf each operation reads.

Index maps ("probes") are computed by running the layout-only chain between a parameter
leaf and its use on an array of flat indices (`param_probe`), so the fold in `fold.py`
can edit the parameter leaf itself, whatever reshapes and transposes the model applies
to it. The same probes tell who else reads the elements a site or a fold would replace
(`other_readers`): a weight site owns its leaf only if nobody does, and a fold may edit
its leaves only if nobody outside the group does (`shared_leaf_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from repquant_jax._src.analysis_context import AnalysisContext
from repquant_jax._src.graph import LAYOUT_PRIMITIVES
from repquant_jax._src.site_names import scope
from repquant_jax._src.site_records import FoldConsumer, WeightSite
from repquant_jax._src.types import NodeId, ValueId

__all__ = ["param_probe", "run_chain", "leaf_uses", "other_readers", "weight_elements", "shared_leaf_reason"]


def param_probe(ctx: AnalysisContext, vid: ValueId) -> np.ndarray:
    """Flat index into the parameter leaf of every element of value ``vid``."""
    k, chain = ctx.origin[vid]
    shape = ctx.g.avals[ctx.g.param_ids[k]].shape
    probe = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    return run_chain(ctx, probe, chain)


def run_chain(ctx: AnalysisContext, array: np.ndarray, chain: Sequence[NodeId]) -> np.ndarray:
    """``array`` put through the layout nodes ``chain`` (casts skipped)."""
    with jax.ensure_compile_time_eval():
        for i in chain:
            node = ctx.g.nodes[i]
            if node.primitive != "convert_element_type":
                (array,) = node.fn(array)
    return np.asarray(array)


def leaf_uses(ctx: AnalysisContext, k: int) -> list[tuple[NodeId, np.ndarray | None]]:
    """Every non-layout reader of parameter leaf ``k``: ``(node index, flat leaf
    indices it reads)``, node -1 for a function output; indices None when the
    reader sees the whole leaf (no scan slice on the way)."""
    if k not in ctx.leaf_use_cache:
        uses: list[tuple[NodeId, np.ndarray | None]] = []
        for vid, (leaf, chain) in ctx.origin.items():
            if leaf != k:
                continue
            sliced = any(ctx.g.nodes[i].primitive == "scan_slice" for i in chain)
            elements = np.unique(param_probe(ctx, vid)) if sliced else None
            if vid in ctx.outputs:
                uses.append((NodeId(-1), elements))
            for i in ctx.consumers.get(vid, ()):
                node = ctx.g.nodes[i]
                if not (node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1):
                    uses.append((i, elements))
        ctx.leaf_use_cache[k] = uses
    return ctx.leaf_use_cache[k]


def other_readers(ctx: AnalysisContext, k: int, elements: np.ndarray | None, allowed: set[NodeId]) -> list[str]:
    """Descriptions of the readers of leaf ``k`` outside ``allowed`` (node indices)
    that read any of ``elements`` (None: any element)."""
    found = []
    for node_index, read in leaf_uses(ctx, k):
        if node_index in allowed:
            continue
        if read is not None and elements is not None and not np.intersect1d(read, elements).size:
            continue
        if node_index < 0:
            found.append("a function output")
        elif node_index in ctx.site_names:
            found.append(f"the matmul {ctx.site_names[node_index]}")
        else:
            node = ctx.g.nodes[node_index]
            found.append(f"{node.primitive} at {scope(ctx, node) or '<top level>'}")
    return list(dict.fromkeys(found))


def weight_elements(ctx: AnalysisContext, w: WeightSite) -> np.ndarray | None:
    """The leaf elements a weight site reads (None: all of them)."""
    if w.derived:
        return None
    _, chain = ctx.origin[w.weight_id]
    if not any(ctx.g.nodes[i].primitive == "scan_slice" for i in chain):
        return None
    assert w.kernel_index is not None  # a weight that is not derived has one
    return np.unique(w.kernel_index)


def shared_leaf_reason(
    ctx: AnalysisContext,
    norm_edits: Sequence[tuple[int, np.ndarray | None, ValueId, str]],
    consumers: Sequence[FoldConsumer],
    weight_by_node: Mapping[NodeId, WeightSite],
) -> str:
    """Why the fold may not edit its leaves: a leaf element it changes is also read
    by an operation outside the group (a tied embedding lookup, another matmul, a
    transposed use, another norm applied with the same γ), or two consumers read one
    kernel along different axes."""
    reasons = []
    for k, index, vid, what in norm_edits:
        readers = other_readers(ctx, k, np.asarray(index), set(ctx.consumers.get(vid, ())))
        reasons += [f"{what} {ctx.g.param_paths[k]} is also read by {r}" for r in readers]
    by_leaf: dict[int, list[FoldConsumer]] = {}
    for c in consumers:
        by_leaf.setdefault(weight_by_node[c.node].param_index, []).append(c)
    for k, cs in by_leaf.items():
        first = cs[0]
        for c in cs[1:]:
            overlap = (first.row_channel >= 0) & (c.row_channel >= 0)
            if overlap.any() and not np.array_equal(first.row_channel, c.row_channel):
                reasons.append(f"{first.site} and {c.site} read {ctx.g.param_paths[k]} along different axes")
        rows = np.flatnonzero(np.any([c.row_channel >= 0 for c in cs], axis=0))
        readers = other_readers(ctx, k, rows, {c.node for c in cs})
        reasons += [f"kernel {ctx.g.param_paths[k]} is also read by {r}" for r in readers]
        biases = {c.bias_param_index for c in cs if c.bias_param_index is not None}
        for bk in biases:
            users = [c for c in cs if c.bias_param_index == bk]
            index = np.unique(np.concatenate([c.bias_index for c in users]))
            readers = other_readers(ctx, bk, index, {c.bias_node for c in users if c.bias_node is not None})
            reasons += [f"bias {ctx.g.param_paths[bk]} is also read by {r}" for r in readers]
    bias_leaves = [c.bias_param_index for c in consumers if c.bias_param_index is not None]
    for bk in set(bias_leaves):
        kernels = {weight_by_node[c.node].param_index for c in consumers if c.bias_param_index == bk}
        if len(kernels) > 1:
            reasons.append(f"bias {ctx.g.param_paths[bk]} is added to matmuls of different kernels")
    return "; ".join(dict.fromkeys(reasons))
