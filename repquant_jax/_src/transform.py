"""The RepQuant pipeline: ``transform(apply_fn, params, calib_batches, config)``.

::

    trace → plan → calibrate (forward order, upstream quantizers active)
          → learn dual clipping (repquant) → fold norms (§2.4) → re-calibrate folded weights
          → reconstruct weight rounding (repquant) → report → (qparams, qapply)

`qapply(qparams, *inputs)` is the graph interpreter with fake-quant hooks under
`jax.jit`; a new input shape re-traces and re-matches sites by name.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from repquant_jax._src import calibration as cal
from repquant_jax._src import quantizers as qz
from repquant_jax._src.config import QuantConfig, SiteSpec
from repquant_jax._src.fold import fold_norm_into_dense, weight_from_matrix, weight_matrix
from repquant_jax._src.graph import Graph, trace
from repquant_jax._src.interpret import evaluate, evaluate_batches
from repquant_jax._src.report import SiteReport, TransformReport
from repquant_jax._src.sites import Plan, WeightSite, analyze

__all__ = ["QParams", "QApply", "transform", "resolve_specs", "quant_hooks"]

_LOG_KINDS = ("log2", "log_sqrt2")


@struct.dataclass
class QParams:
    """Quantized parameters: folded float params plus per-site quantizer state.

    Attributes:
      params: the folded float parameters, same tree structure as the input params.
      weights: weight site name -> per-output-channel quantizer of its ``[K, N]`` matrix.
      activations: activation point name -> quantizer.
      input_offsets: activation point name -> ``(C,)`` added before quantizing
        (RMSNorm folds with an asymmetric quantizer, branch folds).
      output_offsets: weight site name -> array added to the matmul output (folds into
        matmuls without a bias parameter).
      input_scales: activation point name -> ``(C,)`` multiplying the value before
        the offset and the quantizer, for the matmuls only (branch folds of norms
        whose output also feeds a residual).
    """

    params: Any
    weights: dict[str, qz.QuantParams]
    activations: dict[str, qz.QuantParams]
    input_offsets: dict[str, jax.Array]
    output_offsets: dict[str, jax.Array]
    input_scales: dict[str, jax.Array] = struct.field(default_factory=dict)


class _Progress:
    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"[repquant {time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------
# Inputs


class _BatchStream:
    """Reads calibration batches lazily, in chunks, checking each against the first."""

    def __init__(self, calib_batches: Iterable[Any]):
        if calib_batches is None:
            raise ValueError("calib_batches is None: pass an iterable of calibration batches")
        self._iter = iter(calib_batches)
        self.count = 0
        self._signature = None

    def chunk(self, size: int) -> list[tuple[Any, ...]]:
        """Up to ``size`` more batches (empty at the end)."""
        out = []
        for item in self._iter:
            batch = tuple(item) if isinstance(item, (tuple, list)) else (item,)
            self._check(batch)
            out.append(batch)
            self.count += 1
            if len(out) == size:
                break
        if not out and self.count == 0:
            raise ValueError("calib_batches is empty: at least one calibration batch is needed")
        return out

    def _check(self, batch: tuple[Any, ...]) -> None:
        b = self.count
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        shapes = [(np.shape(x), jnp.result_type(x)) for x in leaves]
        if self._signature is None:
            self._signature = (treedef, shapes)
        elif treedef != self._signature[0]:
            raise ValueError(f"calibration batch {b} has structure {treedef}, batch 0 has {self._signature[0]}")
        elif shapes != self._signature[1]:
            raise ValueError(
                f"calibration batch {b} has input shapes/dtypes {shapes}, batch 0 has {self._signature[1]}; "
                "all calibration batches must have the same shapes (pad them to one length)"
            )
        for i, leaf in enumerate(leaves):
            if _has_non_finite(leaf):
                raise ValueError(f"calibration batch {b}, input {i} contains NaN or Inf")


class Reservoir:
    """A uniform random sample of at most ``cap`` values (or rows) of a stream.

    Bottom-k sampling: every value gets a random key and the ``cap`` smallest keys are
    kept, which is an exact uniform sample without replacement of everything seen.
    """

    def __init__(self, cap: int, rng: np.random.Generator):
        self.cap = cap
        self.rng = rng
        self.data: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self.seen = 0  # values, not rows

    def add(self, values: np.ndarray) -> None:
        """Adds values: a flat array, or ``[rows, C]`` (whole rows are kept)."""
        row_size = int(np.prod(values.shape[1:]))
        keep = max(1, self.cap // row_size)
        keys = self.rng.random(values.shape[0])
        self.seen += values.size
        if self.data is not None:
            values = np.concatenate([self.data, values])
            keys = np.concatenate([self._keys, keys])
        if values.shape[0] > keep:
            index = np.sort(np.argpartition(keys, keep - 1)[:keep])
            values, keys = values[index], keys[index]
        self.data, self._keys = values, keys


def _placed_like(params: Any, like: Any) -> Any:
    """``params`` with each leaf put on the sharding of its counterpart in ``like``
    where that is spread over several devices (a user's sharded params stay sharded)."""

    def place(leaf, original):
        if isinstance(original, jax.Array) and len(original.sharding.device_set) > 1:
            return jax.device_put(leaf, original.sharding)
        return leaf

    return jax.tree_util.tree_map(place, params, like)


def _has_non_finite(leaf: Any) -> bool:
    """NaN or Inf in a float array of any width (bfloat16 is not a NumPy float type)."""
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        return False
    return not bool(jnp.isfinite(jnp.asarray(leaf)).all())


def _check_params(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _has_non_finite(leaf):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} contains NaN or Inf")


# --------------------------------------------------------------------------------------
# Specs


def resolve_specs(plan: Plan, config: QuantConfig, *, warn_unused: bool = True) -> dict[str, SiteSpec]:
    """Per-site settings from the config and its rules (first matching rule wins).

    Raises:
      ValueError: if a norm group cannot be folded and ``config.unfoldable == "error"``.
    """
    groups = {g.name: g for g in plan.groups}
    specs: dict[str, SiteSpec] = {}
    used = set()

    def apply_rules(spec: SiteSpec) -> SiteSpec:
        for i, rule in enumerate(config.rules):
            if rule.matches(spec.name, spec.target):
                used.add(i)
                if spec.target == "weight" and rule.kind in _LOG_KINDS:
                    raise ValueError(
                        f"rule {rule.pattern!r} asks for a {rule.kind} quantizer on weight site "
                        f"{spec.name!r}: log quantizers are for softmax outputs in [0, 1]; give the "
                        "rule target='activation'"
                    )
                return dataclasses.replace(
                    spec,
                    bits=rule.bits if rule.bits is not None else spec.bits,
                    kind=rule.kind if rule.kind is not None else spec.kind,
                    granularity="per_tensor" if rule.kind in ("log2", "log_sqrt2") else spec.granularity,
                    skip=rule.skip,
                    rule=i,
                )
        return spec

    for w in plan.weights:
        spec = SiteSpec(w.name, "weight", config.w_bits, "uniform", config.weight_granularity, config.weight_calibration)
        specs[w.name] = apply_rules(spec)
    for p in plan.points:
        kind, granularity, bits = "uniform", "per_tensor", config.a_bits
        if p.source == "softmax":
            kind = config.softmax_quantizer
        elif p.source == "input":
            bits = config.input_bits
        elif p.fold_group is not None and config.norm_quantizer == "per_channel":
            group = groups[p.fold_group]
            granularity = "per_channel"
            if group.kind == "rmsnorm" and config.rmsnorm == "symmetric":
                kind = "symmetric"
            if not group.foldable and not (config.unfoldable == "branch" and group.branch_foldable):
                if config.unfoldable == "error":
                    raise ValueError(
                        f"norm group {group.name!r} cannot be folded ({group.reason}); "
                        "set unfoldable='branch', 'per_tensor' or 'per_channel' to quantize it anyway"
                    )
                # "branch" without a legal kernel half falls back to one scale
                granularity = "per_channel" if config.unfoldable == "per_channel" else "per_tensor"
        spec = SiteSpec(p.name, "activation", bits, kind, granularity, config.activation_calibration)
        specs[p.name] = apply_rules(spec)
    unused = [r.pattern for i, r in enumerate(config.rules) if i not in used]
    if unused and warn_unused:
        warnings.warn(f"quantization rules matched no site: {unused}", stacklevel=3)
    return specs


# --------------------------------------------------------------------------------------
# Calibration


def _subsample(x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``rows`` rows of ``x``, chosen at random."""
    if x.shape[0] <= rows:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=rows, replace=False))]


def calibrate_values(values: np.ndarray, spec: SiteSpec, config: QuantConfig, axis: int | None) -> qz.QuantParams:
    """Fits a quantizer to observed values (flat for per tensor, ``[rows, C]`` with
    ``axis=-1`` for per channel)."""
    method, bits, kind = spec.calibration, spec.bits, spec.kind
    if kind in _LOG_KINDS:
        low = float(np.min(values)) if np.size(values) else 0.0
        if low < 0:
            raise ValueError(
                f"a {kind} quantizer needs values >= 0 (softmax outputs), but {spec.name!r} has "
                f"values down to {low:.3g}; use a uniform quantizer there"
            )
        if method == "search":
            return cal.search_log_sqrt2(values, bits, kind=kind)
        top = np.max(values) if method == "minmax" else np.quantile(values, config.percentile)
        make = qz.log2 if kind == "log2" else qz.log_sqrt2
        return make(jnp.float32(max(float(top), 1e-8)), bits)
    symmetric = kind == "symmetric"
    if method == "minmax":
        qp = cal.minmax(values, bits, axis=axis, symmetric=symmetric)
    elif method == "percentile":
        qp = cal.percentile(values, bits, p=config.percentile, axis=axis, symmetric=symmetric)
    else:
        qp = cal.search_uniform(values, bits, axis=axis, symmetric=symmetric)
    return qp.replace(axis=-1) if axis is not None else qp


def calibrate_weight(matrix, spec: SiteSpec, config: QuantConfig) -> qz.QuantParams:
    """Per-output-channel (column) quantizer of a ``[K, N]`` weight matrix."""
    axis = 1 if spec.granularity == "per_channel" else None
    qp = calibrate_values(np.asarray(matrix, np.float32), spec, config, axis)
    return qp.replace(axis=1) if axis is not None else qp


def fake_quant_weight(view, qp: qz.QuantParams, contracting: tuple[int, ...]):
    """Fake-quantizes a weight as its matmul sees it, per output channel."""
    matrix = weight_matrix(view, contracting)
    return weight_from_matrix(qz.fake_quant(matrix, qp), view.shape, contracting)


def _point_values(values: list, spec: SiteSpec) -> np.ndarray:
    """A site's observed values over a chunk: flat, or ``[rows, C]`` for per channel."""
    if spec.granularity == "per_channel":
        channels = np.shape(values[0])[-1]
        return np.concatenate([np.asarray(v, np.float32).reshape(-1, channels) for v in values])
    return np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values])


def params_with_weights(params: Any, views: Iterable[tuple[WeightSite, Any]]) -> Any:
    """A copy of ``params`` with each weight site's kernel replaced by ``view`` (the
    weight as its matmul reads it), the leaves keeping their dtypes."""
    originals = jax.tree_util.tree_leaves(params)
    leaves = [np.array(leaf, copy=True) for leaf in originals]
    for w, view in views:
        leaves[w.param_index].reshape(-1)[w.kernel_index.reshape(-1)] = np.asarray(view).reshape(-1)
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params),
        [jnp.asarray(leaf, dtype=o.dtype) for leaf, o in zip(leaves, originals)],
    )


def check_sites_exist(plan: Plan, weights, activations, holder: str) -> None:
    """Raises if quantizer state names sites that this trace of the model lacks."""
    known = {w.name for w in plan.weights} | {p.name for p in plan.points}
    stale = (set(weights) | set(activations)) - known
    if stale:
        raise ValueError(
            f"{holder} contain quantizers for sites this call does not have: {sorted(stale)[:5]}; "
            "was the model or its input structure changed after transform?"
        )


def affine_input(value, scale, offset):
    """``value * scale + offset`` per channel (either may be None): what a fold puts in
    front of a point's quantizer."""
    if scale is not None:
        value = value * scale.astype(value.dtype)
    if offset is not None:
        value = value + offset.astype(value.dtype)
    return value


def weight_operand_hook(w: WeightSite, quantize: Callable[[Any], Any]) -> Callable:
    """A matmul hook (`evaluate_batches`' ``matmul_hooks``) replacing the weight operand
    of site ``w`` by ``quantize(weight)``. Hooks sit on the matmul, not on the weight's
    value, so sites reading one value (a kernel used twice, a scan over closed-over
    weights) each have their own quantizer."""

    def hook(args):
        quantized = quantize(args[0][w.weight_operand])  # the weight is the same in every batch
        return [[quantized if i == w.weight_operand else v for i, v in enumerate(a)] for a in args]

    return hook


def quant_hooks(graph: Graph, plan: Plan, qparams: QParams, *, quantize: bool = True) -> tuple[dict, dict, dict]:
    """Fake-quant hooks, output-offset rewrites and weight hooks for `evaluate`.

    Sites of the plan without state in ``qparams`` stay float; state without a site
    raises, since it means the model traced differently from when it was calibrated.

    Args:
      quantize: False gives the folded float model: offsets on, quantizers off.

    Returns:
      ``(hooks, rewrites, matmul_hooks)`` for `evaluate_batches`.
    """
    check_sites_exist(plan, qparams.weights, qparams.activations, "qparams")
    hooks, rewrites, matmul_hooks = {}, {}, {}
    for w in plan.weights:
        if w.name in qparams.weights and quantize:
            qp = qparams.weights[w.name]
            matmul_hooks[w.node] = weight_operand_hook(w, lambda v, qp=qp, c=w.contracting: fake_quant_weight(v, qp, c))
        if w.name in qparams.output_offsets:
            off = qparams.output_offsets[w.name]
            rewrites[graph.nodes[w.node].outputs[0]] = lambda vs, off=off: [v + off.astype(v.dtype) for v in vs]
    for p in plan.points:
        qp = qparams.activations.get(p.name) if quantize else None
        scale, off = qparams.input_scales.get(p.name), qparams.input_offsets.get(p.name)
        if qp is None and off is None and scale is None:
            continue

        def point_hook(values, qp=qp, scale=scale, off=off):
            values = [affine_input(v, scale, off) for v in values]
            return values if qp is None else [qz.fake_quant(v, qp).astype(v.dtype) for v in values]

        hooks[p.value_id] = point_hook
    return hooks, rewrites, matmul_hooks


# --------------------------------------------------------------------------------------
# qapply


class QApply:
    """``qapply(qparams, *inputs)``: the fake-quantized model, jit-compiled.

    Attributes:
      report: the `TransformReport` of the transform that made it.
    """

    def __init__(self, apply_fn: Callable[..., Any], params_treedef: Any, report: TransformReport | None = None):
        self._apply_fn = apply_fn
        self._params_treedef = params_treedef
        self._analyses: dict[Any, tuple[Graph, Plan]] = {}
        self.report = report
        self._jitted = jax.jit(self._call)

    def analysis(self, params: Any, inputs: tuple[Any, ...]) -> tuple[Graph, Plan]:
        """The traced graph and plan for these shapes (cached)."""
        key = (
            jax.tree_util.tree_structure((params, inputs)),
            tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves((params, inputs))),
        )
        if key not in self._analyses:
            graph = trace(self._apply_fn, params, *inputs)
            self._analyses[key] = (graph, analyze(graph))
        return self._analyses[key]

    def freeze(self, qparams: QParams, *example_inputs: Any) -> QParams:
        """Bakes the fake-quantized weights into the params, for inference.

        The returned `QParams` hold each quantized kernel already on its quantization
        grid and no weight quantizer for it, so `qapply` skips re-quantizing the weights
        on every call. Outputs are identical (quantizing a value on its grid returns
        it), which is checked on ``example_inputs`` before returning. Fine-tune the
        unfrozen `QParams`, not these.

        Args:
          qparams: from `transform`.
          *example_inputs: inputs of the shapes the model will be called with.

        Returns:
          Frozen `QParams`. A weight whose leaf elements are also read elsewhere (a
          kernel shared by two matmuls, a tied embedding table, a derived weight) keeps
          its weight quantizer, since baking it in would change the other readers.

        Raises:
          RuntimeError: if the frozen model's output differs from ``qapply``'s.
        """
        _, plan = self.analysis(qparams.params, example_inputs)
        leaves = jax.tree_util.tree_leaves(qparams.params)
        views = []
        for w in plan.weights:
            if w.name in qparams.weights and w.owns_leaf:
                view = jnp.asarray(np.asarray(leaves[w.param_index]).reshape(-1)[w.kernel_index])
                views.append((w, fake_quant_weight(view, qparams.weights[w.name], w.contracting)))
        frozen_sites = {w.name for w, _ in views}
        weights = {k: v for k, v in qparams.weights.items() if k not in frozen_sites}
        params = params_with_weights(qparams.params, views)
        frozen = qparams.replace(params=_placed_like(params, qparams.params), weights=weights)
        want, got = self(qparams, *example_inputs), self(frozen, *example_inputs)
        error = relative_output_error(got, want)
        if error > _dtype_tolerance(qparams.params, 1e-5):
            raise RuntimeError(
                f"freeze changed the model's output by {error:.3g} (relative) on the example inputs; "
                "use the unfrozen qparams and please report this model pattern"
            )
        return frozen

    def _call(self, qparams: QParams, *inputs: Any) -> Any:
        graph, plan = self.analysis(qparams.params, inputs)
        hooks, rewrites, matmul_hooks = quant_hooks(graph, plan, qparams)
        return evaluate(graph, qparams.params, inputs, hooks, rewrites, matmul_hooks=matmul_hooks)

    def __call__(self, qparams: QParams, *inputs: Any) -> Any:
        if not isinstance(qparams, QParams):
            raise TypeError(f"qapply expects the QParams returned by transform, got {type(qparams).__name__}")
        treedef = jax.tree_util.tree_structure(qparams.params)
        if treedef != self._params_treedef:
            raise TypeError(
                "qparams.params has another tree structure than the params given to transform:\n"
                f"  got      {treedef}\n  expected {self._params_treedef}"
            )
        return self._jitted(qparams, *inputs)


# --------------------------------------------------------------------------------------
# The pipeline


def transform(
    apply_fn: Callable[..., Any],
    params: Any,
    calib_batches: Iterable[Any],
    config: QuantConfig,
    *,
    verbose: bool = True,
) -> tuple[QParams, QApply]:
    """Quantizes a model after training with RepQuant (or the baseline a config names).

    Args:
      apply_fn: pure ``apply_fn(params, *inputs)``: a Linen ``model.apply`` in a lambda,
        an NNX model through ``nnx.split``/``nnx.merge``, or plain JAX.
      params: the trained parameter pytree. It is not modified.
      calib_batches: an iterable of calibration batches; each item is a tuple of
        ``apply_fn``'s positional inputs, or a single array for one input. All batches
        must have the same shapes.
      config: from `repquant_jax._src.presets`.
      verbose: print progress.

    Returns:
      ``(qparams, qapply)``: `QParams` and the jit-compiled fake-quant apply function,
      whose ``report`` attribute describes every site.

    Raises:
      ValueError: bad config, empty or non-finite calibration data, batches of
        different shapes, an unfoldable group with ``unfoldable="error"``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import repquant_jax as repquant
      >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(16), nn.gelu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> params = model.init(jax.random.key(1), x)
      >>> qparams, qapply = repquant.transform(
      ...     lambda p, x: model.apply(p, x), params, [x], repquant.presets.repq_vit(8, 8),
      ...     verbose=False)
      >>> qapply(qparams, x).shape
      (8, 4)
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (see repquant_jax._src.presets), got {type(config).__name__}")
    progress = _Progress(verbose)
    stream = _BatchStream(calib_batches)
    chunk = stream.chunk(config.calibration_chunk)
    _check_params(params)
    param_leaves, params_treedef = jax.tree_util.tree_flatten(params)

    graph = trace(apply_fn, params, *chunk[0])
    plan = analyze(graph)
    specs = resolve_specs(plan, config)
    progress(
        f"traced: {len(plan.weights)} weight matmuls, {len(plan.points)} activation quantizers, "
        f"{len(plan.groups)} norm groups ({sum(g.foldable for g in plan.groups)} foldable)"
    )

    # 1. Calibration, in forward order, every upstream quantizer already active. Batches
    # are evaluated side by side a chunk at a time; each site keeps a bounded reservoir
    # of its values across chunks and is re-fitted to it after every chunk.
    rng = np.random.default_rng(config.seed)
    weight_qps: dict[str, qz.QuantParams] = {}
    act_qps: dict[str, qz.QuantParams] = {}
    reservoirs = {p.name: Reservoir(config.max_calibration_values, rng) for p in plan.points}
    fold_notes: dict[str, str] = {}
    hooks, weight_hooks = {}, {}
    for w in plan.weights:
        spec = specs[w.name]
        if spec.skip:
            continue

        def calibrated_weight(view, w=w, spec=spec):
            if w.name not in weight_qps:
                weight_qps[w.name] = calibrate_weight(weight_matrix(view, w.contracting), spec, config)
            return fake_quant_weight(view, weight_qps[w.name], w.contracting)

        weight_hooks[w.node] = weight_operand_hook(w, calibrated_weight)

    for p in plan.points:
        spec = specs[p.name]
        if spec.skip:
            continue

        def point_hook(values, p=p):
            reservoir = reservoirs[p.name]
            spec = specs[p.name]
            if spec.granularity == "per_channel" and reservoir.data is None:
                rows = sum(int(np.size(v)) for v in values) // int(np.shape(values[0])[-1])
                if rows < config.min_rows_per_channel:
                    # Per-channel ranges from so few rows overfit the calibration set.
                    spec = specs[p.name] = dataclasses.replace(spec, granularity="per_tensor")
                    fold_notes[p.name] = (
                        f"per tensor: {rows} calibration rows per channel < min_rows_per_channel "
                        f"({config.min_rows_per_channel})"
                    )
            reservoir.add(_point_values(values, spec))
            try:
                qp = calibrate_values(reservoir.data, spec, config, -1 if spec.granularity == "per_channel" else None)
            except ValueError as err:
                raise ValueError(f"calibrating {p.name!r}: {err}") from None
            act_qps[p.name] = qp
            return [qz.fake_quant(v, qp).astype(v.dtype) for v in values]

        hooks[p.value_id] = point_hook
    first_chunk = [jax.tree_util.tree_leaves(b) for b in chunk]
    while chunk:
        evaluate_batches(graph, param_leaves, [jax.tree_util.tree_leaves(b) for b in chunk], hooks, matmul_hooks=weight_hooks)
        progress(f"calibrated {len(act_qps)} activation and {len(weight_qps)} weight quantizers on {stream.count} batches")
        chunk = stream.chunk(config.calibration_chunk)
    group_of_point = {g.point: g for g in plan.groups}
    group_inputs = {}
    if config.dual_clipping is not None:
        for name, group in group_of_point.items():
            if name in act_qps and act_qps[name].axis is not None and group.consumers:
                group_inputs[name] = _subsample(reservoirs[name].data, config.dual_clipping.max_rows, rng)
    samples = {name: (r.data.size, r.seen) for name, r in reservoirs.items() if r.data is not None}
    del reservoirs

    # 2. Learnable dual clipping of the per-channel norm quantizers (RepQuant).
    if config.dual_clipping is not None and group_inputs:
        from repquant_jax._src.learn import learn_dual_clipping

        for i, (point, rows) in enumerate(group_inputs.items()):
            group = group_of_point[point]
            consumers = [(plan.weight(c.site), c) for c in group.consumers]
            if not all(w.name in weight_qps for w, _ in consumers):
                continue
            matrices, wqps = [], []
            for w, consumer in consumers:
                # on the host: a sharded kernel would change the reduction order of the loss
                view = jnp.asarray(np.asarray(param_leaves[w.param_index]).reshape(-1)[w.kernel_index])
                # rows of the weight matrix in channel order
                matrices.append(weight_matrix(view, w.contracting)[np.argsort(consumer.contract_channel)])
                wqps.append(weight_qps[w.name])
            act_qps[point], before, after = learn_dual_clipping(
                rows, act_qps[point], matrices, wqps, config.dual_clipping
            )
            progress(f"dual clipping {group.name}: output MSE {before:.3g} -> {after:.3g} ({i + 1}/{len(group_inputs)})")

    # 3. Fold per-channel norm quantizers into per-tensor ones (§2.4), each fold checked
    # numerically on a calibration batch.
    to_fold = []
    for group in plan.groups:
        spec = specs.get(group.point)
        if spec is None or spec.skip or spec.granularity != "per_channel":
            continue
        branch = not group.foldable and group.branch_foldable and config.unfoldable == "branch"
        if not (group.foldable or branch) or not config.fold_norms:
            reason = "fold_norms=False" if not config.fold_norms else group.reason
            fold_notes[group.point] = f"kept per channel: {reason}"
            continue
        to_fold.append(group)
    leaves, folds, failed = fold_checked(graph, plan, param_leaves, to_fold, act_qps, first_chunk[0], config)
    input_scales, input_offsets, output_offsets = fold_offsets(folds)
    refit = set()
    for group in to_fold:
        if group.point in failed:
            fold_notes[group.point] = (
                f"kept per channel: the fold failed its numerical check (relative output error "
                f"{failed[group.point]:.3g} of the folded float model)"
            )
            warnings.warn(
                f"the fold of norm group {group.name!r} changed the float model's output "
                f"(relative error {failed[group.point]:.3g}); it was undone and the group is "
                "quantized per channel. Please report this model pattern.",
                stacklevel=2,
            )
            continue
        result = folds[group.point]
        act_qps[group.point] = result.quantizer
        refit.update(c.site for c in group.consumers)
        if group.foldable:
            fold_notes[group.point] = f"folded {group.name} into {len(group.consumers)} matmuls (max |r2| {result.max_abs_r2:g})"
        else:
            fold_notes[group.point] = (
                f"folded {group.name}'s kernel half (branch fold) into {len(group.consumers)} matmuls, "
                f"max |r2| {result.max_abs_r2:g}; the norm stays: {group.reason}"
            )
    for group in plan.groups:
        spec = specs.get(group.point)
        if (
            spec is not None and not group.foldable and spec.granularity == "per_tensor"
            and config.norm_quantizer == "per_channel" and group.point not in fold_notes
        ):
            fold_notes[group.point] = f"per tensor (not foldable: {group.reason})"
    # 4. Re-calibrate the weights that the fold rescaled.
    for w in plan.weights:
        if w.name in refit and w.name in weight_qps:
            view = leaves[w.param_index].reshape(-1)[w.kernel_index]
            weight_qps[w.name] = calibrate_weight(weight_matrix(view, w.contracting), specs[w.name], config)
    if fold_notes:
        progress(f"folded {sum(n.startswith('folded') for n in fold_notes.values())} norm groups")

    new_leaves = [jnp.asarray(leaf, dtype=jnp.asarray(orig).dtype) for leaf, orig in zip(leaves, param_leaves)]
    qparams = QParams(
        params=jax.tree_util.tree_unflatten(params_treedef, new_leaves),
        weights=weight_qps,
        activations=act_qps,
        input_offsets=input_offsets,
        output_offsets=output_offsets,
        input_scales=input_scales,
    )

    # 5. Weight rounding reconstruction (RepQuant).
    if config.reconstruction is not None:
        from repquant_jax._src.learn import reconstruct_weights

        qparams = reconstruct_weights(graph, plan, qparams, first_chunk, config, progress)

    # 6. Report: per-site quantization error on the calibration data.
    used_rules = {s.rule for s in specs.values() if s.rule is not None}
    notes = plan.notes + tuple(
        f"rule {r.pattern!r} matched no site" for i, r in enumerate(config.rules) if i not in used_rules
    )
    report = _report(graph, plan, qparams, specs, first_chunk, fold_notes, notes, samples)
    progress("done")
    if verbose:
        print(report.summary(), flush=True)
    qparams = qparams.replace(params=_placed_like(qparams.params, params))
    return qparams, QApply(apply_fn, params_treedef, report)


def _dtype_tolerance(dtypes: Any, floor: float) -> float:
    """``floor``, or 4 ulps of the narrowest float type among ``dtypes`` (a pytree of
    arrays or dtypes) when that is larger."""
    eps = [
        float(jnp.finfo(d).eps)
        for d in map(jnp.result_type, jax.tree_util.tree_leaves(dtypes))
        if jnp.issubdtype(d, jnp.floating)
    ]
    return max([floor] + [4 * e for e in eps])


def fold_tolerance(graph: Graph, config: QuantConfig) -> float:
    """Relative output error a correct fold may cause: float rounding of the model's
    narrowest float type (1e-4 in float32, 4 ulps of bfloat16 or float16)."""
    if config.fold_check_tolerance is not None:
        return config.fold_check_tolerance
    return _dtype_tolerance([a.dtype for v, a in graph.avals.items() if v not in graph.consts], 1e-4)


def relative_output_error(got: Any, want: Any) -> float:
    """``‖got - want‖ / ‖want‖`` over the float leaves of two output pytrees."""
    pairs = [
        (np.asarray(a, np.float64), np.asarray(b, np.float64))
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
        if jnp.issubdtype(jnp.result_type(b), jnp.floating)
    ]
    num = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
    den = sum(float(np.sum(b**2)) for _, b in pairs)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def fold_offsets(folds) -> tuple[dict, dict, dict]:
    """``(input_scales, input_offsets, output_offsets)`` of `QParams` from the
    `FoldResult`s of `fold_checked`."""
    input_scales = {k: jnp.asarray(r.input_scale) for k, r in folds.items() if r.input_scale is not None}
    input_offsets = {k: jnp.asarray(r.input_offset) for k, r in folds.items() if r.input_offset is not None}
    output_offsets = {k: jnp.asarray(v) for r in folds.values() for k, v in r.output_offsets.items()}
    return input_scales, input_offsets, output_offsets


def fold_checked(graph, plan, param_leaves, groups, act_qps, batch_leaves, config):
    """Folds ``groups`` (§2.4) and checks the folded float model (quantizers off,
    offsets on) against the original on one calibration batch.

    When the folded model's output moves by more than `fold_tolerance`, each group is
    tried on its own and the ones that move it are left unfolded: the safety net for
    patterns the dataflow analysis has not seen.

    Returns:
      ``(leaves, folds, failed)``: folded NumPy leaves, group point -> `FoldResult` of
      the kept folds, group point -> relative error of the failed ones.
    """
    if not groups:
        return [np.array(leaf, copy=True) for leaf in param_leaves], {}, {}
    reference = evaluate_batches(graph, param_leaves, [batch_leaves])[0]
    tolerance = fold_tolerance(graph, config)

    def fold(chosen):
        leaves = [np.array(leaf, copy=True) for leaf in param_leaves]
        folds = {
            g.point: fold_norm_into_dense(
                leaves, plan, g, act_qps[g.point], exact_zero_point=config.exact_zero_point, branch=not g.foldable
            )
            for g in chosen
        }
        input_scales, input_offsets, output_offsets = fold_offsets(folds)
        qparams = QParams(
            params=jax.tree_util.tree_unflatten(
                graph.params_treedef,
                [jnp.asarray(leaf, dtype=jnp.result_type(o)) for leaf, o in zip(leaves, param_leaves)],
            ),
            weights={},
            activations={},
            input_offsets=input_offsets,
            output_offsets=output_offsets,
            input_scales=input_scales,
        )
        hooks, rewrites, _ = quant_hooks(graph, plan, qparams, quantize=False)
        out = evaluate_batches(graph, jax.tree_util.tree_leaves(qparams.params), [batch_leaves], hooks, rewrites)[0]
        return leaves, folds, relative_output_error(out, reference)

    leaves, folds, error = fold(groups)
    if error <= tolerance:
        return leaves, folds, {}
    kept, failed = [], {}
    leaves, folds = [np.array(leaf, copy=True) for leaf in param_leaves], {}  # nothing folded yet
    for group in groups:
        trial_leaves, trial_folds, error = fold(kept + [group])
        if error <= tolerance:
            kept.append(group)
            leaves, folds = trial_leaves, trial_folds
        else:
            failed[group.point] = error
    return leaves, folds, failed


def _report(graph, plan, qparams, specs, batch_leaves, fold_notes, notes, samples) -> TransformReport:
    hooks, rewrites, matmul_hooks = quant_hooks(graph, plan, qparams)
    errors: dict[str, tuple[float, float]] = {}
    names = {p.value_id: p.name for p in plan.points if p.name in qparams.activations}

    def measuring(vid, hook):
        def run(values):
            out = hook(values)
            if vid in names:
                # error of the quantizer alone: against its input after the fold's affine
                scale, off = qparams.input_scales.get(names[vid]), qparams.input_offsets.get(names[vid])
                values = [affine_input(v, scale, off) for v in values]
                sq = sum(float(jnp.sum((o - v) ** 2)) for o, v in zip(out, values))
                ref = sum(float(jnp.sum(v**2)) for v in values)
                count = sum(int(np.size(v)) for v in values)
                errors[names[vid]] = (sq / count, sq / max(ref, 1e-30))
            return out

        return run

    evaluate_batches(
        graph,
        jax.tree_util.tree_leaves(qparams.params),
        batch_leaves,
        {vid: measuring(vid, h) for vid, h in hooks.items()},
        rewrites,
        matmul_hooks,
    )
    rows = []
    for w in plan.weights:
        spec = specs[w.name]
        qp = qparams.weights.get(w.name)
        rows.append(SiteReport.make(w.name, "weight", spec, qp, None, None, ""))
    for p in plan.points:
        spec = specs[p.name]
        qp = qparams.activations.get(p.name)
        mse, rel = errors.get(p.name, (None, None))
        rows.append(
            SiteReport.make(
                p.name, f"activation/{p.source}", spec, qp, mse, rel, fold_notes.get(p.name, ""), samples.get(p.name)
            )
        )
    return TransformReport(tuple(rows), notes)
