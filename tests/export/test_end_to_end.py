"""Real models end to end: batch sizes, integer inputs, float fallback, typed errors, a U-Net.

Each model is tiny (untrained, random weights, calibrated on random data) and
every file is run in its own runtime (LiteRT's interpreter, onnxruntime)
against the Keras quantized model.
"""

import numpy as np
import pytest

import keras
import keras_quant as kq
from keras_quant import runtime
from keras_quant.errors import ConfigError, ExportError
from tests.export import models

pytestmark = [
    pytest.mark.tensorflow,
    pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
]
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
L = keras.layers


def quantized(model, x, config=None):
    return kq.quantize_model(model, config or kq.QuantConfig.int8(), calibration=models.calibrate(model, x))


def small_cnn():
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(12, 3, activation="relu")(x)
    x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(5)(x))


def dense_model():
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    return keras.Model(inp, L.Dense(3)(L.Dense(16, activation="relu")(inp)))


def two_input_model():
    keras.utils.set_random_seed(2)
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    x = L.Concatenate()([L.Dense(8, activation="relu")(a), L.Dense(8, activation="relu")(b)])
    return keras.Model([a, b], L.Dense(3)(x))


def unet():
    keras.utils.set_random_seed(3)
    inp = keras.Input((32, 32, 3))
    c1 = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    p = L.MaxPooling2D()(c1)
    c2 = L.Conv2D(16, 3, padding="same", activation="relu")(p)
    u = L.UpSampling2D()(c2)
    t = L.Conv2DTranspose(8, 2, strides=2)(c2)
    m = L.Concatenate()([u, t, c1])
    return keras.Model(inp, L.Conv2D(2, 1, activation="sigmoid")(m))


def rand(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


# 1. ONNX: a symbolic batch dimension ---------------------------------------------------
@pytest.mark.parametrize("build, shape", [(small_cnn, (10, 10, 3)), (dense_model, (6,))])
def test_onnx_batch_dimension_is_symbolic(build, shape, tmp_path):
    model = build()
    x = rand((500,) + shape)
    qmodel = quantized(model, x[:64])
    path = tmp_path / "model.onnx"
    kq.export_onnx(qmodel, path)
    proto = onnx.load(str(path))
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    big = session.run(None, {name: x})[0]
    ones = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(20)])
    assert big.shape == (500, qmodel.output_shape[-1])
    np.testing.assert_array_equal(big[:20], ones)  # one session, batch 500 and batch 1 alike
    step = runtime.load(path).output_quantization[0]
    assert models.output_steps(qmodel.predict(x, verbose=0), big, step) <= 2.0 + 1e-4
    fixed = kq.export_onnx(qmodel, tmp_path / "fixed.onnx", batch_size=1)
    assert onnx.load(fixed.path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    with pytest.raises(ConfigError, match="batch_size"):
        kq.export_onnx(qmodel, tmp_path / "bad.onnx", batch_size=0)


# 2. TFLite: batch 1 by default, resizable with batch_size=None --------------------------
def test_tflite_batch_none_is_resizable(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model = small_cnn()
    x = rand((70, 10, 10, 3))
    qmodel = quantized(model, x)
    kq.export_tflite(qmodel, tmp_path / "b1.tflite")
    kq.export_tflite(qmodel, tmp_path / "dyn.tflite", batch_size=None)
    assert list(Interpreter(model_path=str(tmp_path / "b1.tflite")).get_input_details()[0]["shape_signature"]) \
        == [1, 10, 10, 3]
    it = Interpreter(model_path=str(tmp_path / "dyn.tflite"))
    assert it.get_input_details()[0]["shape_signature"][0] == -1
    one = runtime.load(tmp_path / "b1.tflite")
    dyn = runtime.load(tmp_path / "dyn.tflite")
    assert one._fixed_batch == 1 and dyn._fixed_batch is None
    want = one.predict(x)
    np.testing.assert_array_equal(dyn.predict(x, batch_size=32), want)  # chunks of 32, the last one of 6
    detail = it.get_input_details()[0]
    it.resize_tensor_input(detail["index"], [32, 10, 10, 3])
    it.allocate_tensors()
    scale, zero_point = detail["quantization"]
    it.set_tensor(detail["index"], runtime.quantize_input(x[:32], scale, zero_point, np.int8))
    it.invoke()
    out = it.get_output_details()[0]
    got = runtime.dequantize_output(it.get_tensor(out["index"]), *out["quantization"])
    np.testing.assert_array_equal(got, want[:32])
    assert models.output_steps(qmodel.predict(x, verbose=0), want, one.output_quantization[0]) <= 2.0 + 1e-4
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            kq.export_tflite(qmodel, tmp_path / "bad.tflite", batch_size=bad)


def test_two_input_tflite_resized_to_batch_32(tmp_path):
    """Both inputs are resized before the interpreter allocates (resizing one, then allocating, failed)."""
    model = two_input_model()
    xs = [rand((40, 6), 1), rand((40, 4), 2)]
    qmodel = quantized(model, xs)
    kq.export_tflite(qmodel, tmp_path / "two.tflite", batch_size=None)
    runner = runtime.load(tmp_path / "two.tflite")
    got = runner.predict(xs, batch_size=32)
    single = np.concatenate([runner.predict([a[i:i + 1] for a in xs]) for i in range(40)])
    np.testing.assert_array_equal(got, single)
    assert [d["shape"][0] for d in runner.interpreter.get_input_details()] == [1, 1]  # the last run: batch 1
    assert models.output_steps(qmodel.predict(xs, verbose=0), got, runner.output_quantization[0]) <= 2.0 + 1e-4


# 3. ONNX with int32 inputs (an Embedding) ------------------------------------------------
def test_embedding_model_int32_inputs_run_in_both_runtimes(tmp_path):
    keras.utils.set_random_seed(4)
    inp = keras.Input((16,), dtype="int32")
    x = L.Embedding(50, 8, name="embed")(inp)
    x = L.GlobalAveragePooling1D()(x)
    model = keras.Model(inp, L.Dense(4, name="out")(x))
    tokens = np.random.default_rng(0).integers(0, 50, size=(64, 16)).astype("int32")
    config = kq.QuantConfig.int8()
    config.set_layer_name("embed", None)  # TFLite's GATHER has no per-row scales
    qmodel = quantized(model, tokens, config)
    assert kq.export_onnx(qmodel, tmp_path / "embed.onnx").input_type == "int32"
    assert kq.export_tflite(qmodel, tmp_path / "embed.tflite").input_type == "int32"  # indices stay int32
    assert onnx.load(str(tmp_path / "embed.onnx")).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    want = qmodel.predict(tokens, verbose=0)
    for name in ("embed.onnx", "embed.tflite"):
        runner = runtime.load(tmp_path / name)
        got = runner.predict(tokens)
        assert models.output_steps(want, got, runner.output_quantization[0]) <= 2.0 + 1e-4, name
        np.testing.assert_array_equal(runner.predict(tokens.astype("float32")), got)  # integer-valued floats
    with pytest.raises(ConfigError, match="int32"):
        runtime.load(tmp_path / "embed.onnx").predict(tokens + 0.5)


# 4. Float fallback is named, and an error under strict ---------------------------------
def concat_bn_model():
    """DenseNet's pattern: BatchNormalization after a Concatenate (nothing to fold it into)."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    return _with_trained_bn(keras.Model(inp, L.Conv2D(4, 3, name="head")(x)))


def _with_trained_bn(model):
    """`model` with its BatchNormalization 'bn' given non-trivial statistics (8 channels)."""
    rng = np.random.default_rng(0)
    model.get_layer("bn").set_weights([rng.uniform(0.5, 1.5, 8), rng.normal(size=8), rng.normal(size=8),
                                       rng.uniform(0.5, 1.5, 8)])
    return model


def dense_bn_model():
    """A BatchNormalization on a rank-2 tensor after a Concatenate: no 1x1 depthwise rewrite, so float MUL/ADD."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((8,))
    x = L.Concatenate(name="cat")([L.Dense(4, name="a")(inp), L.Dense(4, name="b")(inp)])
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    return _with_trained_bn(keras.Model(inp, L.Dense(4, name="head")(x)))


def layer_norm_model():
    keras.utils.set_random_seed(6)
    inp = keras.Input((6, 8))
    x = L.LayerNormalization(name="ln")(L.Dense(8, name="proj")(inp))
    return keras.Model(inp, L.Dense(4, name="out")(x))


@pytest.mark.parametrize("build, shape, layer, ops, modes", [
    (dense_bn_model, (8,), "bn", {"MUL", "ADD"}, ("int8",)),  # int16x8: see test_converter_errors...
    (layer_norm_model, (6, 8), "ln", {"MEAN", "RSQRT", "SQUARED_DIFFERENCE"}, ("int8", "int16x8")),
])
def test_a_quantized_layer_running_float_is_an_error(build, shape, layer, ops, modes, tmp_path, monkeypatch):
    from keras_quant.layers.rules import RULES, LayerRule

    # LayerNormalization is a float island by default; a rule that quantizes it (as a user's could) must not
    # let the file run it in float silently.
    monkeypatch.setitem(RULES, L.LayerNormalization, LayerRule(L.LayerNormalization, "norm"))
    model = build()
    x = rand((32,) + shape)
    qmodel = quantized(model, x)
    for export in (lambda p: kq.export_tflite(qmodel, p), lambda p: kq.export_onnx(qmodel, p)):
        with pytest.raises(ExportError) as e:
            export(tmp_path / "strict.out")
        assert e.value.layer == layer and e.value.field == "float_ops"
        assert ops <= {op.split(" ")[0] for op in e.value.value.split(", ")}
        assert "strict=False" in str(e.value)
        assert not (tmp_path / "strict.out").exists()
    for mode in modes:
        q = qmodel if mode == "int8" else quantized(model, x, kq.QuantConfig.int16x8())
        report = kq.export_tflite(q, tmp_path / f"{mode}.tflite", mode=mode, strict=False)
        listed = {op for op, _, layers in report.float_ops if layer in layers}
        assert ops <= listed, (mode, report.float_ops)
        # Every op the interpreter runs on a float tensor inside the graph is in the report.
        flat_ops = float_ops_in_file(tmp_path / f"{mode}.tflite")
        assert sorted(flat_ops) == sorted(op for op, _, _ in report.float_ops), mode


def test_densenet_batch_norm_is_integer_and_layer_norm_a_named_island(tmp_path):
    model = concat_bn_model()
    qmodel = quantized(model, rand((32, 8, 8, 3)))
    assert ("bn", "per-channel affine as a 1x1 depthwise convolution") in qmodel.quantization_report.rewritten
    report = kq.export_tflite(qmodel, tmp_path / "bn.tflite")
    assert not report.float_ops and report.ops["DEPTHWISE_CONV_2D"] == 1
    ln_model = layer_norm_model()
    qln = quantized(ln_model, rand((32, 6, 8)))
    assert "ln" in {key for key, _, _ in qln.quantization_report.float_islands}
    report = kq.export_tflite(qln, tmp_path / "ln.tflite")  # strict: the island is named in the report
    assert report.float_ops and all(layers == ("ln",) for _, _, layers in report.float_ops)


def float_ops_in_file(path):
    """Ops of the file that read or write float tensors, but for QUANTIZE / DEQUANTIZE (read by LiteRT itself)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without XNNPack, which would replace the ops it runs by one DELEGATE op.
    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    found = []
    for op in it._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        kinds = [np.dtype(tensors[i]["dtype"]) for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if np.dtype("float32") in kinds:
            found.append(op["op_name"])
    return found


def test_a_layer_kept_float_is_listed_not_an_error(tmp_path):
    model = concat_bn_model()
    x = rand((32, 8, 8, 3))
    config = kq.QuantConfig.int8()
    config.set_layer_name("bn", None)
    qmodel = quantized(model, x, config)
    report = kq.export_tflite(qmodel, tmp_path / "kept.tflite", input_type="float32", output_type="float32")
    assert {op for op, _, _ in report.float_ops} == {"MUL", "ADD"}
    assert all(layers == ("bn",) for _, _, layers in report.float_ops)
    runner = runtime.load(tmp_path / "kept.tflite")
    assert models.output_steps(qmodel.predict(x, verbose=0), runner.predict(x), runner.output_quantization[0]) \
        <= 2.0 + 1e-4


# 5. Typed errors, and GELU in ONNX ---------------------------------------------------------
@pytest.mark.parametrize("where", ["dense", "activation"])
def test_gelu_exports_to_onnx(where, tmp_path):
    keras.utils.set_random_seed(7)
    inp = keras.Input((6,))
    if where == "dense":
        x = L.Dense(8, activation="gelu")(inp)
    else:
        x = L.Activation("gelu")(L.Dense(8)(inp))
    model = keras.Model(inp, L.Dense(3)(x))
    x = rand((64, 6)) * 4 - 2
    qmodel = quantized(model, x)
    report = kq.export_onnx(qmodel, tmp_path / "gelu.onnx")
    assert report.ops.get("Erf") == 1 and any("GELU" in n for n in report.notes)
    kq.export_tflite(qmodel, tmp_path / "gelu.tflite")
    onnx_runner, tflite_runner = runtime.load(tmp_path / "gelu.onnx"), runtime.load(tmp_path / "gelu.tflite")
    step = onnx_runner.output_quantization[0]
    want = qmodel.predict(x, verbose=0)
    assert models.output_steps(want, onnx_runner.predict(x), step) <= 2.0 + 1e-4
    assert models.output_steps(want, tflite_runner.predict(x), step) <= 2.0 + 1e-4


@pytest.mark.parametrize("approximate", [0, 1])
def test_gelu_decomposition_computes_gelu(approximate):
    """The Erf (exact) and Tanh (approximate) forms written for a TFL_GELU node, run in onnxruntime."""
    import tensorflow as tf
    from onnx import TensorProto, helper

    from keras_quant.export.qdq import decompose_gelu

    node = helper.make_node("TFL_GELU", ["x"], ["y"], name="gelu", approximate=approximate)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert decompose_gelu(proto) == 1
    onnx.checker.check_model(proto)
    assert {n.op_type for n in proto.graph.node} >= ({"Tanh"} if approximate else {"Erf"})
    x = np.linspace(-4, 4, 40, dtype="float32").reshape(8, 5)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, tf.nn.gelu(x, approximate=bool(approximate)).numpy(), atol=1e-6)


def test_converter_errors_are_export_errors(tmp_path):
    inp = keras.Input((8, 8, 8, 1))
    x = L.Conv3D(4, 3, padding="same", name="c3")(inp)
    model = keras.Model(inp, L.MaxPooling3D(name="pool3d")(x))
    with pytest.raises(ExportError) as e:
        kq.export_tflite(model, tmp_path / "c3.tflite", mode="float32")
    assert e.value.layer == "pool3d" and e.value.value == "MaxPool3D"
    assert type(e.value.__cause__).__name__ == "ConverterError"  # the converter's message, chained
    assert not (tmp_path / "c3.tflite").exists()
    # The converter has no int16 CONCATENATION: named by layer, with the converter's own diagnostic.
    qmodel = quantized(concat_bn_model(), rand((32, 8, 8, 3)), kq.QuantConfig.int16x8())
    with pytest.raises(ExportError) as e:
        kq.export_tflite(qmodel, tmp_path / "cat16.tflite", mode="int16x8", strict=False)
    assert e.value.layer == "cat" and "tfl.concatenation" in str(e.value)
    # Conv3D alone is a builtin float op: it exports, and LiteRT computes the Keras outputs.
    conv = keras.Model(inp, x)
    kq.export_tflite(conv, tmp_path / "conv3d.tflite", mode="float32")
    data = rand((2, 8, 8, 8, 1))
    np.testing.assert_allclose(runtime.load(tmp_path / "conv3d.tflite").predict(data),
                               conv.predict(data, verbose=0), atol=1e-5)


# 6. A U-Net: UpSampling2D and Conv2DTranspose read one skip tensor --------------------
def test_unet_exports_to_tflite_and_onnx(tmp_path):
    model = unet()
    x = rand((16, 32, 32, 3))
    qmodel = quantized(model, x)
    kq.export_tflite(qmodel, tmp_path / "u.tflite")
    kq.export_onnx(qmodel, tmp_path / "u.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "u.onnx")), full_check=True)
    want = qmodel.predict(x, verbose=0)
    for name in ("u.tflite", "u.onnx"):
        runner = runtime.load(tmp_path / name)
        got = runner.predict(x)
        assert got.shape == (16, 32, 32, 2)
        assert models.output_steps(want, got, runner.output_quantization[0]) <= 2.0 + 1e-4, name


# 9. Concatenate inputs take the Concatenate's scale, as the converter writes them -------------------
def dense_block_model():
    """DenseNet's stem and first block: a pooled tensor read by a BatchNormalization and a Concatenate."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    pool = L.MaxPooling2D(name="pool")(x)
    y = L.BatchNormalization(name="bn0")(pool)
    y = L.ReLU(name="relu0")(y)
    y = L.Conv2D(8, 1, activation="relu", name="conv1")(y)
    y = L.Conv2D(4, 3, padding="same", name="conv2")(y)
    cat = L.Concatenate(name="cat")([pool, y])
    z = L.BatchNormalization(name="bn1")(cat)
    z = L.ReLU(name="relu1")(z)
    model = keras.Model(inp, L.Conv2D(4, 1, name="head")(z))
    rng = np.random.default_rng(1)
    for name, channels in (("bn0", 8), ("bn1", 12)):  # gains of 2-4: a one-step input difference shows
        model.get_layer(name).set_weights([rng.uniform(2.0, 4.0, channels), rng.normal(size=channels),
                                           rng.normal(0.2, 0.1, channels), rng.uniform(0.5, 1.0, channels)])
    return model


def test_concatenate_inputs_are_quantized_on_its_scale(tmp_path):
    model = dense_block_model()
    x = rand((64, 16, 16, 3))
    qmodel = quantized(model, x[:32])
    cat = [float(np.asarray(v)) for v in qmodel.get_layer("cat_quant").qparams]
    # The pooled tensor (read by bn0 and the Concatenate) is requantized to the Concatenate's range, and
    # conv2 (read by the Concatenate alone) writes its output on it directly, as the converter writes them.
    for got in (qmodel.get_layer("pool_quant").qparams, qmodel.get_layer("conv2").output_qparams):
        np.testing.assert_allclose([float(np.asarray(v)) for v in got], cat)
    assert ("pool_quant", "pool") in qmodel.quantization_report.activation_quantizers
    path = tmp_path / "dense.tflite"
    kq.export_tflite(qmodel, path)
    runner = runtime.load(path, num_threads=1)
    steps = np.abs(runner.predict(x) - qmodel.predict(x, verbose=0)) / runner.output_quantization[0]
    # Each input on its own range: 2 steps at p99 (the BatchNormalization read the pooled tensor on a
    # finer grid than the file's, the conv output was rounded twice).
    assert float(np.percentile(steps, 99)) <= 1.0 + 1e-4 and float(steps.max()) <= 3.0 + 1e-4
