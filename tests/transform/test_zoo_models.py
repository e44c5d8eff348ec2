"""A handful of the benchmark's zoo models, at tiny sizes, through every stage (the full zoo is
`python benchmarks/run.py --only zoo`).

Each: calibrate with the default callback, PTQ, strict TFLite int8 in the LiteRT interpreter
(within a few output steps of its Keras model), ONNX in onnxruntime, QAT from the calibration (a
finite, falling loss) and the QAT model's export.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq
from tests.benchmarks import load_benchmark

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

ZOO = load_benchmark("zoo_models")
# name -> input size: the cheapest members of each family the zoo has.
CASES = {"MobileNetV3Small": 32, "Transformer": 16, "LSTM_GRU": 12, "UNet": 16, "Conv1D_audio": 64}


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_passes_every_stage(name, tmp_path):
    zoo = ZOO.MODELS[name]
    model = zoo.build(CASES[name])
    x, y = ZOO.synthetic(zoo, 64, CASES[name])
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)  # moving statistics that are not the initial ones
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, calibration=cb.result)
    assert not qmodel.quantization_report.unsupported, qmodel.quantization_report.unsupported

    report = kq.export_tflite(qmodel, tmp_path / "int8.tflite")
    runner = kq.runtime.load(str(tmp_path / "int8.tflite"))
    got, expected = runner.predict(x), qmodel.predict(x, verbose=0)
    steps = np.abs(got - expected).reshape(len(x), -1).max(axis=1) / float(runner.output_quantization[0])
    assert np.percentile(steps, 99) <= 2.0 + 1e-6 and steps.max() <= 6.0 + 1e-6, (name, steps.max(), report)
    islands = {key for key, _, _ in qmodel.quantization_report.float_islands}
    assert all(set(layers) <= islands for _, _, layers in report.float_ops), (report.float_ops, islands)

    report = kq.export_onnx(qmodel, tmp_path / "int8.onnx")
    onnx_runner = kq.runtime.load(str(tmp_path / "int8.onnx"))
    onnx_out = onnx_runner.predict(x)
    assert onnx_out.shape == expected.shape and np.all(np.isfinite(onnx_out))
    onnx_steps = np.abs(onnx_out - expected).reshape(len(x), -1).max(axis=1) / float(runner.output_quantization[0])
    assert np.percentile(onnx_steps, 99) <= 3.0, (name, onnx_steps.max(), report.notes)
    # Recurrent loops convert only with a static batch: they are traced unrolled, and the note says so. Every
    # model (the Transformer's Dense layers on rank-3 tensors too) keeps a symbolic batch.
    assert not any("batch 1" in n for n in report.notes), report.notes
    assert any("unrolled" in n for n in report.notes) == (name == "LSTM_GRU"), report.notes
    if name in ("Transformer", "LSTM_GRU"):
        np.testing.assert_allclose(onnx_runner.predict(x, batch_size=100), onnx_out, atol=1e-6)

    qat = kq.quantize_model(model, mode="qat", calibration=cb.result)
    qat.compile(keras.optimizers.Adam(1e-4), model.loss)
    losses = qat.fit(x, y, epochs=3, batch_size=32, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    kq.export_tflite(qat, tmp_path / "qat.tflite")


# The post-training algorithms on real architectures: SE blocks, hard swish and a folded input Rescaling
# (MobileNetV3Small), integer token inputs and Dense on rank-3 tensors (Transformer), keras.ops nodes and
# Conv1D (Conv1D_audio). Every wrapper is corrected or skipped with a reason, and the file still computes
# what the Keras model computes.
@pytest.mark.parametrize("name", ["MobileNetV3Small", "Transformer", "Conv1D_audio"])
def test_post_training_algorithms_on_zoo_models(name, tmp_path):
    zoo = ZOO.MODELS[name]
    model = zoo.build(CASES[name])
    x, _ = ZOO.synthetic(zoo, 64, CASES[name])
    cb = kq.CalibrationCallback(statistics="range")
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, calibration=cb.result)
    wrappers = {layer.name for layer in qmodel.layers if isinstance(layer, kq.QuantizeWrapper)}

    bias = kq.ptq.correct_bias(model, qmodel, x)
    corrected = {name for name, _, _ in bias.corrected}
    assert corrected and corrected | {n for n, _ in bias.skipped} == wrappers, (bias.skipped, wrappers)
    assert all(np.isfinite(mean) and np.isfinite(peak) for _, mean, peak in bias.corrected)
    softmax = kq.ptq.narrow_softmax_inputs(model, qmodel, x)
    heads = {n for n, *_ in softmax.narrowed} | {n for n, _ in softmax.skipped}
    assert heads, str(softmax)  # each of these models ends in a Dense softmax

    kq.export_tflite(qmodel, tmp_path / "int8.tflite")
    runner = kq.runtime.load(str(tmp_path / "int8.tflite"))
    got, expected = runner.predict(x), qmodel.predict(x, verbose=0)
    steps = np.abs(got - expected).reshape(len(x), -1).max(axis=1) / float(runner.output_quantization[0])
    assert np.percentile(steps, 99) <= 2.0 + 1e-6 and steps.max() <= 6.0 + 1e-6, (name, steps.max())
