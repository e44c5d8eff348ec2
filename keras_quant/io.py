"""Files in and out: the one codec and the one atomic writer every keras_quant file goes through.

Calibration results and caches (`keras_quant.calibration`), exported models
(`keras_quant.export`), analysis reports and plots (`keras_quant.analysis`)
and the benchmark results all write with `write_atomic`; the checksummed
container below is the calibration file format.

Container (shared by both payload formats)::

    KQCAL {"format": "json", "payload_bytes": N, "schema_version": 1, "sha256": "<hex>"}\\n
    <N payload bytes>

The first line is the magic `KQCAL ` and a one-line JSON header; the payload
follows: indented UTF-8 JSON (`format="json"`, readable) or msgpack
(`format="msgpack"`, compact; numpy arrays as raw little-endian bytes with
their dtype and shape). `sha256` is the SHA-256 of the payload bytes. With
`compression="gzip"` or `"zstd"` the whole container is compressed (so
`zcat result.json.gz` shows the header line and the JSON). Loading detects the
compression from the magic bytes, decompresses at most
`MAX_DECOMPRESSED_BYTES` (a hostile file cannot exhaust memory), checks the
magic line, the schema version, the format, the payload length and the
checksum, then decodes into new objects: a truncated, tampered, oversized or
unknown file raises `keras_quant.errors.IntegrityError` and nothing is
half-loaded. No pickle is used anywhere; arrays may only have bool, integer or
float dtypes.

In JSON, non-finite floats are written as the strings `"inf"`, `"-inf"`,
`"nan"` (as `keras_quant.formatting.to_jsonable` does) and missing values as
`null`; arrays are `{"__ndarray__": dtype, "shape": [...], "data": [...]}`.

Writes are atomic: the bytes go to a temporary file in the target directory,
which is flushed, fsync'ed and `os.replace`d onto the path; on any failure the
temporary file is removed and an existing file is left untouched.

Example:

>>> import numpy as np
>>> from keras_quant import io as kq_io
>>> raw = kq_io.dump_bytes({"x": np.arange(3, dtype=np.int8)}, "msgpack", "zstd")
>>> kq_io.load_bytes(raw)["x"].tolist()
[0, 1, 2]
"""

import gzip
import hashlib
import io
import json
import math
import os
import tempfile

import numpy as np

from keras_quant.errors import ConfigError, IntegrityError
from keras_quant.formatting import to_jsonable

__all__ = [
    "SCHEMA_VERSION",
    "FORMATS",
    "COMPRESSIONS",
    "MAGIC",
    "MAX_DECOMPRESSED_BYTES",
    "encode_tree",
    "decode_tree",
    "decode_array",
    "encode_payload",
    "decode_payload",
    "compress",
    "decompress",
    "infer_format",
    "dump_bytes",
    "load_bytes",
    "write_atomic",
    "save_tree",
    "load_tree",
]

SCHEMA_VERSION = 1
FORMATS = ("json", "msgpack")
COMPRESSIONS = (None, "gzip", "zstd")
MAGIC = b"KQCAL "
MAX_DECOMPRESSED_BYTES = 1 << 32  # 4 GiB: a larger decompressed file is refused (decompression bombs)
_ARRAY_KINDS = "biuf"  # bool, signed, unsigned, float: nothing that can carry objects
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_HEADER_LIMIT = 4096


# --------------------------------------------------------------------------
# Value trees: plain values, numpy arrays tagged with dtype and shape.


def encode_tree(value, binary):
    """`value` as a tree of plain values, numpy arrays tagged with their dtype and shape.

    Args:
        value: Nested dicts / lists / tuples of numbers, strings, None,
            numpy scalars and arrays, and objects with a `get_config()` (a
            `keras_quant.QuantSpec`), stored as their config.
        binary: True for msgpack (array data as raw little-endian bytes, floats
            as they are); False for JSON (array data as lists, non-finite
            floats as `"inf"` / `"-inf"` / `"nan"`).

    Returns:
        The tree: dicts with string keys, lists, plain scalars; each array a
        `{"__ndarray__": dtype, "shape": [...], "data": ...}` dict.

    Raises:
        ConfigError: For an array whose dtype is not bool, integer or float.

    Example:

    >>> encode_tree({"a": np.array([1.5, np.inf], np.float32)}, binary=False)
    {'a': {'__ndarray__': '<f4', 'shape': [2], 'data': [1.5, 'inf']}}
    """
    if isinstance(value, np.ndarray):
        return _encode_array(value, binary)
    if isinstance(value, np.generic):
        value = value.item()
    if callable(getattr(value, "get_config", None)):
        return encode_tree(value.get_config(), binary)
    if isinstance(value, dict):
        return {str(k): encode_tree(x, binary) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_tree(x, binary) for x in value]
    if isinstance(value, float) and not binary and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return to_jsonable(value) if not binary else str(value)


def _encode_array(value, binary):
    if value.dtype.kind not in _ARRAY_KINDS:
        raise ConfigError("dtype", str(value.dtype), "only bool, integer and float arrays can be stored")
    dtype = value.dtype.newbyteorder("<") if value.dtype.itemsize > 1 else value.dtype
    if binary:
        data = np.ascontiguousarray(value, dtype=dtype).tobytes()
    else:
        data = [to_jsonable(x) for x in value.reshape(-1).tolist()]
    return {"__ndarray__": dtype.str, "shape": list(value.shape), "data": data}


def decode_array(tagged):
    """A new native-byte-order numpy array from its `encode_tree` tag.

    Args:
        tagged: `{"__ndarray__": dtype, "shape": [...], "data": bytes or list}`.

    Returns:
        The array (a new object).

    Raises:
        ValueError: For a dtype other than bool / integer / float, or data
            that does not match the shape.
    """
    dtype = np.dtype(tagged["__ndarray__"])
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject:
        raise ValueError(f"array dtype {dtype} is not allowed")
    shape = tuple(int(s) for s in tagged["shape"])
    data = tagged["data"]
    if isinstance(data, (bytes, bytearray)):
        if len(data) != dtype.itemsize * math.prod(shape):
            raise ValueError("array data does not match its shape")
        arr = np.frombuffer(bytes(data), dtype=dtype).reshape(shape)
    else:
        if dtype.kind == "f":
            data = [float(x) for x in data]
        arr = np.asarray(data, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def decode_tree(tree):
    """Inverse of `encode_tree`: tagged dicts back to numpy arrays (new objects).

    Args:
        tree: A tree from `encode_tree` (or read from its JSON / msgpack bytes).

    Returns:
        The tree with every array tag decoded by `decode_array`.
    """
    if isinstance(tree, dict):
        if "__ndarray__" in tree:
            return decode_array(tree)
        return {k: decode_tree(x) for k, x in tree.items()}
    if isinstance(tree, list):
        return [decode_tree(x) for x in tree]
    return tree


# --------------------------------------------------------------------------
# Payloads and compression.


def encode_payload(tree, fmt):
    """Bytes of a value tree: `"json"` indented UTF-8, `"msgpack"` binary arrays.

    Args:
        tree: A value tree (see `encode_tree`).
        fmt: `"json"` or `"msgpack"`.

    Returns:
        The payload bytes.
    """
    if fmt == "json":
        return json.dumps(encode_tree(tree, binary=False), indent=1, allow_nan=False).encode("utf-8") + b"\n"
    import msgpack

    return msgpack.packb(encode_tree(tree, binary=True), use_bin_type=True)


def decode_payload(data, fmt):
    """The tree of `encode_payload`'s bytes, arrays as new numpy arrays.

    Args:
        data: The payload bytes.
        fmt: `"json"` or `"msgpack"`.

    Returns:
        The decoded tree.
    """
    if fmt == "json":
        return decode_tree(json.loads(data.decode("utf-8")))
    import msgpack

    return decode_tree(msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True))


def compress(data, compression):
    """`data` compressed with `compression` (None: as is; `"gzip"`: no timestamp, so reproducible; `"zstd"`)."""
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


def _read_bounded(stream, path, max_bytes):
    """All of `stream`, read in chunks; `IntegrityError` as soon as it passes `max_bytes`."""
    chunks, total = [], 0
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise IntegrityError(path, f"decompresses to more than {max_bytes} bytes, the limit "
                                 "(keras_quant.io.MAX_DECOMPRESSED_BYTES); refusing a possible decompression bomb")
        chunks.append(chunk)


def decompress(raw, path="<bytes>", max_bytes=None):
    """`raw` decompressed if it starts with gzip's or zstd's magic bytes, else `raw` itself.

    Args:
        raw: The file's bytes.
        path: Named in errors.
        max_bytes: The most decompressed bytes accepted (default
            `MAX_DECOMPRESSED_BYTES`, read at call time).

    Returns:
        The decompressed bytes.

    Raises:
        IntegrityError: For a corrupt or truncated compressed stream, or one
            that decompresses to more than `max_bytes` (read in chunks: the
            excess is never held in memory).
    """
    max_bytes = MAX_DECOMPRESSED_BYTES if max_bytes is None else max_bytes
    try:
        if raw[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                return _read_bounded(f, path, max_bytes)
        if raw[:4] == _ZSTD_MAGIC:
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as f:
                return _read_bounded(f, path, max_bytes)
    except IntegrityError:
        raise
    except Exception as e:  # truncated / garbled compressed stream
        raise IntegrityError(path, f"the compressed data is corrupt ({type(e).__name__}: {e})") from None
    return raw


# --------------------------------------------------------------------------
# The container: header line + payload, optional outer compression.


def infer_format(path, fmt=None, compression=None):
    """The `(format, compression)` of a container file, from `path`'s suffix unless given.

    Args:
        path: The file name: `.json` or `.msgpack` / `.mpk`, optionally
            followed by `.gz` or `.zst`.
        fmt: `"json"` or `"msgpack"`; overrides the suffix.
        compression: None, `"gzip"` or `"zstd"`; overrides the suffix.

    Returns:
        `(fmt, compression)`.

    Raises:
        ConfigError: For an unknown format / compression or a suffix that names none.
    """
    name = os.path.basename(str(path)).lower()
    suffix_compression = None
    for ext, comp in ((".gz", "gzip"), (".zst", "zstd")):
        if name.endswith(ext):
            name, suffix_compression = name[: -len(ext)], comp
    if compression is None:
        compression = suffix_compression
    if fmt is None:
        if name.endswith(".json"):
            fmt = "json"
        elif name.endswith((".msgpack", ".mpk")):
            fmt = "msgpack"
        else:
            raise ConfigError(
                "path", str(path), "cannot infer the format: use a .json or .msgpack/.mpk suffix (optionally + .gz/.zst) "
                "or pass format="
            )
    if fmt not in FORMATS:
        raise ConfigError("format", fmt, f"format must be one of {FORMATS}")
    if compression not in COMPRESSIONS:
        raise ConfigError("compression", compression, f"compression must be one of {COMPRESSIONS}")
    return fmt, compression


def dump_bytes(tree, fmt, compression=None):
    """The container bytes of a value tree (header line with length and SHA-256, then the payload).

    Args:
        tree: A value tree (see `encode_tree`).
        fmt: `"json"` or `"msgpack"`.
        compression: None, `"gzip"` or `"zstd"`.

    Returns:
        The bytes of the file.
    """
    payload = encode_payload(tree, fmt)
    header = {
        "schema_version": SCHEMA_VERSION,
        "format": fmt,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    return compress(MAGIC + json.dumps(header, sort_keys=True).encode("ascii") + b"\n" + payload, compression)


def _read_header(data, path):
    """`(fmt, payload)` of decompressed container bytes, the header checked."""
    if not data.startswith(MAGIC):
        raise IntegrityError(path, "not a keras_quant calibration file (bad magic)")
    end = data.find(b"\n", 0, _HEADER_LIMIT)
    if end < 0:
        raise IntegrityError(path, "the header line is missing or truncated")
    try:
        header = json.loads(data[len(MAGIC):end].decode("ascii"))
        version, fmt = header["schema_version"], header["format"]
        size, digest = int(header["payload_bytes"]), str(header["sha256"])
    except Exception:
        raise IntegrityError(path, "the header is garbled") from None
    if version != SCHEMA_VERSION:
        raise IntegrityError(path, f"unknown schema_version {version!r} (this version reads {SCHEMA_VERSION})")
    if fmt not in FORMATS:
        raise IntegrityError(path, f"unknown format {fmt!r}")
    payload = data[end + 1:]
    if len(payload) != size:
        raise IntegrityError(path, f"the payload has {len(payload)} bytes, the header says {size} (truncated?)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise IntegrityError(path, "checksum mismatch (sha256)")
    return fmt, payload


def load_bytes(raw, path="<bytes>", max_bytes=None):
    """The value tree of container bytes, verified.

    Args:
        raw: The file's bytes (compressed or not).
        path: Named in errors.
        max_bytes: The most decompressed bytes accepted (see `decompress`).

    Returns:
        The decoded tree (new objects).

    Raises:
        IntegrityError: For a bad magic, header, schema version, format,
            length or checksum, a corrupt or oversized compressed stream, or
            a payload that does not decode.
    """
    fmt, payload = _read_header(decompress(raw, path, max_bytes), path)
    try:
        return decode_payload(payload, fmt)
    except Exception as e:
        raise IntegrityError(path, f"the payload does not decode ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------
# Files.


def write_atomic(path, data, make_parents=False):
    """Write `data` to `path` atomically (temp file in the same directory, fsync, `os.replace`).

    On any failure the temporary file is removed and `path` is left as it was. The file gets the
    permissions an ordinary `open(path, "wb")` would (0666 less the umask), not the temporary
    file's private 0600.

    Args:
        path: The target file.
        data: Bytes, or a str (written as UTF-8).
        make_parents: Create the parent folder(s) first.

    Example:

    >>> write_atomic("/tmp/kq-example.txt", "hello\\n")   # doctest: +SKIP
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    if make_parents:
        os.makedirs(directory, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(delete=False, dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)
        os.replace(tmp.name, path)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


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


def save_tree(path, tree, format=None, compression=None):  # noqa: A002 (Keras-style argument name)
    """Write a value tree to `path` as a container file, atomically.

    Args:
        path: Target file; format and compression inferred from the suffix (see `infer_format`).
        tree: A value tree (see `encode_tree`).
        format: `"json"` or `"msgpack"`; overrides the suffix.
        compression: None, `"gzip"` or `"zstd"`; overrides the suffix.

    Returns:
        The path written.

    Raises:
        ConfigError: For an unknown format / compression or a suffix that names none.
    """
    fmt, compression = infer_format(path, format, compression)
    write_atomic(path, dump_bytes(tree, fmt, compression))
    return path


def load_tree(path, max_bytes=None):
    """The verified value tree of a container file (any format / compression).

    Args:
        path: The file.
        max_bytes: The most decompressed bytes accepted (see `decompress`).

    Returns:
        The decoded tree.

    Raises:
        IntegrityError: As `load_bytes`.
        FileNotFoundError: If `path` does not exist.
    """
    with open(path, "rb") as f:
        raw = f.read()
    return load_bytes(raw, path, max_bytes)
