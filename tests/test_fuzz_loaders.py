"""Fuzzed files for every loader: the same result, another well-formed one, or a keras_quant error; nothing else.

The harness (seeds, hypothesis mutations, loaders) is benchmarks/bench_fuzz.py, which runs 10,000 cases
per loader; here a modest number per loader keeps CI in seconds.
"""

import pytest

from tests.benchmarks import load_benchmark

CASES = 60


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    bench = load_benchmark("bench_fuzz")
    return bench, bench.Harness(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("loader", ["calibration_json", "calibration_msgpack", "calibration_json_gz",
                                    "calibration_msgpack_zst", "cache_entry", "npy", "npz", "images"])
def test_mutated_files_load_the_same_or_raise_a_typed_error(fuzz, loader):
    bench, harness = fuzz
    out = bench.fuzz_loader(harness, loader, CASES)
    assert out["untyped"] == 0, out["examples"]
    assert out["cases"] == CASES and out["typed"] > CASES // 2
    assert harness.judge(loader, harness.load(loader)) == "same"  # the seed itself still loads


def test_seeds_load_unchanged(fuzz):
    _, harness = fuzz
    for loader in harness.seeds:
        assert harness.judge(loader, harness.load(loader)) == "same", loader
