"""Fuzz every file loader: thousands of mutated files each, and what came of them.

    python benchmarks/bench_fuzz.py [--quick] [--cases N]

Loaders: `CalibrationResult.load` on JSON, MessagePack, JSON+gzip and
MessagePack+zstd files, `CalibrationCache.get` on a cache entry, and the CLI's
data loader `keras_quant.cli.common.load_eval_data` on `.npy`, `.npz` and an
image folder (PNG + JPEG). Each case is a valid seed file mutated by hypothesis:
byte flips, truncation, insertion, splicing with another seed, a mutated
decoded tree re-hashed (so the validation layer, not the checksum, judges it),
huge declared sizes (header `payload_bytes`, `.npy` shapes, PNG dimensions) and
deep nesting. Every case must end in the same result as the seed, another
valid result (a re-hashed tree or array data that is still well formed), or a
`keras_quant.errors` error; anything else is a non-typed failure (must be 0).
Peak RSS is the process's, after each loader (it only grows).

`run(quick)` returns the table; `--quick` runs 300 cases per loader, the full
run 10,000.
"""

import argparse
import hashlib
import io
import json
import os
import resource
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("KERAS_BACKEND", "numpy")  # the loaders need no TensorFlow

import numpy as np  # noqa: E402

FULL_CASES = 10_000
QUICK_CASES = 300
CALIBRATION = {"calibration_json": ".json", "calibration_msgpack": ".msgpack",
               "calibration_json_gz": ".json.gz", "calibration_msgpack_zst": ".msgpack.zst"}
LOADERS = tuple(CALIBRATION) + ("cache_entry", "npy", "npz", "images")
MUTATIONS = ("flip", "truncate", "insert", "splice", "rehash", "huge", "deep")


# Seeds ---------------------------------------------------------------------------------
def seed_result():
    """A small calibration result: two layers, histograms, per-channel ranges, qparams."""
    from keras_quant.calibration.result import CalibrationResult, LayerStatistics
    from keras_quant.config import QuantSpec

    rng = np.random.default_rng(0)
    layers = []
    for i, name in enumerate(("conv", "dense")):
        hist = rng.integers(0, 50, 32).astype(np.float64)
        cmin, cmax = -rng.random(4).astype(np.float32) - 0.5, rng.random(4).astype(np.float32) + 0.5
        layers.append(LayerStatistics(
            name=name, count=1000, num_samples=10, shape=(None, 4), dtype="float32", min=-1.5, max=1.5, mean=0.1,
            std=0.5, skewness=0.2, kurtosis=0.3, sparsity=0.1, channel_min=cmin, channel_max=cmax, histogram=hist,
            bin_edges=np.linspace(-1.5, 1.5, 33), outliers={"zscore": 2, "iqr": 3, "mad": 1},
            spec=QuantSpec(bits=8, granularity="per_channel") if i else QuantSpec(bits=8),
            range_min=cmin if i else -1.5, range_max=cmax if i else 1.5,
            scale=np.full(4, 0.01, np.float32) if i else 0.0117, zero_point=np.zeros(4, np.int32) if i else 0))
    return CalibrationResult(layers, metadata={"model": "fuzz", "created": "fixed", "samples_seen": 10})


def _png(width, height, pixels):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + bytes(row) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def seed_data():
    """`(x, y)`: 6 grayscale 8x8 images as uint8, labels 0-5."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (6, 8, 8, 1)).astype(np.uint8), np.arange(6)


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _jpeg(pixels):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Mutations ------------------------------------------------------------------------------
def _container(payload, fmt, **header):
    h = {"schema_version": 1, "format": fmt, "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    h.update(header)
    return b"KQCAL " + json.dumps(h).encode() + b"\n" + payload


def _split(raw):
    """`(fmt, compression, raw tree)` of a container file (its payload parsed, arrays still tagged)."""
    import msgpack

    from keras_quant import io as kq_io

    data = bytes(kq_io.decompress(raw))
    header, payload = data.split(b"\n", 1)
    fmt = json.loads(header[6:])["format"]
    comp = "gzip" if raw[:2] == b"\x1f\x8b" else "zstd" if raw[:4] == b"\x28\xb5\x2f\xfd" else None
    tree = json.loads(payload) if fmt == "json" else msgpack.unpackb(payload, raw=False)
    return fmt, comp, tree


def _pack(tree, fmt, comp, **header):
    import msgpack

    from keras_quant import io as kq_io

    payload = json.dumps(tree).encode() if fmt == "json" else msgpack.packb(tree, use_bin_type=True)
    return kq_io.compress(_container(payload, fmt, **header), comp)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


def _values(st):
    return st.one_of(
        st.integers(-2**70, 2**70), st.just(10**400), st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["nan", "inf", "-inf", "", "x" * 5000]), st.text(max_size=4), st.none(), st.booleans(),
        st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.just({"__ndarray__": "<f4", "shape": [1 << 40], "data": []}),
        st.just({"__ndarray__": "|O", "shape": [1], "data": [1]}),
    )


def _rehash(data, st, raw):
    """A mutated decoded tree in a container with a correct checksum."""
    fmt, comp, tree = _split(raw)
    paths = [p for p in _paths(tree) if p]
    path = data.draw(st.sampled_from(paths))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_values(st))
    try:
        return _pack(tree, fmt, comp)
    except (OverflowError, TypeError, ValueError):  # msgpack cannot hold 10**400: keep the tree as it was
        return raw


_BOMBS = {}


def _zip_bomb(log2_size):
    if log2_size not in _BOMBS:
        _BOMBS[log2_size] = _npz_bytes(x=np.zeros((1 << log2_size,), np.uint8), y=seed_data()[1])
    return _BOMBS[log2_size]


def _huge(data, st, loader, raw):
    if loader in CALIBRATION or loader == "cache_entry":
        fmt, comp, tree = _split(raw)
        size = data.draw(st.sampled_from([1 << 31, 1 << 40, 10**30, -1, 2.5]))
        return _pack(tree, fmt, comp, payload_bytes=size)
    if loader == "npy":
        shape = data.draw(st.sampled_from([(1 << 40,), (1 << 20, 1 << 20, 8, 1), (-1, 8, 8, 1), (6, 8, 8, 1 << 30)]))
        header = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode()
        header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + raw[128:]
    if loader == "npz":  # a zip bomb: 128 MiB of zeros in 130 KB
        return _zip_bomb(27)
    side = data.draw(st.sampled_from([9000, 65535, 1 << 20]))
    return _png(side, side, [[0] * 8] * 8)  # the header claims side x side pixels


def _deep(data, st, loader, raw):
    if loader in CALIBRATION or loader == "cache_entry":
        fmt, comp, tree = _split(raw)
        depth = data.draw(st.sampled_from([70, 1000, 100_000]))
        deep = 0
        for _ in range(depth):
            deep = [deep]
        tree["metadata"]["deep"] = deep
        try:
            return _pack(tree, fmt, comp)
        except (RecursionError, ValueError):
            return _container(b"[" * depth + b"]" * depth, "json")
    return raw + b"[" * data.draw(st.integers(1, 5000))


def mutate(data, st, loader, raw, others):
    """One hypothesis-drawn mutation of the seed bytes `raw` (others: seeds to splice from)."""
    kind = data.draw(st.sampled_from(MUTATIONS))
    if kind == "flip":
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(out) - 1))
            out[i] ^= data.draw(st.integers(1, 255))
        return kind, bytes(out)
    if kind == "truncate":
        return kind, raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind == "insert":
        i = data.draw(st.integers(0, len(raw)))
        return kind, raw[:i] + data.draw(st.binary(min_size=1, max_size=64)) + raw[i:]
    if kind == "splice":
        other = data.draw(st.sampled_from(others))
        i, j = data.draw(st.integers(0, len(raw))), data.draw(st.integers(0, len(other)))
        return kind, raw[:i] + other[j:]
    if kind == "rehash" and (loader in CALIBRATION or loader == "cache_entry"):
        return kind, _rehash(data, st, raw)
    if kind == "huge":
        return kind, _huge(data, st, loader, raw)
    if kind == "deep":
        return kind, _deep(data, st, loader, raw)
    return "flip", bytes(raw[:-1]) + bytes([raw[-1] ^ 1])


# Loaders ----------------------------------------------------------------------------------
class Harness:
    """Seeds, a place to write each case, and one call per loader returning what loaded."""

    def __init__(self, root):
        import keras

        from keras_quant.calibration.cache import SUFFIX

        self.root = Path(root)
        self.result = seed_result()
        self.x, self.y = seed_data()
        inputs = keras.Input((8, 8, 1), name="image")
        self.model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
        self.seeds, self.paths = {}, {}
        for loader, suffix in CALIBRATION.items():
            self.paths[loader] = self.root / f"{loader}{suffix}"
            self.result.save(self.paths[loader])
        (self.root / "cache").mkdir()
        self.paths["cache_entry"] = self.root / "cache" / f"entry{SUFFIX}"
        self.result.save(self.paths["cache_entry"], format="msgpack", compression="zstd")
        for loader in LOADERS[:5]:
            self.seeds[loader] = self.paths[loader].read_bytes()
        self.seeds["npy"], self.paths["npy"] = _npy_bytes(self.x), self.root / "data.npy"
        self.seeds["npz"], self.paths["npz"] = _npz_bytes(x=self.x, y=self.y), self.root / "data.npz"
        (self.root / "images").mkdir()
        self.paths["images"] = self.root / "images" / "b.png"
        self.seeds["images"] = _png(8, 8, self.x[1, ..., 0].tolist())
        (self.root / "images" / "a.jpg").write_bytes(_jpeg(self.x[0]))
        self.expected_images = None
        self.write("images", self.seeds["images"])
        self.expected_images = self.load("images")

    def write(self, loader, raw):
        with open(self.paths[loader], "wb") as f:  # the harness's own scratch file, not a library write
            f.write(raw)

    def load(self, loader):
        from keras_quant.calibration.cache import CalibrationCache
        from keras_quant.calibration.result import CalibrationResult
        from keras_quant.cli.common import load_eval_data

        if loader in CALIBRATION:
            return CalibrationResult.load(self.paths[loader])
        if loader == "cache_entry":
            return CalibrationCache(self.paths[loader].parent, max_memory_items=0).get("entry")
        path = self.root / "images" if loader == "images" else self.paths[loader]
        return load_eval_data(str(path), self.model, samples=None)

    def judge(self, loader, value):
        """"same" if `value` is the seed's result, "other" for another well-formed one; raises if malformed."""
        if loader in CALIBRATION or loader == "cache_entry":
            if value == self.result:
                return "same"
            assert type(value).__name__ == "CalibrationResult" and type(value).from_dict(value.to_dict()) == value
            return "other"
        x, labels = value
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape[1:] == (8, 8, 1) and x.shape[0] > 0
        if loader == "images":
            return "same" if np.array_equal(x, self.expected_images[0]) else "other"
        same = np.array_equal(x, self.x.astype(np.float32) / 255) and (
            loader == "npy" or (labels is not None and np.array_equal(labels, self.y)))
        return "same" if same else "other"


def fuzz_loader(harness, loader, cases, seed=0):
    """`{cases, typed, same, other, untyped, examples}` of `cases` hypothesis-drawn mutations of `loader`'s seed."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st

    from keras_quant.errors import KerasQuantError

    counts = {"cases": 0, "typed": 0, "same": 0, "other": 0, "untyped": 0}
    examples, others = [], [s for k, s in harness.seeds.items() if k != loader] + [harness.seeds[loader]]

    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate], derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        kind, raw = mutate(data, st, loader, harness.seeds[loader], others)
        harness.write(loader, raw)
        counts["cases"] += 1
        try:
            counts[harness.judge(loader, harness.load(loader))] += 1
        except KerasQuantError:
            counts["typed"] += 1
        except BaseException as e:  # noqa: BLE001 (a non-typed failure is what this counts)
            if isinstance(e, KeyboardInterrupt):
                raise
            counts["untyped"] += 1
            if len(examples) < 5:
                examples.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")

    case()
    harness.write(loader, harness.seeds[loader])
    return {**counts, "examples": examples}


def run(quick=False, cases=None):
    """The fuzz table: one row per loader (cases, typed errors, same / other loads, non-typed failures, peak RSS)."""
    cases = cases or (QUICK_CASES if quick else FULL_CASES)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as root:
        harness = Harness(root)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for loader in LOADERS:
            start = time.perf_counter()
            out = fuzz_loader(harness, loader, cases)
            rows.append({
                "loader": loader, "cases": out["cases"], "typed_errors": out["typed"], "same_result": out["same"],
                "other_valid": out["other"], "non_typed_failures": out["untyped"],
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            })
            notes += [f"{loader}: {e}" for e in out["examples"]]
    notes.insert(0, f"{cases} hypothesis cases per loader; mutations: {', '.join(MUTATIONS)}. "
                    "Target: non_typed_failures = 0. peak_rss_mib is the process's peak so far (it only grows); "
                    f"{baseline:.0f} MiB before the first case (Python, numpy, Keras, the seeds).")
    return {"rows": rows, "notes": notes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CASES} cases per loader")
    parser.add_argument("--cases", type=int, help=f"cases per loader (default {FULL_CASES})")
    args = parser.parse_args(argv)
    from keras_quant.formatting import markdown_table

    report = run(args.quick, args.cases)
    print(markdown_table(report["rows"]))
    for note in report["notes"]:
        print(note)
    return int(any(r["non_typed_failures"] for r in report["rows"]))


if __name__ == "__main__":
    sys.exit(main())
