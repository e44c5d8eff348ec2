"""TEST HELPER: import a benchmark script (`benchmarks/bench_*.py`) as a module, its folder on the path."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """The module `benchmarks/<name>.py`, loaded as `_kq_<name>` (its sibling scripts importable)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_kq_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
