"""The collector's sampled statistics: what a batch larger than `sample_size` reads, against numpy.

Counts, mean, min / max and per-channel min / max stay exact; M2..M4, the
zero count and the histogram are computed on `sample_positions` and scaled
by `n / m` (see `keras_quant.calibration.step`). The numpy reference below
computes exactly that, so the comparison is tight (float32 sums).
"""

import numpy as np
import pytest

import keras_quant as kq
from keras_quant.calibration.stats import LayerCollector, merge_moments, moments_to_stats
from keras_quant.calibration.step import SAMPLE, sample_positions


def ref_positions(n, m):
    """numpy copy of `sample_positions` (the same float32 arithmetic)."""
    m = min(n, m)
    i = np.arange(m, dtype=np.int32)
    run = np.float32(n) / np.float32(m)
    start = np.floor(i.astype(np.float32) * run).astype(np.int32)
    stop = np.floor((i + 1).astype(np.float32) * run).astype(np.int32)
    width = np.maximum(stop - start, 1)
    return np.minimum(start + (i * 7919) % width, n - 1)


def ref_batch(x, m):
    """`(n, mean, M2, M3, M4, zeros, sample, scale)` of one all-finite batch, as the step computes it."""
    v = np.asarray(x, np.float64).reshape(-1)
    n = v.size
    s = v[ref_positions(n, m)] if n > m else v
    scale = n / s.size
    d = s - v.mean()
    return (n, v.mean(), scale * (d**2).sum(), scale * (d**3).sum(), scale * (d**4).sum(),
            scale * (s == 0).sum(), s, scale)


@pytest.mark.parametrize("n, m", [(100, 10), (10_000, 1000), (2_508_800, SAMPLE), (1001, 1000), (50, 100)])
def test_positions_one_per_run_and_match_the_reference(n, m):
    pos = np.asarray(sample_positions(n, m))
    np.testing.assert_array_equal(pos, ref_positions(n, m))
    assert pos.shape == (min(n, m),) and pos.min() >= 0 and pos.max() < n
    assert np.all(np.diff(pos) > 0)  # one per run, in order, no repeats
    # Run i starts at floor(i n / m) (in float32: off by one at a few run boundaries of a large n).
    m = min(n, m)  # n <= m: every position
    start = np.floor(np.arange(m + 1) * (n / m)).astype(np.int64)
    assert np.all(pos >= start[:-1] - 1) and np.all(pos < start[1:] + 1)


def test_positions_cover_every_channel_and_row():
    # A stride would land on one channel of a power-of-two width; the hashed offset does not.
    n, m = 200 * 28 * 28 * 16, 8192
    pos = ref_positions(n, m)
    assert len(np.unique(pos % 16)) == 16 and len(np.unique((pos // 16) % 28)) == 28
    np.testing.assert_array_equal(np.asarray(sample_positions(n, m)), pos)


def relu_data(rng, shape):
    x = rng.gamma(2.0, 1.5, size=shape).astype("float32") - 1.0
    return np.maximum(x, 0.0)


def test_sampled_statistics_match_the_numpy_reference(rng):
    shape, m = (40, 12, 12, 6), 512  # 5760 values a batch: sampled
    batches = [relu_data(rng, shape), relu_data(rng, shape) * np.float32(2.0)]
    c = LayerCollector(kq.QuantSpec(bits=8), num_bins=64, sample_size=m)
    for b in batches:
        c(b)
    stats = c.to_statistics()
    whole = np.concatenate(batches)
    # Exact: count, mean, extremes, per-channel extremes.
    assert stats.count == whole.size and stats.num_samples == 80
    assert stats.min == whole.min() and stats.max == whole.max()
    np.testing.assert_allclose(stats.mean, whole.astype(np.float64).mean(), rtol=1e-5)
    np.testing.assert_array_equal(stats.channel_min, whole.min(axis=(0, 1, 2)))
    np.testing.assert_array_equal(stats.channel_max, whole.max(axis=(0, 1, 2)))
    # Sampled: the moments and zeros of the reference (float32 sums in the step: rtol 1e-4).
    refs = [ref_batch(b, m) for b in batches]
    merged = (0.0, 0.0, 0.0, 0.0, 0.0)
    for r in refs:
        merged = merge_moments(merged, r[:5])
    mean, std, skew, kurt = moments_to_stats(*merged)
    np.testing.assert_allclose([stats.std, stats.skewness, stats.kurtosis], [std, skew, kurt], rtol=1e-4)
    np.testing.assert_allclose(stats.sparsity * stats.count, sum(r[5] for r in refs), rtol=1e-5)
    # The histogram's mass is the count (scaled counts), up to float32 rounding.
    np.testing.assert_allclose(stats.histogram.sum(), whole.size, rtol=1e-5)


def test_one_sampled_batch_histogram_is_the_scaled_histogram_of_the_sample(rng):
    x = rng.normal(size=(64, 500)).astype("float32")  # 32000 values, 1000 read
    c = LayerCollector(kq.QuantSpec(bits=8), num_bins=32, sample_size=1000)
    c(x)
    stats = c.to_statistics()
    _, _, _, _, _, _, s, scale = ref_batch(x, 1000)
    want, _ = np.histogram(s, bins=32, range=(float(x.min()), float(x.max())))
    # Values on a bin edge may fall either side in float32: a bin or two differ by one value.
    assert np.abs(stats.histogram - scale * want).sum() <= 2 * 2 * scale + 1e-3 * x.size
    assert stats.histogram.sum() == pytest.approx(x.size, rel=1e-5)


def test_sampled_estimates_are_close_to_the_exact_statistics(rng):
    x = relu_data(rng, (100, 20, 20, 8))  # 320000 values a batch
    exact = LayerCollector(kq.QuantSpec(bits=8, observer="percentile"), num_bins=256, sample_size=None)
    sampled = LayerCollector(kq.QuantSpec(bits=8, observer="percentile"), num_bins=256, sample_size=16384)
    for c in (exact, sampled):
        c(x[:50])
        c(x[50:])
    a, b = exact.to_statistics(), sampled.to_statistics()
    assert (a.count, a.min, a.max, a.mean) == (b.count, b.min, b.max, pytest.approx(b.mean, rel=1e-6))
    np.testing.assert_array_equal(a.channel_max, b.channel_max)
    assert b.std == pytest.approx(a.std, rel=0.02)
    assert b.sparsity == pytest.approx(a.sparsity, abs=0.01)
    assert b.percentile(99.0) == pytest.approx(a.percentile(99.0), rel=0.03)


def test_masked_and_non_finite_batches_are_sampled_with_exact_counts(rng):
    x = relu_data(rng, (60, 10, 10, 4))
    x[3, 0, 0, 0], x[50, 1, 1, 1] = np.nan, np.inf
    keep = np.arange(60) % 4 != 0
    c = LayerCollector(kq.QuantSpec(bits=8), num_bins=64, sample_size=2000)
    c(x[:30], sample_mask=keep[:30])
    c(x[30:])  # non-finite: the masked path of an unmasked batch
    stats = c.to_statistics()
    kept = np.concatenate([x[:30][keep[:30]], x[30:]])
    finite = kept[np.isfinite(kept)]
    assert stats.non_finite_count == int(keep[3]) + 1  # a masked-out sample's NaN is not counted
    assert stats.count == finite.size and stats.num_samples == keep[:30].sum() + 30
    assert stats.min == finite.min() and stats.max == finite.max()
    np.testing.assert_allclose(stats.mean, finite.astype(np.float64).mean(), rtol=1e-5)
    np.testing.assert_allclose(stats.histogram.sum(), finite.size, rtol=1e-5)
    assert stats.std == pytest.approx(finite.std(), rel=0.1)  # an estimate from 2 x 2000 values


def test_sample_size_is_checked_and_kept_in_the_config():
    with pytest.raises(kq.errors.ConfigError, match="sample_size"):
        LayerCollector(sample_size=0)
    c = LayerCollector(sample_size=1234)
    assert LayerCollector.from_config(c.get_config()).sample_size == 1234
    assert LayerCollector().sample_size == SAMPLE
