"""The per-site sample of calibration values (`fit.Reservoir`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from repquant_jax._src import fit
from repquant_jax._src.fit import Reservoir


def _chunks(seed: int, n_chunks: int, batches: int, shape: tuple[int, ...]):
    rng = np.random.default_rng(seed)
    return [[jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(batches)] for _ in range(n_chunks)]


@pytest.mark.parametrize("cap", [64, 1000, 1 << 20])
def test_reservoir_keeps_exactly_the_rows_of_the_smallest_keys(cap):
    chunks = _chunks(0, 4, 3, (2, 5, 8))  # batches of 2 samples x 5 tokens x 8 channels
    reservoir = Reservoir(cap, np.random.default_rng(7))
    for chunk in chunks:
        reservoir.add(chunk)
    keys_rng = np.random.default_rng(7)  # the same key stream, drawn chunk by chunk
    keys = np.concatenate([keys_rng.random(sum(int(np.prod(v.shape[:-1])) for v in c)) for c in chunks])
    rows = np.concatenate([np.asarray(v).reshape(-1, 8) for c in chunks for v in c])
    samples = np.repeat(np.arange(4 * 3 * 2), 5)  # 2 samples per batch, 5 rows each
    keep = min(cap // 8, rows.shape[0])
    want = np.sort(np.argsort(keys, kind="stable")[:keep])
    np.testing.assert_array_equal(reservoir.data, rows[want])
    np.testing.assert_array_equal(reservoir.samples, samples[want])
    assert reservoir.kept == keep * 8 and reservoir.seen == rows.size
    assert reservoir.next_sample == 24


def test_reservoir_moves_only_the_rows_it_keeps_to_the_host(monkeypatch):
    reservoir = Reservoir(64, np.random.default_rng(0))  # 8 rows of 8 channels
    gathered = []
    take = fit._take_rows

    def spy(value, rows, channels):
        gathered.append(rows.shape[0])
        return take(value, rows, channels)

    monkeypatch.setattr(fit, "_take_rows", spy)
    reservoir.add(_chunks(1, 1, 2, (4, 100, 8))[0])  # 800 rows seen
    assert reservoir.data.shape == (8, 8)
    # each batch's kept rows, padded to a power of two (the gather's shape), at most 2 x 8
    assert 8 <= sum(gathered) <= 16 and all(n & (n - 1) == 0 for n in gathered)


def test_a_bucket_is_the_power_of_two_rows_of_the_smallest_keys():
    reservoir = Reservoir(1 << 20, np.random.default_rng(3))
    reservoir.add(_chunks(2, 1, 1, (1, 13, 4))[0])
    data, samples = reservoir.bucket()
    assert data.shape == (8, 4) and samples.shape == (8,)
    keys = np.random.default_rng(3).random(13)
    np.testing.assert_array_equal(data, reservoir.data[np.sort(np.argsort(keys)[:8])])
    reservoir.release()
    assert reservoir.data is None and reservoir.kept == 52 and reservoir.seen == 52
