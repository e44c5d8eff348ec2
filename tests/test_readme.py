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
    # .ci/run executes this line verbatim: it must install and then run pytest.
    assert "pip install" in tests and tests.rstrip().endswith("pytest -q")
    assert "dataset-fashion-mnist" in tests
