"""MeanStdObserver: exact parallel merging (Chan et al.) against numpy in float64."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_quant.errors import ConfigError
from keras_quant.observers import MeanStdObserver
from tests.conftest import to_np


@pytest.mark.parametrize("granularity, reduce_axes", [("per_tensor", None), ("per_channel", (0, 1))])
def test_matches_numpy(granularity, reduce_axes, rng):
    x = (rng.normal(size=(20, 3, 4)) * [0.5, 1.0, 2.0, 4.0] + [1.0, -2.0, 0.0, 3.0]).astype("float32")
    obs = MeanStdObserver(num_std=2.5, granularity=granularity)
    for i in range(0, 20, 5):
        obs.update(x[i : i + 5])
    x64 = x.astype(np.float64)
    mean, std = x64.mean(axis=reduce_axes), x64.std(axis=reduce_axes)
    got_mean, got_std = obs.compute_mean_std()
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_std, std, rtol=1e-5)
    lo, hi = obs.compute_range()
    np.testing.assert_allclose(lo, np.maximum(mean - 2.5 * std, x64.min(axis=reduce_axes)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hi, np.minimum(mean + 2.5 * std, x64.max(axis=reduce_axes)), rtol=1e-5, atol=1e-5)


def test_many_batches_equal_one_big_batch(rng):
    sizes = rng.choice([5, 17, 32], size=60)  # few distinct shapes: JAX compiles each once
    x = (rng.normal(size=(int(sizes.sum()), 5)) * 3.0 + 50.0).astype("float32")
    many = MeanStdObserver(granularity="per_channel")
    start = 0
    for n in sizes:
        many.update(x[start : start + n])
        start += n
    one = MeanStdObserver(granularity="per_channel").update(x)
    for a, b in zip(many.compute_mean_std(), one.compute_mean_std()):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(many.compute_mean_std()[1], x.astype(np.float64).std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(to_np(many.count), len(x))


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 6, 20]), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_merge_is_split_invariant(sizes, seed):
    x = np.random.default_rng(seed).standard_t(4, size=sum(sizes)).astype("float32")
    obs = MeanStdObserver()
    start = 0
    for n in sizes:
        obs.update(x[start : start + n])
        start += n
    mean, std = obs.compute_mean_std()
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, x.astype(np.float64).std(), rtol=1e-4, atol=1e-5)


def test_range_clipped_to_observed_extremes():
    obs = MeanStdObserver(num_std=3.0).update([0.0, 1.0, 1.0, 2.0])
    assert obs.compute_range() == (0.0, 2.0)  # mean 1 +- 3 * 0.707 lies beyond [0, 2]
    obs = MeanStdObserver(num_std=1.0).update([0.0, 2.0, 4.0, 6.0])
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(3.0 - np.sqrt(5.0), rel=1e-6) and hi == pytest.approx(3.0 + np.sqrt(5.0), rel=1e-6)


def test_non_finite_values_get_no_weight(rng):
    x = rng.normal(size=(30, 2)).astype("float32")
    dirty = x.copy()
    dirty[::4, 0] = np.nan
    dirty[1, 1] = np.inf
    obs = MeanStdObserver(granularity="per_channel").update(dirty)
    mean, std = obs.compute_mean_std()
    for c in range(2):
        col = dirty[np.isfinite(dirty[:, c]), c].astype(np.float64)
        assert mean[c] == pytest.approx(col.mean(), rel=1e-5, abs=1e-6)
        assert std[c] == pytest.approx(col.std(), rel=1e-5)
    np.testing.assert_array_equal(to_np(obs.count), [np.isfinite(dirty[:, c]).sum() for c in range(2)])


def test_constant_input():
    obs = MeanStdObserver().update(np.full(10, 2.5))
    assert obs.compute_mean_std() == (2.5, 0.0)
    assert obs.compute_range() == (2.5, 2.5)


@pytest.mark.parametrize("num_std", [0, -1.0, "3", None, True])
def test_invalid_num_std(num_std):
    with pytest.raises(ConfigError) as info:
        MeanStdObserver(num_std=num_std)
    assert info.value.field == "num_std"


def test_config():
    config = MeanStdObserver(num_std=4.0, granularity="per_channel", axis=0).get_config()
    assert config["num_std"] == 4.0 and "group_size" not in config
    assert MeanStdObserver.from_config(config).get_config() == config
