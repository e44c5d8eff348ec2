"""kq.observers.get: from names, specs and instances."""

import pytest

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.observers import (
    HistogramObserver,
    MeanStdObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    get,
)


@pytest.mark.parametrize(
    "name, cls, method",
    [
        ("minmax", MinMaxObserver, None),
        ("moving_average", MovingAverageMinMaxObserver, None),
        ("percentile", PercentileObserver, "percentile"),
        ("mean_std", MeanStdObserver, None),
        ("mse", HistogramObserver, "mse"),
        ("kl", HistogramObserver, "kl"),
        ("histogram", HistogramObserver, "mse"),
        ("auto", HistogramObserver, "auto"),
    ],
)
def test_from_name(name, cls, method):
    obs = get(name)
    assert type(obs) is cls
    assert obs.granularity == "per_tensor" and not obs.built
    if method:
        assert obs.method == method


def test_every_spec_observer_name_is_known():
    from keras_quant.config import OBSERVERS

    for name in OBSERVERS:
        assert get(kq.QuantSpec(observer=name)) is not None


def test_from_spec_granularity_and_options():
    spec = kq.QuantSpec(granularity="per_channel", axis=1, observer="mean_std", observer_options={"num_std": 4.0})
    obs = get(spec)
    assert type(obs) is MeanStdObserver
    assert (obs.granularity, obs.axis, obs.num_std) == ("per_channel", 1, 4.0)
    spec = kq.QuantSpec(granularity="per_group", group_size=32, observer="moving_average",
                        observer_options={"averaging_constant": 0.1})
    obs = get(spec)
    assert (obs.granularity, obs.group_size) == ("per_group", 32) and obs.momentum == pytest.approx(0.9)


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_from_spec_searches_for_its_bit_width(name):
    spec = kq.QuantSpec(bits=4, symmetric=True, observer=name, observer_options={"num_bins": 512})
    obs = get(spec)
    assert type(obs) is HistogramObserver
    assert obs.method == name and obs.spec == spec and obs.num_bins == 512


def test_percentile_option():
    obs = get(kq.QuantSpec(observer="percentile", observer_options={"percentile": 99.9}))
    assert obs.high == 99.9 and obs.low == pytest.approx(0.1)
    obs = get(kq.QuantSpec(observer="percentile", observer_options={"low": 1.0, "high": 98.0}))
    assert (obs.low, obs.high) == (1.0, 98.0)


def test_keyword_arguments_and_instances():
    obs = get("minmax", name="calib_obs", granularity="per_channel")
    assert obs.name == "calib_obs" and obs.granularity == "per_channel"
    assert get(obs) is obs


@pytest.mark.parametrize("bad", ["entropy", "", 3, None])
def test_unknown(bad):
    with pytest.raises(ConfigError):
        get(bad)


def test_invalid_options_and_granularity():
    with pytest.raises(ConfigError):
        get(kq.QuantSpec(observer="minmax", observer_options={"num_bins": 10}))
    with pytest.raises(ConfigError) as info:
        get(kq.QuantSpec(granularity="per_group", group_size=8, observer="kl"))
    assert info.value.field == "granularity"


def test_auto_from_spec_takes_its_grid_and_options():
    spec = kq.QuantSpec(bits=4, symmetric=True, observer="auto",
                        observer_options={"candidates": "minmax,kl", "tolerance": 0.05, "num_bins": 256})
    obs = get(spec)
    assert type(obs) is HistogramObserver
    assert (obs.method, obs.spec, obs.candidates, obs.tolerance, obs.num_bins) == (
        "auto", spec, ("minmax", "kl"), 0.05, 256)
