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

QuantizerKind = Literal["uniform", "symmetric", "log2", "log_sqrt2"]
QUANTIZER_KINDS: tuple[QuantizerKind, ...] = ("uniform", "symmetric", "log2", "log_sqrt2")
#: Kinds for non-negative values (softmax outputs) only, never for weights.
LOG_KINDS: tuple[QuantizerKind, ...] = ("log2", "log_sqrt2")

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
