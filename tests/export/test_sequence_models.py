"""Sequence models through the real converters and runtimes: recurrent float islands in ONNX and in
dynamic-range TFLite, and Dense layers on rank-3 tensors with a symbolic batch.

Tiny models (sequence 8, a few units), calibrated on random tokens: each test takes seconds.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.export import flatbuffer, loops

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

L = keras.layers
SEQ, VOCAB = 8, 17


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ)).astype("int32")


def ptq(model, x):
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    return kq.quantize_model(model, calibration=cb.result)


def recurrent_model(simple_rnn=False):
    """Embedding, Bidirectional(LSTM), (SimpleRNN,) GRU, Dense softmax: every recurrent layer a float island."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((SEQ,), dtype="int32", name="tokens")
    h = L.Embedding(VOCAB, 8, name="emb")(inp)
    h = L.Bidirectional(L.LSTM(8, return_sequences=True), name="bilstm")(h)
    if simple_rnn:
        h = L.SimpleRNN(8, return_sequences=True, name="srnn")(h)
    h = L.GRU(8, name="gru")(h)
    out = L.Dense(4, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="rnn_model")


def attention_model():
    """Embedding, MultiHeadAttention, LayerNormalization, a gelu FFN (Dense on rank 3, non-zero biases), head."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((SEQ,), dtype="int32", name="tokens")
    h = L.Embedding(VOCAB, 16, name="emb")(inp)
    h = L.LayerNormalization(name="ln0")(h + L.MultiHeadAttention(2, 8, name="mha")(h, h))
    f = L.Dense(32, activation="gelu", name="ffn_a")(h)
    f = L.Dense(16, name="ffn_b")(f)
    h = L.LayerNormalization(name="ln1")(h + f)
    out = L.Dense(4, activation="softmax", name="head")(L.GlobalAveragePooling1D(name="pool")(h))
    model = keras.Model(inp, out, name="attention_model")
    rng = np.random.default_rng(1)
    for name in ("ffn_a", "ffn_b"):  # trained biases: a zero bias hides the unfused BiasAdd of a symbolic batch
        layer = model.get_layer(name)
        layer.bias.assign(rng.normal(0, 0.3, layer.bias.shape).astype("float32"))
    return model


def test_onnx_export_of_recurrent_float_islands(tmp_path):
    model = recurrent_model()
    x = tokens(64)
    qmodel = ptq(model, x)
    report = kq.export_onnx(qmodel, tmp_path / "rnn.onnx")
    # A symbolic batch: the loops are traced unrolled (float ops, no Loop), the report says so.
    assert any("unrolled" in n and "forward_lstm" in n and "gru" in n for n in report.notes), report.notes
    assert not any("batch 1" in n for n in report.notes), report.notes
    proto = onnx.load(str(tmp_path / "rnn.onnx"))
    onnx.checker.check_model(proto)
    assert not [n for n in proto.graph.node if n.op_type == "Loop"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(model.get_layer(name).unroll is False for name in ("gru",))  # put back after the trace
    assert qmodel.get_layer("bilstm").forward_layer.unroll is False
    # The Embedding and the head stay quantized around the islands: an int8 table the Gather reads (then
    # DequantizeLinear), and the head's 8-bit kernel behind a DequantizeLinear.
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    integer = {name for name, a in inits.items() if a.dtype in (np.int8, np.uint8)}
    tables = [inits[n.input[0]].shape for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in integer]
    kernels = [inits[n.input[0]].shape for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in integer]
    assert (VOCAB, 8) in tables and sorted((8, 4)) in [sorted(k) for k in kernels], (tables, kernels)

    expected = qmodel.predict(x, verbose=0)
    session = ort.InferenceSession(str(tmp_path / "rnn.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]  # one run, batch 64
    step = 1.0 / 256  # softmax output grid
    assert np.abs(got - expected).max() <= 2 * step + 1e-6, np.abs(got - expected).max()
    kq.export_tflite(qmodel, tmp_path / "rnn.tflite")  # the same integers as the TFLite file
    tflite = kq.runtime.load(str(tmp_path / "rnn.tflite")).predict(x)
    assert np.abs(got - tflite).max() <= step + 1e-6

    # A fixed batch keeps the loops: float ONNX Loops, none carrying an integer tensor.
    kq.export_onnx(qmodel, tmp_path / "rnn1.onnx", batch_size=1)
    proto = onnx.load(str(tmp_path / "rnn1.onnx"))
    loops = [n for n in proto.graph.node if n.op_type == "Loop"]
    assert len(loops) == 3, [n.op_type for n in proto.graph.node]  # forward, backward, GRU: float
    for loop in loops:  # each body input is float, int32/int64 or bool
        body = next(a.g for a in loop.attribute if a.name == "body")
        types = {i.type.tensor_type.elem_type for i in body.input}
        assert types <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                         onnx.TensorProto.BOOL}, (loop.name, types)
    looped = kq.runtime.load(str(tmp_path / "rnn1.onnx")).predict(x)
    np.testing.assert_allclose(looped, got, atol=step + 1e-6)


def test_onnx_export_of_a_sequence_simple_rnn(tmp_path):
    """With a symbolic batch the loops are unrolled, and a SimpleRNN feeding a GRU exports and runs.

    Known gap with a fixed batch (the loop form): the TFLite converter quantizes a SimpleRNN's sequence
    output inside its loop (tanh's fixed 1/128 grid), and the ONNX tf2onnx writes for that loop gives the
    next loop an input onnxruntime refuses. Export says so with an `ExportError` naming layers and the
    remedy, and writes nothing."""
    x = tokens(64)
    qmodel = ptq(recurrent_model(simple_rnn=True), x)
    report = kq.export_onnx(qmodel, tmp_path / "srnn.onnx")
    assert any("unrolled" in n and "srnn" in n for n in report.notes), report.notes
    session = ort.InferenceSession(str(tmp_path / "srnn.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.abs(got - qmodel.predict(x, verbose=0)).max() <= 2 / 256 + 1e-6

    with pytest.raises(kq.errors.ExportError, match="onnxruntime cannot load.*kq.export_tflite") as info:
        kq.export_onnx(qmodel, tmp_path / "srnn1.onnx", batch_size=1)
    assert info.value.layer, info.value
    assert not (tmp_path / "srnn1.onnx").exists()


def test_float_loop_carries_keeps_the_tflite_values(tmp_path):
    """The rewrite tf2onnx reads is exact: LiteRT runs it to the same outputs, with no integer loop carry."""
    from keras_quant.export.tflite import tflite_bytes

    qmodel = ptq(recurrent_model(), tokens(64))
    data, _ = tflite_bytes(qmodel, "int8", input_type="float32", output_type="float32", batch_size=1)
    rewritten, count = loops.float_loop_carries(data)
    assert count >= 1
    flat = flatbuffer.FlatModel(rewritten)
    for s in range(flat.num_subgraphs):
        for op in flat.ops(s):
            if op.name == "WHILE":
                assert all(flat.tensor(i, s).type != "INT8" for i in op.inputs + op.outputs)
    assert loops.float_loop_carries(rewritten) == (rewritten, 0)
    x = tokens(16, seed=3)
    (tmp_path / "a.tflite").write_bytes(data)
    (tmp_path / "b.tflite").write_bytes(rewritten)
    before = kq.runtime.load(str(tmp_path / "a.tflite")).predict(x)
    after = kq.runtime.load(str(tmp_path / "b.tflite")).predict(x)
    np.testing.assert_array_equal(before, after)


def test_dense_on_rank_3_keeps_a_symbolic_batch(tmp_path):
    model = attention_model()
    x = tokens(128)
    qmodel = ptq(model, x)
    report = kq.export_onnx(qmodel, tmp_path / "attn.onnx")
    assert not any("batch 1" in n for n in report.notes), report.notes
    session = ort.InferenceSession(str(tmp_path / "attn.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", SEQ]
    expected = qmodel.predict(x[:100], verbose=0)
    got = session.run(None, {session.get_inputs()[0].name: x[:100]})[0]  # one run, batch 100
    assert got.shape == (100, 4)
    assert np.abs(got - expected).max() <= 3.0 / 256 + 1e-6, np.abs(got - expected).max()

    # TFLite int8, resizable and batch 1: each FFN Dense is one int8 FULLY_CONNECTED (strict export passes).
    for batch_size in (None, 1):
        path = tmp_path / f"attn_{batch_size}.tflite"
        report = kq.export_tflite(qmodel, path, batch_size=batch_size)
        flat = flatbuffer.FlatModel(path.read_bytes())
        names = {"ffn_a", "ffn_b", "head"}
        fcs = [op for op in flat.ops() if op.name == "FULLY_CONNECTED"
               and set(flatbuffer.layer_names_of(flat.tensor(op.outputs[0]).name, names))]
        assert len(fcs) == 3, (batch_size, report.ops)
        for op in fcs:
            assert flat.tensor(op.inputs[0]).type == "INT8" and flat.tensor(op.inputs[1]).type == "INT8"
        assert all(set(layers) <= {"mha", "ln0", "ln1"} for _, _, layers in report.float_ops), report.float_ops
        runner = kq.runtime.load(str(path))
        assert np.abs(runner.predict(x[:100]) - expected).max() <= 3.0 / 256 + 1e-6


def test_dynamic_mode_quantizes_recurrent_weights(tmp_path):
    """Dynamic-range TFLite of LSTM / GRU layers: their kernels (>= 1024 elements) are int8 in the loop bodies."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 16), name="signal")
    h = L.LSTM(32, return_sequences=True, name="lstm")(inp)
    h = L.GRU(32, name="gru")(h)
    model = keras.Model(inp, L.Dense(4, name="head")(h))
    x = np.random.default_rng(0).normal(size=(32, 6, 16)).astype("float32")

    report = kq.export_tflite(model, tmp_path / "dynamic.tflite", mode="dynamic")
    float_report = kq.export_tflite(model, tmp_path / "float.tflite", mode="float32")
    assert any("int8 weights inside the recurrent loops of: gru, lstm" in n for n in report.notes), report.notes
    flat = flatbuffer.FlatModel((tmp_path / "dynamic.tflite").read_bytes())
    looped = loops.loop_weights(flat, {"lstm", "gru", "head"})
    assert looped == {"lstm": ["INT8", "INT8"], "gru": ["INT8", "INT8"]}, looped  # kernel, recurrent kernel
    assert report.size_bytes < 0.65 * float_report.size_bytes  # 12,288 weights: 4 bytes -> 1 byte each

    expected = model.predict(x, verbose=0)
    got = kq.runtime.load(str(tmp_path / "dynamic.tflite")).predict(x)
    exact = kq.runtime.load(str(tmp_path / "float.tflite")).predict(x)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.03 * scale, np.abs(got - expected).max()
    assert np.abs(exact - expected).max() < np.abs(got - expected).max()  # the int8 weights are what differs
