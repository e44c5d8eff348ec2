"""Export of each quantizable layer type, and the inference form's activation op against kq.ops.fake_quant."""

import hypothesis.strategies as st
import keras
import numpy as np
import pytest
from hypothesis import given, settings

import keras_quant as kq
from keras_quant import runtime
from keras_quant.layers import inference
from tests.export import models

pytestmark = pytest.mark.tensorflow

L = keras.layers


def _single(build, shape, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape, name="x")
    return keras.Model(inp, build(inp))


CASES = {
    "conv1d": (lambda x: L.Conv1D(6, 3, activation="relu", name="c")(x), (12, 4)),
    "conv2d_transpose": (lambda x: L.Conv2DTranspose(5, 3, strides=2, name="c")(x), (6, 6, 3)),
    "depthwise_multiplier_2": (lambda x: L.DepthwiseConv2D(3, depth_multiplier=2, name="c")(x), (8, 8, 3)),
    "dense_on_sequence": (lambda x: L.Dense(7, name="c")(x), (5, 6)),
    "concat_of_convs": (
        lambda x: L.Concatenate(name="cat")([L.Conv2D(4, 1, name="a")(x), L.Conv2D(3, 3, padding="same", name="b")(x)]),
        (6, 6, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_layer_type_exports_full_integer(name, tmp_path):
    build, shape = CASES[name]
    model = _single(build, shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64,) + shape).astype("float32")
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=models.calibrate(model, x))
    path = tmp_path / f"{name}.tflite"
    report = kq.export_tflite(qmodel, path)
    assert report.float_ops == () and "DEQUANTIZE" not in report.ops
    runner = runtime.load(path)
    got, want = runner.predict(x), qmodel.predict(x, verbose=0)
    assert models.output_steps(want, got, runner.output_quantization[0]) <= 1.0 + 1e-4
    onnx_path = tmp_path / f"{name}.onnx"
    kq.export_onnx(qmodel, onnx_path)
    onnx_runner = runtime.load(onnx_path)
    assert models.output_steps(want, onnx_runner.predict(x), onnx_runner.output_quantization[0]) <= 1.0 + 1e-4


def test_two_input_model(tmp_path):
    keras.utils.set_random_seed(0)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    y = L.Add(name="add")([L.Dense(4, name="da")(a), L.Dense(4, name="db")(b)])
    model = keras.Model([a, b], L.Dense(3, name="out")(y))
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(32, 6)).astype("float32") for _ in range(2)]
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=models.calibrate(model, xs))
    kq.export_tflite(qmodel, tmp_path / "two.tflite", input_type="float32", output_type="float32")
    got, want = runtime.load(tmp_path / "two.tflite").predict(xs), qmodel.predict(xs, verbose=0)
    assert np.abs(got - want).max() <= 2.5 * float(qmodel.get_layer("out").output_qparams[0])


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    lo=st.floats(-4.0, 0.0),
    width=st.floats(0.05, 8.0),
    seed=st.integers(0, 2**16),
)
def test_activation_op_is_fake_quant_on_the_spec_grid(bits, symmetric, lo, width, seed):
    """TF fake-quant on the int8 storage grid, clipped to a narrower grid, equals the spec's fake_quant."""
    spec = kq.QuantSpec(bits=bits, symmetric=symmetric)
    scale, zero_point = (float(np.asarray(v)) for v in kq.ops.compute_qparams(np.float32(lo), np.float32(lo + width), spec))
    x = np.random.default_rng(seed).uniform(lo - width, lo + 2 * width, size=256).astype("float32")
    got = keras.ops.convert_to_numpy(inference.activation_op(x, spec, scale, int(zero_point), 8))
    want = keras.ops.convert_to_numpy(kq.ops.fake_quant(x, np.float32(scale), np.int32(zero_point), spec))
    np.testing.assert_allclose(got, want, atol=1e-6 * max(1.0, abs(lo) + width))
    assert len(np.unique(got)) <= 2**bits


@pytest.mark.parametrize("activation,op", [("softmax", "SOFTMAX"), ("sigmoid", "LOGISTIC"), ("tanh", "TANH")])
def test_a_layer_with_its_own_activation_runs_that_op_in_integers(activation, op, tmp_path):
    """Dense(activation="softmax"): the wrapper also quantizes the logits, which TFLite's SOFTMAX reads."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), name="x")
    x = L.Dense(8, activation="relu", name="hidden")(inp)
    model = keras.Model(inp, L.Dense(4, activation=activation, name="out")(x))
    x_data = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    calibration = models.calibrate(model, x_data)
    assert "out:preactivation" in calibration.layer_names
    assert model.get_layer("out").activation.__name__ == activation  # the callback put it back
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)
    assert ("out:preactivation", "out:preactivation") in qmodel.quantization_report.activation_quantizers
    report = kq.export_tflite(qmodel, tmp_path / "head.tflite")
    assert report.ops[op] == 1 and report.float_ops == () and "DEQUANTIZE" not in report.ops
    runner = runtime.load(tmp_path / "head.tflite")
    got, want = runner.predict(x_data), qmodel.predict(x_data, verbose=0)
    assert models.output_steps(want, got, runner.output_quantization[0]) <= 1.0 + 1e-4
    onnx_runner = runtime.load(kq.export_onnx(qmodel, tmp_path / "head.onnx").path)
    assert models.output_steps(want, onnx_runner.predict(x_data), onnx_runner.output_quantization[0]) <= 1.0 + 1e-4
