"""A directory of named calibration results with an in-memory LRU in front.

Each result is one file `<name>.kqcal.msgpack.zst` in the directory, written
atomically by `CalibrationResult.save` and verified by `CalibrationResult.load`
(a corrupt file raises `kq.errors.IntegrityError`). Up to `max_memory_items`
loaded results stay in memory, least recently used evicted first (from memory
only; the file stays).

`hits` counts `get` calls served from memory; `misses` counts those that were
not (read from disk, or absent).

Example:

>>> cache = CalibrationCache("/tmp/kq-calib")                  # doctest: +SKIP
>>> cache.put("resnet-int8", result)                            # doctest: +SKIP
>>> cache.get("resnet-int8") is result                          # doctest: +SKIP
True
"""

import collections
import os
import re
import time

from keras_quant.calibration.result import CalibrationResult
from keras_quant.errors import ConfigError

__all__ = ["CalibrationCache", "SUFFIX"]

SUFFIX = ".kqcal.msgpack.zst"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_name(name):
    """Raise ConfigError unless `name` is a safe file name (no separators, no leading dot)."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith("."):
        raise ConfigError(
            "name", name,
            "cache names must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or "
            "digit and not ending with '.'",
        )
    return name


class CalibrationCache:
    """Named `CalibrationResult`s on disk, with an in-memory LRU of loaded ones.

    Args:
        directory: The cache directory (created if missing).
        max_memory_items: How many results to keep in memory (>= 0).

    Raises:
        ConfigError: For an invalid `max_memory_items`.

    Example:

    >>> cache = CalibrationCache(tmp_dir, max_memory_items=2)   # doctest: +SKIP
    >>> cache.put("a", result); "a" in cache                     # doctest: +SKIP
    True
    """

    def __init__(self, directory, max_memory_items=16):
        if isinstance(max_memory_items, bool) or not isinstance(max_memory_items, int) or max_memory_items < 0:
            raise ConfigError("max_memory_items", max_memory_items, "max_memory_items must be a non-negative integer")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.max_memory_items = max_memory_items
        self._memory = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def _path(self, name):
        return os.path.join(self.directory, _check_name(name) + SUFFIX)

    def _remember(self, name, result):
        self._memory[name] = result
        self._memory.move_to_end(name)
        while len(self._memory) > self.max_memory_items:
            self._memory.popitem(last=False)

    def put(self, name, result):
        """Store `result` under `name` (file written atomically, then kept in memory).

        Args:
            name: A safe file name.
            result: A `CalibrationResult`.

        Raises:
            ConfigError: For a bad name or a value that is not a `CalibrationResult`.
        """
        path = self._path(name)
        if not isinstance(result, CalibrationResult):
            raise ConfigError("result", type(result).__name__, "the cache stores CalibrationResult objects")
        result.save(path, format="msgpack", compression="zstd")
        self._remember(name, result)

    def get(self, name, default=None):
        """The result stored under `name`: from memory, else from disk, else `default`.

        Raises:
            ConfigError: For a bad name.
            IntegrityError: If the file on disk is corrupt.
        """
        path = self._path(name)
        if name in self._memory:
            self.hits += 1
            self._memory.move_to_end(name)
            return self._memory[name]
        self.misses += 1
        if not os.path.exists(path):
            return default
        result = CalibrationResult.load(path)
        self._remember(name, result)
        return result

    def __contains__(self, name):
        try:
            path = self._path(name)
        except ConfigError:
            return False
        return name in self._memory or os.path.exists(path)

    def remove(self, name):
        """Delete `name` from memory and disk.

        Raises:
            KeyError: If nothing is stored under `name`.
        """
        path = self._path(name)
        found = self._memory.pop(name, None) is not None
        try:
            os.unlink(path)
            found = True
        except FileNotFoundError:
            pass
        if not found:
            raise KeyError(f"no cached result named {name!r}; cached: {self.names()}")

    def names(self):
        """Sorted names of the results on disk."""
        return sorted(f[: -len(SUFFIX)] for f in os.listdir(self.directory) if f.endswith(SUFFIX) and _NAME.match(f[: -len(SUFFIX)]))

    @property
    def hit_ratio(self):
        """`hits / (hits + misses)`, 0.0 before any `get`."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def evict_older_than(self, days):
        """Remove results whose file was last written more than `days` days ago.

        Args:
            days: Age in days (a non-negative number).

        Returns:
            The sorted list of removed names.

        Raises:
            ConfigError: For a negative or non-numeric `days`.
        """
        if isinstance(days, bool) or not isinstance(days, (int, float)) or not days >= 0:
            raise ConfigError("days", days, "days must be a non-negative number")
        cutoff = time.time() - float(days) * 86400.0
        removed = []
        for name in self.names():
            path = self._path(name)
            try:
                if os.path.getmtime(path) < cutoff:
                    os.unlink(path)
                    self._memory.pop(name, None)
                    removed.append(name)
            except FileNotFoundError:
                continue
        return removed

    def clear(self):
        """Remove every result from memory and disk (the counters are kept)."""
        for name in self.names():
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
        self._memory.clear()

    def __len__(self):
        return len(self.names())

    def __repr__(self):
        return f"CalibrationCache({self.directory!r}, {len(self)} results, {len(self._memory)} in memory)"
