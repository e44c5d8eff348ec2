"""`keras-quant export` and `keras-quant analyze` through their entry point, bad input included."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant import cli
from keras_quant.cli import datasets

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A float and a PTQ .keras model of a small digits CNN, and an .npz with test inputs and labels."""
    folder = tmp_path_factory.mktemp("cli")
    (x, y), (xt, yt) = datasets.load_digits()
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(16, activation="relu", name="fc")(h)
    model = keras.Model(inp, keras.layers.Dense(10, name="logits")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    cb = kq.CalibrationCallback()
    model.predict(x[:256], callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=cb.result)
    paths = {"float": folder / "float.keras", "ptq": folder / "ptq.keras", "data": folder / "test.npz"}
    model.save(paths["float"])
    qmodel.save(paths["ptq"])
    np.savez(paths["data"], x=xt[:200], y=yt[:200])
    return {k: str(v) for k, v in paths.items()}, folder


def run_json(argv, capsys):
    assert cli.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_tflite_and_check_it_in_litert(files, capsys):
    paths, folder = files
    out = run_json(["export", paths["ptq"], "-o", str(folder / "m.tflite"), "--data", paths["data"]], capsys)
    assert out["export"]["mode"] == "int8" and out["export"]["input_type"] == "int8"
    assert out["export"]["float_ops"] == [] and (folder / "m.tflite").stat().st_size == out["export"]["size_bytes"]
    c = out["comparison"]
    assert c["num_samples"] == 200 and c["argmax_agreement"] >= 0.99 and c["max_diff_steps"] <= 2.0 + 1e-4
    assert c["candidate_accuracy"] > 0.85


def test_export_other_modes_and_onnx(files, capsys):
    paths, folder = files
    out = run_json(["export", paths["ptq"], "-o", str(folder / "f.tflite"), "--mode", "int8",
                    "--input-type", "float32", "--output-type", "float32"], capsys)
    assert out["export"]["input_type"] == "float32" and out["comparison"] is None
    out = run_json(["export", paths["float"], "-o", str(folder / "f16.tflite"), "--mode", "float16"], capsys)
    assert out["export"]["mode"] == "float16"
    out = run_json(["export", paths["ptq"], "-o", str(folder / "m.onnx"), "--opset", "17", "--data", paths["data"],
                    "--samples", "50"], capsys)
    assert out["export"]["format"] == "onnx" and out["comparison"]["num_samples"] == 50
    assert out["comparison"]["argmax_agreement"] >= 0.98
    # The text form names the file and its size.
    assert cli.main(["export", paths["ptq"], "-o", str(folder / "t.tflite")]) == 0
    assert "wrote " + str(folder / "t.tflite") in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["-o", "{folder}/m.pb"], "output"),
    (["-o", "{folder}/m.onnx", "--mode", "int8"], "mode"),
    (["-o", "{folder}/m.tflite", "--opset", "17"], "opset"),
    (["-o", "{folder}"], "output"),
    (["-o", "{folder}/m.tflite", "--data", "{folder}/missing.npz"], "no such file"),
])
def test_export_bad_arguments_are_one_line_errors(files, capsys, args, message):
    paths, folder = files
    argv = ["export", paths["ptq"]] + [a.format(folder=folder) for a in args]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-quant: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (folder / "m.pb").exists()


def test_export_of_a_float_model_to_int8_names_the_problem(files, capsys):
    paths, folder = files
    assert cli.main(["export", paths["float"], "-o", str(folder / "x.tflite")]) == 1
    assert "needs a quantized model" in capsys.readouterr().err
    assert not (folder / "x.tflite").exists()


def test_analyze_writes_the_report_and_json(files, capsys):
    from PIL import Image

    paths, folder = files
    report = folder / "report.html"
    assert cli.main(["export", paths["ptq"], "-o", str(folder / "m.tflite")]) == 0  # this test's own artifact
    capsys.readouterr()
    out = run_json(["analyze", paths["float"], "--data", paths["data"], "-o", str(report), "--budget", "0.005",
                    "--artifact", str(folder / "m.tflite"), "--method", "mse"], capsys)
    assert out["report"] == str(report) and report.stat().st_size > 10_000
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<script" not in html
    pngs = sorted((folder / "report_files").glob("*.png"))
    assert len(pngs) >= 3
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
    sources = [c["source"] for c in out["comparisons"]]
    assert sources == ["keras quantized", "m.tflite"]
    assert set(out["layer_errors"]) == {"keras quantized", "m.tflite"}
    assert all(row["sqnr_db"] > 15 for row in out["layer_errors"]["keras quantized"])
    ranking = out["sensitivity"]["ranking"]
    assert {r["layer"] for r in ranking} == {"conv", "fc", "logits"} and out["mixed_precision"]["budget"] == 0.005
    assert out["mixed_precision"]["met"] and out["mixed_precision"]["size_bytes"] <= out["mixed_precision"]["float_size_bytes"]
    assert out["methods"]["layers"]


def test_analyze_text_output(files, capsys):
    paths, folder = files
    assert cli.main(["analyze", paths["float"], "--data", paths["data"], "--no-sensitivity", "--samples", "64"]) == 0
    text = capsys.readouterr().out
    assert "Against the float model" in text and "Per-layer error: keras quantized" in text
    assert "Sensitivity" not in text


@pytest.mark.parametrize("args, message", [
    (["--data", "{folder}/test.npz", "-o", "{folder}/r.pdf"], "report"),
    (["--data", "{folder}/nothing.npz"], "no such file"),
    (["--data", "{folder}/test.npz", "--artifact", "{folder}/none.tflite"], "artifact"),
    (["--data", "{folder}/test.npz", "--budget", "-1"], "budget"),
])
def test_analyze_bad_arguments_are_one_line_errors(files, capsys, args, message):
    paths, folder = files
    argv = ["analyze", paths["float"]] + [a.format(folder=folder) for a in args]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-quant: error:") and message in err and len(err.strip().splitlines()) == 1


def test_help_of_both_commands(capsys):
    """`--help` through the module entry point (a subprocess, as the installed script runs) and in process."""
    done = subprocess.run([sys.executable, "-m", "keras_quant.cli", "export", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage: keras-quant export" in done.stdout and "--opset" in done.stdout
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: keras-quant analyze" in text and "--budget" in text and "--artifact" in text


def test_calibrate_with_auto_then_analyze_with_that_calibration(files, capsys):
    paths, folder = files
    cal = folder / "auto.json"
    out = run_json(["calibrate", paths["float"], "--data", paths["data"], "-o", str(cal), "--method", "auto",
                    "--bits", "4"], capsys)
    assert out["config"]["activations"]["observer"] == "auto"
    result = kq.CalibrationResult.load(cal)
    spec = kq.QuantSpec(bits=4, observer="auto")
    choices = {name: result[name].choose_method(spec).method for name in result.layer_names}
    assert set(choices.values()) <= {"minmax", "percentile", "mse", "kl"}
    out = run_json(["analyze", paths["float"], "--data", paths["data"], "--calibration", str(cal), "--bits", "4",
                    "--method", "auto", "--no-sensitivity"], capsys)
    assert out["methods"]["choices"] == {k: v for k, v in choices.items() if k in out["methods"]["choices"]}
    assert out["sensitivity"] is None and out["report"] is None
