"""HistogramObserver and PercentileObserver: binning, re-binning on widening, range search."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.observers import HistogramObserver, PercentileObserver, range_search
from tests.conftest import to_np


def bin_width(x, bins):
    return (np.max(x) - np.min(x)) / bins


def test_single_batch_matches_np_histogram(rng):
    x = rng.normal(size=5000).astype("float32")
    obs = HistogramObserver(num_bins=128).update(x)
    hist, edges = obs.histogram()
    ref, ref_edges = np.histogram(x, bins=128, range=(float(x.min()), float(x.max())))
    np.testing.assert_allclose(edges, ref_edges, rtol=1e-6, atol=1e-6)
    # float32 vs float64 bin positions may move a value sitting on an edge to its neighbour
    assert np.abs(hist - ref).sum() <= 4
    assert hist.sum() == 5000


def test_per_channel_equals_per_tensor_on_each_channel(rng):
    x = (rng.normal(size=(300, 3)) * [1.0, 5.0, 0.1]).astype("float32")
    obs = HistogramObserver(num_bins=64, granularity="per_channel")
    singles = [HistogramObserver(num_bins=64) for _ in range(3)]
    for i in range(0, 300, 100):
        obs.update(x[i : i + 100])
        for c, s in enumerate(singles):
            s.update(x[i : i + 100, c])
    hist, edges = obs.histogram()
    assert hist.shape == (3, 64) and edges.shape == (3, 65)
    for c, s in enumerate(singles):
        h, e = s.histogram()
        np.testing.assert_allclose(hist[c], h, atol=1e-4)
        np.testing.assert_allclose(edges[c], e, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    scales=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6),
    shifts=st.lists(st.floats(-50.0, 50.0), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_rebinning_preserves_total_count(scales, shifts, seed):
    rng = np.random.default_rng(seed)
    obs = HistogramObserver(num_bins=32)
    total = 0
    for scale, shift in zip(scales, shifts):
        x = rng.normal(size=50).astype("float32") * scale + shift
        obs.update(x)
        total += 50
    hist, edges = obs.histogram()
    assert hist.sum() == pytest.approx(total, rel=1e-5)
    assert np.all(hist >= 0)


def test_widening_keeps_percentiles_close(rng):
    # Batches of growing spread: the range widens several times.
    batches = [rng.normal(size=2000).astype("float32") * s for s in (0.5, 1.0, 2.0, 3.0, 1.0, 5.0)]
    obs = PercentileObserver(num_bins=512)
    for b in batches:
        obs.update(b)
    allx = np.concatenate(batches)
    hist, edges = obs.histogram()
    assert edges[0] == allx.min() and edges[-1] == allx.max()
    width = bin_width(allx, 512)
    for q in (1, 10, 25, 50, 75, 90, 99):
        lo, _ = range_search.percentile_range(hist, edges, low=q, high=100)
        assert abs(lo - np.percentile(allx, q)) <= 3 * width, q


def test_rebinning_spelled_out():
    obs = HistogramObserver(num_bins=8).update([0.0, 1.0, 1.0, 4.0])  # bins of width 0.5 over [0, 4]
    hist, _ = obs.histogram()
    np.testing.assert_array_equal(hist, [1, 0, 2, 0, 0, 0, 0, 1])
    obs.update([8.0])  # [0, 8]: old bin pairs merge into bins of width 1
    hist, edges = obs.histogram()
    np.testing.assert_array_equal(edges, np.arange(9.0))
    # mass is uniform within a bin: 4.0 sat in old bin [3.5, 4], which lies in [3, 4)
    np.testing.assert_allclose(hist, [1, 2, 0, 1, 0, 0, 0, 1], atol=1e-6)
    obs.update([-4.0])  # [-4, 8], width 1.5: old bins split in proportion to the overlap
    hist, edges = obs.histogram()
    np.testing.assert_allclose(edges, np.linspace(-4, 8, 9))
    # [0,1) -> half to [-1,0.5), half to [0.5,2); [1,2) -> [0.5,2); [3,4) -> halves; [7,8] -> [6.5,8]
    np.testing.assert_allclose(hist, [1, 0, 0.5, 2.5, 0.5, 0.5, 0, 1], atol=1e-6)


def test_constant_first_batch_then_widening():
    obs = PercentileObserver(low=0.0, high=100.0, num_bins=16)
    obs.update(np.full(100, 3.0))
    assert obs.compute_range() == (3.0, 3.0)
    scale, zp = obs.compute_qparams(kq.QuantSpec(bits=8))
    assert np.isfinite(scale) and scale > 0
    obs.update(np.full(100, 3.0))  # still zero width
    obs.update([-1.0, 7.0])
    hist, edges = obs.histogram()
    assert hist.sum() == pytest.approx(202)
    assert hist[np.searchsorted(edges, 3.0, side="right") - 1] == pytest.approx(200)  # the constant's bin
    assert obs.compute_range() == (-1.0, 7.0)


@pytest.mark.parametrize("method", ["mse", "kl", "percentile", "minmax"])
def test_compute_range_is_the_search_on_the_histogram(method, rng):
    x = rng.laplace(size=(400, 2)).astype("float32")
    spec = kq.QuantSpec(bits=4)
    obs = HistogramObserver(num_bins=256, method=method, percentile=99.5, spec=spec, granularity="per_channel")
    obs.update(x)
    hist, edges = obs.histogram()
    fn = {
        "mse": range_search.mse_range,
        "kl": range_search.kl_range,
        "percentile": lambda h, e, s: range_search.percentile_range(h, e, s, percentile=99.5),
        "minmax": range_search.minmax_range,
    }[method]
    expected = np.array([fn(hist[c], edges[c], spec) for c in range(2)])
    lo, hi = obs.compute_range()
    np.testing.assert_allclose(lo, expected[:, 0], rtol=1e-6)
    np.testing.assert_allclose(hi, expected[:, 1], rtol=1e-6)


def test_compute_qparams_searches_for_the_given_spec(rng):
    x = rng.laplace(size=20000).astype("float32")
    obs = HistogramObserver(num_bins=1024, method="mse").update(x)
    spec4, spec8 = kq.QuantSpec(bits=4, symmetric=True), kq.QuantSpec(bits=8, symmetric=True)
    lo4, hi4 = obs.compute_range(spec4)
    lo8, hi8 = obs.compute_range(spec8)
    assert hi4 < hi8  # fewer levels clip harder
    scale4, _ = obs.compute_qparams(spec4)
    ref, _ = kq.ops.compute_qparams(lo4, hi4, spec4)
    assert scale4 == pytest.approx(float(to_np(ref)))
    scale8, _ = obs.compute_qparams(spec8)
    assert scale8 * 7 < scale4 * 127  # amax at 4 bits < amax at 8 bits
    default = HistogramObserver(num_bins=1024, method="mse", spec=spec4).update(x)
    assert default.compute_range() == (lo4, hi4)


def test_minmax_method_is_exact(rng):
    x = rng.normal(size=(100, 4)).astype("float32")
    obs = HistogramObserver(num_bins=32, method="minmax", granularity="per_channel")
    lo, hi = obs.update(x[:50]).update(x[50:] * 3).compute_range()
    both = np.concatenate([x[:50], x[50:] * 3])
    np.testing.assert_array_equal(lo, both.min(axis=0))
    np.testing.assert_array_equal(hi, both.max(axis=0))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_percentile_observer_matches_np_percentile(granularity, rng):
    x = (rng.normal(size=(4000, 2)) * [1.0, 10.0] + [0.0, 5.0]).astype("float32")
    obs = PercentileObserver(low=2.0, high=97.0, num_bins=1024, granularity=granularity)
    for i in range(0, 4000, 1000):
        obs.update(x[i : i + 1000])
    lo, hi = obs.compute_range()
    axis = None if granularity == "per_tensor" else 0
    width = (x.max(axis=axis) - x.min(axis=axis)) / 1024
    assert np.all(np.abs(lo - np.percentile(x, 2.0, axis=axis)) <= 2 * width)
    assert np.all(np.abs(hi - np.percentile(x, 97.0, axis=axis)) <= 2 * width)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_bins": 4}, "num_bins"),
        ({"num_bins": 64.0}, "num_bins"),
        ({"method": "entropy"}, "method"),
        ({"percentile": 0}, "percentile"),
        ({"percentile": 101}, "percentile"),
        ({"spec": "int8"}, "spec"),
        ({"granularity": "per_group", "group_size": 2}, "granularity"),
    ],
)
def test_invalid_histogram_arguments(kwargs, field):
    with pytest.raises(ConfigError) as info:
        HistogramObserver(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("low, high, field", [(-1, 99, "low"), (1, 101, "high"), (50, 50, "low"), (60, 40, "low")])
def test_invalid_percentiles(low, high, field):
    with pytest.raises(ConfigError) as info:
        PercentileObserver(low=low, high=high)
    assert info.value.field == field


def test_configs():
    spec = kq.QuantSpec(bits=4, symmetric=True)
    obs = HistogramObserver(num_bins=100, method="kl", percentile=99.0, spec=spec)
    config = obs.get_config()
    assert config["spec"] == spec.get_config() and config["method"] == "kl" and config["num_bins"] == 100
    clone = HistogramObserver.from_config(config)
    assert clone.spec == spec and clone.get_config() == config
    p = PercentileObserver(low=0.5, high=99.5, num_bins=256)
    config = p.get_config()
    assert {"low": 0.5, "high": 99.5, "num_bins": 256}.items() <= config.items()
    assert "method" not in config and "spec" not in config
    assert PercentileObserver.from_config(config).get_config() == config


def test_auto_per_channel_chooses_per_channel(rng):
    """Per channel, each channel's own histogram picks its method: uniform keeps min-max, outliers clip."""
    uniform = rng.uniform(-1.0, 1.0, size=4000)
    outliers = np.concatenate([rng.laplace(size=3997), [40.0, -35.0, 60.0]])
    x = np.stack([uniform, outliers], axis=1).astype("float32")
    spec = kq.QuantSpec(bits=4)
    obs = HistogramObserver(num_bins=512, method="auto", spec=spec, granularity="per_channel").update(x)
    choices = obs.auto_ranges()
    assert [c.method for c in choices][0] == "minmax" and choices[1].method in ("percentile", "mse", "kl")
    hist, edges = obs.histogram()
    expected = [range_search.auto_range(hist[c], edges[c], spec) for c in range(2)]
    assert choices == tuple(expected)
    lo, hi = obs.compute_range()
    np.testing.assert_allclose(lo, [e.min for e in expected], rtol=1e-6)
    np.testing.assert_allclose(hi, [e.max for e in expected], rtol=1e-6)
    assert hi[1] < 30.0  # half the outlier at 60


def test_auto_options_and_config_round_trip(rng):
    spec = kq.QuantSpec(bits=4, symmetric=True)
    obs = HistogramObserver(num_bins=256, method="auto", spec=spec, candidates="mse,minmax", tolerance=0.5)
    config = obs.get_config()
    assert (config["method"], config["candidates"], config["tolerance"]) == ("auto", "mse,minmax", 0.5)
    clone = HistogramObserver.from_config(config)
    assert (clone.candidates, clone.tolerance, clone.spec) == (("mse", "minmax"), 0.5, spec)
    assert clone.get_config() == config
    x = rng.uniform(-1.0, 1.0, size=5000).astype("float32")
    obs.update(x)
    assert obs.auto_ranges()[0].method == "mse"  # the earliest candidate within the tolerance
    assert obs.compute_range() == pytest.approx(obs.auto_ranges()[0].range, rel=1e-6)
    # A config written before the auto options existed still loads.
    old = {k: v for k, v in config.items() if k not in ("candidates", "tolerance")}
    assert HistogramObserver.from_config(old).tolerance == 0.2
    with pytest.raises(ConfigError) as info:
        HistogramObserver(method="auto", candidates="minmax,median")
    assert info.value.field == "candidates"
