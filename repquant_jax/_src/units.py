"""Reconstruction units: contiguous node ranges of a traced graph between two values of
the residual stream (a transformer block, or a sub-block).

A cut between two nodes is a *stream cut* when the fewest input-dependent values are
live across it (in a transformer: the residual stream alone). Side inputs, values made
before the first weight matmul and still read after the second softmax (an attention
mask that every block reads, the mask a final pooling reads), are not counted: they are
live across most cuts but not all, and counting them would leave only the cuts after
their last read (in a post-LN BERT with mean pooling: none between its blocks). Sub-blocks are the ranges between stream cuts, merged so each
holds a weight matmul; a block starts at each sub-block that holds a softmax (its
attention) and takes the sub-blocks after it (its MLP, a final head).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from repquant_jax._src.graph import Graph
from repquant_jax._src.site_records import ActivationMatmul, ActivationPoint, Softmax, WeightSite
from repquant_jax._src.types import ValueId

__all__ = ["Unit", "find_units"]


class Sites(Protocol):
    """The sites a unit search reads (a `repquant_jax._src.sites.Plan` has them)."""

    @property
    def weights(self) -> Sequence[WeightSite]: ...
    @property
    def matmuls(self) -> Sequence[ActivationMatmul]: ...
    @property
    def points(self) -> Sequence[ActivationPoint]: ...
    @property
    def softmaxes(self) -> Sequence[Softmax]: ...


@dataclasses.dataclass(frozen=True)
class Unit:
    """One reconstruction unit.

    Attributes:
      name: ``"block 3"`` or ``"sub-block 7"``.
      start, stop: its node range ``start .. stop - 1``.
      inputs: input-dependent values it reads that are defined before it.
      outputs: values it defines that are read after it (or are graph outputs).
      weights: its weight sites (by name).
      points: activation points read by its matmuls (by name).
    """

    name: str
    start: int
    stop: int
    inputs: tuple[ValueId, ...]
    outputs: tuple[ValueId, ...]
    weights: tuple[str, ...]
    points: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}: nodes {self.start}..{self.stop - 1}, {len(self.weights)} weight matmuls"


def _input_dependent(graph: Graph) -> set[ValueId]:
    dep = set(graph.input_ids)
    for node in graph.nodes:
        if any(v in dep for v in node.inputs):
            dep.update(node.outputs)
    return dep


def _side_inputs(graph: Graph, dep: set[ValueId], producers: Mapping[ValueId, int], plan: Sites) -> set[ValueId]:
    """Input-dependent values made before the first weight matmul and read after the
    second softmax (see the module docstring); none with fewer than two softmaxes."""
    softmax_nodes = sorted(s.node for s in plan.softmaxes)
    if len(softmax_nodes) < 2 or not plan.weights:
        return set()
    first_weight = min(w.node for w in plan.weights)
    read_late = {v for node in graph.nodes[softmax_nodes[1] + 1 :] for v in node.inputs} | set(graph.output_ids)
    return {v for v in dep & read_late if producers.get(v, -1) < first_weight}


def _live_counts(graph: Graph, dep: set[ValueId], producers: Mapping[ValueId, int]) -> np.ndarray:
    """``counts[c]``: values of ``dep`` live across the cut before node ``c``."""
    n = len(graph.nodes)
    last = {v: i for i, node in enumerate(graph.nodes) for v in node.inputs}
    for v in graph.output_ids:
        last[v] = n
    delta = np.zeros(n + 2, np.int64)
    for v in dep:
        if v in last:
            first_cut = producers.get(v, -1) + 1
            delta[first_cut] += 1
            delta[last[v] + 1] -= 1
    return np.cumsum(delta)[: n + 1]


def _boundary(graph: Graph, dep: set[ValueId], producers: Mapping[ValueId, int], start: int, stop: int):
    """Inputs and outputs of the node range ``start .. stop - 1``."""
    reads_after = {v for node in graph.nodes[stop:] for v in node.inputs} | set(graph.output_ids)
    inputs: list[ValueId] = []
    outputs: list[ValueId] = []
    for i in range(start, stop):
        for v in graph.nodes[i].inputs:
            if v in dep and producers.get(v, -1) < start and v not in inputs:
                inputs.append(v)
        outputs.extend(v for v in graph.nodes[i].outputs if v in reads_after)
    return tuple(inputs), tuple(outputs)


def find_units(
    graph: Graph, plan: Sites, granularity: Literal["block", "sub_block", "model"] = "block"
) -> tuple[Unit, ...]:
    """The graph's reconstruction units, in forward order, covering every node.

    Args:
      graph: the traced model.
      plan: its sites.
      granularity: one unit per transformer block, per sub-block, or the whole graph.

    Returns:
      The units; a single one when the graph has no stream cut.
    """
    producers = graph.producers()
    dep = _input_dependent(graph)
    counts = _live_counts(graph, dep - _side_inputs(graph, dep, producers, plan), producers)
    weight_nodes = sorted(w.node for w in plan.weights)
    n = len(graph.nodes)
    if not weight_nodes:
        return ()
    inner = range(weight_nodes[0] + 1, weight_nodes[-1] + 1)
    fewest = min((counts[c] for c in inner), default=None)
    cuts = [c for c in inner if counts[c] == fewest]
    # ranges between cuts, each holding a weight matmul (empty ones join the next)
    bounds, begin = [], 0
    for c in cuts + [n]:
        if any(begin <= w < c for w in weight_nodes):
            bounds.append((begin, c))
            begin = c
    if bounds and bounds[-1][1] != n:
        bounds[-1] = (bounds[-1][0], n)
    if granularity == "model":
        bounds = [(0, n)]
    elif granularity == "block":
        softmax_nodes = [s.node for s in plan.softmaxes]
        blocks: list[tuple[int, int]] = []
        for start, stop in bounds:
            opens = any(start <= s < stop for s in softmax_nodes)
            has_softmax = blocks and any(blocks[-1][0] <= s < blocks[-1][1] for s in softmax_nodes)
            if blocks and not (opens and has_softmax):
                blocks[-1] = (blocks[-1][0], stop)
            else:
                blocks.append((start, stop))
        bounds = blocks
    label = {"block": "block", "sub_block": "sub-block", "model": "model"}[granularity]
    readers = {}
    for p in plan.points:
        readers[p.name] = set(p.readers)
    units = []
    for k, (start, stop) in enumerate(bounds):
        inputs, outputs = _boundary(graph, dep, producers, start, stop)
        weights = tuple(w.name for w in plan.weights if start <= w.node < stop)
        matmuls = set(weights) | {m.name for m in plan.matmuls if start <= m.node < stop}
        points = tuple(p.name for p in plan.points if readers[p.name] & matmuls)
        units.append(Unit(f"{label} {k}", start, stop, inputs, outputs, weights, points))
    return tuple(units)
