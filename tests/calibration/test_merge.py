"""CalibrationResult.merge: shards calibrated apart combine into the result of one pass over all the data."""

import dataclasses

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant.calibration.merge import merge_statistics, rebin_histogram
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.ops.histogram import rebin_counts

BINS = 256


# --------------------------------------------------------------------------
# The merge math against numpy, without a model (every backend).


def numpy_stats(x, name="layer", spec=None, num_bins=BINS):
    """The LayerStatistics a collector holds after seeing `x` (batch first), computed in float64 numpy."""
    x = np.asarray(x, np.float64)
    v = x.reshape(-1)
    n, mean = v.size, v.mean()
    d = v - mean
    m2, m3, m4 = (d**2).sum(), (d**3).sum(), (d**4).sum()
    std = np.sqrt(m2 / n)
    skew = kurt = None
    if m2 > 0:
        skew, kurt = np.sqrt(n) * m3 / m2**1.5, n * m4 / m2**2 - 3.0
    lo, hi = v.min(), v.max()
    hist, edges = np.histogram(v, bins=num_bins, range=(lo, hi))
    rows = x.reshape(-1, x.shape[-1])
    return LayerStatistics(
        name=name, count=n, num_samples=x.shape[0], shape=(None,) + x.shape[1:], dtype="float32", min=lo, max=hi,
        mean=mean, std=std, skewness=skew, kurtosis=kurt, sparsity=float((v == 0).mean()),
        channel_min=rows.min(0).astype(np.float32), channel_max=rows.max(0).astype(np.float32),
        histogram=hist.astype(np.float64), bin_edges=edges, spec=spec or kq.QuantSpec(bits=8),
    )


def split(x, sizes):
    return np.split(x, np.cumsum(sizes)[:-1])


@given(
    data=st.lists(st.floats(-1e3, 1e3, width=32), min_size=4, max_size=200),
    cuts=st.lists(st.integers(0, 200), min_size=1, max_size=4),
    channels=st.sampled_from([1, 2]),
)
def test_merge_math_equals_numpy_on_the_union(data, cuts, channels):
    x = np.asarray(data[: len(data) // channels * channels], np.float64).reshape(-1, channels)
    bounds = sorted({min(c, len(x) - 1) for c in cuts if 0 < c < len(x)})
    shards = [s for s in np.split(x, bounds) if len(s)]
    merged = merge_statistics([numpy_stats(s) for s in shards])
    whole = numpy_stats(x)
    assert (merged.count, merged.num_samples) == (whole.count, whole.num_samples)
    assert (merged.min, merged.max, merged.sparsity) == (whole.min, whole.max, whole.sparsity)
    np.testing.assert_array_equal(merged.channel_min, whole.channel_min)
    np.testing.assert_array_equal(merged.channel_max, whole.channel_max)
    scale = max(abs(whole.min), abs(whole.max), 1.0)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.std, whole.std, rtol=1e-7, atol=1e-9 * scale)
    if whole.std > 1e-3 * scale:  # well-conditioned shape statistics
        np.testing.assert_allclose(merged.skewness, whole.skewness, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(merged.kurtosis, whole.kurtosis, rtol=1e-6, atol=1e-6)
    assert merged.histogram.sum() == pytest.approx(whole.count)
    np.testing.assert_allclose(merged.bin_edges, whole.bin_edges)


@given(
    lo=st.floats(-10, 10), width=st.floats(0.01, 10), grow_lo=st.floats(0, 10), grow_hi=st.floats(0, 10),
    counts=st.lists(st.integers(0, 50), min_size=8, max_size=8),
)
def test_rebin_histogram_matches_the_step_kernel(lo, width, grow_lo, grow_hi, counts):
    hist = np.asarray(counts, np.float64)
    hi, new_lo, new_hi = lo + width, lo - grow_lo, lo + width + grow_hi
    ours = rebin_histogram(hist, lo, hi, new_lo, new_hi, 8)
    kernel = keras.ops.convert_to_numpy(rebin_counts(
        hist[None].astype("float32"), np.float32([lo]), np.float32([hi]), np.float32([new_lo]), np.float32([new_hi]),
        8, 1))[0]
    assert ours.sum() == pytest.approx(hist.sum())
    np.testing.assert_allclose(ours, kernel, atol=1e-3 * max(hist.sum(), 1.0))


def test_rebin_of_a_point_mass_and_onto_the_same_range():
    assert rebin_histogram([5.0, 0.0], 1.0, 1.0, 0.0, 2.0, 4).tolist() == [0.0, 0.0, 5.0, 0.0]
    assert rebin_histogram([5.0, 1.0], 1.0, 1.0, 1.0, 1.0, 2).tolist() == [5.0, 1.0]
    assert rebin_histogram([1.0, 2.0], 0.0, 1.0, 0.0, 1.0, 2).tolist() == [1.0, 2.0]


def test_merge_of_one_is_identity_and_order_is_irrelevant():
    rng = np.random.default_rng(0)
    parts = [numpy_stats(rng.normal(size=(n, 3)) * (i + 1)) for i, n in enumerate((5, 40, 17))]
    assert merge_statistics(parts[:1]) == parts[0]
    forward, backward = merge_statistics(parts), merge_statistics(parts[::-1])
    assert (forward.count, forward.min, forward.max) == (backward.count, backward.min, backward.max)
    for field in ("mean", "std", "skewness", "kurtosis"):
        assert getattr(forward, field) == pytest.approx(getattr(backward, field), rel=1e-12)
    np.testing.assert_allclose(forward.histogram, backward.histogram, atol=1e-9)
    assert forward.qparams(kq.QuantSpec(bits=8)) == pytest.approx(backward.qparams(kq.QuantSpec(bits=8)))


def test_result_merge_takes_an_iterable_or_arguments_and_unions_layers():
    rng = np.random.default_rng(1)
    a = CalibrationResult([numpy_stats(rng.normal(size=(8, 2)), "x"), numpy_stats(rng.normal(size=(8, 2)), "y")],
                          metadata={"samples_seen": 8, "statistics": "full", "model": "m", "source": {"part": 0}})
    b = CalibrationResult([numpy_stats(rng.normal(size=(4, 2)), "y"), numpy_stats(rng.normal(size=(4, 2)), "z")],
                          metadata={"samples_seen": 4, "statistics": "full", "model": "m", "source": {"part": 1}})
    merged = CalibrationResult.merge(a, b)
    assert merged.layer_names == ["x", "y", "z"]
    assert (merged["x"], merged["z"]) == (a["x"], b["z"])
    assert merged["y"].count == 24 and merged["y"].num_samples == 12
    assert dict(merged.items()) == dict(CalibrationResult.merge(x for x in (a, b)).items())
    meta = merged.metadata
    assert meta["samples_seen"] == 12 and meta["model"] == "m" and meta["statistics"] == "full"
    assert meta["merged"]["shards"] == 2
    assert [s["source"] for s in meta["merged"]["sources"]] == [{"part": 0}, {"part": 1}]
    again = CalibrationResult.merge(merged, a).metadata["merged"]  # a merged result's shards are flattened in
    assert again["shards"] == 3
    assert {n: CalibrationResult.merge(a)[n] for n in a} == dict(a.items())


def test_a_layer_no_sample_reached_adds_only_its_counts():
    full = numpy_stats(np.arange(12.0).reshape(6, 2), "x")
    empty = LayerStatistics(name="x", count=0, num_samples=3, non_finite_count=6, shape=(None, 2), dtype="float32")
    merged = merge_statistics([empty, full])
    assert (merged.count, merged.num_samples, merged.non_finite_count) == (12, 9, 6)
    assert (merged.min, merged.max, merged.mean) == (0.0, 11.0, full.mean)
    nothing = merge_statistics([empty, empty])
    assert (nothing.count, nothing.num_samples, nothing.mean, nothing.scale) == (0, 6, None, None)


@pytest.mark.parametrize("change, field, error, fragments", [
    (dict(spec=kq.QuantSpec(bits=4)), "spec", ConfigError, ["{'bits': 8}", "{'bits': 4}"]),
    (dict(observer="mse"), "observer", ConfigError, ["'minmax'", "'mse'"]),
    (dict(shape=(None, 3)), "shape", ShapeMismatchError, ["(None, 2)", "(None, 3)"]),
    (dict(dtype="float16"), "dtype", ConfigError, ["'float32'", "'float16'"]),
    (dict(channel_axis=1), "channel_axis", ConfigError, ["-1", "1"]),
    (dict(histogram=np.ones(BINS * 2), bin_edges=np.linspace(0, 1, 2 * BINS + 1)), "num_bins", ConfigError,
     [str(BINS), str(2 * BINS)]),
    (dict(histogram=None, bin_edges=None), "statistics", ConfigError, ["histogram kept", "histogram not kept"]),
    (dict(mean=None, std=None, skewness=None, kurtosis=None), "statistics", ConfigError,
     ["moments kept", "moments not kept"]),
])
def test_incompatible_shards_raise_naming_layer_field_and_values(change, field, error, fragments):
    a = numpy_stats(np.arange(8.0).reshape(4, 2), "dense_3")
    b = dataclasses.replace(a, **change)
    with pytest.raises(error) as info:
        CalibrationResult.merge(CalibrationResult([a]), CalibrationResult([b]))
    assert info.value.field == field and info.value.layer == "dense_3"
    assert "dense_3" in str(info.value) and field in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="at least one"):
        CalibrationResult.merge([])
    with pytest.raises(ConfigError, match="CalibrationResult objects"):
        CalibrationResult.merge([CalibrationResult([]), "a.json"])
    with pytest.raises(ConfigError, match="CalibrationResult objects"):
        CalibrationResult.merge(3)
    with pytest.raises(ConfigError, match="different statistics"):
        CalibrationResult.merge(CalibrationResult([], metadata={"statistics": "full"}),
                                CalibrationResult([], metadata={"statistics": "range"}))


# --------------------------------------------------------------------------
# Shards calibrated by the callback (TensorFlow), merged == one pass.


def _model():
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3, name="dense")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def _calibrate(model, x, **options):
    cb = kq.CalibrationCallback(num_bins=BINS, **options)
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    return cb.result


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
    model = _model()
    rng = np.random.default_rng(4)
    x = (rng.standard_t(4, size=(300, 6, 6, 2)) + 0.5).astype("float32")
    x[7, 0, 0, 0] = np.nan
    x[250] *= 6.0  # the last shard widens the range: the others' histograms are rebinned
    whole = _calibrate(model, x)
    shards = []
    for i, part in enumerate(split(x, (45, 130, 125))):
        path = tmp_path_factory.mktemp("shards") / f"part{i}.json"
        _calibrate(model, part).save(path)  # as another process would hand it over
        shards.append(CalibrationResult.load(path))
    return whole, shards


@pytest.mark.tensorflow
@pytest.mark.slow
def test_callback_shards_merge_into_the_one_pass_result(calibrations):
    whole, shards = calibrations
    merged = CalibrationResult.merge(shards)
    assert merged.layer_names == whole.layer_names
    assert merged.metadata["samples_seen"] == whole.metadata["samples_seen"] == 300
    for name in whole:
        a, b = merged[name], whole[name]
        assert (a.count, a.num_samples, a.non_finite_count) == (b.count, b.num_samples, b.non_finite_count), name
        assert (a.min, a.max) == (b.min, b.max), name
        assert a.sparsity == pytest.approx(b.sparsity, abs=1e-12), name
        np.testing.assert_array_equal(a.channel_min, b.channel_min)
        np.testing.assert_array_equal(a.channel_max, b.channel_max)
        for field in ("mean", "std", "skewness", "kurtosis"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=2e-5, abs=1e-5), (name, field)
        assert a.histogram.sum() == pytest.approx(b.histogram.sum(), rel=1e-6)
        width = (b.max - b.min) / BINS
        for q in (1.0, 50.0, 99.0, 99.9):
            assert abs(a.percentile(q) - b.percentile(q)) <= 3 * width, (name, q)
        for observer in ("percentile", "mse"):
            spec = kq.QuantSpec(bits=8, observer=observer)
            np.testing.assert_allclose(a.compute_range(spec), b.compute_range(spec), atol=4 * width, err_msg=name)
        np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)
        assert a.zero_point == b.zero_point


@pytest.mark.tensorflow
@pytest.mark.slow
def test_callback_shards_merge_in_any_order(calibrations):
    _, shards = calibrations
    forward, backward = CalibrationResult.merge(shards), CalibrationResult.merge(shards[::-1])
    for name in forward:
        a, b = forward[name], backward[name]
        assert (a.count, a.min, a.max, a.zero_point) == (b.count, b.min, b.max, b.zero_point)
        assert a.std == pytest.approx(b.std, rel=1e-12)
        np.testing.assert_allclose(a.histogram, b.histogram, atol=1e-6)
    assert {n: CalibrationResult.merge(shards[0])[n] for n in shards[0]} == dict(shards[0].items())
