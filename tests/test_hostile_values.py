"""Hostile values and faults (issue 17, point 5): what keras_quant refuses, with which typed error, and what it survives.

Non-finite / float32-overflowing ranges end in `NonFiniteError` before a model
or a file exists; `num_bins` and a weight `axis` are checked where they enter;
`.keras` files load in safe mode whatever `keras.config` says; an in-memory
Lambda quantizes; a calibration call that raises leaves the model as it was.
"""

import os

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.errors import ConfigError, NoDataError, NonFiniteError
from keras_quant.ops.checks import check_qparams

SPEC8 = kq.QuantSpec(bits=8)


def _dense_model(units=3, features=4):
    inp = keras.Input((features,), name="x")
    return keras.Model(inp, keras.layers.Dense(units, name="dense")(inp))


def _calibrate(model, x, **kwargs):
    cb = kq.CalibrationCallback(**kwargs)
    model.predict(x, callbacks=[cb], verbose=0)
    return cb.result


def _result(model, ranges):
    """An in-memory CalibrationResult: `{key: (min, max)}` as minmax statistics."""
    layers = {key: LayerStatistics(name=key, count=100, min=lo, max=hi, spec=SPEC8) for key, (lo, hi) in ranges.items()}
    return CalibrationResult(layers)


# check_qparams ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi", [(-np.inf, 1.0), (np.nan, 1.0), (0.0, np.inf), (-3e38, 3e38)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_check_qparams_refuses_non_finite_and_overflowing_ranges(lo, hi, symmetric):
    spec = kq.QuantSpec(bits=8, symmetric=symmetric)
    scale, zero_point = kq.ops.numpy_qparams(np.float32(lo), np.float32(hi), spec)
    with pytest.raises(NonFiniteError) as info:
        check_qparams(scale, zero_point, spec, layer="conv")
    assert info.value.layer == "conv" and "scale" in info.value.field and "conv" in str(info.value)


def test_check_qparams_accepts_wide_finite_ranges_and_returns_arrays():
    spec = kq.QuantSpec(bits=8)
    scale, zero_point = check_qparams(*kq.ops.numpy_qparams(np.float32(-1e37), np.float32(1e37), spec), spec)
    assert scale.dtype == np.float32 and np.isfinite(scale) and zero_point.dtype == np.int32
    # numpy reference: the grid's ends are finite in float32
    assert np.isfinite(np.float32(spec.qmax - spec.qmin) * scale)


def test_check_qparams_refuses_absurd_scale_and_zero_point():
    with pytest.raises(ConfigError, match="positive"):
        check_qparams(np.float32(0.0), 0, SPEC8, layer="x")
    with pytest.raises(ConfigError, match="zero point"):
        check_qparams(np.float32(0.1), 300, SPEC8, layer="x")


# quantize_model and export ----------------------------------------------------------------------------------------
@pytest.mark.tensorflow
def test_huge_inputs_end_in_non_finite_error_before_a_model_is_built():
    model = _dense_model()
    x = np.random.default_rng(0).uniform(-3e38, 3e38, (32, 4)).astype("float32")
    x[0, 0], x[1, 0] = 3e38, -3e38
    result = _calibrate(model, x)
    with pytest.raises(NonFiniteError) as info:
        kq.quantize_model(model, kq.QuantConfig(), calibration=result)
    message = str(info.value)
    assert info.value.layer == "x"
    assert "scale" in info.value.field and "inf" in message and "3" in message  # the value and the range seen


@pytest.mark.parametrize("ranges", [{"dense": (-np.inf, 1.0)}, {"dense": (np.nan, 1.0)}, {"dense": (-3e38, 3e38)}])
def test_in_memory_results_with_non_finite_ranges_are_refused(ranges):
    model = _dense_model()
    result = _result(model, {"x": (-1.0, 1.0), **ranges})
    config = kq.QuantConfig(activations=SPEC8)
    with pytest.raises(NonFiniteError) as info:
        kq.quantize_model(model, config, calibration=result)
    assert info.value.layer == "dense"


def test_non_finite_weights_are_refused_by_quantize_model():
    model = _dense_model()
    kernel, bias = model.get_weights()
    kernel[0, 1] = np.inf
    model.set_weights([kernel, bias])
    with pytest.raises(NonFiniteError) as info:
        kq.quantize_model(model, kq.QuantConfig(activations=None))
    assert info.value.layer == "dense" and "kernel" in info.value.field


@pytest.mark.tensorflow
def test_export_refuses_a_model_whose_scales_were_set_non_finite(tmp_path):
    model = _dense_model()
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    qmodel = kq.quantize_model(model, kq.QuantConfig(), calibration=_calibrate(model, x))
    quantizer = next(layer for layer in qmodel.layers if isinstance(layer, kq.ActivationQuantizer))
    quantizer.scale.assign(np.float32(np.inf))
    for export in (lambda p: kq.export_tflite(qmodel, p), lambda p: kq.export_onnx(qmodel, p)):
        path = tmp_path / "m.bin"
        with pytest.raises(NonFiniteError) as info:
            export(str(path))
        assert info.value.layer == quantizer.name and not path.exists()


# num_bins --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda n: kq.observers.HistogramObserver(num_bins=n),
    lambda n: kq.CalibrationCallback(num_bins=n),
    lambda n: kq.calibration.stats.LayerCollector(spec=SPEC8, num_bins=n, statistics="range"),
    lambda n: kq.QuantSpec(observer="percentile", observer_options={"num_bins": n}),
])
@pytest.mark.parametrize("num_bins", [2 * 10 ** 7, 2 ** 16 + 1, 4, 2.5, True])
def test_num_bins_is_bounded_at_construction(make, num_bins):
    with pytest.raises(ConfigError, match="num_bins"):
        make(num_bins)


def test_num_bins_upper_bound_itself_is_accepted():
    from keras_quant.config import MAX_BINS

    assert MAX_BINS == 2 ** 16
    assert kq.observers.HistogramObserver(num_bins=MAX_BINS).num_bins == MAX_BINS
    assert kq.CalibrationCallback(num_bins=MAX_BINS).num_bins == MAX_BINS


# weight axis -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
@pytest.mark.parametrize("axis", [0, 5, -3])
def test_a_weight_axis_other_than_the_output_channels_is_refused(axis, granularity):
    model = _dense_model(units=4, features=8)
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity=granularity, axis=axis,
                        group_size=4 if granularity == "per_group" else None)
    for mode in ("ptq", "qat"):
        with pytest.raises(ConfigError) as info:
            kq.quantize_model(model, kq.QuantConfig(weights=spec, activations=None), mode=mode)
        assert info.value.layer == "dense" and info.value.field == "weights.axis" and info.value.value == axis


@pytest.mark.parametrize("axis", [-1, 1])
def test_the_output_channel_axis_is_honoured_in_either_sign(axis):
    model = _dense_model(units=3, features=8)
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel", axis=axis)
    qmodel = kq.quantize_model(model, kq.QuantConfig(weights=spec, activations=None))
    scale = next(w for w in qmodel.weights if w.name == "kernel_scale")
    kernel = model.get_weights()[0]
    # numpy reference: symmetric per-output-channel scale max|w| / 127
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scale), np.abs(kernel).max(axis=0) / 127, rtol=1e-6)


def test_depthwise_default_axis_still_follows_the_rule():
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, keras.layers.DepthwiseConv2D(3, name="dw")(inp))
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    qmodel = kq.quantize_model(model, kq.QuantConfig(weights=spec, activations=None))
    assert tuple(next(w for w in qmodel.weights if w.name.endswith("kernel_scale")).shape) == (3,)
    with pytest.raises(ConfigError, match="weights.axis"):
        kq.quantize_model(model, kq.QuantConfig(weights=spec.replace(axis=0), activations=None))


# Lambda: in memory quantizes, files load in safe mode ------------------------------------------------------------
def _lambda_model():
    inp = keras.Input((8,))
    h = keras.layers.Dense(4, name="d1")(inp)
    h = keras.layers.Lambda(lambda v: v * 2.0 + 1.0, name="twice")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="d2")(h))


@pytest.mark.tensorflow
@pytest.mark.slow
def test_in_memory_lambda_quantizes_and_exports(tmp_path):
    model = _lambda_model()
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    with pytest.warns(UserWarning, match="twice"):
        qmodel = kq.quantize_model(model, kq.QuantConfig(), calibration=_calibrate(model, x))
    assert "twice" in qmodel.quantization_report.unsupported  # kept float; its output quantized for d2
    ref = model.predict(x, verbose=0)
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), ref, atol=0.1 * np.abs(ref).max())
    kq.export_tflite(qmodel, str(tmp_path / "m.tflite"), strict=False)
    out = kq.runtime.load(str(tmp_path / "m.tflite")).predict(x)
    np.testing.assert_allclose(out, ref, atol=0.1 * np.abs(ref).max())


@pytest.mark.tensorflow
def test_lambda_file_is_refused_even_with_unsafe_deserialization_enabled(tmp_path):
    from keras.src.saving import serialization_lib

    marker = tmp_path / "ran"
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda v, path: (open(path, "w").close(), v * 2.0)[1], name="evil",
                              arguments={"path": str(marker)})(inp)
    path = str(tmp_path / "evil.keras")
    keras.Model(inp, out).save(path)
    if marker.exists():
        os.remove(marker)
    before = serialization_lib.in_safe_mode()
    keras.config.enable_unsafe_deserialization()
    try:
        with pytest.raises(ConfigError) as info:
            kq.runtime.load(path)
        assert info.value.layer == "evil" and "Lambda" in str(info.value)
        from keras_quant.cli.common import load_model

        with pytest.raises(ConfigError, match="Lambda"):
            load_model(path)
    finally:
        serialization_lib.SafeModeScope(before).__enter__()  # restore the process-wide setting as it was
    assert serialization_lib.in_safe_mode() == before
    assert not marker.exists(), "the Lambda's code ran while loading"


@pytest.mark.tensorflow
def test_plain_keras_file_still_loads(tmp_path):
    model = _dense_model()
    path = str(tmp_path / "m.keras")
    model.save(path)
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(kq.runtime.load(path).predict(x), model.predict(x, verbose=0), rtol=1e-6)


# Calibration faults ----------------------------------------------------------------------------------------------
def _hooked(model, cb):
    return cb._attached is not None or "predict_step" in model.__dict__ or "make_predict_function" in model.__dict__


@pytest.mark.tensorflow
def test_empty_calibration_array_is_no_data_error_and_leaves_model_unhooked():
    model = _dense_model()
    cb = kq.CalibrationCallback()
    with pytest.raises(NoDataError, match="0 samples"):
        model.predict(np.zeros((0, 4), "float32"), callbacks=[cb], verbose=0)
    assert not _hooked(model, cb)
    x = np.random.default_rng(2).normal(size=(8, 4)).astype("float32")
    model.predict(x, callbacks=[cb], verbose=0)
    assert cb.samples_seen == 8


class _Boom(keras.callbacks.Callback):
    def on_predict_batch_end(self, batch, logs=None):
        raise RuntimeError("boom")


@pytest.mark.tensorflow
def test_a_call_that_raises_leaves_the_model_as_it_was():
    model = _dense_model()
    x = np.random.default_rng(3).normal(size=(16, 4)).astype("float32")
    ref = model.predict(x, verbose=0)
    cb = kq.CalibrationCallback()
    with pytest.raises(Exception):  # inside the step (a wrong shape): the step function detaches
        model.predict(np.zeros((4, 4, 2), "float32"), callbacks=[cb], verbose=0)
    assert not _hooked(model, cb) and "call" not in model.layers[1].__dict__
    with pytest.raises(RuntimeError, match="boom"):  # between steps: Keras skips on_predict_end
        model.predict(x, callbacks=[cb, _Boom()], verbose=0)
    seen = cb.samples_seen
    np.testing.assert_array_equal(model.predict(x, verbose=0), ref)  # the next call detaches first
    assert not _hooked(model, cb) and cb.samples_seen == seen
    model.predict(x, callbacks=[cb], verbose=0)
    assert cb.samples_seen == seen + 16 and not _hooked(model, cb)
