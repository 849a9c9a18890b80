"""Norm fold groups: the per-channel affine of a norm, the matmuls it feeds, the verdict.

A `FoldGroup` is built in three steps (`sites._Analysis` runs them): `find_norm` matches
the norm's affine ``x * (c + γ) [+ β]`` behind an activation point, `fold_consumers`
follows its output to the weight matmuls that read it and says which readers prevent
the fold, and `fold_group` adds the leaf-sharing checks (`param_leaves`) and the
verdicts (docs/method.md, "Folding a norm" and "Branch fold").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from repquant_jax._src.analysis_context import AnalysisContext
from repquant_jax._src.channels import channel_step, per_channel_index, product_factors
from repquant_jax._src.graph import Node
from repquant_jax._src.param_leaves import param_probe, run_chain, shared_leaf_reason
from repquant_jax._src.site_names import scope, site_name_from_path, suffix
from repquant_jax._src.site_records import ActivationPoint, FoldConsumer, FoldGroup, WeightSite
from repquant_jax._src.types import NodeId, ValueId

__all__ = ["NormAffine", "find_norm", "fold_consumers", "fold_consumer", "fold_group"]


@dataclasses.dataclass(frozen=True, eq=False)
class NormAffine:
    """The per-channel affine a norm ends with: ``x * (scale_offset + γ) [+ β]``.

    Attributes:
      out: value id of its output (the activation point, before channel-preserving ops).
      node: the node producing ``out`` (the ``add`` of β, or the ``mul`` by γ).
      shape: shape of ``out``.
      kind: ``"layernorm"`` (scale and bias) or ``"rmsnorm"`` (scale only).
      scale_id: value id of γ as the product reads it.
      scale_index: flat index into γ's leaf for each channel.
      scale_offset: the scalar constant added to γ (Gemma's ``1 + scale``), else 0.
      bias: β as ``(value id, leaf index, flat leaf index per channel)``; None for rmsnorm.
    """

    out: ValueId
    node: Node
    shape: tuple[int, ...]
    kind: str
    scale_id: ValueId
    scale_index: np.ndarray = dataclasses.field(repr=False)
    scale_offset: float = 0.0
    bias: tuple[ValueId, int, np.ndarray] | None = dataclasses.field(default=None, repr=False)


def find_norm(ctx: AnalysisContext, point: ActivationPoint) -> NormAffine | None:
    """The norm affine producing ``point`` through channel-preserving ops, if any."""
    out = point.value_id
    while out in ctx.producer:
        step = channel_step(ctx, ctx.producer[out])
        if step is None:
            break
        out = step[0]
    if out not in ctx.producer or len(point.shape) < 1:
        return None
    node = ctx.g.nodes[ctx.producer[out]]
    shape = tuple(ctx.g.avals[out].shape)
    affine = _affine_factors(ctx, node, shape)
    if affine is None:
        return None
    kind, factors, bias = affine
    scales = []
    for f in factors:
        offset, gamma = _offset_scale(ctx, f)
        if gamma in ctx.origin:
            scales.append((gamma, per_channel_index(ctx, gamma, shape), offset))
    if len(scales) != 1:
        return None
    scale_vid, scale_index, scale_offset = scales[0]
    if scale_index is None:
        return None
    return NormAffine(out, node, shape, kind, scale_vid, scale_index, scale_offset, bias)


def _affine_factors(
    ctx: AnalysisContext, node: Node, shape: tuple[int, ...]
) -> tuple[str, list[ValueId], tuple[ValueId, int, np.ndarray] | None] | None:
    """``(kind, factors of the product, β)`` for ``add(product, β)`` with a
    per-channel parameter β (layernorm) or a bare product (rmsnorm); else None."""
    if node.primitive == "add" and len(node.inputs) == 2:
        for b, rest in ((node.inputs[1], node.inputs[0]), (node.inputs[0], node.inputs[1])):
            bias_index = per_channel_index(ctx, b, shape)
            if bias_index is not None:
                bias = (b, ctx.origin[b][0], bias_index)
                product = rest
                break
        else:
            return None
        if product not in ctx.producer or ctx.g.nodes[ctx.producer[product]].primitive != "mul":
            return None
        if len(ctx.consumers.get(product, ())) != 1:
            return None
        top = ctx.g.nodes[ctx.producer[product]]
        return "layernorm", product_factors(ctx, top.inputs[0]) + product_factors(ctx, top.inputs[1]), bias
    if node.primitive == "mul" and len(node.inputs) == 2:
        return "rmsnorm", product_factors(ctx, node.inputs[0]) + product_factors(ctx, node.inputs[1]), None
    return None


def _offset_scale(ctx: AnalysisContext, vid: ValueId) -> tuple[float, ValueId]:
    """``(c, γ)`` for a factor ``c + γ`` with a scalar constant ``c`` (Gemma's
    ``1 + scale``), else ``(0, vid)``."""
    src, _ = ctx.layout_source(vid)
    node = ctx.g.nodes[ctx.producer[src]] if src in ctx.producer else None
    if node is not None and node.primitive == "add" and len(node.inputs) == 2:
        for c, gamma in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            value = ctx.scalar_const(c)
            if value is not None and gamma in ctx.origin:
                return value, gamma
    return 0.0, vid


def fold_group(
    ctx: AnalysisContext,
    point: ActivationPoint,
    norm: NormAffine,
    found: tuple[list[FoldConsumer], str, str],
    weight_by_node: Mapping[NodeId, WeightSite],
) -> FoldGroup:
    """The fold group of ``norm``, whose output is ``point``, with its verdicts.

    Args:
      ctx: the analysis context.
      point: the activation point holding the norm's output.
      norm: the norm's affine (`find_norm`).
      found: what `fold_consumers` found for ``norm.out``: the consumers, why the norm
        must stay, and why the kernel half is illegal too.
      weight_by_node: the weight sites by matmul node.
    """
    consumers, norm_reason, matmul_reason = found
    scale_k = ctx.origin[norm.scale_id][0]
    # Named like weight sites, after the parameter (γ's module path): stable and the
    # same for Linen, NNX and plain JAX.
    name = site_name_from_path(ctx.g.param_paths[scale_k]) + suffix(norm.node.iteration)
    # The kernel half (branch fold, docs/method.md) needs legal kernel edits; the full fold also
    # needs the norm output to reach nothing but the consumers, and its own γ, β.
    branch_reason = matmul_reason or shared_leaf_reason(ctx, [], consumers, weight_by_node)
    if not consumers and not branch_reason:
        branch_reason = "feeds no weight matmul"
    edits: list[tuple[int, np.ndarray | None, ValueId, str]] = [(scale_k, norm.scale_index, norm.scale_id, "γ")]
    bias_k: int | None = None
    bias_index: np.ndarray | None = None
    if norm.bias is not None:
        b, bias_k, bias_index = norm.bias
        edits.append((bias_k, bias_index, b, "β"))
    reason = "; ".join(
        r for r in (norm_reason, branch_reason or shared_leaf_reason(ctx, edits, [], weight_by_node)) if r
    )
    return FoldGroup(
        name=name,
        point=point.name,
        kind=norm.kind,
        channels=norm.shape[-1],
        scale_param_index=scale_k,
        scale_index=norm.scale_index,
        scale_offset=norm.scale_offset,
        bias_param_index=bias_k,
        bias_index=bias_index,
        consumers=tuple(consumers),
        foldable=not reason,
        reason=reason,
        branch_foldable=not branch_reason,
        branch_reason=branch_reason,
    )


def fold_consumers(
    ctx: AnalysisContext,
    out: ValueId,
    shape: tuple[int, ...],
    point: ActivationPoint,
    weight_by_node: Mapping[NodeId, WeightSite],
) -> tuple[list[FoldConsumer], str, str]:
    """Follows every reader of ``out`` through channel-preserving ops; checks each is
    a weight matmul contracting over the channel axis, read through ``point``.

    Returns:
      ``(consumers, norm_reason, matmul_reason)``: the weight matmuls the fold edits,
      the readers that block the whole fold (the norm must stay), and the matmul
      readers that block the kernel half too.
    """
    channels = shape[-1]
    channel_ids = np.broadcast_to(np.arange(channels, dtype=np.int32), shape)
    consumers: list[FoldConsumer] = []
    reasons: list[str] = []  # readers that block the whole fold (the norm must stay)
    matmul_reasons: list[str] = []  # matmul readers that block the kernel half too
    if out in ctx.outputs:
        reasons.append("is an output of the function")
    stack = [(out, channel_ids)]
    while stack:
        vid, cid = stack.pop()
        if vid in ctx.outputs and vid != out:
            reasons.append("is an output of the function (through a reshape)")
        for i in ctx.consumers.get(vid, ()):
            successor = _channel_successor(ctx, vid, cid, i, channels)
            if successor is not None:
                stack.append(successor)
                continue
            consumer, reason, matmul_reason = _judge_reader(ctx, vid, cid, i, point, weight_by_node)
            if consumer is not None:
                consumers.append(consumer)
            if reason:
                reasons.append(reason)
            if matmul_reason:
                matmul_reasons.append(matmul_reason)
    return consumers, "; ".join(dict.fromkeys(reasons)), "; ".join(dict.fromkeys(matmul_reasons))


def _channel_successor(
    ctx: AnalysisContext, vid: ValueId, cid: np.ndarray, i: NodeId, channels: int
) -> tuple[ValueId, np.ndarray] | None:
    """Where reader ``i`` of ``vid`` carries the channels on, if it keeps them: its
    output and the channel id of each of its elements (``cid``: those of ``vid``)."""
    node = ctx.g.nodes[i]
    if node.primitive == "reduce_sum":  # a mean: reduce_sum then div by the count
        div_index = ctx.consumers.get(node.outputs[0], [None])[0]
        if div_index is not None and channel_step(ctx, div_index) == (vid, i):
            reduced = cid
            for axis in sorted(node.params["axes"], reverse=True):
                reduced = np.take(reduced, 0, axis=axis)
            return ctx.g.nodes[div_index].outputs[0], reduced
    if channel_step(ctx, i) == (vid, None):
        if len(node.inputs) == 1:
            return node.outputs[0], run_chain(ctx, cid, (i,))
        # a gather/dynamic slice over other axes: channel ids stay along the
        # last axis, if they were only there before
        if (cid == np.arange(channels, dtype=cid.dtype)).all():
            out_shape = ctx.g.avals[node.outputs[0]].shape
            return node.outputs[0], np.broadcast_to(np.arange(channels, dtype=np.int32), out_shape)
    return None


def _judge_reader(
    ctx: AnalysisContext,
    vid: ValueId,
    cid: np.ndarray,
    i: NodeId,
    point: ActivationPoint,
    weight_by_node: Mapping[NodeId, WeightSite],
) -> tuple[FoldConsumer | None, str, str]:
    """What reader ``i`` of ``vid``, which does not keep the channels, means for the
    fold: ``(consumer, "", "")`` for a weight matmul the fold can edit, ``(None,
    reason, "")`` for a reader that blocks the whole fold, ``(None, "", reason)`` for a
    matmul reader that blocks the kernel half too."""
    node = ctx.g.nodes[i]
    where = f"{node.primitive} at {scope(ctx, node) or node.name or '<top level>'}"
    site = weight_by_node.get(i)
    if site is not None and site.derived:
        return None, "", f"feeds {site.name}, whose weight is derived from its parameter"
    if site is None or node.inputs[site.weight_operand] == vid:
        kind = " (residual)" if node.primitive == "add" else ""
        return None, f"also feeds {where}{kind}", ""
    if ctx.layout_source(node.inputs[1 - site.weight_operand])[0] != point.value_id:
        return None, "", f"feeds {site.name} through another quantizer than {point.name}"
    consumer = fold_consumer(ctx, site, node, cid)
    if isinstance(consumer, str):
        return None, "", consumer
    return consumer, "", ""


def fold_consumer(ctx: AnalysisContext, site: WeightSite, node: Node, cid: np.ndarray) -> FoldConsumer | str:
    """The fold's edits of weight site ``site`` (matmul ``node``) whose activation
    operand has channel ids ``cid``, or why it cannot be folded into."""
    where = f"{site.name}"
    if node.primitive != "dot_general":
        return f"feeds a convolution at {where}"
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    x_op = 1 - site.weight_operand
    x_contract = lc if x_op == 0 else rc
    w_contract = rc if x_op == 0 else lc
    if lb or rb:
        return f"batched matmul at {where}"
    # channel id must depend only on the contracted axes of the activation operand
    moved = np.moveaxis(cid, x_contract, range(len(x_contract)))
    flat = moved.reshape(int(np.prod([cid.shape[a] for a in x_contract])), -1)
    if not (flat == flat[:, :1]).all():
        return f"contracts over an axis other than the channels at {where}"
    channel_of_k = flat[:, 0]
    if len(set(channel_of_k.tolist())) != len(channel_of_k):
        return f"reads a channel twice at {where}"
    assert site.kernel_index is not None  # only derived weights have none, and they are not folded
    kidx = np.moveaxis(site.kernel_index, w_contract, range(len(w_contract)))
    kidx = kidx.reshape(len(channel_of_k), -1)
    leaf_size = int(np.prod(ctx.g.avals[ctx.g.param_ids[site.param_index]].shape))
    # One entry per kernel element: the narrowest type that holds the channel ids (int16
    # for up to 32767 channels), since these maps outweigh the float32 kernels they index.
    row_channel = np.full(leaf_size, -1, dtype=np.int16 if channel_of_k.max() < 2**15 else np.int32)
    for k, c in enumerate(channel_of_k):
        already = row_channel[kidx[k]]
        if ((already != -1) & (already != c)).any():
            return f"kernel elements shared between channels at {where}"
        row_channel[kidx[k]] = c
    bias_k, bias_index, bias_node = _matmul_bias(ctx, node, site)
    return FoldConsumer(where, row_channel, bias_k, bias_index, channel_of_k, site.node, bias_node)


def _matmul_bias(
    ctx: AnalysisContext, node: Node, site: WeightSite
) -> tuple[int | None, np.ndarray | None, NodeId | None]:
    """Finds ``add(matmul_out, bias_param)`` right after the matmul (possibly through
    transposes and reshapes: a vmapped ``W @ x`` is transposed before its bias), and
    maps each output element of the weight to its flat bias index."""
    out = node.outputs[0]
    out_shape = ctx.g.avals[out].shape
    # flat matmul-output index of every element, carried along the layout chain
    position = np.arange(int(np.prod(out_shape)), dtype=np.int64).reshape(out_shape)
    vid: ValueId = out
    chain: list[NodeId] = []
    while True:
        readers = ctx.consumers.get(vid, ())
        if len(readers) != 1 or vid in ctx.outputs:
            return None, None, None
        reader = ctx.g.nodes[readers[0]]
        if reader.primitive not in ("transpose", "reshape", "convert_element_type", "copy") or len(reader.inputs) != 1:
            break
        chain.append(readers[0])
        vid = reader.outputs[0]
    add = reader
    if add.primitive != "add":
        return None, None, None
    other = add.inputs[1] if add.inputs[0] == vid else add.inputs[0]
    if other not in ctx.origin:
        return None, None, None
    add_shape = ctx.g.avals[vid].shape
    bias_at_add = param_probe(ctx, other)
    bias_at_add = np.broadcast_to(
        bias_at_add.reshape((1,) * (len(add_shape) - bias_at_add.ndim) + bias_at_add.shape), add_shape
    )
    position = run_chain(ctx, position, chain)
    probe = np.empty(position.size, dtype=bias_at_add.dtype)
    probe[position.reshape(-1)] = bias_at_add.reshape(-1)  # back into the matmul's layout
    probe = probe.reshape(out_shape)
    w_free = [d for d in range(len(site.weight_shape)) if d not in site.contracting]
    n_free = len(w_free)
    # dot_general output: (batch, lhs free, rhs free); the weight's free axes are the
    # trailing ones if the weight is rhs, the leading non-batch ones if lhs.
    if site.weight_operand == 1:
        free_axes = tuple(range(len(out_shape) - n_free, len(out_shape)))
    else:
        free_axes = tuple(range(n_free))
    moved = np.moveaxis(probe, free_axes, range(n_free)).reshape(int(np.prod([out_shape[a] for a in free_axes])), -1)
    if not (moved == moved[:, :1]).all():
        return None, None, None
    return ctx.origin[other][0], moved[:, 0], readers[0]
