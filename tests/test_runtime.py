"""Tests for keras_quant.runtime: Keras, LiteRT and onnxruntime runners, no mocks.

TFLite files come from the real TF converter (tests marked `tensorflow`); ONNX
files are built with `onnx.helper` (no TensorFlow, so they also run under JAX)
or converted with tf2onnx (marked `tensorflow`).
"""

import keras
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from keras_quant import runtime
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError

tf_only = pytest.mark.tensorflow
# The converter's and tf2onnx's own notices (tf2onnx still runs tf.lite.Interpreter).
QUIET = [
    pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
]
pytestmark = QUIET
IN, HIDDEN, OUT = 4, 8, 3


# Builders (also used by tests/analysis/test_compare.py) -------------------------
def dense_model(seed=0, units=OUT, activation=None):
    """Input(4) -> Dense(8, relu) -> Dense(units), weights (biases too) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    layers = [keras.layers.Dense(HIDDEN, activation="relu"), keras.layers.Dense(units, activation=activation)]
    model = keras.Sequential([keras.Input((IN,)), *layers])
    model.set_weights([rng.normal(scale=0.6, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def data(n=7, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, IN)).astype("float32")


def onnx_dense(path, model, batch="N", output_q=None, integer_output=False, input_type=TensorProto.FLOAT):
    """`model` (from `dense_model`) as an ONNX graph; `output_q=(scale, zero_point)` adds an int8 Q(DQ) output."""
    w1, b1, w2, b2 = model.get_weights()
    inits = [numpy_helper.from_array(np.asarray(a), n) for a, n in zip((w1, b1, w2, b2), ("w1", "b1", "w2", "b2"))]
    nodes, x = [], "x"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    nodes += [
        helper.make_node("MatMul", [x, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y_float"]),
    ]
    out, out_type = "y_float", TensorProto.FLOAT
    if output_q is not None:
        inits += [
            numpy_helper.from_array(np.array(output_q[0], np.float32), "out_scale"),
            numpy_helper.from_array(np.array(output_q[1], np.int8), "out_zp"),
        ]
        nodes.append(helper.make_node("QuantizeLinear", ["y_float", "out_scale", "out_zp"], ["y_q"]))
        out, out_type = "y_q", TensorProto.INT8
        if not integer_output:
            nodes.append(helper.make_node("DequantizeLinear", ["y_q", "out_scale", "out_zp"], ["y_dq"]))
            nodes.append(helper.make_node("Identity", ["y_dq"], ["y"]))
            out, out_type = "y", TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", input_type, [batch, IN])],
        [helper.make_tensor_value_info(out, out_type, [batch, w2.shape[1]])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path.write_bytes(proto.SerializeToString())
    return path


def onnx_fake_quant(y, scale, zero_point):
    """ONNX QuantizeLinear / DequantizeLinear by the spec: round half to even, saturate to int8."""
    q = np.clip(np.rint(np.asarray(y, np.float32) / np.float32(scale)) + zero_point, -128, 127)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def tflite_bytes(model, batch=1, mode="float", seed=1):
    """`model` through the real TF converter.

    mode: "float", "int8" (int8 I/O), "int8_float_io", "int16x8" (int16 I/O),
    "dynamic" (int8 weights) or "float16" (float16 weights).

    Calibrated on `data(64, seed)`, whose first rows are `data(n, seed)`: test
    data inside the calibrated range, so the int8 error is rounding only."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([batch, IN], tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])  # no trackable: variables frozen
    if mode != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode in ("int8", "int8_float_io", "int16x8"):
        calibration = data(64, seed)
        converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    if mode == "int8":
        converter.inference_input_type = converter.inference_output_type = tf.int8
    if mode == "int16x8":
        int16x8 = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        converter.target_spec.supported_ops = [int16x8]
        converter.inference_input_type = converter.inference_output_type = tf.int16
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def tflite_reference_predict(content, x):
    """A plain batch-1 LiteRT loop, written out: quantize, invoke, dequantize."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for sample in x:
        v = sample[None]
        if inp["dtype"] == np.int8:
            s, zp = inp["quantization"]
            v = np.clip(np.sign(v / s) * np.floor(np.abs(v / s) + 0.5) + zp, -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], v)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            s, zp = out["quantization"]
            y = (y.astype(np.float32) - zp) * np.float32(s)
        rows.append(y[0])
    return np.stack(rows)


# Pure functions ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "x, scale, zero_point, dtype, expected",
    [
        ([0.25, -0.25, 0.75, -0.75], 0.5, 0, np.int8, [1, -1, 2, -2]),  # ties away from zero
        ([0.0, 1.0, -1.0], 0.1, 5, np.int8, [5, 15, -5]),
        ([100.0, -100.0], 0.5, 0, np.int8, [127, -128]),  # saturates
        ([0.0, 1.0, -1.0], 1 / 127.5, 128, np.uint8, [128, 255, 0]),
        ([1.0, -1.0, 3.0], 1 / 32767, 0, np.int16, [32767, -32767, 32767]),
    ],
)
def test_quantize_input_rounds_half_away_from_zero_and_clips(x, scale, zero_point, dtype, expected):
    q = runtime.quantize_input(np.array(x, np.float32), scale, zero_point, dtype)
    assert q.dtype == dtype
    assert q.tolist() == expected


def test_dequantize_output_is_affine():
    q = np.arange(-128, 128, dtype=np.int8)
    y = runtime.dequantize_output(q, 0.05, -3)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (np.arange(-128, 128) + 3) * 0.05, rtol=1e-6)
    round_trip = runtime.quantize_input(y, 0.05, -3, np.int8)
    np.testing.assert_array_equal(round_trip, q)


# Keras ------------------------------------------------------------------------------
def test_keras_runner_predicts_like_the_model():
    model = dense_model()
    runner = runtime.load(model)
    assert (runner.kind, runner.name) == ("keras", model.name)
    assert runner.input_shapes == [(None, IN)]
    assert runner.output_quantization is None
    x = data(9)
    expected = keras.ops.convert_to_numpy(model(x))
    for batch_size in (None, 2, 9):
        y = runner.predict(x, batch_size=batch_size)
        assert y.dtype == np.float32 and y.shape == (9, OUT)
        np.testing.assert_allclose(y, expected, atol=1e-6)


def test_keras_runner_takes_and_gives_lists_for_several_inputs_and_outputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], [keras.layers.Dense(4)(joined), keras.layers.Dense(1)(joined)])
    runner = runtime.load(model)
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 2)).astype("float32")
    out = runner.predict((xa, xb))
    assert isinstance(out, list) and [o.shape for o in out] == [(5, 4), (5, 1)]
    for got, want in zip(out, model([xa, xb])):
        np.testing.assert_allclose(got, keras.ops.convert_to_numpy(want), atol=1e-6)
    with pytest.raises(ConfigError) as e:
        runner.predict(xa)
    assert e.value.field == "len(x)" and e.value.value == 1
    with pytest.raises(ShapeMismatchError) as e:
        runner.predict([xa, xa])
    assert e.value.field == "x[1]"


def test_keras_dict_outputs_come_back_sorted_by_key():
    a = keras.Input((2,), name="a")
    model = keras.Model(a, {"z": keras.layers.Dense(2)(a), "b": keras.layers.Dense(1)(a)})
    x = np.ones((3, 2), "float32")
    out = runtime.load(model).predict(x)
    expected = model(x)
    assert [o.shape for o in out] == [(3, 1), (3, 2)]
    np.testing.assert_allclose(out[0], keras.ops.convert_to_numpy(expected["b"]), atol=1e-6)


def test_keras_size_bytes_counts_weights_or_the_file(tmp_path):
    model = dense_model()
    runner = runtime.load(model)
    assert runner.size_bytes == 4 * (IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT)
    path = tmp_path / "float.keras"
    model.save(path)
    loaded = runtime.load(str(path))
    assert (loaded.kind, loaded.name) == ("keras", "float.keras")
    assert loaded.size_bytes == path.stat().st_size
    np.testing.assert_allclose(loaded.predict(data()), runner.predict(data()), atol=1e-6)


def test_latency_is_a_positive_float():
    runner = runtime.load(dense_model())
    t = runner.latency(data(), runs=3, warmup=1)
    assert isinstance(t, float) and t > 0


# ONNX (built with onnx.helper, run by onnxruntime) ----------------------------------------
def test_onnx_float_matches_keras(tmp_path):
    model = dense_model()
    path = onnx_dense(tmp_path / "float.onnx", model)
    runner = runtime.load(path, num_threads=1)
    assert (runner.kind, runner.name) == ("onnx", "float.onnx")
    assert runner.input_shapes == [(None, IN)]
    assert runner.output_quantization is None
    assert runner.size_bytes == path.stat().st_size
    assert runner.session.get_session_options().intra_op_num_threads == 1
    x = data(9)
    expected = keras.ops.convert_to_numpy(model(x))
    for batch_size in (None, 4):
        np.testing.assert_allclose(runner.predict(x, batch_size=batch_size), expected, atol=1e-5)
    t = runner.latency(x, runs=3)
    assert isinstance(t, float) and t > 0


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_fixed_batch_runs_in_padded_chunks(tmp_path, batch):
    model = dense_model()
    runner = runtime.load(onnx_dense(tmp_path / "fixed.onnx", model, batch=batch))
    assert runner.input_shapes == [(batch, IN)]
    x = data(7)  # 7 = one full chunk of 4 and a padded one, or 7 single runs
    y = runner.predict(x, batch_size=3)  # a fixed batch decides, not batch_size
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(model(x)), atol=1e-5)
    assert runner.latency(x, runs=2, warmup=0) > 0


def test_onnx_qdq_output_reports_its_quantization(tmp_path):
    model = dense_model()
    scale, zero_point = 0.02, -3
    runner = runtime.load(onnx_dense(tmp_path / "qdq.onnx", model, output_q=(scale, zero_point)))
    s, zp = runner.output_quantization
    assert s == pytest.approx(scale, rel=1e-7) and zp == zero_point
    x = data(9)
    expected = onnx_fake_quant(keras.ops.convert_to_numpy(model(x)), scale, zero_point)
    np.testing.assert_allclose(runner.predict(x), expected, atol=1e-6)


def test_onnx_integer_output_is_dequantized(tmp_path):
    model = dense_model()
    scale, zero_point = 0.05, 4
    path = onnx_dense(tmp_path / "int_out.onnx", model, output_q=(scale, zero_point), integer_output=True)
    runner = runtime.load(path)
    s, zp = runner.output_quantization
    assert s == pytest.approx(scale, rel=1e-7) and zp == zero_point
    x = data(5)
    y = runner.predict(x)
    assert y.dtype == np.float32
    expected = onnx_fake_quant(keras.ops.convert_to_numpy(model(x)), scale, zero_point)
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_onnx_integer_index_inputs_take_integers(tmp_path):
    """An integer input no DequantizeLinear reads (indices) gets the values as integers; fractions are refused."""
    model = dense_model()
    path = onnx_dense(tmp_path / "int_in.onnx", model, input_type=TensorProto.INT32)
    runner = runtime.load(path)
    x = np.random.default_rng(3).integers(-3, 4, size=(6, IN))
    want = keras.ops.convert_to_numpy(model(x.astype("float32")))
    np.testing.assert_allclose(runner.predict(x.astype("float32")), want, atol=1e-5)  # float data, integer values
    np.testing.assert_allclose(runner.predict(x.astype("int64")), want, atol=1e-5)
    with pytest.raises(ConfigError) as e:
        runner.predict(data(2))
    assert e.value.field == "x" and "int32" in str(e.value)


def test_onnx_string_inputs_are_refused(tmp_path):
    path = onnx_dense(tmp_path / "str_in.onnx", dense_model(), input_type=TensorProto.STRING)
    with pytest.raises(ConfigError) as e:
        runtime.load(path)
    assert e.value.field == "input_type" and e.value.value == "tensor(string)"
    assert "'x'" in str(e.value)


# Errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "artifact, field",
    [
        ("model.pb", "artifact"),
        ("missing.tflite", "artifact"),
        ("missing.onnx", "artifact"),
        ("missing.keras", "artifact"),
        (b"not a flatbuffer at all", "artifact"),
        (3, "artifact"),
    ],
)
def test_load_refuses_what_it_cannot_run(tmp_path, artifact, field):
    if isinstance(artifact, str):
        artifact = tmp_path / artifact
        if artifact.suffix == ".pb":
            artifact.write_bytes(b"\0")
    with pytest.raises(ConfigError) as e:
        runtime.load(artifact)
    assert e.value.field == field
    assert "Received: artifact=" in str(e.value)


@pytest.mark.parametrize("num_threads", [0, -1, 1.5, True])
def test_load_refuses_bad_num_threads(num_threads):
    with pytest.raises(ConfigError) as e:
        runtime.load(dense_model(), num_threads=num_threads)
    assert e.value.field == "num_threads"


def test_predict_checks_shapes_and_sizes(tmp_path):
    for runner in (runtime.load(dense_model()), runtime.load(onnx_dense(tmp_path / "m.onnx", dense_model()))):
        with pytest.raises(ShapeMismatchError) as e:
            runner.predict(np.zeros((2, IN + 1), "float32"))
        assert e.value.field == "x" and e.value.actual == (2, IN + 1) and e.value.expected == (None, IN)
        with pytest.raises(ShapeMismatchError):
            runner.predict(np.zeros((IN,), "float32"))  # no batch axis
        with pytest.raises(NoDataError):
            runner.predict(np.zeros((0, IN), "float32"))
        with pytest.raises(ConfigError) as e:
            runner.predict(data(), batch_size=0)
        assert e.value.field == "batch_size"
        with pytest.raises(ConfigError) as e:
            runner.latency(data(), runs=0)
        assert e.value.field == "runs"
        with pytest.raises(ConfigError) as e:
            runner.predict(np.array([["a"] * IN]))
        assert e.value.field == "x.dtype"


def test_load_returns_a_runner_unchanged():
    runner = runtime.load(dense_model())
    assert runtime.load(runner) is runner


# TFLite (real converter, real LiteRT interpreter) -----------------------------------------
@pytest.fixture(scope="module")
def tflite_files(tmp_path_factory):
    """Float (batch 1 and dynamic), int8 I/O and int8-inside-float-I/O files of `dense_model()`."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("needs the TensorFlow converter")
    model = dense_model()
    root = tmp_path_factory.mktemp("tflite")
    files = {}
    for name, kwargs in {
        "float": {},
        "float_dynamic": {"batch": None},
        "int8": {"mode": "int8"},
        "int8_float_io": {"mode": "int8_float_io"},
    }.items():
        files[name] = root / f"{name}.tflite"
        files[name].write_bytes(tflite_bytes(model, **kwargs))
    return model, files


@tf_only
def test_tflite_float_matches_keras_from_path_and_bytes(tflite_files):
    model, files = tflite_files
    x = data(5)
    expected = keras.ops.convert_to_numpy(model(x))
    from_path = runtime.load(files["float"], num_threads=1)
    from_bytes = runtime.load(files["float"].read_bytes())
    assert (from_path.kind, from_path.name, from_bytes.name) == ("tflite", "float.tflite", "tflite")
    assert from_path.input_shapes == [(1, IN)]
    for runner in (from_path, from_bytes):
        assert runner.size_bytes == files["float"].stat().st_size
        assert runner.output_quantization is None
        np.testing.assert_allclose(runner.predict(x), expected, atol=1e-5)
    t = from_path.latency(x, runs=3)
    assert isinstance(t, float) and t > 0


@tf_only
def test_tflite_dynamic_batch_is_resized(tflite_files):
    model, files = tflite_files
    runner = runtime.load(str(files["float_dynamic"]))
    assert runner.input_shapes == [(None, IN)]
    x = data(7)
    expected = keras.ops.convert_to_numpy(model(x))
    for batch_size in (None, 2, 7):
        np.testing.assert_allclose(runner.predict(x, batch_size=batch_size), expected, atol=1e-5)
    assert runner.latency(x, runs=2) > 0
    np.testing.assert_allclose(runner.predict(x), expected, atol=1e-5)  # back from batch 1


@tf_only
def test_tflite_int8_io_is_quantized_and_dequantized(tflite_files):
    from ai_edge_litert.interpreter import Interpreter

    model, files = tflite_files
    content = files["int8"].read_bytes()
    runner = runtime.load(files["int8"])
    interpreter = Interpreter(model_content=content)
    out_detail = interpreter.get_output_details()[0]
    assert interpreter.get_input_details()[0]["dtype"] == np.int8 and out_detail["dtype"] == np.int8
    scale, zero_point = runner.output_quantization
    assert (scale, zero_point) == (pytest.approx(out_detail["quantization"][0]), out_detail["quantization"][1])

    x = data(9)
    y = runner.predict(x)
    assert y.dtype == np.float32 and y.shape == (9, OUT)
    np.testing.assert_array_equal(y, tflite_reference_predict(content, x))
    steps = np.abs(y - keras.ops.convert_to_numpy(model(x))) / scale
    assert steps.max() <= 2, steps.max()  # rounding in two layers, no saturation
    np.testing.assert_allclose(np.round(y / scale) * scale, y, atol=1e-5)  # on the output grid


@tf_only
def test_tflite_float_io_reports_the_dequantize_input(tflite_files):
    model, files = tflite_files
    runner = runtime.load(files["int8_float_io"], num_threads=2)
    interpreter = runner.interpreter
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    # Independently: the tensor feeding the DEQUANTIZE op that makes the output.
    out_index = interpreter.get_output_details()[0]["index"]
    ops = interpreter._get_ops_details()
    (dequantize,) = [op for op in ops if op["op_name"] == "DEQUANTIZE" and out_index in op["outputs"]]
    source = {t["index"]: t for t in interpreter.get_tensor_details()}[dequantize["inputs"][0]]
    scale, zero_point = runner.output_quantization
    assert scale == pytest.approx(source["quantization"][0]) and zero_point == source["quantization"][1]
    x = data(9)
    steps = np.abs(runner.predict(x) - keras.ops.convert_to_numpy(model(x))) / scale
    assert steps.max() <= 2, steps.max()  # rounding in two layers, no saturation


@tf_only
@pytest.mark.parametrize(
    "mode, input_dtype, quantized_output, atol",
    [
        ("int16x8", np.int16, True, 0.03),  # int16 activations, int8 weights
        ("dynamic", np.float32, False, 0.03),  # (this model is below the converter's size for int8 weights)
        ("float16", np.float32, False, 0.01),
    ],
)
def test_tflite_export_modes_run(tmp_path, mode, input_dtype, quantized_output, atol):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("needs the TensorFlow converter")
    model = dense_model()
    runner = runtime.load(tflite_bytes(model, mode=mode))
    assert runner.interpreter.get_input_details()[0]["dtype"] == input_dtype
    if quantized_output:
        scale, zero_point = runner.output_quantization
        assert scale > 0 and zero_point == 0  # int16: symmetric
    else:
        assert runner.output_quantization is None  # float16 weights' DEQUANTIZE ops do not make the output
    x = data(5)
    np.testing.assert_allclose(runner.predict(x), keras.ops.convert_to_numpy(model(x)), atol=atol)


@tf_only
def test_tflite_wrong_input_shape_names_the_field(tflite_files):
    _, files = tflite_files
    runner = runtime.load(files["float"])
    with pytest.raises(ShapeMismatchError) as e:
        runner.predict(np.zeros((3, IN + 2), "float32"))
    assert e.value.field == "x" and e.value.expected == (1, IN)


# tf2onnx (real converter) --------------------------------------------------------------
@tf_only
def test_tf2onnx_exports_run_like_their_sources(tflite_files, tmp_path):
    import tensorflow as tf
    import tf2onnx

    model, files = tflite_files
    x = data(6)
    fn = tf.function(lambda v: model(v, training=False))
    float_path = tmp_path / "float.onnx"
    signature = [tf.TensorSpec([None, IN], tf.float32, name="x")]
    tf2onnx.convert.from_function(fn, input_signature=signature, opset=17, output_path=str(float_path))
    np.testing.assert_allclose(runtime.load(float_path).predict(x), keras.ops.convert_to_numpy(model(x)), atol=1e-5)

    qdq_path = tmp_path / "qdq.onnx"
    tf2onnx.convert.from_tflite(str(files["int8_float_io"]), opset=17, output_path=str(qdq_path))
    onnx_runner, tflite_runner = runtime.load(qdq_path), runtime.load(files["int8_float_io"])
    scale, zero_point = onnx_runner.output_quantization
    assert scale == pytest.approx(tflite_runner.output_quantization[0], rel=1e-6)
    assert zero_point == tflite_runner.output_quantization[1]
    # Same grid; the runtimes may round a tie differently, so one step at most.
    assert np.abs(onnx_runner.predict(x) - tflite_runner.predict(x)).max() <= scale * 1.001

    # int8 input and output: the runner quantizes the input with the scale of the DequantizeLinear reading it.
    int_path = tmp_path / "int8_io.onnx"
    tf2onnx.convert.from_tflite(str(files["int8"]), opset=17, output_path=str(int_path))
    int_runner, int_tflite = runtime.load(int_path), runtime.load(files["int8"])
    assert int_runner.output_quantization == pytest.approx(int_tflite.output_quantization)
    assert np.abs(int_runner.predict(x) - int_tflite.predict(x)).max() <= int_tflite.output_quantization[0] * 1.001


@tf_only
def test_tflite_intermediates_read_any_tensor_dequantized(tflite_files):
    model, files = tflite_files
    content = files["int8"].read_bytes()
    runner = runtime.TFLiteRunner(content, name="int8", preserve_all_tensors=True)
    x = data(9)
    # The output tensor read as an intermediate is what predict gives, batch after batch of the file's batch 1.
    (y,) = runner.intermediates(x, [runner.output_details[0]["index"]])
    np.testing.assert_array_equal(y, runner.predict(x))
    # The first FULLY_CONNECTED's output (Dense(8, relu), fused), by index and by name, on its own grid.
    details = runner.tensor_details()
    hidden = next(op["outputs"][0] for op in runner.ops() if op["op_name"] == "FULLY_CONNECTED")
    by_index, by_name = runner.intermediates(x, [hidden, details[hidden]["name"]], batch_size=4)
    np.testing.assert_array_equal(by_index, by_name)
    scale, _ = runtime.tflite_qparams(details[hidden])
    w1, b1 = model.get_weights()[:2]
    expected = np.maximum(x @ w1 + b1, 0)
    assert by_index.shape == (9, HIDDEN) and np.abs(by_index - expected).max() <= 2 * scale


@tf_only
def test_tflite_ops_details_pins_the_private_litert_call(tflite_files):
    # ops_details is the one caller of LiteRT's private Interpreter._get_ops_details: what it reads is pinned here.
    _, files = tflite_files
    runner = runtime.load(files["int8"])
    ops = runner.ops()
    assert [op["index"] for op in ops] == list(range(len(ops)))
    assert {op["op_name"] for op in ops} >= {"FULLY_CONNECTED"}
    for op in ops:
        assert set(op) == {"index", "op_name", "inputs", "outputs"}
        assert all(type(i) is int for i in op["inputs"] + op["outputs"])
    produced = {o for op in ops for o in op["outputs"]}
    assert {d["index"] for d in runner.output_details} <= produced


@tf_only
def test_tflite_intermediates_refuse_what_they_cannot_read(tflite_files):
    _, files = tflite_files
    content = files["int8"].read_bytes()
    with pytest.raises(ConfigError) as e:
        runtime.load(content).intermediates(data(2), [0])
    assert e.value.field == "preserve_all_tensors"
    runner = runtime.TFLiteRunner(content, preserve_all_tensors=True)
    for tensor in ("no such tensor", 10_000):
        with pytest.raises(ConfigError) as e:
            runner.intermediates(data(2), [tensor])
        assert e.value.field == "tensors" and e.value.value == tensor
    with pytest.raises(ShapeMismatchError) as e:
        runner.intermediates(np.zeros((2, IN + 1), "float32"), [0])
    assert e.value.field == "x"


def test_check_inputs_names_the_callers_argument():
    xs = runtime.check_inputs([np.zeros((2, 3)), np.zeros((2, 1))], [(None, 3), (None, 1)], field="data")
    assert [a.shape for a in xs] == [(2, 3), (2, 1)]
    with pytest.raises(ShapeMismatchError) as e:
        runtime.check_inputs([np.zeros((2, 3)), np.zeros((2, 2))], [(None, 3), (None, 1)], field="data")
    assert e.value.field == "data[1]"
    with pytest.raises(ConfigError) as e:
        runtime.check_inputs(np.zeros((2, 3)), [(None, 3), (None, 1)], field="data")
    assert e.value.field == "len(data)"
    with pytest.raises(NoDataError) as e:
        runtime.check_inputs(np.zeros((0, 3)), [(None, 3)], field="eval_data")
    assert e.value.field == "eval_data"


@pytest.mark.parametrize("fixed_batch, batch_size, expected", [
    (None, 2, [([0, 1], 2), ([2, 3], 2), ([4], 1)]),
    (3, None, [([0, 1, 2], 3), ([3, 4, 4], 2)]),
    (None, None, [([0, 1, 2, 3, 4], 5)]),
])
def test_chunks_pad_a_fixed_batch_with_the_last_sample(fixed_batch, batch_size, expected):
    got = [(c[0].tolist(), n) for c, n in runtime.chunks([np.arange(5)], fixed_batch, batch_size)]
    assert got == expected


def test_a_runner_missing_a_method_cannot_be_made():
    from keras_quant.runtime.base import ChunkedRunner, Runner

    class NoRun(ChunkedRunner):
        def _infer_fn(self, sample):
            return lambda: None

        size_bytes = 0

    with pytest.raises(TypeError, match="_run"):
        NoRun("x", ["in"], [(None, 2)])
    with pytest.raises(TypeError, match="_infer_fn"):
        Runner("x", ["in"], [(None, 2)])
