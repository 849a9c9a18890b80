"""Imports the PyTorch reference stack (torch, torchvision, timm, transformers) for the
model comparison tests."""

import sys

import pytest

_TORCHVISION_OPS = None  # keeps the op-schema library below alive


def import_torch():
    """Imports torch and (if installed) torchvision so that timm/transformers import.

    PyPI's torchvision 0.28.0 wheel (the release that pairs with torch 2.13.0) is built
    against CUDA torch: next to the CPU torch 2.13.0 wheel its C extension cannot load,
    and ``import torchvision`` then fails when it registers fake kernels for the ops
    ``nms``/``qnms`` whose schemas that extension would have defined. Declaring the two
    schemas (no kernels) lets torchvision's pure-Python modules import, as they do when
    the extension is missing. The reference models never call torchvision ops.
    """
    global _TORCHVISION_OPS
    torch = pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
    torch.manual_seed(0)
    return torch
