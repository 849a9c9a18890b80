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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from repquant_jax._src.graph import LAYOUT_PRIMITIVES, Graph
from repquant_jax._src.types import MATMUL_PRIMITIVES, NodeId, ValueId

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
class WeightSite:
    """A matmul with a parameter operand.

    Attributes:
      name: site name, from the parameter path (``"Block_0/fc1"``).
      node: index of the matmul node in the graph.
      param_path: tree path of the parameter leaf.
      param_index: index of the leaf in flatten order.
      weight_operand: 0 or 1, which operand of the matmul is the parameter.
      weight_id: value id of the weight as the matmul reads it (the hook point).
      weight_shape: shape of that value.
      contracting: axes of the weight value that are reduced (the rest are output
        channels, each quantized with its own scale).
      input_point: name of the `ActivationPoint` of the other operand.
      output_ndim: rank of the matmul's output.
      kernel_index: for each element of the weight value, its flat index in the leaf;
        None for a derived weight.
      derived: the weight is computed from the parameter by more than layout ops
        (``W * mask``, ``dynamic_slice(W)``, ``W + A @ B``): it is quantized as a weight
        where the matmul reads it, but nothing can be written back into the leaf
        (no fold into it, no freeze, no integer export of the leaf).
      owns_leaf: no other operation reads the leaf elements this matmul reads, so the
        quantized weight can replace them in the params (`QApply.freeze`,
        reconstruction).
    """

    name: str
    node: NodeId
    param_path: str
    param_index: int
    weight_operand: int
    weight_id: ValueId
    weight_shape: tuple[int, ...]
    contracting: tuple[int, ...]
    input_point: str
    output_ndim: int
    kernel_index: np.ndarray | None = dataclasses.field(repr=False)
    derived: bool = False
    owns_leaf: bool = True


@dataclasses.dataclass(frozen=True)
class ActivationMatmul:
    """A matmul of two activations (``q @ k.T``, ``attn @ v``)."""

    name: str
    node: NodeId
    lhs_point: str
    rhs_point: str


@dataclasses.dataclass(frozen=True)
class ActivationPoint:
    """A value read by matmuls as an activation operand, quantized once.

    Attributes:
      name: ``"<first reader>:input|lhs|rhs"``.
      value_id: the value id where the quantizer is applied (the hook point).
      shape: its shape at trace time.
      readers: names of the matmul sites that read it.
      source: ``"softmax"``, ``"norm"`` (a fold group's output), ``"input"`` (a function
        input) or ``"other"``.
      fold_group: name of the fold group producing it, if any.
    """

    name: str
    value_id: ValueId
    shape: tuple[int, ...]
    readers: tuple[str, ...]
    source: str
    fold_group: str | None = None


@dataclasses.dataclass(frozen=True)
class Softmax:
    """A softmax and the activation point (if any) its output is."""

    name: str
    node: NodeId
    axis: int
    point: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class FoldConsumer:
    """One weight matmul reading a fold group's output, with what the fold must edit.

    Attributes:
      site: the weight site name.
      row_channel: for each flat element of the kernel leaf, the input channel its row
        belongs to, or -1 where this matmul does not use the element.
      bias_param_index: leaf index of the bias added right after the matmul, or None.
      bias_index: for each output element of the matmul's weight (its non-contracted
        axes, flattened), the flat index into the bias leaf; None without a bias.
      contract_channel: channel of each contracted element (flattened contracted axes
        of the weight value, in the weight's axis order).
      node: index of the matmul node.
      bias_node: index of the ``add`` node adding the bias, or None.
    """

    site: str
    row_channel: np.ndarray = dataclasses.field(repr=False)
    bias_param_index: int | None
    bias_index: np.ndarray | None = dataclasses.field(repr=False)
    contract_channel: np.ndarray = dataclasses.field(repr=False)
    node: NodeId = NodeId(-1)
    bias_node: NodeId | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class FoldGroup:
    """A per-channel affine (LayerNorm, RMSNorm) feeding weight matmuls.

    Attributes:
      name: the norm's module path (``"Block_0/ln1"``).
      point: the activation point holding its output.
      kind: ``"layernorm"`` (scale and bias) or ``"rmsnorm"`` (scale only).
      channels: number of channels (last axis of the output).
      scale_param_index, scale_index: leaf and flat index of γ for each channel.
      scale_offset: the norm multiplies by ``scale_offset + γ`` (Gemma's RMSNorm uses
        ``x * (1 + γ)``); 0 for a plain ``x * γ``.
      bias_param_index, bias_index: same for β (None for rmsnorm).
      consumers: the weight matmuls reading the output.
      foldable: whether the whole fold is legal (docs/method.md, "Folding a norm"):
        the output reaches nothing but the consumers, and no leaf the fold edits is
        read elsewhere.
      reason: why not, when not foldable.
      branch_foldable: whether the kernel half alone is legal ("Branch fold"): the
        consumers' kernels and biases may be edited, so the matmul branch can get a
        per-tensor quantizer while the norm (and the residual it feeds) is unchanged.
      branch_reason: why not, when not.
    """

    name: str
    point: str
    kind: str
    channels: int
    scale_param_index: int
    scale_index: np.ndarray = dataclasses.field(repr=False)
    scale_offset: float = 0.0
    bias_param_index: int | None = None
    bias_index: np.ndarray | None = dataclasses.field(default=None, repr=False)
    consumers: tuple[FoldConsumer, ...] = ()
    foldable: bool = False
    reason: str = ""
    branch_foldable: bool = False
    branch_reason: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything the analysis found in one traced function."""

    weights: tuple[WeightSite, ...]
    matmuls: tuple[ActivationMatmul, ...]
    points: tuple[ActivationPoint, ...]
    softmaxes: tuple[Softmax, ...]
    groups: tuple[FoldGroup, ...]
    notes: tuple[str, ...] = ()

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
        return "\n".join(lines + [counts] + [f"note: {n}" for n in self.notes])


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


_METHOD = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*")
_EINSUM_SPEC = re.compile(r"([\w.,]+->[\w.]+)")


def _is_transform(part: str) -> bool:
    """A name-stack entry recorded by a transformation or an einsum, not a module."""
    return "->" in part or re.fullmatch(r"\w+\(.*\)", part) is not None


def _suffix(iteration: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" for i in iteration)


def _site_name_from_path(path: str) -> str:
    parts = path.split("/")
    if len(parts) > 1 and parts[0] in ("params", "param"):
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in ("kernel", "weight", "embedding", "scale"):
        parts = parts[:-1]
    return "/".join(parts)


class _Analysis:
    def __init__(self, graph: Graph):
        self.g = graph
        self.root = _root_scope(graph)
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
        self._leaf_uses: dict[int, list[tuple[NodeId, np.ndarray | None]]] = {}
        self._site_names: dict[NodeId, str] = {}  # matmul node -> site name, for messages
        self._weight_names: dict[NodeId, str] = {}  # weight matmul node -> site name

    def scope(self, node) -> str:
        """The node's module path without the root module's class name (Flax Linen puts
        it in every name stack, while parameter paths do not have it)."""
        name = node.name
        if self.root and (name == self.root or name.startswith(self.root + "/")):
            name = name[len(self.root) + 1 :]
        # Linen records calls of wrapped methods as ``Class.method`` (gemma's
        # ``Transformer._apply_attention``): not part of the module path
        return "/".join(p for p in name.split("/") if not _METHOD.fullmatch(p))

    def site_name(self, node, kind: str, node_index: NodeId | None = None) -> str:
        """``scope/kind[iteration]``; an einsum's own name (``...qhd,...khd->...hqk``)
        stands for the matmul.

        Where the name stack holds no module path (Flax NNX, equinox and plain JAX
        record only transformations such as ``vmap(BTNH,BSNH->BNTS)``), the scope is
        the common path of the weight sites feeding the node (``layers/0/attn``), so
        that rules can target a layer."""
        scope = self.scope(node)
        parts = [p for p in scope.split("/") if p]
        if node_index is not None and not any(not _is_transform(p) for p in parts):
            prefix = self._upstream_prefix(node_index)
            if prefix:
                spec = next((m.group(1) for p in parts for m in [_EINSUM_SPEC.search(p)] if m), None)
                scope = f"{prefix}/{spec}" if kind == "matmul" and spec else prefix
        if not (kind == "matmul" and "->" in scope.rsplit("/", 1)[-1]):
            scope = (scope + "/" if scope else "") + kind
        return scope + _suffix(node.iteration)

    def _upstream_prefix(self, node_index: NodeId, limit: int = 256) -> str:
        """The common module path of the nearest weight sites upstream of a node."""
        names: list[str] = []
        seen: set[ValueId] = set()
        stack = list(self.g.nodes[node_index].inputs)
        while stack and len(seen) < limit:
            vid = stack.pop()
            if vid in seen or vid not in self.producer:
                continue
            seen.add(vid)
            i = self.producer[vid]
            if i in self._weight_names:
                names.append(self._weight_names[i])
                continue
            stack.extend(self.g.nodes[i].inputs)
        if not names:
            return ""
        paths = [re.sub(r"(\[\d+\])+$", "", n).split("/")[:-1] for n in names]
        common = []
        for level in zip(*paths):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        return "/".join(common)

    # -- probes ------------------------------------------------------------------------
    def param_probe(self, vid: ValueId) -> np.ndarray:
        """Flat index into the parameter leaf of every element of value ``vid``."""
        k, chain = self.origin[vid]
        shape = self.g.avals[self.g.param_ids[k]].shape
        probe = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
        return self._run_chain(probe, chain)

    def _run_chain(self, array: np.ndarray, chain: Sequence[NodeId]) -> np.ndarray:
        with jax.ensure_compile_time_eval():
            for i in chain:
                node = self.g.nodes[i]
                if node.primitive != "convert_element_type":
                    (array,) = node.fn(array)
        return np.asarray(array)

    def leaf_uses(self, k: int) -> list[tuple[NodeId, np.ndarray | None]]:
        """Every non-layout reader of parameter leaf ``k``: ``(node index, flat leaf
        indices it reads)``, node -1 for a function output; indices None when the
        reader sees the whole leaf (no scan slice on the way)."""
        if k not in self._leaf_uses:
            uses: list[tuple[NodeId, np.ndarray | None]] = []
            for vid, (leaf, chain) in self.origin.items():
                if leaf != k:
                    continue
                sliced = any(self.g.nodes[i].primitive == "scan_slice" for i in chain)
                elements = np.unique(self.param_probe(vid)) if sliced else None
                if vid in self.outputs:
                    uses.append((NodeId(-1), elements))
                for i in self.consumers.get(vid, ()):
                    node = self.g.nodes[i]
                    if not (node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1):
                        uses.append((i, elements))
            self._leaf_uses[k] = uses
        return self._leaf_uses[k]

    def other_readers(self, k: int, elements: np.ndarray | None, allowed: set[NodeId]) -> list[str]:
        """Descriptions of the readers of leaf ``k`` outside ``allowed`` (node indices)
        that read any of ``elements`` (None: any element)."""
        found = []
        for node_index, read in self.leaf_uses(k):
            if node_index in allowed:
                continue
            if read is not None and elements is not None and not np.intersect1d(read, elements).size:
                continue
            if node_index < 0:
                found.append("a function output")
            elif node_index in self._site_names:
                found.append(f"the matmul {self._site_names[node_index]}")
            else:
                node = self.g.nodes[node_index]
                found.append(f"{node.primitive} at {self.scope(node) or '<top level>'}")
        return list(dict.fromkeys(found))

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

    # -- main ----------------------------------------------------------------------------
    def run(self) -> Plan:
        g = self.g
        notes: list[str] = []
        weights: list[WeightSite] = []
        act_matmuls: list[ActivationMatmul] = []
        # source value id -> list of (reader site name, role)
        readers: dict[ValueId, list[tuple[str, str]]] = {}
        used_names: dict[str, int] = {}

        def unique(name: str) -> str:
            n = used_names.get(name, 0)
            used_names[name] = n + 1
            return name if n == 0 else f"{name}#{n + 1}"

        for index, node in enumerate(g.nodes):
            i = NodeId(index)
            if node.primitive not in MATMUL_PRIMITIVES:
                continue
            lhs, rhs = node.inputs[:2]
            if node.primitive == "dot_general" and not node.params["dimension_numbers"][0][0]:
                continue  # an einsum without a contracted axis is an elementwise product
            is_param = [v in self.derived_from for v in (lhs, rhs)]
            if all(is_param):
                notes.append(f"matmul of two parameters at {node.name!r} left in float")
                continue
            if any(is_param):
                w_op = 0 if is_param[0] else 1
                w_id, x_id = node.inputs[w_op], node.inputs[1 - w_op]
                derived = w_id not in self.origin
                k = self.derived_from[w_id]
                path = g.param_paths[k]
                name = unique(_site_name_from_path(path) + _suffix(node.iteration))
                self._weight_names[i] = name
                if derived:
                    notes.append(
                        f"{name}: its weight is computed from {path} by more than layout ops; "
                        "quantized as a weight where the matmul reads it (no fold, freeze or "
                        "integer export of the leaf)"
                    )
                if node.primitive == "dot_general":
                    (lc, rc), _ = node.params["dimension_numbers"]
                    contracting = tuple(lc if w_op == 0 else rc)
                else:  # conv: kernel spec (out, in, spatial...) -> reduce all but out
                    rhs_spec = node.params["dimension_numbers"].rhs_spec
                    if w_op != 1:
                        notes.append(f"conv with a parameter as its input at {name!r} left in float")
                        continue
                    contracting = tuple(d for d in range(len(g.avals[w_id].shape)) if d != rhs_spec[0])
                src, _ = self.layout_source(x_id)
                readers.setdefault(src, []).append((name, "input"))
                weights.append(
                    WeightSite(
                        name=name,
                        node=i,
                        param_path=path,
                        param_index=k,
                        weight_operand=w_op,
                        weight_id=w_id,
                        weight_shape=tuple(g.avals[w_id].shape),
                        contracting=contracting,
                        input_point="",  # filled below
                        output_ndim=len(g.avals[node.outputs[0]].shape),
                        kernel_index=None if derived else self.param_probe(w_id),
                        derived=derived,
                        owns_leaf=not derived,
                    )
                )
            else:
                name = unique(self.site_name(node, "matmul", i))
                for role, v in (("lhs", lhs), ("rhs", rhs)):
                    src, _ = self.layout_source(v)
                    readers.setdefault(src, []).append((name, role))
                act_matmuls.append(ActivationMatmul(name, i, "", ""))
        self._site_names = {w.node: w.name for w in weights} | {m.node: m.name for m in act_matmuls}

        softmaxes = self.find_softmaxes(unique)
        softmax_out = {g.nodes[s.node].outputs[0]: s for s in softmaxes}
        input_ids = set(g.input_ids)

        points: list[ActivationPoint] = []
        point_of: dict[ValueId, str] = {}
        for src, rs in sorted(readers.items(), key=lambda kv: self._order(kv[0])):
            first, role = rs[0]
            pname = f"{first}:{role}"
            point_of[src] = pname
            source = (
                "softmax"
                if self.softmax_source(src, softmax_out) is not None
                else "input"
                if src in input_ids
                else "other"
            )
            points.append(ActivationPoint(pname, src, tuple(g.avals[src].shape), tuple(r for r, _ in rs), source))

        # Fill in the point names on sites, and whether each owns what it reads.
        weights = [
            dataclasses.replace(
                w,
                input_point=point_of[self.layout_source(g.nodes[w.node].inputs[1 - w.weight_operand])[0]],
                owns_leaf=w.owns_leaf and not self.other_readers(w.param_index, self._elements(w), {w.node}),
            )
            for w in weights
        ]
        act_matmuls = [
            ActivationMatmul(
                m.name,
                m.node,
                point_of[self.layout_source(g.nodes[m.node].inputs[0])[0]],
                point_of[self.layout_source(g.nodes[m.node].inputs[1])[0]],
            )
            for m in act_matmuls
        ]
        point_of_softmax: dict[str, str] = {}
        for src, pname in point_of.items():
            found = self.softmax_source(src, softmax_out)
            if found is not None:
                point_of_softmax.setdefault(found.name, pname)
        softmaxes = [dataclasses.replace(s, point=point_of_softmax.get(s.name)) for s in softmaxes]

        weight_by_node = {w.node: w for w in weights}
        groups = []
        for p in points:
            group = self.fold_group(p, weight_by_node)
            if group is not None:
                groups.append(group)
        group_of = {grp.point: grp.name for grp in groups}
        points = [
            dataclasses.replace(p, source="norm", fold_group=group_of[p.name]) if p.name in group_of else p
            for p in points
        ]
        return Plan(tuple(weights), tuple(act_matmuls), tuple(points), tuple(softmaxes), tuple(groups), tuple(notes))

    def _elements(self, w: WeightSite) -> np.ndarray | None:
        """The leaf elements a weight site reads (None: all of them)."""
        if w.derived:
            return None
        _, chain = self.origin[w.weight_id]
        if not any(self.g.nodes[i].primitive == "scan_slice" for i in chain):
            return None
        assert w.kernel_index is not None  # a weight that is not derived has one
        return np.unique(w.kernel_index)

    def _order(self, vid: ValueId) -> int:
        return self.producer.get(vid, -1)

    # -- softmax -----------------------------------------------------------------------
    def find_softmaxes(self, unique) -> list[Softmax]:
        """``div(e, bcast(reduce_sum(e)))`` or ``mul(e, 1/bcast(reduce_sum(e)))`` with ``e = exp(..)``."""
        found = []
        for index, node in enumerate(self.g.nodes):
            i = NodeId(index)
            if node.primitive not in ("div", "mul") or len(node.inputs) != 2:
                continue
            num, den = node.inputs
            if node.primitive == "mul":
                candidates = [(num, den), (den, num)]
            else:
                candidates = [(num, den)]
            for e, d in candidates:
                axis = self._softmax_axis(e, d, reciprocal=node.primitive == "mul")
                if axis is not None:
                    name = unique(self.site_name(self.g.nodes[i], "softmax", i))
                    found.append(Softmax(name, i, axis, None))
                    break
        return found

    def _softmax_axis(self, e: ValueId, d: ValueId, reciprocal: bool) -> int | None:
        root = self._exp_root(e)
        if root is None:
            return None
        if reciprocal:  # d = 1 / sum
            if d not in self.producer:
                return None
            node = self.g.nodes[self.producer[d]]
            if node.primitive != "div" or self._scalar_const(node.inputs[0]) is None:
                return None
            d = node.inputs[1]
        src, _ = self.layout_source(d)
        if src not in self.producer:
            return None
        node = self.g.nodes[self.producer[src]]
        if node.primitive != "reduce_sum" or len(node.params["axes"]) != 1:
            return None
        if self._exp_root(node.inputs[0]) != root:
            return None
        axis = node.params["axes"][0]
        return axis - len(self.g.avals[e].shape)

    def _exp_root(self, vid: ValueId) -> ValueId | None:
        """The ``exp`` output that ``vid`` is, through dtype casts (a bf16 model sums
        its exp in float32) and masking selects (``where(mask, e, 0)``); else None."""
        while vid in self.producer:
            node = self.g.nodes[self.producer[vid]]
            if node.primitive == "exp":
                return vid
            if node.primitive in ("convert_element_type", "copy", "copy_p"):
                vid = node.inputs[0]
                continue
            live = self._masked_value(node)
            if live is None:
                return None
            vid = live
        return None

    def _masked_value(self, node) -> ValueId | None:
        """For ``select_n(mask, ...)`` whose other branches are all zero: the live branch."""
        if node.primitive != "select_n":
            return None
        live = [v for v in node.inputs[1:] if self._scalar_const(v) != 0.0]
        return live[0] if len(live) == 1 else None

    def _scalar_const(self, vid: ValueId) -> float | None:
        """The value of a constant that is one number broadcast (through broadcasts,
        casts and reshapes), else None."""
        src, _ = self.layout_source(vid)
        if src not in self.g.consts:
            return None
        value = np.asarray(self.g.consts[src])
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def _const_in_unit_interval(self, vid: ValueId) -> bool:
        """Whether ``vid`` is a constant (whatever slicing, gathers or layout ops lead
        to it) with all its values in [0, 1]: a head mask of ones, a 0/1 mask."""
        vid, _ = self.layout_source(vid)
        while vid not in self.g.consts:
            node = self.g.nodes[self.producer[vid]] if vid in self.producer else None
            if node is None or node.primitive not in ("slice", "dynamic_slice", "gather", "squeeze"):
                return False
            vid, _ = self.layout_source(node.inputs[0])
        value = np.asarray(self.g.consts[vid], np.float64)
        return bool(np.all((value >= 0) & (value <= 1)))

    def softmax_source(self, vid: ValueId, softmax_out: Mapping[ValueId, Softmax]) -> Softmax | None:
        """The softmax whose probabilities ``vid`` is: directly, through layout ops and
        casts, through a mask selecting zeros, or scaled elementwise by a constant in
        [0, 1] (FlaxBert's head mask, ``einsum('...hqk,h->...hqk')``)."""
        while vid not in softmax_out:
            if vid not in self.producer:
                return None
            node = self.g.nodes[self.producer[vid]]
            live = self._masked_value(node)
            if node.primitive in LAYOUT_PRIMITIVES and len(node.inputs) == 1:
                vid = node.inputs[0]
            elif live is not None:
                vid = live
            elif node.primitive == "mul" or (
                node.primitive == "dot_general" and not node.params["dimension_numbers"][0][0]
            ):
                a, b = node.inputs[:2]
                if self._const_in_unit_interval(b):
                    vid = a
                elif self._const_in_unit_interval(a):
                    vid = b
                else:
                    return None
            else:
                return None
        return softmax_out[vid]

    # -- fold groups ---------------------------------------------------------------------
    def _per_channel_index(self, vid: ValueId, out_shape: tuple[int, ...]) -> np.ndarray | None:
        """If ``vid`` is a parameter broadcast along the last axis of ``out_shape``: its
        flat leaf index per channel."""
        if vid not in self.origin:
            return None
        probe = self.param_probe(vid)
        channels = out_shape[-1]
        if probe.ndim > len(out_shape) or probe.shape[-1] != channels or probe.size != channels:
            return None
        return probe.reshape(channels)

    def _product_factors(self, vid: ValueId) -> list[ValueId]:
        """Factors of a product tree of single-use ``mul`` nodes."""
        if vid in self.producer and len(self.consumers.get(vid, ())) <= 1:
            node = self.g.nodes[self.producer[vid]]
            if node.primitive == "mul" and len(node.inputs) == 2:
                return self._product_factors(node.inputs[0]) + self._product_factors(node.inputs[1])
        return [vid]

    def channel_step(self, node_index: NodeId) -> tuple[ValueId, NodeId | None] | None:
        """If the node maps each channel (last axis) to itself linearly and keeps
        per-channel affines exact (layout ops, slices, a mean over other axes):
        (its input value id, the node to follow it with or None)."""
        node = self.g.nodes[node_index]
        if len(node.inputs) < 1:
            return None
        src = node.inputs[0]
        in_shape, out_shape = self.g.avals[src].shape, self.g.avals[node.outputs[0]].shape
        if not in_shape or not out_shape or in_shape[-1] != out_shape[-1]:
            return None
        if node.primitive == "transpose" and node.params["permutation"][-1] != len(in_shape) - 1:
            return None
        if node.primitive in LAYOUT_PRIMITIVES or node.primitive in ("slice", "squeeze"):
            if node.primitive == "slice" and node.params["start_indices"][-1] != 0:
                return None
            return (src, None) if len(node.inputs) == 1 else None
        if node.primitive in ("gather", "dynamic_slice") and self._keeps_channels(node):
            return src, None
        if node.primitive == "div" and node.inputs[1] in self.g.consts and node.inputs[0] in self.producer:
            red_index = self.producer[node.inputs[0]]
            red = self.g.nodes[red_index]
            if red.primitive != "reduce_sum" or len(self.consumers.get(red.outputs[0], ())) != 1:
                return None
            axes = red.params["axes"]
            red_shape = self.g.avals[red.inputs[0]].shape
            count = int(np.prod([red_shape[a] for a in axes]))
            if len(red_shape) - 1 in axes or float(np.asarray(self.g.consts[node.inputs[1]])) != count:
                return None
            return red.inputs[0], red_index
        return None

    def _keeps_channels(self, node) -> bool:
        """Whether a gather or dynamic slice selects along other axes only, keeping the
        last (channel) axis whole and last (token pooling, ``x[:, eos_index]``)."""
        channels = self.g.avals[node.inputs[0]].shape[-1]
        last = len(self.g.avals[node.inputs[0]].shape) - 1
        if node.primitive == "dynamic_slice":
            return node.params["slice_sizes"][-1] == channels
        dn = node.params["dimension_numbers"]
        out_ndim = len(self.g.avals[node.outputs[0]].shape)
        return (
            node.params["slice_sizes"][-1] == channels
            and last not in dn.collapsed_slice_dims
            and last not in dn.start_index_map
            and last not in getattr(dn, "operand_batching_dims", ())
            and dn.offset_dims
            and dn.offset_dims[-1] == out_ndim - 1
        )

    def fold_group(self, point: ActivationPoint, weight_by_node) -> FoldGroup | None:
        g = self.g
        out = point.value_id
        while out in self.producer:
            step = self.channel_step(self.producer[out])
            if step is None:
                break
            out = step[0]
        if out not in self.producer or len(point.shape) < 1:
            return None
        node = g.nodes[self.producer[out]]
        shape = tuple(self.g.avals[out].shape)
        bias_k = bias_index = None
        if node.primitive == "add" and len(node.inputs) == 2:
            for b, rest in ((node.inputs[1], node.inputs[0]), (node.inputs[0], node.inputs[1])):
                bias_index = self._per_channel_index(b, shape)
                if bias_index is not None:
                    bias_k = self.origin[b][0]
                    product = rest
                    break
            else:
                return None
            if product not in self.producer or self.g.nodes[self.producer[product]].primitive != "mul":
                return None
            if len(self.consumers.get(product, ())) != 1:
                return None
            top = self.g.nodes[self.producer[product]]
            factors = self._product_factors(top.inputs[0]) + self._product_factors(top.inputs[1])
            kind = "layernorm"
        elif node.primitive == "mul" and len(node.inputs) == 2:
            factors = self._product_factors(node.inputs[0]) + self._product_factors(node.inputs[1])
            kind = "rmsnorm"
        else:
            return None
        scales = []
        for f in factors:
            offset, gamma = self._offset_scale(f)
            if gamma in self.origin:
                scales.append((gamma, self._per_channel_index(gamma, shape), offset))
        if len(scales) != 1:
            return None
        scale_vid, scale_index, scale_offset = scales[0]
        if scale_index is None:
            return None
        # Named like weight sites, after the parameter (γ's module path): stable and the
        # same for Linen, NNX and plain JAX.
        name = _site_name_from_path(g.param_paths[self.origin[scale_vid][0]]) + _suffix(node.iteration)
        consumers, norm_reason, matmul_reason = self._fold_consumers(out, shape, point, weight_by_node)
        # The kernel half (branch fold, docs/method.md) needs legal kernel edits; the full fold also
        # needs the norm output to reach nothing but the consumers, and its own γ, β.
        branch_reason = matmul_reason or self._shared_leaf_reason([], consumers, weight_by_node)
        if not consumers and not branch_reason:
            branch_reason = "feeds no weight matmul"
        edits: list[tuple[int, np.ndarray | None, ValueId, str]] = [
            (self.origin[scale_vid][0], scale_index, scale_vid, "γ")
        ]
        if bias_k is not None:
            edits.append((bias_k, bias_index, b, "β"))
        reason = "; ".join(
            r for r in (norm_reason, branch_reason or self._shared_leaf_reason(edits, [], weight_by_node)) if r
        )
        return FoldGroup(
            name=name,
            point=point.name,
            kind=kind,
            channels=shape[-1],
            scale_param_index=self.origin[scale_vid][0],
            scale_index=scale_index,
            scale_offset=scale_offset,
            bias_param_index=bias_k,
            bias_index=bias_index,
            consumers=tuple(consumers),
            foldable=not reason,
            reason=reason,
            branch_foldable=not branch_reason,
            branch_reason=branch_reason,
        )

    def _offset_scale(self, vid: ValueId) -> tuple[float, ValueId]:
        """``(c, γ)`` for a factor ``c + γ`` with a scalar constant ``c`` (Gemma's
        ``1 + scale``), else ``(0, vid)``."""
        src, _ = self.layout_source(vid)
        node = self.g.nodes[self.producer[src]] if src in self.producer else None
        if node is not None and node.primitive == "add" and len(node.inputs) == 2:
            for c, gamma in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
                value = self._scalar_const(c)
                if value is not None and gamma in self.origin:
                    return value, gamma
        return 0.0, vid

    def _shared_leaf_reason(self, norm_edits, consumers: list[FoldConsumer], weight_by_node) -> str:
        """Why the fold may not edit its leaves: a leaf element it changes is also read
        by an operation outside the group (a tied embedding lookup, another matmul, a
        transposed use, another norm applied with the same γ), or two consumers read one
        kernel along different axes."""
        reasons = []
        for k, index, vid, what in norm_edits:
            readers = self.other_readers(k, np.asarray(index), set(self.consumers.get(vid, ())))
            reasons += [f"{what} {self.g.param_paths[k]} is also read by {r}" for r in readers]
        by_leaf: dict[int, list[FoldConsumer]] = {}
        for c in consumers:
            by_leaf.setdefault(weight_by_node[c.node].param_index, []).append(c)
        for k, cs in by_leaf.items():
            first = cs[0]
            for c in cs[1:]:
                overlap = (first.row_channel >= 0) & (c.row_channel >= 0)
                if overlap.any() and not np.array_equal(first.row_channel, c.row_channel):
                    reasons.append(f"{first.site} and {c.site} read {self.g.param_paths[k]} along different axes")
            rows = np.flatnonzero(np.any([c.row_channel >= 0 for c in cs], axis=0))
            readers = self.other_readers(k, rows, {c.node for c in cs})
            reasons += [f"kernel {self.g.param_paths[k]} is also read by {r}" for r in readers]
            biases = {c.bias_param_index for c in cs if c.bias_param_index is not None}
            for bk in biases:
                users = [c for c in cs if c.bias_param_index == bk]
                index = np.unique(np.concatenate([c.bias_index for c in users]))
                readers = self.other_readers(bk, index, {c.bias_node for c in users if c.bias_node is not None})
                reasons += [f"bias {self.g.param_paths[bk]} is also read by {r}" for r in readers]
        bias_leaves = [c.bias_param_index for c in consumers if c.bias_param_index is not None]
        for bk in set(bias_leaves):
            kernels = {weight_by_node[c.node].param_index for c in consumers if c.bias_param_index == bk}
            if len(kernels) > 1:
                reasons.append(f"bias {self.g.param_paths[bk]} is added to matmuls of different kernels")
        return "; ".join(dict.fromkeys(reasons))

    def _fold_consumers(self, out: ValueId, shape, point, weight_by_node) -> tuple[list[FoldConsumer], str, str]:
        """Follows every reader of ``out`` through channel-preserving ops; checks each is
        a weight matmul contracting over the channel axis, read through ``point``."""
        g = self.g
        channels = shape[-1]
        channel_ids = np.broadcast_to(np.arange(channels, dtype=np.int32), shape)
        consumers: list[FoldConsumer] = []
        reasons: list[str] = []  # readers that block the whole fold (the norm must stay)
        matmul_reasons: list[str] = []  # matmul readers that block the kernel half too
        if out in self.outputs:
            reasons.append("is an output of the function")
        stack = [(out, channel_ids)]
        while stack:
            vid, cid = stack.pop()
            if vid in self.outputs and vid != out:
                reasons.append("is an output of the function (through a reshape)")
            for i in self.consumers.get(vid, ()):
                node = g.nodes[i]
                where = f"{node.primitive} at {self.scope(node) or node.name or '<top level>'}"
                if node.primitive == "reduce_sum":  # a mean: reduce_sum then div by the count
                    div_index = self.consumers.get(node.outputs[0], [None])[0]
                    if div_index is not None and self.channel_step(div_index) == (vid, i):
                        reduced = cid
                        for axis in sorted(node.params["axes"], reverse=True):
                            reduced = np.take(reduced, 0, axis=axis)
                        stack.append((self.g.nodes[div_index].outputs[0], reduced))
                        continue
                if self.channel_step(i) == (vid, None):
                    if len(node.inputs) == 1:
                        stack.append((node.outputs[0], self._run_chain(cid, (i,))))
                        continue
                    # a gather/dynamic slice over other axes: channel ids stay along the
                    # last axis, if they were only there before
                    if (cid == np.arange(channels, dtype=cid.dtype)).all():
                        out_shape = g.avals[node.outputs[0]].shape
                        stack.append((node.outputs[0], np.broadcast_to(np.arange(channels, dtype=np.int32), out_shape)))
                        continue
                site = weight_by_node.get(i)
                if site is not None and site.derived:
                    matmul_reasons.append(f"feeds {site.name}, whose weight is derived from its parameter")
                    continue
                if site is None or node.inputs[site.weight_operand] == vid:
                    kind = " (residual)" if node.primitive == "add" else ""
                    reasons.append(f"also feeds {where}{kind}")
                    continue
                if self.layout_source(node.inputs[1 - site.weight_operand])[0] != point.value_id:
                    matmul_reasons.append(f"feeds {site.name} through another quantizer than {point.name}")
                    continue
                consumer = self._fold_consumer(site, node, cid)
                if isinstance(consumer, str):
                    matmul_reasons.append(consumer)
                else:
                    consumers.append(consumer)
        return consumers, "; ".join(dict.fromkeys(reasons)), "; ".join(dict.fromkeys(matmul_reasons))

    def _fold_consumer(self, site: WeightSite, node, cid: np.ndarray) -> FoldConsumer | str:
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
        leaf_size = int(np.prod(self.g.avals[self.g.param_ids[site.param_index]].shape))
        row_channel = np.full(leaf_size, -1, dtype=np.int64)
        for k, c in enumerate(channel_of_k):
            already = row_channel[kidx[k]]
            if ((already != -1) & (already != c)).any():
                return f"kernel elements shared between channels at {where}"
            row_channel[kidx[k]] = c
        bias_k, bias_index, bias_node = self._matmul_bias(node, site)
        return FoldConsumer(where, row_channel, bias_k, bias_index, channel_of_k, site.node, bias_node)

    def _matmul_bias(self, node, site: WeightSite) -> tuple[int | None, np.ndarray | None, NodeId | None]:
        """Finds ``add(matmul_out, bias_param)`` right after the matmul (possibly through
        transposes and reshapes: a vmapped ``W @ x`` is transposed before its bias), and
        maps each output element of the weight to its flat bias index."""
        out = node.outputs[0]
        out_shape = self.g.avals[out].shape
        # flat matmul-output index of every element, carried along the layout chain
        position = np.arange(int(np.prod(out_shape)), dtype=np.int64).reshape(out_shape)
        vid: ValueId = out
        chain: list[NodeId] = []
        while True:
            readers = self.consumers.get(vid, ())
            if len(readers) != 1 or vid in self.outputs:
                return None, None, None
            reader = self.g.nodes[readers[0]]
            if (
                reader.primitive not in ("transpose", "reshape", "convert_element_type", "copy")
                or len(reader.inputs) != 1
            ):
                break
            chain.append(readers[0])
            vid = reader.outputs[0]
        add = reader
        if add.primitive != "add":
            return None, None, None
        other = add.inputs[1] if add.inputs[0] == vid else add.inputs[0]
        if other not in self.origin:
            return None, None, None
        add_shape = self.g.avals[vid].shape
        bias_at_add = self.param_probe(other)
        bias_at_add = np.broadcast_to(
            bias_at_add.reshape((1,) * (len(add_shape) - bias_at_add.ndim) + bias_at_add.shape), add_shape
        )
        position = self._run_chain(position, chain)
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
        moved = np.moveaxis(probe, free_axes, range(n_free)).reshape(
            int(np.prod([out_shape[a] for a in free_axes])), -1
        )
        if not (moved == moved[:, :1]).all():
            return None, None, None
        return self.origin[other][0], moved[:, 0], readers[0]


def _root_scope(graph: Graph) -> str:
    """The first name-stack component shared by every named node, if parameter paths
    do not start with it (Flax Linen's root module class name)."""
    firsts = {node.name.split("/", 1)[0] for node in graph.nodes if node.name}
    if len(firsts) != 1:
        return ""
    (root,) = firsts
    if any(_site_name_from_path(p).split("/", 1)[0] == root for p in graph.param_paths):
        return ""
    return root


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
