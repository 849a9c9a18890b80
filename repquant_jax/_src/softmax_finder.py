"""Finding softmaxes, and the activation points that are their probabilities.

A softmax is ``div(e, bcast(reduce_sum(e)))`` or ``mul(e, 1/bcast(reduce_sum(e)))``
with ``e = exp(..)``, through dtype casts and masking selects. A point is a softmax's
if it is its output through layout ops, masks and constant scales in [0, 1]
(`softmax_source`): it gets the non-negative (log) quantizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from repquant_jax._src.analysis_context import AnalysisContext
from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Node
from repquant_jax._src.site_names import site_name
from repquant_jax._src.site_records import Softmax
from repquant_jax._src.types import NodeId, ValueId

__all__ = ["find_softmaxes", "softmax_source"]


def find_softmaxes(ctx: AnalysisContext, unique: Callable[[str], str]) -> list[Softmax]:
    """``div(e, bcast(reduce_sum(e)))`` or ``mul(e, 1/bcast(reduce_sum(e)))`` with ``e = exp(..)``.

    Args:
      ctx: the analysis context.
      unique: makes a site name unique among those already given.
    """
    found = []
    for index, node in enumerate(ctx.g.nodes):
        i = NodeId(index)
        if node.primitive not in ("div", "mul") or len(node.inputs) != 2:
            continue
        num, den = node.inputs
        if node.primitive == "mul":
            candidates = [(num, den), (den, num)]
        else:
            candidates = [(num, den)]
        for e, d in candidates:
            axis = _softmax_axis(ctx, e, d, reciprocal=node.primitive == "mul")
            if axis is not None:
                name = unique(site_name(ctx, ctx.g.nodes[i], "softmax", i))
                found.append(Softmax(name, i, axis, None))
                break
    return found


def _softmax_axis(ctx: AnalysisContext, e: ValueId, d: ValueId, reciprocal: bool) -> int | None:
    """The (negative) axis of the softmax ``e / d`` (``e * d`` if ``reciprocal``), or
    None if it is not one."""
    root = _exp_root(ctx, e)
    if root is None:
        return None
    if reciprocal:  # d = 1 / sum
        if d not in ctx.producer:
            return None
        node = ctx.g.nodes[ctx.producer[d]]
        if node.primitive != "div" or ctx.scalar_const(node.inputs[0]) is None:
            return None
        d = node.inputs[1]
    src, _ = ctx.layout_source(d)
    if src not in ctx.producer:
        return None
    node = ctx.g.nodes[ctx.producer[src]]
    if node.primitive != "reduce_sum" or len(node.params["axes"]) != 1:
        return None
    if _exp_root(ctx, node.inputs[0]) != root:
        return None
    axis = node.params["axes"][0]
    return axis - len(ctx.g.avals[e].shape)


def _exp_root(ctx: AnalysisContext, vid: ValueId) -> ValueId | None:
    """The ``exp`` output that ``vid`` is, through dtype casts (a bf16 model sums
    its exp in float32) and masking selects (``where(mask, e, 0)``); else None."""
    while vid in ctx.producer:
        node = ctx.g.nodes[ctx.producer[vid]]
        if node.primitive == "exp":
            return vid
        if node.primitive in ("convert_element_type", "copy", "copy_p"):
            vid = node.inputs[0]
            continue
        live = _masked_value(ctx, node)
        if live is None:
            return None
        vid = live
    return None


def _masked_value(ctx: AnalysisContext, node: Node) -> ValueId | None:
    """For ``select_n(mask, ...)`` whose other branches are all zero: the live branch."""
    if node.primitive != "select_n":
        return None
    live = [v for v in node.inputs[1:] if ctx.scalar_const(v) != 0.0]
    return live[0] if len(live) == 1 else None


def _const_in_unit_interval(ctx: AnalysisContext, vid: ValueId) -> bool:
    """Whether ``vid`` is a constant (whatever slicing, gathers or layout ops lead
    to it) with all its values in [0, 1]: a head mask of ones, a 0/1 mask."""
    vid, _ = ctx.layout_source(vid)
    while vid not in ctx.g.consts:
        node = ctx.g.nodes[ctx.producer[vid]] if vid in ctx.producer else None
        if node is None or node.primitive not in ("slice", "dynamic_slice", "gather", "squeeze"):
            return False
        vid, _ = ctx.layout_source(node.inputs[0])
    value = np.asarray(ctx.g.consts[vid], np.float64)
    return bool(np.all((value >= 0) & (value <= 1)))


def softmax_source(ctx: AnalysisContext, vid: ValueId, softmax_out: Mapping[ValueId, Softmax]) -> Softmax | None:
    """The softmax whose probabilities ``vid`` is: directly, through layout ops and
    casts, through a mask selecting zeros, or scaled elementwise by a constant in
    [0, 1] (FlaxBert's head mask, ``einsum('...hqk,h->...hqk')``)."""
    while vid not in softmax_out:
        if vid not in ctx.producer:
            return None
        node = ctx.g.nodes[ctx.producer[vid]]
        live = _masked_value(ctx, node)
        if node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1:
            vid = node.inputs[0]
        elif live is not None:
            vid = live
        elif node.primitive == "mul" or (
            node.primitive == "dot_general" and not node.params["dimension_numbers"][0][0]
        ):
            a, b = node.inputs[:2]
            if _const_in_unit_interval(ctx, b):
                vid = a
            elif _const_in_unit_interval(ctx, a):
                vid = b
            else:
                return None
        else:
            return None
    return softmax_out[vid]
