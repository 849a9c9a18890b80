import jax.numpy as jnp
import numpy as np
import pytest

from repquant_jax._src.param_edits import writable_copies


def test_writable_copies_copy_only_the_written_leaves_and_share_the_rest_read_only():
    user_np, user_jax, edited = np.ones(3, np.float32), jnp.ones(2), np.zeros(2, np.float32)
    leaves = writable_copies([user_np, user_jax, edited], written={2})
    assert leaves[1] is user_jax
    leaves[2][0] = 5.0  # a copy: the caller's array is untouched
    assert edited[0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        leaves[0][0] = 5.0  # a stray write into a shared NumPy leaf fails instead of editing the user's
    np.testing.assert_array_equal(user_np, 1.0)
