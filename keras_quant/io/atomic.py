"""Atomic file writes, and the removal of what interrupted ones leave behind.

`write_atomic(path, data)` writes to a hidden temporary file next to `path`,
`.NAME.kq<PID>-<HOST>.<random>.tmp`, fsyncs it and `os.replace`s it onto
`path`: a reader sees the old file or the complete new one, never a part.
A writer killed outright (SIGKILL, power loss) cannot remove its temporary
file; the next `write_atomic` into the same directory does
(`remove_stale_temps`): a temporary file whose writer process (the PID in its
name, on this host) is gone, or one older than `STALE_TEMP_SECONDS` (a
writer on another host sharing the directory, a reused PID, or a temporary
file of an older keras_quant without a PID in its name). A live writer's
temporary file is never touched.

Example:

>>> from keras_quant.io import write_atomic
>>> write_atomic("/tmp/kq-example.txt", "hello\\n")   # doctest: +SKIP
"""

import contextlib
import hashlib
import os
import re
import secrets
import socket
import time

__all__ = ["write_atomic", "atomic_target", "remove_stale_temps", "temp_name", "STALE_TEMP_SECONDS"]

STALE_TEMP_SECONDS = 3600.0  # a temporary file this old whose writer cannot be checked is an orphan
_OWN_HOST_STALE_SECONDS = 86400.0  # a live PID on this host for a day: a reused PID, not the writer
_TEMP = re.compile(r"^\..+\.(?:kq(?P<pid>\d{1,10})-(?P<host>[0-9a-f]{8})\.[0-9a-f]{16}\.[a-z]{1,8}|[a-z0-9_]{8}\.tmp)$")


def _host_tag():
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_name(path, suffix=".tmp"):
    """The hidden temporary file name `write_atomic` writes `path`'s bytes to first (in `path`'s folder).

    `suffix` (1-8 lowercase letters after the dot) is for writers that need one (`.keras`).

    Example:

    >>> os.path.basename(temp_name("/tmp/a.json")).startswith(f".a.json.kq{os.getpid()}-")
    True
    """
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.kq{os.getpid()}-{_host_tag()}.{secrets.token_hex(8)}{suffix}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or an unanswerable question): keep its file
    return True


def _is_stale(match, age, host):
    if match["pid"] is None or match["host"] != host:
        return age > STALE_TEMP_SECONDS
    pid = int(match["pid"])
    return pid != os.getpid() and (not _alive(pid) or age > _OWN_HOST_STALE_SECONDS)


def remove_stale_temps(directory):
    """Remove the temporary files that interrupted `write_atomic` calls left in `directory`.

    Removed: `.NAME.kq<PID>-<HOST>.<random>.tmp` files of this host whose
    process no longer exists (or that are over a day old: the PID was
    reused), and any such file, or an older keras_quant's `.NAME.<random>.tmp`,
    older than `STALE_TEMP_SECONDS`. Best effort: a file another process
    removes first, or one that cannot be removed, is skipped.

    Args:
        directory: The folder.

    Returns:
        The sorted names removed.

    Example:

    >>> remove_stale_temps("/tmp/kq-calib")   # doctest: +SKIP
    ['.resnet.kqcal.msgpack.zst.kq4242-1a2b3c4d.0123456789abcdef.tmp']
    """
    removed, host, now = [], _host_tag(), time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if _is_stale(match, now - entry.stat(follow_symlinks=False).st_mtime, host):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
    return sorted(removed)


@contextlib.contextmanager
def atomic_target(path, suffix=".tmp", make_parents=False):
    """A temporary path to write `path`'s new contents to; `os.replace`d onto `path` when the block ends.

    For writers that need a file name (`model.save`): the temporary file
    (`temp_name(path, suffix)`) is fsynced and replaces `path` if the block
    succeeds, and is removed if it raises; stale temporary files of dead
    writers in the folder are removed first (`remove_stale_temps`).

    Args:
        path: The target file.
        suffix: The temporary file's suffix (e.g. `".keras"`).
        make_parents: Create the parent folder(s) first.

    Example:

    >>> with atomic_target("model.keras", suffix=".keras") as tmp:   # doctest: +SKIP
    ...     model.save(tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if make_parents:
        os.makedirs(directory, exist_ok=True)
    remove_stale_temps(directory)
    tmp = temp_name(path, suffix)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def write_atomic(path, data, make_parents=False):
    """Write `data` to `path` atomically (temp file in the same directory, fsync, `os.replace`).

    On any failure the temporary file is removed and `path` is left as it was; temporary files
    of writers that died before they could remove theirs are removed first
    (`remove_stale_temps`). The file gets the permissions an ordinary `open(path, "wb")` would
    (0666 less the umask).

    Args:
        path: The target file.
        data: Bytes, or a str (written as UTF-8).
        make_parents: Create the parent folder(s) first.

    Example:

    >>> write_atomic("/tmp/kq-example.txt", "hello\\n")   # doctest: +SKIP
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_target(path, make_parents=make_parents) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _fsync_directory(directory):
    """Make a rename in `directory` durable (best effort; not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
