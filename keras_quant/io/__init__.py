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
compression from the magic bytes and inflates in chunks: the magic and the
header are judged from the first chunk (anything else is refused before more
is inflated), and inflating stops once the output passes the header's
declared size or `default_limit` (`MAX_COMPRESSION_RATIO` times the file,
at least `MIN_DECOMPRESSED_LIMIT`, at most `MAX_DECOMPRESSED_BYTES`): a small
file that expands to gigabytes is refused after a few megabytes. Then the
payload length and checksum are checked and the payload is decoded into new
objects, strictly (array shapes and elements are checked, never cast; trees
deeper than `MAX_NESTING` are refused): a truncated, tampered, oversized or
unknown file raises `keras_quant.errors.IntegrityError` and nothing is
half-loaded. No pickle is used anywhere; arrays may only have bool, integer or
float dtypes.

In JSON, non-finite floats are written as the strings `"inf"`, `"-inf"`,
`"nan"` (as `keras_quant.formatting.to_jsonable` does) and missing values as
`null`; arrays are `{"__ndarray__": dtype, "shape": [...], "data": [...]}`.

Writes are atomic (`keras_quant.io.atomic`): the bytes go to a temporary file
in the target directory, which is flushed, fsync'ed and `os.replace`d onto the
path; on any failure the temporary file is removed and an existing file is left
untouched, and temporary files of writers that were killed are removed by the
next write into that directory.

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

import numpy as np

from keras_quant.errors import ConfigError, IntegrityError, is_number
from keras_quant.formatting import to_jsonable
from keras_quant.io.atomic import STALE_TEMP_SECONDS, remove_stale_temps, write_atomic

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
    "remove_stale_temps",
    "STALE_TEMP_SECONDS",
    "default_limit",
    "MAX_COMPRESSION_RATIO",
    "MIN_DECOMPRESSED_LIMIT",
    "MAX_NESTING",
    "save_tree",
    "load_tree",
]

SCHEMA_VERSION = 1
FORMATS = ("json", "msgpack")
COMPRESSIONS = (None, "gzip", "zstd")
MAGIC = b"KQCAL "
MAX_DECOMPRESSED_BYTES = 1 << 32  # 4 GiB: no container is inflated past this, whatever its size
MAX_COMPRESSION_RATIO = 1024  # nor past this many times its compressed size ...
MIN_DECOMPRESSED_LIMIT = 64 << 20  # ... unless that is under 64 MiB (see default_limit)
MAX_NESTING = 64  # a value tree deeper than this is refused (a calibration file is about 5 deep)
_ARRAY_KINDS = "biuf"  # bool, signed, unsigned, float: nothing that can carry objects
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_FIRST_CHUNK = 1 << 16  # the magic and header are judged from this much, before the rest is inflated
_ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default cap on the window a frame may ask for
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


def _check_shape(shape):
    if not isinstance(shape, list) or len(shape) > MAX_NESTING:
        raise ValueError(f"array shape {shape!r} is not a list of at most {MAX_NESTING} sizes")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 1 << 40:
            raise ValueError(f"array shape {shape!r} holds {s!r}, not a size")
    return tuple(shape)


def _list_element(x, kind):
    """One element of a JSON array's data, checked against the dtype kind (no silent casts)."""
    if kind == "b":
        ok = isinstance(x, bool)
    elif kind == "f":
        ok = (is_number(x) and not isinstance(x, (bool, np.bool_))) or x in ("inf", "-inf", "nan")
        x = float(x) if ok else x
    else:
        ok = isinstance(x, int) and not isinstance(x, bool)
    if not ok:
        raise ValueError(f"array element {x!r} does not fit the array's dtype")
    return x


def decode_array(tagged):
    """A new native-byte-order numpy array from its `encode_tree` tag, checked (nothing is cast).

    Args:
        tagged: `{"__ndarray__": dtype, "shape": [...], "data": bytes or list}`.

    Returns:
        The array (a new object).

    Raises:
        ValueError: For a dtype other than bool / integer / float, a shape
            that is not a list of sizes, data that does not match the shape,
            or list elements that do not fit the dtype (`1.5` in an integer
            array, `300` in an int8 one).
    """
    if not isinstance(tagged, dict) or set(tagged) != {"__ndarray__", "shape", "data"}:
        raise ValueError("an array tag needs exactly the keys __ndarray__, shape and data")
    if not isinstance(tagged["__ndarray__"], str) or len(tagged["__ndarray__"]) > 8:
        raise ValueError(f"array dtype {tagged['__ndarray__']!r} is not allowed")
    dtype = np.dtype(tagged["__ndarray__"])
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None or dtype.shape:
        raise ValueError(f"array dtype {dtype} is not allowed")
    shape = _check_shape(tagged["shape"])
    data, count = tagged["data"], math.prod(shape)
    if isinstance(data, (bytes, bytearray)):
        if len(data) != dtype.itemsize * count:
            raise ValueError("array data does not match its shape")
        arr = np.frombuffer(bytes(data), dtype=dtype).reshape(shape)
    elif isinstance(data, list) and len(data) == count:
        values = [_list_element(x, dtype.kind) for x in data]
        if dtype.kind in "iu" and values and not np.iinfo(dtype).min <= min(values) <= max(values) <= np.iinfo(dtype).max:
            raise ValueError(f"array data does not fit {dtype}")
        with np.errstate(over="raise"):
            arr = np.array(values, dtype=dtype).reshape(shape)
    else:
        raise ValueError("array data does not match its shape")
    return arr.astype(dtype.newbyteorder("="), copy=True)


def decode_tree(tree, _depth=0):
    """Inverse of `encode_tree`: tagged dicts back to numpy arrays (new objects).

    Args:
        tree: A tree from `encode_tree` (or read from its JSON / msgpack bytes).

    Returns:
        The tree with every array tag decoded by `decode_array`.

    Raises:
        ValueError: For a tree nested deeper than `MAX_NESTING`, or a bad array tag.
    """
    if _depth > MAX_NESTING:
        raise ValueError(f"the value tree is nested deeper than {MAX_NESTING} levels")
    if isinstance(tree, dict):
        if "__ndarray__" in tree:
            return decode_array(tree)
        return {k: decode_tree(x, _depth + 1) for k, x in tree.items()}
    if isinstance(tree, list):
        return [decode_tree(x, _depth + 1) for x in tree]
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
        return decode_tree(json.loads(str(data, "utf-8")))
    import msgpack

    return decode_tree(msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext))


def _no_ext(code, data):
    raise ValueError(f"msgpack extension type {code} is not part of the format")


def compress(data, compression):
    """`data` compressed with `compression` (None: as is; `"gzip"`: no timestamp, so reproducible; `"zstd"`)."""
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


def default_limit(compressed_bytes):
    """The most decompressed bytes accepted from `compressed_bytes` of compressed input by default.

    `MAX_COMPRESSION_RATIO` times the compressed size, at least
    `MIN_DECOMPRESSED_LIMIT` and at most `MAX_DECOMPRESSED_BYTES` (all read at
    call time): a calibration file compresses a few times, so a small file
    that claims gigabytes is a decompression bomb, refused after at most that
    many bytes were inflated.

    Example:

    >>> default_limit(1000) == MIN_DECOMPRESSED_LIMIT
    True
    """
    return int(min(MAX_DECOMPRESSED_BYTES, max(MIN_DECOMPRESSED_LIMIT, MAX_COMPRESSION_RATIO * int(compressed_bytes))))


def _too_big(path, limit):
    return IntegrityError(path, f"decompresses to more than {limit} bytes, the limit (keras_quant.io.MAX_DECOMPRESSED_BYTES, "
                          "MAX_COMPRESSION_RATIO); refusing a possible decompression bomb")


def _open_stream(raw):
    """A reader of `raw`'s decompressed bytes, or None if `raw` is not gzip / zstd."""
    if raw[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=io.BytesIO(raw))
    if raw[:4] == _ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(io.BytesIO(raw))
    return None


def _inflate(stream, path, limit, check=None):
    """Read `stream` in chunks into a bytearray; stop with `IntegrityError` past `limit` bytes.

    `check(buf)` sees the bytes read so far after each chunk and returns a
    (possibly smaller) limit, or raises: the container's magic and header are
    judged from the first chunk, before anything else is inflated.
    """
    buf = bytearray()
    while True:
        chunk = stream.read(_FIRST_CHUNK if not buf else _CHUNK)
        if not chunk:
            return buf
        buf += chunk
        if check is not None:
            limit = check(buf, limit)
        if len(buf) > limit:
            raise _too_big(path, limit)


def decompress(raw, path="<bytes>", max_bytes=None, check=None):
    """`raw` decompressed if it starts with gzip's or zstd's magic bytes, else `raw` itself.

    The stream is inflated in chunks and stops as soon as it passes the
    limit: the excess is never held in memory.

    Args:
        raw: The file's bytes.
        path: Named in errors.
        max_bytes: The most decompressed bytes accepted (default
            `default_limit(len(raw))`).
        check: Optional `check(bytes_so_far, limit) -> limit`, called after
            each chunk; it may lower the limit or raise (`load_bytes` checks
            the magic and header this way, on the first chunk).

    Returns:
        The decompressed bytes (a bytearray when decompressed).

    Raises:
        IntegrityError: For a corrupt or truncated compressed stream, or one
            that decompresses to more than the limit.

    Example:

    >>> bytes(decompress(compress(b"abc", "gzip")))
    b'abc'
    """
    limit = default_limit(len(raw)) if max_bytes is None else int(max_bytes)
    try:
        stream = _open_stream(raw)
        if stream is None:
            if len(raw) > limit:
                raise _too_big(path, limit)
            if check is not None:
                check(raw, limit)
            return raw
        with stream:
            return _inflate(stream, path, limit, check)
    except IntegrityError:
        raise
    except Exception as e:  # truncated / garbled compressed stream
        raise IntegrityError(path, f"the compressed data is corrupt ({type(e).__name__}: {e})") from None


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


def _parse_header(data, path, complete=True):
    """`(fmt, payload_size, sha256, payload_start)` of the container's first line, checked.

    With `complete=False` (`data` is the first part of a stream), None while
    the line is not complete yet.
    """
    if len(data) < len(MAGIC) and not complete and MAGIC.startswith(bytes(data)):
        return None
    if not data.startswith(MAGIC):
        raise IntegrityError(path, "not a keras_quant calibration file (bad magic)")
    end = data.find(b"\n", 0, _HEADER_LIMIT)
    if end < 0:
        if not complete and len(data) < _HEADER_LIMIT:
            return None
        raise IntegrityError(path, "the header line is missing or truncated")
    try:
        header = json.loads(bytes(data[len(MAGIC):end]).decode("ascii"))
        version, fmt, size, digest = (header[k] for k in ("schema_version", "format", "payload_bytes", "sha256"))
    except Exception:
        raise IntegrityError(path, "the header is garbled") from None
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise IntegrityError(path, f"unknown schema_version {version!r} (this version reads {SCHEMA_VERSION})")
    if fmt not in FORMATS:
        raise IntegrityError(path, f"unknown format {fmt!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str):
        raise IntegrityError(path, f"the header is garbled (payload_bytes={size!r})")
    return fmt, size, digest, end + 1


def _container_check(path):
    """A `decompress` check: the magic and header judged as soon as they are in, the size bounded by the header."""
    declared = []

    def check(data, limit):
        if not declared:
            parsed = _parse_header(data, path, complete=False)
            if parsed is None:
                return limit
            _, size, _, start = parsed
            if start + size > limit:
                raise IntegrityError(path, f"the header declares {size} payload bytes, over the limit of {limit} "
                                     "decompressed bytes (keras_quant.io.MAX_DECOMPRESSED_BYTES, MAX_COMPRESSION_RATIO)")
            declared.append(start + size)
        if len(data) > declared[0]:
            raise IntegrityError(path, f"the payload is longer than the {declared[0]} bytes the header declares")
        return limit

    return check


def _read_header(data, path):
    """`(fmt, payload)` of decompressed container bytes, the header, length and checksum checked."""
    fmt, size, digest, start = _parse_header(data, path)
    payload = memoryview(data)[start:]
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
    fmt, payload = _read_header(decompress(raw, path, max_bytes, check=_container_check(path)), path)
    try:
        return decode_payload(payload, fmt)
    except Exception as e:
        raise IntegrityError(path, f"the payload does not decode ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------
# Files.


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
        size = os.fstat(f.fileno()).st_size
        limit = MAX_DECOMPRESSED_BYTES if max_bytes is None else int(max_bytes)
        if size > limit:
            raise IntegrityError(path, f"the file has {size} bytes, more than the limit of {limit} "
                                 "(keras_quant.io.MAX_DECOMPRESSED_BYTES)")
        raw = f.read(limit + 1)
    return load_bytes(raw, path, max_bytes)
