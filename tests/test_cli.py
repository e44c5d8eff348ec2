"""The `keras-quant` command, through its entry point and through main()."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keras_quant import __version__, cli


@pytest.mark.slow  # a subprocess that imports TensorFlow: 10-50 s of CPU
def test_console_script_is_installed_and_reports_version():
    # pip puts console scripts beside the interpreter; PATH may not list that folder.
    beside = Path(sys.executable).parent / "keras-quant"
    exe = str(beside) if beside.exists() else shutil.which("keras-quant")
    assert exe, "the keras-quant console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.strip() == f"keras-quant {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "usage: keras-quant" in capsys.readouterr().out


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: keras-quant" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--epochs", "0"], "expected a positive integer, received '0'"),
    (["demo", "--epochs", "many"], "expected a positive integer, received 'many'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line_and_non_zero_exit(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


@pytest.mark.slow  # a subprocess that imports TensorFlow: 10-50 s of CPU
def test_bad_arguments_through_the_module_entry_point():
    # One case in a subprocess (each one imports TensorFlow, seconds of CPU): the exit status and
    # stderr reach the shell as they do in process.
    out = subprocess.run(
        [sys.executable, "-m", "keras_quant.cli", "frobnicate"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr
    assert "Traceback" not in out.stderr


def test_library_errors_are_one_line(monkeypatch, capsys):
    from keras_quant.cli import demo
    from keras_quant.errors import ConfigError

    def broken(**kwargs):
        raise ConfigError("bits", 40, "bits must be between 2 and 16")

    monkeypatch.setattr(demo, "run", broken)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "keras-quant: error: bits must be between 2 and 16. Received: bits=40"


# keras-quant calibrate ---------------------------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402


def _console_script():
    beside = Path(sys.executable).parent / "keras-quant"
    return str(beside) if beside.exists() else shutil.which("keras-quant")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny saved CNN `(None, 8, 8, 1)` and calibration data for it."""
    import keras

    root = tmp_path_factory.mktemp("calibrate")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="img")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, name="head")(x)
    keras.Model(inp, out).save(root / "model.keras")
    rng = np.random.default_rng(0)
    np.save(root / "calib.npy", rng.random((20, 8, 8), dtype=np.float32))  # channel axis added by the CLI
    return root


def _calibrate_in_process(model_path, x, **config_options):
    import keras

    import keras_quant as kq

    model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    cb = kq.CalibrationCallback(config=cli.calibration_config(**config_options))
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    return cb.result


def _assert_same_statistics(result, reference):
    assert result.layer_names == reference.layer_names
    for name in reference:
        assert result[name] == reference[name], name


def test_calibrate_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["calibrate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: keras-quant calibrate" in text
    for option in ["MODEL", "--data", "-o OUT, --output OUT", "--bits", "--method", "--per-channel", "--symmetric",
                   "--max-samples", "--sampling", "--seed", "--batch-size", "--normalize", "--json",
                   "imagenet", "minmax", "kl"]:
        assert option in text, option


def test_calibration_config_per_channel_flag_sets_weights_only():
    plain = cli.calibration_config(bits=6, method="kl", symmetric=True, per_channel=False)
    assert plain.weights.granularity == "per_tensor" and plain.weights.symmetric
    assert (plain.activations.bits, plain.activations.observer, plain.activations.symmetric) == (6, "kl", True)
    assert plain.activations.granularity == "per_tensor"
    per_channel = cli.calibration_config(per_channel=True)
    assert per_channel.weights.granularity == "per_channel"
    assert per_channel.activations.granularity == "per_tensor" and not per_channel.activations.symmetric


@pytest.mark.tensorflow
def test_calibrate_writes_the_statistics_of_an_in_process_calibration(workdir, tmp_path, capsys):
    import keras_quant as kq

    out = tmp_path / "stats.msgpack.gz"
    argv = ["calibrate", str(workdir / "model.keras"), "--data", str(workdir / "calib.npy"), "-o", str(out),
            "--method", "percentile", "--per-channel"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "samples" in stdout and "layers" in stdout  # the callback's progress line
    assert "Calibration: 3 layers, 20 samples" in stdout  # result.summary()
    assert stdout.rstrip().splitlines()[-1] == f"wrote {out} (3 layers, 20 samples)"
    result = kq.CalibrationResult.load(out)
    x = np.load(workdir / "calib.npy")[..., None]
    reference = _calibrate_in_process(workdir / "model.keras", x, method="percentile", per_channel=True)
    _assert_same_statistics(result, reference)
    meta = result.metadata
    assert meta["samples_seen"] == 20
    assert meta["config"]["weights"]["granularity"] == "per_channel"
    assert meta["config"]["activations"]["observer"] == "percentile"
    assert meta["source"]["normalize"] == "unit" and meta["source"]["per_channel_weights"] is True


@pytest.mark.slow  # a subprocess that imports TensorFlow: 10-50 s of CPU
@pytest.mark.tensorflow
def test_calibrate_json_through_the_console_script(workdir, tmp_path):
    import keras_quant as kq

    exe = _console_script()
    assert exe, "the keras-quant console script is not installed (pip install -e .)"
    out = tmp_path / "stats.json"
    images = (np.random.default_rng(1).random((9, 8, 8, 1)) * 255).astype(np.uint8)
    np.savez(workdir / "pixels.npz", x=images, y=np.arange(9))
    proc = subprocess.run(
        [exe, "calibrate", str(workdir / "model.keras"), "--data", str(workdir / "pixels.npz"), "-o", str(out),
         "--json", "--bits", "4", "--symmetric", "--max-samples", "7", "--batch-size", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the one JSON object on stdout
    assert report["output"] == str(out) and report["samples"] == 7 and report["num_layers"] == 3
    assert list(report["layers"]) == ["img", "conv", "head"]
    result = kq.CalibrationResult.load(out)
    assert result.metadata["config"]["weights"]["granularity"] == "per_tensor"
    assert result.metadata["config"]["activations"]["bits"] == 4
    for name, row in report["layers"].items():
        stats = result[name]
        assert row["min"] == stats.min and row["max"] == stats.max and row["count"] == stats.count
        assert row["scale"] == pytest.approx(float(stats.scale)) and row["zero_point"] == 0  # symmetric
    assert result["img"].max == pytest.approx(images[:7].max() / 255.0, rel=1e-6)  # uint8: unit-normalised


@pytest.mark.tensorflow
def test_calibrate_multi_input_npz(tmp_path, capsys):
    import keras

    import keras_quant as kq

    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    out = keras.layers.Dense(2, name="head")(keras.layers.Concatenate(name="cat")([a, b]))
    keras.Model([a, b], out).save(tmp_path / "two.keras")
    rng = np.random.default_rng(2)
    arrays = {"a": rng.normal(size=(10, 4)).astype(np.float32), "b": rng.normal(size=(10, 3)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **arrays, labels=np.arange(10))
    target = tmp_path / "two.json"
    argv = ["calibrate", str(tmp_path / "two.keras"), "--data", str(tmp_path / "calib.npz"), "-o", str(target)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {target} (4 layers, 10 samples)")
    result = kq.CalibrationResult.load(target)
    assert result.layer_names == ["a", "b", "cat", "head"]
    assert result["a"].min == pytest.approx(float(arrays["a"].min()))
    assert result["b"].max == pytest.approx(float(arrays["b"].max()))


def _run_error(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err.splitlines()) == 1 and err.startswith("keras-quant: error: "), err
    return err


@pytest.mark.parametrize("case, fragment", [
    ("missing_model", "no such model file"),
    ("not_a_model", "cannot load a Keras model from the file"),
    ("zip_not_a_model", "cannot load a Keras model from the file"),
    ("h5_model", "the model must be a .keras file"),
    ("missing_data", "no such file or folder"),
    ("wrong_shape", "has shape (5, 8, 8, 3), expected (None, 8, 8, 1)"),
    ("unreadable_image", "broken.png"),
    ("empty_folder", "holds no images"),
    ("bad_extension", "unsupported file extension '.csv'"),
    ("missing_output_dir", "does not exist"),
    ("output_suffix", "must end in .json, .msgpack or .mpk"),
    ("output_is_dir", "the output path is a directory"),
    ("bad_bits", "bits must be an integer between 2 and 16"),
    ("stratified_without_cap", "max_samples"),
])
def test_calibrate_bad_inputs_give_one_line_and_exit_1(case, fragment, workdir, tmp_path, capsys):
    import zipfile

    model, data, out = str(workdir / "model.keras"), str(workdir / "calib.npy"), str(tmp_path / "out.json")
    extra = []
    if case == "missing_model":
        model = str(tmp_path / "absent.keras")
    elif case == "not_a_model":
        (tmp_path / "text.keras").write_text("hello")
        model = str(tmp_path / "text.keras")
    elif case == "zip_not_a_model":
        with zipfile.ZipFile(tmp_path / "zip.keras", "w") as z:
            z.writestr("foo.txt", "x")
        model = str(tmp_path / "zip.keras")
    elif case == "h5_model":
        (tmp_path / "m.h5").write_bytes(b"x")
        model = str(tmp_path / "m.h5")
    elif case == "missing_data":
        data = str(tmp_path / "absent.npy")
    elif case == "wrong_shape":
        np.save(tmp_path / "rgb.npy", np.zeros((5, 8, 8, 3), np.float32))
        data = str(tmp_path / "rgb.npy")
    elif case == "unreadable_image":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
        data = str(tmp_path / "imgs")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif case == "bad_extension":
        (tmp_path / "calib.csv").write_text("1,2")
        data = str(tmp_path / "calib.csv")
    elif case == "missing_output_dir":
        out = str(tmp_path / "no" / "such" / "dir" / "out.json")
    elif case == "output_suffix":
        out = str(tmp_path / "out.txt")
    elif case == "output_is_dir":
        (tmp_path / "d.json").mkdir()
        out = str(tmp_path / "d.json")
    elif case == "bad_bits":
        extra = ["--bits", "40"]
    elif case == "stratified_without_cap":
        extra = ["--sampling", "stratified"]
    err = _run_error(["calibrate", model, "--data", data, "-o", out, *extra], capsys)
    assert fragment in err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["calibrate", "m.keras", "-o", "o.json"], "the following arguments are required: --data"),
    (["calibrate", "m.keras", "--data", "d.npy"], "the following arguments are required: -o/--output"),
    (["calibrate", "m.keras", "--data", "d.npy", "-o", "o.json", "--method", "best"], "invalid choice: 'best'"),
    (["calibrate", "m.keras", "--data", "d.npy", "-o", "o.json", "--normalize", "zscore"], "invalid choice"),
    (["calibrate", "m.keras", "--data", "d.npy", "-o", "o.json", "--batch-size", "0"], "expected a positive integer"),
])
def test_calibrate_usage_errors_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


# keras-quant calibrate --merge ---------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["calibrate", "--merge", "a.json", "b.json"], "the following arguments are required: -o/--output"),
    (["calibrate", "--merge", "-o", "o.json"], "expected at least one argument"),
    (["calibrate", "m.keras", "--merge", "a.json", "-o", "o.json"], "argument --merge: combines saved results; it "
     "takes no MODEL"),
    (["calibrate", "--merge", "a.json", "--data", "d.npy", "-o", "o.json"], "it takes no --data"),
    (["calibrate", "--merge", "a.json", "--save-model", "q.keras", "-o", "o.json"], "it takes no --save-model"),
    (["calibrate", "-o", "o.json"], "the following arguments are required: MODEL (or --merge RESULT ...)"),
])
def test_calibrate_merge_usage_errors_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.fixture(scope="module")
def shard_files(workdir, tmp_path_factory):
    """The calibration data in two shards, each calibrated by the CLI into its own file."""
    root = tmp_path_factory.mktemp("shards")
    x = np.load(workdir / "calib.npy")
    paths = []
    for i, part in enumerate((x[:7], x[7:])):
        np.save(root / f"part{i}.npy", part)
        paths.append(str(root / f"part{i}.json"))
        assert cli.main(["calibrate", str(workdir / "model.keras"), "--data", str(root / f"part{i}.npy"),
                         "-o", paths[-1], "--method", "mse", "--json"]) == 0
    return paths


@pytest.mark.tensorflow
def test_calibrate_merge_writes_the_one_pass_result(workdir, shard_files, tmp_path, capsys):
    import keras_quant as kq

    capsys.readouterr()
    out = tmp_path / "all.json"
    assert cli.main(["calibrate", "--merge", *shard_files, "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.rstrip().splitlines()[-1] == f"wrote {out} (3 layers, 20 samples)"
    merged = kq.CalibrationResult.load(out)
    expected = kq.CalibrationResult.merge(kq.CalibrationResult.load(p) for p in shard_files)
    assert dict(merged.items()) == dict(expected.items())
    assert merged.metadata["merged"]["shards"] == 2
    assert [s["source"]["data"] for s in merged.metadata["merged"]["sources"]] == [
        p.replace(".json", ".npy") for p in shard_files]
    whole = _calibrate_in_process(workdir / "model.keras", np.load(workdir / "calib.npy")[..., None], method="mse")
    for name in whole:
        a, b = merged[name], whole[name]
        assert (a.count, a.num_samples, a.min, a.max) == (b.count, b.num_samples, b.min, b.max), name
        assert a.mean == pytest.approx(b.mean, rel=1e-5, abs=1e-6) and a.std == pytest.approx(b.std, rel=1e-5)

    assert cli.main(["calibrate", "--merge", str(out), shard_files[0], "-o", str(tmp_path / "more.json"),
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 3 and report["samples"] == 27 and report["num_layers"] == 3


@pytest.mark.tensorflow
@pytest.mark.parametrize("case, fragment", [
    ("missing", "No such file"),
    ("garbled", "bad.json: not a keras_quant calibration file"),
    ("incompatible", "cannot merge the calibrations"),
    ("output_suffix", "must end in .json, .msgpack or .mpk"),
])
def test_calibrate_merge_bad_files_give_one_line_and_exit_1(case, fragment, shard_files, tmp_path, capsys):
    import keras_quant as kq

    files, out = list(shard_files), str(tmp_path / "all.json")
    if case == "missing":
        files.append(str(tmp_path / "absent.json"))
    elif case == "garbled":
        (tmp_path / "bad.json").write_text("{not json")
        files.append(str(tmp_path / "bad.json"))
    elif case == "incompatible":
        first = kq.CalibrationResult.load(files[0])
        layers = {n: kq.LayerStatistics.from_dict({**s.to_dict(), "spec": kq.QuantSpec(bits=4, observer="mse").get_config()})
                  for n, s in first.items()}
        kq.CalibrationResult(layers, metadata=first.metadata).save(tmp_path / "four_bit.json")
        files.append(str(tmp_path / "four_bit.json"))
    elif case == "output_suffix":
        out = str(tmp_path / "all.txt")
    capsys.readouterr()
    err = _run_error(["calibrate", "--merge", *files, "-o", out], capsys)
    assert fragment in err
    if case == "incompatible":
        assert "{'bits': 8}" in err and "{'bits': 4}" in err and f"2 = {files[2]}" in err
    assert not (tmp_path / "all.json").exists()
