"""kq.export_onnx: QDQ ONNX with keras_quant's scales, checked by onnx.checker and run in onnxruntime."""

import numpy as np
import pytest

import keras_quant as kq
from keras_quant import runtime
from keras_quant.errors import ConfigError, ExportError
from tests.export import models

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model, (x_train, _), (x_test, y_test) = models.trained()
    calibration = models.calibrate(model, x_train[:512])
    return model, calibration, x_test, y_test


@pytest.fixture(scope="module")
def ptq(setup):
    model, calibration, _, _ = setup
    return kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)


def initializers(proto):
    return {i.name: i for i in proto.graph.initializer}


def test_qdq_model_with_per_channel_weights(setup, ptq, tmp_path):
    model, calibration, x_test, y_test = setup
    path = tmp_path / "model.onnx"
    report = kq.export_onnx(ptq, path, opset=17)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inits = initializers(proto)
    nodes = list(proto.graph.node)
    weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    per_channel = [n for n in weight_dq if numpy_helper.to_array(inits[n.input[1]]).size > 1]
    kernels = [n for n in per_channel if numpy_helper.to_array(inits[n.input[0]]).dtype == np.uint8]
    biases = [n for n in per_channel if numpy_helper.to_array(inits[n.input[0]]).dtype == np.int32]
    assert len(kernels) == 6 and len(biases) == 6  # conv1, dw, pw, conv2, fc, logits
    for n in kernels:  # uint8 with zero point 128: the symmetric int8 grid shifted (onnxruntime's U8U8)
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.int16)
        assert np.all(numpy_helper.to_array(inits[n.input[2]]) == 128)
        assert np.abs(q - 128).max() <= 127  # narrow range
        assert [a.i for a in n.attribute if a.name == "axis"] in ([0], [1])
    # Compute ops read dequantized tensors only: every Conv / Gemm input comes from a DequantizeLinear.
    producers = {o: n for n in nodes for o in n.output}
    for n in nodes:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            assert all(producers[i].op_type == "DequantizeLinear" for i in n.input[:2]), n.name
    # Activation scales and zero points are the calibration's.
    spec = kq.QuantConfig.int8().activations
    # Activations are uint8 (onnxruntime's U8S8 layout): the same grid, zero point + 128.
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in nodes if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)
    q_params = {
        (float(numpy_helper.to_array(inits[n.input[1]])), int(numpy_helper.to_array(inits[n.input[2]])) - 128)
        for n in nodes if n.op_type == "QuantizeLinear"
    }
    for layer, key in ptq.quantization_report.activation_quantizers:
        scale, zero_point = (float(np.asarray(v).reshape(-1)[0]) for v in calibration.qparams(key, spec))
        assert any(z == int(zero_point) and s == pytest.approx(scale, rel=1e-6) for s, z in q_params), layer
    # onnxruntime agrees with the Keras model.
    runner = runtime.load(path)
    got, want = runner.predict(x_test), ptq.predict(x_test, verbose=0)
    step = runner.output_quantization[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert models.output_steps(want, got, step) <= 2.0 + 1e-4
    assert report.format == "onnx" and report.size_bytes == path.stat().st_size
    assert report.input_type == "float32" and report.ops["QuantizeLinear"] >= 7


def test_4_bit_weights_use_int4_from_opset_21(setup, tmp_path):
    model, calibration, x_test, _ = setup
    qmodel = kq.quantize_model(model, kq.QuantConfig.w4a8(), calibration=calibration)
    new = kq.export_onnx(qmodel, tmp_path / "w4_21.onnx", opset=21)
    old = kq.export_onnx(qmodel, tmp_path / "w4_17.onnx", opset=17)
    proto = onnx.load(str(tmp_path / "w4_21.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    int4 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= 6
    assert any("INT4" in n for n in new.notes) and any("no 4-bit type" in n for n in old.notes)
    assert new.size_bytes < old.size_bytes
    want = qmodel.predict(x_test, verbose=0)
    kq.export_tflite(qmodel, tmp_path / "w4.tflite")
    tflite = runtime.load(tmp_path / "w4.tflite").predict(x_test)
    for name in ("w4_21", "w4_17"):
        runner = runtime.load(tmp_path / f"{name}.onnx")
        got = runner.predict(x_test)
        step = runner.output_quantization[0]
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99, name
        assert models.within_steps(want, got, step), name
        assert models.output_steps(tflite, got, step) <= 1.0 + 1e-4, name  # the two integer runtimes agree


def test_onnx_errors(setup, ptq, tmp_path):
    model, calibration, _, _ = setup
    with pytest.raises(ConfigError, match="opset"):
        kq.export_onnx(ptq, tmp_path / "old.onnx", opset=10)
    with pytest.raises(ExportError, match="activations.bits"):
        kq.export_onnx(kq.quantize_model(model, kq.QuantConfig.int16x8(), calibration=calibration),
                       tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def optimized_ops(path, tmp_path):
    """The op types of the graph onnxruntime runs after its optimizations (QDQ fusion included)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_onnxruntime_runs_the_cnn_in_integer_kernels(setup, ptq, tmp_path):
    """Every Conv, the residual Add and both Dense layers are fused into integer kernels."""
    _, _, x_test, _ = setup
    kq.export_onnx(ptq, tmp_path / "u8.onnx")
    ops = optimized_ops(tmp_path / "u8.onnx", tmp_path)
    assert ops.count("QLinearConv") == 4 and ops.count("QLinearAdd") == 1 and ops.count("QGemm") == 2, ops
    assert not {"Conv", "Gemm", "MatMul", "Add", "FusedConv", "FusedGemm"} & set(ops), ops
    # int8 activations compute the same values (onnxruntime fuses less of that layout).
    kq.export_onnx(ptq, tmp_path / "s8.onnx", activation_type="int8")
    proto = onnx.load(str(tmp_path / "s8.onnx"))
    inits = initializers(proto)
    assert all(numpy_helper.to_array(inits[n.input[2]]).dtype == np.int8
               for n in proto.graph.node if n.op_type == "QuantizeLinear")
    np.testing.assert_array_equal(runtime.load(tmp_path / "s8.onnx").predict(x_test[:64]),
                                  runtime.load(tmp_path / "u8.onnx").predict(x_test[:64]))
    with pytest.raises(ConfigError, match="activation_type"):
        kq.export_onnx(ptq, tmp_path / "bad.onnx", activation_type="int16")


def test_onnxruntime_fuses_a_flatten_dense_head(tmp_path):
    """Reshape / Transpose on int8 get their own QDQ pair, so onnxruntime fuses the layers around them.

    tf2onnx writes Flatten as QuantizeLinear -> Transpose / Reshape (int8) -> DequantizeLinear,
    which onnxruntime does not fuse: the Dense after it ran in float, dequantizing its weights on
    every call.
    """
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    xs = np.random.default_rng(0).uniform(size=(32, 12, 12, 1)).astype("float32")
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=models.calibrate(model, xs))
    path = tmp_path / "head.onnx"
    kq.export_onnx(qmodel, path)
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 1 and ops.count("QLinearMatMul") + ops.count("QGemm") == 2, ops
    assert not {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"} & set(ops), ops
    runner = runtime.load(path)
    assert models.output_steps(qmodel.predict(xs, verbose=0), runner.predict(xs), runner.output_quantization[0]) <= 1.0 + 1e-4


def test_layer_norm_at_1x1_spatial_runs_in_onnxruntime(tmp_path):
    """LayerNormalization on a 1x1 feature map, then a residual Add (ConvNeXt's last stage at 32x32 input).

    TFLite's SQUARED_DIFFERENCE becomes `Sub` then `Mul(d, d)` in tf2onnx, whose transpose optimizer
    left that Mul's NHWC shape on its NCHW output and then replaced a 1x1 Transpose by a Reshape to
    the wrong shape: the file loaded, and onnxruntime's QLinearAdd failed at run time
    ("Attempting to broadcast an axis by a dimension other than 1").
    """
    import keras
    import onnxruntime as ort

    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(8, 4, name="stem")(inp)  # 1x1 spatial
    y = keras.layers.LayerNormalization(epsilon=1e-6, name="ln")(x)
    y = keras.layers.Dense(8, name="pw")(y)
    x = keras.layers.Add(name="residual")([x, y])
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(keras.layers.Flatten()(x)))
    xs = np.random.default_rng(0).normal(size=(32, 4, 4, 3)).astype("float32")
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=models.calibrate(model, xs))
    path = tmp_path / "layer_norm_1x1.onnx"
    kq.export_onnx(qmodel, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: xs})
    assert got.shape == (32, 4)
    assert "QLinearAdd" in optimized_ops(path, tmp_path)  # the residual Add stays integer
    runner = runtime.load(path)
    want = qmodel.predict(xs, verbose=0)
    assert models.output_steps(want, got, runner.output_quantization[0]) <= 2.0 + 1e-4
    np.testing.assert_array_equal(runner.predict(xs), got)


def test_full_range_weights_do_not_saturate_onnxruntime(tmp_path):
    """Large activations against large weights: exact with uint8 weights on every CPU.

    onnxruntime's int8-weight (U8S8) kernels add pairs of u8 * s8 products in saturating int16
    on x86 CPUs without VNNI; the default uint8 weights (U8U8) never saturate. Both files hold
    the same grid, and the int8 one is still written on request (signed weights, zero point 0).
    """
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 4))
    model = keras.Model(inp, keras.layers.Conv1D(6, 3, activation="relu")(inp))
    kernel = np.random.default_rng(1).choice([-1.0, 1.0], size=(3, 4, 6)).astype("float32")  # |q| = 127 everywhere
    model.layers[-1].kernel.assign(kernel)
    x = np.abs(np.random.default_rng(0).normal(size=(64, 12, 4))).astype("float32") * np.sign(kernel[0, :, 0])
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=models.calibrate(model, x))
    want = qmodel.predict(x, verbose=0)
    report = kq.export_onnx(qmodel, tmp_path / "u8.onnx")
    assert any("uint8 with zero point 128" in n for n in report.notes)
    runner = runtime.load(tmp_path / "u8.onnx")
    assert models.output_steps(want, runner.predict(x), runner.output_quantization[0]) <= 1.0 + 1e-4
    kq.export_onnx(qmodel, tmp_path / "s8.onnx", weight_type="int8")
    proto = onnx.load(str(tmp_path / "s8.onnx"))
    inits = initializers(proto)
    kernels = [numpy_helper.to_array(inits[n.input[0]]) for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and numpy_helper.to_array(inits[n.input[0]]).ndim > 1]
    assert kernels and all(k.dtype == np.int8 and np.abs(k).max() == 127 for k in kernels)
    with pytest.raises(ConfigError, match="weight_type"):
        kq.export_onnx(qmodel, tmp_path / "bad.onnx", weight_type="int4")
