"""`kq.ptq.quantize`: the post-training algorithm stack, from Python and from `keras-quant calibrate`."""

import numpy as np
import pytest

import keras_quant as kq
from keras_quant import cli
from keras_quant.errors import ConfigError
from keras_quant.ptq.pipeline import ALGORITHMS, check_algorithms


def test_algorithms_run_in_their_fixed_order():
    assert check_algorithms(["bias_correction", "gptq", "equalize"]) == ("equalize", "gptq", "bias_correction")
    assert check_algorithms("adaround") == ("adaround",)
    assert check_algorithms(()) == ()
    assert ALGORITHMS[0] == "equalize" and ALGORITHMS[-1] == "softmax_ranges"


@pytest.mark.parametrize("algorithms, fragment", [
    (["gptq", "adaround"], "pick one"),
    (["gptq", "gptq"], "named twice"),
    (["awq"], "unknown algorithm"),
])
def test_bad_algorithm_lists_are_config_errors(algorithms, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_algorithms(algorithms)


@pytest.fixture(scope="module")
def digits_cnn():
    """A small CNN trained a few epochs on scikit-learn's digits; `(model, x_calib, x_test, y_test)`."""
    import keras

    from keras_quant.cli import datasets

    (x, y), (xt, yt) = datasets.load_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(x.shape[1:]),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, padding="same"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(16, 1),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=6, batch_size=64, verbose=0)
    return model, x[-256:], xt, yt


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y))


def test_unknown_options_are_config_errors(digits_cnn):
    model, x, _, _ = digits_cnn
    with pytest.raises(ConfigError, match="not an option of kq.ptq.gptq"):
        kq.ptq.quantize(model, x, algorithms=["gptq"], options={"gptq": {"frobnicate": 1}})
    with pytest.raises(ConfigError, match="an algorithm not run"):
        kq.ptq.quantize(model, x, algorithms=["gptq"], options={"adaround": {}})


@pytest.mark.slow
@pytest.mark.tensorflow  # the calibration callback hooks TensorFlow's trainer
def test_the_stack_runs_in_order_keeps_the_float_model_and_exports(digits_cnn, tmp_path):
    model, x, xt, yt = digits_cnn
    before = [w.copy() for w in model.get_weights()]
    config = kq.QuantConfig.w4a8()
    plain = kq.ptq.quantize(model, x, config, algorithms=())
    qmodel = kq.ptq.quantize(model, x, config, algorithms=("bias_correction", "gptq", "equalize"),
                             progress=False)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # the user's model is not touched
    report = qmodel.ptq_report
    assert [n for n, _, _ in report.steps] == ["equalize", "calibrate", "quantize", "gptq", "bias_correction"]
    assert report.num_samples == len(x) and report.seconds("gptq") > 0
    assert "[gptq]" in str(report) and "[bias_correction]" in str(report)
    acc_plain, acc_stack = _accuracy(plain, xt, yt), _accuracy(qmodel, xt, yt)
    assert acc_stack >= acc_plain - 0.02, (acc_plain, acc_stack)
    path = tmp_path / "w4a8.tflite"
    kq.export_tflite(qmodel, path, mode="int8")
    runner = kq.runtime.load(path)
    keras_argmax = np.argmax(qmodel.predict(xt[:200], verbose=0), -1)
    assert np.mean(np.argmax(runner.predict(xt[:200]), -1) == keras_argmax) >= 0.98
    onnx_path = tmp_path / "w4a8.onnx"  # the same weights reach ONNX through its export path
    kq.export_onnx(qmodel, onnx_path)
    assert np.mean(np.argmax(kq.runtime.load(onnx_path).predict(xt[:200]), -1) == keras_argmax) >= 0.98


@pytest.mark.slow
@pytest.mark.tensorflow
def test_calibrate_command_writes_the_quantized_model(digits_cnn, tmp_path, capsys):
    import keras

    model, x, xt, _ = digits_cnn
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "calib.npy", x[:64])
    argv = ["calibrate", str(tmp_path / "model.keras"), "--data", str(tmp_path / "calib.npy"), "-o",
            str(tmp_path / "calib.json"), "--weight-bits", "4", "--per-channel", "--algorithm", "gptq",
            "--algorithm", "bias_correction", "--save-model", str(tmp_path / "q.keras")]
    bad = argv[:-6] + ["--algorithm", "adaround", "--time-budget", "0", "--save-model", str(tmp_path / "b.keras")]
    assert cli.main(bad) == 1  # checked by kq.ptq.adaround: a budget must be > 0
    assert "time_budget" in capsys.readouterr().err and not (tmp_path / "b.keras").exists()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[gptq]" in out and out.rstrip().endswith(f"wrote {tmp_path / 'q.keras'} (quantized model)")
    qmodel = keras.models.load_model(tmp_path / "q.keras", safe_mode=True)
    wrapper = next(layer for layer in qmodel.layers if isinstance(layer, kq.QuantizeWrapper))
    assert wrapper.quant_config.weights.bits == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert cli.main(["export", str(tmp_path / "q.keras"), "-o", str(tmp_path / "q.tflite")]) == 0


@pytest.mark.parametrize("extra, fragment", [
    (["--algorithm", "gptq"], "--save-model"),
    (["--save-model", "q.h5"], "written as a .keras file"),
    (["--algorithm", "gptq", "--save-model", "q.keras", "--time-budget", "5"], "add --algorithm adaround"),
])
def test_calibrate_algorithm_usage_errors_are_one_line(extra, fragment, tmp_path, capsys):
    argv = ["calibrate", str(tmp_path / "missing.keras"), "--data", str(tmp_path / "x.npy"), "-o",
            str(tmp_path / "c.json")] + extra
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
