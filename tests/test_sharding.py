"""Scale-out on XLA's SPMD engine: `transform` and `qapply` on a (2, 4) mesh of 8 CPU devices.

Dense kernels are sharded on "model" along their output axis and calibration batches on
"data" along the batch (see `sharding_check.py`, which runs in a subprocess because the
device count must be set in XLA_FLAGS before jax starts).
"""

import json
import math
import os
import subprocess
import sys

import pytest

PRESETS = ("repq_vit", "repquant")  # repquant adds dual clipping and weight reconstruction
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_check.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run([sys.executable, HELPER, *PRESETS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_transform_matches_single_device(results):
    r = results["repq_vit"]
    assert r["devices"] == 8
    assert r["max_params_diff"] <= 1e-5, r
    assert r["max_quantizer_diff"] <= 1e-5, r
    assert r["max_output_diff"] <= 1e-5, r  # outputs are O(1): max |out| ~ 6


def test_sharded_learned_steps_are_as_good_as_single_device(results):
    # Sharded matmuls may round differently (1 ulp, XLA picks per-shard tilings), and the
    # learned clipping and rounding amplify that into other, equally good, choices (a
    # weight zero point one step apart): the error against float must match, not the bits.
    r = results["repquant"]
    assert r["devices"] == 8
    assert abs(r["error_vs_float"] - r["error_vs_float_single_device"]) <= 0.1 * r["error_vs_float_single_device"], r


@pytest.mark.parametrize("preset", PRESETS)
def test_shardings_are_kept(results, preset):
    r = results[preset]
    assert r["params_keep_shardings"]  # qparams.params sit where the params were
    assert r["frozen_keep_shardings"] and r["max_frozen_output_diff"] <= 1e-5, r  # and after qapply.freeze
    assert r["entry_keeps_input_shardings"]  # the compiled qapply takes them as they are
    assert r["output_spec"][0] == "data"  # the batch stays data-parallel


@pytest.mark.parametrize("preset", PRESETS)
def test_qapply_gathers_no_whole_weight(results, preset):
    r = results[preset]
    kernel_sizes = {math.prod(shape) for shape in r["kernels"].values()}
    # any layout or reshape of a whole kernel has its element count; no activation has
    gathered = [shape for shape in r["all_gathers"] if math.prod(shape) in kernel_sizes]
    assert not gathered, (gathered, r["kernels"])


def test_sharded_qapply_lowers_without_callbacks_or_custom_calls(results):
    # the SPMD program; test_export checks the single-device one
    for preset in PRESETS:
        assert not results[preset]["callbacks"] and not results[preset]["custom_calls"], results[preset]
