"""CalibrationCache: LRU order, hit ratio, age-based eviction, name validation, corrupt files."""

import os
import time

import numpy as np
import pytest

from keras_quant.calibration.cache import SUFFIX, CalibrationCache
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.errors import ConfigError, IntegrityError


def result(tag):
    stats = LayerStatistics(name="dense", count=3, min=-1.0, max=float(tag), mean=0.0, std=1.0,
                            histogram=np.array([1.0, 0.0, 2.0]), bin_edges=np.linspace(-1.0, float(tag), 4))
    return CalibrationResult([stats], metadata={"tag": tag})


def test_put_get_and_lru_eviction_order(tmp_path):
    cache = CalibrationCache(tmp_path, max_memory_items=2)
    a, b, c = result(1), result(2), result(3)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # hit; "a" becomes the most recent, so "b" is the LRU entry
    cache.put("c", c)  # evicts "b" from memory (its file stays)
    assert list(cache._memory) == ["a", "c"]
    assert cache.get("c") is c and cache.get("a") is a
    loaded = cache.get("b")  # miss: read back from disk
    assert loaded is not b and loaded == b and loaded.metadata["tag"] == 2
    assert list(cache._memory) == ["a", "b"]  # "c" was least recently used
    assert (cache.hits, cache.misses) == (3, 1)
    assert cache.hit_ratio == pytest.approx(0.75)
    assert cache.get("nope", default="d") == "d" and cache.misses == 2
    assert cache.names() == ["a", "b", "c"] and len(cache) == 3
    assert "c" in cache and "nope" not in cache and "../x" not in cache
    assert sorted(os.listdir(tmp_path)) == [".lock"] + [n + SUFFIX for n in "abc"]  # the lock of put/remove/evict


def test_persists_across_instances_and_remove(tmp_path):
    CalibrationCache(tmp_path).put("model-v1.int8", result(5))
    cache = CalibrationCache(tmp_path)
    assert cache.hit_ratio == 0.0
    assert cache.get("model-v1.int8")["dense"].max == 5.0
    cache.remove("model-v1.int8")
    assert "model-v1.int8" not in cache and cache.names() == []
    with pytest.raises(KeyError, match="no cached result"):
        cache.remove("model-v1.int8")


def test_evict_older_than_uses_file_mtime(tmp_path):
    cache = CalibrationCache(tmp_path)
    for name in ("old", "older", "fresh"):
        cache.put(name, result(1))
    now = time.time()
    os.utime(cache._path("old"), (now - 3 * 86400, now - 3 * 86400))
    os.utime(cache._path("older"), (now - 10 * 86400, now - 10 * 86400))
    assert cache.evict_older_than(7) == ["older"]
    assert cache.evict_older_than(2.5) == ["old"]
    assert cache.names() == ["fresh"] and "old" not in cache and cache.get("older") is None
    with pytest.raises(ConfigError):
        cache.evict_older_than(-1)
    cache.clear()
    assert cache.names() == [] and "fresh" not in cache


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden", "x.", "a b", "a\\b", "é", "x" * 129, None, 3])
def test_bad_names_are_refused(bad, tmp_path):
    cache = CalibrationCache(tmp_path)
    with pytest.raises(ConfigError):
        cache.put(bad, result(1))
    with pytest.raises(ConfigError):
        cache.get(bad)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_and_corrupt_file(tmp_path):
    with pytest.raises(ConfigError):
        CalibrationCache(tmp_path, max_memory_items=-1)
    cache = CalibrationCache(tmp_path / "sub", max_memory_items=0)
    with pytest.raises(ConfigError):
        cache.put("a", {"not": "a result"})
    cache.put("a", result(1))
    assert cache._memory == {}  # nothing kept in memory with max_memory_items=0
    path = cache._path("a")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(IntegrityError):
        cache.get("a")
