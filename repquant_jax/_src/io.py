"""Saving and loading :class:`~repquant_jax.QParams` as one safetensors file.

:func:`save` writes a quantized model (folded float params plus every quantizer
and offset) to a single `safetensors <https://github.com/huggingface/safetensors>`_
file; :func:`load` reads it back bit for bit. ``qapply`` is not stored: rebuild it
with :func:`repquant_jax._src.transform` or keep the one you have (it only needs a
``QParams`` of the same structure).

File layout (format version :data:`FORMAT_VERSION`):

* **Tensors.** Every array is one safetensors tensor under a flat key:

  - ``params/<tree path>`` for each leaf of ``qparams.params`` (path components
    from :func:`jax.tree_util.tree_flatten_with_path`, e.g.
    ``params/params/Dense_0/kernel``),
  - ``weights/<site>/scale`` and ``weights/<site>/zero_point``,
  - ``activations/<site>/scale`` and ``activations/<site>/zero_point``,
  - ``input_offsets/<site>``, ``output_offsets/<site>`` and ``input_scales/<site>``.

  Each path component / site name is percent-escaped
  (:func:`urllib.parse.quote` with no safe characters), so ``/``, ``:``,
  ``[``, ``]``, ``#``, spaces and non-ASCII characters never clash with the
  separators; ``.``, ``-``, ``_`` and ``~`` are kept. Keys are for humans and
  other tools: :func:`load` takes the original names from the JSON document.
  dtypes that safetensors knows (``bool``, ``(u)int8..64``, ``float16/32/64``,
  ``bfloat16``, the ``float8`` variants, ``complex64``) are stored natively,
  so other safetensors readers see them as they are; any other dtype (e.g.
  ``int4``, ``complex128``) is stored as its raw bytes (``U8``, 1-D). Data is
  little endian.
* **Header metadata.** The safetensors header's ``__metadata__`` has one entry,
  ``"repquant_jax"``: a JSON document with

  - ``format`` (``"repquant_jax"``), ``format_version``, ``library_version``,
  - ``tensors``: key -> ``{"dtype", "shape", "type", "encoding"}``; ``type``
    says which Python object the leaf was (``jax`` array, ``numpy`` array,
    ``numpy_scalar``, or a Python ``float``/``int``/``bool``) and ``encoding``
    is ``native`` or ``bytes``,
  - ``params``: ``leaves`` (the tensor keys in
    :func:`jax.tree_util.tree_leaves` order), ``treedef`` (its ``str``, for
    messages only) and ``structure``: the nested containers, enough to
    rebuild the pytree (``null`` when it holds custom pytree nodes),
  - ``weights`` / ``activations``: lists of ``{"site", "static", "arrays"}``
    (``static`` holds ``bits``/``kind``/``axis``, and ``root`` for a ``"log_root"``
    quantizer (files written before it existed load with ``root=None``); ``arrays`` maps
    ``scale``/``zero_point`` to tensor keys), ``input_offsets`` /
    ``output_offsets`` / ``input_scales``: lists of ``{"site", "key"}``, all in dict
    order,
  - ``metadata``: the user's JSON metadata,
  - ``sha256``: the SHA-256 of the canonical JSON of this document without
    the ``sha256`` entry (``sort_keys``, compact separators, ASCII), followed
    by, for every tensor in sorted key order, the 8-byte little-endian length
    and UTF-8 bytes of its key and the 8-byte length and stored bytes of its
    data. It covers the tensor data and the document, so flipped bytes
    anywhere are caught.

Params structure: ``dict`` (``str`` or ``int`` keys, insertion order kept),
``flax.core.FrozenDict``, ``list``, ``tuple`` and ``None`` nodes are rebuilt
as such; leaves come back as the type they were (``jax.Array`` on the default
device, ``numpy.ndarray`` (writable), numpy scalar or Python scalar). Other
containers (``nnx.State``, ``OrderedDict``, namedtuples, dataclasses, ...)
are custom pytree nodes: their leaves are saved, and :func:`load` needs
``params_like`` to rebuild them.

Writes are atomic: the file is written to a temporary file in the same
directory, fsynced and moved over ``path`` with :func:`os.replace`, so a crash
leaves either the old file or none, never a partial one. Files are
deterministic: the same ``QParams`` and metadata give the same bytes.

Example:
    >>> import repquant_jax as rq
    >>> from repquant_jax._src import io as rqio
    >>> # qparams, qapply = rq.transform(apply_fn, params, calib, config)
    >>> # rqio.save("vit_w4a4.safetensors", qparams, {"model": "deit-s", "top1": 76.1})
    >>> # qparams, meta = rqio.load("vit_w4a4.safetensors")
    >>> # logits = qapply(qparams, images)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import secrets
import struct
import urllib.parse
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src import quantizers as qz
from repquant_jax._src.state import QParams

ml_dtypes: ModuleType | None
try:  # bfloat16 / float8 / int4 dtypes; jax depends on ml_dtypes, so it is there in practice.
    ml_dtypes = importlib.import_module("ml_dtypes")
except ImportError:  # pragma: no cover
    ml_dtypes = None

__all__ = ["FORMAT_VERSION", "FORMAT_NAME", "save", "load"]

FORMAT_VERSION = 2  # 2: input_scales (branch folds); format 1 files still load
"""Version of the file layout written by :func:`save`; :func:`load` reads versions <= this."""

FORMAT_NAME = "repquant_jax"
"""Value of the document's ``format`` entry and name of its ``__metadata__`` key."""

_METADATA_KEY = FORMAT_NAME
_QP_GROUPS = ("weights", "activations")
_OFFSET_GROUPS = ("input_offsets", "output_offsets", "input_scales")

# numpy dtype name -> safetensors dtype code, for the dtypes stored natively.
_NATIVE_CODES = {
    "bool": "BOOL",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "repquant_jax._src.io needs the 'safetensors' package: pip install safetensors (or repquant-jax[models])"
        ) from e
    return safetensors


def _dtype(name: str) -> np.dtype:
    """The numpy dtype called ``name``, including the ml_dtypes ones."""
    if ml_dtypes is not None and hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _is_ml_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is one of ml_dtypes' (numpy kind 'V', like structured dtypes)."""
    if ml_dtypes is None or dtype.names is not None:
        return False
    try:
        return _dtype(dtype.name) == dtype
    except TypeError:
        return False


def _escape(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _checksum(doc_without_sha: Mapping[str, Any], stored: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(_canonical_json(doc_without_sha).encode("ascii"))
    for key in sorted(stored):
        kb = key.encode("utf-8")
        data = stored[key].reshape(-1).view(np.uint8)  # Stored arrays are C-contiguous.
        h.update(struct.pack("<Q", len(kb)))
        h.update(kb)
        h.update(struct.pack("<Q", data.size))
        h.update(data.data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Saving


def _path_component(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_type(leaf: Any) -> str | None:
    """The ``type`` tag of a supported leaf, or None."""
    if isinstance(leaf, jax.Array):
        return "jax"
    if isinstance(leaf, np.ndarray):
        return "numpy"
    if isinstance(leaf, np.generic):
        return "numpy_scalar"
    if type(leaf) is bool:
        return "bool"
    if type(leaf) is int:
        return "int"
    if type(leaf) is float:
        return "float"
    return None


class _Writer:
    """Collects the tensors and their manifest entries."""

    def __init__(self) -> None:
        self.stored: dict[str, np.ndarray] = {}
        self.manifest: dict[str, dict[str, Any]] = {}

    def add(self, key: str, leaf: Any, where: str) -> str:
        if key in self.stored:  # Defensive: '#' is always escaped in components, so this is unique.
            key = f"{key}#{len(self.stored)}"
        kind = _leaf_type(leaf)
        if kind is None:
            raise TypeError(
                f"cannot save {where}: unsupported leaf of type {type(leaf).__name__} "
                "(expected a jax.Array, numpy array/scalar or Python bool/int/float)"
            )
        try:
            arr = np.asarray(leaf)
        except OverflowError as e:
            raise TypeError(f"cannot save {where}: Python int {leaf} does not fit in int64") from e
        if arr.dtype.kind in "OUSMm" or (arr.dtype.kind == "V" and not _is_ml_dtype(arr.dtype)):
            raise TypeError(f"cannot save {where}: arrays of dtype {arr.dtype} are not supported")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d.)
            arr = arr.copy(order="C")
        name = arr.dtype.name
        if name in _NATIVE_CODES:
            encoding, stored = "native", arr
        else:
            encoding, stored = "bytes", arr.reshape(-1).view(np.uint8)
        self.stored[key] = stored
        self.manifest[key] = {
            "dtype": name,
            "shape": list(arr.shape),
            "type": kind,
            "encoding": encoding,
        }
        return key


_UNSUPPORTED = object()


def _structure(node: Any, path: tuple[str, ...], keys: dict[tuple[str, ...], str]) -> Any:
    """JSON description of the containers of ``node``; _UNSUPPORTED on a custom node."""
    from flax.core import FrozenDict

    if node is None:
        return {"t": "none"}
    if type(node) in (dict, FrozenDict):
        items = []
        for k, v in node.items():
            if type(k) is str:
                kj: Any = k
            elif type(k) is int:
                kj = {"int": k}
            else:
                return _UNSUPPORTED
            child = _structure(v, path + (str(k),), keys)
            if child is _UNSUPPORTED:
                return _UNSUPPORTED
            items.append([kj, child])
        return {"t": "dict" if type(node) is dict else "frozendict", "items": items}
    if type(node) in (list, tuple):
        children = []
        for i, v in enumerate(node):
            child = _structure(v, path + (str(i),), keys)
            if child is _UNSUPPORTED:
                return _UNSUPPORTED
            children.append(child)
        return {"t": type(node).__name__, "items": children}
    if path in keys:
        return {"t": "leaf", "key": keys[path]}
    return _UNSUPPORTED


def _rebuild(node: Mapping[str, Any], leaves: Mapping[str, Any]) -> Any:
    t = node["t"]
    if t == "leaf":
        return leaves[node["key"]]
    if t == "none":
        return None
    if t in ("dict", "frozendict"):
        d = {}
        for kj, child in node["items"]:
            k = kj["int"] if isinstance(kj, dict) else kj
            d[k] = _rebuild(child, leaves)
        if t == "frozendict":
            from flax.core import FrozenDict

            return FrozenDict(d)
        return d
    if t in ("list", "tuple"):
        items = [_rebuild(child, leaves) for child in node["items"]]
        return items if t == "list" else tuple(items)
    raise ValueError(f"unknown node type {t!r} in the params structure")


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (tuples -> lists, mappings -> dicts); TypeError if it isn't."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata must be JSON-serializable: {where} has a non-str key {k!r}")
            out[str(k)] = _jsonable(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"metadata must be JSON-serializable: {where} is a {type(value).__module__}.{type(value).__qualname__} "
        f"({value!r:.80}); use None, bool, int, float, str, list, tuple or dict with str keys "
        "(convert numpy/jax scalars with float() or int())"
    )


def _static_fields(qp: qz.QuantParams, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    static: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for f in dataclasses.fields(qp):
        value = getattr(qp, f.name)
        if f.metadata.get("pytree_node", True):
            arrays[f.name] = value
        else:
            if isinstance(value, (np.integer, np.bool_)):
                value = value.item()
            try:
                static[f.name] = _jsonable(value, f"{where}.{f.name}")
            except TypeError as e:
                raise TypeError(f"cannot save {where}: static field {f.name}={value!r} is not JSON-serializable") from e
    return static, arrays


def _encode(qparams: QParams, metadata: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    writer = _Writer()
    # params
    with_path, treedef = jax.tree_util.tree_flatten_with_path(qparams.params)
    leaf_keys: list[str] = []
    keys_by_path: dict[tuple[str, ...], str] = {}
    for path, leaf in with_path:
        comps = tuple(_path_component(e) for e in path)
        key = "/".join(["params", *(_escape(c) for c in comps)])
        key = writer.add(key, leaf, f"params leaf {jax.tree_util.keystr(path)}")
        leaf_keys.append(key)
        keys_by_path.setdefault(comps, key)
    structure = _structure(qparams.params, (), keys_by_path)
    if structure is not _UNSUPPORTED:
        # Self-check: the rebuilt containers must flatten exactly like the original.
        rebuilt = _rebuild(structure, {k: 0 for k in leaf_keys})
        # jaxlib has no stub for PyTreeDef, so mypy sees an unresolved type there
        if jax.tree_util.tree_structure(rebuilt) != treedef or jax.tree_util.tree_leaves(  # type: ignore[operator]
            _rebuild(structure, {k: i for i, k in enumerate(leaf_keys)})
        ) != list(range(len(leaf_keys))):
            structure = _UNSUPPORTED
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "params": {
            "leaves": leaf_keys,
            "treedef": _shorten(str(treedef), 2000),
            "structure": None if structure is _UNSUPPORTED else structure,
        },
    }
    for group in _QP_GROUPS:
        entries = []
        for site, qp in getattr(qparams, group).items():
            where = f"{group}[{site!r}]"
            if not isinstance(site, str):
                raise TypeError(f"cannot save {where}: site names must be str")
            if not isinstance(qp, qz.QuantParams):
                raise TypeError(f"cannot save {where}: expected a QuantParams, got {type(qp).__name__}")
            static, arrays = _static_fields(qp, where)
            keys = {
                name: writer.add(f"{group}/{_escape(site)}/{name}", value, f"{where}.{name}")
                for name, value in arrays.items()
            }
            entries.append({"site": site, "static": static, "arrays": keys})
        doc[group] = entries
    for group in _OFFSET_GROUPS:
        entries = []
        for site, value in getattr(qparams, group).items():
            where = f"{group}[{site!r}]"
            if not isinstance(site, str):
                raise TypeError(f"cannot save {where}: site names must be str")
            entries.append({"site": site, "key": writer.add(f"{group}/{_escape(site)}", value, where)})
        doc[group] = entries
    doc["metadata"] = metadata
    doc["tensors"] = writer.manifest
    doc["sha256"] = _checksum(doc, writer.stored)
    return writer.stored, doc


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _library_version() -> str:
    import repquant_jax

    return str(getattr(repquant_jax, "__version__", "unknown"))


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save(path: str | os.PathLike, qparams: QParams, metadata: Mapping[str, Any] | None = None) -> None:
    """Writes ``qparams`` (and optional JSON metadata) to one safetensors file.

    The write is atomic: a temporary file in the same directory is written,
    fsynced and renamed over ``path``, so readers see the old file or the new
    one, and a crash never leaves a partial file at ``path``. The format is
    described in the module docstring.

    Args:
        path: destination file (conventionally ``*.safetensors``). Its directory
            must exist; an existing file is replaced.
        qparams: the quantized parameters from :func:`repquant_jax._src.transform`.
            ``params`` may be any pytree of arrays; custom nodes (e.g.
            ``nnx.State``) are fine but then :func:`load` needs ``params_like``.
        metadata: JSON-serializable mapping with ``str`` keys (None, bool, int,
            float, str, list, tuple, dict). Tuples come back as lists.

    Raises:
        TypeError: ``metadata`` is not JSON-serializable, or a leaf is not an
            array (or a Python/numpy scalar).

    Example:
        >>> # qparams, qapply = repquant_jax._src.transform(apply_fn, params, calib, config)
        >>> # save("model_w4a4.safetensors", qparams, {"w_bits": 4, "a_bits": 4})
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"save() expects a QParams, got {type(qparams).__name__}")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping with str keys, got {type(metadata).__name__}")
    stored, doc = _encode(qparams, _jsonable(metadata, "metadata"))
    header = {_METADATA_KEY: json.dumps(doc, ensure_ascii=False, separators=(",", ":"))}

    st = _safetensors()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        st.numpy.save_file(stored, tmp, metadata=header)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


# --------------------------------------------------------------------------------------
# Loading


def _read_header(data: bytes, path: str) -> dict[str, Any]:
    """Parses the safetensors JSON header, with messages for truncated/foreign files."""
    if len(data) < 8:
        raise ValueError(
            f"{path}: file is truncated or not a safetensors file ({len(data)} bytes, "
            "shorter than the 8-byte safetensors header length)"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (implausible header length {n})")
        raise ValueError(
            f"{path}: file is truncated: the safetensors header needs {n} bytes, "
            f"only {len(data) - 8} follow the length field"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file or corrupted header (header is not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__"
        and isinstance(v, dict)
        and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2
    ]
    have = len(data) - 8 - n
    need = max([e for e in ends if isinstance(e, int)], default=0)
    if need > have:
        raise ValueError(f"{path}: file is truncated: its tensors need {need} bytes of data, only {have} are present")
    return header


def _read_doc(header: Mapping[str, Any], path: str) -> dict[str, Any]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or _METADATA_KEY not in meta:
        raise ValueError(
            f"{path}: not a repquant-jax file (a safetensors file without a {_METADATA_KEY!r} entry "
            "in its header metadata)"
        )
    try:
        doc = json.loads(meta[_METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupted repquant-jax header (its JSON document does not parse: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path}: not a repquant-jax file (format is {doc.get('format') if isinstance(doc, dict) else doc!r})"
        )
    version = doc.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(f"{path}: corrupted repquant-jax header (format_version is {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer repquant-jax (format {version}); this version reads "
            f"format {FORMAT_VERSION}. Upgrade repquant-jax to load it."
        )
    return doc


def _decode_tensors(data: bytes, doc: Mapping[str, Any], path: str) -> dict[str, np.ndarray]:
    st = _safetensors()
    try:
        raw = st.deserialize(data)
    except Exception as e:  # SafetensorError
        raise ValueError(f"{path}: corrupted or truncated safetensors file: {e}") from e
    manifest = doc.get("tensors")
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: corrupted repquant-jax header (no tensor manifest)")
    raw = dict(raw)
    if set(raw) != set(manifest):
        missing = sorted(set(manifest) - set(raw))
        extra = sorted(set(raw) - set(manifest))
        raise ValueError(
            f"{path}: corrupted file: tensors missing {missing[:3]} / unexpected {extra[:3]} "
            "compared with the repquant-jax manifest"
        )
    stored: dict[str, np.ndarray] = {}
    for key, info in manifest.items():
        view = raw[key]
        try:
            dtype = _dtype(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            encoding = info["encoding"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupted manifest entry for tensor {key!r}: {e}") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if encoding == "native":
            expected_code, expected_shape = _NATIVE_CODES.get(dtype.name), list(shape)
        elif encoding == "bytes":
            expected_code, expected_shape = "U8", [nbytes]
        else:
            raise ValueError(f"{path}: unknown encoding {encoding!r} for tensor {key!r}")
        if view["dtype"] != expected_code or list(view["shape"]) != expected_shape or len(view["data"]) != nbytes:
            raise ValueError(
                f"{path}: corrupted file: tensor {key!r} is {view['dtype']}{list(view['shape'])}, "
                f"the manifest says {dtype.name}{list(shape)}"
            )
        buf = np.frombuffer(view["data"], dtype=np.uint8)
        stored[key] = buf if encoding == "bytes" else buf.view(dtype).reshape(shape)
    return stored


def _leaf(stored: np.ndarray, info: Mapping[str, Any], key: str, path: str) -> Any:
    dtype = _dtype(info["dtype"])
    arr = stored.view(dtype).reshape(tuple(info["shape"])) if info["encoding"] == "bytes" else stored
    kind = info["type"]
    if kind == "jax":
        out = jnp.asarray(arr)
        if out.dtype != dtype:
            raise ValueError(
                f"{path}: tensor {key!r} is {dtype.name} but JAX turned it into {out.dtype} "
                "(enable 64-bit types with jax.config.update('jax_enable_x64', True) to load it exactly)"
            )
        return out
    if kind == "numpy":
        return np.array(arr)  # A writable copy.
    if kind == "numpy_scalar":
        return arr[()]
    if kind in ("float", "int", "bool"):
        return {"float": float, "int": int, "bool": bool}[kind](arr[()].item())
    raise ValueError(f"{path}: unknown leaf type {kind!r} for tensor {key!r}")


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    dtype = getattr(leaf, "dtype", None)
    return shape, np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def load(path: str | os.PathLike, params_like: Any | None = None) -> tuple[QParams, dict]:
    """Reads a file written by :func:`save`.

    The whole file is read once and verified (structure, then SHA-256) before
    anything is built.

    Args:
        path: the file.
        params_like: optional pytree with the structure of the saved params
            (real arrays or :class:`jax.ShapeDtypeStruct`, e.g. the ``params``
            you passed to ``transform`` or ``nnx.split(model)[1]``). Required when
            the params had custom pytree nodes (``nnx.State``, namedtuples...);
            when given, the params are rebuilt with its treedef (after checking
            leaf count, shapes and dtypes) instead of the stored containers.

    Returns:
        ``(qparams, metadata)``: the :class:`QParams`, bitwise equal to the saved
        one, and the metadata dict given to :func:`save` (``{}`` if none).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated, corrupted (checksum mismatch), not a
            repquant-jax file, from a newer format version, or ``params_like``
            does not match the saved params (or is missing when needed).

    Example:
        >>> # qparams, meta = load("model_w4a4.safetensors")
        >>> # qparams, meta = load("nnx_model.safetensors", params_like=nnx.split(model)[1])
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    header = _read_header(data, path)
    doc = _read_doc(header, path)
    stored = _decode_tensors(data, doc, path)
    doc_without_sha = {k: v for k, v in doc.items() if k != "sha256"}
    actual = _checksum(doc_without_sha, stored)
    if actual != doc.get("sha256"):
        raise ValueError(
            f"{path}: checksum mismatch, the file is corrupted (SHA-256 {actual}, "
            f"the header records {doc.get('sha256')})"
        )
    try:
        return _build(doc, stored, params_like, path), dict(doc["metadata"])
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: malformed repquant-jax document ({type(e).__name__}: {e})") from e


def _build(doc: Mapping[str, Any], stored: Mapping[str, np.ndarray], params_like: Any, path: str) -> QParams:
    manifest = doc["tensors"]

    def leaf(key: str) -> Any:
        return _leaf(stored[key], manifest[key], key, path)

    pdoc = doc["params"]
    keys = pdoc["leaves"]
    if params_like is not None:
        like, treedef = jax.tree_util.tree_flatten_with_path(params_like)
        if len(like) != len(keys):
            raise ValueError(
                f"params_like has {len(like)} leaves, the file has {len(keys)} params leaves "
                f"(saved structure: {pdoc['treedef']})"
            )
        for i, ((lpath, lleaf), key) in enumerate(zip(like, keys)):
            shape, dtype = _shape_dtype(lleaf)
            info = manifest[key]
            fshape, fdtype = tuple(info["shape"]), _dtype(info["dtype"])
            if shape != fshape or dtype != fdtype:
                raise ValueError(
                    f"params_like does not match the file at leaf {i} "
                    f"({jax.tree_util.keystr(lpath) or '<root>'}; saved as {key!r}): params_like has "
                    f"{dtype.name}{list(shape)}, the file has {fdtype.name}{list(fshape)}"
                )
        params = jax.tree_util.tree_unflatten(treedef, [leaf(k) for k in keys])
    elif pdoc["structure"] is not None:
        params = _rebuild(pdoc["structure"], {k: leaf(k) for k in keys})
    else:
        raise ValueError(
            f"{path}: the saved params contain custom pytree nodes ({pdoc['treedef']:.200}); "
            "pass params_like= (e.g. the params given to transform, or nnx.split(model)[1]) "
            "to rebuild them"
        )
    groups: dict[str, dict[str, Any]] = {}
    for group in _QP_GROUPS:
        groups[group] = {}
        for entry in doc[group]:
            arrays = {name: leaf(k) for name, k in entry["arrays"].items()}
            groups[group][entry["site"]] = qz.QuantParams(**arrays, **entry["static"])
    for group in _OFFSET_GROUPS:  # format 1 files have no input_scales
        groups[group] = {entry["site"]: leaf(entry["key"]) for entry in doc.get(group, [])}
    return QParams(params=params, **groups)
