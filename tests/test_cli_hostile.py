"""`keras-quant` against bad inputs and noisy libraries.

Every bad input ends in one line on stderr (`keras-quant: error: ...`) and exit status 1 (2 for bad
usage, from argparse), with no traceback, nothing on stdout and no output file left behind. The
systematic tables run in process (`cli.main`); the log-line checks run the real `python -m
keras_quant.cli` in subprocesses, with `TF_CPP_MIN_LOG_LEVEL` removed from their environment.
"""

import os
import re
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant import cli

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny float CNN, its PTQ model, exported files, data, and hostile files beside them."""
    root = tmp_path_factory.mktemp("hostile")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Flatten(name="flat")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="logits")(h))
    rng = np.random.default_rng(0)
    x = rng.random((24, 8, 8, 1), dtype=np.float32)
    cb = kq.CalibrationCallback()
    model.predict(x, callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=cb.result)
    model.save(root / "float.keras")
    qmodel.save(root / "ptq.keras")
    kq.export_tflite(qmodel, root / "ptq.tflite")
    cb.result.save(root / "cal.json")
    np.savez(root / "data.npz", x=x, y=rng.integers(0, 3, 24))
    np.save(root / "rgb.npy", rng.random((4, 8, 8, 3), dtype=np.float32))
    lam_in = keras.Input((8, 8, 1))
    lam = keras.Model(lam_in, keras.layers.Lambda(lambda t: t * 2.0)(lam_in))
    lam.save(root / "lambda.keras")
    (root / "folder.keras").mkdir()
    (root / "empty.keras").write_bytes(b"")
    (root / "empty.npz").write_bytes(b"")
    (root / "garbage.keras").write_bytes(os.urandom(2048))
    with zipfile.ZipFile(root / "zip.keras", "w") as z:
        z.writestr("config.json", "{not json")
    (root / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (root / "garbage.tflite").write_bytes(b"\x00\x00\x00\x00TFL3" + os.urandom(64))
    (root / "garbage.onnx").write_bytes(os.urandom(256))
    (root / "notes.txt").write_text("hello")
    (root / "bad_cal.json").write_text('{"layers": 3}')
    (root / "text.npy").write_text("1,2,3")
    return root


def _fails(argv, capsys, code=1):
    """Run `keras-quant argv`; check its exit status and that stderr is one clean line; return that line."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    assert status == code, (argv, status, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert out == "", (argv, out)  # nothing printed before the error
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("keras-quant: error: "), (argv, err)
    else:
        assert lines[-1].startswith("usage:") or ": error: " in lines[-1], (argv, err)
    return lines[-1]


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


# (case id, argv with {f} = the fixture folder and {o} = an empty output folder, exit status, fragment)
CALIBRATE = [
    ("model_missing", ["{f}/absent.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, "no such model file"),
    ("model_directory", ["{f}/folder.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, "not a file"),
    ("model_empty", ["{f}/empty.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, "is empty"),
    ("model_garbage", ["{f}/garbage.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, "zip archive"),
    ("model_bad_zip", ["{f}/zip.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, "cannot load"),
    ("model_h5", ["{f}/model.h5", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, ".keras file"),
    ("model_lambda", ["{f}/lambda.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json"], 1, "Lambda"),
    ("data_missing", ["{f}/float.keras", "--data", "{f}/absent.npz", "-o", "{o}/c.json"], 1, "data"),
    ("data_shape", ["{f}/float.keras", "--data", "{f}/rgb.npy", "-o", "{o}/c.json"], 1, "shape"),
    ("data_text", ["{f}/float.keras", "--data", "{f}/text.npy", "-o", "{o}/c.json"], 1, "data"),
    ("data_empty", ["{f}/float.keras", "--data", "{f}/empty.npz", "-o", "{o}/c.json"], 1, "data"),
    ("output_no_dir", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/no/c.json"], 1, "does not exist"),
    ("output_is_dir", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/d.json"], 1, "directory"),
    ("output_suffix", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/c.txt"], 1, "must end in"),
    ("bits_range", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json", "--bits", "1"], 1, "bits"),
    ("bits_text", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json", "--bits", "x"], 2, "bits"),
    ("method", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json", "--method", "best"], 2, "method"),
    ("batch_zero", ["{f}/float.keras", "--data", "{f}/data.npz", "-o", "{o}/c.json", "--batch-size", "0"], 2,
     "batch-size"),
]
EXPORT = [
    ("model_missing", ["{f}/absent.keras", "-o", "{o}/m.tflite"], 1, "no such model file"),
    ("model_directory", ["{f}/folder.keras", "-o", "{o}/m.tflite"], 1, "not a file"),
    ("model_empty", ["{f}/empty.keras", "-o", "{o}/m.tflite"], 1, "is empty"),
    ("model_garbage", ["{f}/garbage.keras", "-o", "{o}/m.onnx"], 1, "zip archive"),
    ("model_h5", ["{f}/model.h5", "-o", "{o}/m.tflite"], 1, ".keras file"),
    ("model_lambda", ["{f}/lambda.keras", "-o", "{o}/m.tflite"], 1, "Lambda"),
    ("model_float", ["{f}/float.keras", "-o", "{o}/m.tflite"], 1, "quantized model"),
    ("output_suffix", ["{f}/ptq.keras", "-o", "{o}/m.pb"], 1, "must end in"),
    ("output_no_dir", ["{f}/ptq.keras", "-o", "{o}/no/m.tflite"], 1, "does not exist"),
    ("output_is_dir", ["{f}/ptq.keras", "-o", "{o}/d.tflite"], 1, "directory"),
    ("opset_low", ["{f}/ptq.keras", "-o", "{o}/m.onnx", "--opset", "5"], 1, "opset"),
    ("opset_tflite", ["{f}/ptq.keras", "-o", "{o}/m.tflite", "--opset", "17"], 1, "opset"),
    ("mode_onnx", ["{f}/ptq.keras", "-o", "{o}/m.onnx", "--mode", "int8"], 1, "mode"),
    ("data_missing", ["{f}/ptq.keras", "-o", "{o}/m.tflite", "--data", "{f}/absent.npz"], 1, "data"),
    ("data_shape", ["{f}/ptq.keras", "-o", "{o}/m.tflite", "--data", "{f}/rgb.npy"], 1, "shape"),
    ("opset_text", ["{f}/ptq.keras", "-o", "{o}/m.onnx", "--opset", "new"], 2, "opset"),
    ("mode_unknown", ["{f}/ptq.keras", "-o", "{o}/m.tflite", "--mode", "int3"], 2, "mode"),
    ("threads", ["{f}/ptq.keras", "-o", "{o}/m.tflite", "--threads", "-1"], 2, "threads"),
    ("samples", ["{f}/ptq.keras", "-o", "{o}/m.tflite", "--samples", "0"], 2, "samples"),
]
_A = ["{f}/float.keras", "--data", "{f}/data.npz", "--no-sensitivity"]
ANALYZE = [
    ("model_missing", ["{f}/absent.keras", "--data", "{f}/data.npz"], 1, "no such model file"),
    ("model_lambda", ["{f}/lambda.keras", "--data", "{f}/data.npz"], 1, "Lambda"),
    ("model_garbage", ["{f}/garbage.keras", "--data", "{f}/data.npz"], 1, "zip archive"),
    ("data_missing", ["{f}/float.keras", "--data", "{f}/absent.npz"], 1, "data"),
    ("data_shape", ["{f}/float.keras", "--data", "{f}/rgb.npy"], 1, "shape"),
    ("data_empty", ["{f}/float.keras", "--data", "{f}/empty.npz"], 1, "data"),
    ("report_suffix", _A + ["-o", "{o}/r.pdf"], 1, "report"),
    ("report_no_dir", _A + ["-o", "{o}/no/r.html"], 1, "does not exist"),
    ("report_is_dir", _A + ["-o", "{o}/d.html"], 1, "directory"),
    ("artifact_missing", _A + ["--artifact", "{f}/absent.tflite"], 1, "no such file"),
    ("artifact_directory", _A + ["--artifact", "{f}/folder.keras"], 1, "not a file"),
    ("artifact_lambda", _A + ["--artifact", "{f}/lambda.keras"], 1, "Lambda"),
    ("artifact_garbage_tflite", _A + ["--artifact", "{f}/garbage.tflite"], 1, "does not load"),
    ("artifact_garbage_onnx", _A + ["--artifact", "{f}/garbage.onnx"], 1, "does not load"),
    ("artifact_suffix", _A + ["--artifact", "{f}/notes.txt"], 1, "must end in"),
    ("calibration_missing", _A + ["--calibration", "{f}/absent.json"], 1, "no such calibration file"),
    ("calibration_garbage", _A + ["--calibration", "{f}/bad_cal.json"], 1, "bad_cal.json"),
    ("quantized_lambda", _A + ["--quantized", "{f}/lambda.keras"], 1, "Lambda"),
    ("budget_nan", _A + ["--budget", "nan"], 1, "budget"),
    ("budget_negative", _A + ["--budget", "-1"], 1, "budget"),
    ("bits_range", _A + ["--bits", "99"], 1, "bits"),
    ("bits_text", _A + ["--bits", "8.5"], 2, "bits"),
    ("method", _A + ["--method", "best"], 2, "method"),
]
DEMO = [
    ("qat_epochs", ["--qat-epochs", "-1"], 2, "qat-epochs"),
    ("seed", ["--seed", "-5"], 2, "seed"),
    ("report_no_dir", ["--report", "{o}/no/r.html"], 1, "does not exist"),
    ("report_is_dir", ["--report", "{o}/d.html"], 1, "directory"),
    ("report_suffix", ["--report", "{o}/r.txt"], 1, "report"),
    ("out_is_file", ["--out", "{o}/file.txt", "--report", ""], 1, "out"),
]
CASES = [(command, *case) for command, table in (("calibrate", CALIBRATE), ("export", EXPORT),
                                                 ("analyze", ANALYZE), ("demo", DEMO)) for case in table]


@pytest.mark.parametrize("command, case, argv, code, fragment", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_leaves_no_file(files, tmp_path, capsys, command, case, argv, code, fragment):
    (tmp_path / "d.json").mkdir()
    (tmp_path / "d.tflite").mkdir()
    (tmp_path / "d.html").mkdir()
    (tmp_path / "file.txt").write_text("x")
    before = _listing(tmp_path)
    line = _fails([command] + [a.format(f=files, o=tmp_path) for a in argv], capsys, code)
    assert fragment.lower() in line.lower(), line
    assert _listing(tmp_path) == before  # no output, no temporary file left beside it
    assert _listing(files).count("ptq.tflite") == 1


def test_unexpected_exceptions_are_one_line_too(files, monkeypatch, capsys):
    from keras_quant.cli import export

    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded\nwith details")

    monkeypatch.setattr(export, "load_model", broken)
    line = _fails(["export", files / "ptq.keras", "-o", files / "x.tflite"], capsys)
    assert line == "keras-quant: error: RuntimeError: converter exploded with details (--verbose shows the traceback)"
    assert cli.main(["--verbose", "export", str(files / "ptq.keras"), "-o", str(files / "x.tflite")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("keras-quant: error: RuntimeError")


def test_verbose_flag_before_or_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["--verbose", "demo"]).verbose is True
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    assert parser.parse_args(["demo"]).verbose is False


def _op_node_model(root):
    inp = keras.Input((6,), name="v")
    h = keras.layers.Dense(8, name="d1")(inp)
    h = keras.ops.add(h, 1.0) * 2.0  # bare keras.ops operations between layers
    model = keras.Model(inp, keras.layers.Dense(3, name="d2")(h))
    model.save(root / "opnode.keras")
    np.save(root / "v.npy", np.random.default_rng(1).random((32, 6), dtype=np.float32))
    return root / "opnode.keras", root / "v.npy"


def test_analyze_a_model_with_op_nodes(tmp_path, capsys):
    import json

    model, data = _op_node_model(tmp_path)
    assert cli.main(["analyze", str(model), "--data", str(data), "--samples", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["layer"] for r in out["sensitivity"]["ranking"]} == {"d1", "d2"}
    rows = out["layer_errors"]["keras quantized"]  # d1's output is quantized after the add that follows it
    # Keras numbers auto-named op nodes per process ("add", "add_3", ...): compare the base names
    assert {"add", "multiply", "d2", "<output>"} <= {re.sub(r"_\d+$", "", row["name"]) for row in rows}
    assert all(row["sqnr_db"] > 20 for row in rows)


# Log lines -------------------------------------------------------------------------
NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cudart_stub|cpu_feature_guard|XNNPACK|"
                   r"To enable the following instructions|WARNING:(absl|tensorflow)|Warning:|UserWarning|Traceback")


def _run(argv, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "GLOG_", "ABSL_"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(kq.__file__)), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "keras_quant.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # five subprocesses that import TensorFlow: 10-30 s each
def test_no_tensorflow_log_lines_unless_verbose(files, tmp_path):
    runs = {
        "calibrate": ["calibrate", files / "float.keras", "--data", files / "data.npz", "-o", tmp_path / "c.json"],
        "tflite": ["export", files / "ptq.keras", "-o", tmp_path / "m.tflite", "--data", files / "data.npz"],
        "onnx": ["export", files / "ptq.keras", "-o", tmp_path / "m.onnx", "--data", files / "data.npz"],
        "analyze": ["analyze", files / "float.keras", "--data", files / "data.npz", "--artifact", tmp_path / "m.tflite",
                    "--artifact", tmp_path / "m.onnx", "--no-sensitivity", "-o", tmp_path / "r.html"],
    }
    for name, argv in runs.items():
        out = _run(argv, tmp_path)
        assert out.returncode == 0, (name, out.stderr)
        noise = [line for line in out.stderr.splitlines() if NOISE.search(line)]
        assert noise == [], (name, noise)
    assert all((tmp_path / f).is_file() for f in ("c.json", "m.tflite", "m.onnx", "r.html"))
    verbose = _run(["export", files / "ptq.keras", "-o", tmp_path / "v.tflite", "--data", files / "data.npz",
                    "--verbose"], tmp_path)
    assert verbose.returncode == 0
    assert any(NOISE.search(line) for line in verbose.stderr.splitlines()), verbose.stderr
