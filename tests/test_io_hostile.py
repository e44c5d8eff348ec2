"""Hostile files and killed writers: bounded inflation, validated values, no temp files left behind."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from keras_quant import io as kq_io
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.errors import ConfigError, IntegrityError, NonFiniteError
from keras_quant.io import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stats(name="dense", **extra):
    edges = np.linspace(-1.0, 2.0, 9)
    fields = dict(name=name, count=80, num_samples=10, shape=(None, 8), dtype="float32", min=-1.0, max=2.0,
                  mean=0.5, std=0.7, sparsity=0.0, histogram=np.full(8, 10.0), bin_edges=edges,
                  channel_min=np.full(8, -1.0, np.float32), channel_max=np.full(8, 2.0, np.float32),
                  range_min=-1.0, range_max=2.0, scale=3.0 / 255, zero_point=-43)
    fields.update(extra)
    return LayerStatistics(**fields)


def _rehashed(tree, fmt="json"):
    """A container whose checksum is right for `tree` (the hash cannot catch what is wrong in it)."""
    payload = json.dumps(tree).encode() if fmt == "json" else kq_io.encode_payload(tree, "msgpack")
    header = {"schema_version": 1, "format": fmt, "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return kq_io.MAGIC + json.dumps(header).encode() + b"\n" + payload


_BOMBS = {"no_magic": ("zstd", b""), "honest_header": ("zstd", 1 << 30), "lying_header": ("zstd", 10),
          "lying_header_gzip": ("gzip", 10)}
_EXPECTED = {"no_magic": "bad magic", "honest_header": "over the limit", "lying_header": "longer than the",
             "lying_header_gzip": "longer than the"}


@pytest.mark.slow
def test_bombs_are_refused_early_and_small(tmp_path):
    """Files of at most 1 MB that inflate to 1 GiB are refused after at most 64 MiB, with a typed error."""
    paths = {}
    for kind, (comp, declared) in _BOMBS.items():
        header = declared if isinstance(declared, bytes) else kq_io.MAGIC + json.dumps(
            {"schema_version": 1, "format": "json", "payload_bytes": declared, "sha256": "0" * 64}).encode() + b"\n"
        paths[kind] = (str(tmp_path / f"{kind}.json.{'gz' if comp == 'gzip' else 'zst'}"), comp, header)
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import gzip, zstandard
        zeros = b"\\0" * (64 << 20)
        for path, comp, header in {list(paths.values())!r}:
            with open(path, "wb") as raw:
                if comp == "gzip":
                    out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)
                else:
                    out = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
                out.write(header)
                for _ in range(16):
                    out.write(zeros)
                out.close()
    """)], check=True, timeout=120)
    small = tmp_path / "small.json.gz"
    CalibrationResult([_stats()]).save(small)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, resource
        from keras_quant.calibration.result import CalibrationResult
        from keras_quant.errors import IntegrityError
        CalibrationResult.load({str(small)!r})
        peaks, messages = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], []
        for path in {[p for p, _, _ in paths.values()]!r}:
            try:
                CalibrationResult.load(path)
                messages.append("LOADED")
            except IntegrityError as e:
                messages.append(str(e))
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps([peaks, messages]))
    """)], capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "KERAS_BACKEND": "numpy"})
    assert out.returncode == 0, out.stderr[-2000:]
    peaks, messages = json.loads(out.stdout.strip().splitlines()[-1])
    for (kind, (path, _, _)), message in zip(paths.items(), messages):
        assert os.path.getsize(path) < 3 << 20
        assert path in message and _EXPECTED[kind] in message, (kind, message)
    extra = peaks[-1] - peaks[0]
    assert extra < 100 << 20, f"loading the bombs raised the peak RSS by {extra / 2**20:.0f} MiB"


def test_default_limit_scales_with_the_file():
    assert kq_io.default_limit(10) == kq_io.MIN_DECOMPRESSED_LIMIT
    assert kq_io.default_limit(1 << 20) == 1024 << 20
    assert kq_io.default_limit(1 << 40) == kq_io.MAX_DECOMPRESSED_BYTES


@pytest.mark.parametrize("field, value, error, shown", [
    ("count", 10**400, ConfigError, "count="),
    ("count", -1, ConfigError, "count=-1"),
    ("count", 3.0, ConfigError, "count=3.0"),
    ("count", True, ConfigError, "count=True"),
    ("scale", -1.0, ConfigError, "scale=-1.0"),
    ("scale", 0.0, ConfigError, "scale=0.0"),
    ("shape", [-1], ConfigError, "shape=[-1]"),
    ("shape", [None, 2.5], ConfigError, "shape=[None, 2.5]"),
    ("channel_axis", 1.5, ConfigError, "channel_axis=1.5"),
    ("channel_axis", 10**30, ConfigError, "channel_axis="),
    ("name", None, ConfigError, "name=None"),
    ("name", 7, ConfigError, "name=7"),
    ("min", "NaN", ConfigError, "min='NaN'"),
    ("min", "nan", NonFiniteError, "min"),
    ("max", "inf", NonFiniteError, "max"),
    ("std", -0.5, ConfigError, "std=-0.5"),
    ("sparsity", 2.0, ConfigError, "sparsity=2.0"),
    ("zero_point", 0.5, ConfigError, "zero_point=0.5"),
    ("zero_point", 1 << 40, ConfigError, "zero_point="),
    ("num_samples", "10", ConfigError, "num_samples='10'"),
    ("outliers", {"zscore": -2}, ConfigError, "outliers.zscore=-2"),
    ("histogram", {"__ndarray__": "<f8", "shape": [8], "data": [1.0] * 7 + ["nan"]}, NonFiniteError, "histogram"),
    ("histogram", {"__ndarray__": "<f8", "shape": [8], "data": [1.0] * 7 + [-1.0]}, ConfigError, "histogram=-1.0"),
    ("histogram", {"__ndarray__": "<f8", "shape": [-1], "data": [1.0] * 8}, ConfigError, "shape [-1]"),
    ("channel_min", {"__ndarray__": "<f4", "shape": [8], "data": [-1.0] * 7 + ["nan"]}, NonFiniteError, "channel"),
    ("bin_edges", {"__ndarray__": "<f8", "shape": [9], "data": list(range(9, 0, -1))}, ConfigError, "bin_edges"),
    ("spec", {"bits": 8, "axis": 1.5}, ConfigError, "spec.axis=1.5"),
    ("spec", {"bits": 8.0}, ConfigError, "spec.bits=8.0"),
    ("spec", {"observer": "percentile", "observer_options": {"percentile": "nan"}}, NonFiniteError, "percentile"),
])
def test_loaded_values_are_validated_not_coerced(field, value, error, shown, tmp_path):
    """A correctly hashed file with one bad value: a typed error naming the layer, the field and the value."""
    tree = CalibrationResult([_stats()]).to_dict()
    tree["layers"][0][field] = value
    path = tmp_path / "r.json"
    path.write_bytes(_rehashed(tree))
    with pytest.raises((error, IntegrityError)) as info:
        CalibrationResult.load(path)
    err = info.value
    if isinstance(err, IntegrityError):  # a ConfigError, reported against the file, the ConfigError its cause
        assert error is ConfigError and str(path) in str(err)
        if err.__cause__ is None:  # an array tag the io layer refuses before the statistics see it
            assert shown in str(err), str(err)
            return
        assert isinstance(err.__cause__, ConfigError)
        err = err.__cause__
    assert isinstance(err, error) and shown in str(err), str(err)
    if field != "name":
        assert "dense" in str(err)
    with pytest.raises(error):
        LayerStatistics.from_dict(tree["layers"][0])


def test_nan_range_never_builds_a_model(tmp_path):
    """The issue's file: a correct hash, "min": NaN and "max": Infinity: refused at load, before any model."""
    tree = CalibrationResult([_stats()]).to_dict()
    layer = tree["layers"][0]
    layer["min"], layer["max"] = float("nan"), float("inf")
    payload = json.dumps(tree).encode()  # Python writes NaN / Infinity, as a hand-edited file would
    assert b"NaN" in payload and b"Infinity" in payload
    path = tmp_path / "r.json"
    path.write_bytes(_rehashed(tree))
    with pytest.raises(NonFiniteError) as info:
        CalibrationResult.load(path)
    assert info.value.layer == "dense" and info.value.field == "min" and str(path) in str(info.value)


def test_valid_edge_values_still_load(tmp_path):
    """What a real calibration can hold: an unseen channel's (+inf, -inf), no data at all, None statistics."""
    cmin, cmax = np.full(8, -1.0, np.float32), np.full(8, 2.0, np.float32)
    cmin[3], cmax[3] = np.inf, -np.inf
    result = CalibrationResult([_stats(channel_min=cmin, channel_max=cmax), LayerStatistics(name="empty"),
                                _stats(name="per_channel", range_min=cmin, range_max=cmax,
                                       scale=np.full(8, 0.01, np.float32), zero_point=np.zeros(8, np.int32))])
    for suffix in (".json", ".msgpack.zst"):
        path = tmp_path / ("r" + suffix)
        result.save(path)
        assert CalibrationResult.load(path) == result


def test_duplicate_layers_and_bad_metadata_are_refused():
    tree = CalibrationResult([_stats()]).to_dict()
    with pytest.raises(ConfigError, match="names must differ"):
        CalibrationResult.from_dict({**tree, "layers": tree["layers"] * 2})
    with pytest.raises(ConfigError, match="metadata"):
        CalibrationResult.from_dict({**tree, "metadata": [1, 2]})


def test_strict_array_decoding():
    for tag in ({"__ndarray__": "<i4", "shape": [2], "data": [1.5, 2]},  # no rounding
                {"__ndarray__": "|i1", "shape": [1], "data": [300]},  # no wrap-around
                {"__ndarray__": "<f4", "shape": [-1], "data": [1.0]},
                {"__ndarray__": "<f4", "shape": [1.0], "data": [1.0]},
                {"__ndarray__": "<f4", "shape": [2], "data": [[1.0], [2.0]]},
                {"__ndarray__": "<f4", "shape": [1], "data": ["1.0"]},
                {"__ndarray__": "<f4", "shape": [1], "data": [1.0], "extra": 1}):
        with pytest.raises(ValueError):
            kq_io.decode_array(tag)
    deep = {"a": 1}
    for _ in range(kq_io.MAX_NESTING + 2):
        deep = {"a": deep}
    with pytest.raises(IntegrityError, match="nested deeper"):
        kq_io.load_bytes(kq_io.dump_bytes(deep, "msgpack"))


# Stale temporary files ---------------------------------------------------------------------------
def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = os.path.basename(atomic.temp_name(tmp_path / "x")).split("-")[1].split(".")[0]
    names = {
        "dead": f".a.json.kq{dead_pid}-{host}.0123456789abcdef.tmp",
        "live": f".a.json.kq{os.getppid()}-{host}.0123456789abcdef.tmp",
        "own": os.path.basename(atomic.temp_name(tmp_path / "a.json")),
        "foreign_new": f".a.json.kq{dead_pid}-00000000.0123456789abcdef.tmp",
        "foreign_old": f".a.json.kq{dead_pid}-00000001.0123456789abcdef.tmp",
        "legacy_old": ".a.json.abcd1234.tmp",
        "legacy_new": ".a.json.abcd5678.tmp",
        "other": "a.json.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - 2 * atomic.STALE_TEMP_SECONDS
    for key in ("foreign_old", "legacy_old"):
        os.utime(tmp_path / names[key], (old, old))
    kq_io.write_atomic(tmp_path / "b.json", b"{}")
    left = set(os.listdir(tmp_path))
    for key in ("dead", "foreign_old", "legacy_old"):
        assert names[key] not in left, key
    for key in ("live", "own", "foreign_new", "legacy_new", "other"):
        assert names[key] in left, key


_KILLER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    import numpy as np
    from keras_quant import io as kq_io
    from keras_quant.calibration.cache import CalibrationCache
    from keras_quant.calibration.result import CalibrationResult, LayerStatistics

    directory, runs = sys.argv[1], int(sys.argv[2])
    rng = random.Random(17)

    def result_of(version):
        hist = np.random.default_rng(version).random(1 << 17)  # about 1 MB: a write takes long enough to be cut
        stats = LayerStatistics(name="dense", count=version + 1, histogram=hist,
                                bin_edges=np.linspace(0, 1, hist.size + 1))
        return CalibrationResult([stats], metadata={"version": version, "created": "fixed"})

    def write(version):
        result = result_of(version)
        result.save(os.path.join(directory, "result.msgpack.gz"))
        CalibrationCache(directory).put("entry", result)
        kq_io.write_atomic(os.path.join(directory, "model.tflite"), np.full(8 << 20, version, np.uint8).tobytes())

    def check(done):
        # each destination: absent before any write finished, else one whole version, the same as written
        path = os.path.join(directory, "result.msgpack.gz")
        seen = []
        if os.path.exists(path):
            loaded = CalibrationResult.load(path)
            seen.append(loaded.metadata["version"])
            assert loaded == result_of(seen[-1])
        entry = CalibrationCache(directory, max_memory_items=0).get("entry")
        if entry is not None:
            seen.append(entry.metadata["version"])
            assert entry == result_of(seen[-1])
        model = os.path.join(directory, "model.tflite")
        if os.path.exists(model):
            data = np.fromfile(model, np.uint8)
            assert data.size == 8 << 20 and np.all(data == data[0])
            seen.append(int(data[0]))
        assert all(v <= done for v in seen), (seen, done)

    kills, temps = 0, []
    for version in range(runs + 1):
        pid = os.fork()
        if pid == 0:
            try:
                write(version)
            finally:
                os._exit(0)
        if version == runs:  # the last writer finishes: its writes remove what the killed ones left
            os.waitpid(pid, 0)
            break
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills += int(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
        temps.append(len([n for n in os.listdir(directory) if n.endswith(".tmp")]))
        check(version)
    check(runs)
    assert CalibrationResult.load(os.path.join(directory, "result.msgpack.gz")) == result_of(runs)
    print(json.dumps({"kills": kills, "temps": temps}))
""")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_old_or_new_and_no_temps_pile_up(tmp_path):
    """25 writers (forked processes) killed at random moments while saving a result, putting a cache entry and
    writing an export-sized file: every destination is a whole version; the next write removes the temporaries."""
    out = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path), "25"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={**os.environ, "KERAS_BACKEND": "numpy"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["kills"] >= 20, report
    assert max(report["temps"]) <= 3, report  # at most the last killed writer's: the next write removes them
    left = [n for n in os.listdir(tmp_path) if n.startswith(".") and n != ".lock"]
    assert left == [], left


def test_every_library_write_goes_through_write_atomic():
    """No module opens a file for writing itself: io.atomic does (the tf2onnx input is a private temp file)."""
    import ast

    allowed = {("io/atomic.py", "fdopen"), ("io/atomic.py", "open"), ("export/onnx.py", "fdopen"),
               ("export/onnx.py", "mkstemp"),
               # the CLI's stderr: a text stream over a duplicated file descriptor, not a file written
               ("__init__.py", "open"), ("cli/console.py", "open")}
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "keras_quant")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, os.path.join(ROOT, "keras_quant"))
            for node in ast.walk(ast.parse(open(path).read())):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                modes = [a.value for a in node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
                         if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                writes = name in ("open", "fdopen") and any(set(m) & set("wax+") for m in modes)
                writes |= name in ("savez", "savez_compressed", "tofile", "write_bytes", "write_text", "mkstemp")
                writes |= name == "save" and ast.unparse(node.func).startswith(("np.", "numpy."))
                if writes and (rel, name) not in allowed:
                    found.append(f"{rel}:{node.lineno} {ast.unparse(node)[:80]}")
    assert found == [], found
