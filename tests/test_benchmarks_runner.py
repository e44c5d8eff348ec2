"""The benchmark runner's machinery on a fake benchmark (no real timing, no timing assertions)."""

import importlib.util
import json
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"

FAKE = '''
def run(quick):
    return {
        "rows": [
            {"name": "a", "ratio": 1.23456, "count": 3},
            {"name": "b|c", "ratio": float("inf"), "extra": None},
        ],
        "tables": {"second": [{"k": 1.0e-7}]},
        "notes": "fake note",
        "quick_seen": quick,
    }
'''

BROKEN = '''
def run(quick):
    raise RuntimeError("boom")
'''


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("_kq_bench_runner", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "benches"
    d.mkdir()
    (d / "bench_fake.py").write_text(FAKE)
    (d / "helper.py").write_text("x = 1\n")  # not a benchmark
    return d


def test_discover_finds_only_bench_modules(runner, bench_dir):
    (bench_dir / "bench_another.py").write_text(FAKE)
    found = runner.discover(bench_dir)
    assert list(found) == ["another", "fake"]
    assert found["fake"].name == "bench_fake.py"


def test_real_benchmarks_are_discovered(runner):
    assert "observers" in runner.discover()


def test_run_all_writes_json_and_markdown(runner, bench_dir, tmp_path):
    out = tmp_path / "results"
    report = runner.run_all(quick=True, out_dir=out, bench_dir=bench_dir, date="2000-01-02", log=lambda *a: None)
    assert report["benchmarks"]["fake"]["quick_seen"] is True
    assert sorted(p.name for p in out.iterdir()) == ["2000-01-02.json", "2000-01-02.md"]  # no temp files left

    data = json.loads((out / "2000-01-02.json").read_text())
    assert data["date"] == "2000-01-02"
    machine = data["machine"]
    for key in ("platform", "python", "cpu_count", "cpu_model", "memory_bytes", "keras", "tensorflow",
                "jax", "numpy", "keras_backend", "git_commit"):
        assert key in machine
    rows = data["benchmarks"]["fake"]["rows"]
    assert rows[0] == {"name": "a", "ratio": 1.23456, "count": 3}
    assert rows[1]["ratio"] == "inf"  # JSON has no infinity literal

    md = (out / "2000-01-02.md").read_text()
    assert "## fake (quick)" in md
    assert "| name | ratio | count | extra |" in md
    assert "| a | 1.235 | 3 |  |" in md
    assert "| b\\|c | inf |  |  |" in md  # pipes escaped, None blank
    assert "### second" in md and "1.000e-07" in md
    assert "- fake note" in md


def test_failing_benchmark_is_recorded_and_others_kept(runner, bench_dir, tmp_path):
    out = tmp_path / "results"
    runner.run_all(out_dir=out, bench_dir=bench_dir, date="2000-01-02", log=lambda *a: None)
    (bench_dir / "bench_broken.py").write_text(BROKEN)
    report = runner.run_all(only=["broken"], out_dir=out, bench_dir=bench_dir, date="2000-01-02",
                            log=lambda *a: None)
    assert "RuntimeError: boom" in report["benchmarks"]["broken"]["error"]
    data = json.loads((out / "2000-01-02.json").read_text())
    assert set(data["benchmarks"]) == {"fake", "broken"}  # --only keeps the day's other results
    assert "**Failed:**" in (out / "2000-01-02.md").read_text()


def test_unknown_benchmark_name(runner, bench_dir, tmp_path):
    with pytest.raises(SystemExit):
        runner.run_all(only=["nope"], out_dir=tmp_path, bench_dir=bench_dir, log=lambda *a: None)


def test_write_atomic_replaces_whole_file(runner, tmp_path):
    path = tmp_path / "sub" / "f.md"
    runner.write_atomic(path, "first, longer text\n")
    runner.write_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert path.stat().st_mode & 0o044  # readable by others (not mkstemp's 0600)
    assert [p.name for p in path.parent.iterdir()] == ["f.md"]




FIGURE = '''
def run(quick):
    return {"rows": [{"name": "a"}], "figures": {"chart": b"\\x89PNG fake bytes"}}
'''


def test_figures_are_written_beside_the_results_and_linked(runner, bench_dir, tmp_path):
    (bench_dir / "bench_pic.py").write_text(FIGURE)
    out = tmp_path / "results"
    report = runner.run_all(only=["pic"], out_dir=out, bench_dir=bench_dir, date="2000-01-02", log=lambda *a: None)
    assert report["benchmarks"]["pic"]["figures"] == {"chart": "2000-01-02-pic-chart.png"}
    assert (out / "2000-01-02-pic-chart.png").read_bytes() == b"\x89PNG fake bytes"
    data = json.loads((out / "2000-01-02.json").read_text())
    assert data["benchmarks"]["pic"]["figures"] == {"chart": "2000-01-02-pic-chart.png"}  # the name, not the bytes
    assert "![chart](2000-01-02-pic-chart.png)" in (out / "2000-01-02.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["2000-01-02-pic-chart.png", "2000-01-02.json", "2000-01-02.md"]


def test_write_atomic_takes_bytes(runner, tmp_path):
    path = tmp_path / "f.bin"
    runner.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
