"""keras_quant.ops.histogram: the binning kernels and the numpy readers of a histogram."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from keras_quant.ops import histogram as kq_hist


def _np(v):
    return np.asarray(ops.convert_to_numpy(v))


def test_bin_counts_matches_numpy_histogram():
    x = np.random.default_rng(0).normal(size=(1000, 1)).astype("float32")
    lo, hi = np.array([x.min()], "float32"), np.array([x.max()], "float32")
    counts = _np(kq_hist.bin_counts(ops.convert_to_tensor(x), None, lo, hi, 16, 1))[0]
    expected, _ = np.histogram(x, bins=16, range=(float(lo[0]), float(hi[0])))
    assert counts.sum() == 1000
    np.testing.assert_allclose(counts, expected, atol=2)  # a value on a bin edge may round either way


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), widen=st.floats(0.0, 3.0))
def test_rebin_counts_keeps_the_mass(seed, widen):
    hist = np.random.default_rng(seed).uniform(0, 10, size=(2, 32)).astype("float32")
    lo, hi = np.array([-1.0, 0.0], "float32"), np.array([1.0, 2.0], "float32")
    moved = _np(kq_hist.rebin_counts(hist, lo, hi, lo - widen, hi + widen, 32, 2))
    np.testing.assert_allclose(moved.sum(axis=1), hist.sum(axis=1), rtol=1e-5)


def test_a_span_past_float32_keeps_every_count_in_range():
    """[-3e38, 3e38] has width inf: `inf * 0` is NaN, which must not become a bin index (TF raised in bincount)."""
    x = np.array([[-3e38], [0.0], [3e38], [1e38]], "float32")
    lo, hi = np.array([-3e38], "float32"), np.array([3e38], "float32")
    counts = _np(kq_hist.bin_counts(ops.convert_to_tensor(x), None, lo, hi, 8, 1))[0]
    assert counts.sum() == 4 and np.isfinite(counts).all()
    hist = np.ones((1, 8), "float32")
    moved = _np(kq_hist.rebin_counts(hist, np.array([-1.0], "float32"), np.array([1.0], "float32"), lo, hi, 8, 1))
    assert np.isfinite(moved).all() and moved.sum() == 8


@pytest.mark.parametrize("q, expected", [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 1.5), (1.0, 2.0)])
def test_cdf_quantile_spelled_out(q, expected):
    assert kq_hist.quantile(np.array([1.0, 1.0]), np.array([0.0, 1.0, 2.0]), q) == expected


def test_cdf_and_mass_outside():
    hist, edges = np.array([2.0, 2.0]), np.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose(kq_hist.cdf(hist, edges, np.array([0.5, 1.0, 3.0])), [1.0, 2.0, 4.0])
    assert kq_hist.mass_outside(hist, edges, 0.5, 1.5) == 2.0


def test_histogram_outliers():
    h, e = np.histogram(np.r_[np.zeros(100), 50.0], bins=64)
    assert kq_hist.histogram_outliers(h, e, 0.495, 4.95)["zscore"] == 1
    assert kq_hist.histogram_outliers(np.zeros(4), np.arange(5.0), 0.0, 1.0) == {"zscore": 0, "iqr": 0, "mad": 0}
