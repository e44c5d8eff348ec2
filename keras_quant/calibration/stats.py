"""Activation statistics in the graph: the `LayerCollector` layer and its moment merge.

A `LayerCollector` is a pass-through Keras layer (not an observer: it keeps the
statistics every range method reads, and asks `keras_quant.observers.REGISTRY`
which of them the spec's range needs) that watches one tensor and keeps, in a few fixed-size float32 variables,

- per tensor (one packed `scalars` vector): count, mean and the central
  moments `M2`, `M3`, `M4` (merged exactly across batches, below), the
  number of exact zeros, the number of samples, the non-finite count and
  the running min / max;
- a per-tensor histogram over the running `[min, max]` (`hist`, rebinned as
  the range widens, with the kernels of `keras_quant.ops.histogram`),
  used for percentiles, outlier counts and the `percentile` / `mse` / `kl`
  searches;
- per channel (along `channel_axis`): `channel_min`, `channel_max`;

Exact and estimated: the counts, the mean, the min / max and the per-channel
min / max read every value. `M2`..`M4` (hence std, skewness, kurtosis), the
zero count (sparsity) and the histogram counts read every value of a batch
of at most `sample_size` values (default 16384) and, of a larger batch,
`sample_size` values spread evenly over it, scaled up to the batch (see
`keras_quant.calibration.step`): estimates, unbiased but no longer exact, and
the histogram's counts are then fractional (their total is the count up to
rounding). `sample_size=None` reads every value.
- only when the spec's range cannot be read from the above: the spec's own
  observer (`moving_average`, or a per-channel non-`minmax` spec).

What a spec's range needs beyond `statistics="range"`'s min / max is its
record's `needs` in `keras_quant.observers.REGISTRY`. The update itself is
`keras_quant.calibration.step.step`, a pure function shared by every
collector of the same `StepKey`.

Batch moments are computed two-pass within the batch, then merged with the
running ones by the pairwise formulas of Chan et al. (1979) and Pébay (2008):
with `n = n_a + n_b`, `d = mean_b - mean_a`, `r_a = n_a / n`, `r_b = n_b / n`,

    mean = mean_a + d r_b
    M2 = M2_a + M2_b + d^2 n_a r_b
    M3 = M3_a + M3_b + d^3 n_a r_b (r_a - r_b) + 3 d (r_a M2_b - r_b M2_a)
    M4 = M4_a + M4_b + d^4 n_a r_b (r_a^2 - r_a r_b + r_b^2)
         + 6 d^2 (r_a^2 M2_b + r_b^2 M2_a) + 4 d (r_a M3_b - r_b M3_a)

(written with ratios so nothing overflows float32), so the result does not
depend on how the data was split (exactly so when no batch is sampled). `merge_moments` (defined in
`keras_quant.calibration.step`) is that formula as a pure function;
`batch_moments` the numpy two-pass batch moments.

Example:

>>> import keras, numpy as np, keras_quant as kq
>>> collector = LayerCollector(kq.QuantSpec(bits=8, observer="mse"))
>>> model = keras.Sequential([keras.Input((16,)), collector])
>>> _ = model.predict(np.random.default_rng(0).normal(size=(256, 16)), verbose=0)
>>> stats = collector.to_statistics()          # a LayerStatistics (numpy)
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

import keras_quant.graph as graph_lib
import keras_quant.calibration.step as step_lib
from keras_quant.calibration.result import LayerStatistics
from keras_quant.calibration.step import SAMPLE, SCALARS, VARIABLES, StepKey, initial, merge_moments
from keras_quant.config import as_spec, check_num_bins
from keras_quant.errors import ConfigError, check_int
from keras_quant.observers.base import state_bytes as observer_state_bytes
from keras_quant.observers.registry import REGISTRY
from keras_quant.observers.registry import get as get_observer
from keras_quant.ops.histogram import histogram_outliers

__all__ = ["LayerCollector", "merge_moments", "batch_moments", "moments_to_stats", "STATISTICS"]

def batch_moments(x):
    """`(n, mean, M2, M3, M4)` of the values `x`, two-pass, in float64 numpy.

    Args:
        x: Array-like of finite floats.

    Returns:
        A tuple of floats: count, mean and the sums of the 2nd, 3rd and 4th
        powers of the deviations from the mean.

    Example:

    >>> batch_moments([1.0, 2.0, 3.0])
    (3.0, 2.0, 2.0, 0.0, 2.0)
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        return (0.0, 0.0, 0.0, 0.0, 0.0)
    mean = x.mean()
    d = x - mean
    d2 = d * d
    return (float(x.size), float(mean), float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum()))


def moments_to_stats(n, mean, m2, m3, m4):
    """Mean, population std, skewness and excess kurtosis from `(n, mean, M2, M3, M4)`.

    Skewness is `sqrt(n) M3 / M2^1.5` and kurtosis `n M4 / M2^2 - 3` (the
    biased estimates of `scipy.stats.skew` / `scipy.stats.kurtosis(fisher=True)`);
    both are None when `M2 == 0` (constant data).

    Returns:
        `(mean, std, skewness, kurtosis)` as floats (or None).
    """
    n, mean, m2, m3, m4 = (float(v) for v in (n, mean, m2, m3, m4))
    if n <= 0:
        return None, None, None, None
    m2 = max(m2, 0.0)
    std = float(np.sqrt(m2 / n))
    if m2 <= 0 or std <= 1e-30:
        return mean, std, None, None
    return mean, std, float(np.sqrt(n) * m3 / m2**1.5), float(n * m4 / (m2 * m2) - 3.0)


STATISTICS = ("full", "range")

def _read(variable):
    """A variable's current value as a plain tensor (a `tf.Variable` is read, not passed)."""
    value = variable.value  # the backend's own variable or array
    return value.read_value() if hasattr(value, "read_value") else ops.convert_to_tensor(value)


@keras.saving.register_keras_serializable(package="keras_quant")
class LayerCollector(keras.layers.Layer):
    """Pass-through layer that gathers the statistics of one tensor in the graph.

    Runs inside compiled steps (`tf.function`, `jit_compile=True`, JAX) with
    fixed memory; `to_statistics()` reads the state into a `LayerStatistics`.

    A batch whose sum is finite (the usual case) takes a fast path: plain
    reductions, with no masking pass. A batch with NaN/Inf, or a
    `sample_mask`, takes the masked path. On a batch of more than
    `sample_size` values the moments, zero count and histogram are
    estimated from `sample_size` of them (module docstring).

    Args:
        spec: The `kq.QuantSpec` of this activation (None: `QuantSpec(bits=8)`);
            its `observer` picks the range stored in the statistics.
        channel_axis: Axis of the per-channel min / max (skipped when the
            axis' size is unknown or the tensor is 1-D).
        num_bins: Histogram bins, in `[8, 2**16]`; a histogram-based spec's
            `observer_options["num_bins"]` overrides it.
        statistics: `"full"` (moments, sparsity, per-channel extremes and a
            histogram for percentiles and outliers) or `"range"` (only what
            the spec's observer needs: min/max, plus the histogram for
            `percentile` / `mse` / `kl` / `auto`, the moments for `mean_std`): cheaper
            in the step, with fewer fields in the statistics.
        sample_size: The most values of one batch that the moments, zero
            count and histogram read (a larger batch: that many, spread over
            it, scaled up; the counts, mean and extremes stay exact); None:
            every value (exact, several times slower on large activations).
        name: Layer name.
        **kwargs: Other Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument.

    Example:

    >>> c = LayerCollector(kq.QuantSpec(bits=8, observer="percentile"))   # doctest: +SKIP
    >>> _ = c(x); _ = c(x2, sample_mask=keep)                              # doctest: +SKIP
    >>> c.to_statistics().percentile(99.0)                                 # doctest: +SKIP
    """

    def __init__(self, spec=None, channel_axis=-1, num_bins=2048, statistics="full", name=None, sample_size=SAMPLE,
                 **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(name=name, **kwargs)
        spec = as_spec(spec, layer=name)
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise ConfigError("channel_axis", channel_axis, "channel_axis must be an integer", layer=name)
        if statistics not in STATISTICS:
            raise ConfigError("statistics", statistics, f"statistics must be one of {STATISTICS}", layer=name)
        self.spec = spec
        self.sample_size = check_int("sample_size", sample_size, minimum=1, allow_none=True, layer=name)
        self.channel_axis = int(channel_axis)
        self.statistics = statistics
        # What the spec's range needs (its registry record) decides what is kept beyond `statistics`.
        needs = REGISTRY[spec.observer].needs
        field = "num_bins"
        if needs == "histogram" and "num_bins" in spec.options:
            num_bins, field = spec.options["num_bins"], "observer_options.num_bins"
        self.num_bins = check_num_bins(num_bins, field, name)  # whatever is gathered: bounded at construction
        full = statistics == "full"
        per_tensor = spec.granularity == "per_tensor"
        channel_minmax = spec.granularity == "per_channel" and needs == "minmax"
        self._with_moments = full or (per_tensor and needs == "moments")
        self._with_zeros = full
        self._with_channels = full or channel_minmax
        self._with_hist = full or (per_tensor and needs == "histogram")
        self._scalars_var = self._hist_var = self._channel_min_var = self._channel_max_var = None
        self._extra = None
        reusable = per_tensor and needs != "observer"
        if not reusable and not channel_minmax:  # the range needs the spec's own observer
            self._extra = get_observer(spec, name="range_observer")
        self._input_dtype = None
        self._batch_shape = None

    # Building ---------------------------------------------------------------
    def _state_shapes(self, input_shape):
        """`{name: shape}` of the state variables for inputs of `input_shape` (nothing is created)."""
        shapes = {"scalars": (len(SCALARS),)}
        if self._with_hist:
            shapes["hist"] = (self.num_bins,)
        ndim = len(input_shape)
        axis = self.channel_axis % ndim if ndim else 0
        if self._with_channels and ndim >= 2 and axis != 0 and input_shape[axis] is not None:
            shapes["channel_min"] = shapes["channel_max"] = (int(input_shape[axis]),)
        return shapes

    def planned_bytes(self, input_shape):
        """Bytes of state the collector will hold once built for `input_shape` (before building it)."""
        total = 4 * sum(math.prod(shape) for shape in self._state_shapes(tuple(input_shape)).values())
        if self._extra is not None:
            with graph_lib.declared_only():  # the probe's variables are declared, never allocated
                probe = get_observer(self.spec, name="range_observer_probe")
                probe.build(tuple(input_shape))
                total += probe.state_bytes
        return total

    def build(self, input_shape):
        # The state is a few packed variables (not one per statistic): creating a variable costs
        # about a millisecond and every one is read and written in the step, and a model has
        # hundreds of collectors.
        input_shape = tuple(input_shape)
        self._batch_shape = (None,) + input_shape[1:]
        ndim = len(input_shape)
        self._channel_index = self.channel_axis % ndim if ndim else 0
        self.state_shape = ()
        self.num_slots = 1
        for name, shape in self._state_shapes(input_shape).items():
            var = self.add_weight(shape=shape, initializer=keras.initializers.Constant(initial(name, shape)),
                                  dtype="float32", trainable=False, autocast=False,
                                  aggregation="only_first_replica", name=name)
            setattr(self, f"_{name}_var", var)
        if self._extra is not None:
            self._extra.build(input_shape)
        self.built = True

    # The packed state --------------------------------------------------------
    def state_variables(self):
        """The state variables this collector updates, by name (those of `step_key.state_names`)."""
        return {name: var for name in VARIABLES if (var := getattr(self, f"_{name}_var")) is not None}

    def _with_channel_state(self):
        """Whether the per-channel extremes are kept (the channel axis' size was known at build)."""
        return self._channel_min_var is not None

    @property
    def step_key(self):
        """The `keras_quant.calibration.step.StepKey` of this (built) collector: what its step keeps."""
        channel = self._channel_index if self._with_channel_state() else None
        # The rank is part of the key: a relaxed trace keeps the rank, only dimensions become None.
        return StepKey(len(self._batch_shape), self.num_bins, self._with_moments, self._with_zeros,
                       self._with_hist, channel, self.sample_size)

    # Graph-side update ------------------------------------------------------
    def call(self, inputs, sample_mask=None):
        """Fold `inputs` into the statistics and return them unchanged.

        The update itself is `keras_quant.calibration.step.step(key, state, x,
        sample_mask) -> new state`, shared by every collector with the same
        `step_key`: on TensorFlow it is one `tf.function` (batch, spatial and
        channel dimensions relaxed), so a model's collectors are traced a
        handful of times, not once per layer, shape and call.

        Args:
            inputs: The tensor (batch first).
            sample_mask: Optional bool tensor `(batch,)`; samples where it is
                False are left out of every statistic.
        """
        self._input_dtype = keras.backend.standardize_dtype(inputs.dtype)
        variables = self.state_variables()
        x = ops.cast(inputs, "float32")
        masked = sample_mask is not None
        args = (x,) if sample_mask is None else (x, ops.cast(sample_mask, "bool"))
        handles = step_lib.resource_handles(variables)
        if handles is not None:  # TensorFlow: the reads and writes inside the shared function too
            step_lib.update_function(self.step_key, masked)(handles, *args)
        else:
            new = step_lib.step_function(self.step_key, masked)({name: _read(v) for name, v in variables.items()},
                                                                *args)
            for name, var in variables.items():
                var.assign(new[name])  # `step` returns each value in its variable's shape
        if self._extra is not None:
            self._extra.call(inputs, sample_mask=sample_mask)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape  # a pass-through: no symbolic run of the update

    # Eager API -------------------------------------------------------------
    def reset(self):
        """Restore the empty state (of the range observer too). A collector not yet built is left as is."""
        for name, var in self.state_variables().items():
            var.assign(initial(name, var.shape))
        if self._extra is not None and self._extra.built:
            self._extra.reset()

    @property
    def state_bytes(self):
        """Bytes held by the collector's variables (its range observer's included)."""
        return observer_state_bytes(self)

    def compute_range(self, spec=None):
        """The range for `spec` (default the collector's), see `LayerStatistics.compute_range`."""
        return self.to_statistics().compute_range(self.spec if spec is None else spec)

    def compute_qparams(self, spec=None):
        """`(scale, zero_point)` for `spec` (default the collector's), see `LayerStatistics.qparams`."""
        return self.to_statistics().qparams(self.spec if spec is None else spec)

    def to_statistics(self, name=None):
        """The statistics seen so far, as a `LayerStatistics` (numpy; call outside the graph).

        Args:
            name: The name to record; default the layer's name.

        Returns:
            A `LayerStatistics`. With nothing seen (`count == 0`, or never
            called), its statistics are None and its `qparams` raises
            `NoDataError`; this method does not raise.
        """
        name = self.name if name is None else str(name)
        base = dict(name=name, spec=self.spec, shape=self._batch_shape, dtype=self._input_dtype,
                    channel_axis=self.channel_axis)
        if not self.built:
            return LayerStatistics(**base)
        values = dict(zip(SCALARS, np.asarray(ops.convert_to_numpy(self._scalars_var), np.float64).tolist()))
        count = step_lib.counter(values, "count")
        base.update(num_samples=step_lib.counter(values, "samples"),
                    non_finite_count=step_lib.counter(values, "non_finite_count"))
        if count == 0:
            return LayerStatistics(count=0, **base)
        lo, hi = values["min_val"], values["max_val"]
        mean = std = skew = kurt = None
        if self._with_moments:
            mean, std, skew, kurt = moments_to_stats(count, values["mean"], values["m2"], values["m3"], values["m4"])
        hist = edges = outliers = None
        if self._with_hist:
            hist = np.asarray(ops.convert_to_numpy(self._hist_var), np.float64).copy()
            edges = np.linspace(lo, hi, self.num_bins + 1)
            if mean is not None:
                outliers = histogram_outliers(hist, edges, mean, std)
        channel_min = channel_max = None
        if self._with_channel_state():
            channel_min = np.asarray(ops.convert_to_numpy(self._channel_min_var), np.float32).copy()
            channel_max = np.asarray(ops.convert_to_numpy(self._channel_max_var), np.float32).copy()
        stats = LayerStatistics(
            count=count, min=lo, max=hi, mean=mean, std=std, skewness=skew, kurtosis=kurt,
            sparsity=values["zeros"] / count if self._with_zeros else None, channel_min=channel_min,
            channel_max=channel_max, histogram=hist, bin_edges=edges, outliers=outliers, **base,
        )
        if self._extra is not None:
            rmin, rmax = self._extra.compute_range()
            if np.ndim(rmin) == 0:
                rmin, rmax = float(rmin), float(rmax)
            stats = dataclasses.replace(stats, range_min=rmin, range_max=rmax)
        return stats.with_spec_range()

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config.update({"spec": self.spec.get_config(), "channel_axis": self.channel_axis, "num_bins": self.num_bins,
                       "statistics": self.statistics, "sample_size": self.sample_size})
        return config
