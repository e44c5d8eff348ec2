"""Small datasets that work offline, for examples, tests and benchmarks.

- `load_digits()`: scikit-learn's 8x8 digits (ships inside the scikit-learn wheel).
- `load_fashion_mnist()`: Fashion-MNIST from Debian's `dataset-fashion-mnist`
  package (`/usr/share/datasets/fashion-mnist/`, the idx files that
  `keras.datasets.fashion_mnist` reads), parsed here without any download.

Both return `(x_train, y_train), (x_test, y_test)` with float32 images in
`[0, 1]` of shape `(n, h, w, 1)` and int32 labels.

Example:

>>> from keras_quant import datasets
>>> (x, y), (x_test, y_test) = datasets.load_digits()
>>> x.shape[1:]
(8, 8, 1)
"""

import gzip
import os

import numpy as np

from keras_quant.errors import ConfigError, IntegrityError

__all__ = ["load_digits", "load_fashion_mnist", "FASHION_MNIST_DIR", "fashion_mnist_available", "load_fashion_or_digits"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
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
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("test_fraction", test_fraction, "test_fraction must be between 0 and 1")
    from sklearn.datasets import load_digits as _load

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


def fashion_mnist_available(directory=FASHION_MNIST_DIR):
    """Whether the idx files of Fashion-MNIST are present in `directory`."""
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


def load_fashion_mnist(directory=FASHION_MNIST_DIR, limit_train=None, limit_test=None):
    """Fashion-MNIST (60k train / 10k test, 28x28, 10 classes) from local idx files.

    Args:
        directory: Folder holding the four idx files (gzipped or not).
        limit_train: Keep only the first N training samples.
        limit_test: Keep only the first N test samples.

    Returns:
        `(x_train, y_train), (x_test, y_test)`.

    Raises:
        FileNotFoundError: If the files are missing (install Debian's
            `dataset-fashion-mnist`).
        IntegrityError: If a file is not a valid idx file.
    """
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


def load_fashion_or_digits(limit_train=None, limit_test=None):
    """Fashion-MNIST when Debian's package is installed, else the digits (the benchmarks' data).

    Returns:
        `(x_train, y_train, x_test, y_test, name)`, `name` being `"fashion_mnist"` or `"digits"`.
    """
    if fashion_mnist_available():
        (x, y), (xt, yt) = load_fashion_mnist(limit_train=limit_train, limit_test=limit_test)
        return x, y, xt, yt, "fashion_mnist"
    (x, y), (xt, yt) = load_digits()
    return x[:limit_train], y[:limit_train], xt[:limit_test], yt[:limit_test], "digits"
