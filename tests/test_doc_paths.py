"""Every dotted path the docs name (`kq.x.y`, `keras_quant.x.y`) exists.

Docstrings, the README and the benchmark / recipe READMEs point readers at
modules, functions and attributes; a move or a rename that leaves one behind
fails here instead of misleading a reader.
"""

import importlib
import pathlib
import re

import keras_quant  # noqa: F401  (imports the package the paths start from)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "keras_quant").rglob("*.py")) + [
    ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "export" / "README.md", ROOT / "docs" / "API.md",
]
PATH = re.compile(r"(?<![\w.])(?:kq|keras_quant)(?:\.[A-Za-z_]\w*)+")


def _resolves(ref):
    parts = ["keras_quant"] + ref.split(".")[1:]
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_documented_path_exists():
    refs = {(m.group(0).rstrip("."), path.relative_to(ROOT).as_posix())
            for path in DOCS for m in PATH.finditer(path.read_text())}
    assert len(refs) > 100  # the docs do name paths; the pattern still finds them
    missing = sorted(f"{ref} ({where})" for ref, where in refs if not _resolves(ref))
    assert not missing, missing


def test_a_missing_path_is_caught():
    assert _resolves("kq.observers.MinMaxObserver")
    assert not _resolves("kq.layers.qat.LSQ_OBSERVE_STEPS")
