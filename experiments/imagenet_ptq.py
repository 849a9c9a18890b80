"""ImageNet PTQ, the paper's setting (docs/reference_numbers.md), for users who have the data.

Quantizes a ViT/DeiT checkpoint in timm's safetensors layout with each method of
``--methods`` (``repquant_jax._src.presets``) at each bit width of ``--bits`` (W = A), from
``--calib-samples`` random training images (seeded), and reports top-1 on the validation
split next to float and the paper's numbers where docs/reference_numbers.md has them.

Data: TFDS ``imagenet2012`` read through ``tfds.data_source`` (random access, no
TensorFlow). It must be prepared in ``--data-dir`` in the ``array_record`` format, once:

    tfds build imagenet2012 --data_dir=DATA_DIR --file_format=array_record \\
        --manual_dir=FOLDER_WITH_ILSVRC2012_img_train.tar_AND_ILSVRC2012_img_val.tar

(building needs TensorFlow; reading here does not). JPEG decoding uses Pillow, as TFDS does.

Model: ``--model`` names a config of ``repquant_zoo.models.vit`` (``deit_s16``) or its timm
name (``deit_small_patch16_224``; a pretrained tag such as ``.fb_in1k`` is ignored);
``--config-json`` gives ``ViTConfig`` fields instead (alone, over ``ViTConfig``'s defaults)
or on top of ``--model``. Checkpoints from the Hugging Face hub's ``timm/`` repositories
(``model.safetensors``) are in the expected layout.

Preprocessing is timm's eval transform: resize the shorter side to
``floor(image_size / crop_pct)`` (bicubic), center crop ``image_size``, scale to [0, 1],
normalize. ``--crop-pct`` defaults to 0.875 (timm's ``DEFAULT_CROP_PCT``: 256 → 224; timm's
pretrained configs for these models say 0.9). Mean/std: ``imagenet`` (0.485, 0.456, 0.406) /
(0.229, 0.224, 0.225) for DeiT, ``inception`` (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5) for timm's
ViT (augreg); ``--normalization auto`` picks ``inception`` for model names starting with
``vit`` and ``imagenet`` otherwise.

All quantized models are calibrated first; then one pass over the validation images
evaluates float and every quantized model on each batch (each image is decoded once).
Writes a markdown table to ``--out``.

    python experiments/imagenet_ptq.py --data-dir DATA_DIR --checkpoint deit_s.safetensors \\
        --model deit_small_patch16_224
    python experiments/imagenet_ptq.py ... --eval-samples 5000 --bits 4   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from common import RESULTS, log, machine, markdown_table

import repquant_jax as repquant
from repquant_zoo.data import batches
from repquant_zoo.models import vit

DATASET = "imagenet2012"
#: mean, std per ``--normalization`` (timm's IMAGENET_DEFAULT_* and IMAGENET_INCEPTION_*).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
METHODS = tuple(repquant.presets.__all__)
#: Paper top-1 (%) (docs/reference_numbers.md) by config: {(method, bits): top-1}, bits 32 = float.
PAPER_TOP1: dict[str, dict[tuple[str, int], float]] = {
    name: {("float", 32): f, ("repq_vit", 4): r4, ("repquant", 4): q4, ("repq_vit", 6): r6, ("repquant", 6): q6}
    for name, (f, r4, q4, r6, q6) in {
        "vit_s16": (81.39, 65.05, 73.28, 80.43, 80.51),
        "vit_b16": (84.54, 68.48, 77.84, 83.62, 83.75),
        "deit_t16": (72.21, 57.43, 64.44, 70.76, 70.89),
        "deit_s16": (79.85, 69.03, 75.21, 78.90, 79.06),
        "deit_b16": (81.80, 75.61, 78.46, 81.27, 81.41),
    }.items()
}

Preprocess = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------
# Model


def _timm_to_config_name(name: str) -> str | None:
    base = name.split(".", 1)[0]  # "deit_small_patch16_224.fb_in1k" -> "deit_small_patch16_224"
    if base in vit.CONFIGS:
        return base
    return {timm: ours for ours, timm in vit.TIMM_NAMES.items()}.get(base)


def _read_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        fields = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--config-json {path}: cannot read a JSON object ({e})") from None
    if not isinstance(fields, dict):
        raise SystemExit(f"--config-json {path}: expected a JSON object of ViTConfig fields")
    known = {f.name for f in dataclasses.fields(vit.ViTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SystemExit(f"--config-json {path}: unknown ViTConfig fields {unknown}; known: {sorted(known)}")
    return fields


def resolve_model(model: str | None, config_json: str | None) -> tuple[str | None, vit.ViTConfig]:
    """Returns ``(config name or None, ViTConfig)`` from ``--model`` and ``--config-json``.

    Raises:
        SystemExit: neither is given, the model name is unknown, or the JSON is invalid.
    """
    if model is None and config_json is None:
        raise SystemExit(
            "pass --model (a config of repquant_zoo.models.vit such as deit_s16, or its timm "
            "name such as deit_small_patch16_224) or --config-json (ViTConfig fields)"
        )
    overrides = _read_config_json(config_json) if config_json is not None else {}
    if model is None:
        return None, vit.ViTConfig(**overrides)
    name = _timm_to_config_name(model)
    if name is None:
        known = sorted([*vit.CONFIGS, *vit.TIMM_NAMES.values()])
        raise SystemExit(f"--model {model!r} is not a known ViT config; known: {known}")
    return name, vit.get_config(name, **overrides)


def load_model(checkpoint: str | os.PathLike[str], config: vit.ViTConfig) -> tuple[Callable[..., Any], Any]:
    """``(apply_fn, variables)`` of the timm-layout safetensors ``checkpoint``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise SystemExit(
            f"--checkpoint {checkpoint}: no such file; pass a timm-layout .safetensors file "
            "(e.g. model.safetensors of the Hugging Face hub's timm/deit_small_patch16_224.fb_in1k)"
        )
    variables = vit.load_safetensors(path, config, layout="timm")
    module = vit.VisionTransformer(config)
    return (lambda p, x: module.apply(p, x)), variables


def default_normalization(model_name: str | None) -> str:
    """``inception`` (0.5 mean/std) for timm's ViT names, ``imagenet`` otherwise (DeiT)."""
    return "inception" if model_name and model_name.startswith("vit") else "imagenet"


# ----------------------------------------------------------------------------------------
# Preprocessing (timm's eval transform)


def _to_rgb(image: Any) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x[..., :3].astype(np.uint8, copy=False))


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """``(new_height, new_width)`` with the shorter side ``shorter`` (torchvision's rounding)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def resize_shorter_side(image: np.ndarray, shorter: int) -> np.ndarray:
    """Bicubic resize of a uint8 HWC RGB image so that its shorter side is ``shorter``.

    With Pillow (installed wherever TFDS decodes JPEGs) this is exactly torchvision's
    ``Resize(shorter, BICUBIC)`` on a PIL image; without it, ``jax.image.resize``
    (antialiased bicubic, rounded to uint8), which is close but not bit-identical.
    """
    h, w = image.shape[:2]
    new_h, new_w = resized_size(h, w, shorter)
    if (new_h, new_w) == (h, w):
        return image
    try:
        from PIL import Image
    except ImportError:
        out = jax.image.resize(image.astype(np.float32), (new_h, new_w, 3), "bicubic")
        return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window (torchvision's ``CenterCrop`` offsets)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {h}x{w} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top : top + size, left : left + size]


def make_preprocess(image_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float]) -> Preprocess:
    """timm's eval transform as a function of one decoded image → float32 ``[S, S, 3]``.

    Args:
        image_size: output height = width ``S``.
        crop_pct: the shorter side is first resized to ``floor(image_size / crop_pct)``.
        mean: per-channel mean of the [0, 1]-scaled pixels.
        std: per-channel standard deviation.

    Returns:
        ``preprocess(image)`` for a uint8 HWC image (grey and RGBA images become RGB).
    """
    if not 0 < crop_pct <= 1:
        raise SystemExit(f"--crop-pct must be in (0, 1], got {crop_pct}")
    shorter = math.floor(image_size / crop_pct)
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)

    def preprocess(image: np.ndarray) -> np.ndarray:
        x = center_crop(resize_shorter_side(_to_rgb(image), shorter), image_size)
        return (x.astype(np.float32) / np.float32(255.0) - mean_) / std_

    return preprocess


# ----------------------------------------------------------------------------------------
# Data


def _prepared_versions(data_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (data_dir / DATASET).glob("*/dataset_info.json"))


def open_split(data_dir: str | os.PathLike[str], split: str) -> Any:
    """The TFDS random-access data source of ``imagenet2012``'s ``split`` in ``data_dir``.

    Args:
        data_dir: TFDS data folder holding ``imagenet2012/<version>/`` as array_record.
        split: a TFDS split (``"train"``, ``"validation"``).

    Raises:
        SystemExit: ``data_dir`` is missing, or the dataset cannot be opened there (the
            message says how to prepare it).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise SystemExit(
            f"--data-dir {data_dir}: no such folder; pass the TFDS data folder that holds "
            f"{DATASET}/<version>/ prepared as array_record"
        )
    try:
        return tfds.data_source(DATASET, split=split, data_dir=os.fspath(root), download=False)
    except Exception as e:  # TFDS raises several types (NotImplementedError, ValueError, ...)
        found = _prepared_versions(root)
        where = f"found {', '.join(str(p) for p in found)}" if found else f"no prepared {DATASET} under it"
        raise SystemExit(
            f"cannot open TFDS {DATASET} split {split!r} in --data-dir {data_dir} ({where}): "
            f"{type(e).__name__}: {e}\nPrepare it once (needs TensorFlow) with: tfds build "
            f"{DATASET} --data_dir={data_dir} --file_format=array_record "
            "--manual_dir=<folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar>"
        ) from e


class Head:
    """The first ``n`` examples of a random-access source (same indexing interface)."""

    def __init__(self, source: Any, n: int):
        if not 0 < n <= len(source):
            raise SystemExit(f"--eval-samples must be in 1..{len(source)}, got {n}")
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        if any(not 0 <= i < self.n for i in indices):
            raise IndexError(f"indices out of range 0..{self.n - 1}")
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            return list(getitems(list(indices)))
        return [self.source[i] for i in indices]


def check_num_classes(source: Any, config: vit.ViTConfig) -> None:
    """Raises ``SystemExit`` if the dataset's label count differs from the model's head."""
    info = getattr(source, "dataset_info", None)
    try:
        n = int(info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError):
        return  # not a TFDS source with a ClassLabel: nothing to check
    if n != config.num_classes:
        raise SystemExit(f"{DATASET} has {n} classes but the model's head has {config.num_classes}")


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Runs ``iterator`` in a background thread, ``depth`` items ahead (decoding overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# ----------------------------------------------------------------------------------------
# Quantize and evaluate


def quant_config(method: str, bits: int, repquant_steps: int | None) -> repquant.QuantConfig:
    """The preset ``method`` at W``bits``A``bits`` (repquant's learning steps overridable)."""
    overrides: dict[str, Any] = {}
    if method == "repquant" and repquant_steps is not None:
        overrides = dict(
            dual_clipping=repquant.DualClipping(steps=repquant_steps),
            reconstruction=repquant.Reconstruction(steps=repquant_steps),
        )
    return getattr(repquant.presets, method)(bits, bits, **overrides)


def quantize_all(
    apply_fn: Callable[..., Any],
    variables: Any,
    calib: list[tuple[np.ndarray]],
    methods: Sequence[str],
    bits: Sequence[int],
    repquant_steps: int | None,
) -> dict[tuple[str, int], Callable[[jax.Array], jax.Array]]:
    """Quantizes the model with every method at every bit width.

    Args:
        apply_fn: ``apply_fn(variables, images) -> logits``.
        variables: the float model's variables.
        calib: calibration batches, each a 1-tuple of preprocessed images.
        methods: names of ``repquant_jax._src.presets``.
        bits: bit widths, used for weights and activations alike.
        repquant_steps: overrides repquant's learning steps (None: the preset's).

    Returns:
        ``{(method, bits): forward(images) -> logits}``.
    """
    forwards = {}
    for method in methods:
        for b in bits:
            t0 = time.perf_counter()
            log(f"{method} W{b}A{b}: calibrating on {sum(len(x[0]) for x in calib)} images")
            qparams, qapply = repquant.transform(apply_fn, variables, calib, quant_config(method, b, repquant_steps))
            forwards[(method, b)] = lambda x, qp=qparams, qa=qapply: qa(qp, x)
            log(f"{method} W{b}A{b}: transform done ({time.perf_counter() - t0:.0f} s)")
    return forwards


def _label(key: tuple[str, int]) -> str:
    return "float" if key[0] == "float" else f"{key[0]} W{key[1]}A{key[1]}"


def evaluate_all(
    forwards: dict[tuple[str, int], Callable[[jax.Array], jax.Array]],
    source: Any,
    preprocess: Preprocess,
    batch_size: int,
) -> dict[tuple[str, int], float]:
    """Top-1 (%) of every forward over ``source``, in one pass (each image decoded once).

    Args:
        forwards: ``{key: forward(images) -> logits}``.
        source: random-access source of ``{"image", "label"}`` examples.
        preprocess: one decoded image → model input.
        batch_size: images per batch (the last batch holds the remainder).

    Returns:
        ``{key: top-1 in percent}``; progress is logged about 20 times.
    """
    n = len(source)
    num_batches = math.ceil(n / batch_size)
    log_every = max(1, num_batches // 20)
    correct = dict.fromkeys(forwards, 0)
    seen, t0 = 0, time.perf_counter()
    stream = prefetch(batches.eval_batches(source, batch_size, preprocess))
    for i, (images, labels) in enumerate(stream, 1):
        x = jnp.asarray(images)
        for key, forward in forwards.items():
            pred = np.asarray(jnp.argmax(forward(x), axis=-1))
            correct[key] += int((pred == labels).sum())
        seen += len(labels)
        if i % log_every == 0 or i == num_batches:
            rate = seen / (time.perf_counter() - t0)
            accs = " | ".join(f"{_label(k)} {100 * c / seen:.2f}" for k, c in correct.items())
            log(f"eval {seen}/{n} ({100 * seen / n:.0f}%, {rate:.1f} img/s): {accs}")
    return {key: 100.0 * c / n for key, c in correct.items()}


# ----------------------------------------------------------------------------------------
# Report


def results_table(top1: dict[tuple[str, int], float], paper: dict[tuple[str, int], float] | None) -> str:
    """Markdown table: method, W/A, top-1, difference to float, and the paper's top-1."""
    float_acc = top1[("float", 32)]
    rows = []
    for (method, b), acc in top1.items():
        delta = "" if method == "float" else f"{acc - float_acc:+.2f}"
        ref = (paper or {}).get((method, b))
        rows.append([method, f"{b}/{b}", f"{acc:.2f}", delta, "" if ref is None else f"{ref:.2f}"])
    return markdown_table(["method", "W/A", "top-1 (%)", "vs float", "paper (%)"], rows)


def describe(
    args: argparse.Namespace,
    name: str | None,
    config: vit.ViTConfig,
    normalization: str,
    num_eval: int,
    num_val: int,
    minutes: float,
) -> str:
    """The settings paragraph above the table (no machine paths: checkpoint file name only)."""
    model = f"`{name}`" + (f" (timm `{vit.TIMM_NAMES[name]}`)" if name in vit.TIMM_NAMES else "")
    if name is None:
        model = f"custom `{config}`"
    steps = (
        ""
        if args.repquant_steps is None
        else f"; repquant with {args.repquant_steps} DualClipping and Reconstruction steps"
    )
    return (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()} in {minutes:.1f} min. "
        f"Model {model}, checkpoint `{Path(args.checkpoint).name}`. TFDS `{DATASET}` validation: "
        f"{'all ' if num_eval == num_val else 'the first '}{num_eval} of {num_val} images. "
        f"Calibration: {args.calib_samples} random train images (seed {args.seed}){steps}. "
        f"Preprocessing: shorter side to {math.floor(config.image_size / args.crop_pct)} "
        f"(bicubic), center crop {config.image_size}, mean/std `{normalization}` "
        f"{NORMALIZATIONS[normalization]}. Paper: docs/reference_numbers.md, as reported."
    )


# ----------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help=f"TFDS data folder holding {DATASET} prepared as array_record")
    p.add_argument("--checkpoint", required=True, help="timm-layout .safetensors file")
    p.add_argument("--model", default=None, help="vit.py config (deit_s16) or timm name (deit_small_patch16_224)")
    p.add_argument(
        "--config-json", default=None, help="JSON object of ViTConfig fields (alone, or overriding --model's)"
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["repq_vit", "repquant"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 6], help="W = A bit widths")
    p.add_argument("--calib-samples", type=int, default=32, help="random train images")
    p.add_argument("--eval-samples", type=int, default=None, help="first N validation images (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--image-size", type=int, default=None, help="input size (default and only valid value: the model config's)"
    )
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument(
        "--normalization",
        choices=["auto", *NORMALIZATIONS],
        default="auto",
        help="mean/std: auto = inception for vit* names, imagenet otherwise",
    )
    p.add_argument(
        "--repquant-steps",
        type=int,
        default=None,
        help="steps of repquant's DualClipping and Reconstruction (default: preset's)",
    )
    p.add_argument("--seed", type=int, default=0, help="calibration draw")
    p.add_argument("--out", default=str(RESULTS / "imagenet_ptq.md"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, int], float]:
    """Runs the experiment; returns ``{(method, bits): top-1 %}`` with ``("float", 32)`` first."""
    args = parse_args(argv)
    start = time.perf_counter()
    name, config = resolve_model(args.model, args.config_json)
    if args.image_size is not None and args.image_size != config.image_size:
        raise SystemExit(
            f"--image-size {args.image_size} differs from the model's "
            f"image_size {config.image_size} (its position embedding is fixed)"
        )
    normalization = default_normalization(name or args.model) if args.normalization == "auto" else args.normalization
    preprocess = make_preprocess(config.image_size, args.crop_pct, *NORMALIZATIONS[normalization])

    train, val = open_split(args.data_dir, "train"), open_split(args.data_dir, "validation")
    apply_fn, variables = load_model(args.checkpoint, config)
    check_num_classes(val, config)
    evaluated = val if args.eval_samples is None else Head(val, args.eval_samples)
    log(
        f"model {name or 'custom'}, {len(train)} train / {len(val)} validation images, "
        f"evaluating {len(evaluated)}; mean/std {normalization}"
    )

    calib = [
        (b,) for b in batches.calibration_batches(train, args.calib_samples, args.batch_size, args.seed, preprocess)
    ]
    float_apply = jax.jit(apply_fn)
    forwards = {("float", 32): lambda x: float_apply(variables, x)}
    forwards.update(quantize_all(apply_fn, variables, calib, args.methods, args.bits, args.repquant_steps))
    top1 = evaluate_all(forwards, evaluated, preprocess, args.batch_size)

    minutes = (time.perf_counter() - start) / 60
    text = "\n\n".join(
        [
            f"# ImageNet PTQ: {name or 'custom ViT'}",
            describe(args, name, config, normalization, len(evaluated), len(val), minutes),
            results_table(top1, PAPER_TOP1.get(name)),
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)
    log(f"wrote {args.out}")
    return top1


if __name__ == "__main__":
    main()
