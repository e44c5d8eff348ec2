"""keras_quant.io: the container codec (json / msgpack, gzip / zstd), its checks and bounds, the atomic writer."""

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from keras_quant import io as kq_io
from keras_quant.errors import ConfigError, IntegrityError

FORMATS = ["json", "msgpack"]
COMPRESSIONS = [None, "gzip", "zstd"]
CASES = [(fmt, comp) for fmt in FORMATS for comp in COMPRESSIONS]


def _tree():
    return {
        "f64": np.array([1.0 / 3.0, np.inf, -np.inf, -0.0]),
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "i8": np.array([-128, 0, 127], np.int8),
        "u16": np.array([0, 65535], np.uint16),
        "b": np.array([True, False]),
        "empty": np.zeros((0, 2), np.float32),
        "nested": {"list": [1, 2.5, "x", None, True], "tuple": (3, 4), "nan": float("nan")},
        "scalar": np.float64(0.125),
    }


def _assert_same(back, tree):
    for key in ("f64", "f32", "i8", "u16", "b", "empty"):
        assert back[key].dtype == tree[key].dtype and back[key].shape == tree[key].shape
        np.testing.assert_array_equal(back[key], tree[key])
    assert back["nested"]["list"] == [1, 2.5, "x", None, True] and back["nested"]["tuple"] == [3, 4]
    assert back["scalar"] == 0.125


@pytest.mark.parametrize("fmt,comp", CASES)
def test_container_round_trip(fmt, comp):
    tree = _tree()
    raw = kq_io.dump_bytes(tree, fmt, comp)
    magic = {None: kq_io.MAGIC, "gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}[comp]
    assert raw.startswith(magic)
    back = kq_io.load_bytes(raw)
    _assert_same(back, tree)
    assert kq_io.dump_bytes(tree, fmt, comp) == raw  # deterministic (gzip without a timestamp)


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_round_trip_and_json_form(fmt):
    tree = _tree()
    back = kq_io.decode_payload(kq_io.encode_payload(tree, fmt), fmt)
    _assert_same(back, tree)
    assert str(back["nested"]["nan"]) == "nan"


def test_json_form_is_plain_and_tagged():
    encoded = kq_io.encode_tree({"a": np.array([1.5, np.inf], np.float32), "n": np.int64(3)}, binary=False)
    assert encoded == {"a": {"__ndarray__": "<f4", "shape": [2], "data": [1.5, "inf"]}, "n": 3}
    binary = kq_io.encode_tree({"a": np.array([1, 2], ">i4")}, binary=True)["a"]
    assert binary["__ndarray__"] == "<i4" and binary["data"] == b"\x01\0\0\0\x02\0\0\0"


def test_objects_with_a_config_are_stored_as_their_config():
    import keras_quant as kq

    spec = kq.QuantSpec(bits=4)
    assert kq_io.encode_tree({"spec": spec}, binary=False) == {"spec": spec.get_config()}


def test_object_arrays_are_refused_both_ways():
    with pytest.raises(ConfigError):
        kq_io.encode_tree(np.array([object()], dtype=object), binary=True)
    with pytest.raises(ValueError, match="not allowed"):
        kq_io.decode_array({"__ndarray__": "|O", "shape": [1], "data": b"\0" * 8})
    with pytest.raises(ValueError, match="shape"):
        kq_io.decode_array({"__ndarray__": "<f4", "shape": [2], "data": b"\0" * 4})


@pytest.mark.parametrize("fmt,comp", CASES)
def test_save_and_load_tree_by_suffix(fmt, comp, tmp_path):
    suffix = {"json": ".json", "msgpack": ".msgpack"}[fmt] + {None: "", "gzip": ".gz", "zstd": ".zst"}[comp]
    path = tmp_path / ("t" + suffix)
    assert kq_io.save_tree(path, _tree()) == path
    assert kq_io.infer_format(path) == (fmt, comp)
    _assert_same(kq_io.load_tree(path), _tree())
    assert os.listdir(tmp_path) == [path.name]


def test_infer_format_errors():
    assert kq_io.infer_format("x.mpk.gz") == ("msgpack", "gzip")
    assert kq_io.infer_format("x.bin", fmt="json", compression="zstd") == ("json", "zstd")
    with pytest.raises(ConfigError, match="infer the format"):
        kq_io.infer_format("x.txt")
    with pytest.raises(ConfigError):
        kq_io.infer_format("x.json", compression="lz4")
    with pytest.raises(ConfigError):
        kq_io.infer_format("x.json", fmt="yaml")


def _container(payload, **header):
    h = {"schema_version": 1, "format": "json", "payload_bytes": len(payload),
         "sha256": hashlib.sha256(payload).hexdigest()}
    h.update(header)
    return kq_io.MAGIC + json.dumps(h).encode() + b"\n" + payload


@pytest.mark.parametrize("raw,match", [
    (b"hello", "bad magic"),
    (kq_io.MAGIC + b"{}", "header line"),
    (kq_io.MAGIC + b"{not json}\n{}", "garbled"),
    (_container(b"{}\n", schema_version=2), "schema_version 2"),
    (_container(b"{}\n", format="pickle"), "unknown format"),
    (_container(b"{}\n", payload_bytes=4), "truncated"),
    (_container(b"{}\n", sha256="0" * 64), "checksum"),
    (_container(b"{oops\n"), "does not decode"),
    (b"\x1f\x8b\x08\x00garbage", "compressed data is corrupt"),
    (b"\x28\xb5\x2f\xfdgarbage", "compressed data is corrupt"),
])
def test_integrity_failures_name_the_file(raw, match):
    with pytest.raises(IntegrityError, match=match) as info:
        kq_io.load_bytes(raw, path="some/file.json")
    assert "some/file.json" in str(info.value)


def test_flipped_byte_is_caught(tmp_path):
    raw = kq_io.dump_bytes(_tree(), "msgpack")
    for i in (len(raw) // 2, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        with pytest.raises(IntegrityError):
            kq_io.load_bytes(bytes(flipped))


@pytest.mark.parametrize("comp", ["gzip", "zstd"])
def test_decompression_is_bounded(comp, tmp_path, monkeypatch):
    """A small file that inflates past the limit is refused, naming the file and the limit."""
    zeros = b"\0" * (4 << 20)
    bomb = kq_io.compress(_container(zeros), comp)  # a header that tells the truth, 4 MiB of zeros in a few KiB
    assert len(bomb) < 64 << 10
    path = tmp_path / ("bomb.json" + {"gzip": ".gz", "zstd": ".zst"}[comp])
    path.write_bytes(bomb)
    with pytest.raises(IntegrityError, match=r"over the limit of 1048576") as info:
        kq_io.load_tree(path, max_bytes=1 << 20)
    assert str(path) in str(info.value) and "MAX_DECOMPRESSED_BYTES" in str(info.value)
    liar = kq_io.compress(_container(b"{}\n") + zeros, comp)  # a header that declares 3 bytes
    with pytest.raises(IntegrityError, match="longer than the"):
        kq_io.load_bytes(liar, max_bytes=1 << 30)
    monkeypatch.setattr(kq_io, "MAX_DECOMPRESSED_BYTES", 1 << 20)  # the default bound is read at call time
    with pytest.raises(IntegrityError, match="over the limit"):
        kq_io.load_tree(path)
    assert kq_io.decompress(bomb, max_bytes=5 << 20) == _container(zeros)
    with pytest.raises(IntegrityError, match="decompression bomb"):
        kq_io.decompress(bomb, max_bytes=1 << 20)


def _leftovers(directory):
    return sorted(p for p in os.listdir(directory) if p.endswith(".tmp"))


def test_atomic_write_keeps_the_old_file_when_the_encoder_fails(tmp_path, monkeypatch):
    path = tmp_path / "t.msgpack"
    kq_io.save_tree(path, _tree())
    before = path.read_bytes()

    def broken(tree, fmt):
        raise RuntimeError("encoder failed midway")

    monkeypatch.setattr(kq_io, "encode_payload", broken)
    with pytest.raises(RuntimeError, match="midway"):
        kq_io.save_tree(path, {"new": 1})
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_write_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "t.bin"
    kq_io.write_atomic(path, b"old contents")

    def failing_fsync(fd):
        assert os.fstat(fd).st_size == len(b"new, longer contents")  # the partial new file is on disk
        raise OSError("disk full")

    monkeypatch.setattr(kq_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        kq_io.write_atomic(path, b"new, longer contents")
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents" and _leftovers(tmp_path) == []


def test_write_atomic_text_parents_and_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "a" / "b" / "t.txt"
        with pytest.raises(FileNotFoundError):
            kq_io.write_atomic(path, "x")
        kq_io.write_atomic(path, "héllo\n", make_parents=True)
        assert path.read_bytes() == "héllo\n".encode("utf-8")
        assert path.stat().st_mode & 0o777 == 0o644
        kq_io.write_atomic(path, b"\x00")
        assert path.read_bytes() == b"\x00" and os.listdir(path.parent) == ["t.txt"]
    finally:
        os.umask(umask)


def test_gzip_container_is_a_plain_gzip_file():
    raw = kq_io.dump_bytes({"a": 1}, "json", "gzip")
    text = gzip.decompress(raw)
    header, payload = text.split(b"\n", 1)
    assert json.loads(header[len(kq_io.MAGIC):])["sha256"] == hashlib.sha256(payload).hexdigest()
    assert json.loads(payload) == {"a": 1}
