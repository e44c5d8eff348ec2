"""Calibration data from files: `.npy`, `.npz` or a folder of images, shaped for a model.

`load_calibration_data(path, model)` reads what `keras-quant calibrate --data`
names and returns what `model.predict` takes: one float32 array for a
single-input model, a dict of arrays keyed by input name for a multi-input
model.

Sources:

- `.npy`: one array (read by `load_array_file`: no pickle, no object arrays,
  header and size checked), for a single-input model.
- `.npz`: for a single-input model the array named `x`, else the array named
  after the model's input, else the only array; several arrays with none of
  those names is an error that lists them. For a multi-input model, one array
  per input, named after the input (other arrays, e.g. labels, are ignored).
- A folder: every `.png`, `.jpg`, `.jpeg`, `.bmp`, `.gif` below it
  (recursively, sorted by relative path; other files are skipped), read with
  `keras.utils.load_img` / `keras.utils.img_to_array`, resized (bilinear) to
  the model input's `(H, W)`, in grayscale for a 1-channel input, RGB for 3,
  RGBA for 4. The model input must be `(None, H, W, C)` (channels last). An
  image over `MAX_IMAGE_PIXELS` pixels (its header read first) or one the
  decoder fails on is a `ConfigError` naming the file.

Values:

- Images (from a folder, or `uint8` arrays, taken as 0-255 pixel data) are
  normalised with `normalize`: `"unit"` divides by 255 (values in [0, 1]),
  `"imagenet"` gives `((x / 255) - mean) / std` with ImageNet's per-channel
  mean `(0.485, 0.456, 0.406)` and std `(0.229, 0.224, 0.225)` (3-channel data
  only), `"none"` keeps 0-255.
- Other integer (and bool) arrays are cast to float32 unchanged; float arrays
  are cast to float32 unchanged: `normalize` does not apply to them.

Shapes: each array must be `(N, *input_shape[1:])`, with None dimensions of
the model input matching anything. When the only difference is a missing
trailing channel axis of size 1 (`(N, 28, 28)` for a `(None, 28, 28, 1)`
input) it is added; anything else is a `ShapeMismatchError` naming both shapes.

Example:

>>> x = load_calibration_data("calib/", model, normalize="imagenet")   # doctest: +SKIP
>>> model.predict(x, callbacks=[kq.CalibrationCallback()])              # doctest: +SKIP
"""

import os
import zipfile
from pathlib import Path

import numpy as np

from keras_quant.errors import ConfigError, ShapeMismatchError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ARRAY_EXTENSIONS",
    "NORMALIZATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_calibration_data",
    "model_inputs",
    "load_array_file",
    "MAX_ARRAY_BYTES",
    "MAX_COMPRESSION_RATIO",
    "MIN_INFLATED_BYTES",
    "MAX_IMAGE_PIXELS",
    "list_images",
    "load_image_folder",
    "normalize_images",
    "conform_array",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
ARRAY_EXTENSIONS = (".npy", ".npz")
NORMALIZATIONS = ("unit", "imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}
MAX_IMAGE_PIXELS = 1 << 26  # 64 megapixels: a larger image (a decompression bomb, or no calibration image) is refused


def _check_normalize(normalize):
    if normalize not in NORMALIZATIONS:
        raise ConfigError("normalize", normalize, f"normalize must be one of {NORMALIZATIONS}")


def model_inputs(model):
    """`[(name, shape)]` for each model input; `shape` has a None batch axis, e.g. `(None, 28, 28, 1)`.

    Names are the input layers' names (the keys a multi-input model's
    `predict` takes in a dict, and the calibration's input keys).
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ConfigError(
            "model", getattr(model, "name", model), "the model has no defined inputs; build it on an input shape first"
        )
    from keras_quant.layers.walk import input_keys

    names = input_keys(model) or [f"input_{i}" for i in range(len(inputs))]
    return [(name, tuple(None if d is None else int(d) for d in t.shape)) for name, t in zip(names, inputs)]


# Arrays ------------------------------------------------------------------------
MAX_ARRAY_BYTES = 1 << 34  # 16 GiB: no array file is read past this
MAX_COMPRESSION_RATIO = 256  # a compressed .npz may not declare more than this many times its size ...
MIN_INFLATED_BYTES = 64 << 20  # ... unless under 64 MiB
_NPY_HEADER_LIMIT = 10000  # numpy's own default max_header_size


def _read_npy(f, where, available):
    """The array of an open `.npy` stream holding `available` bytes, its header checked before any data is read."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=_NPY_HEADER_LIMIT)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=_NPY_HEADER_LIMIT)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.kind not in "biuf" or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"the array has dtype {dtype}; calibration data must hold numbers (bool, integer or float)")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"the array header declares the shape {shape}")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
    if nbytes != available - f.tell():
        raise ValueError(f"the header declares {nbytes} bytes of {dtype} {shape} and the file holds "
                         f"{available - f.tell()} (truncated or padded?)")
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{where}: truncated array data")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape[::-1] if fortran else shape)
    return (arr.T if fortran else arr).copy()


def _read_npz(path):
    """`{name: array}` of an `.npz`: each member's declared size checked (bounded inflation) before it is read."""
    arrays = {}
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        declared = sum(i.file_size for i in infos)
        limit = min(MAX_ARRAY_BYTES, max(MIN_INFLATED_BYTES, MAX_COMPRESSION_RATIO * os.path.getsize(path)))
        if declared > limit:
            raise ValueError(f"the archive declares {declared} uncompressed bytes, over the limit of {limit} "
                             "(keras_quant.data.MAX_COMPRESSION_RATIO, MAX_ARRAY_BYTES): a possible zip bomb")
        for info in infos:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise ValueError(f"the archive holds {info.filename!r}, not a .npy array")
            name = info.filename[: -len(".npy")]
            if name in arrays:
                raise ValueError(f"the archive holds two arrays named {name!r}")
            with z.open(info) as f:  # zipfile stops at the declared size and checks the CRC
                arrays[name] = _read_npy(f, f"{path}[{name!r}]", info.file_size)
    return arrays


def load_array_file(path):
    """The arrays of a `.npy` (one array) or `.npz` (dict of name to array) file, without pickles.

    Nothing is trusted before it is checked: only bool / integer / float
    arrays are read (no object arrays, no pickle), each array's header must
    declare exactly the bytes the file holds, and a compressed `.npz` may not
    declare more than `MAX_COMPRESSION_RATIO` times its size (at least
    `MIN_INFLATED_BYTES`, at most `MAX_ARRAY_BYTES`) before anything is inflated.

    Raises:
        ConfigError: If the file does not exist, has another extension, or
            cannot be read (corrupt, truncated, holds pickled objects or
            another dtype, or claims more than the limits).

    Example:

    >>> load_array_file("calib.npz")["x"].shape   # doctest: +SKIP
    (100, 28, 28, 1)
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("data", str(path), "no such file")
    suffix = path.suffix.lower()
    if suffix not in ARRAY_EXTENSIONS:
        raise ConfigError("data", str(path), f"unsupported file extension {suffix!r}; use {' or '.join(ARRAY_EXTENSIONS)}")
    try:
        if suffix == ".npz":
            return _read_npz(path)
        size = path.stat().st_size
        if size > MAX_ARRAY_BYTES:
            raise ValueError(f"the file has {size} bytes, over the limit of {MAX_ARRAY_BYTES} (keras_quant.data.MAX_ARRAY_BYTES)")
        with open(path, "rb") as f:
            return _read_npy(f, str(path), size)
    except Exception as e:  # anything a hostile file makes numpy / zipfile raise: one typed error naming the file
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError("data", str(path), f"cannot read the array file ({type(e).__name__}: {reason})") from None


def _pick_single(arrays, path, input_name):
    """The array of an `.npz` a single-input model calibrates on."""
    if not arrays:
        raise ConfigError("data", str(path), "the .npz file holds no arrays")
    for name in ("x", input_name):
        if name in arrays:
            return name, arrays[name]
    if len(arrays) == 1:
        return next(iter(arrays.items()))
    raise ConfigError(
        "data", str(path), f"the .npz file holds several arrays {sorted(arrays)} and none is named 'x' "
        f"or {input_name!r}; name the calibration array 'x'"
    )


def _matches(shape, expected):
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def conform_array(x, expected, field="data"):
    """`x` as float32 with the model input's shape `expected` (None batch axis).

    A missing trailing channel axis of size 1 is added. Integer and bool data
    are cast to float32; normalisation is `normalize_images`' job.

    Raises:
        ConfigError: For non-numeric data or no samples.
        ShapeMismatchError: For any other shape difference.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise ConfigError(f"{field}.dtype", str(x.dtype), f"{field} must hold numbers (float, integer or bool)")
    expected = tuple(expected)
    shape = tuple(x.shape)
    batch_expected = (None,) + expected[1:]
    if not _matches(shape, batch_expected):
        if len(expected) >= 2 and expected[-1] == 1 and _matches(shape, batch_expected[:-1]):
            x = x[..., np.newaxis]
        else:
            raise ShapeMismatchError(field, tuple(expected), shape)
    if x.shape[0] == 0:
        raise ConfigError(f"{field}.shape", tuple(x.shape), f"{field} holds no samples")
    return x


def normalize_images(x, normalize="unit"):
    """0-255 pixel data `x` (`(..., C)`) as float32, normalised.

    Args:
        x: Pixel values in 0-255 (uint8 or float).
        normalize: `"unit"` (`x / 255`), `"imagenet"` (`((x / 255) - mean) / std`,
            needs 3 channels on the last axis) or `"none"` (unchanged).

    Raises:
        ConfigError: For an unknown `normalize` or `"imagenet"` without 3 channels.
    """
    _check_normalize(normalize)
    x = np.asarray(x, dtype=np.float32)
    if normalize == "none":
        return x
    x = x / np.float32(255.0)
    if normalize == "imagenet":
        if x.ndim < 1 or x.shape[-1] != 3:
            raise ConfigError(
                "normalize", normalize, f"ImageNet normalisation needs 3 channels on the last axis, the data has "
                f"shape {tuple(x.shape)}; use --normalize unit or none"
            )
        x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x.astype(np.float32, copy=False)


def _prepare_array(x, expected, normalize, field):
    is_pixels = np.asarray(x).dtype == np.uint8
    x = conform_array(x, expected, field=field)
    if is_pixels:
        return normalize_images(x, normalize)
    return x.astype(np.float32, copy=False)


# Images ------------------------------------------------------------------------
def list_images(folder):
    """Image files below `folder` (recursively), sorted by their path relative to it."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _image_geometry(expected):
    if len(expected) != 4 or expected[-1] not in _COLOR_MODES:
        raise ShapeMismatchError("model input", "(None, H, W, C) with C in (1, 3, 4) for an image folder", expected)
    return expected[1], expected[2], expected[3]


def _read_image(keras, path, color_mode, target):
    """One image as a float32 `(H, W, C)` array; its size checked from the header before it is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as probe:  # reads the header only
            width, height = probe.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                             "(keras_quant.data.MAX_IMAGE_PIXELS)")
        img = keras.utils.load_img(path, color_mode=color_mode, target_size=target, interpolation="bilinear")
        return keras.utils.img_to_array(img, data_format="channels_last", dtype="float32")
    except Exception as e:  # a hostile file makes PIL raise almost anything: one typed error naming the file
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError("image", str(path), f"cannot read the image {path} ({type(e).__name__}: {reason})") from None


def load_image_folder(folder, expected, normalize="unit"):
    """The images below `folder` as one float32 array shaped like the model input `expected`.

    Args:
        folder: The folder.
        expected: The model input shape, `(None, H, W, C)`; images are resized
            to `(H, W)` (kept at their size where H or W is None: they must
            then all have the same size) and read in grayscale (C=1), RGB (3)
            or RGBA (4).
        normalize: As `normalize_images`.

    Raises:
        ConfigError: For a missing or image-less folder, or an unreadable image (named).
        ShapeMismatchError: For a model input that is not an image input, or
            images of different sizes where the input size is not fixed.
    """
    import keras

    _check_normalize(normalize)
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError("data", str(folder), "no such folder")
    height, width, channels = _image_geometry(tuple(expected))
    files = list_images(folder)
    if not files:
        raise ConfigError(
            "data", str(folder), f"the folder holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    target = (height, width) if height is not None and width is not None else None
    images = []
    for f in files:
        arr = _read_image(keras, f, _COLOR_MODES[channels], target)
        if images and arr.shape != images[0].shape:
            raise ShapeMismatchError(f"image {f}", images[0].shape, arr.shape)
        images.append(arr)
    x = np.stack(images)
    x = conform_array(x, expected, field=f"images in {folder}")
    return normalize_images(x, normalize)


# Entry point ------------------------------------------------------------------------
def load_calibration_data(path, model, normalize="unit"):
    """Calibration data for `model` from a `.npy`, a `.npz` or a folder of images.

    Args:
        path: The file or folder (see the module docstring for each source).
        model: The Keras model; its inputs set the expected shapes (and, for
            a multi-input model, the `.npz` array names).
        normalize: `"unit"` (default), `"imagenet"` or `"none"`; applies to
            images from a folder and to `uint8` arrays.

    Returns:
        A float32 numpy array (single-input model) or a dict of input name to
        float32 array (multi-input model), all with the same number of samples.

    Raises:
        ConfigError: Missing path, unsupported extension, empty folder,
            unreadable file or image, missing `.npz` arrays, no samples.
        ShapeMismatchError: Data whose shape does not fit the model input.
    """
    _check_normalize(normalize)
    inputs = model_inputs(model)
    path = Path(os.fspath(path))
    if not path.exists():
        raise ConfigError("data", str(path), "no such file or folder")
    if path.is_dir():
        if len(inputs) != 1:
            raise ConfigError(
                "data", str(path), f"an image folder can feed only a single-input model; this model has "
                f"{len(inputs)} inputs {[n for n, _ in inputs]}: use an .npz with one array per input"
            )
        return load_image_folder(path, inputs[0][1], normalize)
    suffix = path.suffix.lower()
    if suffix not in ARRAY_EXTENSIONS:
        raise ConfigError(
            "data", str(path), f"unsupported file extension {suffix!r}; use .npy, .npz or a folder of images "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    loaded = load_array_file(path)
    if len(inputs) == 1:
        name, expected = inputs[0]
        if isinstance(loaded, dict):
            key, array = _pick_single(loaded, path, name)
            field = f"{path.name}[{key!r}]"
        else:
            array, field = loaded, path.name
        return _prepare_array(array, expected, normalize, field)
    names = [n for n, _ in inputs]
    if not isinstance(loaded, dict):
        raise ConfigError(
            "data", str(path), f"the model has {len(inputs)} inputs {names}; use an .npz with one array per input, "
            "named after it"
        )
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ConfigError(
            "data", str(path), f"the .npz file lacks arrays for the model inputs {missing} (it holds "
            f"{sorted(loaded)}; the model's inputs are {names})"
        )
    out = {n: _prepare_array(loaded[n], shape, normalize, f"{path.name}[{n!r}]") for n, shape in inputs}
    counts = {n: int(a.shape[0]) for n, a in out.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError("data", str(path), f"the model inputs' arrays hold different numbers of samples {counts}")
    return out
