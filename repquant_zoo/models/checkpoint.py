"""Shared helpers for loading and saving model checkpoints.

Checkpoints are flat mappings from tensor name to array (a PyTorch ``state_dict``
exported to safetensors, a Hugging Face ``model.safetensors``). The model loaders
read them through :class:`TensorReader`, which checks every tensor's presence and
shape and reports *all* problems at once in one :class:`CheckpointError` (a
``ValueError``) naming each offending tensor with its expected and actual shape.

Example:
    >>> import numpy as np
    >>> reader = TensorReader({"w": np.zeros((2, 3)), "junk": np.zeros(1)})
    >>> w = reader.take("w", (2, 3))
    >>> reader.finish()
    Traceback (most recent call last):
    ...
    repquant_zoo.models.checkpoint.CheckpointError: checkpoint does not match the model: unexpected tensor 'junk' with shape (1,)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "TensorReader",
    "load_state_dict",
    "save_state_dict",
    "flatten_params",
    "get_path",
    "to_numpy",
]


class CheckpointError(ValueError):
    """A checkpoint has missing, unexpected or wrongly shaped tensors.

    Attributes:
        missing: names of tensors the model needs but the checkpoint lacks.
        unexpected: names of tensors in the checkpoint that the model does not use.
        mismatched: ``{name: (expected_shape, got_shape)}``.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ):
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = dict(mismatched or {})


def to_numpy(x: Any) -> np.ndarray:
    """Converts an array-like (numpy, JAX, or a CPU torch tensor) to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class TensorReader:
    """Reads named tensors from a flat state dict, checking names and shapes.

    Every :meth:`take` records the name as used. A missing tensor or a tensor of the
    wrong shape is recorded and a zero placeholder is returned so that the caller can
    go on converting; :meth:`finish` then raises one :class:`CheckpointError` listing
    every missing, wrongly shaped and unused (unexpected) tensor.

    Args:
        state_dict: mapping from tensor name to array-like.
        ignore: regular expressions (``re.fullmatch``) of tensor names that may be
            present but are not used by the model (e.g. non-parameter buffers).
        strip_prefixes: prefixes removed from every name before lookup (e.g.
            ``"bert."``); a name is stripped by the first prefix that matches.
        rename: optional function applied to every (stripped) name, used to accept
            alternative spellings of the same layout.
    """

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        *,
        ignore: Iterable[str] = (),
        strip_prefixes: Iterable[str] = (),
        rename: Any = None,
    ):
        self._tensors: dict[str, Any] = {}
        self._origin: dict[str, str] = {}
        prefixes = tuple(strip_prefixes)
        for name, value in state_dict.items():
            key = name
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            if rename is not None:
                key = rename(key)
            if key in self._tensors:
                raise CheckpointError(f"checkpoint has two tensors for {key!r}: {self._origin[key]!r} and {name!r}")
            self._tensors[key] = value
            self._origin[key] = name
        self._ignore = [re.compile(p) for p in ignore]
        self._used: set[str] = set()
        self._missing: dict[str, tuple[int, ...]] = {}
        self._mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self) -> list[str]:
        """Names of all tensors (after prefix stripping and renaming)."""
        return list(self._tensors)

    def take(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """Returns tensor ``name`` as a numpy array of ``dtype``, checking its shape.

        Args:
            name: tensor name in the checkpoint's layout.
            shape: the shape the model expects, in the checkpoint's layout.
            dtype: numpy dtype of the returned array.

        Returns:
            The tensor, or zeros of ``shape`` if it is missing or wrongly shaped (the
            problem is then reported by :meth:`finish`).
        """
        shape = tuple(int(s) for s in shape)
        if name not in self._tensors:
            self._missing[name] = shape
            return np.zeros(shape, dtype)
        self._used.add(name)
        value = to_numpy(self._tensors[name])
        if tuple(value.shape) != shape:
            self._mismatched[name] = (shape, tuple(value.shape))
            return np.zeros(shape, dtype)
        return value.astype(dtype, copy=False)

    def finish(self) -> None:
        """Raises :class:`CheckpointError` if anything was missing, mismatched or unused."""
        unexpected = sorted(
            k for k in self._tensors if k not in self._used and not any(p.fullmatch(k) for p in self._ignore)
        )
        if not (self._missing or self._mismatched or unexpected):
            return
        lines = []
        for name, shape in self._missing.items():
            lines.append(f"missing tensor {name!r} (expected shape {shape})")
        for name, (want, got) in self._mismatched.items():
            lines.append(f"tensor {self._origin[name]!r} has shape {got}, expected {want}")
        for name in unexpected:
            shape = tuple(getattr(self._tensors[name], "shape", ()))
            lines.append(f"unexpected tensor {self._origin[name]!r} with shape {shape}")
        raise CheckpointError(
            "checkpoint does not match the model: " + "; ".join(lines),
            missing=self._missing,
            unexpected=[self._origin[k] for k in unexpected],
            mismatched={self._origin[k]: v for k, v in self._mismatched.items()},
        )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Loads a ``.safetensors`` file as a dict of numpy arrays (no torch needed).

    bfloat16 tensors are returned as ``ml_dtypes.bfloat16`` arrays by safetensors'
    numpy backend where supported; the model loaders cast to float32.
    """
    from safetensors.numpy import load_file  # lazy: optional dependency

    return dict(load_file(os.fspath(path)))


def save_state_dict(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Saves a flat dict of arrays as a ``.safetensors`` file."""
    from safetensors.numpy import save_file  # lazy: optional dependency

    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
    save_file(arrays, os.fspath(path), metadata=dict(metadata) if metadata else None)


def flatten_params(params: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Flattens a nested param dict to ``{"a/b/kernel": array}``.

    Example:
        >>> flatten_params({"dense": {"kernel": 1, "bias": 2}})
        {'dense/kernel': 1, 'dense/bias': 2}
    """
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}{sep}{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    visit("", params)
    return out


def get_path(params: Mapping[str, Any], path: str, sep: str = "/") -> Any:
    """Returns the leaf at ``"a/b/kernel"``, raising a ValueError naming a missing path."""
    node: Any = params
    for part in path.split(sep):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"params have no entry {path!r} (missing {part!r})")
        node = node[part]
    return node
