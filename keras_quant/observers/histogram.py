"""Histogram observers: a fixed number of bins over a range that widens as needed.

State per slot (the tensor, or each channel): `hist` (`num_bins` counts) and
the current range `[hist_min, hist_max]`. The first batch sets the range to
its finite extent. A later batch that falls outside widens the range to the
union and re-bins the existing counts into the new, wider bins: each old bin's
mass is split between the (at most two) new bins it overlaps, in proportion
to the overlap, as if it were uniform within the bin. Then the batch is binned
into the widened range. Everything is `keras.ops` (bincount on TensorFlow,
`segment_sum` with a static `num_segments` elsewhere; the kernels are
`keras_quant.ops.histogram.rebin_counts` and `bin_counts`), so the update
runs under `tf.function`, XLA and JAX. No data is stored.

A constant first batch gives a zero-width range; its mass sits in bin 0 and is
moved to the bin holding that value once the range widens.

`compute_range()` runs a range search of `keras_quant.ops.range_search`
on each slot's histogram, in numpy.

Example:

>>> import numpy as np, keras_quant as kq
>>> obs = kq.observers.HistogramObserver(method="mse", spec=kq.QuantSpec(bits=4))
>>> lo, hi = obs.update(np.random.default_rng(0).laplace(size=10_000)).compute_range()
"""

import keras
import numpy as np
from keras import ops

from keras_quant.config import QuantSpec, as_spec, auto_candidates, auto_tolerance, check_num_bins  # noqa: F401 (QuantSpec: examples)
from keras_quant.errors import ConfigError, is_number
import keras_quant.ops.range_search as range_search
from keras_quant.observers.base import Observer
from keras_quant.ops.histogram import bin_counts, rebin_counts

__all__ = ["HistogramObserver", "PercentileObserver", "METHODS"]

# The range searches: method name -> pure function of (hist, bin_edges, spec, options).
METHODS = range_search.SEARCHES


@keras.saving.register_keras_serializable(package="keras_quant")
class HistogramObserver(Observer):
    """A fixed-size histogram, with the range found by a search on it.

    State: `hist` (`(num_bins,)` or `(C, num_bins)` float32 counts),
    `hist_min`, `hist_max` (`()` or `(C,)`; `+inf` / `-inf` when empty) and
    `non_finite_count`.

    Args:
        num_bins: Number of bins, in `[8, 2**16]` (`keras_quant.config.MAX_BINS`).
        method: Range search: `"mse"`, `"kl"`, `"percentile"`, `"minmax"` or
            `"auto"` (whichever of those four gives the least expected MSE,
            `range_search.auto_range`, per tensor or per channel); see
            `keras_quant.ops.range_search`.
        percentile: For `method="percentile"` (and the percentile candidate
            of `"auto"`): the upper percentile; the lower one is
            `100 - percentile`.
        spec: The `kq.QuantSpec` (or its config dict) whose grid
            `compute_range()` searches for; default `QuantSpec(bits=8)`.
            `compute_qparams(spec)` searches for the spec it is given. Only
            `bits`, `symmetric` and `narrow_range` matter.
        granularity: `"per_tensor"` or `"per_channel"`.
        axis: Channel axis for `per_channel`.
        nan_policy: `"omit"` or `"raise"`.
        candidates: For `method="auto"`: the methods compared, in order of
            preference (a comma-separated string or a sequence; default
            `"minmax,percentile,mse,kl"`).
        tolerance: For `method="auto"`: relative MSE margin of a tie
            (default 0.2, see `range_search.auto_range`).
        **kwargs: Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument (including `per_group`).

    Example:

    >>> obs = HistogramObserver(num_bins=256, method="kl")
    >>> _ = obs.update(np.random.default_rng(0).normal(size=(64, 16)))
    >>> scale, zero_point = obs.compute_qparams(QuantSpec(bits=8, symmetric=True))
    """

    def __init__(self, num_bins=2048, method="mse", percentile=99.99, spec=None, granularity="per_tensor", axis=-1,
                 nan_policy="omit", candidates=None, tolerance=None, **kwargs):
        super().__init__(granularity=granularity, axis=axis, nan_policy=nan_policy, **kwargs)
        self.candidates = auto_candidates(candidates)
        self.tolerance = auto_tolerance(tolerance)
        check_num_bins(num_bins, layer=kwargs.get("name"))
        if method not in METHODS:
            raise ConfigError("method", method, f"method must be one of {tuple(METHODS)}")
        if not is_number(percentile) or not 0 < percentile <= 100:
            raise ConfigError("percentile", percentile, "percentile must be a number in (0, 100]")
        spec = as_spec(spec)
        self.num_bins = int(num_bins)
        self.method = method
        self.percentile = float(percentile)
        self.spec = spec

    def _build_state(self, shape):
        self._state_variable("hist", shape + (self.num_bins,), 0.0)
        self._state_variable("hist_min", shape, float("inf"))
        self._state_variable("hist_max", shape, float("-inf"))

    # Graph-side update ------------------------------------------------------
    def _update_state(self, rows, finite, all_finite):
        lo_b, hi_b = self._masked_min_max(rows, finite, all_finite)
        old_lo, old_hi = self._read(self.hist_min), self._read(self.hist_max)
        has_batch = lo_b <= hi_b
        new_lo = ops.where(has_batch, ops.minimum(old_lo, lo_b), old_lo)
        new_hi = ops.where(has_batch, ops.maximum(old_hi, hi_b), old_hi)
        bins, slots = self.num_bins, self.num_slots
        hist = rebin_counts(self._read(self.hist), old_lo, old_hi, new_lo, new_hi, bins, slots)
        hist = hist + bin_counts(rows, finite, new_lo, new_hi, bins, slots)
        self._assign(self.hist, hist)
        self._assign(self.hist_min, new_lo)
        self._assign(self.hist_max, new_hi)

    # Reading -----------------------------------------------------------------
    def _state(self):
        hist = np.asarray(ops.convert_to_numpy(self.hist), np.float64).reshape(self.num_slots, self.num_bins)
        lo = np.asarray(ops.convert_to_numpy(self.hist_min), np.float64).reshape(-1)
        hi = np.asarray(ops.convert_to_numpy(self.hist_max), np.float64).reshape(-1)
        return hist, lo, hi

    def histogram(self):
        """The counts and bin edges.

        Returns:
            `(hist, bin_edges)`: numpy arrays of shape `(num_bins,)` and
            `(num_bins + 1,)` per tensor, `(C, num_bins)` and
            `(C, num_bins + 1)` per channel.

        Raises:
            NoDataError: If no finite value has been seen (for some channel).
        """
        self._check_state()
        hist, lo, hi = self._state()
        self._no_data((lo > hi) | (hist.sum(axis=1) <= 0))
        edges = np.linspace(lo, hi, self.num_bins + 1, axis=-1)
        shape = self.state_shape
        return hist.reshape(shape + (self.num_bins,)), edges.reshape(shape + (self.num_bins + 1,))

    def search_options(self):
        """The options this observer's search takes (`range_search.SEARCHES`): percentile and auto's settings."""
        return {"percentile": self.percentile, "candidates": self.candidates, "tolerance": self.tolerance}

    def _search(self, hist, edges, spec):
        return METHODS[self.method](hist, edges, spec, self.search_options())

    def _range(self, spec=None):
        spec = self.spec if spec is None else spec
        hist, lo, hi = self._state()
        self._no_data((lo > hi) | (hist.sum(axis=1) <= 0))
        found = [self._search(h, np.linspace(a, b, self.num_bins + 1), spec) for h, a, b in zip(hist, lo, hi)]
        return np.array([f[0] for f in found]), np.array([f[1] for f in found])

    def compute_range(self, spec=None):
        """The range found by the search on the histogram(s).

        Args:
            spec: Target `kq.QuantSpec` for the search; default the
                observer's `spec`.

        Returns:
            `(min, max)`: floats per tensor, float32 arrays `(C,)` per channel.

        Raises:
            NoDataError: If no finite value has been seen (for some channel).
            NonFiniteError: If non-finite values were recorded and
                `nan_policy="raise"`.
        """
        self._check_state()
        return self._format(*self._range(spec))

    def auto_ranges(self, spec=None):
        """What `method="auto"` finds on each slot's histogram (whatever `method` is).

        Args:
            spec: Target `kq.QuantSpec`; default the observer's `spec`.

        Returns:
            A tuple of `range_search.AutoRange`, one per tensor (length 1)
            or per channel: the chosen method, range and each candidate's
            range and expected MSE.

        Raises:
            NoDataError: If no finite value has been seen (for some channel).
        """
        self._check_state()
        spec = self.spec if spec is None else spec
        hist, lo, hi = self._state()
        self._no_data((lo > hi) | (hist.sum(axis=1) <= 0))
        return tuple(
            range_search.auto_range(h, np.linspace(a, b, self.num_bins + 1), spec, candidates=self.candidates,
                                    tolerance=self.tolerance, percentile=self.percentile)
            for h, a, b in zip(hist, lo, hi)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"num_bins": self.num_bins, "method": self.method, "percentile": self.percentile,
             "spec": self.spec.get_config(), "candidates": ",".join(self.candidates), "tolerance": self.tolerance}
        )
        return config


@keras.saving.register_keras_serializable(package="keras_quant")
class PercentileObserver(HistogramObserver):
    """The `low` and `high` percentiles, read from a histogram's CDF.

    The same fixed-size state as `HistogramObserver`; percentiles are linear
    interpolations within a bin, so they are accurate to about one bin width
    (`(max - min) / num_bins`).

    Args:
        low: Lower percentile in `[0, 100)`.
        high: Upper percentile in `(low, 100]`.
        num_bins: Number of bins, in `[8, 2**16]` (`keras_quant.config.MAX_BINS`).
        granularity: `"per_tensor"` or `"per_channel"`.
        axis: Channel axis for `per_channel`.
        nan_policy: `"omit"` or `"raise"`.
        **kwargs: Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument (including `per_group`).

    Example:

    >>> obs = PercentileObserver(low=1.0, high=99.0)
    >>> lo, hi = obs.update(np.arange(1001.0)).compute_range()   # about (10.0, 990.0)
    """

    def __init__(self, low=0.01, high=99.99, num_bins=2048, granularity="per_tensor", axis=-1, nan_policy="omit",
                 **kwargs):
        super().__init__(num_bins=num_bins, method="percentile", granularity=granularity, axis=axis,
                         nan_policy=nan_policy, **kwargs)
        for field, value in (("low", low), ("high", high)):
            if not is_number(value) or not 0 <= value <= 100:
                raise ConfigError(field, value, f"{field} must be a percentile in [0, 100]")
        if not low < high:
            raise ConfigError("low", low, f"low must be below high={high}")
        self.low = float(low)
        self.high = float(high)

    def search_options(self):
        """`{"low": low, "high": high}`: the percentiles `range_search.SEARCHES["percentile"]` reads."""
        return {"low": self.low, "high": self.high}

    def get_config(self):
        config = super().get_config()
        for key in ("method", "percentile", "spec", "candidates", "tolerance"):
            config.pop(key)
        config.update({"low": self.low, "high": self.high})
        return config
