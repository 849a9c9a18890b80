"""Find quantization sites in a traced `Graph` and prove which norm folds are legal.

The result, a `Plan`, is plain data: printable as a table, matchable by name rules,
testable on its own. What it finds (docs/method.md, "What gets quantized"):

* `WeightSite`: a ``dot_general``/``conv_general_dilated`` with one operand derived from
  a parameter leaf through layout-only ops. Named by the parameter's tree path without
  the ``params`` collection and the ``kernel`` leaf name (``"Block_0/attn/query"``).
* `ActivationMatmul`: a ``dot_general`` of two activations (q·kᵀ, attn·V).
* `ActivationPoint`: a value that matmuls read as their activation operand. It is
  quantized once, where it is produced, and every matmul reading it sees the same
  quantized value (LN1's output feeds q, k and v through one quantizer). Named after the
  first matmul that reads it: ``"Block_0/attn/query:input"``, ``"...:lhs"``, ``"...:rhs"``.
* `Softmax`: ``exp(x - max) / sum(exp(x - max))`` along an axis, and the point it feeds.
* `FoldGroup`: a per-channel affine whose scale (and bias, for LayerNorm) are parameters,
  producing an activation point. It is *foldable* (docs/method.md, "Folding a norm") only if
  every reader of its output is a weight matmul contracting over the channel axis; otherwise `reason`
  says which consumer prevents it.

Index maps ("probes") are computed by running the layout-only chain between a parameter
leaf and its use on an array of flat indices, so the fold in `fold.py` can edit the
parameter leaf itself, whatever reshapes and transposes the model applies to it.

The analysis is split by concern, each module taking the shared per-graph
`AnalysisContext` (`analysis_context.py`): site naming (`site_names.py`), parameter-leaf
tracking and legality (`param_leaves.py`), softmax detection (`softmax_finder.py`),
channel tracking (`channels.py`) and norm fold groups (`fold_groups.py`). This module
keeps the `Plan`, `analyze` and the order of the steps (`_Analysis`); the records are
defined in `site_records.py` and re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from repquant_jax._src import fold_groups
from repquant_jax._src.analysis_context import AnalysisContext
from repquant_jax._src.graph import Graph, Node
from repquant_jax._src.param_leaves import other_readers, param_probe, weight_elements
from repquant_jax._src.site_names import root_scope, site_name, site_name_from_path, suffix
from repquant_jax._src.site_records import (
    ActivationMatmul,
    ActivationPoint,
    FoldConsumer,
    FoldGroup,
    Softmax,
    WeightSite,
)
from repquant_jax._src.softmax_finder import find_softmaxes, softmax_source
from repquant_jax._src.types import MATMUL_PRIMITIVES, NodeId, ValueId
from repquant_jax._src.units import Unit, find_units

__all__ = [
    "WeightSite",
    "ActivationMatmul",
    "ActivationPoint",
    "Softmax",
    "FoldConsumer",
    "FoldGroup",
    "Plan",
    "analyze",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything the analysis found in one traced function.

    ``blocks`` and ``sub_blocks`` are the reconstruction units (`units.find_units`):
    contiguous node ranges between two values of the residual stream.
    """

    weights: tuple[WeightSite, ...]
    matmuls: tuple[ActivationMatmul, ...]
    points: tuple[ActivationPoint, ...]
    softmaxes: tuple[Softmax, ...]
    groups: tuple[FoldGroup, ...]
    notes: tuple[str, ...] = ()
    blocks: tuple[Unit, ...] = ()
    sub_blocks: tuple[Unit, ...] = ()

    def point(self, name: str) -> ActivationPoint:
        """The activation point called ``name``."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"no activation point named {name!r}")

    def weight(self, name: str) -> WeightSite:
        """The weight site called ``name``."""
        for w in self.weights:
            if w.name == name:
                return w
        raise KeyError(f"no weight site named {name!r}")

    def summary(self) -> dict[str, int]:
        """Counts of each kind of site."""
        return {
            "weight_matmuls": len(self.weights),
            "activation_matmuls": len(self.matmuls),
            "activation_points": len(self.points),
            "softmaxes": len(self.softmaxes),
            "fold_groups": len(self.groups),
            "foldable": sum(g.foldable for g in self.groups),
            "branch_foldable": sum(g.branch_foldable and not g.foldable for g in self.groups),
        }

    def __str__(self) -> str:
        rows = [("site", "kind", "shape", "detail")]
        for w in self.weights:
            rows.append((w.name, "weight", _shape(w.weight_shape), f"reads {w.input_point}"))
        for m in self.matmuls:
            rows.append((m.name, "act-matmul", "", f"{m.lhs_point} x {m.rhs_point}"))
        for p in self.points:
            detail = p.source + (f", group {p.fold_group}" if p.fold_group else "")
            rows.append((p.name, "activation", _shape(p.shape), detail))
        for s in self.softmaxes:
            rows.append((s.name, "softmax", "", f"axis {s.axis} -> {s.point}"))
        for g in self.groups:
            if g.foldable:
                verdict = "foldable"
            elif g.branch_foldable:
                verdict = f"branch-foldable (kernels only; the norm stays: {g.reason})"
            else:
                verdict = f"NOT foldable: {g.reason}"
            targets = ",".join(c.site for c in g.consumers)
            rows.append((g.name, f"fold:{g.kind}", f"C={g.channels}", f"-> {{{targets}}} {verdict}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        counts = ", ".join(f"{k}={v}" for k, v in self.summary().items())
        units = [
            f"reconstruction unit {u} ({sum(u.start <= v.start < u.stop for v in self.sub_blocks)} sub-blocks)"
            for u in self.blocks
        ]
        return "\n".join(lines + [counts] + units + [f"note: {n}" for n in self.notes])


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class _Analysis:
    """The analysis of one graph, step by step (`run`); each step reads what the steps
    before it found.

    The steps, in order: the matmul sites (weight sites and activation matmuls, which
    registers the values they read), the softmaxes, one activation point per value read,
    the point names filled in on the sites, and the norm fold groups behind the points.
    """

    def __init__(self, graph: Graph):
        self.g = graph
        self.ctx = AnalysisContext(graph, root_scope(graph))
        self.notes: list[str] = []
        # source value id -> list of (reader site name, role)
        self.readers: dict[ValueId, list[tuple[str, str]]] = {}
        self._used_names: dict[str, int] = {}

    def unique(self, name: str) -> str:
        """``name``, or ``name#2``, ``name#3``, ... for the later sites given the same one."""
        n = self._used_names.get(name, 0)
        self._used_names[name] = n + 1
        return name if n == 0 else f"{name}#{n + 1}"

    def run(self) -> Plan:
        """All the steps: the `Plan` of the graph."""
        weights, act_matmuls = self._find_matmuls()
        softmaxes = find_softmaxes(self.ctx, self.unique)
        softmax_out = {self.g.nodes[s.node].outputs[0]: s for s in softmaxes}
        points, point_of = self._find_points(softmax_out)
        weights, act_matmuls = self._link_sites(weights, act_matmuls, point_of)
        softmaxes = self._link_softmaxes(softmaxes, point_of, softmax_out)
        groups = self._find_groups(points, {w.node: w for w in weights})
        group_of = {grp.point: grp.name for grp in groups}
        points = [
            dataclasses.replace(p, source="norm", fold_group=group_of[p.name]) if p.name in group_of else p
            for p in points
        ]
        plan = Plan(
            tuple(weights), tuple(act_matmuls), tuple(points), tuple(softmaxes), tuple(groups), tuple(self.notes)
        )
        blocks, sub_blocks = find_units(self.g, plan, "block"), find_units(self.g, plan, "sub_block")
        return dataclasses.replace(plan, blocks=blocks, sub_blocks=sub_blocks)

    # -- matmul sites ------------------------------------------------------------------
    def _find_matmuls(self) -> tuple[list[WeightSite], list[ActivationMatmul]]:
        """Every matmul with a contracted axis, in graph order: a weight site where one
        operand derives from a parameter, an activation matmul where neither does. Their
        points are filled in later (`_link_sites`)."""
        weights: list[WeightSite] = []
        act_matmuls: list[ActivationMatmul] = []
        for index, node in enumerate(self.g.nodes):
            i = NodeId(index)
            if node.primitive not in MATMUL_PRIMITIVES:
                continue
            lhs, rhs = node.inputs[:2]
            if node.primitive == "dot_general" and not node.params["dimension_numbers"][0][0]:
                continue  # an einsum without a contracted axis is an elementwise product
            is_param = [v in self.ctx.derived_from for v in (lhs, rhs)]
            if all(is_param):
                self.notes.append(f"matmul of two parameters at {node.name!r} left in float")
                continue
            if any(is_param):
                site = self._weight_site(i, node, 0 if is_param[0] else 1)
                if site is not None:
                    weights.append(site)
            else:
                act_matmuls.append(self._activation_matmul(i, node))
        self.ctx.site_names = {w.node: w.name for w in weights} | {m.node: m.name for m in act_matmuls}
        return weights, act_matmuls

    def _weight_site(self, i: NodeId, node: Node, w_op: int) -> WeightSite | None:
        """The weight site of matmul ``i``, whose operand ``w_op`` derives from a
        parameter; None (and a note) for a convolution of a parameter by a kernel."""
        g = self.g
        w_id, x_id = node.inputs[w_op], node.inputs[1 - w_op]
        derived = w_id not in self.ctx.origin
        k = self.ctx.derived_from[w_id]
        path = g.param_paths[k]
        name = self.unique(site_name_from_path(path) + suffix(node.iteration))
        self.ctx.weight_names[i] = name
        if derived:
            self.notes.append(
                f"{name}: its weight is computed from {path} by more than layout ops; "
                "quantized as a weight where the matmul reads it (no fold, freeze or "
                "integer export of the leaf)"
            )
        contracting = self._contracting(node, w_op, w_id)
        if contracting is None:
            self.notes.append(f"conv with a parameter as its input at {name!r} left in float")
            return None
        src, _ = self.ctx.layout_source(x_id)
        self.readers.setdefault(src, []).append((name, "input"))
        return WeightSite(
            name=name,
            node=i,
            param_path=path,
            param_index=k,
            weight_operand=w_op,
            weight_id=w_id,
            weight_shape=tuple(g.avals[w_id].shape),
            contracting=contracting,
            input_point="",  # filled by _link_sites
            output_ndim=len(g.avals[node.outputs[0]].shape),
            kernel_index=None if derived else param_probe(self.ctx, w_id),
            derived=derived,
            owns_leaf=not derived,
        )

    def _contracting(self, node: Node, w_op: int, w_id: ValueId) -> tuple[int, ...] | None:
        """The axes of the weight value ``w_id`` that the matmul reduces; None for a
        convolution whose parameter is its input rather than its kernel."""
        if node.primitive == "dot_general":
            (lc, rc), _ = node.params["dimension_numbers"]
            return tuple(lc if w_op == 0 else rc)
        # conv: kernel spec (out, in, spatial...) -> reduce all but out
        rhs_spec = node.params["dimension_numbers"].rhs_spec
        if w_op != 1:
            return None
        return tuple(d for d in range(len(self.g.avals[w_id].shape)) if d != rhs_spec[0])

    def _activation_matmul(self, i: NodeId, node: Node) -> ActivationMatmul:
        """The matmul ``i`` of two activations; its points are filled in later."""
        lhs, rhs = node.inputs[:2]
        name = self.unique(site_name(self.ctx, node, "matmul", i))
        for role, v in (("lhs", lhs), ("rhs", rhs)):
            src, _ = self.ctx.layout_source(v)
            self.readers.setdefault(src, []).append((name, role))
        return ActivationMatmul(name, i, "", "")

    # -- activation points -------------------------------------------------------------
    def _find_points(self, softmax_out: Mapping[ValueId, Softmax]) -> tuple[list[ActivationPoint], dict[ValueId, str]]:
        """One activation point per value the matmuls read, in graph order, named after
        its first reader; and the point name of each such value."""
        g = self.g
        input_ids = set(g.input_ids)
        points: list[ActivationPoint] = []
        point_of: dict[ValueId, str] = {}
        for src, rs in sorted(self.readers.items(), key=lambda kv: self._order(kv[0])):
            first, role = rs[0]
            pname = f"{first}:{role}"
            point_of[src] = pname
            source = (
                "softmax"
                if softmax_source(self.ctx, src, softmax_out) is not None
                else "input"
                if src in input_ids
                else "other"
            )
            points.append(ActivationPoint(pname, src, tuple(g.avals[src].shape), tuple(r for r, _ in rs), source))
        return points, point_of

    def _order(self, vid: ValueId) -> int:
        return self.ctx.producer.get(vid, -1)

    def _link_sites(
        self, weights: list[WeightSite], act_matmuls: list[ActivationMatmul], point_of: Mapping[ValueId, str]
    ) -> tuple[list[WeightSite], list[ActivationMatmul]]:
        """The sites with their point names filled in."""
        g = self.g
        source = self.ctx.layout_source
        # Fill in the point names on sites, and whether each owns what it reads.
        weights = [
            dataclasses.replace(
                w,
                input_point=point_of[source(g.nodes[w.node].inputs[1 - w.weight_operand])[0]],
                owns_leaf=w.owns_leaf
                and not other_readers(self.ctx, w.param_index, weight_elements(self.ctx, w), {w.node}),
            )
            for w in weights
        ]
        act_matmuls = [
            ActivationMatmul(
                m.name,
                m.node,
                point_of[source(g.nodes[m.node].inputs[0])[0]],
                point_of[source(g.nodes[m.node].inputs[1])[0]],
            )
            for m in act_matmuls
        ]
        return weights, act_matmuls

    def _link_softmaxes(
        self, softmaxes: list[Softmax], point_of: Mapping[ValueId, str], softmax_out: Mapping[ValueId, Softmax]
    ) -> list[Softmax]:
        """The softmaxes with the point they feed (the first one, in graph order)."""
        point_of_softmax: dict[str, str] = {}
        for src, pname in point_of.items():
            found = softmax_source(self.ctx, src, softmax_out)
            if found is not None:
                point_of_softmax.setdefault(found.name, pname)
        return [dataclasses.replace(s, point=point_of_softmax.get(s.name)) for s in softmaxes]

    # -- fold groups -------------------------------------------------------------------
    def _find_groups(
        self, points: Sequence[ActivationPoint], weight_by_node: Mapping[NodeId, WeightSite]
    ) -> list[FoldGroup]:
        """The fold group behind each point that a norm produces, in point order."""
        groups = []
        for p in points:
            group = self._fold_group(p, weight_by_node)
            if group is not None:
                groups.append(group)
        return groups

    def _fold_group(self, point: ActivationPoint, weight_by_node: Mapping[NodeId, WeightSite]) -> FoldGroup | None:
        """The norm producing ``point``, the matmuls reading it, and the verdicts."""
        norm = fold_groups.find_norm(self.ctx, point)
        if norm is None:
            return None
        found = self._fold_consumers(norm.out, norm.shape, point, weight_by_node)
        return fold_groups.fold_group(self.ctx, point, norm, found, weight_by_node)

    def _fold_consumers(
        self,
        out: ValueId,
        shape: tuple[int, ...],
        point: ActivationPoint,
        weight_by_node: Mapping[NodeId, WeightSite],
    ) -> tuple[list[FoldConsumer], str, str]:
        """The weight matmuls reading the norm output ``out``, why the norm must stay, and
        why the kernel half cannot be folded either (`fold_groups.fold_consumers`)."""
        return fold_groups.fold_consumers(self.ctx, out, shape, point, weight_by_node)


def analyze(graph: Graph) -> Plan:
    """Finds all quantization sites and fold groups of a traced graph.

    Example:
      >>> import jax.numpy as jnp
      >>> from repquant_jax._src.graph import trace
      >>> g = trace(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
      >>> analyze(g).summary()["weight_matmuls"]
      1
    """
    return _Analysis(graph).run()
