"""Norm-output diagnostics: channel-range profiles and function-preserving outlier injection.

`channel_range_profile` measures how uneven the channels of every norm output feeding a
matmul are (max over channels of the channel's range, divided by the median): about 30
for DeiT-S's LayerNorms, 2-3 for small models trained briefly
(docs/method.md, "LayerNorm-output outliers").

`inject_outliers` builds a *stress variant* of a model: it multiplies a few channels of a
norm's scale (and bias) by ``factor`` and divides the matching input rows of every
following matmul by it. This is the fold (docs/method.md) run backwards, so the float function is
unchanged while the norm output gets DeiT-like outlier channels. Results on such a model
are synthetic and must be labelled so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src.graph import trace
from repquant_jax._src.interpret import Hooks, evaluate
from repquant_jax._src.sites import analyze

__all__ = ["channel_range_profile", "channel_ranges", "inject_outliers", "point_values"]


def channel_ranges(x: Any) -> np.ndarray:
    """Per-channel ``max - min`` of ``x`` over every axis but the last (float64)."""
    x2 = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return x2.max(0) - x2.min(0)


def point_values(
    apply_fn: Callable[..., Any], params: Any, *inputs: Any, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Float values of the named activation points (as `repquant_jax._src.inspect` names them).

    Args:
      apply_fn: ``apply_fn(params, *inputs)``.
      params: the parameters.
      *inputs: the positional inputs of one call.
      names: activation point names, e.g. ``"blocks_0/attn/query:input"``.

    Returns:
      Point name -> its value on ``inputs`` (float32 NumPy array).

    Raises:
      KeyError: a name that is not an activation point of the model.
    """
    graph = trace(apply_fn, params, *inputs)
    return _observe(graph, analyze(graph), params, inputs, names)


def _observe(graph, plan, params, inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
    seen: dict[str, np.ndarray] = {}

    def observer(name: str):
        def hook(values):
            seen[name] = np.asarray(values[0], np.float32)
            return values

        return hook

    evaluate(graph, params, tuple(inputs), Hooks(values={plan.point(name).value_id: observer(name) for name in names}))
    return {name: seen[name] for name in names if name in seen}


def channel_range_profile(apply_fn: Callable[..., Any], params: Any, *inputs: Any) -> dict[str, float]:
    """Max/median per-channel range of each norm output that feeds a matmul.

    Args:
      apply_fn: ``apply_fn(params, *inputs)``.
      params: the parameters.
      *inputs: a batch of inputs.

    Returns:
      Fold-group name -> (max over channels of max-min) / (median over channels).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> p = model.init(jax.random.key(1), x)
      >>> profile = channel_range_profile(lambda p, x: model.apply(p, x), p, x)
      >>> list(profile)
      ['layers_0']
    """
    graph = trace(apply_fn, params, *inputs)
    plan = analyze(graph)
    values = _observe(graph, plan, params, inputs, [g.point for g in plan.groups])
    profile = {}
    for g in plan.groups:
        if g.point in values:
            ranges = channel_ranges(values[g.point])
            profile[g.name] = float(ranges.max() / max(np.median(ranges), 1e-12))
    return profile


def inject_outliers(
    apply_fn: Callable[..., Any],
    params: Any,
    *example_inputs: Any,
    factor: float = 16.0,
    channels: int = 4,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> Any:
    """A function-preserving copy of ``params`` with outlier channels in norm outputs.

    For every foldable norm group (or those named in ``groups``), ``channels`` random
    channels of γ (and β) are multiplied by ``factor``, and the same input rows of every
    following matmul's kernel divided by it.

    Args:
      apply_fn: ``apply_fn(params, *inputs)``.
      params: the parameters (not modified).
      *example_inputs: example inputs, for tracing (shapes only).
      factor: the outlier factor.
      channels: outlier channels per norm.
      seed: chooses the channels.
      groups: names of the groups to stress (default: every foldable group).

    Returns:
      New parameters with the same tree structure. Label results on them as synthetic.

    Raises:
      ValueError: if a named group does not exist or cannot be folded.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    plan = analyze(trace(apply_fn, params, *example_inputs))
    by_name = {g.name: g for g in plan.groups}
    names = list(groups) if groups is not None else [g.name for g in plan.groups if g.foldable]
    for name in names:
        if name not in by_name:
            raise ValueError(f"no norm group named {name!r}; groups: {sorted(by_name)}")
        if not by_name[name].foldable:
            raise ValueError(
                f"norm group {name!r} is not foldable, so scaling it would change the model: {by_name[name].reason}"
            )
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.array(leaf, copy=True) for leaf in leaves]
    rng = np.random.default_rng(seed)
    for name in names:
        group = by_name[name]
        scale = np.ones(group.channels)
        scale[rng.choice(group.channels, size=min(channels, group.channels), replace=False)] = factor
        gamma = leaves[group.scale_param_index].reshape(-1)
        gamma[group.scale_index] *= scale
        if group.bias_param_index is not None:
            beta = leaves[group.bias_param_index].reshape(-1)
            beta[group.bias_index] *= scale
        for consumer in group.consumers:
            kernel = leaves[plan.weight(consumer.site).param_index].reshape(-1)
            rows = consumer.row_channel >= 0
            kernel[rows] /= scale[consumer.row_channel[rows]]
    originals = jax.tree_util.tree_leaves(params)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(leaf, dtype=jnp.asarray(o).dtype) for leaf, o in zip(leaves, originals)]
    )
