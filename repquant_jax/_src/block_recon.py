"""Block-wise reconstruction (RepQuant's learned step, BRECQ/QDrop-style).

Per reconstruction unit (`Plan.blocks`, `Plan.sub_blocks`, or the whole graph), in
forward order, with inputs from the already-quantized model and targets from the folded
float model, learn jointly

* the rounding of every weight matmul of the unit (AdaRound: a soft rounding
  ``h(V) ∈ [0, 1]`` per weight, annealed to 0/1 by a regularizer), and
* the scale of every per-tensor uniform activation quantizer read by its matmuls
  (LSQ-style: the straight-through gradient of the fake quantizer in its scale),

minimizing the mean squared error of the unit's outputs. With ``qdrop > 0`` each
activation element skips quantization with that probability during training (QDrop).
The calibration samples are split once: a unit keeps what it learned only if its
output error on the held-out samples falls and, with ``accept="model"`` (the default),
so does the whole model's: the quantized model with every earlier unit as decided, this
unit learned and the later ones at their starting rounding, against the float model's
outputs. A unit's own error can fall while the model's rises (MiniLM's post-LN blocks,
whose outputs carry a few channels 10x wider than the rest that dominate a block's
squared error), so the second check is what keeps reconstruction from making the model
worse on data it did not train on.

The training loop is one module-level jitted function (`_train`) whose static arguments
are the unit's program and the hyper-parameters: units of identical structure and shapes
(the blocks of a transformer) share one compiled executable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import Reconstruction
from repquant_jax._src.fold import weight_from_matrix, weight_matrix
from repquant_jax._src.gptq import soft_start, start_rounding
from repquant_jax._src.graph import Graph
from repquant_jax._src.hooks import affine_input, fake_quant_weight, offset_rewrite, point_hook
from repquant_jax._src.interpret import Hooks, evaluate_range, shared_values
from repquant_jax._src.learn import adaround_h, adaround_logits, always_compiled, rounding_regularizer
from repquant_jax._src.param_edits import params_with_weights
from repquant_jax._src.sites import Plan, WeightSite
from repquant_jax._src.state import QParams
from repquant_jax._src.types import NodeId, ValueId
from repquant_jax._src.units import Unit, find_units

__all__ = ["UnitResult", "ModelCheck", "reconstruct_blocks", "compile_count", "held_out_samples", "stacked_inputs"]


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What one unit's reconstruction did (for the report).

    Attributes:
      unit: the unit.
      train_before, train_after: output MSE on the training samples with the starting
        rounding (nearest, or GPTQ's codes with ``weight_rounding="gptq"``) and initial
        scales, and with what was learned.
      held_before, held_after: the same on the held-out samples (None without them).
      model_before, model_after: the model's output MSE on the judged samples, without
        and with what this unit learned (None when not checked: ``accept="unit"``, a
        single unit, or the unit's own error did not fall).
      kept: whether the learned rounding and scales were kept.
    """

    unit: Unit
    train_before: float
    train_after: float
    held_before: float | None
    held_after: float | None
    kept: bool
    model_before: float | None = None
    model_after: float | None = None

    def __str__(self) -> str:
        held = "" if self.held_before is None else f", held-out {self.held_before:.3g} -> {self.held_after:.3g}"
        model = "" if self.model_before is None else f", model {self.model_before:.3g} -> {self.model_after:.3g}"
        if self.kept:
            verdict = "kept"
        elif self.model_before is None:
            verdict = "not kept (held-out error did not fall)"
        else:
            verdict = "not kept (the model's held-out output error did not fall)"
        return f"{self.unit.name}: train {self.train_before:.3g} -> {self.train_after:.3g}{held}{model}; {verdict}"


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
    """A unit as the training loop sees it: its nodes and which values and matmuls are
    hooked, all quantizer state being data. Equal (and equally hashed) for units of
    identical structure, so that they share one compiled `_train`.

    Attributes:
      graph, unit: where the nodes are.
      shared: input-independent values the unit reads, in order of first use.
      points: activation points hooked in the unit (value ids); ``learned_points``
        marks those whose scale is learned.
      weights: ``(node, weight operand, contracting axes)`` of its quantized weight
        matmuls; ``learned_weights`` marks those whose rounding is learned.
      offsets: matmul outputs with a fold's output offset.
    """

    graph: Graph
    unit: Unit
    shared: tuple[ValueId, ...]
    points: tuple[ValueId, ...]
    learned_points: tuple[bool, ...]
    weights: tuple[tuple[NodeId, int, tuple[int, ...]], ...]
    learned_weights: tuple[bool, ...]
    offsets: tuple[ValueId, ...]
    signature: tuple

    def __hash__(self) -> int:
        return hash(self.signature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self.signature == other.signature


def _program(graph: Graph, unit: Unit, shared, points, learned_points, weights, learned_weights, offsets) -> _Program:
    """The program, with a signature over value ids renumbered in order of use."""
    local: dict[ValueId, int] = {v: k for k, v in enumerate(unit.inputs)}

    def rel(v):
        return local.setdefault(v, len(local))

    rows = []
    for node in graph.nodes[unit.start : unit.stop]:
        shapes = tuple((tuple(graph.avals[v].shape), str(graph.avals[v].dtype)) for v in node.inputs)
        rows.append((node.primitive, repr(sorted(node.params.items())), shapes, tuple(rel(v) for v in node.inputs)))
        for v in node.outputs:
            rel(v)
    signature = (
        tuple(rows),
        tuple(rel(v) for v in shared),
        tuple(rel(v) for v in points),
        learned_points,
        tuple((n - unit.start, op, c) for n, op, c in weights),
        learned_weights,
        tuple(rel(v) for v in offsets),
    )
    return _Program(graph, unit, shared, points, learned_points, weights, learned_weights, offsets, signature)


def _rounded(operand, qp: qz.QuantParams, contracting, rounding, base=None):
    """The weight operand on its grid with per-weight rounding offsets in [0, 1] above
    ``base`` (default: the floor of the weight in units of the scale)."""
    matrix = weight_matrix(operand, contracting)
    qmin, qmax = qz.code_range(qp)
    s = jnp.asarray(qp.scale, matrix.dtype)
    z = jnp.asarray(qp.zero_point, matrix.dtype)
    base = jnp.floor(matrix / s) if base is None else base.astype(matrix.dtype)
    q = (jnp.clip(base + rounding + z, qmin, qmax) - z) * s
    return weight_from_matrix(q, operand.shape, contracting)


def _init_rounding(operand, qp: qz.QuantParams, contracting):
    """AdaRound's initial logits: ``h(V)`` equal to the fractional part."""
    matrix = weight_matrix(operand, contracting)
    rest = matrix / jnp.asarray(qp.scale, matrix.dtype)
    return adaround_logits(rest - jnp.floor(rest))


def _nearest(operand, qp, contracting):
    matrix = weight_matrix(operand, contracting)
    rest = matrix / jnp.asarray(qp.scale, matrix.dtype)
    return (jnp.round(rest) - jnp.floor(rest)).astype(matrix.dtype)


def _hard_rounding(learn, k: int, dtype) -> jax.Array:
    """The learned rounding offsets (0 or 1) of the ``k``-th learned weight."""
    return (adaround_h(learn["rounding"][k]) >= 0.5).astype(dtype)


def _learned_scale(qp: qz.QuantParams, learn, k: int) -> qz.QuantParams:
    """``qp`` with the ``k``-th learned activation scale factor applied."""
    return qp.replace(scale=qp.scale * jnp.exp(learn["log_scale"][k]))


def _hooks(program: _Program, learn, data, mode: str, key, qdrop: float) -> Hooks:
    """The unit's hooks from ``data``: ``mode`` ``"soft"`` (training), ``"hard"``
    (learned, rounded), ``"nearest"`` (before learning: the starting rounding, nearest
    or GPTQ's) or ``"float"`` (the folded float model: input affines and output offsets
    only)."""
    values, operands, rewrites = {}, {}, {}
    scale_index = 0
    for k, vid in enumerate(program.points):
        point = data["points"][k]
        qp = None if mode == "float" else point["qp"]
        if program.learned_points[k]:
            if mode not in ("nearest", "float"):
                qp = _learned_scale(point["qp"], learn, scale_index)
            scale_index += 1
        values[vid] = functools.partial(
            _point, qp, point["scale"], point["offset"], qdrop if mode == "soft" else 0.0, jax.random.fold_in(key, k)
        )
    rounding_index = 0
    for k, (node, operand, contracting) in enumerate(program.weights):
        rounding, base = None, None
        if program.learned_weights[k]:
            base, start = data["starts"][rounding_index]
            if mode == "soft":
                rounding = adaround_h(learn["rounding"][rounding_index])
            elif mode == "hard":
                rounding = _hard_rounding(learn, rounding_index, jnp.float32)
            else:
                rounding = start
            rounding_index += 1
        if mode != "float":
            operands[node] = functools.partial(_weight, data["weights"][k], operand, contracting, rounding, base)
    for k, vid in enumerate(program.offsets):
        rewrites[vid] = offset_rewrite(data["offsets"][k])
    return Hooks(values=values, rewrites=rewrites, operands=operands)


def _point(qp, scale, offset, drop: float, key, values):
    """The point's hook (`hooks.point_hook`); with ``drop``, each element keeps its
    unquantized value with that probability (QDrop)."""
    quantized = point_hook(qp, scale, offset)(values)
    if not drop or qp is None:
        return quantized
    shifted = [affine_input(v, scale, offset) for v in values]
    return [jnp.where(jax.random.bernoulli(key, drop, v.shape), v, q) for v, q in zip(shifted, quantized)]


def _weight(qp, operand: int, contracting, rounding, base, args):
    w = args[0][operand]
    if rounding is None and qp.kind not in ("uniform", "symmetric"):
        new = fake_quant_weight(w, qp, contracting)
    else:
        r = _nearest(w, qp, contracting) if rounding is None else rounding.astype(w.dtype)
        new = _rounded(w, qp, contracting, r, base)
    return [[new if i == operand else x for i, x in enumerate(a)] for a in args]


def _run(program: _Program, learn, data, inputs, mode: str, key, qdrop: float = 0.0):
    """The unit's outputs, stacked over calibration batches."""
    unit = program.unit
    shared = dict(zip(program.shared, data["shared"]))

    def one(batch_inputs, key):
        hooks = _hooks(program, learn, data, mode, key, qdrop)
        per_batch = {v: [batch_inputs[k]] for k, v in enumerate(unit.inputs)}
        out = evaluate_range(program.graph, unit.start, unit.stop, shared, per_batch, unit.outputs, hooks)
        return [out[v][0] for v in unit.outputs]

    keys = jax.random.split(key, inputs[0].shape[0])
    return jax.vmap(one)(inputs, keys)


def _sample_rows(targets: Sequence[Any]) -> int | None:
    """Samples per batch: the common length of the outputs' second axis (the first of a
    batch), leaving aside outputs of length 1 there (broadcast over the samples: a mask,
    position tables); None when the outputs disagree or none has such an axis."""
    lengths = {t.shape[1] for t in targets if t.ndim > 1 and t.shape[1] != 1}
    if len(lengths) != 1 or any(t.ndim < 2 for t in targets):
        return None
    return lengths.pop()


def _per_sample_mse(outputs, targets):
    """``[batches, rows]``: mean squared error per sample (the leading axis of a batch;
    ``[batches, 1]`` when the outputs do not share one, `_sample_rows`)."""
    per_row = _sample_rows(targets) is not None
    total = 0.0
    for o, t in zip(outputs, targets):
        err = (o.astype(jnp.float32) - t.astype(jnp.float32)) ** 2
        if per_row:
            total = total + err.reshape(err.shape[0], err.shape[1], -1).mean(-1)
        else:
            total = total + err.reshape(err.shape[0], -1).mean(-1)[:, None]
    return total


def _optimizer(hyper: Reconstruction) -> optax.GradientTransformation:
    return optax.multi_transform(
        {"rounding": optax.adam(hyper.learning_rate), "log_scale": optax.adam(hyper.scale_learning_rate)},
        {"rounding": "rounding", "log_scale": "log_scale"},
    )


@functools.partial(jax.jit, static_argnames=("program", "hyper", "chunk"))
def _train(
    program: _Program, hyper: Reconstruction, chunk: int, first_step, learn, opt_state, data, inputs, targets, mask, key
):
    """``chunk`` optimization steps from ``first_step`` (of ``hyper.steps``)."""
    optimizer = _optimizer(hyper)
    warm = int(hyper.steps * hyper.warmup)
    n_weights = max(1, sum(v.size for v in learn["rounding"]))
    batches = inputs[0].shape[0]
    per_step = min(hyper.batches_per_step or batches, batches)

    def loss(learn, step, key):
        step_inputs, step_targets, step_mask = inputs, targets, mask
        if per_step < batches:  # a random subset of the calibration batches
            pick_key, key = jax.random.split(key)
            pick = jax.random.permutation(pick_key, batches)[:per_step]
            step_inputs, step_targets, step_mask = [x[pick] for x in inputs], [t[pick] for t in targets], mask[pick]
        outputs = _run(program, learn, data, step_inputs, "soft", key, hyper.qdrop)
        rec = (_per_sample_mse(outputs, step_targets) * step_mask).sum() / jnp.maximum(step_mask.sum(), 1.0)
        t = jnp.clip((step - warm) / max(1, hyper.steps - warm), 0.0, 1.0)
        beta = hyper.beta_end + (hyper.beta_start - hyper.beta_end) * (1 - t)
        lam = jnp.where(step < warm, 0.0, hyper.reg_weight)
        reg = sum(rounding_regularizer(adaround_h(v), beta) for v in learn["rounding"])
        return rec + lam * reg / n_weights * 1e3

    def body(step, carry):
        learn, opt_state = carry
        grads = jax.grad(loss)(learn, step, jax.random.fold_in(key, step))
        updates, opt_state = optimizer.update(grads, opt_state, learn)
        return optax.apply_updates(learn, updates), opt_state

    return jax.lax.fori_loop(first_step, first_step + chunk, body, (learn, opt_state))


@functools.partial(jax.jit, static_argnames=("program", "mode"))
def _evaluate(program: _Program, mode: str, learn, data, inputs, key):
    return _run(program, learn, data, inputs, mode, key)


def _error(program, data, inputs, targets, key, learn, mode):
    """Per-sample output error of the unit in ``mode``."""
    return _per_sample_mse(_evaluate(program, mode, learn, data, inputs, key), targets)


def compile_count() -> int:
    """Executables compiled so far by the training loop (one per distinct unit shape)."""
    return _train._cache_size()  # type: ignore[attr-defined]  # jit's private cache counter


def _split_mask(targets: Sequence[Any], held_out: float, seed: int):
    """Training mask ``[batches, rows]`` and whether held-out samples exist. Samples are
    the rows of the leading axis of every batch when the outputs share it
    (`_sample_rows`), else batches (``rows`` 1). Depends on the outputs' shapes only."""
    shape = (targets[0].shape[0], _sample_rows(targets) or 1)
    total = shape[0] * shape[1]
    n_held = int(round(total * held_out)) if total > 1 else 0
    mask = np.ones(total, np.float32)
    mask[np.random.default_rng(seed).choice(total, size=n_held, replace=False)] = 0.0
    return jnp.asarray(mask.reshape(shape)), n_held > 0


def stacked_inputs(graph: Graph, batch_leaves: Sequence[Sequence[Any]]) -> dict[ValueId, jax.Array]:
    """The graph's inputs over the calibration batches, stacked on a leading axis."""
    return {v: jnp.stack([b[k] for b in batch_leaves]) for k, v in enumerate(graph.input_ids)}


def held_out_samples(graph: Graph, plan: Plan, batches: int, held_out: float, seed: int) -> np.ndarray | None:
    """``[batches, rows]``: True for the calibration samples `ModelCheck` judges on
    (the same split, from the model's output shapes); None when the model's outputs do
    not lead with the samples or nothing is held out."""
    (whole,) = find_units(graph, plan, "model")
    outputs = [jax.ShapeDtypeStruct((batches, *graph.avals[v].shape), graph.avals[v].dtype) for v in whole.outputs]
    if _sample_rows(outputs) is None:
        return None
    mask, has_held = _split_mask(outputs, held_out, seed)
    return np.asarray(mask) == 0 if has_held else None


class _Setup(NamedTuple):
    """A unit ready to train: its program and data, the weight sites whose rounding and
    the points whose scale it learns, and the names of all its points (in the order of
    ``program.points``)."""

    program: _Program
    data: dict[str, Any]
    learned_w: tuple[WeightSite, ...]
    learned_s: tuple[str, ...]
    point_names: tuple[str, ...]


@always_compiled
def reconstruct_blocks(
    graph: Graph,
    plan: Plan,
    qparams: QParams,
    batch_leaves: Sequence[Sequence[Any]],
    config: Reconstruction,
    seed: int,
    progress: Callable[..., None],
    start: Mapping[str, jax.Array] | None = None,
) -> tuple[QParams, tuple[UnitResult, ...]]:
    """Reconstructs every unit in forward order (see the module docstring).

    Args:
      graph, plan: the traced model and its sites.
      qparams: after the fold and weight re-calibration.
      batch_leaves: input leaves of each calibration batch (all the same shapes).
      config: the reconstruction settings.
      seed: for the held-out split and QDrop.
      progress: reports each unit.
      start: weight site -> integer codes its rounding starts from (GPTQ's), for some
        sites; the others start from nearest rounding. A unit that keeps nothing it
        learned keeps these codes.

    Returns:
      ``(qparams, results)``: weights on their learned grids, learned activation
      scales, and one `UnitResult` per unit.
    """
    start = start or {}
    if config.granularity == "model":
        units = find_units(graph, plan, "model")
    else:
        units = plan.sub_blocks if config.granularity == "sub_block" else plan.blocks
    shared = shared_values(graph, list(jax.tree_util.tree_leaves(qparams.params)))
    float_env = stacked_inputs(graph, batch_leaves)
    quant_env = dict(float_env)
    updates: list[tuple[WeightSite, Any]] = []
    activations = dict(qparams.activations)
    results = []
    key = jax.random.key(seed)
    model = None
    if config.accept == "model" and len(units) > 1:
        model = ModelCheck.build(graph, plan, qparams, shared, float_env, config.held_out, seed, start)
    for i, unit in enumerate(units):
        setup = _unit_program(graph, plan, unit, qparams, shared, start)
        program, data, learned_w, learned_s = setup.program, setup.data, setup.learned_w, setup.learned_s
        f_inputs = [float_env[v] for v in unit.inputs]
        q_inputs = [quant_env[v] for v in unit.inputs]
        k_eval, k_train, key = jax.random.split(key, 3)
        targets = _evaluate(program, "float", None, data, f_inputs, k_eval)
        learn = {
            "rounding": [
                adaround_logits(soft_start(weight_matrix(operand, w.contracting), qp, base, h0))
                if w.name in start
                else _init_rounding(operand, qp, w.contracting)
                for w, (operand, qp), (base, h0) in zip(
                    learned_w, _learned_operands(graph, learned_w, shared, qparams), data["starts"]
                )
            ],
            "log_scale": [jnp.zeros((), jnp.float32) for _ in learned_s],
        }
        check = model if model is not None and model.samples_match(targets) else None
        if check is not None:
            mask, has_held = check.mask, check.has_held
        else:
            mask, has_held = _split_mask(targets, config.held_out, seed + i)
        judge = (1.0 - mask) if has_held else mask
        error = functools.partial(_error, program, data, q_inputs, targets, k_eval)
        before = error(learn, "nearest")
        after = before
        if learned_w or learned_s:
            train = functools.partial(_train, program, config)
            learn, after = _learn(train, error, learn, before, data, q_inputs, targets, mask, judge, config, k_train)
        kept = _masked_mean(after, judge) < _masked_mean(before, judge)
        model_before = model_after = None
        if kept and check is not None:
            candidate = check.with_unit(setup, learn)
            model_before, model_after = check.judged_error, candidate.judged_error
            kept = model_after < model_before
            if kept:
                model = candidate
        elif kept and model is not None:  # not judged by the model, but later checks start from it
            model = model.with_unit(setup, learn)
        result = UnitResult(
            unit,
            _masked_mean(before, mask),
            _masked_mean(after, mask),
            _masked_mean(before, 1.0 - mask) if has_held else None,
            _masked_mean(after, 1.0 - mask) if has_held else None,
            kept,
            model_before,
            model_after,
        )
        results.append(result)
        progress(f"reconstructed {result}", i + 1, len(units))
        for k, (w, (operand, qp)) in enumerate(zip(learned_w, _learned_operands(graph, learned_w, shared, qparams))):
            base, h0 = data["starts"][k]
            if result.kept:
                rounding = _hard_rounding(learn, k, operand.dtype)
            elif w.name in start:  # the starting codes stay (in float, nearest would)
                rounding = h0.astype(operand.dtype)
            else:
                continue
            updates.append((w, np.asarray(_rounded(operand, qp, w.contracting, rounding, base))))
        if result.kept:
            for k, n in enumerate(learned_s):
                activations[n] = _learned_scale(activations[n], learn, k)
        # the next unit reads this unit's outputs: float targets, quantized (learned) ones
        q_out = _evaluate(program, "hard" if result.kept else "nearest", learn, data, q_inputs, k_eval)
        float_env.update(zip(unit.outputs, targets))
        quant_env.update(zip(unit.outputs, q_out))
    new_params = params_with_weights(qparams.params, updates)
    return qparams.replace(params=new_params, activations=activations), tuple(results)


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    """The whole model, quantized with what the units decided so far, and its float
    outputs: judges whether what a unit learned lowers the model's held-out error.

    Attributes:
      setup: the whole graph as one unit; its data holds the decided roundings (as
        starting roundings) and activation scales.
      inputs, targets: the graph's inputs and float outputs over the calibration batches.
      mask, has_held: the training-sample mask every unit shares, and whether held-out
        samples exist.
      key: for the evaluation (unused without QDrop, but an argument of it).
      judged_error: the model's output MSE on the judged samples.
    """

    setup: _Setup
    inputs: list[jax.Array]
    targets: list[jax.Array]
    mask: jax.Array
    has_held: bool
    key: jax.Array
    judged_error: float = float("nan")

    @classmethod
    def build(
        cls,
        graph: Graph,
        plan: Plan,
        qparams: QParams,
        shared: Mapping[ValueId, Any],
        float_env: Mapping[ValueId, jax.Array],
        held_out: float,
        seed: int,
        start: Mapping[str, jax.Array] | None = None,
    ) -> ModelCheck | None:
        """The check of the model in ``qparams`` (weights at their starting rounding:
        nearest, or ``start``'s codes) on the calibration batches (``float_env``: the
        graph's `stacked_inputs`; ``shared``: its `interpret.shared_values`), with
        ``held_out`` of the samples judged (`held_out_samples`); None when the model's
        outputs do not lead with the batch's samples (a loss, a scalar): then each unit
        is judged on its own."""
        (whole,) = find_units(graph, plan, "model")
        setup = _unit_program(graph, plan, whole, qparams, shared, start or {})
        inputs = [float_env[v] for v in whole.inputs]
        key = jax.random.key(seed)
        targets = list(_evaluate(setup.program, "float", None, setup.data, inputs, key))
        if _sample_rows(targets) is None:
            return None
        mask, has_held = _split_mask(targets, held_out, seed)
        return cls(setup, inputs, targets, mask, has_held, key)._judged()

    def samples_match(self, targets: Sequence[jax.Array]) -> bool:
        """Whether a unit's outputs have the model outputs' samples (so the units can
        share its split)."""
        return (targets[0].shape[0], _sample_rows(targets)) == self.mask.shape

    def _judged(self) -> ModelCheck:
        out = _evaluate(self.setup.program, "nearest", None, self.setup.data, self.inputs, self.key)
        judge = (1.0 - self.mask) if self.has_held else self.mask
        return dataclasses.replace(self, judged_error=_masked_mean(_per_sample_mse(out, self.targets), judge))

    def with_activation(self, name: str, qp: qz.QuantParams) -> ModelCheck:
        """The check with point ``name`` quantized by ``qp`` (of the same form)."""
        model = self.setup
        points = list(model.data["points"])
        k = model.point_names.index(name)
        points[k] = {**points[k], "qp": qp}
        return dataclasses.replace(self, setup=model._replace(data={**model.data, "points": points}))._judged()

    def with_unit(self, unit: _Setup, learn) -> ModelCheck:
        """The check with ``unit``'s learned rounding and scales in place."""
        model = self.setup
        starts = list(model.data["starts"])
        index = {w.name: j for j, w in enumerate(model.learned_w)}
        for k, w in enumerate(unit.learned_w):
            base, _ = unit.data["starts"][k]
            starts[index[w.name]] = (base, _hard_rounding(learn, k, base.dtype))
        points = list(model.data["points"])
        where = {n: j for j, n in enumerate(model.point_names)}
        for k, name in enumerate(unit.learned_s):
            point = points[where[name]]
            points[where[name]] = {**point, "qp": _learned_scale(point["qp"], learn, k)}
        data = {**model.data, "starts": starts, "points": points}
        return dataclasses.replace(self, setup=model._replace(data=data))._judged()


def _learn(train, error, learn, before, data, inputs, targets, mask, judge, config: Reconstruction, key):
    """Trains in chunks of ``config.eval_every`` steps and returns the state (and its
    per-sample error) that is best on the judged samples: early stopping on held-out."""
    opt_state = _optimizer(config).init(learn)
    best, best_error, after, step = learn, _masked_mean(before, judge), before, 0
    while step < config.steps:
        chunk = min(config.eval_every, config.steps - step)
        learn, opt_state = train(chunk, step, learn, opt_state, data, inputs, targets, mask, key)
        step += chunk
        err = error(learn, "hard")
        if _masked_mean(err, judge) < best_error:
            best, best_error, after = learn, _masked_mean(err, judge), err
    return best, after


def _masked_mean(err, mask) -> float:
    return float((err * mask).sum() / max(float(jnp.sum(mask)), 1.0))


def _learned_operands(graph: Graph, learned_w, shared, qparams: QParams):
    """``(weight operand, quantizer)`` of each learned weight site."""
    return [(shared[graph.nodes[w.node].inputs[w.weight_operand]], qparams.weights[w.name]) for w in learned_w]


def _start(operand, qp: qz.QuantParams, contracting, codes):
    """``(base, offset)`` of a learned weight's starting rounding: nearest rounding
    above the floor, or ``codes`` (`gptq.start_rounding`)."""
    if codes is None:
        matrix = weight_matrix(operand, contracting)
        return jnp.floor(matrix / jnp.asarray(qp.scale, matrix.dtype)), _nearest(operand, qp, contracting)
    return start_rounding(weight_matrix(jnp.asarray(operand, jnp.float32), contracting), qp, codes)


def _unit_program(
    graph: Graph,
    plan: Plan,
    unit: Unit,
    qparams: QParams,
    shared: Mapping[ValueId, Any],
    start: Mapping[str, jax.Array],
) -> _Setup:
    """The unit's program and data, and the weight sites and points it learns."""
    in_unit = range(unit.start, unit.stop)
    shared_ids = tuple(dict.fromkeys(v for n in in_unit for v in graph.nodes[n].inputs if v in shared))
    defined = {v for n in in_unit for v in graph.nodes[n].outputs} | set(unit.inputs)
    acts = qparams.activations
    points = [
        p
        for p in plan.points
        if p.value_id in defined
        and (p.name in acts or p.name in qparams.input_offsets or p.name in qparams.input_scales)
    ]

    def learns_scale(name):
        qp = acts.get(name)
        return name in unit.points and qp is not None and qp.axis is None and qp.kind in ("uniform", "symmetric")

    sites = [w for w in plan.weights if unit.start <= w.node < unit.stop and w.name in qparams.weights]

    def learns_rounding(w):
        qp = qparams.weights[w.name]
        return w.owns_leaf and graph.nodes[w.node].primitive == "dot_general" and qp.kind in ("uniform", "symmetric")

    offsets = [w for w in plan.weights if unit.start <= w.node < unit.stop and w.name in qparams.output_offsets]
    program = _program(
        graph,
        unit,
        shared_ids,
        tuple(p.value_id for p in points),
        tuple(learns_scale(p.name) for p in points),
        tuple((w.node, w.weight_operand, w.contracting) for w in sites),
        tuple(learns_rounding(w) for w in sites),
        tuple(graph.nodes[w.node].outputs[0] for w in offsets),
    )
    data = {
        "shared": [shared[v] for v in shared_ids],
        "points": [
            {
                "qp": acts.get(p.name),
                "scale": qparams.input_scales.get(p.name),
                "offset": qparams.input_offsets.get(p.name),
            }
            for p in points
        ],
        "weights": [qparams.weights[w.name] for w in sites],
        "offsets": [qparams.output_offsets[w.name] for w in offsets],
    }
    learned_w = tuple(w for w in sites if learns_rounding(w))
    data["starts"] = [
        _start(
            shared[graph.nodes[w.node].inputs[w.weight_operand]],
            qparams.weights[w.name],
            w.contracting,
            start.get(w.name),
        )
        for w in learned_w
    ]
    learned_s = tuple(p.name for p in points if learns_scale(p.name))
    return _Setup(program, data, learned_w, learned_s, tuple(p.name for p in points))
