"""Numerical checks shared by the pipeline: finite values, output error, tolerances."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["has_non_finite", "check_params", "relative_output_error", "dtype_tolerance"]


def has_non_finite(leaf: Any) -> bool:
    """NaN or Inf in a float array of any width (bfloat16 is not a NumPy float type)."""
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        return False
    return not bool(jnp.isfinite(jnp.asarray(leaf)).all())


def check_params(params: Any) -> None:
    """Raises ValueError naming the first parameter leaf with a NaN or Inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if has_non_finite(leaf):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} contains NaN or Inf")


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


def dtype_tolerance(dtypes: Any, floor: float) -> float:
    """``floor``, or 4 ulps of the narrowest float type among ``dtypes`` (a pytree of
    arrays or dtypes) when that is larger."""
    eps = [
        float(jnp.finfo(d).eps)
        for d in map(jnp.result_type, jax.tree_util.tree_leaves(dtypes))
        if jnp.issubdtype(d, jnp.floating)
    ]
    return max([floor] + [4 * e for e in eps])
