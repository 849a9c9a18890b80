"""experiments/imagenet_ptq.py end to end on mocked ImageNet and a random tiny ViT (plumbing only).

ImageNet is mocked with ``tfds.testing.mock_data(policy=MockPolicy.USE_CODE)``: the real
``imagenet2012`` builder class supplies the dataset info (features, 1000 class names, all
shipped inside the tensorflow_datasets package), downloads and GCS are patched away, and
``tfds.data_source`` calls ``as_data_source_fn`` below for the examples. Nothing touches
the network or needs TensorFlow.

``as_data_source_fn`` replaces mock_data's own data-source mock because that one's
``__getitems__`` is broken in tensorflow-datasets 4.9.10 (it assigns a ``functools.partial``
expecting ``self`` to a MagicMock *instance* attribute, so ``self`` is never passed:
``TypeError: _getitems() missing 1 required positional argument: 'record_keys'``), and the
batch iterators fetch a batch with ``__getitems__``, as they do on real array_record sources.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.testing import MockPolicy, mock_data  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "experiments"))
sys.path.insert(0, str(_ROOT / "tests" / "models"))
import imagenet_ptq  # noqa: E402
from torch_reference import import_torch  # noqa: E402

from repquant_zoo.models import vit  # noqa: E402

TINY = dict(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2, num_classes=1000)
NUM_EXAMPLES = {"train": 24, "validation": 20}


class FakeSource:
    """Random examples shaped as imagenet2012's features: uint8 RGB images of varied sizes."""

    def __init__(self, info, split: str):
        self.dataset_info = info
        self.split = split
        self.n = NUM_EXAMPLES[split]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([i, len(self.split)])
        h, w = rng.integers(20, 80, size=2)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        label = rng.integers(self.dataset_info.features["label"].num_classes)
        return {"image": image, "label": np.int64(label), "file_name": f"{self.split}_{i}.JPEG"}

    def __getitems__(self, indices) -> list[dict]:
        return [self[int(i)] for i in indices]


def fake_as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
    del decoders, deserialize_method, kwargs
    assert builder.name == "imagenet2012"
    return FakeSource(builder.info, split)


@pytest.fixture
def mocked_imagenet():
    with mock_data(policy=MockPolicy.USE_CODE, as_data_source_fn=fake_as_data_source):
        yield


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny_vit")
    cfg = vit.ViTConfig(**TINY)
    variables = jax.jit(vit.VisionTransformer(cfg).init)(
        jax.random.key(0), jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    )
    ckpt = tmp_path / "tiny.safetensors"
    vit.save_safetensors(ckpt, variables, cfg)
    config_json = tmp_path / "tiny.json"
    config_json.write_text(json.dumps(TINY))
    return ckpt, config_json


def _table_rows(text: str) -> dict[tuple[str, str], float]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("method", "---"):
            rows[(cells[0], cells[1])] = float(cells[2])
    return rows


def test_end_to_end_on_mocked_imagenet(mocked_imagenet, tiny_checkpoint, tmp_path):
    ckpt, config_json = tiny_checkpoint
    out = tmp_path / "results" / "imagenet_ptq.md"
    top1 = imagenet_ptq.main(
        [
            "--data-dir",
            str(tmp_path),
            "--checkpoint",
            str(ckpt),
            "--config-json",
            str(config_json),
            "--bits",
            "4",
            "--calib-samples",
            "8",
            "--eval-samples",
            "8",
            "--batch-size",
            "8",
            "--repquant-steps",
            "2",
            "--out",
            str(out),
        ]
    )  # default --methods (repq_vit repquant); one bit width keeps the test quick
    rows = _table_rows(out.read_text())
    expected = {("float", "32/32"), ("repq_vit", "4/4"), ("repquant", "4/4")}
    assert set(rows) == expected
    assert all(0 <= v <= 100 for v in rows.values())
    assert len(top1) == len(expected)
    assert "the first 8 of 20 images" in out.read_text()


def test_preprocess_matches_timm_eval_transform():
    import_torch()  # torch + torchvision (with its workaround), which timm imports
    timm_data = pytest.importorskip("timm.data")
    Image = pytest.importorskip("PIL.Image")
    mean, std = imagenet_ptq.NORMALIZATIONS["imagenet"]
    transform = timm_data.create_transform(
        input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic", mean=mean, std=std
    )
    ours = imagenet_ptq.make_preprocess(224, 0.875, mean, std)
    rng = np.random.default_rng(0)
    for h, w in [(300, 451), (333, 256), (500, 375)]:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        want = transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)
        got = ours(image)
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_grey_and_rgba_images_become_rgb():
    pre = imagenet_ptq.make_preprocess(32, 0.875, *imagenet_ptq.NORMALIZATIONS["inception"])
    for image in (np.zeros((40, 50), np.uint8), np.zeros((40, 50, 1), np.uint8), np.full((50, 40, 4), 255, np.uint8)):
        x = pre(image)
        assert x.shape == (32, 32, 3)
        assert np.all(np.abs(x) == 1.0)  # 0 → -1, 255 → 1 with mean = std = 0.5


def test_model_names_and_normalization():
    assert imagenet_ptq.resolve_model("deit_small_patch16_224.fb_in1k", None)[0] == "deit_s16"
    assert imagenet_ptq.resolve_model("vit_s16", None)[0] == "vit_s16"
    assert imagenet_ptq.default_normalization("vit_small_patch16_224") == "inception"
    assert imagenet_ptq.default_normalization("deit_s16") == "imagenet"
    with pytest.raises(SystemExit, match="--model .*not a known"):
        imagenet_ptq.resolve_model("resnet50", None)
    with pytest.raises(SystemExit, match="pass --model"):
        imagenet_ptq.resolve_model(None, None)


def test_clear_errors_for_missing_inputs(tmp_path, tiny_checkpoint):
    ckpt, config_json = tiny_checkpoint
    base = ["--config-json", str(config_json)]
    with pytest.raises(SystemExit, match="--checkpoint .*no such file"):
        with mock_data(policy=MockPolicy.USE_CODE, as_data_source_fn=fake_as_data_source):
            imagenet_ptq.main(["--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "x"), *base])
    with pytest.raises(SystemExit, match="--data-dir .*no such folder"):
        imagenet_ptq.main(["--data-dir", str(tmp_path / "nope"), "--checkpoint", str(ckpt), *base])
    with pytest.raises(SystemExit, match="tfds build imagenet2012"):  # an empty data dir
        imagenet_ptq.main(["--data-dir", str(tmp_path), "--checkpoint", str(ckpt), *base])


def test_resize_without_pillow_is_close_to_pillow(monkeypatch):
    pytest.importorskip("PIL.Image")
    image = np.random.default_rng(1).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    with_pil = imagenet_ptq.resize_shorter_side(image, 40)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails
    without = imagenet_ptq.resize_shorter_side(image, 40)
    assert with_pil.shape == without.shape == (40, 60, 3) and without.dtype == np.uint8
    assert np.abs(with_pil.astype(int) - without.astype(int)).mean() < 2
