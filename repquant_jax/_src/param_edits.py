"""Reading and replacing the weights of weight sites in a parameter pytree.

The user's params are never modified: an edit copies the leaves it writes and keeps
the others as they are (JAX arrays are immutable, so the result may share them with
the user's params; a NumPy leaf is shared read-only, so a stray write fails loudly).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repquant_jax._src.sites import WeightSite

__all__ = ["weight_view", "params_with_weights", "placed_like", "writable_copies", "leaves_like"]


def weight_view(leaves: Sequence[Any], w: WeightSite) -> np.ndarray:
    """Site ``w``'s weight as its matmul reads it, gathered from its parameter leaf (on
    the host: a sharded kernel would change the reduction order of later losses)."""
    return np.asarray(leaves[w.param_index]).reshape(-1)[w.kernel_index]


def writable_copies(leaves: Sequence[Any], written: Iterable[int]) -> list[Any]:
    """``leaves`` with those at the indices ``written`` as writable NumPy copies, and the
    others unchanged (a NumPy leaf as a read-only view).

    Copying only what an edit writes keeps a model's untouched leaves (its embedding,
    most of a deep model's kernels for some edits) out of the transform's memory.
    """
    written = set(written)
    out = []
    for k, leaf in enumerate(leaves):
        if k in written:
            out.append(np.array(leaf, copy=True))
        elif isinstance(leaf, np.ndarray):
            view = leaf.view()
            view.flags.writeable = False
            out.append(view)
        else:
            out.append(leaf)
    return out


def leaves_like(leaves: Sequence[Any], originals: Sequence[Any]) -> list[jax.Array]:
    """``leaves`` as JAX arrays with the dtypes of ``originals``."""
    return [jnp.asarray(leaf, dtype=jnp.result_type(o)) for leaf, o in zip(leaves, originals)]


def params_with_weights(params: Any, views: Iterable[tuple[WeightSite, Any]]) -> Any:
    """A copy of ``params`` with each weight site's kernel replaced by ``view`` (the
    weight as its matmul reads it), the leaves keeping their dtypes."""
    originals = jax.tree_util.tree_leaves(params)
    views = list(views)
    leaves = writable_copies(originals, (w.param_index for w, _ in views))
    for w, view in views:
        assert w.kernel_index is not None, f"{w.name}: a derived weight has no leaf elements"
        leaves[w.param_index].reshape(-1)[w.kernel_index.reshape(-1)] = np.asarray(view).reshape(-1)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves_like(leaves, originals))


def placed_like(params: Any, like: Any) -> Any:
    """``params`` with each leaf put on the sharding of its counterpart in ``like``
    where that is spread over several devices (a user's sharded params stay sharded)."""

    def place(leaf, original):
        if isinstance(original, jax.Array) and len(original.sharding.device_set) > 1:
            return jax.device_put(leaf, original.sharding)
        return leaf

    return jax.tree_util.tree_map(place, params, like)
