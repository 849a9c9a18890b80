"""`inspect`: the quantization plan of an apply function, without changing anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from repquant_jax._src.graph import trace
from repquant_jax._src.sites import Plan, analyze

__all__ = ["inspect"]


def inspect(apply_fn: Callable[..., Any], params: Any, *example_inputs: Any) -> Plan:
    """Traces ``apply_fn(params, *example_inputs)`` and returns its quantization plan.

    Printing the plan shows a table of every site: weight matmuls, activation matmuls,
    quantized activations, softmaxes and LayerNorm fold groups with their verdict.

    Args:
      apply_fn: a pure function ``apply_fn(params, *inputs)``, e.g.
        ``lambda p, x: model.apply(p, x)``.
      params: the parameter pytree (only shapes and dtypes are used).
      *example_inputs: example positional inputs (only shapes and dtypes are used).

    Returns:
      The `Plan`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import repquant_jax as repquant
      >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(4)])
      >>> x = jnp.ones((2, 8))
      >>> params = model.init(jax.random.key(0), x)
      >>> plan = repquant.inspect(lambda p, x: model.apply(p, x), params, x)
      >>> [(g.name, g.foldable) for g in plan.groups]
      [('layers_0', True)]
    """
    return analyze(trace(apply_fn, params, *example_inputs))
