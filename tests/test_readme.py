"""The README opens with the two one-line commands that .ci/run and people rely on."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _command(tag):
    for line in README.read_text().splitlines():
        m = re.match(rf"^(?P<cmd>\S.*?)\s+#\s*{tag}\s*$", line)
        if m:
            return m.group("cmd")
    return None


def test_readme_opens_with_main_job_and_test_commands():
    first_block = README.read_text().split("```")[1]
    main, tests = _command("main job"), _command("tests")
    assert main and main in first_block
    assert tests and tests in first_block
    assert "pip install" in main and main.rstrip().endswith("keras-quant demo")
    assert "dataset-fashion-mnist" in main  # the demo trains on Fashion-MNIST when Debian's package is there
    # .ci/run executes this line verbatim: it must install and then run the whole suite on two
    # pytest-xdist workers (pytest-xdist comes with the `dev` extra that ".[all]" installs).
    assert "pip install" in tests and ".[all]" in tests and tests.rstrip().endswith("pytest -q -n 2")
    assert "dataset-fashion-mnist" in tests


def test_xdist_is_pinned_in_the_dev_extra_and_ci_runs_both_passes_on_two_workers():
    root = README.parent
    dev = re.search(r"^dev = \[(.*?)^\]", (root / "pyproject.toml").read_text(), re.M | re.S).group(1)
    assert re.search(r'^\s*"pytest-xdist==[0-9.]+",?$', dev, re.M), dev
    ci = (root / ".ci" / "run").read_text()
    assert 'KERAS_BACKEND=jax python3 -m pytest -q -n 2 -m "not tensorflow"' in ci
    assert 'python3 -m pytest -q -n 2 -m "not slow"' in README.read_text()  # the fast local loop
