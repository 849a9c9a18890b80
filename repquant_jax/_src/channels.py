"""Channel tracking for the norm fold: which values and ops keep the channel (last) axis.

A fold scales each channel of a norm's output; it is exact only through ops that map
each channel to itself linearly (`channel_step`), and it edits parameters that are
broadcast along that axis (`per_channel_index`).
"""

from __future__ import annotations

import numpy as np

from repquant_jax._src.analysis_context import AnalysisContext
from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Node
from repquant_jax._src.param_leaves import param_probe
from repquant_jax._src.types import NodeId, ValueId

__all__ = ["per_channel_index", "product_factors", "channel_step"]


def per_channel_index(ctx: AnalysisContext, vid: ValueId, out_shape: tuple[int, ...]) -> np.ndarray | None:
    """If ``vid`` is a parameter broadcast along the last axis of ``out_shape``: its
    flat leaf index per channel."""
    if vid not in ctx.origin:
        return None
    probe = param_probe(ctx, vid)
    channels = out_shape[-1]
    if probe.ndim > len(out_shape) or probe.shape[-1] != channels or probe.size != channels:
        return None
    return probe.reshape(channels)


def product_factors(ctx: AnalysisContext, vid: ValueId) -> list[ValueId]:
    """Factors of a product tree of single-use ``mul`` nodes."""
    if vid in ctx.producer and len(ctx.consumers.get(vid, ())) <= 1:
        node = ctx.g.nodes[ctx.producer[vid]]
        if node.primitive == "mul" and len(node.inputs) == 2:
            return product_factors(ctx, node.inputs[0]) + product_factors(ctx, node.inputs[1])
    return [vid]


def channel_step(ctx: AnalysisContext, node_index: NodeId) -> tuple[ValueId, NodeId | None] | None:
    """If the node maps each channel (last axis) to itself linearly and keeps
    per-channel affines exact (layout ops, slices, a mean over other axes):
    (its input value id, the node to follow it with or None)."""
    node = ctx.g.nodes[node_index]
    if len(node.inputs) < 1:
        return None
    src = node.inputs[0]
    in_shape, out_shape = ctx.g.avals[src].shape, ctx.g.avals[node.outputs[0]].shape
    if not in_shape or not out_shape or in_shape[-1] != out_shape[-1]:
        return None
    if node.primitive == "transpose" and node.params["permutation"][-1] != len(in_shape) - 1:
        return None
    if node.primitive in LAYOUT_PRIMITIVES or node.primitive in ("slice", "squeeze"):
        if node.primitive == "slice" and node.params["start_indices"][-1] != 0:
            return None
        return (src, None) if len(node.inputs) == 1 else None
    if node.primitive in ("gather", "dynamic_slice") and _keeps_channels(ctx, node):
        return src, None
    if node.primitive == "div" and node.inputs[1] in ctx.g.consts and node.inputs[0] in ctx.producer:
        red_index = ctx.producer[node.inputs[0]]
        red = ctx.g.nodes[red_index]
        if red.primitive != "reduce_sum" or len(ctx.consumers.get(red.outputs[0], ())) != 1:
            return None
        axes = red.params["axes"]
        red_shape = ctx.g.avals[red.inputs[0]].shape
        count = int(np.prod([red_shape[a] for a in axes]))
        if len(red_shape) - 1 in axes or float(np.asarray(ctx.g.consts[node.inputs[1]])) != count:
            return None
        return red.inputs[0], red_index
    return None


def _keeps_channels(ctx: AnalysisContext, node: Node) -> bool:
    """Whether a gather or dynamic slice selects along other axes only, keeping the
    last (channel) axis whole and last (token pooling, ``x[:, eos_index]``)."""
    channels = ctx.g.avals[node.inputs[0]].shape[-1]
    last = len(ctx.g.avals[node.inputs[0]].shape) - 1
    if node.primitive == "dynamic_slice":
        return node.params["slice_sizes"][-1] == channels
    dn = node.params["dimension_numbers"]
    out_ndim = len(ctx.g.avals[node.outputs[0]].shape)
    return (
        node.params["slice_sizes"][-1] == channels
        and last not in dn.collapsed_slice_dims
        and last not in dn.start_index_map
        and last not in getattr(dn, "operand_batching_dims", ())
        and dn.offset_dims
        and dn.offset_dims[-1] == out_ndim - 1
    )
