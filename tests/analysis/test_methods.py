"""compare_methods: each range method's error per layer of a calibration, and observer="auto" end to end."""

import json

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.calibration.stats import LayerCollector
from keras_quant.errors import ConfigError, NoDataError
from keras_quant.ops import range_search
from tests.conftest import to_np

METHODS = ("minmax", "percentile", "mse", "kl")


def laplace_with_outliers(rng, shape):
    x = rng.laplace(size=shape).astype("float32")
    x.reshape(-1)[:3] = [40.0, -35.0, 60.0]
    return x


def collect(name, x, spec, statistics="full"):
    """A layer's statistics as the calibration gathers them (keras.ops, any backend)."""
    collector = LayerCollector(spec, name=name, statistics=statistics)
    for batch in np.array_split(np.asarray(x, np.float32), 4):
        collector(batch)
    return collector.to_statistics()


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    spec = kq.QuantSpec(bits=4, observer="auto")
    return CalibrationResult([
        collect("uniform", rng.uniform(-1.0, 1.0, size=(512, 16)), spec),
        collect("heavy", laplace_with_outliers(rng, (512, 16)), spec),
        collect("relu_heavy", np.maximum(laplace_with_outliers(rng, (512, 16)), 0.0), spec),
    ])


def sqnr_reference(stats, lo, hi, spec):
    """SQNR written out: bin centers weighted by counts, fake-quantized with the ops' qparams."""
    centers = 0.5 * (stats.bin_edges[:-1] + stats.bin_edges[1:])
    w = stats.histogram / stats.histogram.sum()
    scale, zp = kq.ops.compute_qparams(np.float32(lo), np.float32(hi), spec)
    s, z = float(to_np(scale)), float(to_np(zp))
    q = np.clip(np.floor(centers / s + 0.5) + z, spec.qmin, spec.qmax)
    noise = np.sum(w * (centers - (q - z) * s) ** 2)
    return 10 * np.log10(np.sum(w * centers**2) / noise)


def test_rows_choices_and_errors(result):
    spec = kq.QuantSpec(bits=4)
    cmp = kq.analysis.compare_methods(result, spec)
    assert isinstance(cmp, kq.analysis.MethodComparison)
    assert cmp.layers == ["uniform", "heavy", "relu_heavy"] and cmp.methods == METHODS
    assert len(cmp.rows) == 3 * 4
    assert [(r.layer, r.method) for r in cmp.rows[:4]] == [("uniform", m) for m in METHODS]
    assert cmp.choices["uniform"] == "minmax"
    assert cmp.choices["heavy"] in ("percentile", "mse", "kl")
    assert cmp.choices["relu_heavy"] in ("percentile", "mse", "kl")
    for name in result:
        stats = result[name]
        choice = range_search.auto_range(stats.histogram, stats.bin_edges, spec)
        assert cmp.choices[name] == choice.method
        for c in choice.candidates:
            row = cmp.row(name, c.method)
            assert (row.min, row.max, row.mse) == (c.min, c.max, c.mse) == (c.min, c.max, cmp.error(name, c.method))
            assert row.sqnr_db == pytest.approx(sqnr_reference(stats, c.min, c.max, spec), rel=1e-6)
            assert row.chosen == (c.method == choice.method)
    # The error of the heavy layer's output with its clipped range is a fraction of min-max's.
    assert cmp.error("heavy", cmp.choices["heavy"]) < 0.5 * cmp.error("heavy", "minmax")
    assert cmp.sqnr("uniform", "minmax") == pytest.approx(6.02 * 4, abs=1.5)  # about 6 dB per bit, uniform signal
    with pytest.raises(KeyError):
        cmp.error("heavy", "entropy")


def test_default_spec_is_int8_activations_with_the_observer_ignored(result):
    cmp = kq.analysis.compare_methods(result)
    assert cmp.spec == kq.QuantConfig.int8().activations
    # The stored spec says 4 bits / auto; the comparison judges on its own spec's 8-bit grid.
    stats = result["heavy"]
    assert cmp.choices["heavy"] == stats.choose_method(kq.QuantSpec(bits=8)).method
    assert cmp.error("heavy", "mse") == pytest.approx(
        range_search.expected_mse(stats.histogram, stats.bin_edges, *range_search.mse_range(
            stats.histogram, stats.bin_edges, kq.QuantSpec(bits=8)), kq.QuantSpec(bits=8)), rel=1e-12)
    mse_spec = kq.QuantSpec(bits=4, observer="mse")
    assert kq.analysis.compare_methods(result, mse_spec).choices == kq.analysis.compare_methods(
        result, kq.QuantSpec(bits=4)).choices


def test_methods_layers_and_tolerance(result):
    cmp = kq.analysis.compare_methods(result, kq.QuantSpec(bits=4), methods="mse,minmax", layers=["uniform"])
    assert cmp.layers == ["uniform"] and cmp.methods == ("mse", "minmax")
    assert cmp.choices == {"uniform": "mse"}  # the earliest method within the tolerance
    strict = kq.analysis.compare_methods(result, kq.QuantSpec(bits=4), tolerance=0.0)
    for name in strict.layers:
        assert strict.error(name, strict.choices[name]) == min(strict.error(name, m) for m in METHODS)
    spec = kq.QuantSpec(bits=4, observer="auto", observer_options={"tolerance": 0.0})
    assert kq.analysis.compare_methods(result, spec).tolerance == 0.0


def test_to_dict_is_json_for_a_heatmap(result):
    cmp = kq.analysis.compare_methods(result, kq.QuantSpec(bits=4))
    d = json.loads(json.dumps(cmp.to_dict(), allow_nan=False))
    assert d["methods"] == list(METHODS) and d["choices"] == cmp.choices
    assert d["spec"] == kq.QuantSpec(bits=4).get_config()
    layer = d["layers"][1]
    assert layer["name"] == "heavy" and layer["choice"] == cmp.choices["heavy"]
    for m in METHODS:
        assert layer[f"{m}_sqnr_db"] == pytest.approx(cmp.sqnr("heavy", m))
        assert layer[f"{m}_mse"] == pytest.approx(cmp.error("heavy", m))
    assert len(d["rows"]) == 12 and set(d["rows"][0]) == {"layer", "method", "min", "max", "mse", "sqnr_db", "chosen"}


def test_table_text(result):
    cmp = kq.analysis.compare_methods(result, kq.QuantSpec(bits=4))
    text = str(cmp)
    assert text == cmp.table()
    lines = text.splitlines()
    assert lines[1].split() == ["layer", "minmax_sqnr_db", "percentile_sqnr_db", "mse_sqnr_db", "kl_sqnr_db", "choice"]
    assert lines[3].split()[0] == "uniform" and lines[3].split()[-1] == "minmax"
    assert len(lines) == 3 + 3


def test_layers_without_data_or_histogram_are_skipped(result):
    spec = kq.QuantSpec(bits=8)
    layers = dict(result)
    layers["branch"] = LayerStatistics(name="branch", spec=spec)  # no sample reached it
    layers["cheap"] = collect("cheap", np.ones((8, 4)), spec, statistics="range")  # minmax: no histogram
    cmp = kq.analysis.compare_methods(CalibrationResult(layers), spec)
    assert cmp.layers == ["uniform", "heavy", "relu_heavy"]
    assert set(cmp.skipped) == {"branch", "cheap"} and "skipped branch" in cmp.table()
    with pytest.raises(NoDataError):
        kq.analysis.compare_methods(CalibrationResult(layers), spec, layers=["branch"])
    with pytest.raises(ConfigError) as info:
        kq.analysis.compare_methods(CalibrationResult(layers), spec, layers=["cheap"])
    assert info.value.field == "histogram"
    with pytest.raises(NoDataError):
        kq.analysis.compare_methods(CalibrationResult(layers), spec, layers=["missing"])
    with pytest.raises(NoDataError):
        kq.analysis.compare_methods(CalibrationResult([layers["branch"]]), spec)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"methods": ("minmax", "median")}, "methods"),
        ({"methods": ()}, "methods"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"spec": kq.QuantSpec(granularity="per_channel")}, "spec"),
        ({"spec": "int8"}, "spec"),
    ],
)
def test_invalid(result, kwargs, field):
    with pytest.raises(ConfigError) as info:
        kq.analysis.compare_methods(result, **kwargs)
    assert info.value.field == field


def test_calibration_must_be_a_result():
    with pytest.raises(ConfigError) as info:
        kq.analysis.compare_methods([1, 2])
    assert info.value.field == "calibration"


# --------------------------------------------------------------------------
# End to end: CalibrationCallback with observer="auto" -> quantize_model (PTQ and QAT) -> compare_methods.


def two_branch_model():
    """A uniform input through an identity Dense, and a heavy-tailed one through an identity Dense + ReLU."""
    keras.utils.set_random_seed(0)
    u = keras.Input((16,), name="u")
    h = keras.Input((16,), name="h")
    eye = keras.initializers.Identity()
    a = keras.layers.Dense(16, kernel_initializer=eye, name="uniform_dense")(u)
    b = keras.layers.Dense(16, kernel_initializer=eye, activation="relu", name="heavy_relu")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.Concatenate(name="cat")([a, b]))
    return keras.Model([u, h], out)


@pytest.mark.tensorflow  # the callback hooks TensorFlow's trainer
def test_auto_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = [rng.uniform(-1.0, 1.0, size=(512, 16)).astype("float32"), laplace_with_outliers(rng, (512, 16))]
    model = two_branch_model()
    spec = kq.QuantSpec(bits=4, observer="auto")
    config = kq.QuantConfig(activations=spec)
    cb = kq.CalibrationCallback(config=config)
    model.predict(x, batch_size=128, callbacks=[cb], verbose=0)
    path = tmp_path / "auto.msgpack"
    cb.result.save(path)
    result = kq.CalibrationResult.load(path)
    assert result == cb.result

    uniform, heavy = result["uniform_dense"], result["heavy_relu"]
    assert uniform.choose_method(spec).method == "minmax"
    assert heavy.choose_method(spec).method in ("percentile", "mse", "kl")
    assert (uniform.range_min, uniform.range_max) == (uniform.min, uniform.max)
    assert heavy.range_max < heavy.max / 1.5 and heavy.max == pytest.approx(60.0)

    cmp = kq.analysis.compare_methods(result, spec)
    assert cmp.choices == {name: result[name].choose_method(spec).method for name in result}

    qmodel = kq.quantize_model(model, config, calibration=result)
    # Both branches are read only by the Concatenate, so the PTQ model writes them on its (auto) range, as
    # TFLite does; the head reads its own.
    ref = {"uniform_dense": "cat", "heavy_relu": "cat", "head": "head"}
    assert result["cat"].choose_method(spec).method != "minmax"
    for name, key in ref.items():
        scale, zp = (to_np(v) for v in qmodel.get_layer(name).output_qparams)
        ref_scale, ref_zp = result.qparams(key, spec)
        assert float(scale) == pytest.approx(float(ref_scale)) and int(zp) == int(ref_zp)
    y, y_q = model.predict(x, verbose=0), qmodel.predict(x, verbose=0)
    assert np.isfinite(y_q).all() and np.mean((y - y_q) ** 2) < np.mean(y**2)

    # QAT starts from the calibration's auto ranges, then observes moving min / max as with every observer.
    # (The two branches meet in a Concatenate, whose inputs share one quantizer in QAT: check the head.)
    assert result["head"].choose_method(spec).method != "minmax"
    qat_model = kq.quantize_model(model, config, calibration=result, mode="qat")
    scale, zp = (to_np(v) for v in qat_model.get_layer("head").output_qparams)
    ref_scale, ref_zp = result.qparams("head", spec)
    assert float(scale) == pytest.approx(float(ref_scale)) and int(zp) == int(ref_zp)
