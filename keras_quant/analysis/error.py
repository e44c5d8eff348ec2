"""Quantization error of tensors: statistics, theory, and what-if comparisons.

Every statistic is computed in float64 numpy after `keras.ops.convert_to_numpy`,
so the numbers users read are Python floats whatever the backend. The
quantization itself runs through `kq.ops` (float32, as a quantized model runs).

- `error_stats(original, dequantized)`: MSE, MAE, max error, SQNR, outlier rate.
- `theoretical_sqnr(bits)`, `theoretical_max_error(scale)`: the textbook bounds.
- `compare_bit_widths(x)`: the error of min-max quantization of `x` at several
  bit widths.
- `scale_sensitivity(x, spec, perturbation)`: the error when the min-max scale
  is multiplied by `1 + p`.
- `outlier_impact(x, percentile)`: min-max range against a percentile-clipped
  range.

Non-finite values (NaN, Inf) raise `kq.errors.NonFiniteError`, which names how
many there were; `error_stats(..., nan_policy="omit")` drops them instead.

Example:

>>> import numpy as np
>>> from keras_quant.analysis import compare_bit_widths
>>> x = np.random.default_rng(0).normal(size=1000).astype("float32")
>>> stats = compare_bit_widths(x, bits=(4, 8))
>>> stats[8].sqnr_db > stats[4].sqnr_db
True
"""

import dataclasses
import math
import numbers
from typing import Iterator, Tuple

import keras
import numpy as np

import keras_quant.ops as qops
from keras_quant.analysis.common import ratio
from keras_quant.config import MAX_BITS, MIN_BITS, as_spec
from keras_quant.errors import ConfigError, NonFiniteError, ShapeMismatchError

__all__ = [
    "ErrorStats",
    "ScaleSensitivity",
    "OutlierImpact",
    "error_stats",
    "theoretical_sqnr",
    "theoretical_max_error",
    "compare_bit_widths",
    "scale_sensitivity",
    "outlier_impact",
]

DEFAULT_BITS = (2, 3, 4, 6, 8, 16)
# Default outlier threshold: this many RMSEs of the error.
OUTLIER_RMSE_FACTOR = 3.0
NAN_POLICIES = ("raise", "omit")


# Value types -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ErrorStats:
    """Statistics of the error `e = dequantized - original`.

    Attributes:
        mse: Mean of `e**2`.
        mae: Mean of `|e|`.
        max_error: Largest `|e|`.
        sqnr_db: Signal-to-quantization-noise ratio in dB,
            `10 * log10(sum(original**2) / sum(e**2))`: `inf` when the error is
            0, `-inf` when the signal is all zeros and the error is not.
        outlier_rate: Fraction (in `[0, 1]`) of elements with
            `|e| > outlier_threshold`.
        num_samples: Number of elements compared.
        rmse: `sqrt(mse)`.
        outlier_threshold: The absolute threshold used for `outlier_rate`.
    """

    mse: float
    mae: float
    max_error: float
    sqnr_db: float
    outlier_rate: float
    num_samples: int
    rmse: float
    outlier_threshold: float

    def to_dict(self) -> dict:
        """The fields as a plain dict of Python numbers."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class ScaleSensitivity:
    """Error of quantizing one tensor with its min-max scale multiplied by `1 + p`.

    Iterating gives `(factor, ErrorStats)` pairs, sorted by factor, so
    `list(result)` is the plain list form.

    Attributes:
        perturbations: The relative perturbations `p`, sorted, 0 included.
        stats: One `ErrorStats` per perturbation.
        scale: The baseline (min-max) scale, a float or a numpy array for
            per-channel / per-group specs.
        zero_point: The baseline zero point, kept fixed while the scale moves.
    """

    perturbations: Tuple[float, ...]
    stats: Tuple[ErrorStats, ...]
    scale: object
    zero_point: object

    @property
    def factors(self) -> Tuple[float, ...]:
        """The scale multipliers `1 + p`."""
        return tuple(1.0 + p for p in self.perturbations)

    @property
    def baseline(self) -> ErrorStats:
        """The statistics at `p = 0` (the unperturbed min-max scale)."""
        return self.stats[self.perturbations.index(0.0)]

    @property
    def mse_ratios(self) -> Tuple[float, ...]:
        """Each MSE divided by the baseline's (`inf` where the baseline is 0 and the MSE is not)."""
        base = self.baseline.mse
        return tuple(ratio(s.mse, base, zero="inf") for s in self.stats)

    def __iter__(self) -> Iterator[Tuple[float, ErrorStats]]:
        return iter(zip(self.factors, self.stats))

    def __len__(self) -> int:
        return len(self.stats)

    def to_dict(self) -> dict:
        """The fields as a plain dict of Python numbers and lists."""
        return {
            "perturbations": list(self.perturbations),
            "factors": list(self.factors),
            "stats": [s.to_dict() for s in self.stats],
            "mse_ratios": list(self.mse_ratios),
            "scale": _plain(self.scale),
            "zero_point": _plain(self.zero_point),
        }


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class OutlierImpact:
    """Min-max quantization against quantization with a percentile-clipped range.

    Attributes:
        percentile: The upper percentile `p`; the clipped range is
            `[percentile(x, 100 - p), percentile(x, p)]`.
        minmax_range: `(min, max)` of `x`.
        clipped_range: `(low, high)` percentiles of `x`.
        minmax_stats: `ErrorStats` of min-max quantization.
        clipped_stats: `ErrorStats` of quantization with the clipped range.
        clipped_fraction: Fraction of elements outside the clipped range
            (after widening it to contain 0, as `kq.ops.compute_qparams` does),
            i.e. the elements the clipped quantizer saturates.

    Ranges are floats per tensor, numpy arrays per channel / per group.
    """

    percentile: float
    minmax_range: Tuple[object, object]
    clipped_range: Tuple[object, object]
    minmax_stats: ErrorStats
    clipped_stats: ErrorStats
    clipped_fraction: float

    @property
    def mse_ratio(self) -> float:
        """`clipped_stats.mse / minmax_stats.mse`: below 1 when clipping helps."""
        return ratio(self.clipped_stats.mse, self.minmax_stats.mse, zero="inf")

    def to_dict(self) -> dict:
        """The fields as a plain dict of Python numbers and lists."""
        return {
            "percentile": self.percentile,
            "minmax_range": [_plain(v) for v in self.minmax_range],
            "clipped_range": [_plain(v) for v in self.clipped_range],
            "minmax_stats": self.minmax_stats.to_dict(),
            "clipped_stats": self.clipped_stats.to_dict(),
            "clipped_fraction": self.clipped_fraction,
            "mse_ratio": self.mse_ratio,
        }


# Helpers -----------------------------------------------------------------------
def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def _scalar_or_array(v):
    v = np.asarray(v, dtype=np.float64)
    return float(v) if v.ndim == 0 else v


def _to_numpy(x, field):
    """`x` (numpy, backend tensor, list or scalar) as a float64 numpy array."""
    if isinstance(x, (np.ndarray, numbers.Number, list, tuple)):
        arr = np.asarray(x)
    else:
        try:
            arr = np.asarray(keras.ops.convert_to_numpy(x))
        except Exception as e:  # noqa: BLE001 - any backend's conversion error
            raise ConfigError(field, x, f"{field} must be an array or a tensor ({type(e).__name__}: {e})") from None
    if arr.dtype.kind not in "biuf":
        raise ConfigError(field, x, f"{field} must hold real numbers; got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _check_nonempty(arr, field):
    if arr.size == 0:
        raise ConfigError(field, f"<empty array of shape {arr.shape}>", f"{field} must have at least one element")


def _check_finite(arr, field, nan_policy=None):
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise NonFiniteError(bad, field=field, nan_policy=nan_policy)


def _input_tensor(x, field="x"):
    """Validate `x` and return it as float32 numpy (what the ops quantize)."""
    arr = _to_numpy(x, field)
    _check_nonempty(arr, field)
    _check_finite(arr, field)
    return arr.astype(np.float32)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fake_quant_np(x32, scale, zero_point, spec):
    """Fake-quantize float32 numpy `x32`; the result as float64 numpy."""
    y = qops.fake_quant(x32, scale, zero_point, spec)
    return np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)


def _stats_of(x32, y):
    return _error_stats_np(x32.astype(np.float64), y, None)


def _error_stats_np(x, y, outlier_threshold):
    e = y - x
    n = int(e.size)
    abs_e = np.abs(e)
    noise = float(np.sum(e * e))
    signal = float(np.sum(x * x))
    mse = noise / n
    rmse = math.sqrt(mse)
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    threshold = OUTLIER_RMSE_FACTOR * rmse if outlier_threshold is None else float(outlier_threshold)
    return ErrorStats(
        mse=mse,
        mae=float(np.mean(abs_e)),
        max_error=float(np.max(abs_e)),
        sqnr_db=sqnr,
        outlier_rate=float(np.count_nonzero(abs_e > threshold)) / n,
        num_samples=n,
        rmse=rmse,
        outlier_threshold=threshold,
    )


# Public functions -------------------------------------------------------------------
def error_stats(original, dequantized, outlier_threshold=None, nan_policy="raise") -> ErrorStats:
    """Statistics of the quantization error `dequantized - original`.

    Args:
        original: The float tensor (numpy array, backend tensor or nested list).
        dequantized: Its quantized-dequantized version, same shape.
        outlier_threshold: Absolute error above which an element counts as an
            outlier (`|e| > threshold`). None (the default) uses
            `3 * RMSE` of the error, so `outlier_rate` is the fraction of
            elements whose error is over three times the typical error.
        nan_policy: `"raise"` (default): NaN or Inf in either input raises
            `NonFiniteError`. `"omit"`: positions where either input is
            non-finite are left out (`num_samples` counts the rest).

    Returns:
        An `ErrorStats` of Python floats.

    Raises:
        ShapeMismatchError: If the two shapes differ.
        ConfigError: If an input is empty or not numeric, for a negative or
            non-finite `outlier_threshold`, an unknown `nan_policy`, or when
            `"omit"` leaves no element.
        NonFiniteError: With `nan_policy="raise"`, if an input holds NaN or Inf.

    Example:

    >>> s = error_stats([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    >>> s.mse, s.mae, s.max_error, s.rmse
    (0.25, 0.25, 1.0, 0.5)
    >>> round(s.sqnr_db, 3)   # 10 * log10(30 / 1)
    14.771
    """
    if nan_policy not in NAN_POLICIES:
        raise ConfigError("nan_policy", nan_policy, f"nan_policy must be one of {NAN_POLICIES}")
    if outlier_threshold is not None and (
        not _is_real(outlier_threshold) or not math.isfinite(outlier_threshold) or outlier_threshold < 0
    ):
        raise ConfigError(
            "outlier_threshold", outlier_threshold, "outlier_threshold must be None or a finite number >= 0"
        )
    x = _to_numpy(original, "original")
    y = _to_numpy(dequantized, "dequantized")
    if x.shape != y.shape:
        raise ShapeMismatchError("dequantized", x.shape, y.shape)
    _check_nonempty(x, "original")
    if nan_policy == "raise":
        _check_finite(x, "original", nan_policy)
        _check_finite(y, "dequantized", nan_policy)
    else:
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size == 0:
            raise ConfigError(
                "nan_policy", nan_policy, "no position is finite in both inputs, so there is nothing to compare"
            )
    return _error_stats_np(x.reshape(-1), y.reshape(-1), outlier_threshold)


def theoretical_sqnr(bits):
    """SQNR in dB of an ideal `bits`-bit quantizer on a full-scale sine: `6.02 * bits + 1.76`.

    The formula assumes `2**bits` equal steps across the signal's range. The
    grids here have one step fewer (asymmetric: `2**bits - 1` steps) or two
    (symmetric: `2**bits - 2`), so measured values fall short by about
    `20 * log10(2**bits / steps)` dB, plus a little for the zero-point
    rounding: about 1.9 dB at 3 bits, 1.1 dB at 4, under 0.2 dB from 8 bits.

    Args:
        bits: Bit width, a positive number or an array of them.

    Returns:
        A float, or a float64 numpy array shaped like `bits`.

    Raises:
        ConfigError: If `bits` is not positive and finite.

    Example:

    >>> theoretical_sqnr(8)
    49.92
    """
    b = _to_numpy(bits, "bits")
    if b.size == 0 or not np.all(np.isfinite(b)) or np.any(b <= 0):
        raise ConfigError("bits", bits, "bits must be positive and finite")
    return _scalar_or_array((602.0 * b + 176.0) / 100.0)


def theoretical_max_error(scale):
    """Largest rounding error inside the representable range: `scale / 2`.

    Args:
        scale: Quantization step, a number, an array or a backend tensor
            (e.g. per-channel scales).

    Returns:
        A float, or a float64 numpy array shaped like `scale`.

    Raises:
        ConfigError: If `scale` is negative, non-finite or empty.

    Example:

    >>> theoretical_max_error(0.1)
    0.05
    """
    s = _to_numpy(scale, "scale")
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ConfigError("scale", scale, "scale must be finite and >= 0")
    return _scalar_or_array(s / 2.0)


def compare_bit_widths(x, bits=DEFAULT_BITS, spec=None) -> dict:
    """The error of min-max quantizing `x` at several bit widths.

    For each width `b`, `x` is fake-quantized with `spec.replace(bits=b)` and
    the qparams of its own min-max range (`kq.ops.tensor_qparams`, so per
    channel or per group when the spec says so).

    Args:
        x: Float tensor.
        bits: Bit widths to try, each an integer from 2 to 16.
        spec: `kq.QuantSpec` giving every field but `bits` (symmetry,
            granularity, ...). Defaults to `QuantSpec()`.

    Returns:
        A dict `{bits: ErrorStats}` in the order of `bits`.

    Raises:
        ConfigError: For an invalid `bits` or `spec`, or an empty `x`.
        NonFiniteError: If `x` holds NaN or Inf.

    Example:

    >>> import numpy as np
    >>> x = np.linspace(-1, 1, 101, dtype="float32")
    >>> errs = compare_bit_widths(x, bits=(4, 8))
    >>> errs[8].mse < errs[4].mse
    True
    """
    spec = as_spec(spec)
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        bits = (bits,)
    try:
        widths = tuple(bits)
    except TypeError:
        raise ConfigError("bits", bits, "bits must be a sequence of integers") from None
    if not widths:
        raise ConfigError("bits", bits, "bits must name at least one bit width")
    for b in widths:
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError("bits", bits, f"each bit width must be an integer from {MIN_BITS} to {MAX_BITS}")
    x32 = _input_tensor(x)
    result = {}
    for b in widths:
        s = spec.replace(bits=int(b))
        scale, zero_point = qops.tensor_qparams(x32, s)
        result[int(b)] = _stats_of(x32, _fake_quant_np(x32, scale, zero_point, s))
    return result


def _perturbations(perturbation):
    if _is_real(perturbation):
        p = float(perturbation)
        values = (-p, 0.0, p)
    else:
        try:
            values = tuple(perturbation)
        except TypeError:
            raise ConfigError(
                "perturbation", perturbation, "perturbation must be a number or a sequence of numbers"
            ) from None
        if not values:
            raise ConfigError("perturbation", perturbation, "perturbation must not be empty")
        if not all(_is_real(v) for v in values):
            raise ConfigError("perturbation", perturbation, "perturbation must hold real numbers")
        values = tuple(float(v) for v in values) + (0.0,)
    if not all(math.isfinite(v) and v > -1.0 for v in values):
        raise ConfigError(
            "perturbation",
            perturbation,
            "each perturbation p must be finite and > -1 (the scale becomes scale * (1 + p))",
        )
    return tuple(sorted(set(values)))


def scale_sensitivity(x, spec=None, perturbation=0.1) -> ScaleSensitivity:
    """How the error of quantizing `x` changes when its scale is off by a factor.

    The baseline is min-max quantization (`kq.ops.tensor_qparams`). For each
    relative perturbation `p`, `x` is fake-quantized with `scale * (1 + p)`
    and the baseline zero point, so 0.0 stays exactly representable and the
    representable range grows or shrinks about 0. `p < 0` clips the extremes;
    `p > 0` coarsens the grid.

    Args:
        x: Float tensor.
        spec: `kq.QuantSpec` (defaults to `QuantSpec()`).
        perturbation: A number `p` (tries `-p`, `0` and `+p`) or a sequence of
            relative perturbations (0, the baseline, is added if missing).
            Each must be `> -1`.

    Returns:
        A `ScaleSensitivity`: `.perturbations`, `.factors`, `.stats`,
        `.baseline`, `.mse_ratios`; iterating yields `(factor, ErrorStats)`.

    Raises:
        ConfigError: For an invalid `perturbation` or `spec`, or an empty `x`.
        NonFiniteError: If `x` holds NaN or Inf.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=1000).astype("float32")
    >>> res = scale_sensitivity(x, perturbation=0.5)
    >>> [round(f, 2) for f, _ in res]
    [0.5, 1.0, 1.5]
    >>> min(res.mse_ratios)
    1.0
    """
    spec = as_spec(spec)
    perturbations = _perturbations(perturbation)
    x32 = _input_tensor(x)
    scale, zero_point = qops.tensor_qparams(x32, spec)
    scale_np = np.asarray(keras.ops.convert_to_numpy(scale), dtype=np.float32)
    zp_np = np.asarray(keras.ops.convert_to_numpy(zero_point))
    stats = []
    for p in perturbations:
        s = (scale_np * np.float32(1.0 + p)).astype(np.float32)
        stats.append(_stats_of(x32, _fake_quant_np(x32, s, zp_np, spec)))
    return ScaleSensitivity(
        perturbations=perturbations,
        stats=tuple(stats),
        scale=_scalar_or_array(scale_np),
        zero_point=zp_np.item() if zp_np.ndim == 0 else zp_np,
    )


def _reduction_view(x, spec):
    """`x` as `param_shape + (n,)`: the elements each scale covers, on the last axis.

    The layout is kq.ops' own (`kq.ops.to_groups`); per channel is one group
    spanning the whole channel.
    """
    if spec.granularity == "per_tensor":
        return x.reshape(-1)
    layout = spec
    if spec.granularity == "per_channel":
        per_channel = x.size // x.shape[qops.channel_axis(spec, x.ndim)]
        layout = spec.replace(granularity="per_group", group_size=per_channel)
    grouped, _ = qops.to_groups(x, layout)  # (C, G, n)
    grouped = np.asarray(keras.ops.convert_to_numpy(grouped))
    return grouped[:, 0, :] if spec.granularity == "per_channel" else grouped


def outlier_impact(x, percentile=99.9, spec=None) -> OutlierImpact:
    """Min-max quantization of `x` against quantization with a percentile-clipped range.

    The clipped range is `[percentile(x, 100 - p), percentile(x, p)]`
    (numpy's linear interpolation), per channel or per group when the spec
    says so. Both ranges go through `kq.ops.compute_qparams` and
    `kq.ops.fake_quant` with the same spec.

    Args:
        x: Float tensor.
        percentile: Upper percentile `p`, in `(50, 100]`; 100 clips nothing.
        spec: `kq.QuantSpec` (defaults to `QuantSpec()`).

    Returns:
        An `OutlierImpact` with both `ErrorStats`, both ranges, the fraction
        of elements clipped and `mse_ratio` (clipped / min-max).

    Raises:
        ConfigError: For an invalid `percentile` or `spec`, an empty `x`, or
            an `axis` out of range.
        ShapeMismatchError: If a per-group spec's `group_size` does not divide
            the channel.
        NonFiniteError: If `x` holds NaN or Inf.

    Example:

    Clipping a heavy-tailed tensor's range helps at 4 bits (finer grid for
    the bulk) and hurts at 8 (the clipped tails cost more than the grid gains):

    >>> import numpy as np, keras_quant as kq
    >>> x = np.random.default_rng(0).standard_t(3, size=10000).astype("float32")
    >>> outlier_impact(x, 99.9, kq.QuantSpec(bits=4)).mse_ratio < 1
    True
    >>> outlier_impact(x, 99.9, kq.QuantSpec(bits=8)).mse_ratio > 1
    True
    """
    spec = as_spec(spec)
    if not _is_real(percentile) or not math.isfinite(percentile) or not 50.0 < percentile <= 100.0:
        raise ConfigError("percentile", percentile, "percentile must be a number in (50, 100]")
    p = float(percentile)
    x32 = _input_tensor(x)
    view = _reduction_view(x32, spec).astype(np.float64)
    mm = (view.min(axis=-1), view.max(axis=-1))
    lo, hi = np.percentile(view, [100.0 - p, p], axis=-1)

    def quantized(low, high):
        scale, zero_point = qops.compute_qparams(low.astype(np.float32), high.astype(np.float32), spec)
        return _stats_of(x32, _fake_quant_np(x32, scale, zero_point, spec))

    low0, high0 = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    outside = (view < np.expand_dims(low0, -1)) | (view > np.expand_dims(high0, -1))
    return OutlierImpact(
        percentile=p,
        minmax_range=(_scalar_or_array(mm[0]), _scalar_or_array(mm[1])),
        clipped_range=(_scalar_or_array(lo), _scalar_or_array(hi)),
        minmax_stats=quantized(*mm),
        clipped_stats=quantized(lo, hi),
        clipped_fraction=float(np.count_nonzero(outside)) / x32.size,
    )
