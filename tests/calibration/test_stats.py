"""LayerCollector: exact merged moments, extremes, sparsity and per-channel ranges against numpy."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant import QuantSpec
from keras_quant.calibration.result import LayerStatistics
from keras_quant.calibration.stats import LayerCollector, batch_moments, merge_moments, moments_to_stats
from keras_quant.errors import ConfigError, NoDataError


def reference(x):
    """float64 numpy statistics of the finite values of `x` (scipy's biased skew / excess kurtosis)."""
    v = np.asarray(x, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    mean = v.mean()
    d = v - mean
    std = np.sqrt((d**2).mean())
    return {
        "count": v.size, "min": v.min(), "max": v.max(), "mean": mean, "std": std,
        "skewness": (d**3).mean() / std**3, "kurtosis": (d**4).mean() / std**4 - 3.0,
        "sparsity": float((v == 0).mean()),
    }


def check(stats, x, channel_axis=-1):
    ref = reference(x)
    assert stats.count == ref["count"]
    assert stats.min == np.float32(ref["min"]) and stats.max == np.float32(ref["max"])
    np.testing.assert_allclose(stats.mean, ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, ref["std"], rtol=1e-5)
    np.testing.assert_allclose(stats.skewness, ref["skewness"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.kurtosis, ref["kurtosis"], rtol=1e-4, atol=1e-5)
    assert stats.sparsity == pytest.approx(ref["sparsity"], abs=1e-12)
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(stats.channel_min, np.where(finite, x, np.inf).min(axis=axes))
    np.testing.assert_array_equal(stats.channel_max, np.where(finite, x, -np.inf).max(axis=axes))


def skewed_data(rng, n=80, shape=(6, 5)):
    x = (rng.gamma(2.0, 1.5, size=(n,) + shape) - 1.0).astype("float32")
    x[x < 0] = 0.0  # ReLU-like: exact zeros for sparsity
    return x


# Two uneven batches: eager JAX compiles each op once per shape, so the tests share
# these shapes to stay fast under KERAS_BACKEND=jax (compiled tests use more batches).
SPLITS = [(0, 7), (7, 80)]


def feed(collector, x, sample_mask=None):
    for start, stop in SPLITS:
        mask = None if sample_mask is None else sample_mask[start:stop]
        collector(x[start:stop], sample_mask=mask)


def test_eager_uneven_batches_match_numpy(rng):
    x = skewed_data(rng)
    c = LayerCollector(kq.QuantSpec(bits=8), num_bins=256)
    feed(c, x)
    stats = c.to_statistics()
    check(stats, x)
    assert stats.num_samples == 80
    assert stats.shape == (None, 6, 5) and stats.dtype == "float32"
    assert stats.range_min == stats.min and stats.range_max == stats.max
    assert stats.histogram.sum() == pytest.approx(x.size)
    assert stats.bin_edges[0] == stats.min and stats.bin_edges[-1] == pytest.approx(stats.max)


def test_compiled_predict_matches_numpy(rng):
    x = skewed_data(rng, n=96, shape=(4, 3))
    c = LayerCollector(kq.QuantSpec(bits=8, observer="mse"), channel_axis=1, num_bins=128)
    model = keras.Sequential([keras.Input((4, 3)), c])
    out = model.predict(x, batch_size=32, verbose=0)  # one compiled step, three batches
    np.testing.assert_array_equal(out, x)
    check(c.to_statistics(), x, channel_axis=1)
    assert c.to_statistics().channel_min.shape == (4,)


@pytest.mark.tensorflow
def test_inside_xla_tf_function(rng):
    import tensorflow as tf

    x = skewed_data(rng, n=60, shape=(8,))
    c = LayerCollector(kq.QuantSpec(bits=8, observer="percentile"), num_bins=64)
    c.build((None, 8))
    step = tf.function(lambda t, m: c(t, sample_mask=m), jit_compile=True)
    keep = np.ones(20, bool)
    for i in range(0, 60, 20):
        step(tf.constant(x[i : i + 20]), tf.constant(keep))
    check(c.to_statistics(), x)


@pytest.mark.tensorflow
def test_jit_compiled_model(rng):
    x = skewed_data(rng, n=64, shape=(5,))
    c = LayerCollector(kq.QuantSpec(bits=8, observer="moving_average"), num_bins=64)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5, use_bias=False), c])
    model.compile(jit_compile=True)
    y = model.predict(x, batch_size=16, verbose=0)
    check(c.to_statistics(), y)


def test_sample_mask_ignores_masked_samples(rng):
    x = skewed_data(rng)
    junk = x.copy()
    keep = np.arange(80) % 3 != 0
    junk[~keep] = 1e6  # masked-out samples, including NaN / Inf
    junk[3, 0, 0] = np.nan
    junk[42, 1, 1] = np.inf
    junk[4, 2, 2] = np.nan  # a kept sample: counted, left out
    c = LayerCollector(num_bins=64)
    feed(c, junk, sample_mask=keep)
    stats = c.to_statistics()
    ref = x.copy()
    ref[4, 2, 2] = np.nan
    check(stats, ref[keep])
    assert stats.num_samples == keep.sum() and stats.non_finite_count == 1
    assert stats.max < 1e6


def test_non_finite_values_are_counted_and_left_out(rng):
    y = skewed_data(rng)
    y[3, 1, 1], y[42, 2, 0] = np.nan, -np.inf
    c = LayerCollector(num_bins=64)
    feed(c, y)
    stats = c.to_statistics()
    assert stats.non_finite_count == 2 and stats.count == y.size - 2
    check(stats, y)


def test_no_data_returns_count_zero_then_raises(rng):
    c = LayerCollector(kq.QuantSpec(bits=8))
    never = c.to_statistics()
    assert isinstance(never, LayerStatistics) and never.count == 0 and never.mean is None
    feed(c, skewed_data(rng), sample_mask=np.zeros(80, bool))
    stats = c.to_statistics(name="branch")
    assert stats.name == "branch"
    assert stats.count == 0 and stats.num_samples == 0 and stats.min is None and stats.histogram is None
    with pytest.raises(NoDataError, match="no calibration sample reached"):
        stats.qparams(kq.QuantSpec(bits=8))


def test_reset_and_state_bytes(rng):
    c = LayerCollector(num_bins=128)
    x = skewed_data(rng)
    c(x[:7])
    size = c.state_bytes
    # 13 packed scalars + histogram (128) + per-channel min/max (2 x 5), planned before building
    assert size == 4 * (13 + 128 + 10)
    assert LayerCollector(num_bins=128).planned_bytes(x.shape) == size
    moving = LayerCollector(kq.QuantSpec(bits=8, observer="moving_average"), num_bins=128)
    moving(x[:7])
    assert moving.planned_bytes(x.shape) == moving.state_bytes  # its range observer's state too
    c(x[7:80])
    assert c.state_bytes == size  # fixed memory
    c.reset()
    assert c.to_statistics().count == 0
    feed(c, x)
    check(c.to_statistics(), x)


def test_channel_skipped_for_1d_and_bad_spec(rng):
    c = LayerCollector()
    c(rng.normal(size=7).astype("float32"))
    assert c.to_statistics().channel_min is None
    with pytest.raises(ConfigError):
        LayerCollector(spec="minmax")
    with pytest.raises(ConfigError):
        LayerCollector(channel_axis=1.5)


def test_per_channel_spec_range(rng):
    x = skewed_data(rng)[7:80] * np.float32(3.0)
    c = LayerCollector(kq.QuantSpec(bits=8, granularity="per_channel", observer="mean_std"))
    c(x)
    stats = c.to_statistics()
    assert np.shape(stats.scale) == (5,)
    obs = kq.observers.MeanStdObserver(granularity="per_channel")
    obs(x)
    for got, want in zip(stats.compute_range(stats.spec), obs.compute_range()):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    lo, hi = stats.compute_range(kq.QuantSpec(granularity="per_channel"))
    np.testing.assert_array_equal(lo, x.min(axis=(0, 1)))
    with pytest.raises(ConfigError):
        stats.compute_range(kq.QuantSpec(granularity="per_channel", observer="kl"))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-100.0, 100.0),
)
def test_merge_is_split_invariant(sizes, seed, scale, shift):
    x = np.random.default_rng(seed).standard_t(5, size=sum(sizes)) * scale + shift
    merged = (0.0, 0.0, 0.0, 0.0, 0.0)
    start = 0
    for n in sizes:
        merged = merge_moments(merged, batch_moments(x[start : start + n]))
        start += n
    whole = batch_moments(x)
    assert merged[0] == whole[0]
    np.testing.assert_allclose(merged[1], whole[1], rtol=1e-9, atol=1e-9 * scale)
    for i, power in ((2, 2), (3, 3), (4, 4)):
        np.testing.assert_allclose(merged[i], whole[i], rtol=1e-7, atol=1e-9 * len(x) * scale**power)


def test_merge_with_empty_side_and_stats():
    a = batch_moments([1.0, 2.0, 3.0, 10.0])
    assert merge_moments(a, batch_moments([])) == pytest.approx(a)
    assert merge_moments(batch_moments([]), a) == pytest.approx(a)
    mean, std, skew, kurt = moments_to_stats(*a)
    assert mean == 4.0 and std == pytest.approx(np.std([1.0, 2.0, 3.0, 10.0]))
    assert moments_to_stats(*batch_moments([2.0, 2.0]))[2:] == (None, None)


@pytest.mark.parametrize("observer", ["minmax", "mse", "mean_std"])
def test_range_statistics_gather_only_what_the_observer_needs(rng, observer):
    x = skewed_data(rng)
    spec = QuantSpec(bits=8, observer=observer)
    lean = LayerCollector(spec, num_bins=128, statistics="range")
    full = LayerCollector(spec, num_bins=128)
    for c in (lean, full):
        c(x[:7])
        c(x[7:])
    assert lean.state_bytes < full.state_bytes
    a, b = lean.to_statistics(), full.to_statistics()
    assert (a.min, a.max, a.count) == (b.min, b.max, b.count)
    np.testing.assert_allclose(a.range_min, b.range_min, rtol=1e-6)
    np.testing.assert_allclose(a.range_max, b.range_max, rtol=1e-6)
    assert a.sparsity is None and a.channel_min is None
    if observer != "mse":
        with pytest.raises(ConfigError, match="histogram"):
            a.percentile(50.0)
    if observer == "minmax":
        with pytest.raises(ConfigError, match="histogram"):
            a.compute_range(QuantSpec(observer="kl"))


def test_invalid_statistics_option():
    with pytest.raises(ConfigError, match="statistics"):
        LayerCollector(statistics="some")


@pytest.mark.tensorflow
@pytest.mark.parametrize("statistics", ["range", "full"])
def test_the_shared_stateful_update_equals_reading_and_assigning_outside(rng, monkeypatch, statistics):
    """On TensorFlow a collector's reads and writes run inside its kind's shared function (one call per
    collector in a step graph); the statistics are bit-equal to reading and assigning outside it."""
    import tensorflow as tf

    from keras_quant.calibration import step as step_lib

    x = rng.normal(size=(6, 5, 4)).astype("float32")
    x[0, 0, 0] = np.nan
    mask = np.array([1, 1, 0, 1, 0, 1], bool)

    def listed(v):
        return None if v is None else np.asarray(v).tolist()

    def run():
        c = LayerCollector(QuantSpec(bits=8, observer="mse"), statistics=statistics)
        c.build(x.shape)
        step = tf.function(lambda t, m: c(t, sample_mask=m))
        step(tf.constant(x[:3]), tf.constant(mask[:3]))
        c(tf.constant(x[3:]))
        s = c.to_statistics()
        fields = (s.count, s.min, s.max, s.mean, s.std, s.non_finite_count, s.scale, s.zero_point, s.histogram,
                  s.channel_min, s.channel_max)
        return step_lib.resource_handles(c.state_variables()) is not None, [listed(f) for f in fields]

    uses_handles, inside = run()
    assert uses_handles
    monkeypatch.setattr(step_lib, "resource_handles", lambda variables: None)
    assert run() == (False, inside)


@pytest.mark.tensorflow
def test_per_tensor_collectors_of_every_rank_share_one_update_function():
    from keras_quant.calibration import step as step_lib

    collectors = []
    for shape in [(4, 3), (4, 5, 3), (4, 2, 2, 3)]:
        c = LayerCollector(QuantSpec(bits=8), statistics="range")
        c.build(shape)
        collectors.append(c)
    assert not any(c.step_key.channel is not None for c in collectors)
    assert len({id(step_lib.update_function(c.step_key)) for c in collectors}) == 1  # one trace serves every rank
    masked = {id(step_lib.update_function(c.step_key, masked=True)) for c in collectors}
    assert len(masked) == 3  # the mask is broadcast by rank


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from([0.0, 1.5, -2.25, 7.0, -1e3, np.nan, np.inf, -np.inf]),
                                 min_size=6, max_size=6), min_size=1, max_size=4))
def test_range_only_step_matches_reference(batches):
    """statistics="range" with a min-max spec takes the short vector step: counts and extremes as numpy says."""
    c = LayerCollector(QuantSpec(bits=8), statistics="range")
    for b in batches:
        c(np.asarray(b, "float32").reshape(2, 3))
    values = np.asarray(batches, "float32").reshape(-1)
    finite = values[np.isfinite(values)]
    scalars = dict(zip(("non_finite_count", "samples", "count", "min_val", "max_val"), c._scalars_var.numpy()))
    assert scalars["non_finite_count"] == values.size - finite.size
    assert scalars["samples"] == 2 * len(batches) and scalars["count"] == finite.size
    want = (finite.min(), finite.max()) if finite.size else (np.inf, -np.inf)
    assert (scalars["min_val"], scalars["max_val"]) == want


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_range_only_step_finds_one_non_finite_value_in_a_large_batch(bad):
    """One bad value among 200,000, anywhere, is counted and left out of the range (min / max alone may
    drop a NaN: XLA's fast min / max on CPU does)."""
    rng = np.random.default_rng(0)
    for position in rng.integers(0, 200_000, size=5):
        c = LayerCollector(QuantSpec(bits=8), statistics="range")
        x = rng.normal(size=(200, 1000)).astype("float32")
        x.reshape(-1)[position] = bad
        c(x)
        finite = x[np.isfinite(x)]
        st = c.to_statistics()
        assert (st.non_finite_count, st.count) == (1, finite.size)
        assert (st.min, st.max) == (float(finite.min()), float(finite.max()))
