"""RepQuant's learned steps (docs/method.md, "Learned steps"), as optax loops over jitted losses.

* `learn_dual_clipping`: per-channel lower and upper clipping bounds of a norm-output
  quantizer, learned before the fold so that the next matmuls' outputs match.
* `reconstruct_weights`: AdaRound-style learned rounding of every weight matmul after
  the fold, in forward order, matching the float model's matmul outputs on the
  quantized model's inputs.

Both keep what they learn only where it lowers their loss (dual clipping: a group's bounds,
on the calibration rows; reconstruction: each output column's rounding, on calibration
tokens held out of its training), so they never make a site worse on the data they are
judged on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import DualClipping, QuantConfig, Reconstruction
from repquant_jax._src.fold import weight_from_matrix, weight_matrix
from repquant_jax._src.gptq import soft_start, start_rounding
from repquant_jax._src.hooks import quant_hooks
from repquant_jax._src.interpret import evaluate_batches
from repquant_jax._src.param_edits import params_with_weights
from repquant_jax._src.sites import WeightSite

__all__ = ["learn_dual_clipping", "reconstruct_weights"]


def _compiled():
    """Runs the optimization steps jitted even under ``jax.disable_jit()``.

    Compiled, XLA fuses multiply-adds into FMAs; op by op it rounds each product, so
    the learned clipping and rounding would depend on the jit mode by float32 rounding.
    These loops are internal, so they always take the compiled path and ``transform``
    gives bitwise-identical results either way (the rest of calibration runs op by op
    in both modes).
    """
    return jax.disable_jit(False)


def always_compiled(fn):
    """``fn`` with every jitted call inside it compiled under ``jax.disable_jit`` too
    (`_compiled`), so that its result does not depend on the jit mode."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _compiled():
            return fn(*args, **kwargs)

    return wrapped


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


# --------------------------------------------------------------------------------------
# Dual clipping


def _clip_bounds(logits, center, half_lo, half_hi):
    lo = center - jax.nn.sigmoid(logits[0]) * half_lo
    hi = center + jax.nn.sigmoid(logits[1]) * half_hi
    return lo, hi


def _learnable_fake_quant(x, lo, hi, bits: int, symmetric: bool):
    """Per-channel fake quant differentiable in its bounds (LSQ-style rounding STE)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = jnp.maximum(jnp.maximum(-lo, hi), 1e-8) / qmax
        return jnp.clip(_round_ste(x / s), -qmax - 1, qmax) * s
    qmax = 2**bits - 1
    s = jnp.maximum(hi - lo, 1e-8) / qmax
    z = _round_ste(-lo / s)
    return (jnp.clip(_round_ste(x / s) + z, 0, qmax) - z) * s


def learn_dual_clipping(
    rows: np.ndarray,
    quantizer: qz.QuantParams,
    matrices: Sequence[jax.Array],
    weight_quantizers: Sequence[qz.QuantParams],
    config: DualClipping,
) -> tuple[qz.QuantParams, float, float]:
    """Learns per-channel lower/upper clipping of a norm-output quantizer.

    The bounds are ``center ∓ sigmoid(logit)·half-range`` per channel (factors in (0, 1)
    on the distance from the channel's midpoint to its min and max), initialised from
    ``quantizer`` (the percentile + MSE search), trained with Adam to minimize the normalized MSE
    of every following matmul's output ``X @ W`` with quantized input and weights.

    Args:
      rows: ``[tokens, channels]`` samples of the norm output (upstream quantized).
      quantizer: the calibrated per-channel quantizer (uniform or symmetric, axis -1).
      matrices: the following matmuls' ``[channels, N]`` weight matrices.
      weight_quantizers: their per-column quantizers.
      config: steps and learning rate (the loop is deterministic; the caller samples
        the rows with the config's seed).

    Returns:
      ``(quantizer, loss_before, loss_after)``; the input quantizer if learning did not
      lower the loss.
    """
    x = jnp.asarray(rows, jnp.float32)
    symmetric = quantizer.kind == "symmetric"
    bits = quantizer.bits
    s0 = jnp.asarray(quantizer.scale, jnp.float32)
    z0 = jnp.asarray(quantizer.zero_point, jnp.float32)
    if symmetric:
        lo0, hi0 = -s0 * (2 ** (bits - 1) - 1), s0 * (2 ** (bits - 1) - 1)
    else:
        lo0, hi0 = -z0 * s0, (2**bits - 1 - z0) * s0
    mn = jnp.minimum(x.min(0), lo0)
    mx = jnp.maximum(x.max(0), hi0)
    if symmetric:
        bound = jnp.maximum(-mn, mx)
        mn, mx = -bound, bound
    center = (mn + mx) / 2
    half_lo = jnp.maximum(center - mn, 1e-8)
    half_hi = jnp.maximum(mx - center, 1e-8)
    ratio = jnp.stack([(center - lo0) / half_lo, (hi0 - center) / half_hi])
    logits = jnp.log(jnp.clip(ratio, 1e-3, 1 - 1e-3)) - jnp.log1p(-jnp.clip(ratio, 1e-3, 1 - 1e-3))

    weights = [qz.fake_quant(jnp.asarray(m, jnp.float32), wq) for m, wq in zip(matrices, weight_quantizers)]
    targets = [x @ jnp.asarray(m, jnp.float32) for m in matrices]
    norms = [jnp.mean(t**2) + 1e-12 for t in targets]

    def loss_fn(params):
        lo, hi = _clip_bounds(params, center, half_lo, half_hi)
        xq = _learnable_fake_quant(x, lo, hi, bits, symmetric)
        return sum(jnp.mean((xq @ w - t) ** 2) / n for w, t, n in zip(weights, targets, norms)) / len(weights)

    optimizer = optax.adam(config.learning_rate)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    def hard(params) -> qz.QuantParams:
        lo, hi = _clip_bounds(params, center, half_lo, half_hi)
        if symmetric:
            s = jnp.maximum(jnp.maximum(-lo, hi), 1e-8) / (2 ** (bits - 1) - 1)
            return qz.symmetric(s, bits, axis=-1)
        s = jnp.maximum(hi - lo, 1e-8) / (2**bits - 1)
        return qz.uniform(s, jnp.round(-lo / s), bits, axis=-1)

    def hard_loss(qp) -> float:
        xq = qz.fake_quant(x, qp)
        return float(sum(jnp.mean((xq @ w - t) ** 2) / n for w, t, n in zip(weights, targets, norms)) / len(weights))

    before = hard_loss(quantizer)
    params, state = logits, optimizer.init(logits)
    with _compiled():
        for _ in range(config.steps):
            params, state, _ = step(params, state)
    learned = hard(params)
    after = hard_loss(learned)
    if after >= before:
        return quantizer, before, before
    return learned, before, after


# --------------------------------------------------------------------------------------
# Weight reconstruction


def adaround_h(v, zeta=1.1, gamma=-0.1):
    """AdaRound's rectified sigmoid: the soft rounding offset in [0, 1] of logits ``v``."""
    return jnp.clip(jax.nn.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def adaround_logits(rest):
    """The logits whose `adaround_h` is ``rest`` (a fractional part): AdaRound's start."""
    return -jnp.log((1.1 - -0.1) / (jnp.clip(rest, 1e-3, 1 - 1e-3) - -0.1) - 1)


def rounding_regularizer(h, beta):
    """AdaRound's regularizer ``Σ (1 - |2h - 1|^β)``, pushing every ``h`` to 0 or 1."""
    return jnp.sum(1 - jnp.abs(2 * h - 1) ** beta)


def adaround_matrix(
    w: jax.Array,
    qp: qz.QuantParams,
    x_q: jax.Array,
    x_fp: jax.Array,
    config: Reconstruction,
    held_out: tuple[jax.Array, jax.Array] | None = None,
    start: jax.Array | None = None,
) -> tuple[jax.Array, float, float]:
    """Learns the rounding of a ``[K, N]`` weight matrix (per-column quantizer ``qp``).

    Minimizes ``mean_rows ||x_q @ Ŵ - x_fp @ W||²`` plus AdaRound's regularizer that
    drives every soft rounding to 0 or 1.

    Args:
      w: the weight matrix.
      qp: its per-column (or per-tensor) uniform quantizer.
      x_q, x_fp: training rows: the matmul's input in the quantized and float models.
      config: steps, learning rate and regularizer schedule.
      held_out: ``(x_q, x_fp)`` rows kept out of training. Each output column keeps its
        learned rounding only if that lowers the column's error on them (on the training
        rows when None): with ``K·N`` rounding choices and a few thousand rows, learning
        can overfit.
      start: integer codes of ``w`` to start from (GPTQ's), or None for nearest
        rounding. The soft rounding starts on their side of each threshold
        (`gptq.soft_start`; where a code is neither the floor nor the ceiling of
        ``w / s``, the two choices become that code and its neighbour towards ``w``,
        `gptq.start_rounding`), and each column keeps the best on the judged rows of
        nearest rounding, ``start`` and the learned rounding.

    Returns:
      ``(w_on_grid, loss_before, loss_after)``: a matrix whose fake quantization with
      ``qp`` gives the chosen codes (per column learned or nearest rounding), and the
      judged error of nearest rounding and of the result.
    """
    if qp.kind not in ("uniform", "symmetric"):
        raise ValueError(f"weight reconstruction needs a uniform weight quantizer, got {qp.kind}")
    qmin, qmax = qz.code_range(qp)
    s = jnp.broadcast_to(jnp.asarray(qp.scale), (w.shape[1],)) if qp.axis is not None else jnp.asarray(qp.scale)
    z = jnp.broadcast_to(jnp.asarray(qp.zero_point), s.shape)
    if start is None:
        w_floor = jnp.floor(w / s)
        rest = w / s - w_floor
        v0 = adaround_logits(rest)
        nearest = jnp.round(rest + w_floor) - w_floor  # 0/1: ordinary rounding
    else:
        w_floor, start_h = start_rounding(w, qp, start)
        v0 = adaround_logits(soft_start(w, qp, w_floor, start_h))  # h(v0) rounds to the start
        nearest = jnp.round(w / s) - w_floor  # ordinary rounding, offset from the moved floor
    target = x_fp @ w
    n_rows = x_q.shape[0]

    def dequant(h):
        return (jnp.clip(w_floor + h + z, qmin, qmax) - z) * s

    def rec(h):
        return jnp.sum((x_q @ dequant(h) - target) ** 2) / n_rows

    def loss_fn(v, beta, lam):
        h = adaround_h(v)
        reg = rounding_regularizer(h, beta)
        return rec(h) + lam * reg

    optimizer = optax.adam(config.learning_rate)

    @jax.jit
    def step(v, state, beta, lam):
        grads = jax.grad(loss_fn)(v, beta, lam)
        updates, state = optimizer.update(grads, state, v)
        return optax.apply_updates(v, updates), state

    warm = int(config.steps * config.warmup)
    v, state = v0, optimizer.init(v0)
    with _compiled():
        for i in range(config.steps):
            if i < warm:
                beta, lam = config.beta_start, 0.0
            else:
                t = (i - warm) / max(1, config.steps - warm)
                beta, lam = config.beta_end + (config.beta_start - config.beta_end) * (1 - t), config.reg_weight
            v, state = step(v, state, jnp.float32(beta), jnp.float32(lam))

    learned = (adaround_h(v) >= 0.5).astype(w.dtype)
    judge_q, judge_fp = held_out if held_out is not None else (x_q, x_fp)

    def column_errors(h):
        return jnp.sum((judge_q @ dequant(h) - judge_fp @ w) ** 2, axis=0) / judge_q.shape[0]

    # A column's rounding changes only its own output, so each column keeps whichever
    # rounding has the lower error.
    e_nearest, e_learned = column_errors(nearest), column_errors(learned)
    fallback, e_fallback = nearest, e_nearest
    if start is not None:  # GPTQ's codes, where they beat nearest rounding
        e_start = column_errors(start_h)
        fallback = jnp.where(e_start < e_nearest, start_h, nearest)
        e_fallback = jnp.minimum(e_start, e_nearest)
    better = e_learned < e_fallback
    chosen = jnp.where(better, learned, fallback)
    return dequant(chosen), float(e_nearest.sum()), float(jnp.where(better, e_learned, e_fallback).sum())


def _rows(operand: jax.Array, contracting: Sequence[int]) -> jax.Array:
    """A matmul's activation operand as ``[rows, K]`` (contracted axes last)."""
    moved = jnp.moveaxis(operand, tuple(contracting), tuple(range(operand.ndim - len(contracting), operand.ndim)))
    k = int(np.prod([operand.shape[a] for a in contracting]))
    return moved.reshape(-1, k)


def reconstruct_weights(
    graph,
    plan,
    qparams,
    batch_leaves,
    config: QuantConfig,
    progress: Callable[[str], None],
    start: Mapping[str, jax.Array] | None = None,
):
    """Learns the weight rounding of every dot_general weight site, in forward order.

    ``start`` maps sites to the codes their rounding starts from (GPTQ's; the others
    start from nearest rounding), see `adaround_matrix`.

    The float targets come from the folded float model (same function as the original,
    docs/method.md, "Folding a norm"); the inputs from the quantized model with every upstream site
    already reconstructed. Convolutions are left to nearest rounding.

    Returns:
      New `QParams` whose weights lie on their quantization grids.
    """
    rc = config.reconstruction
    sites = [
        w
        for w in plan.weights
        if w.name in qparams.weights and graph.nodes[w.node].primitive == "dot_general" and w.owns_leaf
    ]
    rng = np.random.default_rng(config.seed + 7)
    leaves = [np.array(leaf, copy=True) for leaf in jax.tree_util.tree_leaves(qparams.params)]

    def x_contracting(w):
        (lc, rc_), _ = graph.nodes[w.node].params["dimension_numbers"]
        return rc_ if w.weight_operand == 0 else lc

    # Float pass on the folded params: the inputs every matmul should have seen.
    float_hooks = quant_hooks(graph, plan, qparams, quantize=False)
    picks: dict[str, np.ndarray] = {}  # sampled rows: training rows, then held-out rows
    split: dict[str, int] = {}
    float_rows: dict[str, jax.Array] = {}

    def recorder(w):
        def hook(args):
            x = jnp.concatenate([_rows(a[1 - w.weight_operand], x_contracting(w)) for a in args])
            if w.name not in picks:
                total = min(int(rc.max_rows * (1 + rc.held_out)), x.shape[0])
                picks[w.name] = rng.choice(x.shape[0], size=total, replace=False)
                split[w.name] = total - int(round(total * rc.held_out / (1 + rc.held_out)))
            float_rows[w.name] = x[picks[w.name]]
            return args

        return hook

    evaluate_batches(graph, leaves, batch_leaves, float_hooks.replace(operands={w.node: recorder(w) for w in sites}))

    # Quantized pass: reconstruct each site when the quantized model reaches it.
    hooks = quant_hooks(graph, plan, qparams)
    done: list[tuple[str, float, float]] = []
    updates: list[tuple[WeightSite, np.ndarray]] = []

    def reconstructor(w):
        def hook(args):
            x_q = jnp.concatenate([_rows(a[1 - w.weight_operand], x_contracting(w)) for a in args])[picks[w.name]]
            leaf = leaves[w.param_index].reshape(-1)
            matrix = weight_matrix(jnp.asarray(leaf[w.kernel_index], jnp.float32), w.contracting)
            x_fp, n = float_rows[w.name], split[w.name]
            held_out = (x_q[n:], x_fp[n:]) if n < x_q.shape[0] else None
            codes = (start or {}).get(w.name)
            new, before, after = adaround_matrix(
                matrix, qparams.weights[w.name], x_q[:n], x_fp[:n], rc, held_out, codes
            )
            view = np.asarray(weight_from_matrix(new, w.weight_shape, w.contracting))
            updates.append((w, view))  # applied after the pass: leaves may back live arrays
            done.append((w.name, before, after))
            judged = "held-out output MSE" if held_out is not None else "output MSE"
            kept = "" if after < before else ", kept nearest rounding"  # no column improved
            progress(f"reconstructed {w.name}: {judged} {before:.3g} -> {after:.3g}{kept}", len(done), len(sites))
            new_operand = jnp.asarray(view, args[0][w.weight_operand].dtype)
            return [[new_operand if i == w.weight_operand else v for i, v in enumerate(a)] for a in args]

        return hook

    evaluate_batches(
        graph,
        leaves,
        batch_leaves,
        hooks.replace(operands={**hooks.operands, **{w.node: reconstructor(w) for w in sites}}),
    )
    return qparams.replace(params=params_with_weights(qparams.params, updates))
