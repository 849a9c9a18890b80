"""The records a `Plan` is made of: one per site or fold group, plain data.

`sites.analyze` finds them (see its module docstring for what each kind of site is);
the concern modules of the analysis build some of them, so they live here, below all of
them, and `sites` re-exports them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from repquant_jax._src.types import NodeId, ValueId

__all__ = [
    "WeightSite",
    "ActivationMatmul",
    "ActivationPoint",
    "Softmax",
    "FoldConsumer",
    "FoldGroup",
]


@dataclasses.dataclass(frozen=True, eq=False)
class WeightSite:
    """A matmul with a parameter operand.

    Attributes:
      name: site name, from the parameter path (``"Block_0/fc1"``).
      node: index of the matmul node in the graph.
      param_path: tree path of the parameter leaf.
      param_index: index of the leaf in flatten order.
      weight_operand: 0 or 1, which operand of the matmul is the parameter.
      weight_id: value id of the weight as the matmul reads it (the hook point).
      weight_shape: shape of that value.
      contracting: axes of the weight value that are reduced (the rest are output
        channels, each quantized with its own scale).
      input_point: name of the `ActivationPoint` of the other operand.
      output_ndim: rank of the matmul's output.
      kernel_index: for each element of the weight value, its flat index in the leaf;
        None for a derived weight.
      derived: the weight is computed from the parameter by more than layout ops
        (``W * mask``, ``dynamic_slice(W)``, ``W + A @ B``): it is quantized as a weight
        where the matmul reads it, but nothing can be written back into the leaf
        (no fold into it, no freeze, no integer export of the leaf).
      owns_leaf: no other operation reads the leaf elements this matmul reads, so the
        quantized weight can replace them in the params (`QApply.freeze`,
        reconstruction).
    """

    name: str
    node: NodeId
    param_path: str
    param_index: int
    weight_operand: int
    weight_id: ValueId
    weight_shape: tuple[int, ...]
    contracting: tuple[int, ...]
    input_point: str
    output_ndim: int
    kernel_index: np.ndarray | None = dataclasses.field(repr=False)
    derived: bool = False
    owns_leaf: bool = True


@dataclasses.dataclass(frozen=True)
class ActivationMatmul:
    """A matmul of two activations (``q @ k.T``, ``attn @ v``)."""

    name: str
    node: NodeId
    lhs_point: str
    rhs_point: str


@dataclasses.dataclass(frozen=True)
class ActivationPoint:
    """A value read by matmuls as an activation operand, quantized once.

    Attributes:
      name: ``"<first reader>:input|lhs|rhs"``.
      value_id: the value id where the quantizer is applied (the hook point).
      shape: its shape at trace time.
      readers: names of the matmul sites that read it.
      source: ``"softmax"``, ``"norm"`` (a fold group's output), ``"input"`` (a function
        input) or ``"other"``.
      fold_group: name of the fold group producing it, if any.
    """

    name: str
    value_id: ValueId
    shape: tuple[int, ...]
    readers: tuple[str, ...]
    source: str
    fold_group: str | None = None


@dataclasses.dataclass(frozen=True)
class Softmax:
    """A softmax and the activation point (if any) its output is."""

    name: str
    node: NodeId
    axis: int
    point: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class FoldConsumer:
    """One weight matmul reading a fold group's output, with what the fold must edit.

    Attributes:
      site: the weight site name.
      row_channel: for each flat element of the kernel leaf, the input channel its row
        belongs to, or -1 where this matmul does not use the element.
      bias_param_index: leaf index of the bias added right after the matmul, or None.
      bias_index: for each output element of the matmul's weight (its non-contracted
        axes, flattened), the flat index into the bias leaf; None without a bias.
      contract_channel: channel of each contracted element (flattened contracted axes
        of the weight value, in the weight's axis order).
      node: index of the matmul node.
      bias_node: index of the ``add`` node adding the bias, or None.
    """

    site: str
    row_channel: np.ndarray = dataclasses.field(repr=False)
    bias_param_index: int | None
    bias_index: np.ndarray | None = dataclasses.field(repr=False)
    contract_channel: np.ndarray = dataclasses.field(repr=False)
    node: NodeId = NodeId(-1)
    bias_node: NodeId | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class FoldGroup:
    """A per-channel affine (LayerNorm, RMSNorm) feeding weight matmuls.

    Attributes:
      name: the norm's module path (``"Block_0/ln1"``).
      point: the activation point holding its output.
      kind: ``"layernorm"`` (scale and bias) or ``"rmsnorm"`` (scale only).
      channels: number of channels (last axis of the output).
      scale_param_index, scale_index: leaf and flat index of γ for each channel.
      scale_offset: the norm multiplies by ``scale_offset + γ`` (Gemma's RMSNorm uses
        ``x * (1 + γ)``); 0 for a plain ``x * γ``.
      bias_param_index, bias_index: same for β (None for rmsnorm).
      consumers: the weight matmuls reading the output.
      foldable: whether the whole fold is legal (docs/method.md, "Folding a norm"):
        the output reaches nothing but the consumers, and no leaf the fold edits is
        read elsewhere.
      reason: why not, when not foldable.
      branch_foldable: whether the kernel half alone is legal ("Branch fold"): the
        consumers' kernels and biases may be edited, so the matmul branch can get a
        per-tensor quantizer while the norm (and the residual it feeds) is unchanged.
      branch_reason: why not, when not.
    """

    name: str
    point: str
    kind: str
    channels: int
    scale_param_index: int
    scale_index: np.ndarray = dataclasses.field(repr=False)
    scale_offset: float = 0.0
    bias_param_index: int | None = None
    bias_index: np.ndarray | None = dataclasses.field(default=None, repr=False)
    consumers: tuple[FoldConsumer, ...] = ()
    foldable: bool = False
    reason: str = ""
    branch_foldable: bool = False
    branch_reason: str = ""
