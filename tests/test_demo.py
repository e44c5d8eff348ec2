"""The main job end to end (few epochs) and its JSON output."""

import json

import keras
import numpy as np
import pytest

from keras_quant import cli
from keras_quant.cli import demo
from keras_quant.config import QuantSpec


@pytest.mark.slow
def test_demo_runs_end_to_end_and_quantized_models_keep_accuracy(capsys, tmp_path):
    report = tmp_path / "report.html"
    assert cli.main(["demo", "--dataset", "digits", "--epochs", "8", "--json", "--report", str(report)]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert set(tables) == {"dataset", "weights", "activations", "accuracy", "deployed", "analysis"}
    assert tables["dataset"] == "digits"

    acc = {row["scheme"]: row["accuracy"] for row in tables["accuracy"]}
    assert acc["float32"] > 0.85
    # int8 weights and activations lose little; 4-bit weights lose more than 8-bit.
    assert acc["W8 (weights only)"] >= acc["float32"] - 0.02
    assert acc["W8A8 (minmax)"] >= acc["float32"] - 0.03
    w8 = [r for r in tables["weights"] if r["scheme"] == "int8 per-channel"]
    w4 = [r for r in tables["weights"] if r["scheme"] == "int4 per-channel"]
    assert len(w8) == 4 and all(a["sqnr_db"] > b["sqnr_db"] + 15 for a, b in zip(w8, w4))
    assert all(r["sqnr_db"] > 35 for r in w8)

    # QAT: W8A8 keeps float accuracy within a point; W4A4 with LSQ beats W4A4 post-training.
    qat = {k.split(" (")[0]: v for k, v in acc.items() if "QAT" in k}
    assert qat["W8A8 QAT"] >= acc["float32"] - 0.01
    gptq = [v for k, v in acc.items() if k.startswith("W4A8 PTQ + GPTQ")]
    if gptq:  # GPTQ and bias correction on the W4A8 model: at least as accurate as min-max W4A8, less noise
        plain = next(v for k, v in acc.items() if k.startswith("W4A8 PTQ model (minmax"))
        assert gptq[0] >= plain - 0.02
    ptq_w4a4 = [v for k, v in acc.items() if k.startswith("W4A4 PTQ")]
    if ptq_w4a4:  # the PTQ rows need the calibration callback (TensorFlow's trainer)
        assert qat["W4A4 QAT + LSQ"] > ptq_w4a4[0]
    assert qat["W4A4 QAT + LSQ"] >= acc["float32"] - 0.03

    # Export (TensorFlow): every artifact, run in its runtime, agrees with its Keras model.
    if keras.backend.backend() == "tensorflow":
        deployed = {row["artifact"]: row for row in tables["deployed"]}
        assert set(deployed) == {"float -> TFLite float32", "W8A8 PTQ -> TFLite int8", "W8A8 PTQ -> ONNX QDQ",
                                 "W4A8 PTQ -> TFLite int8", "W4A8 PTQ + GPTQ -> TFLite int8",
                                 "16x8 PTQ -> TFLite int16x8", "W8A8 QAT -> TFLite int8"}
        for label, row in deployed.items():
            assert row["agreement"] >= 0.99, label
            if row["max_diff_steps"] is not None and "int16" not in label:
                assert row["max_diff_steps"] <= 2.0 + 1e-4, label
            assert row["accuracy"] >= acc["float32"] - 0.03, label
        assert deployed["W8A8 PTQ -> TFLite int8"]["size_kib"] < 0.35 * deployed["float -> TFLite float32"]["size_kib"]
        # The analysis of the W8A8 PTQ model and its two files, written to the report.
        analysis = tables["analysis"]
        assert [c["source"] for c in analysis["comparisons"]] == [
            "keras quantized", "w8a8_ptq_tflite_int8.tflite", "w8a8_ptq_onnx_qdq.onnx"]
        assert set(analysis["layer_errors"]) == {"keras quantized", "w8a8_ptq_tflite_int8.tflite"}
        assert analysis["sensitivity"]["ranking"] and analysis["mixed_precision"]["met"]
        assert analysis["report"] == str(report) and "data:image/png;base64," in report.read_text()
    else:
        assert tables["deployed"] == [] and tables["analysis"] is None
        assert not report.exists()

    tensors = {r["tensor"] for r in tables["activations"]}
    assert tensors == {"image", "conv1", "conv2", "pool", "flatten", "fc", "classifier"}
    for row in tables["activations"]:
        assert row["a8_sqnr_db"] > row["a4_sqnr_db"]


def test_simulated_forward_leaves_the_model_as_it_found_it(rng):
    model = demo.build_model()
    x = rng.random((6, 8, 8, 1)).astype("float32")
    float_out = keras.ops.convert_to_numpy(model(x))
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
    w4 = QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    quant_out = demo._forward(model, x, weight_spec=w4, batch_size=4)
    assert np.abs(quant_out - float_out).max() > 0  # the kernels really were quantized
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), b)
    np.testing.assert_array_equal(demo._forward(model, x), float_out)

    # A failing run still puts the float kernels back.
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    layer = model.get_layer("fc")
    layer.call = broken
    with pytest.raises(RuntimeError, match="boom"):
        demo._forward(model, x, weight_spec=w4)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), b)


def test_demo_data_is_fashion_mnist_when_installed_else_the_digits(monkeypatch):
    from keras_quant.cli import datasets
    from keras_quant.errors import ConfigError

    (x, y), (xt, yt), name = demo.load_data("digits")
    assert name == "digits" and x.shape[1:] == (8, 8, 1) and len(xt) == len(yt)
    if datasets.fashion_mnist_available():
        (x, y), (xt, yt), name = demo.load_data("auto")
        assert name == "fashion_mnist" and x.shape == (demo.FASHION_TRAIN, 28, 28, 1) and len(xt) == demo.FASHION_TEST
    monkeypatch.setattr(datasets, "fashion_mnist_available", lambda *a, **k: False)
    assert demo.load_data("auto")[2] == "digits"
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        demo.load_data("fashion")
    with pytest.raises(ConfigError, match="dataset"):
        demo.load_data("cifar")
