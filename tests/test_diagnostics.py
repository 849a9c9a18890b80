"""Channel-range profiles and function-preserving outlier injection."""

import numpy as np
import pytest
import zoo

from repquant_jax._src.diagnostics import channel_range_profile, inject_outliers


@pytest.mark.parametrize("builder", ["linen_vit_block", "llama_block", "vit_with_head", "scan_vit"])
def test_outlier_injection_preserves_the_function_and_raises_the_range_profile(builder):
    m = zoo.ALL[builder](batch=4, seq=8)
    stressed = inject_outliers(m.apply_fn, m.params, *m.inputs, factor=16.0, channels=2)
    np.testing.assert_allclose(m.apply_fn(stressed, *m.inputs), m.apply_fn(m.params, *m.inputs), rtol=1e-4, atol=1e-5)
    before = channel_range_profile(m.apply_fn, m.params, *m.inputs)
    after = channel_range_profile(m.apply_fn, stressed, *m.inputs)
    assert before.keys() == after.keys() and before
    for name in before:
        assert after[name] > 4 * before[name], (name, before[name], after[name])


def test_outlier_injection_refuses_unfoldable_groups():
    m = zoo.bert_block()
    with pytest.raises(ValueError, match="not foldable"):
        inject_outliers(m.apply_fn, m.params, *m.inputs, groups=["ln1"])
    with pytest.raises(ValueError, match="no norm group"):
        inject_outliers(m.apply_fn, m.params, *m.inputs, groups=["nope"])
