"""Range search on numpy histograms: each method tested directly, with reference values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError
from keras_quant.ops import range_search as rs
from tests.conftest import to_np

N = 100_000


def sample_mse(x, lo, hi, spec):
    """MSE of the actual samples on the grid of `kq.ops.compute_qparams(lo, hi, spec)`."""
    scale, zp = kq.ops.compute_qparams(lo, hi, spec)
    x_hat = to_np(kq.ops.fake_quant(x.astype("float32"), scale, zp, spec))
    return float(np.mean((x - x_hat) ** 2))


def data(kind, rng):
    if kind == "gaussian":
        return rng.normal(size=N)
    if kind == "laplace":
        return rng.laplace(size=N)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, size=N)
    if kind == "laplace_outliers":
        return np.concatenate([rng.laplace(size=N), [40.0, -35.0, 60.0]])
    if kind == "student_t":
        return rng.standard_t(3, size=N)
    if kind == "relu_t":
        return np.maximum(rng.standard_t(3, size=N), 0.0)
    raise ValueError(kind)


# --------------------------------------------------------------------------
# The grid: numpy mirror of kq.ops.compute_qparams / fake_quant.

SPECS = [
    kq.QuantSpec(bits=8),
    kq.QuantSpec(bits=8, symmetric=True, narrow_range=True),
    kq.QuantSpec(bits=4),
    kq.QuantSpec(bits=4, symmetric=True),
    kq.QuantSpec(bits=2),
    kq.QuantSpec(bits=16, symmetric=True),
]


@settings(max_examples=30, deadline=None)
@given(
    lo=st.floats(-1e3, 1e3, width=32),
    width=st.floats(0.0, 1e3, width=32),
    spec=st.sampled_from(SPECS),
)
def test_qparams_match_core(lo, width, spec):
    hi = np.float32(lo) + np.float32(width)
    scale, zp = rs.qparams(lo, hi, spec)
    ref_scale, ref_zp = kq.ops.compute_qparams(lo, hi, spec)
    np.testing.assert_array_equal(scale, to_np(ref_scale))
    np.testing.assert_array_equal(zp, to_np(ref_zp))


@pytest.mark.parametrize("spec", SPECS)
def test_fake_quant_matches_core(spec, rng):
    x = rng.normal(size=1000) * 3
    scale, zp = rs.qparams(-2.0, 5.0, spec)
    ref = to_np(kq.ops.fake_quant(x.astype("float32"), scale, zp, spec))
    diff = np.abs(rs.fake_quant(x.astype("float32"), scale, zp, spec) - ref)
    # float64 vs float32 division may round a value on a tie to the neighbouring level
    assert np.all(diff <= scale * 1.001) and np.mean(diff > 1e-5) < 0.01
    # zero is exactly representable
    assert rs.fake_quant(0.0, scale, zp, spec) == 0.0


def test_expected_mse_spelled_out():
    # Two bins with centers 0.25 and 0.75 on the 2-bit asymmetric grid over [0, 1.5]: step 0.5.
    spec = kq.QuantSpec(bits=2)
    mse = rs.expected_mse([1, 1], [0.0, 0.5, 1.0], 0.0, 1.5, spec)
    # 0.25 -> 0.5 (half up), 0.75 -> 1.0: both off by 0.25
    assert mse == pytest.approx(0.0625)
    many = rs.expected_mse([1, 1], [0.0, 0.5, 1.0], np.zeros(3), np.array([1.5, 0.75, 0.3]), spec)
    assert many.shape == (3,) and many[0] == pytest.approx(0.0625)


# --------------------------------------------------------------------------
# minmax and percentile


def test_minmax_range_is_non_empty_extent():
    assert rs.minmax_range([0, 2, 1, 0], [0.0, 1.0, 2.0, 3.0, 4.0]) == (1.0, 3.0)
    assert rs.minmax_range([5], [-1.0, 2.0]) == (-1.0, 2.0)


def test_percentile_range_spelled_out():
    edges = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rs.percentile_range([1, 1, 1, 1], edges, low=25, high=75) == (1.0, 3.0)
    assert rs.percentile_range([1, 1, 1, 1], edges, low=0, high=100) == (0.0, 4.0)
    assert rs.percentile_range([1, 1, 1, 1], edges, percentile=87.5) == pytest.approx((0.5, 3.5))
    assert rs.percentile_range([0, 4, 0, 0], edges, low=50, high=50) == (1.5, 1.5)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "uniform", "laplace_outliers"])
@pytest.mark.parametrize("q", [0.5, 5.0, 50.0, 95.0, 99.5])
def test_percentile_matches_np_percentile(kind, q, rng):
    x = data(kind, rng)
    hist, edges = np.histogram(x, bins=2048)
    lo, hi = rs.percentile_range(hist, edges, low=q, high=q)
    assert lo == hi
    assert abs(lo - np.percentile(x, q)) <= edges[1] - edges[0]


def test_percentile_invalid():
    with pytest.raises(ConfigError):
        rs.percentile_range([1, 1], [0, 1, 2], low=-1)
    with pytest.raises(ConfigError):
        rs.percentile_range([1, 1], [0, 1, 2], low=60, high=40)


# --------------------------------------------------------------------------
# MSE and KL


@pytest.mark.parametrize("kind", ["laplace", "laplace_outliers", "student_t", "relu_t"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_and_kl_beat_minmax_at_4_bits_on_heavy_tails(kind, symmetric, rng):
    x = data(kind, rng)
    hist, edges = np.histogram(x, bins=2048)
    spec = kq.QuantSpec(bits=4, symmetric=symmetric)
    minmax = sample_mse(x, *rs.minmax_range(hist, edges, spec), spec)
    mse = sample_mse(x, *rs.mse_range(hist, edges, spec), spec)
    kl = sample_mse(x, *rs.kl_range(hist, edges, spec), spec)
    assert mse < 0.5 * minmax
    assert kl < 0.7 * minmax


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "uniform", "student_t", "relu_t"])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_is_no_worse_than_minmax(kind, bits, rng):
    x = data(kind, rng)
    hist, edges = np.histogram(x, bins=2048)
    spec = kq.QuantSpec(bits=bits)
    lo, hi = rs.mse_range(hist, edges, spec)
    assert edges[0] <= lo <= hi <= edges[-1]
    full = rs.expected_mse(hist, edges, edges[0], edges[-1], spec)
    assert rs.expected_mse(hist, edges, lo, hi, spec) <= full


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_keeps_nearly_the_full_range_on_uniform_data(symmetric, bits, rng):
    x = data("uniform", rng)
    hist, edges = np.histogram(x, bins=2048)
    lo, hi = rs.mse_range(hist, edges, kq.QuantSpec(bits=bits, symmetric=symmetric))
    assert hi >= 0.9 * edges[-1] and lo <= 0.9 * edges[0]


@pytest.mark.parametrize(
    "kind, bits, expected, tol",
    [
        # Optimal clipping of a unit Gaussian / Laplace(b=1) (Banner et al., ACIQ): 2.55 / 5.03 at 4 bits.
        ("gaussian", 4, 2.55, 0.3),
        ("laplace", 4, 5.03, 0.6),
    ],
)
def test_mse_range_near_analytic_optimum(kind, bits, expected, tol, rng):
    x = data(kind, rng)
    hist, edges = np.histogram(x, bins=2048)
    lo, hi = rs.mse_range(hist, edges, kq.QuantSpec(bits=bits, symmetric=True))
    assert max(-lo, hi) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "student_t"])
def test_kl_range_on_zero_centered_data(kind, rng):
    x = data(kind, rng)
    hist, edges = np.histogram(x, bins=2048)
    lo, hi = rs.kl_range(hist, edges, kq.QuantSpec(bits=8))
    assert lo == pytest.approx(-hi) or lo == edges[0] or hi == edges[-1]  # [-t, t] within the data
    t = max(-lo, hi)
    assert 2.5 * x.std() < t <= max(-edges[0], edges[-1])


def test_kl_range_on_relu_data(rng):
    x = np.maximum(rng.normal(size=N), 0.0)  # half the mass exactly at 0
    hist, edges = np.histogram(x, bins=2048)
    lo, hi = rs.kl_range(hist, edges, kq.QuantSpec(bits=8))
    assert lo == 0.0
    assert 3.0 < hi <= edges[-1]
    lo4, hi4 = rs.kl_range(hist, edges, kq.QuantSpec(bits=4))
    assert lo4 == 0.0 and 1.5 < hi4 < hi


def test_kl_with_more_levels_than_bins_keeps_full_range(rng):
    x = data("gaussian", rng)
    hist, edges = np.histogram(x, bins=256)
    assert rs.kl_range(hist, edges, kq.QuantSpec(bits=16)) == rs.minmax_range(hist, edges)


def test_magnitude_histogram(rng):
    x = rng.normal(size=N) + 0.3
    hist, edges = np.histogram(x, bins=1024)
    m_hist, m_edges = rs.magnitude_histogram(hist, edges, num_bins=256)
    assert m_hist.sum() == pytest.approx(N)
    assert m_edges[0] == 0.0 and m_edges[-1] == pytest.approx(np.abs(x).max())
    ref, _ = np.histogram(np.abs(x), bins=m_edges)
    assert np.abs(m_hist - ref).sum() / N < 0.02


@pytest.mark.parametrize("fn", [rs.minmax_range, rs.percentile_range, rs.mse_range, rs.kl_range])
def test_zero_width_histogram(fn):
    spec = kq.QuantSpec(bits=8)
    assert fn([10.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], spec) == (2.0, 2.0)


@pytest.mark.parametrize("fn", [rs.minmax_range, rs.percentile_range, rs.mse_range, rs.kl_range])
def test_bad_histograms(fn):
    spec = kq.QuantSpec(bits=8)
    with pytest.raises(NoDataError):
        fn([0, 0], [0.0, 1.0, 2.0], spec)
    with pytest.raises(ShapeMismatchError):
        fn([1, 1], [0.0, 1.0], spec)
    with pytest.raises(ConfigError):
        fn([1, -1], [0.0, 1.0, 2.0], spec)
    with pytest.raises(ConfigError):
        fn([1, 1], [0.0, np.nan, 2.0], spec)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(3, 7))
def test_more_bits_never_increase_searched_mse(seed, bits):
    x = np.random.default_rng(seed).standard_t(4, size=2000)
    hist, edges = np.histogram(x, bins=256)
    low, high = kq.QuantSpec(bits=bits, symmetric=True), kq.QuantSpec(bits=bits + 1, symmetric=True)
    err_low = rs.expected_mse(hist, edges, *rs.mse_range(hist, edges, low), low)
    err_high = rs.expected_mse(hist, edges, *rs.mse_range(hist, edges, high), high)
    assert 0.0 <= err_high <= err_low * (1 + 1e-9)


# --------------------------------------------------------------------------
# auto_range: each method's range judged by the error of the quantized tensor.

CLIPPING = ("percentile", "mse", "kl")


def heavy(kind, rng):
    """Heavy-tailed samples, each with a max |x| far beyond where the MSE-best range ends."""
    if kind == "student_t2":
        return rng.standard_t(2, size=N)
    if kind == "relu_laplace_outliers":
        return np.maximum(data("laplace_outliers", rng), 0.0)
    if kind == "laplace_rare_outliers":
        # At 8 bits keeping a fraction f of outliers at M costs about (2M / 255)**2 / 12 of rounding MSE,
        # clipping them about f * M**2: clipping wins only for f < 1 / (3 * 255**2) = 5e-6 (see auto_range).
        # 2 in 1M is below that; the 3-in-100k of "laplace_outliers" is not, so at 8 bits MSE rightly keeps them.
        return np.concatenate([rng.laplace(size=1_000_000), [300.0, -250.0]])
    return data(kind, rng)


def reference_choice(errors, tolerance):
    """The earliest method whose error is within `tolerance` of the least (errors in preference order)."""
    best = min(errors.values())
    return next(m for m, e in errors.items() if e <= best * (1 + tolerance))


@pytest.mark.parametrize(
    "kind, bits, shrink, gain",
    [
        # Student-t with 2 degrees of freedom has infinite variance: its tail weighs in the MSE, so the
        # range shrinks less (2.5x) than for a light bulk with far outliers (9x-64x).
        ("student_t2", 4, 2.0, 1.3),
        ("laplace_outliers", 4, 5.0, 5.0),
        ("relu_laplace_outliers", 4, 5.0, 5.0),
        ("laplace_rare_outliers", 4, 20.0, 5.0),
        ("laplace_rare_outliers", 8, 3.0, 2.0),
    ],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_auto_clips_heavy_tails(kind, bits, shrink, gain, symmetric, rng):
    x = heavy(kind, rng)
    hist, edges = np.histogram(x, bins=2048)
    spec = kq.QuantSpec(bits=bits, symmetric=symmetric)
    choice = rs.auto_range(hist, edges, spec)
    assert choice.method in CLIPPING
    assert max(-choice.min, choice.max) < np.abs(x).max() / shrink
    # Clipping gains well beyond the tolerance: min-max's error is `gain` times the chosen one's or more.
    assert choice.errors["minmax"] > gain * choice.errors[choice.method]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("low", [-1.0, 0.0])  # zero-centered, and one-sided (a bounded ReLU-like tensor)
def test_auto_keeps_minmax_on_uniform_data(bits, symmetric, low, rng):
    x = rng.uniform(low, 1.0, size=N)
    hist, edges = np.histogram(x, bins=2048)
    choice = rs.auto_range(hist, edges, kq.QuantSpec(bits=bits, symmetric=symmetric))
    assert choice.method == "minmax"
    assert choice.range == rs.minmax_range(hist, edges)
    # Other methods gain at most the grid's edge effect (under 13% at 4 bits), which the tolerance absorbs.
    assert min(choice.errors.values()) >= choice.errors["minmax"] / (1 + rs.AUTO_TOLERANCE)


@pytest.mark.parametrize(
    "kind", ["uniform", "gaussian", "laplace", "laplace_outliers", "student_t2", "relu_t", "relu_laplace_outliers"]
)
@pytest.mark.parametrize("bits", [4, 8])
def test_auto_errors_match_the_samples_and_the_choice_is_the_empirical_one(kind, bits, rng):
    """The histogram's estimate against `kq.ops.fake_quant` on the samples themselves.

    Each bin's mass sits at its center, so the estimate is off by at most what moving every sample to its
    bin's center changes. That is small (under 1% here) except for the spike of exact zeros of ReLU
    outputs: 0.0 is on the grid (no error), but its bin's center is not, which adds about
    `sparsity * (bin_width / 2)**2` to every range's error alike (up to 7% of an 8-bit error): hence 10%.
    """
    x = heavy(kind, rng)[:N]
    hist, edges = np.histogram(x, bins=2048)
    spec = kq.QuantSpec(bits=bits)
    choice = rs.auto_range(hist, edges, spec)
    empirical = {c.method: sample_mse(x, c.min, c.max, spec) for c in choice.candidates}
    for c in choice.candidates:
        assert c.mse == pytest.approx(empirical[c.method], rel=0.1), c.method
    best = reference_choice(empirical, choice.tolerance)
    # The same method, or (where two are near the tie margin) one within the tolerance of the empirical best.
    assert choice.method == best or empirical[choice.method] <= (1 + choice.tolerance) * 1.1 * min(empirical.values())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["gaussian", "laplace", "uniform", "student_t", "relu_t", "laplace_outliers"]),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    tolerance=st.sampled_from([0.0, 0.05, 0.2, 1.0]),
    candidates=st.permutations(rs.AUTO_CANDIDATES).flatmap(lambda p: st.integers(1, 4).map(lambda k: tuple(p[:k]))),
)
def test_auto_error_is_within_tolerance_of_every_candidate(seed, kind, bits, symmetric, tolerance, candidates):
    x = data(kind, np.random.default_rng(seed))[:5000]
    hist, edges = np.histogram(x, bins=256)
    spec = kq.QuantSpec(bits=bits, symmetric=symmetric)
    choice = rs.auto_range(hist, edges, spec, candidates=candidates, tolerance=tolerance)
    assert tuple(c.method for c in choice.candidates) == candidates
    chosen = choice.errors[choice.method]
    for c in choice.candidates:
        assert chosen <= c.mse * (1 + tolerance)
        # Each candidate's error is expected_mse of its own method's range.
        assert c.mse == pytest.approx(rs.expected_mse(hist, edges, c.min, c.max, spec), rel=1e-12)
    assert choice.range in choice.ranges.values()
    assert choice.range == choice.ranges[choice.method] and tuple(choice) == choice.range
    assert choice.method == reference_choice(choice.errors, tolerance)


def test_auto_candidate_ranges_are_the_methods_own():
    x = data("laplace_outliers", np.random.default_rng(1))
    hist, edges = np.histogram(x, bins=2048)
    spec = kq.QuantSpec(bits=4, symmetric=True)
    choice = rs.auto_range(hist, edges, spec, percentile=99.9)
    assert choice.ranges == {
        "minmax": rs.minmax_range(hist, edges),
        "percentile": rs.percentile_range(hist, edges, percentile=99.9),
        "mse": rs.mse_range(hist, edges, spec),
        "kl": rs.kl_range(hist, edges, spec),
    }
    assert choice.tolerance == rs.AUTO_TOLERANCE == 0.2


def test_auto_ties_go_to_the_earliest_candidate(rng):
    x = rng.uniform(-1.0, 1.0, size=N)
    hist, edges = np.histogram(x, bins=2048)
    spec = kq.QuantSpec(bits=8)
    assert rs.auto_range(hist, edges, spec, candidates="mse,minmax").method == "mse"
    assert rs.auto_range(hist, edges, spec, candidates=("kl", "minmax")).method == "kl"
    # Strictly the least error with tolerance=0 (mse shrinks the range a little on uniform data).
    strict = rs.auto_range(hist, edges, spec, tolerance=0.0)
    assert strict.errors[strict.method] == min(strict.errors.values())


def test_auto_on_a_constant_histogram():
    choice = rs.auto_range([5.0], [2.0, 2.0], kq.QuantSpec(bits=8))
    assert (choice.method, choice.range) == ("minmax", (2.0, 2.0))


def test_signal_power():
    assert rs.signal_power([1, 0, 3], [-3.0, -1.0, 1.0, 3.0]) == pytest.approx((1 * 4.0 + 3 * 4.0) / 4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"candidates": ("minmax", "entropy")}, "candidates"),
        ({"candidates": "minmax,,mse"}, "candidates"),
        ({"candidates": ()}, "candidates"),
        ({"candidates": ("mse", "mse")}, "candidates"),
        ({"candidates": 3}, "candidates"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"tolerance": True}, "tolerance"),
        ({"tolerance": "0.1"}, "tolerance"),
        ({"percentile": 120.0}, "percentile"),
    ],
)
def test_auto_invalid(kwargs, field):
    with pytest.raises(ConfigError) as e:
        rs.auto_range([1, 2, 1], [0.0, 1.0, 2.0, 3.0], kq.QuantSpec(bits=8), **kwargs)
    assert e.value.field == field


def test_auto_empty_histogram():
    with pytest.raises(NoDataError):
        rs.auto_range([0, 0], [0.0, 1.0, 2.0], kq.QuantSpec(bits=8))
