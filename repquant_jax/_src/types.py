"""The library's shared vocabulary: ids, closed sets of names and code ranges.

Imports nothing from the library, so every module can use it.
"""

from __future__ import annotations

from typing import Literal, NewType

__all__ = [
    "ValueId",
    "NodeId",
    "QuantizerKind",
    "QUANTIZER_KINDS",
    "LOG_KINDS",
    "MAX_LOG_ROOT",
    "Granularity",
    "Target",
    "CalibrationMethod",
    "MATMUL_PRIMITIVES",
    "code_range",
    "log_zero_code",
]

#: A value of a traced graph (an argument, a constant or a node's output).
ValueId = NewType("ValueId", int)
#: A node (one equation) of a traced graph, by its index in ``Graph.nodes``.
NodeId = NewType("NodeId", int)

#: ``"log_root"`` is the log quantizer of base 2^(1/k) (k its static root); ``"log2"`` and
#: ``"log_sqrt2"`` are its k = 1 and k = 2.
QuantizerKind = Literal["uniform", "symmetric", "log2", "log_sqrt2", "log_root"]
QUANTIZER_KINDS: tuple[QuantizerKind, ...] = ("uniform", "symmetric", "log2", "log_sqrt2", "log_root")
#: Largest root k of a ``"log_root"`` quantizer. Past ~(2^16 - 2)/126 the 16-bit codes no
#: longer reach float32's smallest normal level, so a larger k only narrows the range.
MAX_LOG_ROOT = 1024
#: Kinds for non-negative values (softmax outputs) only, never for weights.
LOG_KINDS: tuple[QuantizerKind, ...] = ("log2", "log_sqrt2", "log_root")

Granularity = Literal["per_tensor", "per_channel"]
Target = Literal["weight", "activation"]
CalibrationMethod = Literal["minmax", "percentile", "search"]

#: The primitives whose inputs are quantized (matmuls and convolutions).
MATMUL_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})


def code_range(kind: str, bits: int) -> tuple[int, int]:
    """The integer codes ``(qmin, qmax)`` of a quantizer kind at ``bits``.

    Symmetric codes are signed; uniform and log codes are ``0 .. 2^b - 1`` (for the
    log kinds the top code is the exact zero, `log_zero_code`).

    Example:
      >>> code_range("symmetric", 8), code_range("uniform", 4)
      ((-128, 127), (0, 15))
    """
    if kind == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def log_zero_code(bits: int) -> int:
    """The code a log quantizer reserves for an exact zero (its largest)."""
    return 2**bits - 1
