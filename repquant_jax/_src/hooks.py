"""The interpreter `Hooks` that turn a traced float model into its quantized form.

Built once from `QParams` and composed by `qapply`, the report, reconstruction and the
export (which adds integer matmul functions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from repquant_jax._src import quantizers as qz
from repquant_jax._src.fold import weight_from_matrix, weight_matrix
from repquant_jax._src.graph import Graph
from repquant_jax._src.interpret import Hook, Hooks, OperandHook
from repquant_jax._src.sites import Plan, WeightSite
from repquant_jax._src.state import QParams
from repquant_jax._src.types import NodeId, ValueId

__all__ = [
    "affine_input",
    "fake_quant_weight",
    "weight_operand_hook",
    "check_sites_exist",
    "point_hook",
    "offset_rewrite",
    "quant_hooks",
]


def affine_input(value: Any, scale: Any, offset: Any) -> Any:
    """``value * scale + offset`` per channel (either may be None): what a fold puts in
    front of a point's quantizer."""
    if scale is not None:
        value = value * scale.astype(value.dtype)
    if offset is not None:
        value = value + offset.astype(value.dtype)
    return value


def fake_quant_weight(view: Any, qp: qz.QuantParams, contracting: tuple[int, ...]) -> Any:
    """Fake-quantizes a weight as its matmul sees it, per output channel."""
    matrix = weight_matrix(view, contracting)
    return weight_from_matrix(qz.fake_quant(matrix, qp), view.shape, contracting)


def weight_operand_hook(w: WeightSite, quantize: Callable[[Any], Any]) -> OperandHook:
    """An operand hook replacing the weight operand of site ``w`` by
    ``quantize(weight)``. Hooks sit on the matmul, not on the weight's value, so sites
    reading one value (a kernel used twice, a scan over closed-over weights) each have
    their own quantizer."""

    def hook(args):
        quantized = quantize(args[0][w.weight_operand])  # the weight is the same in every batch
        return [[quantized if i == w.weight_operand else v for i, v in enumerate(a)] for a in args]

    return hook


def check_sites_exist(plan: Plan, weights: Mapping[str, Any], activations: Mapping[str, Any], holder: str) -> None:
    """Raises if quantizer state names sites that this trace of the model lacks."""
    known = {w.name for w in plan.weights} | {p.name for p in plan.points}
    stale = (set(weights) | set(activations)) - known
    if stale:
        raise ValueError(
            f"{holder} contain quantizers for sites this call does not have: {sorted(stale)[:5]}; "
            "was the model or its input structure changed after transform?"
        )


def point_hook(qp: qz.QuantParams | None, scale: Any, offset: Any) -> Hook:
    """The hook of an activation point: the fold's input scale and offset, then the
    fake quantizer (none for the folded float model)."""

    def hook(values):
        values = [affine_input(v, scale, offset) for v in values]
        return values if qp is None else [qz.fake_quant(v, qp).astype(v.dtype) for v in values]

    return hook


def offset_rewrite(offset: Any) -> Hook:
    """The rewrite adding a fold's output offset to a matmul's output."""
    return lambda values: [v + offset.astype(v.dtype) for v in values]


def quant_hooks(graph: Graph, plan: Plan, qparams: QParams, *, quantize: bool = True) -> Hooks:
    """The fake-quant model as `Hooks`: weight quantizers on their matmuls, activation
    quantizers (after the fold's input scale and offset) on their points, and the
    fold's output offsets.

    Sites of the plan without state in ``qparams`` stay float; state without a site
    raises, since it means the model traced differently from when it was calibrated.

    Args:
      graph: the traced model.
      plan: its sites.
      qparams: from `transform`.
      quantize: False gives the folded float model: offsets on, quantizers off.
    """
    check_sites_exist(plan, qparams.weights, qparams.activations, "qparams")
    values: dict[ValueId, Hook] = {}
    rewrites: dict[ValueId, Hook] = {}
    operands: dict[NodeId, OperandHook] = {}
    for w in plan.weights:
        if w.name in qparams.weights and quantize:
            quantize_weight = functools.partial(
                fake_quant_weight, qp=qparams.weights[w.name], contracting=w.contracting
            )
            operands[w.node] = weight_operand_hook(w, quantize_weight)
        if w.name in qparams.output_offsets:
            rewrites[graph.nodes[w.node].outputs[0]] = offset_rewrite(qparams.output_offsets[w.name])
    for p in plan.points:
        qp = qparams.activations.get(p.name) if quantize else None
        scale, offset = qparams.input_scales.get(p.name), qparams.input_offsets.get(p.name)
        if qp is not None or offset is not None or scale is not None:
            values[p.value_id] = point_hook(qp, scale, offset)
    return Hooks(values=values, rewrites=rewrites, operands=operands)
