"""Naming the sites of the analysis: module paths from name stacks and parameter paths.

Weight sites and fold groups are named after their parameter's tree path
(`site_name_from_path`); activation matmuls and softmaxes after the module path of their
node (`site_name`), or, where the name stack holds none, after the weight sites upstream
of it. Unrolled scan iterations add ``[i]`` suffixes.
"""

from __future__ import annotations

import re

from repquant_jax._src.analysis_context import AnalysisContext
from repquant_jax._src.graph import Graph, Node
from repquant_jax._src.types import NodeId, ValueId

__all__ = ["is_transform", "suffix", "site_name_from_path", "root_scope", "scope", "site_name", "upstream_prefix"]

_METHOD = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*")
_EINSUM_SPEC = re.compile(r"([\w.,]+->[\w.]+)")


def is_transform(part: str) -> bool:
    """A name-stack entry recorded by a transformation or an einsum, not a module."""
    return "->" in part or re.fullmatch(r"\w+\(.*\)", part) is not None


def suffix(iteration: tuple[int, ...]) -> str:
    """The ``[i][j]`` suffix of an unrolled scan iteration (``""`` outside a scan)."""
    return "".join(f"[{i}]" for i in iteration)


def site_name_from_path(path: str) -> str:
    """A parameter path without the ``params`` collection and the leaf name
    (``"params/Block_0/fc1/kernel"`` -> ``"Block_0/fc1"``)."""
    parts = path.split("/")
    if len(parts) > 1 and parts[0] in ("params", "param"):
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in ("kernel", "weight", "embedding", "scale"):
        parts = parts[:-1]
    return "/".join(parts)


def root_scope(graph: Graph) -> str:
    """The first name-stack component shared by every named node, if parameter paths
    do not start with it (Flax Linen's root module class name)."""
    firsts = {node.name.split("/", 1)[0] for node in graph.nodes if node.name}
    if len(firsts) != 1:
        return ""
    (root,) = firsts
    if any(site_name_from_path(p).split("/", 1)[0] == root for p in graph.param_paths):
        return ""
    return root


def scope(ctx: AnalysisContext, node: Node) -> str:
    """The node's module path without the root module's class name (Flax Linen puts
    it in every name stack, while parameter paths do not have it)."""
    name = node.name
    if ctx.root and (name == ctx.root or name.startswith(ctx.root + "/")):
        name = name[len(ctx.root) + 1 :]
    # Linen records calls of wrapped methods as ``Class.method`` (gemma's
    # ``Transformer._apply_attention``): not part of the module path
    return "/".join(p for p in name.split("/") if not _METHOD.fullmatch(p))


def site_name(ctx: AnalysisContext, node: Node, kind: str, node_index: NodeId | None = None) -> str:
    """``scope/kind[iteration]``; an einsum's own name (``...qhd,...khd->...hqk``)
    stands for the matmul.

    Where the name stack holds no module path (Flax NNX, equinox and plain JAX
    record only transformations such as ``vmap(BTNH,BSNH->BNTS)``), the scope is
    the common path of the weight sites feeding the node (``layers/0/attn``), so
    that rules can target a layer."""
    module_path = scope(ctx, node)
    parts = [p for p in module_path.split("/") if p]
    if node_index is not None and not any(not is_transform(p) for p in parts):
        prefix = upstream_prefix(ctx, node_index)
        if prefix:
            spec = next((m.group(1) for p in parts for m in [_EINSUM_SPEC.search(p)] if m), None)
            module_path = f"{prefix}/{spec}" if kind == "matmul" and spec else prefix
    if not (kind == "matmul" and "->" in module_path.rsplit("/", 1)[-1]):
        module_path = (module_path + "/" if module_path else "") + kind
    return module_path + suffix(node.iteration)


def upstream_prefix(ctx: AnalysisContext, node_index: NodeId, limit: int = 256) -> str:
    """The common module path of the nearest weight sites upstream of a node."""
    names: list[str] = []
    seen: set[ValueId] = set()
    stack = list(ctx.g.nodes[node_index].inputs)
    while stack and len(seen) < limit:
        vid = stack.pop()
        if vid in seen or vid not in ctx.producer:
            continue
        seen.add(vid)
        i = ctx.producer[vid]
        if i in ctx.weight_names:
            names.append(ctx.weight_names[i])
            continue
        stack.extend(ctx.g.nodes[i].inputs)
    if not names:
        return ""
    paths = [re.sub(r"(\[\d+\])+$", "", n).split("/")[:-1] for n in names]
    common = []
    for level in zip(*paths):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)
