"""A directory of named calibration results with an in-memory LRU in front.

Each result is one file `<name>.kqcal.msgpack.zst` in the directory, written
atomically by `CalibrationResult.save` and verified by `CalibrationResult.load`
(a corrupt file raises `kq.errors.IntegrityError`). Up to `max_memory_items`
loaded results stay in memory, least recently used evicted first (from memory
only; the file stays).

`hits` counts `get` calls served from memory; `misses` counts those that were
not (read from disk, or absent).

Several processes may share one directory: files are replaced atomically (a
reader sees the old result or the new one), `put`, `remove`,
`evict_older_than` and `clear` hold an exclusive lock on the directory's
`.lock` file while they change it (so an eviction never removes a result put
after it looked at the file's age), a result in memory is served only while
its file is still the one it was read from (a result another process removed
or replaced is not served stale), and `get` of a result removed while it reads
returns the default.

Example:

>>> cache = CalibrationCache("/tmp/kq-calib")                  # doctest: +SKIP
>>> cache.put("resnet-int8", result)                            # doctest: +SKIP
>>> cache.get("resnet-int8") is result                          # doctest: +SKIP
True
"""

import collections
import contextlib
import os
import re
import time

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (atomic replaces still keep files whole)
    fcntl = None

from keras_quant.calibration.result import CalibrationResult
from keras_quant.errors import ConfigError

__all__ = ["CalibrationCache", "SUFFIX"]

SUFFIX = ".kqcal.msgpack.zst"
_LOCK = ".lock"
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

    @contextlib.contextmanager
    def _locked(self):
        """Hold the directory's lock (exclusive, across processes) for a change to its files."""
        if fcntl is None:
            yield
            return
        fd = os.open(os.path.join(self.directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _signature(path):
        """Which file `path` is now (inode, size, mtime), or None if there is none."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _remember(self, name, result, signature):
        if signature is None:
            self._memory.pop(name, None)
            return
        self._memory[name] = (result, signature)
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
        with self._locked():
            result.save(path, format="msgpack", compression="zstd")
            signature = self._signature(path)
        self._remember(name, result, signature)

    def get(self, name, default=None):
        """The result stored under `name`: from memory, else from disk, else `default`.

        A result in memory is served only while its file is unchanged; a
        result that another process removes (even while this one reads it)
        gives `default`.

        Raises:
            ConfigError: For a bad name.
            IntegrityError: If the file on disk is corrupt.
        """
        path = self._path(name)
        signature = self._signature(path)
        if name in self._memory and self._memory[name][1] == signature:
            self.hits += 1
            self._memory.move_to_end(name)
            return self._memory[name][0]
        self.misses += 1
        self._memory.pop(name, None)
        if signature is None:
            return default
        try:
            result = CalibrationResult.load(path)
        except FileNotFoundError:
            return default
        if self._signature(path) == signature:  # else replaced while read: served, not remembered
            self._remember(name, result, signature)
        return result

    def __contains__(self, name):
        try:
            path = self._path(name)
        except ConfigError:
            return False
        return os.path.exists(path)

    def remove(self, name):
        """Delete `name` from memory and disk.

        Raises:
            KeyError: If nothing is stored under `name`.
        """
        path = self._path(name)
        self._memory.pop(name, None)
        with self._locked():
            try:
                os.unlink(path)
                found = True
            except FileNotFoundError:
                found = False
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
        with self._locked():  # no put can replace a file between its age check and its removal
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
        with self._locked():
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
