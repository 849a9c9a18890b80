"""The package's layout: a flat public API, private modules without import cycles, a
vocabulary module that imports nothing, and a core that needs none of the extras."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import repquant_jax as repquant

SRC = pathlib.Path(repquant.__file__).parent / "_src"


def _imports(path: pathlib.Path) -> set[str]:
    """Library modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "repquant_jax._src":
                found.update(f"repquant_jax._src.{a.name}" for a in node.names)
            elif node.module.startswith(("repquant_jax", "repquant_zoo")):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(("repquant_jax", "repquant_zoo")))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"repquant_jax._src.{p.stem}": p for p in SRC.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_private_modules_have_no_import_cycle():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) >= 20


def test_vocabulary_module_imports_nothing_from_the_library():
    assert _imports(SRC / "types.py") == set()


def test_core_never_imports_the_zoo():
    offenders = {p.name for p in SRC.glob("*.py") if any(m.startswith("repquant_zoo") for m in _imports(p))}
    assert not offenders


def test_import_loads_no_extra():
    code = (
        "import sys, repquant_jax;"
        "print(sorted(m for m in ('repquant_zoo', 'torch', 'transformers', 'chex', 'tensorflow_datasets',"
        " 'tokenizers', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_is_flat_and_complete():
    for name in ("transform", "inspect", "freeze", "export", "integer_apply", "save", "load", "from_nnx", "presets"):
        assert name in repquant.__all__
    for name in repquant.__all__:
        assert getattr(repquant, name) is not None
    assert callable(repquant.export) and callable(repquant.freeze)
    # no private module leaks into the public namespace besides presets
    leaked = {n for n in dir(repquant) if not n.startswith("_") and n not in repquant.__all__} - {"presets"}
    assert not leaked, leaked
