"""Runs the documentation: the quick-start notebook and the Python blocks of README.md and BUILD.md.

Notebook (``notebooks/quickstart.ipynb``): its code cells are executed in order in one
namespace, as a notebook kernel would (lines starting with ``%`` or ``!``, IPython magics
and shell commands such as the install cell, are left out); then the variables it
computes are checked (float accuracy, quantized accuracy, integer_apply vs qapply,
save/load). The JSON is read with the ``json`` module: no Jupyter dependency.

README.md and BUILD.md, convention for fenced code blocks:

* A block fenced as ```` ```python ```` is executed. The blocks of one file run in
  document order in one namespace (a later block sees what earlier ones defined), which
  starts from the setup prelude `PRELUDE` below: a tiny untrained Flax Linen ViT
  ``model``, ``apply_fn(params, images)``, ``params``, a batch ``images`` (= ``x``) and
  ``calib_batches`` (a list of 4 such batches), plus ``jax``, ``jnp``, ``np`` and ``nn``.
  Lines starting with ``%`` or ``!`` (``!pip install ...``) are left out, as in the
  notebook.
* A block whose first line is a comment ``# not run: <reason>`` is not executed; its test
  is reported as skipped with the reason (``pytest -ra`` lists them).
* Blocks fenced with another language (``bash``, no language, ``py``, ``pycon``...) are
  not Python blocks of this test.

A block that raises fails its test, with the traceback pointing at the Markdown file's own
line numbers. A block after a failing one in the same file fails too (its namespace is
incomplete), naming the block that raised.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
DOC_FILES = ("README.md", "BUILD.md")

_SHELL_PREFIXES = ("%", "!")
_NOT_RUN = re.compile(r"^#\s*not run:\s*(?P<reason>.*\S)\s*$")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")

PRELUDE = """
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class _Block(nn.Module):
    dim: int = 16
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h)
        h = nn.LayerNorm(name="norm2")(x)
        return x + nn.Dense(self.dim, name="fc2")(nn.gelu(nn.Dense(2 * self.dim, name="fc1")(h)))


class _TinyViT(nn.Module):
    dim: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.dim, (4, 4), strides=(4, 4), name="patch_embed")(images)
        x = x.reshape(x.shape[0], -1, self.dim)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        x = _Block(self.dim, name="block0")(x)
        x = nn.LayerNorm(name="norm")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


model = _TinyViT()
images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))  # 8 images, 16 patches each
x = images
params = model.init(jax.random.key(1), images)
apply_fn = lambda p, x: model.apply(p, x)
calib_batches = [jax.random.normal(jax.random.key(2 + i), images.shape) for i in range(4)]
"""


# --------------------------------------------------------------------------------------
# Helpers


def _without_shell_lines(source: str) -> str:
    """``source`` with IPython magic / shell lines blanked (line numbers are kept)."""
    return "".join(
        ("\n" if line.endswith("\n") else "") if line.lstrip().startswith(_SHELL_PREFIXES) else line
        for line in source.splitlines(keepends=True)
    )


def _run(source: str, filename: str, namespace: dict[str, Any], first_line: int = 1) -> None:
    """Executes ``source`` in ``namespace``; tracebacks show ``filename``'s lines from ``first_line``."""
    padded = "\n" * (first_line - 1) + source
    if not Path(filename).is_file():  # notebook cells: let tracebacks show the cell's source
        linecache.cache[filename] = (len(padded), None, padded.splitlines(keepends=True), filename)
    # dont_inherit: this file's `from __future__ import annotations` must not leak into the docs
    exec(compile(padded, filename, "exec", dont_inherit=True), namespace)


def _module_namespace(name: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The globals of a new module registered in `sys.modules` (as a notebook's `__main__` is:
    dataclasses and Flax modules look their module up there), starting with ``base``."""
    module = types.ModuleType(name)
    module.__dict__.update({k: v for k, v in (base or {}).items() if k not in ("__name__", "__spec__")})
    sys.modules[name] = module
    return module.__dict__


@dataclasses.dataclass(frozen=True)
class DocBlock:
    """One ```python block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the block's first code line
    source: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.path.name}:L{self.line}"


def python_blocks(path: Path) -> list[DocBlock]:
    """The ```python fenced blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        info = m["info"].split()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.name}:{i + 1}: code fence {fence!r} is never closed")
        if info and info[0] == "python":
            body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[i + 1 : j]]
            first = next((line.strip() for line in body if line.strip()), "")
            not_run = _NOT_RUN.match(first)
            blocks.append(DocBlock(path, i + 2, "\n".join(body) + "\n", not_run["reason"] if not_run else None))
        i = j + 1
    return blocks


_DOC_BLOCKS = [block for name in DOC_FILES if (ROOT / name).is_file() for block in python_blocks(ROOT / name)]

# Per process: the namespace after each executed block, or the exception it raised.
_after: dict[DocBlock, dict[str, Any] | BaseException] = {}


def _prelude_namespace() -> dict[str, Any]:
    namespace = _module_namespace("repquant_docs_prelude")
    _run(PRELUDE, "<test_docs prelude>", namespace)
    return namespace


def _namespace_before(block: DocBlock) -> dict[str, Any]:
    """The prelude plus every runnable block of the same file above ``block``, executed in
    order (cached per process, so this also works under pytest-xdist)."""
    earlier = [b for b in _DOC_BLOCKS if b.path == block.path and b.line < block.line and b.skip_reason is None]
    namespace = None
    for b in reversed(earlier):  # the latest cached state
        if b in _after:
            namespace = _after[b]
            start = earlier.index(b) + 1
            break
    else:
        namespace, start = _prelude_namespace(), 0
    for b in earlier[start:]:
        if isinstance(namespace, BaseException):
            break
        state = _module_namespace(_module_name(b), namespace)
        try:
            _run(_without_shell_lines(b.source), str(b.path), state, b.line)
        except Exception as e:  # noqa: BLE001 - recorded, reported by the dependent block
            state = e
        _after[b] = namespace = state
    if isinstance(namespace, BaseException):
        failed = next(b for b in earlier if isinstance(_after.get(b), BaseException))
        pytest.fail(
            f"the earlier block {failed.id}, whose namespace this block starts from, raised "
            f"{type(namespace).__name__}: {namespace}",
            pytrace=False,
        )
    return _module_namespace(_module_name(block), namespace)


def _module_name(block: DocBlock) -> str:
    return f"repquant_docs_{block.path.stem}_L{block.line}"


# --------------------------------------------------------------------------------------
# README.md / BUILD.md


def test_readme_has_runnable_python_blocks():
    blocks = [b for b in _DOC_BLOCKS if b.path.name == "README.md"]
    assert blocks, "README.md has no ```python blocks"
    assert any(b.skip_reason is None for b in blocks), "every README.md python block is marked '# not run'"


def test_block_parser_convention(tmp_path):
    doc = tmp_path / "DOC.md"
    doc.write_text(
        "text\n```python\nrun = 1\n```\n\n```bash\nmake test\n```\n"
        "- item\n  ```python\n  # not run: needs a TPU\n  x = 1\n  ```\n"
        "````python\n```\nnested = True\n````\n```\nplain\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(doc)
    assert [(b.line, b.skip_reason) for b in blocks] == [(3, None), (11, "needs a TPU"), (15, None)]
    assert blocks[0].source == "run = 1\n"
    assert blocks[1].source == "# not run: needs a TPU\nx = 1\n"
    assert blocks[2].source == "```\nnested = True\n"
    assert _without_shell_lines("!pip install x\nimport os\n  %time y = 1\n") == "\nimport os\n\n"


@pytest.mark.parametrize("block", _DOC_BLOCKS, ids=[b.id for b in _DOC_BLOCKS])
def test_doc_python_block_runs(block: DocBlock):
    if block.skip_reason is not None:
        pytest.skip(f"{block.id} not run: {block.skip_reason}")
    namespace = _namespace_before(block)
    try:
        _run(_without_shell_lines(block.source), str(block.path), namespace, block.line)
    except Exception as e:
        _after[block] = e
        raise
    _after[block] = namespace


# --------------------------------------------------------------------------------------
# The quick-start notebook


def _notebook() -> dict[str, Any]:
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def _code_cells(nb: dict[str, Any]) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_quickstart_notebook_is_clean():
    """nbformat 4, no stored outputs, no host names and no platform-specific settings."""
    nb = _notebook()
    assert nb["nbformat"] == 4
    assert nb["cells"][0]["cell_type"] == "markdown"
    cells = _code_cells(nb)
    assert cells, "the notebook has no code cells"
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            assert c.get("outputs") == [] and c.get("execution_count") is None, "outputs are stored"
    text = json.dumps(nb)
    assert "://" not in text and "git+" not in text, "the notebook names a host"
    code = "\n".join(cells)
    assert any(line.startswith("%pip install") and "repquant-jax" in line for line in code.splitlines())
    for forbidden in ("jax.config", "jax_platform", "JAX_PLATFORM", "device_count(", "local_devices("):
        assert forbidden not in code, f"device-specific code in the notebook: {forbidden!r}"


def test_quickstart_notebook_runs():
    """Executes every code cell of notebooks/quickstart.ipynb in order (< 90 s on 2 CPU cores)."""
    nb = _notebook()
    namespace = _module_namespace("quickstart_notebook")
    start = time.perf_counter()
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            _run(_without_shell_lines("".join(cell["source"])), f"{NOTEBOOK.name}[cell {i}]", namespace)
    print(f"quickstart.ipynb ran in {time.perf_counter() - start:.1f}s")

    chance = 100 / namespace["NUM_CLASSES"]
    float_acc = namespace["float_acc"]
    results = namespace["results"]
    assert float_acc >= chance + 40, f"float model barely learned: {float_acc:.1f}% (chance {chance:.1f}%)"
    assert set(results) == {("repq_vit", 8, 8), ("repq_vit", 4, 4), ("repquant", 8, 8), ("repquant", 4, 4)}
    for method in ("repq_vit", "repquant"):
        assert abs(results[method, 8, 8] - float_acc) <= 2.0, (method, results[method, 8, 8], float_acc)
        assert results[method, 4, 4] >= float_acc - 10.0, (method, results[method, 4, 4], float_acc)
    # freeze keeps qapply's outputs; integer_apply matches the fake-quant model
    assert namespace["frozen_max_diff"] <= 1e-4
    assert namespace["int_rel_err"] <= 1e-4
    assert namespace["int_agree"] >= 99.0
    exported = namespace["exported"]
    assert exported.weights, "export stored no integer weights"
    assert namespace["int_bytes"] < namespace["float_bytes"]
    # save/load round trip is bitwise
    assert namespace["same_leaves"] is True
    assert namespace["loaded_max_diff"] == 0.0
    assert namespace["metadata"] == {"method": "repquant", "w_bits": 4, "a_bits": 4}
