"""Fashion-MNIST as a local TFDS dataset, built offline from the Debian package's IDX files.

The registry's own ``fashion_mnist`` builder downloads its files; this one reads the four
gzipped IDX files that the Debian package ``dataset-fashion-mnist`` installs (by default in
``/usr/share/datasets/fashion-mnist``) and writes them as ``array_record`` files, which
:func:`tensorflow_datasets.data_source` reads by random access without TensorFlow.

* name ``repquant_fashion_mnist`` (a different name from TFDS's ``fashion_mnist``, so both
  can be registered at once);
* splits ``train`` (60 000) and ``test`` (10 000), in the files' original order
  (``disable_shuffling=True``);
* features ``image``: ``uint8 [28, 28, 1]``, ``label``: ``int64`` class id in 0..9
  (:data:`CLASS_NAMES`).

Where the data lives: ``data_dir`` if given, else ``$REPQUANT_DATA_DIR``, else
``data_cache/`` at the repository root (git-ignored). The dataset is built on first use
(a few seconds, with a progress message on stderr) and reused afterwards.

Example:
    >>> from repquant_zoo.data import fashion_mnist
    >>> test = fashion_mnist.load("test")  # doctest: +SKIP
    >>> len(test), test[0]["image"].shape, int(test[0]["label"])  # doctest: +SKIP
    (10000, (28, 28, 1), 9)
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "repquant_zoo.data needs tensorflow-datasets (no TensorFlow required): pip install 'repquant-jax[data]'"
    ) from e

__all__ = [
    "NAME",
    "CLASS_NAMES",
    "NUM_EXAMPLES",
    "IDX_DIR_ENV",
    "DATA_DIR_ENV",
    "DEFAULT_IDX_DIR",
    "RepquantFashionMnist",
    "default_data_dir",
    "find_idx_dir",
    "read_idx",
    "build",
    "load",
    "load_arrays",
]

#: TFDS name of the builder below.
NAME = "repquant_fashion_mnist"
#: Label id → class name (the order of the original dataset).
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Examples per split.
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
#: Environment variable naming the folder that holds the prepared TFDS data.
DATA_DIR_ENV = "REPQUANT_DATA_DIR"
#: Environment variable naming the folder that holds the gzipped IDX source files.
IDX_DIR_ENV = "REPQUANT_FASHION_MNIST_IDX_DIR"
#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """``$REPQUANT_DATA_DIR`` if set, else ``data_cache/`` at the repository root."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else _REPO_ROOT / "data_cache"


def find_idx_dir(idx_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the folder with the four gzipped IDX files, or raises ``FileNotFoundError``.

    Looked up in order: ``idx_dir``, ``$REPQUANT_FASHION_MNIST_IDX_DIR``,
    :data:`DEFAULT_IDX_DIR` (the Debian package).
    """
    candidates = [idx_dir, os.environ.get(IDX_DIR_ENV), DEFAULT_IDX_DIR]
    for c in candidates:
        if c is None:
            continue
        d = Path(c).expanduser()
        if all((d / f).is_file() for pair in _IDX_FILES.values() for f in pair):
            return d
    tried = ", ".join(str(c) for c in candidates if c is not None)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found (looked in: {tried}). Install them with "
        f"`apt-get install -y dataset-fashion-mnist`, or point ${IDX_DIR_ENV} at a folder "
        f"holding {', '.join(f for pair in _IDX_FILES.values() for f in pair)}."
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a (gzipped) IDX file into a numpy array (big-endian header, any IDX dtype)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header shape {shape} does not match {arr.size} elements")
    return arr.reshape(shape).astype(np.dtype(dtypes[data[2]]).newbyteorder("="))


def _read_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_file, lbl_file = _IDX_FILES[split]
    images = read_idx(idx_dir / img_file)
    labels = read_idx(idx_dir / lbl_file)
    if images.shape != (NUM_EXAMPLES[split], 28, 28) or labels.shape != (NUM_EXAMPLES[split],):
        raise ValueError(f"unexpected Fashion-MNIST {split} shapes: images {images.shape}, labels {labels.shape}")
    return images[..., None], labels.astype(np.int64)


class RepquantFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files (see the module docstring).

    Build it with ``download_and_prepare(file_format="array_record")`` (what :func:`build`
    does); the IDX folder comes from the ``idx_dir`` argument or :func:`find_idx_dir`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built from the Debian dataset-fashion-mnist IDX files."}

    def __init__(self, *, idx_dir: str | os.PathLike[str] | None = None, **kwargs: Any):
        self._idx_dir = idx_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Fashion-MNIST (Zalando), 28x28 grey images of 10 clothing classes.",
            features=tfds.features.FeaturesDict(
                {
                    # A raw uint8 tensor: tfds.features.Image would need TensorFlow (or PIL)
                    # to encode PNGs; raw storage reads back fast with numpy only.
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            citation=(
                "@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for "
                "Benchmarking Machine Learning Algorithms}, author={Han Xiao and Kashif Rasul "
                "and Roland Vollgraf}, journal={arXiv:1708.07747}, year={2017}}"
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing to download
        idx_dir = find_idx_dir(self._idx_dir)
        return {split: self._generate_examples(idx_dir, split) for split in _IDX_FILES}

    def _generate_examples(self, idx_dir: Path, split: str):
        images, labels = _read_split(idx_dir, split)
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


def _builder(data_dir: str | os.PathLike[str] | None, idx_dir=None) -> RepquantFashionMnist:
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return RepquantFashionMnist(data_dir=os.fspath(data_dir), idx_dir=idx_dir)


def build(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    idx_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Prepares the dataset under ``data_dir`` if it is not there yet; returns ``data_dir``.

    Args:
        data_dir: TFDS data folder (default :func:`default_data_dir`).
        idx_dir: folder of the gzipped IDX files (default :func:`find_idx_dir`).
        quiet: suppress the progress message printed to stderr while building.

    Raises:
        FileNotFoundError: the IDX files are not installed (see :func:`find_idx_dir`).
    """
    builder = _builder(data_dir, idx_dir)
    root = Path(builder.data_dir_root)
    if builder.is_prepared():
        return root
    find_idx_dir(idx_dir)  # fail early with the install hint
    if not quiet:
        print(f"repquant_jax: building {NAME} (70k examples) in {root} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tqdm_utils = tfds.core.utils.tqdm_utils
    bars_were_on = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)  # TFDS's per-shard bars; one message is enough
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except FileExistsError:
        # another process built the same folder meanwhile (TFDS renames its finished build)
        if not _builder(data_dir, idx_dir).is_prepared():
            raise
    finally:
        tqdm_utils.display_progress_bar(bars_were_on)
    if not quiet:
        print(f"repquant_jax: {NAME} ready ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return root


def load(
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    idx_dir: str | os.PathLike[str] | None = None,
):
    """Returns the split as a TFDS random-access data source (built on first use).

    Items are dicts ``{"image": uint8 [28, 28, 1], "label": int64}``; ``len()`` and
    indexing work, and :mod:`repquant_zoo.data.batches` turns it into batches. Any TFDS
    split string works (``"train[:1000]"``).
    """
    root = build(data_dir, idx_dir=idx_dir)
    return tfds.data_source(NAME, split=split, data_dir=os.fspath(root), download=False)


def load_arrays(
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    idx_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as numpy arrays: images ``uint8 [N, 28, 28, 1]``, labels ``int64 [N]``.

    Read through the TFDS data source (so from the same files and in the same order as
    :func:`load`); handy for training loops that keep the data in memory.
    """
    source = load(split, data_dir, idx_dir=idx_dir)
    items = source.__getitems__(range(len(source)))
    images = np.stack([np.asarray(it["image"], np.uint8) for it in items])
    labels = np.asarray([int(it["label"]) for it in items], np.int64)
    return images, labels
