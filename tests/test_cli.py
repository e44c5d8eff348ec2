"""The `keras-quant` command, through its entry point and through main()."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keras_quant import __version__, cli


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
def test_bad_arguments_give_one_line_and_non_zero_exit(argv, fragment):
    out = subprocess.run(
        [sys.executable, "-m", "keras_quant.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr


def test_library_errors_are_one_line(monkeypatch, capsys):
    from keras_quant import demo
    from keras_quant.errors import ConfigError

    def broken(**kwargs):
        raise ConfigError("bits", 40, "bits must be between 2 and 16")

    monkeypatch.setattr(demo, "run", broken)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "keras-quant: error: bits must be between 2 and 16. Received: bits=40"
