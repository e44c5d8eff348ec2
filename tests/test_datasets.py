import gzip
import sys

import numpy as np
import pytest

from keras_quant.cli import datasets
from keras_quant.errors import ConfigError, IntegrityError


def test_digits_split_is_reproducible():
    (x, y), (xt, yt) = datasets.load_digits(seed=1)
    (x2, _), _ = datasets.load_digits(seed=1)
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.float32
    assert len(x) + len(xt) == 1797
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    np.testing.assert_array_equal(x, x2)
    with pytest.raises(ConfigError, match="test_fraction"):
        datasets.load_digits(test_fraction=1.5)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_written_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=5)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    assert datasets.fashion_mnist_available(str(tmp_path))
    (x, y), (xt, yt) = datasets.load_fashion_mnist(str(tmp_path), limit_train=3)
    assert x.shape == (3, 28, 28, 1) and xt.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(x[..., 0], images[:3] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(yt, labels)


def test_fashion_mnist_reader_rejects_truncated_file(tmp_path):
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(2))
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(IntegrityError, match="truncated"):
        datasets.load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        datasets.load_fashion_mnist(str(tmp_path))


def test_debian_fashion_mnist_package():
    """CI installs Debian's dataset-fashion-mnist; the real files parse."""
    (x, y), (xt, yt) = datasets.load_fashion_mnist(limit_train=100, limit_test=100)
    assert x.shape == (100, 28, 28, 1) and xt.shape == (100, 28, 28, 1)
    assert set(np.unique(y)) <= set(range(10))


def test_load_fashion_or_digits_names_what_it_loaded():
    x, y, xt, yt, name = datasets.load_fashion_or_digits(limit_train=20, limit_test=10)
    assert name in ("fashion_mnist", "digits") and len(x) == len(y) == 20 and len(xt) == len(yt) == 10
    assert x.shape[1:] == ((28, 28, 1) if name == "fashion_mnist" else (8, 8, 1))


def test_fashion_mnist_folder_is_the_argument_else_the_environment_else_debian(tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.FASHION_MNIST_DIR_ENV, raising=False)
    assert datasets.fashion_mnist_dir() == datasets.FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"
    monkeypatch.setenv("KERAS_QUANT_FASHION_MNIST_DIR", str(tmp_path))
    assert datasets.fashion_mnist_dir() == str(tmp_path)
    assert datasets.fashion_mnist_dir(tmp_path / "other") == str(tmp_path / "other")
    assert not datasets.fashion_mnist_available()  # the empty folder the variable names
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        datasets.load_fashion_mnist()
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(2))
    assert datasets.fashion_mnist_available()
    x, y, xt, yt, name = datasets.load_fashion_or_digits()
    assert name == "fashion_mnist" and x.shape == (2, 28, 28, 1)


def test_digits_without_scikit_learn_name_the_data_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as when not installed
    with pytest.raises(ConfigError, match=r"keras-quant\[data\]") as info:
        datasets.load_digits()
    assert info.value.field == "dataset"
