"""Tests for keras_quant.analysis.layer_errors.

layer_errors itself runs on any backend (the unmarked tests run under JAX too),
but calibration (kq.CalibrationCallback) hooks TensorFlow's trainer, so every
test of a PTQ / QAT model is marked `tensorflow`; those on the trained CNN are `slow`.

The metrics are checked against a reference written here on activations
computed independently (each layer called eagerly), the matching of quantized
tensors to float layers on a model with a folded BatchNormalization, and the
numbers on the trained CNN of tests/export/models.py against what quantization
theory says (4 bits are worse than 8, a 2-bit layer is where the error enters,
the exported file computes what the Keras model does).
"""

import dataclasses
import json
import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.analysis import LayerError, LayerErrors, activation_error, layer_errors
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError
from tests.export import models
from tests.test_runtime import QUIET

pytestmark = QUIET
L = keras.layers


# Reference ----------------------------------------------------------------------
def reference_metrics(ref, q):
    """Float64 metrics of `q - ref`, written out the long way."""
    r = np.asarray(ref, np.float64).reshape(len(ref), -1)
    q = np.asarray(q, np.float64).reshape(len(ref), -1)
    e = q - r
    cosines = []
    for a, b in zip(r, q):
        na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
        cosines.append(1.0 if na == nb == 0 else 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb))
    noise, signal = float(np.sum(e * e)), float(np.sum(r * r))
    sqnr = math.inf if noise == 0 else -math.inf if signal == 0 else 10 * math.log10(signal / noise)
    return dict(mse=float(np.mean(e * e)), mae=float(np.mean(np.abs(e))), max_error=float(np.max(np.abs(e))),
                mean_error=float(np.mean(e)), sqnr_db=sqnr, cosine_similarity=float(np.mean(cosines)),
                num_elements=e.size)


def assert_matches_reference(row, ref, q, scale=None, rel=1e-6, abs=1e-12):
    """`row` holds `reference_metrics(ref, q)` (and `scale`) within `rel` / `abs`."""
    want = reference_metrics(ref, q)
    for field, value in want.items():
        assert getattr(row, field) == pytest.approx(value, rel=rel, abs=abs), field
    if scale is None:
        assert row.scale is None and row.max_error_steps is None
    else:
        assert row.scale == pytest.approx(scale, rel=1e-6)
        assert row.max_error_steps == pytest.approx(want["max_error"] / scale, rel=1e-6)


def np64(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


# A tiny model with a folded BatchNormalization ---------------------------------------
def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,), name="x")
    h = L.Dense(8, name="d1")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(h)
    h = L.Add(name="add")([h, L.Dense(8, name="d2")(h)])
    y = L.Dense(3, name="head")(h)
    model = keras.Model(inp, y, name="tiny")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(seed)
    bn.set_weights([rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.2, 8), rng.normal(0, 0.2, 8), rng.uniform(0.5, 2, 8)])
    return model


def tiny_data(n=40, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 6)).astype("float32")


tf_only = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def tiny():
    model, x = tiny_model(), tiny_data()
    calibration = models.calibrate(model, x)
    return model, x, calibration, kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)


@tf_only
def test_rows_match_a_reference_on_activations_computed_layer_by_layer(tiny):
    model, x, _, qmodel = tiny
    errs = layer_errors(model, qmodel, x)
    # d1's BatchNormalization is folded: the wrapper's output is the float bn output, d1 itself has no row.
    assert errs.names == ("x", "bn", "relu", "d2", "add", "head", "<output>")
    assert errs.num_samples == 40 and errs.source == ("tiny", qmodel.name)
    f = {"x": np64(x)}
    f["bn"] = np64(model.get_layer("bn")(model.get_layer("d1")(x), training=False))
    f["relu"] = np64(model.get_layer("relu")(f["bn"]))
    f["d2"] = np64(model.get_layer("d2")(f["relu"]))
    f["add"] = np64(model.get_layer("add")([f["relu"], f["d2"]]))
    f["head"] = np64(model.get_layer("head")(f["add"]))
    q = {"x": np64(qmodel.get_layer("x_quant")(x))}
    q["bn"] = np64(qmodel.get_layer("d1")(q["x"], training=False))
    q["relu"] = np64(qmodel.get_layer("relu_quant")(qmodel.get_layer("relu")(q["bn"])))
    q["d2"] = np64(qmodel.get_layer("d2")(q["relu"], training=False))
    q["add"] = np64(qmodel.get_layer("add_quant")(qmodel.get_layer("add")([q["relu"], q["d2"]])))
    q["head"] = np64(qmodel.get_layer("head")(q["add"], training=False))
    table = {name: scale for name, (scale, _, _) in kq.export.plan.activation_table(qmodel).items()}
    scales = {"x": table["x_quant"], "bn": None, "relu": table["relu_quant"], "d2": table["d2"],
              "add": table["add_quant"], "head": table["head"]}
    # Eager calls and the compiled predict differ by float32 rounding (1e-7 of the activations).
    for name in scales:
        assert_matches_reference(errs[name], f[name], q[name], scales[name], rel=1e-4, abs=1e-6)
    assert_matches_reference(errs["<output>"], f["head"], q["head"], scales["head"], rel=1e-4, abs=1e-6)
    assert errs["x"].max_error_steps <= 0.5 + 1e-6  # the input is only rounded
    assert all(r.cosine_similarity > 0.99 and r.sqnr_db > 25 for r in errs)


@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 5)),
               elements=st.integers(-800, 800).map(lambda i: i / 8)),
    hnp.arrays(np.float64, 1, elements=st.floats(-1, 1)),
    st.floats(1e-3, 10),
)
def test_activation_error_matches_the_reference(ref, noise, scale):
    q = ref + noise[0] * (np.arange(ref.size).reshape(ref.shape) % 3)
    row = activation_error("t", ref, q, scale=scale)
    assert_matches_reference(row, ref, q, scale)
    assert row.mse >= 0 and -1 - 1e-9 <= row.cosine_similarity <= 1 + 1e-9 and abs(row.mean_error) <= row.mae + 1e-12
    same = activation_error("t", ref, ref)
    assert same.mse == 0 and same.sqnr_db == math.inf and same.cosine_similarity == pytest.approx(1.0, abs=1e-12)


def test_cosine_of_zero_activations():
    assert activation_error("t", np.zeros((2, 3)), np.zeros((2, 3))).cosine_similarity == 1.0
    assert activation_error("t", np.zeros((2, 3)), np.ones((2, 3))).cosine_similarity == 0.0
    # Averaged over samples: one sample with the opposite sign counts one half.
    assert activation_error("t", np.ones((2, 3)), np.array([[1.0] * 3, [-2.0] * 3])).cosine_similarity == 0.0


@tf_only
def test_the_container_indexes_ranks_and_serializes(tiny):
    model, x, _, qmodel = tiny
    errs = layer_errors(model, qmodel, x, batch_size=7, max_samples=25)
    assert isinstance(errs, LayerErrors) and all(isinstance(r, LayerError) for r in errs)
    assert errs.num_samples == 25 and errs["x"].num_elements == 25 * 6
    assert len(errs) == 7 and errs[0] is errs["x"] and errs[-1].name == "<output>" and list(errs)[1] is errs["bn"]
    with pytest.raises(ConfigError, match="'conv9'") as info:
        errs["conv9"]
    assert info.value.layer == "conv9"
    layers_only = [r for r in errs if r.name != "<output>"]
    assert errs.worst(2).names == tuple(r.name for r in sorted(layers_only, key=lambda r: r.sqnr_db)[:2])
    assert errs.worst(1, by="mse").names == (max(layers_only, key=lambda r: r.mse).name,)
    assert "bn" not in errs.worst(9, by="max_error_steps").names  # no scale: not ranked
    with pytest.raises(ConfigError, match="by"):
        errs.worst(by="accuracy")
    with pytest.raises(ConfigError, match="n"):
        errs.worst(0)
    d = json.loads(json.dumps(errs.to_dict()))
    assert d["source"] == ["tiny", qmodel.name] and d["num_samples"] == 25
    assert [set(row) for row in d["layers"]] == [{f.name for f in dataclasses.fields(LayerError)}] * 7
    assert d["layers"][1]["scale"] is None and d["layers"][0]["sqnr_db"] == pytest.approx(errs["x"].sqnr_db)
    text = errs.table()
    assert str(errs) == text and all(name in text for name in errs.names) and "sqnr_db" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        errs.num_samples = 3


def test_identical_models_have_no_error():
    model, x = tiny_model(), tiny_data()
    errs = layer_errors(model, model, x)
    assert errs.names == ("x", "d1", "bn", "relu", "d2", "add", "head", "<output>")
    assert all(r.mse == 0 and r.sqnr_db == math.inf and r.scale is None for r in errs)
    assert json.loads(json.dumps(errs.to_dict()))["layers"][0]["sqnr_db"] == "inf"


@tf_only
def test_a_qat_model_runs_in_inference(tiny):
    model, x, calibration, qmodel = tiny
    qat = kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat", calibration=calibration)
    errs, ptq = layer_errors(model, qat, x), layer_errors(model, qmodel, x)
    assert errs.names == ptq.names
    # The Add's inputs share one quantizer (called once per input): each call is matched to its own
    # layer, on the union of both PTQ ranges.
    assert qat.quantization_report.shared == (("relu", "d2"),)
    assert errs["relu"].scale == errs["d2"].scale >= max(ptq["relu"].scale, ptq["d2"].scale) * (1 - 1e-6)
    assert errs["relu"].mse != errs["d2"].mse
    assert all(r.cosine_similarity > 0.99 for r in errs)
    twice = layer_errors(model, qat, x)  # training=False: the observing quantizers do not move
    assert [r.mse for r in twice] == [r.mse for r in errs]


def test_bad_input_is_named(tmp_path):
    model, x = tiny_model(), tiny_data()
    qmodel = model  # the checks come before anything is run
    with pytest.raises(NoDataError):
        layer_errors(model, qmodel, x[:0])
    with pytest.raises(NoDataError):
        layer_errors(model, qmodel, [])
    with pytest.raises(ShapeMismatchError, match="data") as info:
        layer_errors(model, qmodel, np.zeros((4, 5), "float32"))
    assert info.value.actual == (4, 5)
    with pytest.raises(ConfigError, match="max_samples"):
        layer_errors(model, qmodel, x, max_samples=0)
    with pytest.raises(ConfigError, match="quantized_model=") as info:
        layer_errors(model, b"not a flatbuffer at all", x)
    assert info.value.field == "quantized_model" and "TFL3" in str(info.value)
    with pytest.raises(ConfigError, match="model.onnx"):
        layer_errors(model, str(tmp_path / "model.onnx"), x)
    with pytest.raises(ConfigError, match="no such file"):
        layer_errors(model, tmp_path / "missing.tflite", x)
    other = keras.Sequential([keras.Input((6,), name="z"), L.Dense(3, name="other_dense")], name="other")
    with pytest.raises(ConfigError, match="no layer in common") as info:
        layer_errors(model, other, x)
    assert "'d1'" in str(info.value) and "'other_dense'" in str(info.value)
    with pytest.raises(ConfigError, match="float_model"):
        layer_errors("model.keras", qmodel, x)


# The trained CNN ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    model, (x_train, _), (x_test, _) = models.trained()
    calibration = models.calibrate(model, x_train[:512])
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)
    return model, calibration, x_test, qmodel, layer_errors(model, qmodel, x_test)


def inputs_with_rows(model, name, rows):
    """The nearest float layers upstream of `name` that have a row (through layers without one)."""
    found, todo = [], [name]
    while todo:
        layer = model.get_layer(todo.pop())
        for t in layer._inbound_nodes[0].input_tensors:
            source = t._keras_history.operation.name
            (found if source in rows else todo).append(source)
    return found


def sqnr_jumps(model, errs):
    """`{layer: SQNR lost at it}`: its noisiest input's SQNR minus its own (where error enters the graph)."""
    rows = {r.name: r.sqnr_db for r in errs if r.name != "<output>"}
    jumps = {}
    for name, sqnr in rows.items():
        sources = inputs_with_rows(model, name, rows) if name != "image" else []
        if sources:
            jumps[name] = min(rows[s] for s in sources) - sqnr
    return jumps


@tf_only
@pytest.mark.slow
def test_int8_ptq_keeps_every_layer_close(cnn):
    model, _, x_test, _, errs = cnn
    names = set(errs.names)
    assert names >= {"image", "bn1", "relu1", "bn_dw", "relu_dw", "bn_pw", "add", "relu_add", "maxpool", "conv2",
                     "gap", "fc", "logits", "<output>"}
    assert not names & {"conv1", "dw", "pw"}  # folded: their BatchNormalization's row stands for them
    # Measured: SQNR 31-56 dB (lowest at bn_pw), cosine >= 0.9996.
    assert all(r.sqnr_db > 27 and r.cosine_similarity > 0.999 for r in errs), errs.table()
    assert errs["image"].max_error_steps == pytest.approx(0.5, abs=1e-3)  # the input is only rounded
    assert errs["maxpool"].scale == errs["relu_add"].scale  # max pooling keeps its input's grid
    # The mean error is under a step; the max is not bounded (test values beyond the calibrated range clip).
    assert all(r.mae < r.scale for r in errs if r.scale is not None), errs.table()
    assert errs["<output>"].mse == errs["logits"].mse and errs.num_samples == len(x_test)


@tf_only
@pytest.mark.slow
def test_4_bit_is_worse_than_8_bit(cnn):
    model, calibration, x_test, _, errs8 = cnn
    weights = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True)
    w4a4 = kq.quantize_model(model, kq.QuantConfig(weights=weights, activations=kq.QuantSpec(bits=4)),
                             calibration=calibration)
    errs4 = layer_errors(model, w4a4, x_test)
    assert errs4.names == errs8.names
    worse = [n for n in errs8.names if errs4[n].sqnr_db < errs8[n].sqnr_db - 6]
    assert len(worse) >= 0.9 * len(errs8), errs4.table()
    # 4 bits fewer is about 24 dB of SQNR per quantizer; measured 27 dB lost at the output.
    assert errs4["<output>"].sqnr_db < errs8["<output>"].sqnr_db - 15
    assert errs4["image"].max_error_steps == pytest.approx(0.5, abs=1e-3)


@tf_only
@pytest.mark.slow
@pytest.mark.parametrize("name, entry", [("relu_dw", "bn_dw"), ("conv2", "conv2")])
def test_a_2_bit_layer_is_where_the_error_enters(cnn, name, entry):
    model, calibration, x_test, _, errs8 = cnn
    config = kq.QuantConfig.int8()
    config.set_layer_name(name, activations=kq.QuantSpec(bits=2))
    errs2 = layer_errors(model, kq.quantize_model(model, config, calibration=calibration), x_test)
    jumps = sqnr_jumps(model, errs2)
    # The SQNR lost at the 2-bit layer is the largest jump (measured 27-38 dB; at bn1, after the
    # input, 13 dB; elsewhere under 3 dB). Downstream layers lose little more: the error is inherited.
    # relu_dw's ReLU is fused into the depthwise convolution, which writes its 2-bit grid as the
    # file's DEPTHWISE_CONV_2D does: the error enters at the convolution's row (bn_dw).
    assert max(jumps, key=jumps.get) == entry and jumps[entry] > 20, jumps
    assert all(j < jumps[entry] - 10 for n, j in jumps.items() if n != entry), jumps
    index = errs2.names.index(entry)  # in this graph, every row before the 2-bit layer is upstream of it
    for n in errs2.names[:index]:  # the same computation up to the 2-bit layer
        assert errs2[n].mse == pytest.approx(errs8[n].mse, rel=1e-6), n
    assert all(errs2[n].sqnr_db < errs8[n].sqnr_db - 10 for n in errs2.names[index:]), errs2.table()


@tf_only
@pytest.mark.slow
def test_the_tflite_file_has_the_keras_models_errors(cnn, tmp_path):
    model, calibration, x_test, qmodel, errs = cnn
    path = tmp_path / "cnn.tflite"
    kq.export_tflite(qmodel, path, mode="int8")
    file_errs = layer_errors(model, path, x_test)
    assert file_errs.source == ("export_cnn", "cnn.tflite")
    # bn1, bn_dw and add have no tensor of their own (their ReLU is fused into the op).
    assert set(file_errs.names) == set(errs.names) - {"bn1", "bn_dw", "add"}, file_errs.names
    for row in file_errs:  # measured: within 0.01 dB
        assert row.sqnr_db == pytest.approx(errs[row.name].sqnr_db, abs=1.0), row.name
        if errs[row.name].scale is not None:  # the same grids
            assert row.scale == pytest.approx(errs[row.name].scale, rel=1e-6), row.name
        assert row.cosine_similarity > 0.999
    picture = kq.analysis.compare_models(model, path, x_test, latency_runs=0)
    out = file_errs["<output>"]  # the same, but for float32 rounding in the float model's two graphs
    assert out.max_error == pytest.approx(picture.max_abs_diff, rel=1e-4)
    assert out.mae == pytest.approx(picture.mean_abs_diff, rel=1e-4)
    assert out.max_error_steps == pytest.approx(picture.max_diff_steps, rel=1e-4)
    as_bytes = layer_errors(model, path.read_bytes(), x_test, max_samples=100)
    assert as_bytes.num_samples == 100 and as_bytes.names == file_errs.names

    float_io, _ = kq.export.tflite.tflite_bytes(qmodel, "int8", input_type="float32", output_type="float32")
    float_io_errs = layer_errors(model, float_io, x_test)  # QUANTIZE in, DEQUANTIZE out: the same integer tensors
    assert float_io_errs.names == file_errs.names
    assert all(a.mse == pytest.approx(b.mse, rel=1e-6) for a, b in zip(float_io_errs, file_errs))
    assert float_io_errs["<output>"].scale == pytest.approx(out.scale)


@tf_only
@pytest.mark.slow
def test_an_int16x8_file_is_closer_than_int8(cnn):
    model, calibration, x_test, _, errs8 = cnn
    q16 = kq.quantize_model(model, kq.QuantConfig.int16x8(), calibration=calibration)
    data, _ = kq.export.tflite.tflite_bytes(q16, "int16x8")
    errs16 = layer_errors(model, data, x_test)
    assert errs16["image"].max_error_steps == pytest.approx(0.5, abs=1e-3)
    assert errs16["image"].sqnr_db > errs8["image"].sqnr_db + 40  # 8 more bits of input: ~48 dB
    # Measured +3 dB or more on every layer (the int8 weights' error remains).
    assert all(r.sqnr_db > errs8[r.name].sqnr_db + 1 for r in errs16), errs16.table()


@tf_only
def test_a_layers_own_softmax_is_its_row_in_the_file(tmp_path):
    # Dense(..., activation="softmax"): the file writes a matmul, then a SOFTMAX whose output (the model's
    # output tensor) names no layer. The layer's row is the softmax's output on both sides, not the logits.
    (x_train, y_train), (x_test, _) = datasets.load_digits()
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Flatten(name="flat")(inp)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(x))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=2, verbose=0)
    cb = kq.CalibrationCallback()
    model.predict(x_train[:256], callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, calibration=cb.result)
    path = tmp_path / "probs.tflite"
    kq.export_tflite(qmodel, path)
    errs = layer_errors(model, path, x_test[:100])
    assert errs["probs"].scale == pytest.approx(1 / 256)
    assert errs["probs"].max_error_steps <= 2, errs.table()
    assert errs["probs"].mse == pytest.approx(errs[errs.names[-1]].mse)  # the same tensor as the output row


@tf_only
def test_layers_with_folded_input_affines_keep_their_own_rows(tmp_path):
    """A Rescaling / lone BatchNormalization folded into the layer reading it has no row; that layer's row
    compares its own outputs (not the folded layer's), in the Keras model and in the file."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3), name="img")
    h = keras.layers.Rescaling(1 / 255, name="rescale")(inp)
    h = keras.layers.Conv2D(4, 3, name="conv")(h)
    p = keras.layers.MaxPooling2D(name="pool")(h)
    b = keras.layers.BatchNormalization(name="lone_bn")(p)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flat")(keras.layers.Conv2D(2, 1, name="pw")(b)))
    model = keras.Model(inp, out)
    bn = model.get_layer("lone_bn")
    bn.set_weights([np.full(4, 1.5, "float32"), np.full(4, 0.2, "float32"), np.full(4, 0.1, "float32"),
                    np.full(4, 2.0, "float32")])
    x = np.random.default_rng(0).uniform(0, 255, (40, 6, 6, 3)).astype("float32")
    qmodel = kq.quantize_model(model, calibration=models.calibrate(model, x))
    assert dict(qmodel.quantization_report.input_folds) == {"rescale": "conv", "lone_bn": "pw"}
    path = str(tmp_path / "folds.tflite")
    kq.export_tflite(qmodel, path)
    for artifact in (qmodel, path):
        errs = layer_errors(model, artifact, x)
        assert "rescale" not in errs.names and "lone_bn" not in errs.names
        assert {"conv", "pw", "head"} <= set(errs.names), errs.names
        assert all(errs[n].sqnr_db > 25 for n in ("conv", "pool", "pw", "head")), [errs[n].sqnr_db for n in errs.names]


@tf_only
def test_tflite_rows_are_the_runners_intermediate_tensors(tiny, tmp_path):
    """Each TFLite row compares the float layer with the tensor `TFLiteRunner.intermediates` reads: the one
    whose name mentions the layer (an integer tensor before a float one)."""
    from keras_quant.runtime import TFLiteRunner

    model, x, _, qmodel = tiny
    path = tmp_path / "tiny.tflite"
    kq.export_tflite(qmodel, path)
    errs = layer_errors(model, path, x)
    runner = TFLiteRunner(path.read_bytes(), preserve_all_tensors=True)
    details = runner.tensor_details()
    (y,) = runner.intermediates(x, [runner.output_details[0]["index"]])
    reference = np64(model.predict(x, verbose=0))
    assert errs["<output>"] == activation_error("<output>", reference, y, runner.output_quantization[0])
    float_layer = keras.Model(model.inputs, model.get_layer("d2").output)
    d2 = [i for i, d in details.items() if "d2" in d["name"] and np.issubdtype(d["dtype"], np.integer)]
    rows = [activation_error("d2", np64(float_layer.predict(x, verbose=0)), q) for q in runner.intermediates(x, d2)]
    assert any(r.mse == errs["d2"].mse and r.cosine_similarity == errs["d2"].cosine_similarity for r in rows)
