"""kq.export_tflite: full-integer, 16x8, dynamic-range and float16 files, read back in LiteRT.

The files are checked with the LiteRT interpreter itself (`ai_edge_litert`):
its op list and tensor quantization, and its outputs against the Keras
quantized model on the same data.
"""

import numpy as np
import pytest

import keras
import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant import runtime
from keras_quant.errors import ConfigError, ExportError
from tests.export import models

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


@pytest.fixture(scope="module")
def setup():
    model, (x_train, y_train), (x_test, y_test) = models.trained()
    calibration = models.calibrate(model, x_train[:512])
    return model, calibration, x_train, x_test, y_test


@pytest.fixture(scope="module")
def ptq(setup):
    model, calibration, *_ = setup
    return kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)


@pytest.fixture(scope="module")
def int8_file(ptq, tmp_path_factory):
    path = tmp_path_factory.mktemp("tflite") / "int8.tflite"
    return path, kq.export_tflite(ptq, path, mode="int8")


def interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def op_table(it):
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    return [
        (op["op_name"], [tensors[i] for i in op["inputs"] if i >= 0], [tensors[i] for i in op["outputs"]])
        for op in it._get_ops_details()
    ]


def dtype_name(t):
    return np.dtype(t["dtype"]).name


def test_int8_file_is_full_integer(int8_file):
    path, report = int8_file
    ops = op_table(interpreter(path))
    names = [op for op, _, _ in ops]
    assert names.count("CONV_2D") == 3 and names.count("DEPTHWISE_CONV_2D") == 1
    assert names.count("FULLY_CONNECTED") == 2
    for op, inputs, outputs in ops:
        kinds = [dtype_name(t) for t in inputs + outputs]
        assert "float32" not in kinds, (op, kinds)  # int8 input and output: no float anywhere
        if op in WEIGHT_OPS:
            x, w, b = inputs
            assert dtype_name(x) == dtype_name(w) == "int8" and dtype_name(b) == "int32"
            assert len(w["quantization_parameters"]["scales"]) == w["shape"][3 if op == "DEPTHWISE_CONV_2D" else 0]
            assert np.all(w["quantization_parameters"]["zero_points"] == 0)
            assert np.abs(it_tensor(path, w)).max() <= 127  # narrow range
    assert "QUANTIZE" not in names and "DEQUANTIZE" not in names  # no requantize, no float boundary
    assert report.float_ops == () and report.input_type == "int8" and report.output_type == "int8"
    assert report.size_bytes == path.stat().st_size
    assert "ADD" in report.ops and "tflite int8" in str(report)


def it_tensor(path, detail):
    return interpreter(path).get_tensor(detail["index"])


def test_activation_scales_are_the_calibrations(setup, ptq, int8_file):
    _, calibration, *_ = setup
    path, report = int8_file
    found = {
        (float(t["quantization_parameters"]["scales"][0]), int(t["quantization_parameters"]["zero_points"][0]))
        for t in interpreter(path).get_tensor_details()
        if dtype_name(t) == "int8" and len(t["quantization_parameters"]["scales"]) == 1
    }
    spec = kq.QuantConfig.int8().activations
    keys = dict(ptq.quantization_report.activation_quantizers)
    assert len(keys) == len(report.activations) >= 7
    for layer, key in keys.items():
        scale, zero_point = (float(np.asarray(v).reshape(-1)[0]) for v in calibration.qparams(key, spec))
        matches = [s for s, z in found if z == int(zero_point) and s == pytest.approx(scale, rel=1e-6)]
        assert matches, (layer, key, scale, zero_point)
    # Exactly: the Keras model's scales are the float32 values the file holds (the converter's own
    # recomputation from the fake-quant range), so both derive the same integer multipliers.
    exact = {(np.float32(s), z) for s, z in found}
    for name, scale, zero_point, _ in report.activations:
        assert (np.float32(scale), int(zero_point)) in exact, (name, scale, zero_point)


def test_the_file_holds_a_crafted_scale_exactly(setup, tmp_path):
    """The converter recomputes an activation scale from its fake-quant min and max. For 0.054724116 with zero
    point 20 the plain float32 range gives one unit in the last place less; the range the export writes
    (`inference.exported_range`) gives the quantizer's scale and zero point exactly."""
    from keras_quant.layers import inference

    model, calibration, *_ = setup
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)
    scale, zero_point = np.float32(0.054724116), 20
    plain = inference.converter_qparams(np.float32((-128 - zero_point) * float(scale)),
                                        np.float32((127 - zero_point) * float(scale)), -128, 127)
    assert plain[0] != scale and abs(float(plain[0]) - float(scale)) <= float(np.spacing(scale))
    wrapper = next(layer for layer in qmodel.layers if isinstance(layer, kq.QuantizeWrapper)
                   and layer.output_quantizer is not None and isinstance(layer.layer, keras.layers.Dense))
    wrapper.set_output_qparams(scale, zero_point)
    path = tmp_path / "crafted.tflite"
    kq.export_tflite(qmodel, path, strict=False)
    outputs = [o for name, _, outs in op_table(interpreter(path)) if name == "FULLY_CONNECTED" for o in outs
               if wrapper.name in o["name"]]
    assert outputs, [o["name"] for _, _, outs in op_table(interpreter(path)) for o in outs]
    assert np.float32(outputs[0]["quantization_parameters"]["scales"][0]) == scale
    assert int(outputs[0]["quantization_parameters"]["zero_points"][0]) == zero_point


def test_int8_file_agrees_with_the_keras_model(setup, ptq, int8_file):
    model, _, _, x_test, y_test = setup
    path, _ = int8_file
    runner = runtime.load(path)
    got = runner.predict(x_test)
    want = ptq.predict(x_test, verbose=0)
    scale, _ = runner.output_quantization
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert models.output_steps(want, got, scale) <= 2.0 + 1e-4
    float_accuracy = (model.predict(x_test, verbose=0).argmax(1) == y_test).mean()
    assert float_accuracy > 0.9
    assert (got.argmax(1) == y_test).mean() >= float_accuracy - 0.02


def test_float_io_and_uint8_input(ptq, setup, tmp_path):
    _, _, _, x_test, _ = setup
    want = ptq.predict(x_test[:64], verbose=0)
    for input_type, output_type in (("float32", "float32"), ("uint8", "int8")):
        path = tmp_path / f"{input_type}.tflite"
        report = kq.export_tflite(ptq, path, input_type=input_type, output_type=output_type)
        assert (report.input_type, report.output_type) == (input_type, output_type)
        got = runtime.load(path).predict(x_test[:64])
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98
    with pytest.raises(ConfigError, match="input_type"):
        kq.export_tflite(ptq, tmp_path / "bad.tflite", input_type="int16")


def test_qat_model_exports_its_learned_ranges(setup, tmp_path):
    model, _, x_train, x_test, y_test = setup
    (_, y_train), _ = datasets.load_digits()
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel", narrow_range=True, learnable=True)
    config = kq.QuantConfig(weights=spec, activations=kq.QuantSpec(bits=8, learnable=True))
    qat = models.compile_model(kq.quantize_model(model, config, mode="qat", calibration=None), lr=1e-3)
    qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)
    path = tmp_path / "qat.tflite"
    learning = kq.export_tflite(qat, tmp_path / "learning.tflite")
    assert any("still learning" in n for n in learning.notes)
    # Frozen, the Keras model computes with the integer zero points the file holds.
    kq.qat.set_mode(qat, "frozen")
    report = kq.export_tflite(qat, path)
    assert not any("still learning" in n for n in report.notes)
    names = [op for op, _, _ in op_table(interpreter(path))]
    assert "QUANTIZE" not in names and "DEQUANTIZE" not in names
    runner = runtime.load(path)
    got, want = runner.predict(x_test), qat.predict(x_test, verbose=0)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert models.output_steps(want, got, runner.output_quantization[0]) <= 2.0 + 1e-4
    # Learned weight step sizes differ from the weights' min-max: the file holds keras_quant's.
    fc = qat.get_layer("fc")
    scale = np.asarray(keras.ops.convert_to_numpy(fc.weight_qparams["kernel"][0]))
    fc_weights = [w for op, (_, w, _), _ in ((o, i, x) for o, i, x in op_table(interpreter(path)) if o == "FULLY_CONNECTED")
                  if w["shape"][0] == 32]
    np.testing.assert_allclose(fc_weights[0]["quantization_parameters"]["scales"], scale, rtol=1e-6)
    assert any("weight scales set to keras_quant's" in n for n in report.notes)


def test_sub_8_bit_weights_are_stored_on_their_grid(setup, tmp_path):
    model, calibration, _, x_test, _ = setup
    qmodel = kq.quantize_model(model, kq.QuantConfig.w4a8(), calibration=calibration)
    path = tmp_path / "w4a8.tflite"
    report = kq.export_tflite(qmodel, path)
    it = interpreter(path)
    for op, inputs, _ in op_table(it):
        if op in WEIGHT_OPS:
            w = inputs[1]
            values = it.get_tensor(w["index"])
            assert values.dtype == np.int8 and np.abs(values).max() <= 7
            layer = [l for l in qmodel.layers if getattr(l, "weight_specs", None) and
                     np.asarray(keras.ops.convert_to_numpy(l.weight_qparams["kernel"][0])).size ==
                     len(w["quantization_parameters"]["scales"])]
            assert layer
    assert any("4-bit weights stored as int8" in n for n in report.notes)
    runner = runtime.load(path)
    got, want = runner.predict(x_test), qmodel.predict(x_test, verbose=0)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert models.within_steps(want, got, runner.output_quantization[0])


@pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors")
def test_4_bit_activations_are_clipped_to_their_grid(setup, tmp_path):
    model, calibration, _, x_test, _ = setup
    a4 = kq.QuantSpec(bits=4)
    config = kq.QuantConfig(weights=kq.QuantConfig.int8().weights, activations=a4)
    qmodel = kq.quantize_model(model, config, calibration=calibration)
    path = tmp_path / "w8a4.tflite"
    report = kq.export_tflite(qmodel, path, input_type="float32", output_type="float32")
    assert any("4-bit activations stored as int8" in n for n in report.notes)
    runner = runtime.load(path)
    got, want = runner.predict(x_test), qmodel.predict(x_test, verbose=0)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97
    # Each quantized activation holds at most 16 distinct levels.
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x_test[:1])
    it.invoke()
    for op, _, outputs in op_table(it):
        if op in WEIGHT_OPS | {"ADD"}:
            assert len(np.unique(it.get_tensor(outputs[0]["index"]))) <= 16


def test_int16x8_file(setup, tmp_path):
    model, calibration, _, x_test, _ = setup
    qmodel = kq.quantize_model(model, kq.QuantConfig.int16x8(), calibration=calibration)
    path = tmp_path / "int16x8.tflite"
    report = kq.export_tflite(qmodel, path, mode="int16x8")
    assert (report.input_type, report.output_type) == ("int16", "int16")
    for op, inputs, outputs in op_table(interpreter(path)):
        for t in inputs + outputs:
            if dtype_name(t) == "int16":
                assert np.all(t["quantization_parameters"]["zero_points"] == 0)
        if op in WEIGHT_OPS:
            assert [dtype_name(t) for t in inputs] == ["int16", "int8", "int64"]
    runner = runtime.load(path)
    got, want = runner.predict(x_test), qmodel.predict(x_test, verbose=0)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    # Within a few int16 steps, far below one int8 step of the same range.
    assert models.output_steps(want, got, runner.output_quantization[0]) <= 16


def test_dynamic_and_float16(setup, ptq, tmp_path):
    model, _, _, x_test, _ = setup
    dynamic = kq.export_tflite(ptq, tmp_path / "dynamic.tflite", mode="dynamic")
    half = kq.export_tflite(model, tmp_path / "float16.tflite", mode="float16")
    assert (dynamic.input_type, half.input_type) == ("float32", "float32")
    it = interpreter(tmp_path / "dynamic.tflite")
    weights = {tuple(inputs[1]["shape"]): dtype_name(inputs[1]) for op, inputs, _ in op_table(it) if op in WEIGHT_OPS}
    assert weights[(24, 3, 3, 16)] == "int8"  # conv2: 3456 weights
    assert weights[(32, 24)] == "float32"  # fc: 768 weights, under the converter's 1024 threshold
    assert any("fc" in n and "1024" in n for n in dynamic.notes)
    want_float = model.predict(x_test, verbose=0)
    for name in ("dynamic", "float16"):
        got = runtime.load(tmp_path / f"{name}.tflite").predict(x_test)
        assert (got.argmax(1) == want_float.argmax(1)).mean() >= 0.97, name
    got16 = runtime.load(tmp_path / "float16.tflite").predict(x_test)
    np.testing.assert_allclose(got16, want_float, atol=0.05 * np.abs(want_float).max())


def test_what_cannot_be_expressed_is_named_before_conversion(setup, tmp_path):
    model, calibration, _, _, _ = setup
    path = tmp_path / "kept.tflite"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="activations.bits") as e:
        kq.export_tflite(kq.quantize_model(model, kq.QuantConfig.int16x8(), calibration=calibration), path)
    assert e.value.layer is not None and "int16x8" in str(e.value)
    grouped = kq.QuantConfig.int8().set_layer_name(
        "conv2", weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=16))
    with pytest.raises(ExportError, match="granularity") as e:
        kq.export_tflite(kq.quantize_model(model, grouped, calibration=calibration), path)
    assert e.value.field == "kernel.granularity" and e.value.layer == "conv2"
    with pytest.raises(ExportError, match="zero point 0"):
        kq.export_tflite(kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration), path,
                         mode="int16x8")
    with pytest.raises(ExportError, match="needs a quantized model"):
        kq.export_tflite(model, path, mode="int8")
    with pytest.raises(ExportError, match="mode"):
        kq.export_tflite(model, path, mode="int4")
    assert path.read_bytes() == b"previous"  # nothing already saved is lost


def test_separable_conv_is_integer_and_a_float_layer_is_listed(tmp_path):
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.SeparableConv2D(8, 3, activation="relu", name="sep")(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(4, name="out")(x))
    x_calib = np.random.default_rng(0).uniform(size=(32, 8, 8, 1)).astype("float32")
    calibration = models.calibrate(model, x_calib)
    # Written as depthwise + pointwise with a calibrated quantizer between them: integer in the file.
    report = kq.export_tflite(kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration),
                              tmp_path / "sep.tflite")
    assert not report.float_ops and report.ops["DEPTHWISE_CONV_2D"] == 1 and report.ops["CONV_2D"] == 2
    config = kq.QuantConfig.int8()
    config.set_layer_name("sep", None)
    qmodel = kq.quantize_model(model, config, calibration=calibration)
    # The float layer's output gets a quantizer where it enters the integer graph.
    assert "sep_quant" in [layer.name for layer in qmodel.layers]
    report = kq.export_tflite(qmodel, tmp_path / "kept_float.tflite", input_type="float32", output_type="float32")
    assert report.float_ops and all(layers == ("sep",) for _, _, layers in report.float_ops)
    got, want = runtime.load(tmp_path / "kept_float.tflite").predict(x_calib), qmodel.predict(x_calib, verbose=0)
    np.testing.assert_allclose(got, want, atol=3 * runtime.load(tmp_path / "kept_float.tflite").output_quantization[0]
                               if runtime.load(tmp_path / "kept_float.tflite").output_quantization else 0.05)


def test_a_saved_model_exports_the_same_file(ptq, int8_file, tmp_path):
    path, _ = int8_file
    ptq.save(tmp_path / "ptq.keras")
    loaded = keras.models.load_model(tmp_path / "ptq.keras", safe_mode=True)
    kq.export_tflite(loaded, tmp_path / "again.tflite")
    a, b = interpreter(path), interpreter(tmp_path / "again.tflite")
    scales = [[tuple(t["quantization_parameters"]["scales"]) for t in it.get_tensor_details()] for it in (a, b)]
    assert scales[0] == scales[1]


def test_the_trace_is_frozen_and_converts_to_the_file_the_converters_own_passes_give(ptq, int8_file, monkeypatch):
    """Export skips the converter's freeze and does its last Python passes (IO types, buffer deduplication,
    metadata) on the model it unpacks anyway: the files are byte for byte the converter's own."""
    from keras_quant.export import converter as converter_lib
    from keras_quant.export import plan as plan_lib
    from keras_quant.export import tflite as tflite_lib

    cf = converter_lib.concrete_function(ptq, plan_lib.build_plan(ptq, "int8"))
    assert converter_lib.frozen_graph_def(cf) is not None  # weights and ranges are constants: no freeze
    assert not any(op.type in ("ReadVariableOp", "VarHandleOp") for op in cf.graph.get_operations())
    # A weight the plan replaces (the float kernel under its grid values) is not embedded unread: the only
    # constants the outputs do not read are TensorFlow's own few-element ones (a depthwise conv's shape).
    from tensorflow.python.framework import graph_util

    graph_def = cf.graph.as_graph_def()
    live = {n.name for n in graph_util.extract_sub_graph(graph_def, [t.op.name for t in cf.outputs]).node}
    unread = [n for n in graph_def.node if n.name not in live]
    assert all(n.op == "Const" and n.attr["value"].tensor.ByteSize() < 64 for n in unread), unread
    with open(int8_file[0], "rb") as f:
        ours = {("int8", None, None): f.read()}
    cases = [("int8", "uint8", "float32"), ("int8", "float32", "int8"), ("dynamic", None, None),
             ("float16", None, None)]
    for case in cases:
        ours[case] = tflite_lib.tflite_bytes(ptq, *case)[0]
    monkeypatch.setattr(converter_lib, "frozen_graph_def", lambda cf: None)  # the converter freezes and finishes
    for case, data in ours.items():
        assert tflite_lib.tflite_bytes(ptq, *case)[0] == data, case


def test_a_recurrent_trace_is_left_to_the_converters_freeze(tmp_path):
    from keras_quant.export import converter as converter_lib
    from keras_quant.export import plan as plan_lib

    keras.utils.set_random_seed(0)
    i = keras.Input((6, 3))
    model = keras.Model(i, keras.layers.Dense(2)(keras.layers.LSTM(4)(i)))
    cf = converter_lib.concrete_function(model, plan_lib.build_plan(model, "float32"))
    assert converter_lib.frozen_graph_def(cf) is None  # the loop body is a function of its own
    kq.export_tflite(model, tmp_path / "lstm.tflite", mode="float32")
    x = np.random.default_rng(0).normal(size=(1, 6, 3)).astype("float32")
    got = runtime.load(str(tmp_path / "lstm.tflite")).predict(x)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)
