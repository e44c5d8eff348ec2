"""LayerStatistics and CalibrationResult: histogram reads, ranges, qparams, safe persistence."""

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

import keras_quant as kq
from keras_quant.calibration import result as result_mod
from keras_quant import io as kq_io
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.io import decode_payload, encode_payload
from keras_quant.calibration.stats import batch_moments, moments_to_stats
from keras_quant.errors import ConfigError, IntegrityError, NoDataError
from keras_quant.ops import range_search

BINS = 2048


def make_stats(x, name="layer", spec=None, num_bins=BINS, **extra):
    """A LayerStatistics built from numpy (what a collector would hold), without a model."""
    x = np.asarray(x, np.float32)
    spec = spec or kq.QuantSpec(bits=8)
    v = x.astype(np.float64).reshape(-1)
    lo, hi = float(v.min()), float(v.max())
    hist, edges = np.histogram(v, bins=num_bins, range=(lo, hi))
    mean, std, skew, kurt = moments_to_stats(*batch_moments(v))
    fields = dict(
        name=name, count=v.size, num_samples=x.shape[0], shape=(None,) + x.shape[1:], dtype="float32",
        min=lo, max=hi, mean=mean, std=std, skewness=skew, kurtosis=kurt, sparsity=float((v == 0).mean()),
        channel_min=x.reshape(-1, x.shape[-1]).min(axis=0) if x.ndim > 1 else None,
        channel_max=x.reshape(-1, x.shape[-1]).max(axis=0) if x.ndim > 1 else None,
        histogram=hist.astype(np.float64), bin_edges=edges,
        outliers=result_mod.histogram_outliers(hist, edges, mean, std), spec=spec,
    )
    fields.update(extra)
    stats = LayerStatistics(**fields)
    if "range_min" not in extra:
        lo_r, hi_r = stats.compute_range(spec)
        scale, zp = stats.qparams(spec)
        if np.ndim(scale) == 0:
            scale, zp = float(scale), int(zp)
        stats = LayerStatistics(**{**fields, "range_min": lo_r, "range_max": hi_r, "scale": scale, "zero_point": zp})
    return stats


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(1)
    x = rng.standard_t(5, size=(400, 64)).astype("float32")
    x[:3, :4] = [[40.0], [-35.0], [55.0]]  # planted outliers
    return x


def test_percentile_within_one_bin(sample):
    stats = make_stats(sample)
    width = (stats.max - stats.min) / BINS
    v = sample.astype(np.float64).ravel()
    for q in (0.1, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9):
        assert abs(stats.percentile(q) - np.percentile(v, q)) <= width
    assert stats.percentile(0) == stats.min and stats.percentile(100) == stats.max
    for bad in (-1, 100.5, "50", True):
        with pytest.raises(ConfigError):
            stats.percentile(bad)


def test_outliers_match_numpy_within_histogram_tolerance(sample):
    stats = make_stats(sample)
    v = sample.astype(np.float64).ravel()
    width = (stats.max - stats.min) / BINS

    def near(*thresholds):  # elements whose side of a threshold one bin cannot resolve
        return int(sum(np.sum(np.abs(v - t) <= 2 * width) for t in thresholds)) + 1

    mean, std = v.mean(), v.std()
    z = np.abs(v - mean) > 3 * std
    assert abs(stats.outliers["zscore"] - z.sum()) <= near(mean - 3 * std, mean + 3 * std)
    q1, q3 = np.percentile(v, [25, 75])
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    iqr = (v < lo) | (v > hi)
    assert abs(stats.outliers["iqr"] - iqr.sum()) <= near(lo, hi) + 2
    med = np.median(v)
    mad = np.median(np.abs(v - med))
    m = 0.6745 * np.abs(v - med) / mad > 3.5
    limit = 3.5 * mad / 0.6745
    assert abs(stats.outliers["mad"] - m.sum()) <= near(med - limit, med + limit) + 2
    assert z.sum() >= 3 and stats.outliers["zscore"] >= 3  # the planted ones at least


def test_compute_range_for_each_observer(sample):
    stats = make_stats(sample)
    h, e = stats.histogram, stats.bin_edges
    assert stats.compute_range(kq.QuantSpec()) == (stats.min, stats.max)
    assert stats.compute_range(kq.QuantSpec(observer="moving_average")) == (stats.min, stats.max)
    lo, hi = stats.compute_range(kq.QuantSpec(observer="percentile", observer_options={"percentile": 99.0}))
    assert (lo, hi) == range_search.percentile_range(h, e, low=1.0, high=99.0)
    assert stats.compute_range(kq.QuantSpec(observer="percentile")) == range_search.percentile_range(h, e)
    for name, fn in (("mse", range_search.mse_range), ("kl", range_search.kl_range)):
        spec = kq.QuantSpec(bits=4, symmetric=True, observer=name)
        assert stats.compute_range(spec) == fn(h, e, spec)
    lo, hi = stats.compute_range(kq.QuantSpec(observer="mean_std", observer_options={"num_std": 2.0}))
    assert lo == pytest.approx(stats.mean - 2 * stats.std) and hi == pytest.approx(stats.mean + 2 * stats.std)
    lo, hi = stats.compute_range(kq.QuantSpec(observer="mean_std", observer_options={"num_std": 100.0}))
    assert (lo, hi) == (stats.min, stats.max)
    lo, hi = stats.compute_range(kq.QuantSpec(granularity="per_channel"))
    np.testing.assert_array_equal(lo, sample.min(axis=0))
    with pytest.raises(ConfigError):
        stats.compute_range(kq.QuantSpec(granularity="per_channel", observer="mse"))
    # moving_average keeps the range the observer stored
    ma = make_stats(sample, spec=kq.QuantSpec(observer="moving_average"), range_min=-3.0, range_max=4.0)
    assert ma.compute_range(kq.QuantSpec(observer="moving_average")) == (-3.0, 4.0)


def test_qparams_and_no_data(sample):
    stats = make_stats(sample)
    spec = kq.QuantSpec(bits=8, symmetric=True)
    scale, zp = stats.qparams(spec)
    assert scale == pytest.approx(max(-stats.min, stats.max) / 127, rel=1e-6) and zp == 0
    assert stats.scale == pytest.approx(float(stats.qparams(stats.spec)[0]))
    empty = LayerStatistics(name="branch", num_samples=0)
    for call in (lambda: empty.qparams(spec), lambda: empty.compute_range(spec), lambda: empty.percentile(50)):
        with pytest.raises(NoDataError, match="no calibration sample reached"):
            call()
    nan_only = LayerStatistics(name="nan", non_finite_count=5)
    with pytest.raises(NoDataError, match="only non-finite"):
        nan_only.qparams(spec)
    result = CalibrationResult([stats, empty])
    assert result.layer_names == ["layer", "branch"] and len(result) == 2 and "layer" in result
    assert list(result) == ["layer", "branch"] and result.get("zzz") is None
    np.testing.assert_array_equal(result.qparams("layer", spec)[0], scale)
    with pytest.raises(NoDataError, match="branch.*no calibration sample"):
        result.qparams("branch", spec)
    with pytest.raises(NoDataError, match="absent from the calibration"):
        result.qparams("zzz", spec)
    with pytest.raises(KeyError, match="known layers.*layer.*branch"):
        result["missing"]
    with pytest.raises(TypeError):
        result["x"] = stats  # read-only


def test_summary_and_metadata(sample):
    lines = []
    result = CalibrationResult({"a": make_stats(sample, name="a")}, metadata={"samples_seen": 400, "model": "m"})
    text = result.summary(print_fn=lines.append)
    assert lines == [text] and "a" in text and "zero_point" in text and "400 samples" in text
    meta = result.metadata
    assert meta["model"] == "m" and meta["keras_quant_version"] == kq.__version__ and "T" in meta["created"]


CASES = [(fmt, comp) for fmt in ("json", "msgpack") for comp in (None, "gzip", "zstd")]
SUFFIX = {("json", None): ".json", ("msgpack", None): ".msgpack", ("json", "gzip"): ".json.gz",
          ("msgpack", "gzip"): ".mpk.gz", ("json", "zstd"): ".json.zst", ("msgpack", "zstd"): ".msgpack.zst"}


def full_result(sample):
    a = make_stats(sample, name="conv", spec=kq.QuantSpec(bits=4, observer="mse", observer_options={"num_bins": 2048}))
    cmin, cmax = sample[:, :8].min(axis=0), sample[:, :8].max(axis=0)
    cmin[0], cmax[0] = np.inf, -np.inf  # a channel that saw no finite value: non-finite values round-trip
    b = make_stats(sample[:, :8], name="dense", num_bins=64, channel_min=cmin, channel_max=cmax)
    empty = LayerStatistics(name="branch", num_samples=0, non_finite_count=2)
    return CalibrationResult([a, b, empty], metadata={"samples_seen": 400, "sampling": "first", "model": "cnn",
                                                      "config": {"bits": 8, "x": float("nan")}})


@pytest.mark.parametrize("fmt, comp", CASES)
def test_save_load_round_trip(fmt, comp, sample, tmp_path):
    result = full_result(sample)
    path = tmp_path / ("calib" + SUFFIX[(fmt, comp)])
    result.save(path)
    raw = path.read_bytes()
    magic = {None: b"KQCAL ", "gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}[comp]
    assert raw.startswith(magic)
    loaded = CalibrationResult.load(path)
    assert loaded == result and loaded.layer_names == result.layer_names
    assert loaded.metadata == result.metadata and loaded.metadata["config"]["x"] == "nan"
    np.testing.assert_array_equal(loaded["conv"].histogram, result["conv"].histogram)
    assert loaded["conv"].histogram.dtype == np.float64 and loaded["dense"].channel_min.dtype == np.float32
    assert loaded["dense"].channel_min[0] == np.inf and loaded["dense"].channel_max[0] == -np.inf
    assert loaded["conv"].spec == result["conv"].spec
    assert loaded["branch"].count == 0 and loaded["branch"].non_finite_count == 2
    spec = kq.QuantSpec(bits=8, observer="kl")
    np.testing.assert_array_equal(loaded["conv"].qparams(spec)[0], result["conv"].qparams(spec)[0])
    # explicit format/compression override the suffix, and load reads the header, not the suffix
    other = tmp_path / "calib.bin"
    result.save(other, format=fmt, compression=comp)
    assert CalibrationResult.load(other) == result


def test_json_is_readable_and_msgpack_arrays_are_binary(sample, tmp_path):
    result = full_result(sample)
    result.save(tmp_path / "r.json")
    header, payload = (tmp_path / "r.json").read_bytes().split(b"\n", 1)
    assert json.loads(header[len(b"KQCAL "):])["schema_version"] == 1
    doc = json.loads(payload)
    assert doc["layers"][0]["name"] == "conv" and doc["layers"][2]["min"] is None
    assert doc["layers"][1]["channel_min"]["data"][0] == "inf"
    assert CalibrationResult.from_dict(result.to_dict()) == result
    json.dumps(result.to_dict(), allow_nan=False)  # plain JSON-able
    result.save(tmp_path / "r.msgpack")
    raw = (tmp_path / "r.msgpack").read_bytes()
    assert result["conv"].histogram.astype("<f8").tobytes() in raw  # raw little-endian bytes, not a list
    assert result["dense"].bin_edges.astype("<f8").tobytes() in raw
    assert len(raw) < (tmp_path / "r.json").stat().st_size


def test_arrays_of_every_dtype_round_trip_exactly():
    rng = np.random.default_rng(0)
    tree = {
        "f64": np.array([1.0 / 3.0, np.inf, -np.inf, np.nan, -0.0, 5e-324]),
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f16": np.array([1.5, np.nan, 65504.0], np.float16),
        "i8": np.array([-128, 0, 127], np.int8), "u8": np.arange(256, dtype=np.uint8).reshape(16, 16),
        "i64": np.array([-(2**63), 2**63 - 1], np.int64), "u32": np.array([2**32 - 1], np.uint32),
        "b": np.array([True, False]), "empty": np.zeros((0, 3), np.float32), "scalar": np.float32(2.5),
        "big": np.array([1.0, 2.0], ">f8"),
    }
    for fmt in ("json", "msgpack"):
        back = decode_payload(encode_payload(tree, fmt), fmt)
        for key, arr in tree.items():
            if key == "scalar":
                assert back[key] == 2.5
                continue
            got = back[key]
            assert got.dtype == arr.dtype.newbyteorder("=") and got.shape == arr.shape
            np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(arr, arr.dtype.newbyteorder("=")).view(np.uint8))
    with pytest.raises(ConfigError):
        encode_payload({"o": np.array([object()], dtype=object)}, "msgpack")


def test_object_dtype_in_a_file_is_refused(tmp_path):
    import msgpack

    bad = {"metadata": {}, "layers": [{"name": "x", "histogram": {"__ndarray__": "|O", "shape": [1], "data": b"\0" * 8}}]}
    payload = msgpack.packb(bad, use_bin_type=True)
    header = {"schema_version": 1, "format": "msgpack", "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    path = tmp_path / "evil.msgpack"
    path.write_bytes(b"KQCAL " + json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(IntegrityError, match="not allowed"):
        CalibrationResult.load(path)


@pytest.mark.parametrize("suffix", [".json", ".msgpack", ".json.gz", ".msgpack.zst"])
def test_tampered_or_truncated_file_raises(suffix, sample, tmp_path):
    path = tmp_path / ("r" + suffix)
    full_result(sample).save(path)
    raw = path.read_bytes()
    for i in (len(raw) // 2, len(raw) - 3, 30):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError):
            CalibrationResult.load(path)
    for cut in (len(raw) - 1, len(raw) // 2, 5, 0):
        path.write_bytes(raw[:cut])
        with pytest.raises(IntegrityError):
            CalibrationResult.load(path)


def _rewrite_header(path, **changes):
    data = path.read_bytes()
    header, payload = data.split(b"\n", 1)
    h = json.loads(header[len(b"KQCAL "):])
    h.update(changes)
    path.write_bytes(b"KQCAL " + json.dumps(h).encode() + b"\n" + payload)


def test_unknown_schema_or_format_raises(sample, tmp_path):
    path = tmp_path / "r.json"
    full_result(sample).save(path)
    _rewrite_header(path, schema_version=2)
    with pytest.raises(IntegrityError, match="schema_version 2"):
        CalibrationResult.load(path)
    full_result(sample).save(path)
    _rewrite_header(path, format="pickle")
    with pytest.raises(IntegrityError, match="unknown format"):
        CalibrationResult.load(path)
    path.write_bytes(gzip.compress(b"not a calibration file"))
    with pytest.raises(IntegrityError, match="bad magic"):
        CalibrationResult.load(path)


def test_bad_suffix_or_options():
    result = CalibrationResult([])
    with pytest.raises(ConfigError, match="infer the format"):
        result.save("x.txt")
    with pytest.raises(ConfigError):
        result.save("x.json", compression="lz4")
    with pytest.raises(ConfigError):
        result.save("x.json", format="yaml")


def _leftovers(directory):
    return sorted(p for p in os.listdir(directory) if p.endswith(".tmp"))


def test_atomic_write_keeps_old_file_when_encoding_fails(sample, tmp_path, monkeypatch):
    path = tmp_path / "r.msgpack"
    full_result(sample).save(path)
    before = path.read_bytes()

    def broken(tree, fmt):
        raise RuntimeError("encoder failed midway")

    monkeypatch.setattr(kq_io, "encode_payload", broken)
    with pytest.raises(RuntimeError):
        CalibrationResult([make_stats(sample, name="new")]).save(path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_atomic_write_removes_partial_temp_file(sample, tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    full_result(sample).save(path)
    before = path.read_bytes()

    def failing_fsync(fd):
        assert os.fstat(fd).st_size > 0  # the partial new file exists on disk at this point
        raise OSError("disk full")

    monkeypatch.setattr(kq_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        CalibrationResult([make_stats(sample, name="new")]).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    assert CalibrationResult.load(path).layer_names == ["conv", "dense", "branch"]


def test_layer_statistics_dict_round_trip_and_unknown_field(sample):
    stats = make_stats(sample, spec=kq.QuantSpec(granularity="per_channel"))
    assert np.shape(stats.range_min) == (64,)
    back = LayerStatistics.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats
    np.testing.assert_array_equal(back.range_min, stats.range_min)
    with pytest.raises(ConfigError, match="unknown LayerStatistics field"):
        LayerStatistics.from_dict({**stats.to_dict(), "bogus": 1})


# --------------------------------------------------------------------------
# observer="auto": the per-layer choice, from the stored histogram.


def test_auto_range_and_choice_from_the_stored_histogram(sample, rng):
    spec = kq.QuantSpec(bits=4, observer="auto")
    heavy = make_stats(sample, name="heavy", spec=spec)
    uniform = make_stats(rng.uniform(-2.0, 3.0, size=(400, 64)), name="uniform", spec=spec)
    for stats in (heavy, uniform):
        expected = range_search.auto_range(stats.histogram, stats.bin_edges, spec)
        choice = stats.choose_method(spec)
        assert choice == expected
        assert stats.compute_range(spec) == expected.range == (stats.range_min, stats.range_max)
        scale, zp = stats.qparams(spec)
        ref_scale, ref_zp = range_search.qparams(*expected.range, spec)
        assert (scale, zp) == (ref_scale, ref_zp)
    assert uniform.choose_method(spec).method == "minmax"
    assert heavy.choose_method(spec).method in ("percentile", "mse", "kl")
    # The spec's options apply; `candidates=` overrides them; the spec's observer does not matter.
    only = kq.QuantSpec(bits=4, observer="auto", observer_options={"candidates": "kl", "tolerance": 0.0})
    assert heavy.compute_range(only) == range_search.kl_range(heavy.histogram, heavy.bin_edges, only)
    assert heavy.choose_method(only, candidates=("minmax",)).method == "minmax"
    assert heavy.choose_method(kq.QuantSpec(bits=4)) == heavy.choose_method(spec)


def test_choose_method_errors(sample):
    stats = make_stats(sample, spec=kq.QuantSpec(observer="auto"))
    with pytest.raises(ConfigError) as info:
        stats.choose_method(kq.QuantSpec(granularity="per_channel", observer="auto"))
    assert (info.value.field, info.value.layer) == ("granularity", "layer")
    with pytest.raises(ConfigError) as info:
        stats.choose_method(kq.QuantSpec(), candidates=("minmax", "best"))
    assert info.value.field == "candidates"
    with pytest.raises(ConfigError):
        stats.choose_method("auto")
    no_hist = LayerStatistics(name="r", count=10, min=-1.0, max=1.0, spec=kq.QuantSpec(observer="auto"))
    with pytest.raises(ConfigError) as info:
        no_hist.choose_method(kq.QuantSpec())
    assert info.value.field == "histogram"
    with pytest.raises(ConfigError):
        no_hist.compute_range(kq.QuantSpec(observer="auto"))
    with pytest.raises(NoDataError):
        LayerStatistics(name="empty").choose_method(kq.QuantSpec())


@pytest.mark.parametrize("suffix", [".json", ".msgpack.zst"])
def test_auto_calibration_round_trips(sample, tmp_path, suffix):
    spec = kq.QuantSpec(bits=4, symmetric=True, observer="auto", observer_options={"tolerance": 0.1})
    result = CalibrationResult([make_stats(sample, name="heavy", spec=spec)])
    path = tmp_path / f"auto{suffix}"
    result.save(path)
    loaded = CalibrationResult.load(path)
    assert loaded == result and loaded["heavy"].spec == spec
    assert loaded["heavy"].choose_method(spec) == result["heavy"].choose_method(spec)
    assert loaded.qparams("heavy", spec) == result.qparams("heavy", spec)


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """Not the temporary file's private 0600: what open(path, "wb") would give (0666 less the umask)."""
    import os

    from keras_quant.io import write_atomic

    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.bin", b"data")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "a.bin").read_bytes() == b"data" and os.listdir(tmp_path) == ["a.bin"]
    finally:
        os.umask(umask)
