"""Runs `transform` and `qapply` on an 8-device mesh and prints what it found as JSON.

Run by `test_sharding.py` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before jax
starts, so it cannot run inside the pytest process). Not a test module itself.

The model is `zoo.linen_vit_block` on a ``(2, 4)`` mesh with axes ``("data", "model")``:
every Dense kernel and its bias are sharded on ``"model"`` along their (first) output
axis (the heads of q/k/v, the features of out/fc1/fc2), LayerNorm params are replicated,
and calibration batches and inputs are sharded along the batch on ``"data"``.

Usage: ``python sharding_check.py PRESET...`` with presets of `conftest.zoo_presets`.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import zoo  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import repquant_jax as repquant  # noqa: E402

# seq 12: no activation a matmul reads (per shard or whole) has as many elements as a
# kernel (1024 or 4096), so an all-gather of that many elements is a gathered weight.
BATCH, SEQ, CALIB_BATCHES = 8, 12, 2
QKV = ("query", "key", "value")
# an HLO instruction `%name = <result shapes> all-gather(` (or all-gather-start)
ALL_GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")
SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def param_spec(path, leaf) -> P:
    """Dense kernels and biases sharded on "model" along their first output axis."""
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] not in ("kernel", "bias") or names[-2] in ("ln1", "ln2"):
        return P()
    if names[-1] == "kernel":
        axis = 1 if names[-2] in QKV else leaf.ndim - 1  # [d, heads, hd] / [.., out]
    else:
        axis = 0  # [heads, hd] / [out]
    spec = [None] * leaf.ndim
    spec[axis] = "model"
    return P(*spec)


def max_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def all_gathers(hlo: str) -> list[list[int]]:
    """Result shapes of every all-gather in compiled HLO text (tuple results flattened)."""
    shapes = []
    for result in ALL_GATHER.findall(hlo):
        shapes += [[int(d) for d in dims.split(",") if d] for dims in SHAPE.findall(result)]
    return shapes


def check(preset: str) -> dict:
    m = zoo.linen_vit_block(batch=BATCH, seq=SEQ)
    (x,) = m.inputs
    calib = [zoo._normal(0, 100 + i, x.shape) for i in range(CALIB_BATCHES)]
    config = getattr(conftest.zoo_presets, preset)(4, 4)

    # single device
    qref, qapply_ref = repquant.transform(m.apply_fn, m.params, calib, config, verbose=False)
    out_ref = qapply_ref(qref, x)

    # on the mesh
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = jax.tree_util.tree_map_with_path(param_spec, m.params)
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(m.params, shardings)
    data = NamedSharding(mesh, P("data"))
    qparams, qapply = repquant.transform(
        m.apply_fn, params, [jax.device_put(c, data) for c in calib], config, verbose=False
    )
    xs = jax.device_put(x, data)
    out = qapply(qparams, xs)

    frozen = repquant.freeze(qapply, qparams, xs)

    def kept(tree) -> bool:
        same = jax.tree_util.tree_map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), tree, shardings)
        return all(jax.tree_util.tree_leaves(same))

    lowered = jax.jit(lambda q, x: qapply(q, x)).lower(qparams, xs)
    compiled = lowered.compile()
    hlo, stablehlo = compiled.as_text(), lowered.as_text()
    (in_q, in_x), _ = compiled.input_shardings
    entry_kept = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(
            lambda c, a: c.is_equivalent_to(a.sharding, a.ndim), (in_q.params, in_x), (qparams.params, xs)
        )
    )
    kernels = {
        jax.tree_util.keystr(path): list(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(m.params)
        if getattr(path[-1], "key", None) == "kernel"
    }
    return {
        "devices": jax.device_count(),
        "max_params_diff": max_diff(qparams.params, qref.params),
        "max_quantizer_diff": max_diff(
            (qparams.weights, qparams.activations, qparams.input_offsets, qparams.output_offsets),
            (qref.weights, qref.activations, qref.input_offsets, qref.output_offsets),
        ),
        "max_output_diff": float(jnp.max(jnp.abs(out - out_ref))),
        "error_vs_float": float(
            jnp.linalg.norm(out - m.apply_fn(m.params, x)) / jnp.linalg.norm(m.apply_fn(m.params, x))
        ),
        "error_vs_float_single_device": float(
            jnp.linalg.norm(out_ref - m.apply_fn(m.params, x)) / jnp.linalg.norm(m.apply_fn(m.params, x))
        ),
        "max_abs_output": float(jnp.max(jnp.abs(out_ref))),
        "params_keep_shardings": kept(qparams.params),
        "frozen_keep_shardings": kept(frozen.params),
        "max_frozen_output_diff": float(jnp.max(jnp.abs(qapply(frozen, xs) - out))),
        "entry_keeps_input_shardings": all(entry_kept),
        "output_spec": [None if a is None else str(a) for a in out.sharding.spec],
        "kernels": kernels,
        "all_gathers": all_gathers(hlo),
        "collectives": {
            op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
            for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
        },
        "callbacks": "callback" in stablehlo,
        "custom_calls": sorted(set(re.findall(r"custom_call @(\w+)", stablehlo))),
    }


if __name__ == "__main__":
    print(json.dumps({preset: check(preset) for preset in sys.argv[1:]}))
