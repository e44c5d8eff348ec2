"""keras_quant.observers.registry: one record per observer name, and its pure range functions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.observers import REGISTRY, Observer, get
from keras_quant.observers.registry import NEEDS, RangeState
from keras_quant.ops.core import WEIGHT_SEARCH_OBSERVERS

SPEC_NAMES = tuple(name for name, record in REGISTRY.items() if record.range is not None)


def test_registry_covers_exactly_the_config_names():
    assert set(SPEC_NAMES) == set(kq.config.OBSERVERS)
    assert set(REGISTRY) - set(SPEC_NAMES) == {"histogram"}  # the get-only alias
    assert {n for n, r in REGISTRY.items() if r.weight_search} == set(WEIGHT_SEARCH_OBSERVERS)
    assert all(r.needs in NEEDS and r.name == n for n, r in REGISTRY.items())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_name_builds(name):
    obs = get(name)
    assert isinstance(obs, Observer) and type(obs) is REGISTRY[name].cls
    for key, value in REGISTRY[name].options.items():
        assert getattr(obs, key) == value


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_config_accepts_every_registered_name(name):
    spec = kq.QuantSpec(observer=name)
    assert type(get(spec)) is REGISTRY[name].cls


@pytest.mark.parametrize("name", ["histogram", "max", "entropy", ""])
def test_config_rejects_other_names(name):
    with pytest.raises(ConfigError) as info:
        kq.QuantSpec(observer=name)
    assert info.value.field == "observer"


def _state_from(x, bins):
    hist, edges = np.histogram(x, bins=bins, range=(x.min(), x.max()))
    return RangeState(min=float(x.min()), max=float(x.max()), histogram=hist.astype(np.float64), bin_edges=edges,
                      mean=float(x.mean()), std=float(x.std()))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]), symmetric=st.booleans(),
       name=st.sampled_from(["percentile", "mse", "kl", "auto"]))
def test_histogram_range_functions_match_the_observers(seed, bits, symmetric, name):
    x = np.random.default_rng(seed).standard_t(3, size=4000).astype("float32")
    spec = kq.QuantSpec(bits=bits, symmetric=symmetric, observer=name,
                        observer_options={"num_bins": 256} if name != "percentile" else {"percentile": 99.0})
    options = dict(spec.options)
    obs = get(spec) if name != "percentile" else get(spec, num_bins=256)
    obs.update(x)
    hist, edges = obs.histogram()
    lo, hi = float(edges[0]), float(edges[-1])
    state = RangeState(min=lo, max=hi, histogram=hist, bin_edges=edges)
    got = REGISTRY[name].range(state, spec, options)
    np.testing.assert_allclose(got, obs.compute_range(), rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), num_std=st.floats(0.5, 4.0))
def test_mean_std_range_function_matches_the_observer(seed, num_std):
    x = np.random.default_rng(seed).normal(1.0, 2.0, size=3000).astype("float32")
    obs = get(kq.QuantSpec(observer="mean_std", observer_options={"num_std": num_std})).update(x)
    state = _state_from(x.astype(np.float64), 64)
    got = REGISTRY["mean_std"].range(state, kq.QuantSpec(), {"num_std": num_std})
    np.testing.assert_allclose(got, obs.compute_range(), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_minmax_range_function_matches_the_observer(seed):
    x = np.random.default_rng(seed).normal(size=500).astype("float32")
    obs = get("minmax").update(x)
    assert REGISTRY["minmax"].range(_state_from(x, 16), kq.QuantSpec(), {}) == obs.compute_range()


def test_layer_statistics_compute_range_is_the_registry_range():
    x = np.random.default_rng(0).laplace(size=5000)
    state = _state_from(x, 512)
    stats = kq.LayerStatistics(name="t", count=x.size, min=state.min, max=state.max, mean=state.mean,
                               std=state.std, histogram=state.histogram, bin_edges=state.bin_edges)
    for name in SPEC_NAMES:
        spec = kq.QuantSpec(bits=4, observer=name)
        assert stats.compute_range(spec) == REGISTRY[name].range(state, spec, spec.options)
