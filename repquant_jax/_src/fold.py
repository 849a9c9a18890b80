"""Scale reparameterization (docs/method.md, "Folding a norm"): per-channel norm quantizers → per-tensor.

A norm output ``x = γ⊙x_n + β`` feeding ``y = x @ W + b`` is quantized per channel with
scales ``s`` and zero points ``z`` during calibration. With ``s̃ = mean(s)``,
``z̃ = round(mean(z))``, ``r1 = s / s̃`` and ``r2 = z - z̃``:

* the norm becomes ``γ̃ = γ / r1``, ``β̃ = (β + s⊙r2) / r1``;
* every following matmul ``W̃ = diag(r1)·W`` (its input-channel rows), ``b̃ = b - (s⊙r2) @ W``;
* the quantizer becomes per tensor ``(s̃, z̃)``.

``x̃ / s̃ = x / s + r2`` with integer ``r2``, so the integer codes, and hence the model's
output, are exactly those of the per-channel quantizer.

RMSNorm has no β: with an asymmetric quantizer the shift ``s⊙r2/r1`` becomes an *input
offset* added to the norm output before quantization; a symmetric quantizer has
``r2 = 0`` and needs none. A matmul without a bias gets an *output offset* instead of
``b̃``. Both offsets live in the quantizer state (`QParams`), not in the model's params.

Everything here edits flat NumPy copies of the parameter leaves, located through the
index maps that `repquant_jax._src.sites` computed, so it works whatever reshapes the model
applies to its parameters (DenseGeneral kernels, scan-stacked layers).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from repquant_jax._src import quantizers as qz
from repquant_jax._src.sites import FoldGroup, Plan, WeightSite

__all__ = ["FoldResult", "fold_norm_into_dense", "leaves_written", "weight_matrix", "weight_from_matrix"]


def weight_matrix(view, contracting: tuple[int, ...]):
    """A weight as its matmul sees it, as a ``[K, N]`` matrix: contracted axes first."""
    moved = jnp.moveaxis(view, contracting, tuple(range(len(contracting))))
    k = int(np.prod([view.shape[a] for a in contracting]))
    return moved.reshape(k, -1)


def weight_from_matrix(matrix, shape: tuple[int, ...], contracting: tuple[int, ...]):
    """Inverse of `weight_matrix`."""
    free = [d for d in range(len(shape)) if d not in contracting]
    moved_shape = [shape[a] for a in contracting] + [shape[a] for a in free]
    moved = matrix.reshape(moved_shape)
    return jnp.moveaxis(moved, tuple(range(len(contracting))), contracting)


@dataclasses.dataclass(frozen=True, eq=False)
class FoldResult:
    """What one fold produced.

    Attributes:
      quantizer: the per-tensor quantizer replacing the per-channel one.
      input_scale: ``(C,)`` multiplying the norm output before quantization, on the
        matmul branch only (branch fold: ``1 / r1``), or None.
      input_offset: ``(C,)`` added to the norm output (after ``input_scale``) before
        quantization (RMSNorm with an asymmetric quantizer; branch fold: ``s⊙r2/r1``),
        or None.
      output_offsets: weight site name -> array added to that matmul's output (matmuls
        without a bias parameter), shaped to broadcast against it.
      max_abs_r2: largest |z - z̃|, for the report.
    """

    quantizer: qz.QuantParams
    input_scale: np.ndarray | None
    input_offset: np.ndarray | None
    output_offsets: dict[str, np.ndarray]
    max_abs_r2: float


def leaves_written(plan: Plan, group: FoldGroup, *, branch: bool = False) -> set[int]:
    """Indices of the parameter leaves `fold_norm_into_dense` edits for ``group``: the
    norm's scale and bias (unless ``branch``), each consumer's kernel and bias."""
    written = set() if branch else {group.scale_param_index, group.bias_param_index}
    for consumer in group.consumers:
        written |= {plan.weight(consumer.site).param_index, consumer.bias_param_index}
    return {k for k in written if k is not None}


def fold_norm_into_dense(
    leaves: list[np.ndarray],
    plan: Plan,
    group: FoldGroup,
    quantizer: qz.QuantParams,
    *,
    exact_zero_point: bool = True,
    branch: bool = False,
) -> FoldResult:
    """Folds a per-channel norm-output quantizer into the norm and its matmuls.

    With ``branch=True`` (a norm whose output also feeds a residual, post-LN BERT) only
    the kernel half is applied: γ and β stay, and the matmul branch quantizes
    ``x · (1/r1) + s⊙r2/r1`` with the per-tensor quantizer, a per-channel multiply-add
    inside that branch's quantize op. ``(x + s⊙r2) / (r1·s̃) = x/s + r2`` still, so the
    integer codes are the per-channel ones.

    Edits ``leaves`` (the parameter leaves in flatten order) in place: those of
    `leaves_written` must be the caller's writable NumPy copies, never the user's arrays.

    Args:
      leaves: parameter leaves (those of `leaves_written` writable NumPy, edited in place).
      plan: the analysis plan.
      group: a foldable group of the plan.
      quantizer: its per-channel quantizer (axis -1, uniform or symmetric).
      exact_zero_point: round z̃ (bit-exact fold) instead of RepQ-ViT's float mean.

    Returns:
      The per-tensor quantizer and the offsets to apply.

    Raises:
      ValueError: if the group is not foldable or the quantizer is not per channel.
    """
    if branch and not group.branch_foldable:
        raise ValueError(f"fold group {group.name!r} cannot be branch-folded: {group.branch_reason}")
    if not branch and not group.foldable:
        raise ValueError(f"fold group {group.name!r} cannot be folded: {group.reason}")
    scale = np.asarray(quantizer.scale, np.float64)
    if quantizer.axis is None or scale.shape != (group.channels,):
        raise ValueError(
            f"fold group {group.name!r} needs a per-channel quantizer with {group.channels} "
            f"scales, got scale shape {scale.shape}"
        )
    zero = np.asarray(quantizer.zero_point, np.float64)
    s_t = scale.mean()
    z_t = np.round(zero.mean()) if exact_zero_point else zero.mean()
    r1 = scale / s_t
    r2 = zero - z_t
    shift = scale * r2  # s ⊙ r2, per channel

    input_scale = input_offset = None
    if branch:
        input_scale = (1.0 / r1).astype(np.float32)
        input_offset = (shift / r1).astype(np.float32)
    else:
        gamma = leaves[group.scale_param_index].reshape(-1)
        # (c + γ̃) = (c + γ) / r1 for a norm scaling by c + γ (Gemma: c = 1)
        c = group.scale_offset
        gamma[group.scale_index] = (gamma[group.scale_index] + c) / r1 - c
        if group.bias_param_index is not None:
            beta = leaves[group.bias_param_index].reshape(-1)
            beta[group.bias_index] = (beta[group.bias_index] + shift) / r1
        elif np.any(shift != 0):
            input_offset = (shift / r1).astype(np.float32)

    # Corrections first, from the unscaled kernels. Consumers reading one kernel leaf
    # (the same matmul applied twice) read it identically (param_leaves.py checks it), so the
    # leaf and its bias are edited once.
    deltas = []
    for consumer in group.consumers:
        site = plan.weight(consumer.site)
        view = leaves[site.param_index].reshape(-1)[site.kernel_index]
        matrix = np.asarray(weight_matrix(view.astype(np.float64), site.contracting))
        deltas.append((consumer, site, shift[consumer.contract_channel] @ matrix))  # (s ⊙ r2) @ W
    output_offsets = {}
    edited: dict[int, np.ndarray] = {}  # leaf index -> elements already edited

    def not_yet(k: int, index: np.ndarray) -> np.ndarray:
        done = edited.setdefault(k, np.zeros(leaves[k].size, bool))
        fresh = ~done[index]
        done[index] = True
        return fresh

    for consumer, site, delta in deltas:
        kernel = leaves[site.param_index].reshape(-1)
        rows = np.flatnonzero(consumer.row_channel >= 0)
        rows = rows[not_yet(site.param_index, rows)]
        kernel[rows] = kernel[rows] * r1[consumer.row_channel[rows]]
        if not np.any(delta != 0):
            continue
        if consumer.bias_param_index is not None:
            assert consumer.bias_index is not None  # set together with bias_param_index
            bias = leaves[consumer.bias_param_index].reshape(-1)
            fresh = not_yet(consumer.bias_param_index, consumer.bias_index)
            bias[consumer.bias_index[fresh]] = bias[consumer.bias_index[fresh]] - delta[fresh]
        else:
            output_offsets[site.name] = _output_offset(site, -delta)

    kind = quantizer.kind
    if kind == "symmetric":
        new = qz.symmetric(jnp.float32(s_t), quantizer.bits)
    else:
        new = qz.uniform(jnp.float32(s_t), jnp.float32(z_t), quantizer.bits)
    return FoldResult(new, input_scale, input_offset, output_offsets, float(np.abs(r2).max()))


def _output_offset(site: WeightSite, values: np.ndarray) -> np.ndarray:
    """Shapes a per-output vector to broadcast against the matmul's output."""
    free_shape = [d for i, d in enumerate(site.weight_shape) if i not in site.contracting]
    shaped = values.astype(np.float32).reshape(free_shape)
    if site.weight_operand == 0:  # output = (weight free..., other free...)
        shaped = shaped.reshape(free_shape + [1] * (site.output_ndim - len(free_shape)))
    return shaped
