"""`QApply`, the fake-quantized model `transform` returns, and `freeze`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src.checks import dtype_tolerance, relative_output_error
from repquant_jax._src.graph import Graph, trace
from repquant_jax._src.hooks import fake_quant_weight, quant_hooks
from repquant_jax._src.interpret import evaluate
from repquant_jax._src.param_edits import params_with_weights, placed_like, weight_view
from repquant_jax._src.report import TransformReport
from repquant_jax._src.sites import Plan, analyze
from repquant_jax._src.state import QParams

__all__ = ["QApply", "freeze"]


class QApply:
    """``qapply(qparams, *inputs)``: the fake-quantized model, jit-compiled.

    A new input shape re-traces the model and matches its sites by name.

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

    def _call(self, qparams: QParams, *inputs: Any) -> Any:
        graph, plan = self.analysis(qparams.params, inputs)
        return evaluate(graph, qparams.params, inputs, quant_hooks(graph, plan, qparams))

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


def freeze(qapply: QApply, qparams: QParams, *example_inputs: Any) -> QParams:
    """Bakes the fake-quantized weights into the params, for inference.

    The returned `QParams` hold each quantized kernel already on its quantization grid
    and no weight quantizer for it, so ``qapply`` skips re-quantizing the weights on
    every call. Outputs are identical (quantizing a value on its grid returns it),
    which is checked on ``example_inputs`` before returning. Fine-tune the unfrozen
    `QParams`, not these.

    Args:
      qapply: from `transform`.
      qparams: from `transform`.
      *example_inputs: inputs of the shapes the model will be called with.

    Returns:
      Frozen `QParams`. A weight whose leaf elements are also read elsewhere (a kernel
      shared by two matmuls, a tied embedding table, a derived weight) keeps its
      weight quantizer, since baking it in would change the other readers.

    Raises:
      TypeError: if ``qapply`` or ``qparams`` are not what `transform` returns.
      RuntimeError: if the frozen model's output differs from ``qapply``'s.

    Example:
      >>> # frozen = repquant.freeze(qapply, qparams, images)
      >>> # logits = qapply(frozen, images)
    """
    if not isinstance(qapply, QApply):
        raise TypeError(f"freeze expects the QApply returned by transform, got {type(qapply).__name__}")
    if not isinstance(qparams, QParams):
        raise TypeError(f"freeze expects the QParams returned by transform, got {type(qparams).__name__}")
    _, plan = qapply.analysis(qparams.params, example_inputs)
    leaves = jax.tree_util.tree_leaves(qparams.params)
    views = [
        (w, fake_quant_weight(jnp.asarray(weight_view(leaves, w)), qparams.weights[w.name], w.contracting))
        for w in plan.weights
        if w.name in qparams.weights and w.owns_leaf
    ]
    frozen_sites = {w.name for w, _ in views}
    weights = {k: v for k, v in qparams.weights.items() if k not in frozen_sites}
    params = params_with_weights(qparams.params, views)
    frozen = qparams.replace(params=placed_like(params, qparams.params), weights=weights)
    want, got = qapply(qparams, *example_inputs), qapply(frozen, *example_inputs)
    error = relative_output_error(got, want)
    if error > dtype_tolerance(qparams.params, 1e-5):
        raise RuntimeError(
            f"freeze changed the model's output by {error:.3g} (relative) on the example inputs; "
            "use the unfrozen qparams and please report this model pattern"
        )
    return frozen
