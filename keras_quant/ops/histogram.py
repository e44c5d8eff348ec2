"""Histogram kernels: binning in the compiled step (`keras.ops`), and reading a histogram (numpy).

The one definition of the histogram arithmetic that the histogram observers
(`keras_quant.observers.HistogramObserver`), the calibration's
`keras_quant.calibration.stats.LayerCollector` and its statistics
(`keras_quant.calibration.result.LayerStatistics`) share:

- in the step, pure `keras.ops` kernels with static sizes (they run under
  `tf.function`, XLA and JAX): `bin_counts` bins a batch over `[lo, hi]`,
  `rebin_counts` moves existing counts to a wider range, `weighted_counts` is
  the bincount they both use;
- after calibration, numpy functions of `(hist, bin_edges)` with the mass
  taken as uniform within each bin: `cdf`, `cdf_quantile` / `quantile`,
  `mass_outside`, `mad` and `histogram_outliers`.

The range searches on a histogram (`mse`, `kl`, `percentile`, ...) are in
`keras_quant.ops.range_search`.

Example:

>>> import numpy as np
>>> hist, edges = np.histogram(np.arange(100.0), bins=10)
>>> quantile(hist.astype(float), edges, 0.5)
49.5
"""

import keras
import numpy as np
from keras import ops

__all__ = [
    "MIN_BINS",
    "weighted_counts",
    "rebin_counts",
    "bin_counts",
    "cdf",
    "cdf_quantile",
    "quantile",
    "mass_outside",
    "mad",
    "histogram_outliers",
]

# The fewest bins a histogram may have (an observer's or a collector's `num_bins`).
MIN_BINS = 8


# --------------------------------------------------------------------------
# In the step: keras.ops kernels.


def weighted_counts(ids, weights, length):
    """Sum of `weights` per id, for ids in `[0, length)` (1-D tensors).

    TensorFlow's bincount has a dedicated kernel (about 12x faster than
    `unsorted_segment_sum` on 1M elements on CPU, and XLA-compatible); Keras'
    JAX bincount cannot take a static length under `jit`, so other backends
    use `segment_sum`, which XLA lowers to a scatter-add.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # The raw op with a constant `size`: `ops.bincount` derives the size
        # from `max(ids) + 1`, which XLA cannot compile in a larger graph.
        # Empty weights count each id once.
        if weights is None:
            weights = tf.zeros((0,), "float32")
        return tf.raw_ops.DenseBincount(input=ids, size=length, weights=weights, binary_output=False)
    if weights is None:
        weights = ops.ones(ops.shape(ids), "float32")
    return ops.segment_sum(weights, ids, num_segments=length)


def rebin_counts(hist, old_lo, old_hi, new_lo, new_hi, bins, slots):
    """Move `(K, B)` counts from bins over `[old_lo, old_hi]` to bins over the wider `[new_lo, new_hi]`.

    A pure `keras.ops` kernel (`bins` and `slots` static): each old bin's count
    is split between the (at most two) new bins it overlaps, in proportion.
    Ranges are `(K,)`; an empty old range (`old_lo > old_hi`) or an unchanged
    one leaves the counts as they are.
    """
    changed = ops.logical_and(old_lo <= old_hi, ops.logical_or(new_lo < old_lo, new_hi > old_hi))
    new_width = ops.where(changed, new_hi - new_lo, 1.0)
    old_width = ops.where(changed, old_hi - old_lo, 0.0)
    offset = ops.where(changed, (old_lo - new_lo) / new_width * bins, 0.0)  # in new-bin units
    ratio = old_width / new_width  # old bin width / new bin width, in [0, 1]
    start = offset[:, None] + ops.arange(bins, dtype="float32")[None, :] * ratio[:, None]
    start = ops.where(start > 0.0, ops.minimum(start, bins - 1.0), 0.0)  # NaN-safe (a span past float32)
    first = ops.floor(start)
    safe_ratio = ops.where(ratio > 0, ratio, 1.0)[:, None]
    frac = (first + 1.0 - start) / safe_ratio
    frac = ops.where(ratio[:, None] > 0, ops.where(frac > 0.0, ops.minimum(frac, 1.0), 0.0), 1.0)
    first = ops.cast(first, "int32")
    second = ops.minimum(first + 1, bins - 1)
    base = (ops.arange(slots, dtype="int32") * bins)[:, None]
    data = ops.concatenate([hist * frac, hist * (1.0 - frac)], axis=1)
    segments = ops.concatenate([first + base, second + base], axis=1)
    moved = weighted_counts(ops.reshape(segments, (-1,)), ops.reshape(data, (-1,)), slots * bins)
    return ops.where(changed[:, None], ops.reshape(moved, (slots, bins)), hist)


def bin_counts(rows, finite, lo, hi, bins, slots, weights=None):
    """`(K, B)` counts of the finite values of `rows` `(N, K)` in bins over `[lo, hi]`.

    A pure `keras.ops` kernel (`bins` and `slots` static); `lo`, `hi` are
    `(K,)`. `finite=None` means every value is finite and inside `[lo, hi]`
    (the common case), which skips the masking passes over the batch.
    `weights` (optional, float, `rows`' shape or `(N * K,)`): each value adds
    its weight instead of 1 (a value standing for several, as in a
    subsample; a value of weight 0 may lie anywhere when `finite=None`: it is
    clipped into the first or last bin).
    """
    valid = lo <= hi
    lo = ops.where(valid, lo, 0.0)
    width = ops.where(valid, hi - lo, 0.0)
    inv_width = ops.where(width > 0, bins / ops.where(width > 0, width, 1.0), 0.0)  # 0: everything in bin 0
    if weights is not None:
        weights = ops.reshape(weights, (-1,))
    if finite is None:
        # NaN-safe clamp (not clip): a span past float32 (width inf, inv_width 0) makes `inf * 0` NaN
        pos = (rows - lo) * inv_width
        pos = ops.where(pos > 0.0, ops.minimum(pos, bins - 1.0), 0.0)
    else:
        x = ops.where(finite, rows, lo)
        pos = (x - lo) * inv_width
        pos = ops.where(pos >= 0, ops.minimum(pos, bins - 1.0), 0.0)  # also maps NaN to 0
        mask = ops.reshape(ops.cast(finite, "float32"), (-1,))
        weights = mask if weights is None else mask * weights
    index = ops.cast(pos, "int32")  # truncation is floor for pos >= 0
    if slots > 1:
        index = index + (ops.arange(slots, dtype="int32") * bins)[None, :]
    counts = weighted_counts(ops.reshape(index, (-1,)), weights, slots * bins)
    return ops.reshape(counts, (slots, bins))


# --------------------------------------------------------------------------
# After calibration: numpy functions of (hist, bin_edges).


def cdf_quantile(hist, edges, q):
    """Values below which a fraction `q` (array) of the mass lies; mass uniform within each bin.

    Args:
        hist: float64 counts, shape `(n,)`.
        edges: float64 bin edges, shape `(n + 1,)`.
        q: Fractions in `[0, 1]` (a number or an array).

    Returns:
        A float64 array of `q`'s shape.

    Example:

    >>> cdf_quantile(np.array([1.0, 1.0]), np.array([0.0, 1.0, 2.0]), [0.25, 0.5])
    array([0.5, 1. ])
    """
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    target = np.asarray(q, np.float64) * cum[-1]
    k = np.clip(np.searchsorted(cum, target, side="left"), 1, hist.size)
    below = cum[k - 1]
    mass = hist[k - 1]
    frac = np.where(mass > 0, (target - below) / np.where(mass > 0, mass, 1.0), 0.0)
    return edges[k - 1] + np.clip(frac, 0.0, 1.0) * (edges[k] - edges[k - 1])


def cdf(hist, edges, x):
    """Mass below `x` (array), mass uniform within each bin."""
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    if edges[-1] <= edges[0]:
        return np.where(np.asarray(x) >= edges[0], cum[-1], 0.0)
    return np.interp(x, edges, cum, left=0.0, right=cum[-1])


def quantile(hist, edges, q):
    """The value below which a fraction `q` (a float) of the mass lies, as a float (`cdf_quantile`)."""
    return float(cdf_quantile(np.asarray(hist, np.float64), np.asarray(edges, np.float64), q))


def mass_outside(hist, edges, lo, hi):
    """Estimated number of elements below `lo` or above `hi`."""
    total = float(np.sum(hist))
    return max(0.0, float(cdf(hist, edges, lo)) + total - float(cdf(hist, edges, hi)))


def mad(hist, edges, median):
    """Median absolute deviation from `median`, from the piecewise linear CDF."""
    total = float(np.sum(hist))
    t = np.unique(np.abs(np.asarray(edges, np.float64) - median))
    g = cdf(hist, edges, median + t) - cdf(hist, edges, median - t)  # non-decreasing in t
    return float(np.interp(0.5 * total, g, t))


def histogram_outliers(hist, bin_edges, mean, std):
    """Outlier counts estimated from a histogram (accurate to about one bin's mass).

    Args:
        hist: Counts, shape `(n,)`.
        bin_edges: Edges, shape `(n + 1,)`.
        mean: The exact mean of the data.
        std: The exact (population) standard deviation.

    Returns:
        `{"zscore": n, "iqr": n, "mad": n}`: elements with `|x - mean| > 3 std`;
        outside `[Q1 - 1.5 IQR, Q3 + 1.5 IQR]`; with modified z-score
        `0.6745 |x - median| / MAD > 3.5`.

    Example:

    >>> h, e = np.histogram(np.r_[np.zeros(100), 50.0], bins=64)
    >>> histogram_outliers(h, e, 0.495, 4.95)["zscore"]
    1
    """
    hist = np.asarray(hist, np.float64).reshape(-1)
    edges = np.asarray(bin_edges, np.float64).reshape(-1)
    if hist.sum() <= 0 or edges[-1] <= edges[0]:
        return {"zscore": 0, "iqr": 0, "mad": 0}
    z = mass_outside(hist, edges, mean - 3.0 * std, mean + 3.0 * std) if std > 0 else 0.0
    q1, q3 = quantile(hist, edges, 0.25), quantile(hist, edges, 0.75)
    iqr = mass_outside(hist, edges, q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1))
    median = quantile(hist, edges, 0.5)
    spread = mad(hist, edges, median)
    limit = 3.5 * spread / 0.6745
    m = mass_outside(hist, edges, median - limit, median + limit)
    return {"zscore": int(round(z)), "iqr": int(round(iqr)), "mad": int(round(m))}
