"""repquant_zoo.data: the local TFDS Fashion-MNIST builder and the batch iterators.

Uses the real IDX files of the Debian package ``dataset-fashion-mnist`` (``make test``
installs it); the dataset is built once per session into a temporary data_dir.
"""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

from repquant_zoo.data import batches as B
from repquant_zoo.data import fashion_mnist as fm

try:
    IDX_DIR = fm.find_idx_dir()
except FileNotFoundError:
    IDX_DIR = None

needs_idx = pytest.mark.skipif(
    IDX_DIR is None,
    reason="Fashion-MNIST IDX files not installed (apt-get install -y dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if IDX_DIR is None:
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install -y dataset-fashion-mnist)")
    d = tmp_path_factory.mktemp("tfds")
    fm.build(d, quiet=True)
    return d


@pytest.fixture(scope="module")
def test_src(data_dir):
    return fm.load("test", data_dir)


@pytest.fixture(scope="module")
def idx_test():
    images = fm.read_idx(IDX_DIR / "t10k-images-idx3-ubyte.gz")
    labels = fm.read_idx(IDX_DIR / "t10k-labels-idx1-ubyte.gz")
    return images[..., None], labels.astype(np.int64)


@needs_idx
def test_splits_sizes_shapes_and_labels(data_dir, test_src):
    train = fm.load("train", data_dir)
    assert len(train) == 60_000 and len(test_src) == 10_000
    for src in (train, test_src):
        for i in (0, 1, len(src) - 1):
            ex = src[i]
            img = np.asarray(ex["image"])
            assert img.shape == (28, 28, 1) and img.dtype == np.uint8
            assert 0 <= int(ex["label"]) <= 9
    # The known first labels of the original files (ankle boot, T-shirt, T-shirt, dress, ...).
    assert [int(train[i]["label"]) for i in range(5)] == [9, 0, 0, 3, 0]
    assert int(test_src[0]["label"]) == 9
    assert "tensorflow" not in sys.modules  # no TensorFlow needed anywhere


@needs_idx
def test_order_is_the_files_order(data_dir, idx_test):
    images, labels = fm.load_arrays("test", data_dir)
    np.testing.assert_array_equal(images, idx_test[0])
    np.testing.assert_array_equal(labels, idx_test[1])
    assert sorted(np.bincount(labels).tolist()) == [1000] * 10
    # Loading again (a prepared dataset is reused, not rebuilt) gives the same order.
    again = fm.load("test[:300]", data_dir)
    np.testing.assert_array_equal(np.stack([np.asarray(again[i]["image"]) for i in range(300)]), idx_test[0][:300])


@needs_idx
def test_calibration_batches_are_seeded(test_src):
    a = list(B.calibration_batches(test_src, 32, 32, seed=0, preprocess=B.fashion_mnist_preprocess))
    b = list(B.calibration_batches(test_src, 32, 32, seed=0, preprocess=B.fashion_mnist_preprocess))
    c = list(B.calibration_batches(test_src, 32, 32, seed=1, preprocess=B.fashion_mnist_preprocess))
    assert len(a) == 1 and a[0].shape == (32, 28, 28, 1) and a[0].dtype == np.float32
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    lo, hi = -0.2860 / 0.3530, (1 - 0.2860) / 0.3530
    assert a[0].min() >= lo - 1e-6 and a[0].max() <= hi + 1e-6

    two = list(B.calibration_batches(test_src, num_samples=64, batch_size=32, seed=3))
    assert [x.shape for x in two] == [(32, 28, 28, 1)] * 2 and two[0].dtype == np.uint8


def test_calibration_draw_is_distinct_and_seeded():
    source = [{"image": np.full((2, 2, 1), i, np.int32), "label": i % 10} for i in range(500)]

    def drawn(seed, n=100, bs=25):
        out = np.concatenate(list(B.calibration_batches(source, n, bs, seed=seed)))
        return out[:, 0, 0, 0]

    ids = drawn(0)
    assert len(set(ids.tolist())) == 100  # without replacement
    np.testing.assert_array_equal(ids, drawn(0))
    assert set(ids.tolist()) != set(drawn(1).tolist())
    # batch_size >= num_samples: one batch of num_samples.
    (only,) = B.calibration_batches(source, 10, 32, seed=0)
    assert only.shape == (10, 2, 2, 1)
    # The whole source can be drawn.
    assert sorted(drawn(5, n=500, bs=100).tolist()) == list(range(500))


@needs_idx
def test_eval_batches_cover_the_test_set_once(test_src, idx_test):
    got_images, got_labels, sizes = [], [], []
    for images, labels in B.eval_batches(test_src, batch_size=256):
        got_images.append(images)
        got_labels.append(labels)
        sizes.append(len(labels))
    assert sizes == [256] * 39 + [16]  # last partial batch kept
    np.testing.assert_array_equal(np.concatenate(got_images), idx_test[0])
    np.testing.assert_array_equal(np.concatenate(got_labels), idx_test[1])
    assert got_labels[0].dtype == np.int64

    images, _ = next(B.eval_batches(test_src, 8, preprocess=B.fashion_mnist_preprocess))
    want = (idx_test[0][:8].astype(np.float32) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(images, want, rtol=1e-6, atol=1e-6)
    assert images.dtype == np.float32 and images.shape == (8, 28, 28, 1)


@needs_idx
def test_preprocess_constants_match_the_training_set():
    images = fm.read_idx(IDX_DIR / "train-images-idx3-ubyte.gz")
    x = images.astype(np.float64) / 255
    assert abs(x.mean() - B.FASHION_MNIST_MEAN) < 5e-4
    assert abs(x.std() - B.FASHION_MNIST_STD) < 5e-4


def test_errors():
    source = [{"image": np.zeros((2, 2, 1), np.uint8), "label": 0} for _ in range(40)]
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_samples must be positive"):
            B.calibration_batches(source, num_samples=n)  # raised at the call
    with pytest.raises(ValueError, match="larger than the data source"):
        B.calibration_batches(source, num_samples=41)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        B.calibration_batches(source, num_samples=8, batch_size=0)
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        B.calibration_batches(source, num_samples=30, batch_size=16)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        B.eval_batches(source, batch_size=0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        B.calibration_batches(source, num_samples=2.5)
    with pytest.raises(TypeError, match="random-access data source"):
        B.eval_batches(iter(source))
    with pytest.raises(KeyError, match="pass image_key"):
        next(B.eval_batches([{"img": np.zeros(2)}]))
    ragged = [{"image": np.zeros((2 + i, 2)), "label": 0} for i in range(2)]
    with pytest.raises(ValueError, match="preprocess function"):
        next(B.eval_batches(ragged))


def test_missing_idx_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_IDX_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(fm.IDX_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fm.find_idx_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.build(tmp_path / "tfds", quiet=True)


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array(arr.shape, ">u4").tobytes()
    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(fm.read_idx(p), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        fm.read_idx(bad)
