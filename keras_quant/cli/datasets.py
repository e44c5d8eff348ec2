"""Small datasets that work offline: the demo's data, also used by examples, tests and benchmarks.

They sit with the command line, apart from the library core (which never loads a dataset).

- `load_digits()`: scikit-learn's 8x8 digits (shipped inside the scikit-learn wheel; scikit-learn
  comes with the `data` extra, `pip install "keras-quant[data]"`, and is imported only here).
- `load_fashion_mnist()`: Fashion-MNIST from Debian's `dataset-fashion-mnist` package, the idx
  files that `keras.datasets.fashion_mnist` reads, parsed here without any download. They are
  looked for in the `directory` argument, else in the folder named by the environment variable
  `KERAS_QUANT_FASHION_MNIST_DIR`, else in Debian's `/usr/share/datasets/fashion-mnist`
  (`FASHION_MNIST_DIR`); `fashion_mnist_dir()` says which.

Both return `(x_train, y_train), (x_test, y_test)` with float32 images in
`[0, 1]` of shape `(n, h, w, 1)` and int32 labels.

Example:

>>> from keras_quant.cli import datasets
>>> (x, y), (x_test, y_test) = datasets.load_digits()
>>> x.shape[1:]
(8, 8, 1)
"""

import gzip
import os

import numpy as np

from keras_quant.errors import ConfigError, IntegrityError

__all__ = [
    "load_digits",
    "load_fashion_mnist",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "fashion_mnist_dir",
    "fashion_mnist_available",
    "load_fashion_or_digits",
]

# Where Debian's dataset-fashion-mnist installs the idx files: the default folder.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The environment variable that names another folder (read on each call, never at import).
FASHION_MNIST_DIR_ENV = "KERAS_QUANT_FASHION_MNIST_DIR"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's digits (1797 images, 8x8, 10 classes), split reproducibly.

    Args:
        test_fraction: Fraction of samples held out for testing.
        seed: Seed of the split.

    Returns:
        `(x_train, y_train), (x_test, y_test)`.

    Raises:
        ConfigError: If `test_fraction` is not between 0 and 1, or scikit-learn is not installed
            (the message names the `data` extra).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("test_fraction", test_fraction, "test_fraction must be between 0 and 1")
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise ConfigError(
            "dataset", "digits",
            "the digits come with scikit-learn, which is not installed; install the data extra: "
            "pip install 'keras-quant[data]' (scikit-learn==1.9.1)",
        ) from None

    data = _load()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _find(directory, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def fashion_mnist_dir(directory=None):
    """The folder Fashion-MNIST is read from.

    Args:
        directory: A folder the caller names, or None.

    Returns:
        `directory` when given, else `$KERAS_QUANT_FASHION_MNIST_DIR` when set, else Debian's
        `FASHION_MNIST_DIR`.
    """
    if directory is not None:
        return str(directory)
    return os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR


def fashion_mnist_available(directory=None):
    """Whether the idx files of Fashion-MNIST are present in `fashion_mnist_dir(directory)`."""
    directory = fashion_mnist_dir(directory)
    return all(_find(directory, stem) for stem in _FASHION_FILES.values())


def _read_idx(path, expected_ndim):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise IntegrityError(path, "not an idx file of unsigned bytes")
    ndim = data[3]
    if ndim != expected_ndim:
        raise IntegrityError(path, f"expected {expected_ndim} dimensions, found {ndim}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(data) - offset != size:
        raise IntegrityError(path, f"expected {size} bytes of data, found {len(data) - offset} (truncated?)")
    return np.frombuffer(data, np.uint8, count=size, offset=offset).reshape(dims)


def load_fashion_mnist(directory=None, limit_train=None, limit_test=None):
    """Fashion-MNIST (60k train / 10k test, 28x28, 10 classes) from local idx files.

    Args:
        directory: Folder holding the four idx files (gzipped or not); None reads
            `fashion_mnist_dir()` ($KERAS_QUANT_FASHION_MNIST_DIR, else Debian's folder).
        limit_train: Keep only the first N training samples.
        limit_test: Keep only the first N test samples.

    Returns:
        `(x_train, y_train), (x_test, y_test)`.

    Raises:
        FileNotFoundError: If the files are missing (install Debian's
            `dataset-fashion-mnist`).
        IntegrityError: If a file is not a valid idx file.
    """
    directory = fashion_mnist_dir(directory)
    paths = {key: _find(directory, stem) for key, stem in _FASHION_FILES.items()}
    missing = [stem for key, stem in _FASHION_FILES.items() if paths[key] is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {directory}; "
            "install them with `apt-get install -y dataset-fashion-mnist`."
        )
    x_train = _read_idx(paths["train_images"], 3)[:limit_train]
    y_train = _read_idx(paths["train_labels"], 1)[:limit_train]
    x_test = _read_idx(paths["test_images"], 3)[:limit_test]
    y_test = _read_idx(paths["test_labels"], 1)[:limit_test]

    def images(a):
        return (a.astype("float32") / 255.0)[..., None]

    return (images(x_train), y_train.astype("int32")), (images(x_test), y_test.astype("int32"))


def load_fashion_or_digits(limit_train=None, limit_test=None, directory=None):
    """Fashion-MNIST when it is installed, else the digits (the benchmarks' data).

    Args:
        limit_train: Keep only the first N training samples.
        limit_test: Keep only the first N test samples.
        directory: Folder of Fashion-MNIST's idx files (None: `fashion_mnist_dir()`).

    Returns:
        `(x_train, y_train, x_test, y_test, name)`, `name` being `"fashion_mnist"` or `"digits"`.
    """
    if fashion_mnist_available(directory):
        (x, y), (xt, yt) = load_fashion_mnist(directory, limit_train=limit_train, limit_test=limit_test)
        return x, y, xt, yt, "fashion_mnist"
    (x, y), (xt, yt) = load_digits()
    return x[:limit_train], y[:limit_train], xt[:limit_test], yt[:limit_test], "digits"
