"""The deployment recipes in export/, run as a user runs them: scripts in subprocesses.

`make_example_model.py` trains the example CNN on the digits for 2 epochs into a temporary
folder; then the recipes run side by side (two cores: TensorFlow's import dominates each), each
exporting its saved model and checking the file in its runtime.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

EXPORT = Path(__file__).resolve().parents[1] / "export"
# recipe -> (saved model it takes, artifact it writes)
RECIPES = {
    "to_tflite_int8.py": ("example_int8.keras", "example_int8_tflite_int8.tflite"),
    "to_tflite_16x8.py": ("example_int16x8.keras", "example_int16x8_tflite_16x8.tflite"),
    "to_onnx_qdq.py": ("example_int8.keras", "example_int8_onnx_qdq.onnx"),
}
TIMEOUT = 180


def _command(script, *args):
    return [sys.executable, str(EXPORT / script), *map(str, args)]


def _env():
    return dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")


def run_script(script, *args):
    return subprocess.run(_command(script, *args), capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def run_together(commands):
    """`{key: CompletedProcess}` of `{key: command}` run at the same time."""
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for k, c in commands.items()}
    done = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes")
    proc = run_script("make_example_model.py", "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("example_int8.keras", "example_int16x8.keras"):
        assert (out / name).is_file()
    return out


@pytest.fixture(scope="module")
def runs(folder):
    """Every recipe on its model, at once."""
    return run_together({script: _command(script, folder / model, "--samples", 100, "--out", folder)
                         for script, (model, _) in RECIPES.items()})


@pytest.fixture(scope="module")
def common():
    """export/_common.py, imported in this process (the error paths need no subprocess)."""
    spec = importlib.util.spec_from_file_location("_kq_export_common", EXPORT / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_exports_and_verifies(folder, runs, script):
    proc = runs[script]
    artifact = RECIPES[script][1]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (folder / artifact).is_file()
    assert "argmax agreement" in proc.stdout
    assert f"{artifact}:" in proc.stdout and "on 100 samples of digits" in proc.stdout


def test_missing_model_is_one_line_error(tmp_path):
    proc = run_script("to_tflite_int8.py", tmp_path / "nope.keras")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"to_tflite_int8.py: error: no such model file: {tmp_path / 'nope.keras'}"]
    assert not list(tmp_path.iterdir())


def test_wrong_data_shape_is_one_line_error(folder, common, tmp_path, capsys):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 28, 28, 1), "float32"))
    argv = [str(folder / "example_int8.keras"), "--data", str(wrong), "--out", str(tmp_path)]
    assert common.main("Doc.", "tflite_int8", ".tflite", lambda m, p: pytest.fail("exported"), argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: --data {wrong} holds samples of shape (28, 28, 1), but the model takes (8, 8, 1)")


@pytest.mark.parametrize("data, message", [
    ("mnist", "--data must be 'fashion', 'digits' or a path ending in .npz"),
    ("missing.npz", "no such data file"),
])
def test_bad_data_argument(common, data, message):
    with pytest.raises(common.RecipeError, match=message):
        common.load_data(data, (8, 8, 1), 10)


def test_npz_data_and_sample_limit(common, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 8, 8, 1), "float64"), y=np.arange(5))
    x, y, name = common.load_data(str(path), (8, 8, 1), 3)
    assert x.dtype == np.float32 and x.shape == (3, 8, 8, 1) and y.tolist() == [0, 1, 2] and name == "d.npz"
    np.savez(path, x=np.ones((5, 8, 8, 1), "float32"))
    assert common.load_data(str(path), (8, 8, 1), 10)[1] is None


def test_unknown_input_shape_needs_data(common):
    with pytest.raises(common.RecipeError, match="pass --data PATH.npz"):
        common.load_data(None, (16, 16, 3), 10)
