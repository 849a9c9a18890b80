"""The RepQuant pipeline: ``transform(apply_fn, params, calib_batches, config)``.

`transform` is the list of its stages (`repquant_jax._src.stages`), each a pure
function ``(traced, state, ...) -> state`` over one frozen `QuantState`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from repquant_jax._src import stages
from repquant_jax._src.adapters import as_apply_fn
from repquant_jax._src.checks import check_params
from repquant_jax._src.config import QuantConfig
from repquant_jax._src.inputs import BatchStream
from repquant_jax._src.param_edits import placed_like
from repquant_jax._src.progress import Progress
from repquant_jax._src.qapply import QApply
from repquant_jax._src.state import QParams

__all__ = ["transform"]


def transform(
    apply_fn: Callable[..., Any] | Any,
    params: Any,
    calib_batches: Iterable[Any],
    config: QuantConfig,
    *,
    verbose: bool = False,
) -> tuple[QParams, QApply]:
    """Quantizes a model after training with RepQuant (or the baseline a config names).

    Args:
      apply_fn: pure ``apply_fn(params, *inputs)``: a Linen ``model.apply`` in a lambda,
        plain JAX, or a Flax NNX module itself (then ``params`` must be None; see
        `from_nnx`). It must read its weights from ``params``: one that closes over
        them is refused, since its weights could not be quantized.
      params: the trained parameter pytree. It is not modified.
      calib_batches: an iterable of calibration batches; each item is a tuple of
        ``apply_fn``'s positional inputs, or a single array for one input. All batches
        must have the same shapes.
      config: from `repquant_jax.presets`.
      verbose: print progress and a summary. Either way, progress is logged to the
        ``"repquant_jax"`` logger at INFO.

    Returns:
      ``(qparams, qapply)``: `QParams` and the jit-compiled fake-quant apply function,
      whose ``report`` attribute describes every site. ``qparams.params`` holds new
      arrays for the leaves the transform changed and shares the others with
      ``params`` (JAX arrays are immutable; NumPy leaves are copied), so do not donate
      ``params``' buffers to a jitted function while ``qparams`` is in use.

    Raises:
      ValueError: bad config, empty or non-finite calibration data, batches of
        different shapes, an unfoldable group with ``unfoldable="error"``, an
        ``apply_fn`` that does not read its params.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import repquant_jax as repquant
      >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(16), nn.gelu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> params = model.init(jax.random.key(1), x)
      >>> qparams, qapply = repquant.transform(
      ...     lambda p, x: model.apply(p, x), params, [x], repquant.presets.repq_vit(8, 8))
      >>> qapply(qparams, x).shape
      (8, 4)
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (see repquant_jax.presets), got {type(config).__name__}")
    apply_fn, params = as_apply_fn(apply_fn, params)
    progress = Progress(verbose)
    clock = _StageClock()
    stream = BatchStream(calib_batches)
    first_chunk = stream.chunk(config.calibration_chunk)
    check_params(params)
    traced = clock.run("trace", stages.trace_model, apply_fn, params, first_chunk)
    state = stages.initial_state(traced, config)
    plan = traced.plan
    progress(
        f"traced: {len(plan.weights)} weight matmuls, {len(plan.points)} activation quantizers, "
        f"{len(plan.groups)} norm groups ({sum(g.foldable for g in plan.groups)} foldable)"
    )
    chunks = itertools.chain([first_chunk], stream.chunks(config.calibration_chunk))
    state = clock.run("calibrate", stages.calibrate, traced, state, chunks, config, progress, stream.total)
    state = clock.run("learn_clipping", stages.learn_clipping, traced, state, config, progress)
    state = clock.run("fold_norms", stages.fold_norms, traced, state, config, progress)
    state = clock.run("refit_folded_weights", stages.refit_folded_weights, traced, state, config)
    state = clock.run("round_weights", stages.round_weights, traced, state, config, progress)
    state = clock.run("reconstruct", stages.reconstruct, traced, state, config, progress)
    qparams = state.qparams(traced)
    report = clock.run("report", stages.report, traced, state, config, qparams)
    report = dataclasses.replace(report, stage_seconds=clock.seconds)
    progress("done")
    progress(report.summary())
    qparams = qparams.replace(params=placed_like(qparams.params, params))
    return qparams, QApply(apply_fn, traced.params_treedef, report)


class _StageClock:
    """Runs stages and keeps the wall time of each, for `TransformReport.stage_seconds`."""

    def __init__(self) -> None:
        self.seconds: tuple[tuple[str, float], ...] = ()

    def run(self, name: str, stage: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = stage(*args)
        self.seconds += ((name, time.perf_counter() - start),)
        return out
