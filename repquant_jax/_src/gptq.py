"""GPTQ-style closed-form weight rounding (docs/method.md, "GPTQ rounding").

For a weight matmul ``Y = X @ W`` with ``W`` a ``[K, N]`` matrix (Flax kernels are
``(in, out)``: the rows are input channels) and a per-output-column quantizer whose scale
and zero point are already fitted, GPTQ chooses the integer codes so that ``X @ Ŵ`` stays
close to ``X @ W`` on the calibration inputs. With ``H = 2 XᵀX + λ·mean(diag H)·I`` and
``U`` the upper Cholesky factor of ``H⁻¹``, the rows of ``W`` (input channels) are
quantized one at a time, in order, and each row's rounding error is spread over the rows
not yet quantized, through ``U``: the least-squares correction that keeps the output
where it was. Every output column is an independent problem sharing ``H``, which is
why one pass handles them all and why each column may afterwards keep GPTQ's codes or
nearest rounding on its own. Rows are processed in lazy blocks: inside a block one row
at a time, the rest of the matrix updated once per block by one matmul.

Scales and zero points never change: only the codes do, so folds, `freeze`, the export
and the integer path see an ordinary weight on its grid.

* `gptq_codes`: the closed form on one matrix, a module-level jitted function (matrices
  of one shape compile once; `compile_count`).
* `gptq_round`: every eligible weight site of a traced model, in forward order, with the
  inputs of the already-quantized model (sequential GPTQ).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import GPTQ
from repquant_jax._src.fold import weight_from_matrix, weight_matrix
from repquant_jax._src.graph import Graph
from repquant_jax._src.hooks import quant_hooks
from repquant_jax._src.interpret import evaluate_batches
from repquant_jax._src.sites import Plan, WeightSite
from repquant_jax._src.state import QParams

__all__ = ["SiteRounding", "gptq_codes", "gptq_round", "dequantized_view", "compile_count", "refusal"]

#: Damping is multiplied by this, up to three times, when float32 Cholesky of a nearly
#: singular ``H`` (few rows, collinear inputs) breaks down.
_DAMPING_RETRY = 10.0
#: Full float32 matmuls: on accelerators the default may round operands to bfloat16/TF32.
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SiteRounding:
    """What GPTQ did at one weight site (for the report).

    Attributes:
      site: the weight site name.
      codes: the chosen integer codes of its ``[K, N]`` matrix (float32, integer
        valued), or None where GPTQ was not applied.
      before, after: output MSE ``Σ_columns mean_rows (X_q Ŵ - X_f W)²`` on the judged
        calibration rows (quantized-model input ``X_q``, float-model input ``X_f``), with
        nearest rounding and with the chosen codes.
      rows: calibration rows in ``H``.
      columns: output columns that kept GPTQ's codes (of either target; the others
        kept nearest rounding, better for them on the judged rows), of
        ``total_columns``.
      damping: the relative damping used (raised if Cholesky failed).
      note: the report's line.
    """

    site: str
    codes: jax.Array | None
    before: float | None = None
    after: float | None = None
    rows: int = 0
    columns: int = 0
    total_columns: int = 0
    damping: float = 0.0
    note: str = ""


# --------------------------------------------------------------------------------------
# The closed form


def _damped(hessian: jax.Array, damping: jax.Array) -> jax.Array:
    """``H + λ·mean(diag H)·I``, dead inputs (zero diagonal) given a unit diagonal so
    that it is invertible (their rows of ``W`` then round to nearest: no other row is
    coupled to them)."""
    eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    hessian = hessian + eye * jnp.where(jnp.diag(hessian) <= 0, 1.0, 0.0)
    return hessian + eye * (damping * jnp.mean(jnp.diag(hessian)))


def _inverse_cholesky(hessian: jax.Array, damping: jax.Array) -> jax.Array:
    """Upper ``U`` with ``Uᵀ U = (H + λ·mean(diag H)·I)⁻¹``."""
    eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    lower = jnp.linalg.cholesky(_damped(hessian, damping))
    inverse = jax.scipy.linalg.cho_solve((lower, True), eye)
    return jnp.linalg.cholesky(inverse).T


@jax.jit
def float_target(matrix: jax.Array, hessian: jax.Array, cross: jax.Array, damping: jax.Array) -> jax.Array:
    """The weight whose GPTQ on the quantized input matches the *float* output.

    With ``X_q`` the quantized model's input and ``X_f`` the float model's,
    ``‖X_q Ŵ - X_f W‖² = ‖X_q (Ŵ - W*)‖² + const`` for
    ``W* = W + H⁻¹ · 2 X_qᵀ (X_f - X_q) W / rows`` (``H`` damped as in GPTQ), so GPTQ of
    ``W*`` with the same ``H`` minimizes the error against the float model: it also
    corrects the error the input's quantization brings (GPTQ's "asymmetric" form).

    Args:
      matrix: ``[K, N]`` weight matrix ``W``.
      hessian: ``2 X_qᵀ X_q / rows``.
      cross: ``2 X_qᵀ (X_f - X_q) / rows`` (rows paired between the two models).
      damping: ``λ``.
    """
    lower = jnp.linalg.cholesky(_damped(hessian, damping))
    shift = jax.scipy.linalg.cho_solve((lower, True), jnp.matmul(cross, matrix, precision=_HIGHEST))
    return matrix + shift


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "block_size", "act_order"))
def gptq_codes(
    matrix: jax.Array,
    hessian: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    damping: jax.Array,
    *,
    qmin: int,
    qmax: int,
    block_size: int = 128,
    act_order: bool = False,
) -> jax.Array:
    """GPTQ's codes of a ``[K, N]`` weight matrix with fixed per-column scales.

    Args:
      matrix: the weight matrix, rows = input channels (contracted), columns = outputs.
      hessian: ``[K, K]`` second moment of the inputs, ``2 XᵀX / rows`` (any positive
        multiple gives the same codes: the damping is relative).
      scale, zero_point: ``(N,)`` per-column quantizer (broadcast a per-tensor one).
      damping: ``λ``, added as ``λ·mean(diag H)`` to the diagonal.
      qmin, qmax: the code range.
      block_size: rows per lazy block (the last block is padded with dead rows).
      act_order: quantize rows in order of decreasing ``diag H`` (GPTQ's "act order")
        instead of input order.

    Returns:
      ``[K, N]`` float32 integer-valued codes in ``[qmin, qmax]``; the dequantized weight
      is ``(codes - zero_point) * scale``.
    """
    w = jnp.asarray(matrix, jnp.float32)
    h = jnp.asarray(hessian, jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    z = jnp.asarray(zero_point, jnp.float32)
    k, n = w.shape
    if act_order:
        perm = jnp.argsort(-jnp.diag(h))
        w, h = w[perm], h[perm][:, perm]
    block = min(block_size, k)
    padded = -(-k // block) * block
    # Dead padding rows: zero weights, uncoupled (identity H), dropped at the end.
    w = jnp.pad(w, ((0, padded - k), (0, 0)))
    h = jnp.pad(h, ((0, padded - k), (0, padded - k))) + jnp.diag(jnp.arange(padded) >= k).astype(h.dtype)
    u = _inverse_cholesky(h, jnp.asarray(damping, jnp.float32))
    index = jnp.arange(block)

    def block_step(b, carry):
        w, codes = carry
        first = b * block
        wb = jax.lax.dynamic_slice(w, (first, 0), (block, n))
        ub = jax.lax.dynamic_slice(u, (first, first), (block, block))

        def row_step(j, inner):
            wb, qb, eb = inner
            row = wb[j]
            q = qz._uniform_codes(row, s, z, qmin, qmax)
            err = (row - (q - z) * s) / ub[j, j]
            # the error feedback to the block's later rows only (earlier ones are done)
            wb = wb - jnp.where((index > j)[:, None], ub[j][:, None] * err[None, :], 0.0)
            return wb, qb.at[j].set(q), eb.at[j].set(err)

        zeros = jnp.zeros_like(wb)
        _, qb, eb = jax.lax.fori_loop(0, block, row_step, (wb, zeros, zeros))
        # the block's accumulated feedback to every later row, as one matmul
        rows_of_u = jax.lax.dynamic_slice(u, (first, 0), (block, padded))
        later = (jnp.arange(padded) >= first + block)[:, None]
        w = w - jnp.where(later, jnp.matmul(rows_of_u.T, eb, precision=_HIGHEST), 0.0)
        return w, jax.lax.dynamic_update_slice(codes, qb, (first, 0))

    _, codes = jax.lax.fori_loop(0, padded // block, block_step, (w, jnp.zeros_like(w)))
    codes = codes[:k]
    if act_order:
        codes = codes[jnp.argsort(perm)]
    return codes


def compile_count() -> int:
    """Executables compiled so far by `gptq_codes` (one per distinct matrix shape and
    code range)."""
    return gptq_codes._cache_size()  # type: ignore[attr-defined]  # jit's private cache counter


def _column_params(qp: qz.QuantParams, n: int) -> tuple[jax.Array, jax.Array]:
    s = jnp.broadcast_to(jnp.asarray(qp.scale, jnp.float32), (n,))
    return s, jnp.broadcast_to(jnp.asarray(qp.zero_point, jnp.float32), (n,))


def matrix_codes(
    matrix: jax.Array, hessian: jax.Array, qp: qz.QuantParams, config: GPTQ
) -> tuple[jax.Array | None, float]:
    """`gptq_codes` of ``matrix`` with quantizer ``qp``, raising the damping tenfold (up
    to three times) where float32 Cholesky breaks down; ``(None, damping)`` if it never
    succeeds."""
    qmin, qmax = qz.code_range(qp)
    s, z = _column_params(qp, matrix.shape[1])
    damping = config.damping
    for _ in range(4):
        codes = gptq_codes(
            matrix,
            hessian,
            s,
            z,
            jnp.float32(damping),
            qmin=qmin,
            qmax=qmax,
            block_size=config.block_size,
            act_order=config.act_order,
        )
        if bool(jnp.all(jnp.isfinite(codes))):
            return codes, damping
        damping *= _DAMPING_RETRY
    return None, damping


def nearest_codes(matrix: jax.Array, qp: qz.QuantParams) -> jax.Array:
    """The codes of ordinary (round to nearest) quantization of ``matrix``."""
    qmin, qmax = qz.code_range(qp)
    s, z = _column_params(qp, matrix.shape[1])
    return qz._uniform_codes(jnp.asarray(matrix, jnp.float32), s, z, qmin, qmax)


def dequantize_codes(codes: jax.Array, qp: qz.QuantParams) -> jax.Array:
    """``(codes - z) · s`` per column: a matrix that ``qp`` fake-quantizes to itself."""
    s, z = _column_params(qp, codes.shape[1])
    return (codes - z) * s


def dequantized_view(w: WeightSite, codes: jax.Array, qp: qz.QuantParams) -> np.ndarray:
    """Site ``w``'s weight, as its matmul reads it, on the grid at ``codes``."""
    return np.asarray(weight_from_matrix(dequantize_codes(codes, qp), w.weight_shape, w.contracting))


# --------------------------------------------------------------------------------------
# Over a model


def _x_contracting(graph: Graph, w: WeightSite) -> tuple[int, ...]:
    (lc, rc), _ = graph.nodes[w.node].params["dimension_numbers"]
    return tuple(rc if w.weight_operand == 0 else lc)


def _rows(operand: jax.Array, contracting: Sequence[int]) -> jax.Array:
    """A matmul's activation operand as float32 ``[rows, K]`` (contracted axes last, in
    the order the weight's contracted axes pair with them)."""
    moved = jnp.moveaxis(operand, tuple(contracting), tuple(range(operand.ndim - len(contracting), operand.ndim)))
    k = int(np.prod([operand.shape[a] for a in contracting]))
    return moved.reshape(-1, k).astype(jnp.float32)


def refusal(graph: Graph, w: WeightSite, qp: qz.QuantParams) -> str | None:
    """Why GPTQ leaves site ``w`` to nearest rounding, or None if it applies."""
    node = graph.nodes[w.node]
    if node.primitive != "dot_general":
        return "a convolution (GPTQ rounds matmul weights only)"
    if w.derived or w.kernel_index is None:
        return "its weight is computed from the parameter, so no code can be stored in the leaf"
    if not w.owns_leaf:
        return (
            "other operations read the same kernel elements (a shared or tied weight): one stored "
            "weight cannot carry codes chosen for one reader's inputs"
        )
    if qp.kind not in ("uniform", "symmetric"):
        return f"its quantizer is {qp.kind}, not uniform"
    _, (lb, rb) = node.params["dimension_numbers"]
    if lb or rb:
        return "a batched matmul (the weight has batch dimensions)"
    return None


def _judge(x_q, x_fp, w, qp, codes):
    """Per-column output MSE of the weight at ``codes`` against the float output."""
    err = x_q @ dequantize_codes(codes, qp) - x_fp @ w
    return jnp.sum(err**2, axis=0) / x_q.shape[0]


def gptq_round(
    graph: Graph,
    plan: Plan,
    qparams: QParams,
    batch_leaves: Sequence[Sequence[Any]],
    config: GPTQ,
    seed: int,
    progress: Callable[..., None],
) -> dict[str, SiteRounding]:
    """GPTQ codes for every weight site with a quantizer, in forward order.

    Each site's ``H`` comes from its input in the quantized model (activation quantizers
    on, every upstream weight already on GPTQ's grid): sequential GPTQ. With
    ``config.target == "float"`` GPTQ also runs on `float_target`'s shifted weight.
    Each output column then keeps, of nearest rounding and these codes, the one with the
    lowest output error against the folded float model on calibration rows held out of
    ``H`` and the cross moment (``config.held_out`` of ``config.max_rows`` sampled rows).

    Args:
      graph, plan: the traced model and its sites.
      qparams: after the fold and weight re-calibration (float weights in ``params``).
      batch_leaves: input leaves of the calibration batches.
      config: damping, blocks, order, rows.
      seed: for sampling the judged rows.
      progress: reports each site.

    Returns:
      Site name -> `SiteRounding`, for every weight site with a quantizer (``codes``
      None, and a note saying why, where GPTQ does not apply).
    """
    results: dict[str, SiteRounding] = {}
    sites = []
    for w in plan.weights:
        qp = qparams.weights.get(w.name)
        if qp is None:
            continue
        reason = refusal(graph, w, qp)
        if reason is None:
            sites.append(w)
        else:
            results[w.name] = SiteRounding(w.name, None, note=f"nearest rounding: GPTQ not applied, {reason}")
    if not sites:
        return results
    rng = np.random.default_rng(seed + 11)
    leaves = list(jax.tree_util.tree_leaves(qparams.params))

    def recorder(w):
        def hook(args):
            x = jnp.concatenate([_rows(a[1 - w.weight_operand], _x_contracting(graph, w)) for a in args])
            sampled = rng.permutation(x.shape[0])[: min(config.max_rows, x.shape[0])]
            n_held = int(round(len(sampled) * config.held_out))
            # too few rows to hold any out: judge on the rows GPTQ saw
            held[w.name] = np.sort(sampled[:n_held]) if n_held >= 1 else np.zeros(0, np.int64)
            fitted[w.name] = np.sort(sampled[n_held:])
            float_rows[w.name] = (x[fitted[w.name]], x[held[w.name]])
            return args

        return hook

    held: dict[str, np.ndarray] = {}
    fitted: dict[str, np.ndarray] = {}
    float_rows: dict[str, tuple[jax.Array, jax.Array]] = {}
    float_hooks = quant_hooks(graph, plan, qparams, quantize=False)
    evaluate_batches(graph, leaves, batch_leaves, float_hooks.replace(operands={w.node: recorder(w) for w in sites}))

    def rounder(w):
        qp = qparams.weights[w.name]

        def hook(args):
            x_q = jnp.concatenate([_rows(a[1 - w.weight_operand], _x_contracting(graph, w)) for a in args])
            matrix = weight_matrix(jnp.asarray(args[0][w.weight_operand], jnp.float32), w.contracting)
            keep = np.ones(x_q.shape[0], bool)
            keep[held[w.name]] = False
            x_fit = x_q[keep] if not keep.all() else x_q
            hessian = 2.0 * jnp.matmul(x_fit.T, x_fit, precision=_HIGHEST) / x_fit.shape[0]
            (fp_fit, fp_held), has_held = float_rows[w.name], len(held[w.name]) > 0
            judged_q, judged_fp = (x_q[held[w.name]], fp_held) if has_held else (x_q[fitted[w.name]], fp_fit)
            nearest = nearest_codes(matrix, qp)
            candidates = [nearest]
            codes, damping = matrix_codes(matrix, hessian, qp, config)
            if codes is not None:
                candidates.append(codes)
            if codes is not None and config.target == "float":
                q_fit = x_q[fitted[w.name]]
                cross = 2.0 * jnp.matmul(q_fit.T, fp_fit - q_fit, precision=_HIGHEST) / q_fit.shape[0]
                target = float_target(matrix, hessian, cross, jnp.float32(damping))
                corrected, _ = matrix_codes(target, hessian, qp, dataclasses.replace(config, damping=damping))
                if corrected is not None:
                    candidates.append(corrected)
            # each output column is its own problem: it keeps its best candidate
            errors = jnp.stack([_judge(judged_q, judged_fp, matrix, qp, c) for c in candidates])
            best = jnp.argmin(errors, axis=0)
            chosen = jnp.take_along_axis(jnp.stack(candidates), best[None, None, :], axis=0)[0]
            before, after = float(errors[0].sum()), float(jnp.min(errors, axis=0).sum())
            kept = int((best > 0).sum())
            judged = f"{judged_q.shape[0]} held-out rows" if has_held else f"{judged_q.shape[0]} rows"
            if codes is None:
                note = f"nearest rounding: GPTQ's Cholesky failed up to damping {damping:g}"
            else:
                by_target = ""
                if len(candidates) == 3:
                    by_target = f" ({int((best == 1).sum())} of the quantized-input target, {int((best == 2).sum())} of the float one)"
                note = (
                    f"GPTQ rounding on {x_fit.shape[0]} rows (damping {damping:g}): output MSE {before:.3g} -> "
                    f"{after:.3g} on {judged}; {kept}/{matrix.shape[1]} columns kept GPTQ's codes{by_target}"
                )
            result = SiteRounding(
                w.name,
                chosen if codes is not None else None,
                before,
                after,
                x_fit.shape[0],
                kept,
                matrix.shape[1],
                damping,
                note,
            )
            results[w.name] = result
            progress(f"gptq {w.name}: {result.note}", len(results), len(plan.weights))
            view = weight_from_matrix(dequantize_codes(chosen, qp), w.weight_shape, w.contracting)
            new_operand = view.astype(args[0][w.weight_operand].dtype)
            return [[new_operand if i == w.weight_operand else v for i, v in enumerate(a)] for a in args]

        return hook

    hooks = quant_hooks(graph, plan, qparams)
    evaluate_batches(
        graph, leaves, batch_leaves, hooks.replace(operands={**hooks.operands, **{w.node: rounder(w) for w in sites}})
    )
    return {w.name: results[w.name] for w in plan.weights if w.name in results}


def start_rounding(matrix: jax.Array, qp: qz.QuantParams, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """AdaRound's base and starting offsets that reproduce ``codes``.

    AdaRound chooses per weight between two neighbouring levels ``base`` and ``base + 1``
    (in units of the scale, before the zero point). Where ``codes`` are the floor or
    the ceiling of ``matrix / s`` the base is the floor, as in AdaRound; where GPTQ's
    error feedback moved a code further, the base is moved so that the code is one of
    the two choices and the other is the neighbour towards the float weight.

    Returns:
      ``(base, offset)``: ``[K, N]`` floats, ``offset`` in {0, 1}; the weight
      ``(clip(base + offset + z, qmin, qmax) - z) · s`` has the given codes.
    """
    s, z = _column_params(qp, matrix.shape[1])
    level = codes - z
    base = jnp.clip(jnp.floor(jnp.asarray(matrix, jnp.float32) / s), level - 1, level)
    return base, level - base


def soft_start(matrix: jax.Array, qp: qz.QuantParams, base: jax.Array, offset: jax.Array) -> jax.Array:
    """AdaRound's initial soft rounding ``h`` for a start given by `start_rounding`.

    AdaRound from nearest rounding starts at the fractional part ``r`` of ``W / s``, each
    weight as far from its rounding threshold (0.5) as the float weight is. From GPTQ's
    codes each weight keeps that distance but on GPTQ's side: ``max(r, 1 - r)`` where it
    rounds up, ``min(r, 1 - r)`` where down (the fractional part itself where GPTQ agrees
    with nearest rounding, its mirror image where GPTQ flipped it). Starting saturated at
    0 or 1 instead left AdaRound almost no gradient (the tiny LLaMA: no gain over GPTQ).
    Codes GPTQ moved beyond the floor or ceiling start saturated.
    """
    s, _ = _column_params(qp, matrix.shape[1])
    r = jnp.clip(jnp.asarray(matrix, jnp.float32) / s - base, 0.0, 1.0)
    up = jnp.maximum(jnp.maximum(r, 1 - r), 0.5 + 1e-3)
    down = jnp.minimum(jnp.minimum(r, 1 - r), 0.5 - 1e-3)
    return jnp.where(offset > 0.5, up, down)
