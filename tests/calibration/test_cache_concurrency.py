"""CalibrationCache shared by 4 processes: no torn reads, no lost entries, removed entries read as the default."""

import multiprocessing
import os
import random
import time

import numpy as np
import pytest

from keras_quant.calibration.cache import SUFFIX, CalibrationCache
from keras_quant.calibration.result import CalibrationResult, LayerStatistics

WORKERS = 4
SECONDS = 4.0


def result_of(owner, version):
    """The result a worker writes: its content a function of (owner, version), so a reader can check it."""
    hist = np.random.default_rng(owner * 100003 + version).random(4096)
    stats = LayerStatistics(name=f"w{owner}", count=version + 1, histogram=hist, bin_edges=np.linspace(0, 1, 4097))
    return CalibrationResult([stats], metadata={"owner": owner, "version": version, "created": "fixed"})


def _check(got, problems, what):
    if got is not None and got != result_of(got.metadata["owner"], got.metadata["version"]):
        problems.append(f"torn or wrong result for {what}: {got.metadata}")


def _worker(directory, owner, seconds, queue):
    """Random put/get/remove/evict on its own names (tracked exactly) and on shared ones (checked for wholeness)."""
    rng = random.Random(owner)
    cache = CalibrationCache(directory, max_memory_items=rng.choice([0, 4]))
    mine, problems, ops = {}, [], 0  # own name -> version expected (None: removed)
    end = time.time() + seconds
    while time.time() < end:
        ops += 1
        op, own = rng.random(), f"own-{owner}-{rng.randrange(4)}"
        shared = f"shared-{rng.randrange(3)}"
        try:
            if op < 0.25:
                version = ops
                path = os.path.join(directory, own + SUFFIX)
                if os.path.exists(path) and rng.random() < 0.5:  # age it: an evictor must not remove the new one
                    os.utime(path, (time.time() - 864000, time.time() - 864000))
                cache.put(own, result_of(owner, version))
                mine[own] = version
            elif op < 0.35:
                if mine.get(own) is not None:
                    cache.remove(own)
                    mine[own] = None
            elif op < 0.6:
                got = cache.get(own)
                want = mine.get(own)
                if want is None and got is not None:
                    problems.append(f"{own} removed but read back")
                elif want is not None and (got is None or got.metadata["version"] != want):
                    problems.append(f"{own} lost or stale: expected version {want}, got {got and got.metadata}")
                _check(got, problems, own)
            elif op < 0.75:
                cache.put(shared, result_of(owner, ops))
            elif op < 0.85:
                try:
                    cache.remove(shared)
                except KeyError:
                    pass
            elif op < 0.95:
                _check(cache.get(shared), problems, shared)
            else:
                removed = cache.evict_older_than(5)
                for name in removed:
                    if name in mine:
                        mine[name] = None  # an own entry aged by this worker and evicted before its next put
        except Exception as e:  # noqa: BLE001 (every failure is reported to the parent, typed or not)
            problems.append(f"{type(e).__name__}: {e}")
    for own, want in mine.items():  # the end state: every entry put and not removed is readable
        got = CalibrationCache(directory, max_memory_items=0).get(own)
        if (want is None) != (got is None) or (got is not None and got.metadata["version"] != want):
            problems.append(f"final {own}: expected {want}, got {got and got.metadata}")
    queue.put((owner, ops, problems))


@pytest.mark.slow
def test_four_processes_share_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "numpy")  # the workers need no TensorFlow; spawn starts faster
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = time.time()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), i, SECONDS, queue)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    problems = [f"worker {owner}: {p}" for owner, _, ps in results for p in ps]
    assert problems == [], problems[:10]
    assert sum(ops for _, ops, _ in results) > 200, results
    assert time.time() - start < 120
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
