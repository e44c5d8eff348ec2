"""Every input dtype and dtype policy a Keras model takes: calibrated, quantized, exported and run (issue 17, point 5).

Integer inputs (token ids for an Embedding, uint8 pixels for a Rescaling, raw
integers a Dense reads) are observed as float32; a model under
`mixed_float16` or built with `dtype="float16"` exports through a float32 copy.
Each file is run with `kq.runtime.load` and compared with the float model.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]


def _roundtrip(model, x, tmp_path, tolerance):
    """Calibrate on `x`, quantize, export TFLite int8 and ONNX, run both: `(calibration, qmodel)`."""
    cb = kq.CalibrationCallback()
    model.predict(x, callbacks=[cb], verbose=0)
    result = cb.result
    qmodel = kq.quantize_model(model, kq.QuantConfig(), calibration=result)
    ref = np.asarray(model.predict(x, verbose=0), np.float32)
    keras_out = np.asarray(qmodel.predict(x, verbose=0), np.float32)
    bound = tolerance * max(float(np.abs(ref).max()), 1e-6)
    np.testing.assert_allclose(keras_out, ref, atol=bound)
    kq.export_tflite(qmodel, str(tmp_path / "m.tflite"), mode="int8")
    kq.export_onnx(qmodel, str(tmp_path / "m.onnx"))
    for name in ("m.tflite", "m.onnx"):
        out = kq.runtime.load(str(tmp_path / name)).predict(x)
        np.testing.assert_allclose(np.asarray(out, np.float32), keras_out, atol=bound, err_msg=name)
    return result, qmodel


def test_embedding_on_int32_token_ids(tmp_path):
    inp = keras.Input((8,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(50, 4, name="embed")(inp)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    x = np.random.default_rng(0).integers(0, 50, (64, 8)).astype("int32")
    result, qmodel = _roundtrip(keras.Model(inp, out), x, tmp_path, 0.1)
    assert result["tokens"].count == x.size  # observed (as float32), though the ids stay integers
    assert result["tokens"].max == x.max()
    assert qmodel.inputs[0].dtype == "int32"


def test_uint8_images_through_rescaling(tmp_path):
    inp = keras.Input((8, 8, 1), dtype="uint8", name="pixels")
    h = keras.layers.Rescaling(1 / 255.0, name="scale")(inp)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    x = np.random.default_rng(1).integers(0, 256, (64, 8, 8, 1)).astype("uint8")
    result, qmodel = _roundtrip(keras.Model(inp, out), x, tmp_path, 0.1)
    assert result["pixels"].count == x.size and result["pixels"].max == x.max()
    # the Rescaling casts the integers itself: kept float, not folded into the convolution
    assert "scale" in [key for key, _, _ in qmodel.quantization_report.float_islands]
    assert qmodel.quantization_report.input_folds == ()


def test_dense_on_raw_integers(tmp_path):
    inp = keras.Input((8,), dtype="int32", name="counts")
    out = keras.layers.Dense(3, name="head")(inp)
    x = np.random.default_rng(2).integers(0, 20, (64, 8)).astype("int32")
    result, qmodel = _roundtrip(keras.Model(inp, out), x, tmp_path, 0.1)
    assert result["counts"].count == x.size
    assert ("counts_quant", "counts") in qmodel.quantization_report.activation_quantizers


def _conv_model(dtype=None):
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu", dtype=dtype, name="conv")(inp)
    h = keras.layers.Flatten(dtype=dtype)(h)
    return keras.Model(inp, keras.layers.Dense(3, dtype=dtype, name="head")(h))


def test_float16_layers(tmp_path):
    model = _conv_model("float16")
    x = np.random.default_rng(3).random((64, 8, 8, 1)).astype("float32")
    _, qmodel = _roundtrip(model, x, tmp_path, 0.1)
    from keras_quant.transform.guards import float_policy

    assert float_policy(qmodel) == "float16"  # the Keras model keeps its policy; export traced a float32 copy


def test_mixed_float16_policy(tmp_path):
    x = np.random.default_rng(4).random((64, 8, 8, 1)).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _conv_model()
        _roundtrip(model, x, tmp_path, 0.1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_float16_export_writes_the_float32_model_file(tmp_path):
    """The int8 file of a float16 model is the one its float32 twin (same weights, same calibration) gives."""
    x = np.random.default_rng(5).random((32, 8, 8, 1)).astype("float32")
    half = _conv_model("float16")
    single = _conv_model()
    single.set_weights([w.astype("float32") for w in half.get_weights()])
    cb = kq.CalibrationCallback()
    single.predict(x, callbacks=[cb], verbose=0)
    files = []
    for i, model in enumerate((half, single)):
        qmodel = kq.quantize_model(model, kq.QuantConfig(), calibration=cb.result)
        path = tmp_path / f"m{i}.tflite"
        kq.export_tflite(qmodel, str(path))
        files.append(kq.runtime.load(str(path)).predict(x))
    np.testing.assert_array_equal(files[0], files[1])
