"""Block-wise reconstruction (RepQuant's learned step, BRECQ/QDrop-style).

Per reconstruction unit (`units.find_units`: by default one transformer block), in
forward order, with inputs from the already-quantized model and targets from the folded
float model, learn jointly

* the rounding of every weight matmul of the unit (AdaRound: a soft rounding
  ``h(V) ∈ [0, 1]`` per weight, annealed to 0/1 by a regularizer), and
* the scale of every per-tensor uniform activation quantizer read by its matmuls
  (LSQ-style: the straight-through gradient of the fake quantizer in its scale),

minimizing the mean squared error of the unit's outputs. With ``qdrop > 0`` each
activation element skips quantization with that probability during training (QDrop).
The calibration samples are split: a unit keeps what it learned only if its output
error on the held-out samples falls, so reconstruction never makes a unit worse on
data it did not train on.

The training loop is one module-level jitted function (`_train`) whose static arguments
are the unit's program and the hyper-parameters: units of identical structure and shapes
(the blocks of a transformer) share one compiled executable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import Reconstruction
from repquant_jax._src.fold import weight_from_matrix, weight_matrix
from repquant_jax._src.graph import Graph
from repquant_jax._src.hooks import affine_input, quant_hooks
from repquant_jax._src.interpret import Hooks, evaluate_range, shared_values
from repquant_jax._src.param_edits import params_with_weights
from repquant_jax._src.sites import Plan, WeightSite
from repquant_jax._src.state import QParams
from repquant_jax._src.types import ValueId
from repquant_jax._src.units import Unit, find_units

__all__ = ["UnitResult", "reconstruct_blocks", "compile_count"]


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What one unit's reconstruction did (for the report).

    Attributes:
      unit: the unit.
      train_before, train_after: output MSE on the training samples with nearest
        rounding and initial scales, and with what was learned.
      held_before, held_after: the same on the held-out samples (None without them).
      kept: whether the learned rounding and scales were kept.
    """

    unit: Unit
    train_before: float
    train_after: float
    held_before: float | None
    held_after: float | None
    kept: bool

    def __str__(self) -> str:
        held = "" if self.held_before is None else f", held-out {self.held_before:.3g} -> {self.held_after:.3g}"
        verdict = "kept" if self.kept else "not kept (held-out error did not fall)"
        return f"{self.unit.name}: train {self.train_before:.3g} -> {self.train_after:.3g}{held}; {verdict}"


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
    """A unit as the training loop sees it. Equal (and equally hashed) for units of
    identical structure, so that they share one compiled `_train`."""

    graph: Graph
    unit: Unit
    weights: tuple[WeightSite, ...]  # learned rounding
    scales: tuple[str, ...]  # learned per-tensor scales (point names)
    scale_ids: tuple[ValueId, ...]  # their value ids
    signature: tuple

    def __hash__(self) -> int:
        return hash(self.signature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self.signature == other.signature


def _signature(graph: Graph, unit: Unit, ids: Mapping[ValueId, int]) -> tuple:
    """The unit's structure with value ids renumbered from its own inputs."""
    local = dict(ids)

    def rel(v):
        if v not in local:
            local[v] = len(local)
        return local[v]

    rows = []
    for node in graph.nodes[unit.start : unit.stop]:
        shapes = tuple((tuple(graph.avals[v].shape), str(graph.avals[v].dtype)) for v in node.inputs)
        rows.append((node.primitive, repr(sorted(node.params.items())), shapes, tuple(rel(v) for v in node.inputs)))
        for v in node.outputs:
            rel(v)
    return tuple(rows)


def _h(v):
    return jnp.clip(jax.nn.sigmoid(v) * 1.2 - 0.1, 0.0, 1.0)


def _rounded(operand, qp: qz.QuantParams, contracting, rounding):
    """The weight operand on its grid with per-weight rounding offsets in [0, 1]."""
    matrix = weight_matrix(operand, contracting)
    qmin, qmax = qz.code_range(qp)
    s = jnp.asarray(qp.scale, matrix.dtype)
    z = jnp.asarray(qp.zero_point, matrix.dtype)
    q = (jnp.clip(jnp.floor(matrix / s) + rounding + z, qmin, qmax) - z) * s
    return weight_from_matrix(q, operand.shape, contracting)


def _init_rounding(operand, qp: qz.QuantParams, contracting):
    """AdaRound's initial logits: ``h(V)`` equal to the fractional part."""
    matrix = weight_matrix(operand, contracting)
    rest = matrix / jnp.asarray(qp.scale, matrix.dtype)
    rest = jnp.clip(rest - jnp.floor(rest), 1e-3, 1 - 1e-3)
    return -jnp.log(1.2 / (rest + 0.1) - 1)


def _nearest(operand, qp, contracting):
    matrix = weight_matrix(operand, contracting)
    rest = matrix / jnp.asarray(qp.scale, matrix.dtype)
    return (jnp.round(rest) - jnp.floor(rest)).astype(matrix.dtype)


def _hooks(program: _Program, base: Hooks, learn, data, mode: str, key, qdrop: float) -> Hooks:
    """The unit's hooks: ``mode`` ``"soft"`` (training), ``"hard"`` (learned, rounded)
    or ``"nearest"`` (before learning)."""
    values = dict(base.values)
    for k, name in enumerate(program.scales):
        point = data["points"][name]
        qp = point["qp"]
        if mode != "nearest":
            qp = qp.replace(scale=qp.scale * jnp.exp(learn["log_scale"][k]))
        drop = qdrop if mode == "soft" else 0.0
        sub = jax.random.fold_in(key, k)

        def hook(vs, qp=qp, point=point, drop=drop, sub=sub):
            out = []
            for v in vs:
                v = affine_input(v, point["scale"], point["offset"])
                q = qz.fake_quant(v, qp).astype(v.dtype)
                if drop:
                    q = jnp.where(jax.random.bernoulli(sub, drop, v.shape), v, q)
                out.append(q)
            return out

        values[program.scale_ids[k]] = hook
    operands = dict(base.operands)
    for k, w in enumerate(program.weights):
        qp = data["weights"][w.name]
        if mode == "soft":
            rounding = _h(learn["rounding"][k])
        elif mode == "hard":
            rounding = (_h(learn["rounding"][k]) >= 0.5).astype(jnp.float32)
        else:
            rounding = None

        def operand_hook(args, w=w, qp=qp, rounding=rounding):
            operand = args[0][w.weight_operand]
            r = _nearest(operand, qp, w.contracting) if rounding is None else rounding.astype(operand.dtype)
            new = _rounded(operand, qp, w.contracting, r)
            return [[new if i == w.weight_operand else v for i, v in enumerate(a)] for a in args]

        operands[w.node] = operand_hook
    return base.replace(values=values, operands=operands)


def _run(program: _Program, base: Hooks, learn, data, inputs, mode: str, key, qdrop: float = 0.0):
    """The unit's outputs, stacked over calibration batches."""
    unit = program.unit

    def one(batch_inputs, key):
        hooks = _hooks(program, base, learn, data, mode, key, qdrop)
        per_batch = {v: [batch_inputs[k]] for k, v in enumerate(unit.inputs)}
        out = evaluate_range(program.graph, unit.start, unit.stop, data["shared"], per_batch, unit.outputs, hooks)
        return [out[v][0] for v in unit.outputs]

    keys = jax.random.split(key, inputs[0].shape[0])
    return jax.vmap(one)(inputs, keys)


def _per_sample_mse(outputs, targets):
    """``[batches, rows]``: mean squared error per sample (the leading axis of a batch)."""
    total = 0.0
    for o, t in zip(outputs, targets):
        err = (o.astype(jnp.float32) - t.astype(jnp.float32)) ** 2
        total = total + err.reshape(err.shape[0], err.shape[1], -1).mean(-1)
    return total


def _optimizer(hyper: Reconstruction) -> optax.GradientTransformation:
    return optax.multi_transform(
        {"rounding": optax.adam(hyper.learning_rate), "log_scale": optax.adam(hyper.scale_learning_rate)},
        {"rounding": "rounding", "log_scale": "log_scale"},
    )


@functools.partial(jax.jit, static_argnames=("program", "base_key", "hyper", "chunk"))
def _train(
    program: _Program,
    base_key: Any,
    hyper: Reconstruction,
    chunk: int,
    first_step,
    learn,
    opt_state,
    data,
    inputs,
    targets,
    mask,
    key,
):
    """``chunk`` optimization steps from ``first_step`` (of ``hyper.steps``)."""
    base = _BASES[base_key]
    optimizer = _optimizer(hyper)
    warm = int(hyper.steps * hyper.warmup)
    denom = jnp.maximum(mask.sum(), 1.0)

    def loss(learn, step, key):
        outputs = _run(program, base, learn, data, inputs, "soft", key, hyper.qdrop)
        rec = (_per_sample_mse(outputs, targets) * mask).sum() / denom
        t = jnp.clip((step - warm) / max(1, hyper.steps - warm), 0.0, 1.0)
        beta = hyper.beta_end + (hyper.beta_start - hyper.beta_end) * (1 - t)
        lam = jnp.where(step < warm, 0.0, hyper.reg_weight)
        reg = sum(jnp.sum(1 - jnp.abs(2 * _h(v) - 1) ** beta) for v in learn["rounding"])
        return rec + lam * reg / max(1, sum(v.size for v in learn["rounding"])) * 1e3

    def body(step, carry):
        learn, opt_state = carry
        grads = jax.grad(loss)(learn, step, jax.random.fold_in(key, step))
        updates, opt_state = optimizer.update(grads, opt_state, learn)
        return optax.apply_updates(learn, updates), opt_state

    return jax.lax.fori_loop(first_step, first_step + chunk, body, (learn, opt_state))


# Base hooks by key: hooks hold closures, which cannot be static jit arguments by value.
_BASES: dict[Any, Hooks] = {}
_TOKENS = itertools.count()


@functools.partial(jax.jit, static_argnames=("program", "base_key", "mode"))
def _evaluate(program: _Program, base_key: Any, mode: str, learn, data, inputs, key):
    return _run(program, _BASES[base_key], learn, data, inputs, mode, key)


def _error(program, base_key, data, inputs, targets, key, learn, mode):
    """Per-sample output error of the unit in ``mode``."""
    return _per_sample_mse(_evaluate(program, base_key, mode, learn, data, inputs, key), targets)


def compile_count() -> int:
    """Executables compiled so far by the training loop (one per distinct unit shape)."""
    return _train._cache_size()  # type: ignore[attr-defined]  # jit's private cache counter


def _split_mask(inputs: Sequence[jax.Array], targets: Sequence[jax.Array], held_out: float, seed: int):
    """Training mask ``[batches, rows]`` and whether held-out samples exist. Samples are
    the rows of the leading axis of every batch when all outputs share it, else batches."""
    n_batches, rows = targets[0].shape[0], targets[0].shape[1] if targets[0].ndim > 1 else 1
    per_row = targets[0].ndim > 1 and all(t.ndim > 1 and t.shape[1] == rows for t in targets)
    rng = np.random.default_rng(seed)
    shape = (n_batches, rows if per_row else 1)
    total = shape[0] * shape[1]
    n_held = int(round(total * held_out)) if total > 1 else 0
    mask = np.ones(total, np.float32)
    mask[rng.choice(total, size=n_held, replace=False)] = 0.0
    mask = np.broadcast_to(mask.reshape(shape), (n_batches, rows)).copy()
    return jnp.asarray(mask), n_held > 0


def reconstruct_blocks(
    graph: Graph,
    plan: Plan,
    qparams: QParams,
    batch_leaves: Sequence[Sequence[Any]],
    config: Reconstruction,
    seed: int,
    progress: Callable[..., None],
) -> tuple[QParams, tuple[UnitResult, ...]]:
    """Reconstructs every unit in forward order (see the module docstring).

    Args:
      graph, plan: the traced model and its sites.
      qparams: after the fold and weight re-calibration.
      batch_leaves: input leaves of each calibration batch (all the same shapes).
      config: the reconstruction settings.
      seed: for the held-out split and QDrop.
      progress: reports each unit.

    Returns:
      ``(qparams, results)``: weights on their learned grids, learned activation
      scales, and one `UnitResult` per unit.
    """
    units = find_units(graph, plan, "sub_block" if config.granularity == "sub_block" else "block")
    leaves = list(jax.tree_util.tree_leaves(qparams.params))
    shared = shared_values(graph, leaves)
    float_hooks = quant_hooks(graph, plan, qparams, quantize=False)
    quant = quant_hooks(graph, plan, qparams)
    token = next(_TOKENS)  # programs of one call only: the base hooks hold its quantizers
    base_key = token
    _BASES[base_key] = quant
    _BASES[(base_key, "float")] = float_hooks
    weights = {w.name: w for w in plan.weights}
    points = {p.name: p for p in plan.points}
    float_env = {v: jnp.stack([b[k] for b in batch_leaves]) for k, v in enumerate(graph.input_ids)}
    quant_env = dict(float_env)
    updates: list[tuple[WeightSite, Any]] = []
    activations = dict(qparams.activations)
    results = []
    key = jax.random.key(seed)
    try:
        for i, unit in enumerate(units):
            learned_w = tuple(
                weights[n]
                for n in unit.weights
                if n in qparams.weights
                and weights[n].owns_leaf
                and graph.nodes[weights[n].node].primitive == "dot_general"
                and qparams.weights[n].kind in ("uniform", "symmetric")
            )
            learned_s = tuple(
                n
                for n in unit.points
                if n in activations and activations[n].axis is None and activations[n].kind in ("uniform", "symmetric")
            )
            point_ids = {n: points[n].value_id for n in learned_s}
            program = _program(graph, unit, learned_w, learned_s, point_ids, token)
            float_program = _program(graph, unit, (), (), point_ids, token)
            data = {
                "shared": {
                    v: shared[v] for n in range(unit.start, unit.stop) for v in graph.nodes[n].inputs if v in shared
                },
                "weights": {w.name: qparams.weights[w.name] for w in learned_w},
                "points": {
                    n: {
                        "qp": activations[n],
                        "scale": qparams.input_scales.get(n),
                        "offset": qparams.input_offsets.get(n),
                    }
                    for n in learned_s
                },
            }
            f_inputs = [float_env[v] for v in unit.inputs]
            q_inputs = [quant_env[v] for v in unit.inputs]
            k_eval, k_train, key = jax.random.split(key, 3)
            targets = _evaluate(float_program, (base_key, "float"), "nearest", None, data, f_inputs, k_eval)
            learn = {
                "rounding": [
                    _init_rounding(
                        shared[graph.nodes[w.node].inputs[w.weight_operand]], qparams.weights[w.name], w.contracting
                    )
                    for w in learned_w
                ],
                "log_scale": [jnp.zeros((), jnp.float32) for _ in learned_s],
            }
            mask, has_held = _split_mask(q_inputs, targets, config.held_out, seed + i)
            judge = (1.0 - mask) if has_held else mask
            mean = lambda e, m: float((e * m).sum() / max(float(m.sum()), 1.0))  # noqa: E731

            error = functools.partial(_error, program, base_key, data, q_inputs, targets, k_eval)

            before = error(learn, "nearest")
            after = before
            if learned_w or learned_s:
                # train in chunks, keeping the rounding and scales that are best on the
                # held-out samples (early stopping)
                opt_state = _optimizer(config).init(learn)
                best, best_err, step = learn, mean(before, judge), 0
                while step < config.steps:
                    chunk = min(config.eval_every, config.steps - step)
                    learn, opt_state = _train(
                        program, base_key, config, chunk, step, learn, opt_state, data, q_inputs, targets, mask, k_train
                    )
                    step += chunk
                    err = error(learn, "hard")
                    if mean(err, judge) < best_err:
                        best, best_err, after = learn, mean(err, judge), err
                learn = best
            result = UnitResult(
                unit,
                mean(before, mask),
                mean(after, mask),
                mean(before, 1.0 - mask) if has_held else None,
                mean(after, 1.0 - mask) if has_held else None,
                mean(after, judge) < mean(before, judge),
            )
            results.append(result)
            progress(f"reconstructed {result}", i + 1, len(units))
            mode = "hard" if result.kept else "nearest"
            if result.kept:
                for k, w in enumerate(learned_w):
                    operand = shared[graph.nodes[w.node].inputs[w.weight_operand]]
                    rounding = (_h(learn["rounding"][k]) >= 0.5).astype(operand.dtype)
                    view = _rounded(operand, qparams.weights[w.name], w.contracting, rounding)
                    updates.append((w, np.asarray(view)))
                for k, n in enumerate(learned_s):
                    qp = activations[n]
                    activations[n] = qp.replace(scale=qp.scale * jnp.exp(learn["log_scale"][k]))
            # the next unit reads this unit's outputs: float targets, quantized (learned) ones
            q_out = _evaluate(program, base_key, mode, learn, data, q_inputs, k_eval)
            float_env.update(zip(unit.outputs, targets))
            quant_env.update(zip(unit.outputs, q_out))
    finally:
        _BASES.pop(base_key, None)
        _BASES.pop((base_key, "float"), None)
    new_params = params_with_weights(qparams.params, updates)
    return qparams.replace(params=new_params, activations=activations), tuple(results)


def _program(
    graph: Graph,
    unit: Unit,
    weights: tuple[WeightSite, ...],
    scales: tuple[str, ...],
    point_ids: Mapping[str, ValueId],
    token: int,
) -> _Program:
    ids = {v: k for k, v in enumerate(unit.inputs)}
    learned = tuple((w.name, w.weight_operand, w.contracting) for w in weights)
    scale_ids = tuple(point_ids[n] for n in scales)
    signature = (token, unit.start, _signature(graph, unit, ids), learned, scales)
    return _Program(graph, unit, weights, scales, scale_ids, signature)
