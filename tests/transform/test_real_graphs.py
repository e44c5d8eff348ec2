"""Graphs as people build them: keras.ops nodes, float islands, affine rewrites, nested / shared / dict models.

Each model goes the whole way: calibrate with the default (full statistics)
callback, PTQ, TFLite int8 in the LiteRT interpreter, and the file is
compared with its Keras model in output quantization steps.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.errors import UnsupportedLayerError
from keras_quant.transform import plan_model

pytestmark = pytest.mark.tensorflow
L = keras.layers


def _calibrate(model, x):
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    return cb.result


def _steps(model, qmodel, x, tmp_path, name, **export):
    """The TFLite file's distance from its Keras model, in output steps (p99, max), and its report."""
    path = tmp_path / f"{name}.tflite"
    report = kq.export_tflite(qmodel, path, **export)
    runner = kq.runtime.load(str(path))
    got = runner.predict(x)
    expected = qmodel.predict(x, verbose=0)
    scale = float(runner.output_quantization[0])
    per = np.abs(np.asarray(got).reshape(len(x) if not isinstance(x, list) else len(x[0]), -1)
                 - expected.reshape(len(got), -1)).max(axis=1) / scale
    return float(np.percentile(per, 99)), float(per.max()), report


def conv1d_ops_model():
    """Conv1D audio-style model whose pooling, scaling and slicing are bare keras.ops."""
    inp = keras.Input((32, 1), name="signal")
    h = L.Conv1D(8, 5, activation="relu", name="c1")(inp)
    h = h[:, 2:]  # GetItem
    h = L.Conv1D(8, 3, name="c2")(h)
    h = keras.ops.relu(h)
    h = keras.ops.mean(h, axis=1)  # MEAN
    h = h * 0.5 + 0.25  # MUL, ADD with constants
    return keras.Model(inp, L.Dense(3, name="head")(h), name="conv1d_ops")


@pytest.fixture(scope="module")
def signal():
    rng = np.random.default_rng(0)
    return rng.normal(size=(96, 32, 1)).astype("float32")


def test_keras_ops_nodes_are_quantized_where_tflite_runs_them(signal, tmp_path):
    keras.utils.set_random_seed(0)
    model = conv1d_ops_model()
    result = _calibrate(model, signal)
    plan = plan_model(model)
    op_points = [k for k in plan.points if k.startswith(("mean", "multiply", "add", "relu"))]
    assert len(op_points) >= 3, plan.points  # relu (fused into c2? no: an op after a linear conv), mean, add
    for key in op_points:
        assert key in result and result[key].count > 0
    qmodel = kq.quantize_model(model, calibration=result)
    assert not qmodel.quantization_report.unsupported
    assert not qmodel.quantization_report.float_islands
    p99, worst, report = _steps(model, qmodel, signal, tmp_path, "ops")
    assert not report.float_ops, report.float_ops
    assert {"MEAN", "CONV_2D"} <= set(report.ops) or {"MEAN"} <= set(report.ops)
    assert p99 <= 2.0 and worst <= 6.0, (p99, worst)
    float_out, q_out = model.predict(signal, verbose=0), qmodel.predict(signal, verbose=0)
    assert np.corrcoef(float_out.ravel(), q_out.ravel())[0, 1] > 0.99


def test_qat_on_ops_graph_trains_and_exports(signal, tmp_path):
    keras.utils.set_random_seed(0)
    model = conv1d_ops_model()
    result = _calibrate(model, signal)
    qat = kq.quantize_model(model, mode="qat", calibration=result)
    qat.compile(keras.optimizers.Adam(1e-3), "mse")
    y = model.predict(signal, verbose=0) + 0.1
    history = qat.fit(signal, y, epochs=3, batch_size=32, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    report = kq.export_tflite(qat, tmp_path / "qat.tflite")
    assert not report.float_ops


def text_model(rnn):
    inp = keras.Input((12,), dtype="int32", name="tokens")
    h = L.Embedding(50, 8, name="embed")(inp)
    h = rnn(h)
    return keras.Model(inp, L.Dense(3, activation="softmax", name="head")(h), name="text")


@pytest.mark.parametrize("rnn", [
    lambda: L.LSTM(8, name="rnn"),
    lambda: L.Bidirectional(L.GRU(4), name="rnn"),
    lambda: L.SimpleRNN(8, name="rnn"),
], ids=["lstm", "bidirectional_gru", "simple_rnn"])
def test_recurrent_layers_are_float_islands_that_calibrate_and_export(rnn, tmp_path):
    keras.utils.set_random_seed(0)
    model = text_model(rnn())
    tokens = np.random.default_rng(1).integers(0, 50, size=(64, 12)).astype("int32")
    result = _calibrate(model, tokens)
    assert result["rnn"].count > 0  # the default full-statistics callback records the RNN output
    qmodel = kq.quantize_model(model, calibration=result)
    islands = {key: reason for key, _, reason in qmodel.quantization_report.float_islands}
    assert "rnn" in islands and "float" in islands["rnn"]
    assert "rnn" not in qmodel.quantization_report.unsupported
    assert "embed" in qmodel.quantization_report.wrapped  # the Embedding is quantized (per tensor: GATHER)
    report = kq.export_tflite(qmodel, tmp_path / "text.tflite")
    assert "GATHER" in report.ops
    runner = kq.runtime.load(str(tmp_path / "text.tflite"))
    agree = (runner.predict(tokens).argmax(-1) == qmodel.predict(tokens, verbose=0).argmax(-1)).mean()
    assert agree >= 0.95


def transformer_block():
    inp = keras.Input((10,), dtype="int32", name="tokens")
    h = L.Embedding(40, 16, name="tok")(inp)
    pos = L.Embedding(10, 16, name="pos")(keras.ops.arange(10))
    h = h + pos
    a = L.MultiHeadAttention(2, 8, name="mha")(h, h)
    h = L.LayerNormalization(name="ln1")(h + a)
    f = L.Dense(32, activation="gelu", name="ffn1")(h)
    h = L.LayerNormalization(name="ln2")(h + L.Dense(16, name="ffn2")(f))
    h = keras.ops.mean(h, axis=1)
    return keras.Model(inp, L.Dense(4, activation="softmax", name="head")(h), name="encoder")


def test_transformer_float_islands_are_named_and_the_rest_is_integer(tmp_path):
    keras.utils.set_random_seed(0)
    model = transformer_block()
    tokens = np.random.default_rng(2).integers(0, 40, size=(64, 10)).astype("int32")
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, tokens))
    islands = {key for key, _, _ in qmodel.quantization_report.float_islands}
    assert {"mha", "ln1", "ln2"} <= islands
    assert {"ffn1", "ffn2", "head"} <= set(qmodel.quantization_report.wrapped)
    report = kq.export_tflite(qmodel, tmp_path / "enc.tflite")  # strict: the float islands are named, not silent
    assert report.ops.get("FULLY_CONNECTED", 0) >= 3
    float_out, q_out = model.predict(tokens, verbose=0), qmodel.predict(tokens, verbose=0)
    assert np.abs(float_out - q_out).max() < 0.1


def test_attention_keeps_float_compute_with_int8_kernels(tmp_path):
    """MultiHeadAttention stays a float island, but its four projection kernels lie on an int8 grid
    (one scale each), which the file stores as int8 constants read through DEQUANTIZE (the zoo's
    transformer file was 1.30x the converter's with float32 kernels)."""
    from ai_edge_litert.interpreter import Interpreter

    from keras_quant.layers.weight_only import WeightOnlyMultiHeadAttention

    keras.utils.set_random_seed(0)
    model = transformer_block()
    tokens = np.random.default_rng(2).integers(0, 40, size=(64, 10)).astype("int32")
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, tokens))
    mha = qmodel.get_layer("mha")
    assert isinstance(mha, WeightOnlyMultiHeadAttention) and mha.weight_spec.granularity == "per_tensor"
    assert set(mha.kernel_qparams) == {"_query_dense", "_key_dense", "_value_dense", "_output_dense"}  # frozen
    reason = dict((k, r) for k, _, r in qmodel.quantization_report.float_islands)["mha"]
    assert "8-bit integers (weight-only)" in reason
    # Reference: a plain MultiHeadAttention given the kernels on their grid (round half up, one scale each).
    original = model.get_layer("mha")
    reference = L.MultiHeadAttention.from_config(original.get_config())
    h = np.random.default_rng(5).normal(size=(4, 10, 16)).astype("float32")
    reference(h, h)
    grids = {}
    for name in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
        kernel = keras.ops.convert_to_numpy(getattr(original, name).kernel)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(getattr(mha, name).kernel), kernel)  # unchanged
        scale = np.float32(np.abs(kernel).max()) / np.float32(127)
        grids[id(getattr(original, name).kernel)] = np.floor(kernel / scale + np.float32(0.5)) * scale
    reference.set_weights([grids.get(id(v), keras.ops.convert_to_numpy(v)) for v in original.weights])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mha(h, h)), keras.ops.convert_to_numpy(reference(h, h)),
                               atol=1e-5)
    q_out = qmodel.predict(tokens, verbose=0)
    float_mha = kq.quantize_model(model, _float_attention(), calibration=_calibrate(model, tokens))
    assert not np.array_equal(float_mha.predict(tokens, verbose=0), q_out)  # the grid changes the outputs a little
    assert np.abs(model.predict(tokens, verbose=0) - q_out).max() < 0.1
    path = tmp_path / "enc.keras"
    qmodel.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path, safe_mode=True).predict(tokens, verbose=0), q_out)
    p99, worst, report = _steps(model, qmodel, tokens, tmp_path, "enc_wo")
    assert p99 <= 2.01 and worst <= 6.01
    assert report.ops.get("DEQUANTIZE", 0) >= 4
    interpreter = Interpreter(str(tmp_path / "enc_wo.tflite"))
    float_kernels = [t for t in interpreter.get_tensor_details() if "mha" in t["name"] and t["dtype"] == np.float32
                     and len(t["shape"]) == 2 and t["shape"].min() >= 8 and _is_constant(interpreter, t)]
    assert not float_kernels, [t["name"] for t in float_kernels]
    kq.export_onnx(qmodel, tmp_path / "enc.onnx")
    got = kq.runtime.load(str(tmp_path / "enc.onnx")).predict(tokens)
    assert np.abs(np.asarray(got) - q_out).max() < 0.05
    qat = kq.quantize_model(model, mode="qat", calibration=_calibrate(model, tokens))
    assert isinstance(qat.get_layer("mha"), WeightOnlyMultiHeadAttention)
    assert qat.get_layer("mha").kernel_qparams == {}  # QAT: the grids follow the training kernels
    qat.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    labels = tokens[:, 0] % 4
    history = qat.fit(tokens, labels, epochs=2, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.abs(keras.ops.convert_to_numpy(qat.get_layer("mha")._query_dense.kernel)
                  - keras.ops.convert_to_numpy(original._query_dense.kernel)).max() > 0  # the kernels train


def _float_attention():
    config = kq.QuantConfig()
    config.set_layer_name("mha", None)
    return config


def _is_constant(interpreter, detail):
    try:
        interpreter.get_tensor(detail["index"])
    except ValueError:
        return False
    return True


def affine_model():
    """A standalone BatchNormalization after a Concatenate (DenseNet) and a Rescaling at the input."""
    inp = keras.Input((8, 8, 3), name="image")
    h = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    c = L.Conv2D(6, 3, padding="same", name="conv")(h)
    c = L.Concatenate(name="concat")([c, h])
    c = L.BatchNormalization(name="bn")(c)
    c = L.ReLU(name="relu")(c)
    c = L.Conv2D(4, 1, name="proj")(c)
    return keras.Model(inp, L.GlobalAveragePooling2D(name="gap")(c), name="affine")


def test_standalone_norms_become_integer_depthwise_convs(tmp_path):
    keras.utils.set_random_seed(0)
    model = affine_model()
    rng = np.random.default_rng(3)
    model.get_layer("bn").set_weights([rng.uniform(0.5, 2, 9), rng.normal(size=9), rng.normal(size=9),
                                       rng.uniform(0.2, 3, 9)])
    x = rng.uniform(0, 255, size=(64, 8, 8, 3)).astype("float32")
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, x))
    rewritten = dict(qmodel.quantization_report.rewritten)
    assert set(rewritten) == {"rescale", "bn"}
    assert {"rescale", "bn"} <= set(qmodel.quantization_report.wrapped)
    p99, worst, report = _steps(model, qmodel, x, tmp_path, "affine")
    assert not report.float_ops and report.ops["DEPTHWISE_CONV_2D"] == 2, report.ops
    assert p99 <= 2.01 and worst <= 6.01
    err = np.abs(model.predict(x, verbose=0) - qmodel.predict(x, verbose=0)).max()
    assert err < 0.05 * np.abs(model.predict(x, verbose=0)).max()
    # One int8 scale per kernel (as the converter's MUL constant), written as one scale in the file: per
    # channel, every channel also stores a weight and a bias scale and zero point (DenseNet121: 1.13x the size).
    assert qmodel.get_layer("bn").quant_config.weights.granularity == "per_tensor"
    assert _depthwise_scale_counts(tmp_path / "affine.tflite") == [1, 1]
    named = kq.QuantConfig()
    named.set_layer_name("bn", weights=kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel",
                                                    narrow_range=True))
    q_named = kq.quantize_model(model, named, calibration=_calibrate(model, x))
    assert q_named.get_layer("bn").quant_config.weights.granularity == "per_channel"
    _steps(model, q_named, x, tmp_path, "affine_named")
    assert sorted(_depthwise_scale_counts(tmp_path / "affine_named.tflite")) == [1, 9]


def input_affine_model(mean):
    """EfficientNet's stem: Rescaling, Normalization, ZeroPadding, a valid strided conv, its BatchNorm, swish."""
    inp = keras.Input((12, 12, 3), name="image")
    h = L.Rescaling(1 / 255, name="rescale")(inp)
    h = L.Normalization(mean=mean, variance=[0.04, 0.05, 0.06], name="norm")(h)
    h = L.ZeroPadding2D(1, name="pad")(h)
    h = L.Conv2D(6, 3, strides=2, use_bias=False, name="stem")(h)
    h = L.Activation("swish", name="act")(L.BatchNormalization(name="stem_bn")(h))
    d = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(L.Rescaling(0.5, offset=-1.0, name="half")(h))
    return keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(d)), name="stem")


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_affine_layers_fold_into_the_layer_reading_them_where_exact(mode, tmp_path):
    """As the converter folds an input Rescaling / Normalization into the first convolution, where the
    result is exact: the next affine layer composes with it; a Dense / Conv / DepthwiseConv takes `a` in its
    kernel and `b` in its bias, but zero padding in between (or the conv's own) only when `b` is 0."""
    x = np.random.default_rng(5).uniform(0, 255, size=(64, 12, 12, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    offset_model = input_affine_model([0.4, 0.5, 0.6])  # b != 0: the Normalization cannot cross the padding
    keras.utils.set_random_seed(0)
    zero_model = input_affine_model([0.0, 0.0, 0.0])
    for model, folded, depthwise in ((offset_model, {"rescale": "norm", "half": "dw"}, 1),
                                     (zero_model, {"rescale": "norm", "norm": "stem", "half": "dw"}, 0)):
        qmodel = kq.quantize_model(model, calibration=_calibrate(model, x), mode=mode)
        report = qmodel.quantization_report
        assert report.folded == (("stem_bn", "stem"),)
        names = {layer.name for layer in qmodel.layers}
        if mode == "qat":  # trained in their float form: each its own 1x1 depthwise conv, none folded
            assert report.input_folds == () and {k for k, _ in report.rewritten} == {"rescale", "norm", "half"}
            depthwise = 3
        else:
            assert dict(report.input_folds) == folded
            assert [k for k, _ in report.rewritten] == (["norm"] if depthwise else [])
            assert not names & set(folded)
        want = model.predict(x, verbose=0)
        err = np.abs(qmodel.predict(x, verbose=0) - want).max()
        assert err < 0.05 * np.abs(want).max(), err
        if mode == "qat":
            kq.qat.set_mode(qmodel, "frozen")
        p99, worst, export = _steps(model, qmodel, x, tmp_path, f"{model.name}_{depthwise}_{mode}")
        assert not export.float_ops and export.ops.get("DEPTHWISE_CONV_2D", 0) == 1 + depthwise, export.ops
        assert p99 <= 2.01 and worst <= 6.01


def test_tabular_normalization_chain_folds_into_the_dense(tmp_path):
    """Rank 2 (no 1x1 depthwise form): Normalization then Rescaling compose and fold into the Dense."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(64, 5)).astype("float32")
    inp = keras.Input((5,), name="features")
    h = L.Normalization(mean=x.mean(0), variance=x.var(0), name="norm")(inp)
    h = L.Rescaling(0.5, offset=0.25, name="rescale")(h)
    model = keras.Model(inp, L.Dense(3, name="head")(h))
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, x))
    assert dict(qmodel.quantization_report.input_folds) == {"norm": "rescale", "rescale": "head"}
    want = model.predict(x, verbose=0)
    assert np.abs(qmodel.predict(x, verbose=0) - want).max() < 0.02 * np.abs(want).max()
    p99, worst, report = _steps(model, qmodel, x, tmp_path, "tabular")
    assert not report.float_ops and set(report.ops) <= {"FULLY_CONNECTED", "QUANTIZE", "DEQUANTIZE"}, report.ops
    assert p99 <= 2.01 and worst <= 6.01


def _depthwise_scale_counts(path):
    """The number of weight scales of each DEPTHWISE_CONV_2D kernel in a TFLite file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path))
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [len(details[op["inputs"][1]]["quantization_parameters"]["scales"])
            for op in interpreter._get_ops_details() if op["op_name"] == "DEPTHWISE_CONV_2D"]


def test_nested_shared_multi_input_multi_output(tmp_path):
    keras.utils.set_random_seed(0)
    block_in = keras.Input((6,))
    block = keras.Model(block_in, L.Dense(6, activation="relu", name="inner")(block_in) * 2.0, name="block")
    shared = L.Dense(5, name="shared")
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    ha, hb = shared(block(a)), shared(b)  # a nested model, and a layer called twice
    out1 = L.Dense(2, name="out1")(L.Concatenate(name="cat")([ha, hb]))
    out2 = keras.ops.max(hb, axis=-1, keepdims=True)
    model = keras.Model({"a": a, "b": b}, [out1, out2], name="multi")
    rng = np.random.default_rng(4)
    data = {"a": rng.normal(size=(64, 6)).astype("float32"), "b": rng.normal(size=(64, 6)).astype("float32")}
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, data))
    got, expected = qmodel.predict(data, verbose=0), model.predict(data, verbose=0)
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert np.abs(g - e).max() < 0.1 * (np.abs(e).max() + 1e-6)
    qat = kq.quantize_model(model, mode="qat", calibration=_calibrate(model, data))
    assert len(qat.predict(data, verbose=0)) == 2


def test_a_named_rule_less_operation_is_a_typed_error():
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.ops.exp(inp))
    config = kq.QuantConfig.int8()
    exp_name = [op.name for op in model.operations if type(op).__name__ == "Exp"][0]
    config.set_layer_name(exp_name, kq.LayerQuantConfig(weights=None, activations=kq.QuantSpec()))
    with pytest.raises(UnsupportedLayerError, match="Exp"):
        kq.quantize_model(model, config, calibration=_calibrate(model, np.ones((4, 4), "float32")))


def test_separable_convs_are_depthwise_then_pointwise_with_a_calibrated_quantizer(tmp_path):
    keras.utils.set_random_seed(0)
    image, signal = keras.Input((12, 12, 3), name="image"), keras.Input((20, 4), name="signal")
    h = L.SeparableConv2D(8, 3, padding="same", use_bias=False, depth_multiplier=2, name="sep1")(image)
    h = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(h))
    h = L.SeparableConv2D(6, 3, strides=2, activation="relu", name="sep2")(h)
    g = L.SeparableConv1D(5, 3, name="sep3")(signal)
    model = keras.Model([image, signal], [L.GlobalAveragePooling2D()(h), L.GlobalAveragePooling1D()(g)])
    rng = np.random.default_rng(5)
    x = [rng.uniform(size=(64, 12, 12, 3)).astype("float32"), rng.normal(size=(64, 20, 4)).astype("float32")]
    result = _calibrate(model, x)
    assert {"sep1:depthwise", "sep2:depthwise", "sep3:depthwise"} <= set(result.layer_names)
    qmodel = kq.quantize_model(model, calibration=result)
    report = qmodel.quantization_report
    assert {"sep1", "sep2", "sep3"} == {key for key, _ in report.rewritten}
    assert {"sep1_depthwise", "sep1", "sep3_depthwise"} <= set(report.wrapped)
    assert ("bn1", "sep1") in report.folded
    for got, expected in zip(qmodel.predict(x, verbose=0), model.predict(x, verbose=0)):
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
    tflite = kq.export_tflite(qmodel, tmp_path / "sep.tflite")
    assert not tflite.float_ops and tflite.ops["DEPTHWISE_CONV_2D"] == 3 and tflite.ops["CONV_2D"] == 3
    runner = kq.runtime.load(str(tmp_path / "sep.tflite"))
    for got, expected in zip(runner.predict(x), qmodel.predict(x, verbose=0)):
        assert np.abs(got - expected).max() <= 2.5 * float(np.abs(expected).max()) / 127


@pytest.mark.parametrize("activation, scale, zero_point", [("softmax", 1 / 256, -128), ("sigmoid", 1 / 256, -128),
                                                           ("tanh", 1 / 128, 0)])
def test_softmax_sigmoid_tanh_outputs_take_tflites_fixed_grid(activation, scale, zero_point, tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = keras.Model(inp, L.Dense(4, activation=activation, name="head")(L.Dense(8, name="hidden")(inp)))
    x = np.random.default_rng(6).normal(size=(64, 6)).astype("float32")
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, x))
    got_scale, got_zp = (float(np.ravel(keras.ops.convert_to_numpy(v))[0]) for v in qmodel.get_layer("head").output_qparams)
    assert got_scale == pytest.approx(scale) and got_zp == zero_point
    runner = kq.runtime.load(str(tmp_path / "f.tflite")) if kq.export_tflite(qmodel, tmp_path / "f.tflite") else None
    assert float(runner.output_quantization[0]) == pytest.approx(scale)
    assert np.abs(runner.predict(x) - qmodel.predict(x, verbose=0)).max() <= 1.01 * scale


def hard_sigmoid_model():
    """MobileNetV3's squeeze-excite gate: `relu6(conv(x) + 3) / 6`, and `conv(x) - c` per channel."""
    inp = keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(6, 3, padding="same", name="conv")(inp)
    gate = L.ReLU(6.0, name="se_relu")(L.Conv2D(6, 1, name="se_conv")(h) + 3.0) * (1.0 / 6.0)
    h = L.Multiply(name="excite")([h, gate])
    h = keras.ops.subtract(L.Conv2D(4, 1, use_bias=False, name="proj")(h), np.arange(4, dtype="float32"))
    keep = 2.0 - L.Conv2D(4, 1, name="neg")(h)  # c - conv(x) is not a bias: stays an op
    return keras.Model(inp, L.GlobalAveragePooling2D(name="gap")(keep), name="hard_sigmoid")


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_a_constant_added_to_a_conv_output_is_folded_into_its_bias(mode, tmp_path):
    keras.utils.set_random_seed(0)
    model = hard_sigmoid_model()
    x = np.random.default_rng(5).normal(size=(64, 8, 8, 3)).astype("float32")
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, x), mode=mode)
    folded = qmodel.quantization_report.folded
    assert sorted(into for _, into in folded) == ["proj", "se_conv"], folded
    expected, got = model.predict(x, verbose=0), qmodel.predict(x, verbose=0)
    assert np.abs(expected - got).max() < 0.05 * np.abs(expected).max()
    if mode == "qat":
        return
    p99, worst, report = _steps(model, qmodel, x, tmp_path, "hard_sigmoid")
    assert not report.float_ops
    assert "ADD" not in report.ops and report.ops["SUB"] == 1, report.ops  # only `2 - conv(x)` is left
    assert p99 <= 2.01 and worst <= 6.01


def test_a_bias_too_large_for_int32_widens_the_weight_scale_as_the_converter_does(tmp_path):
    inp = keras.Input((4, 4, 2), name="x")
    h = L.Conv2D(3, 1, name="conv")(inp)
    model = keras.Model(inp, L.Flatten(name="flat")(h))
    kernel, _ = model.get_layer("conv").get_weights()
    x = np.random.default_rng(0).uniform(0, 1e-4, size=(32, 4, 4, 2)).astype("float32")  # input scale ~4e-7
    model.get_layer("conv").set_weights([kernel * 1e-3, np.asarray([0.0, 5.0, -5.0], "float32")])
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, x))
    path = tmp_path / "bias.tflite"
    report = kq.export_tflite(qmodel, path)
    assert any("widened" in n and "conv" in n for n in report.notes), report.notes
    got = kq.runtime.load(str(path)).predict(x)
    expected = model.predict(x, verbose=0)
    assert np.abs(np.asarray(got) - expected).max() < 0.02 * np.abs(expected).max()


def test_read_only_plan_of_a_flat_model_is_a_view_of_the_model_itself():
    """Calibration (`activation_points`) and `quantize_model` plan the model in turn: a model already flat
    is planned on its own graph (nothing copied), and neither the plan nor the rebuild changes it."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = keras.layers.ReLU(name="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="fc")(keras.layers.GlobalAveragePooling2D()(h)))
    calls = {layer.name: len(layer._inbound_nodes) for layer in model.layers}
    first = plan_model(model, weights=False)
    assert first.flat.is_view and first.flat.model is model
    assert all(first.flat.origin[id(op)] is op for op in model.operations)
    model.get_layer("relu").max_value = 6.0  # the view sees a config change at once
    changed = plan_model(model, weights=False)
    assert changed.flat.model.get_layer("relu").max_value == 6.0
    assert not plan_model(model, weights=True).flat.is_view  # a buildable plan is always a copy
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    cb = kq.CalibrationCallback(statistics="range")
    model.predict(x, callbacks=[cb], verbose=0)
    q1 = kq.quantize_model(model, calibration=cb.result)
    q2 = kq.quantize_model(model, calibration=cb.result)
    np.testing.assert_array_equal(q1.predict(x, verbose=0), q2.predict(x, verbose=0))
    assert {layer.name: len(layer._inbound_nodes) for layer in model.layers} == calls  # model left as found
    assert not {id(w) for w in q1.weights} & {id(w) for w in model.weights}


def test_a_layer_also_called_in_another_model_is_planned_on_a_copy():
    """A layer shared with another model has calls outside this graph: the plan copies the graph (its calls
    are then this graph's only), and the read-only copy is reused until the model changes."""
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(4, 3, name="conv")
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.ReLU(name="relu")(conv(inp)))
    other = keras.Input((6, 6, 3))
    keras.Model(other, conv(other))  # conv's second call, in another model
    first = plan_model(model, weights=False)
    assert not first.flat.is_view
    assert [len(first.flat.calls(op)) for op in first.flat.model.layers[1:]] == [1, 1]
    again = plan_model(model, kq.QuantConfig.int8(), weights=False)
    assert again.flat is first.flat and again.steps is not first.steps  # each plan is made afresh
    model.get_layer("relu").max_value = 6.0  # a config change: a new copy, and the plan sees it
    changed = plan_model(model, weights=False)
    assert changed.flat is not first.flat
    assert next(op for op in changed.flat.model.layers if op.name == "relu").max_value == 6.0


def test_keras_ops_add_with_identical_fused_relus_is_integer(tmp_path):
    """A bare `a + b` read by two identical ReLUs (NASNet's cells): the converter merges the ReLUs and
    fuses the one left into its ADD; the Keras model computes that ADD in integer on the ReLU's grid."""
    from keras_quant.layers.integer import IntegerBinaryOp

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    s = L.Conv2D(4, 3, padding="same", name="c1")(inp) + L.Conv2D(4, 3, padding="same", name="c2")(inp)
    r1, r2 = L.ReLU(name="r1")(s), L.ReLU(name="r2")(s)
    out = L.Concatenate(name="cat")([L.Conv2D(2, 1, name="p1")(r1), L.Conv2D(2, 1, name="p2")(r2)])
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    qmodel = kq.quantize_model(model, calibration=_calibrate(model, x))
    adds = [layer for layer in qmodel.layers if isinstance(layer, IntegerBinaryOp)]
    assert len(adds) == 1 and adds[0].op == "add"
    p99, worst, report = _steps(model, qmodel, x, tmp_path, "fused_add")
    assert not report.float_ops
    assert p99 == 0 and worst == 0
