"""Tests for repquant_jax._src.io: save/load of QParams as one safetensors file."""

from __future__ import annotations

import json
import os
import struct

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import zoo
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

import repquant_jax as rq
from repquant_jax._src import io as rqio
from repquant_jax._src import quantizers as qz
from repquant_jax._src.state import QParams

# ----------------------------------------------------------------------------- helpers


def assert_bitwise_equal(a, b):
    """Same treedef (incl. static fields), and per leaf: same type, dtype, shape and bytes."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    chex.assert_trees_all_equal(a, b, strict=True)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        where = jax.tree_util.keystr(path)
        assert type(x) is type(y), where
        xa, ya = np.asarray(x), np.asarray(y)
        assert xa.dtype == ya.dtype and xa.shape == ya.shape, where
        assert xa.tobytes() == ya.tobytes(), where


# RepQ-ViT (norm folds -> offsets, log√2 softmax) with min-max calibration: the file format
# does not depend on how scales were found, and the percentile search would triple the runtime.
CONFIG = rq.presets.repq_vit(4, 4, weight_calibration="minmax", activation_calibration="minmax", min_rows_per_channel=1)


def _transform(model):
    return rq.transform(model.apply_fn, model.params, [model.inputs], CONFIG, verbose=False)


@pytest.fixture(scope="module")
def vit():
    m = zoo.linen_vit_block()
    return m, *_transform(m)


@pytest.fixture(scope="module")
def llama():
    m = zoo.llama_block()
    return m, *_transform(m)


@pytest.fixture(scope="module")
def nnx_vit():
    m = zoo.nnx_vit_block()
    return m, *_transform(m)


def _small_qparams(params=None, sites=("a",)) -> QParams:
    if params is None:
        params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
    return QParams(
        params=params,
        weights={s: qz.symmetric(scale=jnp.array([0.5, 0.25, 1.0]), bits=8, axis=-1) for s in sites},
        activations={s: qz.uniform(scale=0.1, zero_point=3.0, bits=4) for s in sites},
        input_offsets={s: jnp.ones((3,), jnp.float32) for s in sites},
        output_offsets={s: jnp.full((3,), 2.0, jnp.bfloat16) for s in sites},
    )


def _header(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return data, n, json.loads(data[8 : 8 + n])


def _rewrite_doc(path, out, edit):
    """Rewrites the repquant document of ``path`` into ``out`` with safetensors directly."""
    tensors = safetensors.numpy.load_file(path)
    _, _, header = _header(path)
    doc = json.loads(header["__metadata__"]["repquant_jax"])
    edit(doc)
    safetensors.numpy.save_file(tensors, out, metadata={"repquant_jax": json.dumps(doc)})


# ------------------------------------------------------------------------- round trips


def _check_roundtrip(tmp_path, model, qparams, qapply, **load_kwargs):
    meta = {
        "model": model.apply_fn.__qualname__,
        "bits": [4, 4],
        "acc": 0.1 + 0.2,
        "none": None,
        "nested": {"ok": True, "name": "ü ∑ 🙂"},
    }
    path = tmp_path / "q.safetensors"
    rqio.save(path, qparams, meta)
    loaded, meta2 = rqio.load(path, **load_kwargs)
    assert meta2 == meta
    assert_bitwise_equal(loaded, qparams)
    ref = np.asarray(qapply(qparams, *model.inputs))
    out = np.asarray(qapply(loaded, *model.inputs))
    assert out.dtype == ref.dtype and out.tobytes() == ref.tobytes()
    assert not list(tmp_path.glob(".*.tmp"))
    return loaded


def test_roundtrip_linen_vit(tmp_path, vit):
    model, qparams, qapply = vit
    loaded = _check_roundtrip(tmp_path, model, qparams, qapply)
    assert type(loaded.params) is type(qparams.params)
    assert loaded.weights and loaded.activations
    # Insertion order of the site dicts is kept.
    assert list(loaded.weights) == list(qparams.weights)
    assert list(loaded.activations) == list(qparams.activations)
    # Deterministic: saving the loaded qparams gives the same bytes.
    rqio.save(
        tmp_path / "again.safetensors",
        loaded,
        {
            "model": model.apply_fn.__qualname__,
            "bits": [4, 4],
            "acc": 0.1 + 0.2,
            "none": None,
            "nested": {"ok": True, "name": "ü ∑ 🙂"},
        },
    )
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "q.safetensors").read_bytes()


def test_roundtrip_llama_offsets(tmp_path, llama):
    model, qparams, qapply = llama
    assert qparams.input_offsets and qparams.output_offsets
    loaded = _check_roundtrip(tmp_path, model, qparams, qapply)
    assert list(loaded.output_offsets) == list(qparams.output_offsets)
    # params_like works for plain dicts too (and may be abstract).
    abstract = jax.eval_shape(lambda p: p, model.params)
    again, _ = rqio.load(tmp_path / "q.safetensors", params_like=abstract)
    assert_bitwise_equal(again, qparams)


def test_roundtrip_branch_fold_input_scales(tmp_path):
    model = zoo.bert_block()  # post-LN: the norm is branch-folded
    qparams, qapply = _transform(model)
    assert qparams.input_scales
    loaded = _check_roundtrip(tmp_path, model, qparams, qapply)
    assert list(loaded.input_scales) == list(qparams.input_scales)


def test_format_1_files_load_without_input_scales(tmp_path, vit):
    model, qparams, qapply = vit
    path, old = tmp_path / "q.safetensors", tmp_path / "v1.safetensors"
    rqio.save(path, qparams)

    def as_version_1(doc):
        doc["format_version"] = 1
        del doc["input_scales"]
        doc.pop("sha256")
        doc["sha256"] = rqio._checksum(doc, safetensors.numpy.load_file(path))

    _rewrite_doc(path, old, as_version_1)
    loaded, _ = rqio.load(old)
    assert loaded.input_scales == {}
    assert_bitwise_equal(loaded.replace(input_scales={}), qparams)


def test_roundtrip_nnx_needs_params_like(tmp_path, nnx_vit):
    model, qparams, qapply = nnx_vit
    path = tmp_path / "q.safetensors"
    rqio.save(path, qparams)
    with pytest.raises(ValueError, match="custom pytree nodes.*params_like"):
        rqio.load(path)
    _check_roundtrip(tmp_path, model, qparams, qapply, params_like=model.params)
    # Mismatching params_like: the first mismatching leaf is named.
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros((3, 3), x.dtype) if "'fc1'" in str(p) and "'kernel'" in str(p) else x, model.params
    )
    with pytest.raises(ValueError, match=r"leaf \d+ .*fc1.*kernel.*float32\[3, 3\].*float32\[32, 128\]"):
        rqio.load(path, params_like=bad)
    with pytest.raises(ValueError, match="params_like has 1 leaves, the file has 16"):
        rqio.load(path, params_like=[jnp.zeros(3)])
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), model.params)
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        rqio.load(path, params_like=half)


def test_containers_dtypes_and_odd_site_names(tmp_path):
    odd = ["blocks.0/attn:qkv", "a[0]#b c", "ünï/código:ψ", "", "%41", "x%2Fy", "x/y"]
    params = {
        "layers": [
            {"w": jnp.ones((2, 3), jnp.bfloat16), "b": None},
            (np.arange(4, dtype=np.int8), np.float16(1.5), 3.25, 7, True),
        ],
        "frozen": FrozenDict({"z": jnp.zeros((0, 3), jnp.float32), "n": np.array(-0.0, np.float64)}),
        "ints": {3: np.arange(3, dtype=np.uint16), 1: np.array([True, False])},
        "exotic": (
            np.array([1, -2, 7], ml_dtypes.int4),
            np.array([1 + 2j], np.complex128),
            jnp.array([1.0, -2.5], jnp.float8_e4m3fn),
            np.array([np.nan, -np.inf], np.float32),
        ),
        "big_endian": np.arange(3, dtype=">f4"),
        "strided": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
    }
    qparams = _small_qparams(params, odd)
    path = tmp_path / "odd name ü.safetensors"
    rqio.save(path, qparams)
    loaded, meta = rqio.load(path)
    assert meta == {}
    assert list(loaded.weights) == odd and list(loaded.output_offsets) == odd
    assert list(loaded.params["ints"]) == [3, 1]  # Insertion order, int keys.
    assert type(loaded.params["frozen"]) is FrozenDict
    assert loaded.params["big_endian"].dtype == np.float32  # Values kept; byte order becomes native.
    np.testing.assert_array_equal(loaded.params["big_endian"], params["big_endian"])
    loaded.params["big_endian"] = params["big_endian"]
    assert_bitwise_equal(loaded, qparams)
    assert type(loaded.params["layers"][1][2]) is float and type(loaded.params["layers"][1][4]) is bool
    assert type(loaded.params["layers"][1][1]) is np.float16
    assert loaded.params["layers"][0]["w"].dtype == jnp.bfloat16
    assert loaded.output_offsets["x/y"].dtype == jnp.bfloat16
    # Native safetensors dtypes stay readable by other tools (bf16 as BF16, escaped keys).
    _, _, header = _header(path)
    assert header["params/layers/0/w"]["dtype"] == "BF16"
    assert "weights/blocks.0%2Fattn%3Aqkv/scale" in header
    assert header["params/exotic/0"]["dtype"] == "U8"  # int4: raw bytes


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=4, unique=True))
def test_site_names_property(tmp_path_factory, names):
    path = tmp_path_factory.mktemp("prop") / "q.safetensors"
    qparams = _small_qparams(sites=names)
    rqio.save(path, qparams)
    loaded, _ = rqio.load(path)
    assert list(loaded.weights) == names
    assert_bitwise_equal(loaded, qparams)


def test_read_only_numpy_inputs_untouched(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    w.flags.writeable = False
    big = np.arange(4, dtype=">i4")
    big.flags.writeable = False
    before = (w.copy(), big.copy())
    qparams = _small_qparams({"w": w, "big": big})
    rqio.save(tmp_path / "q.safetensors", qparams)
    assert not w.flags.writeable and not big.flags.writeable
    np.testing.assert_array_equal(w, before[0])
    assert big.dtype == np.dtype(">i4") and big.tobytes() == before[1].tobytes()
    loaded, _ = rqio.load(tmp_path / "q.safetensors")
    assert loaded.params["w"].flags.writeable  # Loaded numpy leaves are independent copies.
    loaded.params["w"][0, 0] = 42.0
    assert w[0, 0] == 0.0


def test_metadata_must_be_json(tmp_path):
    q = _small_qparams()
    for bad, where in [
        ({"a": object()}, r"metadata\['a'\]"),
        ({"a": [1, np.float32(1.0)]}, r"metadata\['a'\]\[1\].*float\(\)"),
        ({1: "x"}, "non-str key 1"),
        ({"a": {"b": {2, 3}}}, r"metadata\['a'\]\['b'\]"),
    ]:
        with pytest.raises(TypeError, match=where):
            rqio.save(tmp_path / "q.safetensors", q, bad)
    with pytest.raises(TypeError, match="mapping"):
        rqio.save(tmp_path / "q.safetensors", q, ["not", "a", "dict"])
    assert not list(tmp_path.iterdir())
    rqio.save(tmp_path / "q.safetensors", q, {"t": (1, (2, 3))})
    assert rqio.load(tmp_path / "q.safetensors")[1] == {"t": [1, [2, 3]]}  # Tuples become lists.


def test_unsupported_leaf(tmp_path):
    with pytest.raises(TypeError, match=r"params leaf \['s'\].*str"):
        rqio.save(tmp_path / "q.safetensors", _small_qparams({"s": "text"}))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ errors


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "q.safetensors"
    rqio.save(path, _small_qparams(), {"note": "x"})
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        rqio.load(tmp_path / "nope.safetensors")


def test_truncated(saved, tmp_path):
    data, n, _ = _header(saved)
    for cut in [0, 5, 8 + n // 2, 8 + n, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            rqio.load(bad)


def test_corrupted_bytes(saved):
    data, n, header = _header(saved)
    start, end = header["weights/a/scale"]["data_offsets"]
    flipped = bytearray(data)
    flipped[8 + n + start + 1] ^= 0x01
    saved.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        rqio.load(saved)


def test_corrupted_document(saved, tmp_path):
    # A changed static field (bits 8 -> 7) in the document is caught by the checksum too.
    def edit(doc):
        doc["weights"][0]["static"]["bits"] = 7

    _rewrite_doc(saved, tmp_path / "edited.safetensors", edit)
    with pytest.raises(ValueError, match="checksum mismatch"):
        rqio.load(tmp_path / "edited.safetensors")
    data, n, _ = _header(saved)
    garbled = bytearray(data)
    garbled[8 + n // 2] = ord("\x01")
    saved.write_bytes(bytes(garbled))
    with pytest.raises(ValueError):
        rqio.load(saved)


def test_future_version(saved, tmp_path):
    out = tmp_path / "future.safetensors"
    future = rqio.FORMAT_VERSION + 1
    _rewrite_doc(saved, out, lambda doc: doc.update(format_version=future))
    msg = f"written by a newer repquant-jax (format {future}); this version reads format {rqio.FORMAT_VERSION}"
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        rqio.load(out)


def test_not_repquant(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, plain)
    with pytest.raises(ValueError, match="not a repquant-jax file"):
        rqio.load(plain)
    other = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, other, metadata={"repquant_jax": '{"format": "x"}'})
    with pytest.raises(ValueError, match="not a repquant-jax file"):
        rqio.load(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a safetensors file at all\n")
    with pytest.raises(ValueError, match="not a safetensors file"):
        rqio.load(text)


# ------------------------------------------------------------------------------ atomic


def _crash_midway(monkeypatch):
    real = safetensors.numpy.save_file

    def crashing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # Leave a half-written file behind, then die.
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("simulated crash during write")

    monkeypatch.setattr(safetensors.numpy, "save_file", crashing)


def test_atomic_write_keeps_old_file(saved, monkeypatch):
    old = saved.read_bytes()
    _crash_midway(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        rqio.save(saved, _small_qparams(sites=("b",)), {"note": "new"})
    assert saved.read_bytes() == old
    assert rqio.load(saved)[1] == {"note": "x"}
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_atomic_write_no_file_on_crash(tmp_path, monkeypatch):
    _crash_midway(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        rqio.save(tmp_path / "q.safetensors", _small_qparams())
    assert not list(tmp_path.iterdir())


def test_atomic_write_fsync_failure(saved, monkeypatch):
    old = saved.read_bytes()

    def failing_fsync(fd):
        raise OSError("simulated fsync failure")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync"):
        rqio.save(saved, _small_qparams(sites=("b",)))
    assert saved.read_bytes() == old
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize(
    "params", [None, {}, [], jnp.arange(3.0), 2.5], ids=["none", "empty_dict", "empty_list", "root_array", "root_float"]
)
def test_trivial_params(tmp_path, params):
    qparams = QParams(params=params, weights={}, activations={}, input_offsets={}, output_offsets={})
    rqio.save(tmp_path / "q.safetensors", qparams)
    loaded, _ = rqio.load(tmp_path / "q.safetensors")
    assert_bitwise_equal(loaded, qparams)
