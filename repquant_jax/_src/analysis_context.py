"""The per-graph context that every step of the site analysis (`sites.analyze`) reads.

One `AnalysisContext` is built per traced graph: who produces and who reads each value,
which values are a parameter leaf seen through layout-only ops (`origin`) or computed
from parameters alone (`derived_from`), and the site names the matmul step registers
for the later steps' messages. Its methods are the graph queries all steps share.
The concern modules (`site_names`, `param_leaves`, `softmax_finder`, `channels`,
`fold_groups`) take it as their first argument.
"""

from __future__ import annotations

import numpy as np

from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Graph
from repquant_jax._src.types import NodeId, ValueId

__all__ = ["AnalysisContext"]


class AnalysisContext:
    """Precomputed maps and shared queries over one traced graph.

    Attributes:
      g: the graph.
      root: the name-stack component every node has and parameter paths lack (Flax
        Linen's root module class name, `site_names.root_scope`), or ``""``.
      producer: index of the node producing each value id.
      consumers: indices of the nodes reading each value id.
      outputs: value ids of the function's outputs.
      origin: value id -> (param leaf index, chain of layout node indices from the leaf),
        for the leaves and every value layout-only ops make of one.
      derived_from: value id -> the first leaf it derives from, for every value computed
        from parameters (and constants) only.
      weight_names: weight matmul node -> site name, filled as the weight sites are found.
      site_names: matmul node -> site name, for messages; set once all matmul sites are
        found.
      leaf_use_cache: the readers of each parameter leaf (`param_leaves.leaf_uses`), by
        leaf index.
    """

    def __init__(self, graph: Graph, root: str = ""):
        self.g = graph
        self.root = root
        self.producer = graph.producers()
        self.consumers = graph.consumers()
        self.outputs = set(graph.output_ids)
        # value id -> (param leaf index, chain of layout node indices from the leaf)
        self.origin: dict[ValueId, tuple[int, tuple[NodeId, ...]]] = {
            vid: (k, ()) for k, vid in enumerate(graph.param_ids)
        }
        for i, node in enumerate(graph.nodes):
            if node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1:
                src = self.origin.get(node.inputs[0])
                if src is not None:
                    self.origin[node.outputs[0]] = (src[0], src[1] + (NodeId(i),))
        # Values computed from parameters (and constants) only, with the first leaf each
        # derives from: a matmul operand among them is a (derived) weight.
        inputs = set(graph.input_ids)
        self.derived_from: dict[ValueId, int] = {vid: k for k, vid in enumerate(graph.param_ids)}
        for node in graph.nodes:
            if any(v in inputs for v in node.inputs):
                inputs.update(node.outputs)
                continue
            leaves = [self.derived_from[v] for v in node.inputs if v in self.derived_from]
            if leaves:
                for v in node.outputs:
                    self.derived_from[v] = leaves[0]
        self.leaf_use_cache: dict[int, list[tuple[NodeId, np.ndarray | None]]] = {}
        self.site_names: dict[NodeId, str] = {}  # matmul node -> site name, for messages
        self.weight_names: dict[NodeId, str] = {}  # weight matmul node -> site name

    def layout_source(self, vid: ValueId) -> tuple[ValueId, tuple[NodeId, ...]]:
        """Walks back through layout ops: (source value id, chain of node indices)."""
        chain: list[NodeId] = []
        while vid in self.producer:
            i = self.producer[vid]
            node = self.g.nodes[i]
            if node.primitive not in LAYOUT_PRIMITIVES or len(node.inputs) != 1:
                break
            chain.append(i)
            vid = node.inputs[0]
        return vid, tuple(reversed(chain))

    def scalar_const(self, vid: ValueId) -> float | None:
        """The value of a constant that is one number broadcast (through broadcasts,
        casts and reshapes), else None."""
        src, _ = self.layout_source(vid)
        if src not in self.g.consts:
            return None
        value = np.asarray(self.g.consts[src])
        return float(value.reshape(-1)[0]) if value.size == 1 else None
