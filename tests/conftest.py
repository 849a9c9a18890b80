"""Shared test helpers.

`zoo_presets` are the presets with ``min_rows_per_channel=1``: the zoo's tiny calibration
batches (a few dozen tokens) are below the default per-channel threshold, and the tests
of the fold need per-channel norm quantizers.
"""

import functools
import types

import repquant_jax as repquant

zoo_presets = types.SimpleNamespace(
    **{
        name: functools.partial(getattr(repquant.presets, name), min_rows_per_channel=1)
        for name in ("minmax", "percentile", "repq_vit", "repquant")
    }
)
