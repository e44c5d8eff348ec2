"""Activation statistics in the graph: the `LayerCollector` layer and its moment merge.

A `LayerCollector` is an observer (`keras_quant.observers.Observer`) that
watches one tensor and keeps, in a few fixed-size float32 variables,

- per tensor (one packed `scalars` vector): count, mean and the central
  moments `M2`, `M3`, `M4` (merged exactly across batches, below), the
  number of exact zeros, the number of samples, the non-finite count and
  the running min / max;
- a per-tensor histogram over the running `[min, max]` (`hist`, rebinned as
  the range widens, with the kernels of `keras_quant.observers.histogram`),
  used for percentiles, outlier counts and the `percentile` / `mse` / `kl`
  searches;
- per channel (along `channel_axis`): `channel_min`, `channel_max`;
- only when the spec's range cannot be read from the above: the spec's own
  observer (`moving_average`, or a per-channel non-`minmax` spec).

Batch moments are computed two-pass within the batch, then merged with the
running ones by the pairwise formulas of Chan et al. (1979) and Pébay (2008):
with `n = n_a + n_b`, `d = mean_b - mean_a`, `r_a = n_a / n`, `r_b = n_b / n`,

    mean = mean_a + d r_b
    M2 = M2_a + M2_b + d^2 n_a r_b
    M3 = M3_a + M3_b + d^3 n_a r_b (r_a - r_b) + 3 d (r_a M2_b - r_b M2_a)
    M4 = M4_a + M4_b + d^4 n_a r_b (r_a^2 - r_a r_b + r_b^2)
         + 6 d^2 (r_a^2 M2_b + r_b^2 M2_a) + 4 d (r_a M3_b - r_b M3_a)

(written with ratios so nothing overflows float32), so the result does not
depend on how the data was split. `merge_moments` is that formula as a pure
function; `batch_moments` the numpy two-pass batch moments.

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

from keras_quant import graph as graph_lib
from keras_quant import observers
from keras_quant import ops as kq_ops
from keras_quant.config import QuantSpec
from keras_quant.errors import ConfigError
from keras_quant.observers.base import Observer
from keras_quant.errors import NoDataError
from keras_quant.observers.histogram import bin_counts, rebin_counts
from keras_quant.calibration.result import LayerStatistics, histogram_outliers

__all__ = ["LayerCollector", "merge_moments", "batch_moments", "moments_to_stats"]

_HISTOGRAM_OBSERVERS = ("percentile", "mse", "kl", "auto")

# The per-tensor statistics, packed in one `(len(_SCALARS),)` variable, and their empty values.
_SCALARS = ("non_finite_count", "samples", "count", "min_val", "max_val", "mean", "m2", "m3", "m4", "zeros")
_SCALAR_INITIAL = dict.fromkeys(_SCALARS, 0.0) | {"min_val": float("inf"), "max_val": float("-inf")}
_IS_MIN = np.array([k == "min_val" for k in _SCALARS])
_IS_MAX = np.array([k == "max_val" for k in _SCALARS])
_VARIABLES = ("scalars", "hist", "channel_min", "channel_max")
_FILLS = {"hist": 0.0, "channel_min": float("inf"), "channel_max": float("-inf")}


def _initial(name, shape):
    """The empty value of the state variable `name` (numpy float32)."""
    if name == "scalars":
        return np.asarray([_SCALAR_INITIAL[k] for k in _SCALARS], np.float32)
    return np.full(tuple(shape), _FILLS[name], np.float32)


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


def merge_moments(a, b, maximum=np.maximum):
    """Merge the moments of two disjoint sets exactly (Chan / Pébay pairwise update).

    Works on Python floats, numpy arrays or backend tensors (pass
    `maximum=keras.ops.maximum` for tensors). Either side may be empty
    (`n = 0`).

    Args:
        a: `(n, mean, M2, M3, M4)` of the first set.
        b: The same for the second set.
        maximum: The elementwise maximum to guard the division by `n`.

    Returns:
        `(n, mean, M2, M3, M4)` of the union.

    Example:

    >>> x = np.arange(10.0)
    >>> np.allclose(merge_moments(batch_moments(x[:3]), batch_moments(x[3:])), batch_moments(x))
    True
    """
    n_a, mean_a, m2_a, m3_a, m4_a = a
    n_b, mean_b, m2_b, m3_b, m4_b = b
    n = n_a + n_b
    safe_n = maximum(n, 1.0)
    r_a, r_b = n_a / safe_n, n_b / safe_n
    d = mean_b - mean_a
    d2 = d * d
    cross = n_a * r_b  # n_a n_b / n
    mean = mean_a + d * r_b
    m2 = m2_a + m2_b + d2 * cross
    m3 = m3_a + m3_b + d2 * d * cross * (r_a - r_b) + 3.0 * d * (r_a * m2_b - r_b * m2_a)
    m4 = (
        m4_a + m4_b
        + d2 * d2 * cross * (r_a * r_a - r_a * r_b + r_b * r_b)
        + 6.0 * d2 * (r_a * r_a * m2_b + r_b * r_b * m2_a)
        + 4.0 * d * (r_a * m3_b - r_b * m3_a)
    )
    return n, mean, m2, m3, m4


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


# One update function per collector kind (`LayerCollector._step_key`), shared by every collector.
_SHARED_STEPS = {}


def _shared_step(collector, masked=False):
    """The collector's `_pure_step`, as one shared `tf.function` per kind on TensorFlow.

    Collectors of one kind run the same computation on their own state, so
    the function is traced once, for every batch size, spatial size and
    channel count (its signature leaves them unknown), and reused by every
    collector, callback and predict call, instead of every collector adding
    its own copy of the ops to every trace of a step. Only static settings
    of the collector it is first made for are read.
    """
    key = collector._step_key() + (masked,)
    fn = _SHARED_STEPS.get(key)
    if fn is None:
        fn = collector._pure_step
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            state = {name: tf.TensorSpec((None,) * len(v.shape), "float32") for name, v in collector._state().items()}
            signature = [state, tf.TensorSpec((None,) * len(collector._batch_shape), "float32")]
            if masked:
                signature.append(tf.TensorSpec((None,), "bool"))
            # Not inlined: the runtime instantiates (and optimises) the body once, not again inside
            # every step graph that calls it, which halves the first run of a new step function.
            fn = tf.function(fn, input_signature=signature, autograph=False,
                             experimental_attributes={"_noinline": True})
        _SHARED_STEPS[key] = fn
    return fn


def _resource_handles(variables):
    """`{name: resource handle}` of TensorFlow state variables for `_shared_update`, or None: another
    backend, a distribution strategy (its variables aggregate; they are assigned through their own API),
    or a variable not backed by a plain resource variable."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return None
    handles = {}
    for name, var in variables.items():
        value = getattr(var, "value", None)
        if type(value).__name__ != "ResourceVariable":
            return None
        handles[name] = value.handle
    return handles


def _shared_update(collector, masked=False):
    """TensorFlow: the collector's whole update (read the state, `_pure_step`, write it) as one shared
    stateful `tf.function` of the state variables' resource handles.

    Like `_shared_step` it is traced once per kind; in a step graph each
    collector is then one call, without the read, write and identity ops that
    reading and assigning the variables outside added per collector (a
    millisecond each to trace; a model has a hundred collectors).

    Unmasked and without per-channel state, the update reads its tensor as
    `(batch, -1)` (the same values): one function serves every rank, traced
    once per process instead of once per rank.
    """
    names = tuple(collector._state())
    rank_free = not masked and not collector._with_channel_state()
    key = ("update",) + collector._step_key(rank_free) + (masked, names)
    fn = _SHARED_STEPS.get(key)
    if fn is None:
        import tensorflow as tf

        step = collector._pure_step

        def update(handles, x, sample_mask=None):
            if rank_free:
                x = tf.reshape(x, tf.stack([tf.shape(x)[0], -1]))
            state = {}
            for name in names:
                value = tf.raw_ops.ReadVariableOp(resource=handles[name], dtype=tf.float32)
                value.set_shape([None])  # every state variable is a vector
                state[name] = value
            new = step(state, x) if sample_mask is None else step(state, x, sample_mask)
            for name in names:
                tf.raw_ops.AssignVariableOp(resource=handles[name], value=new[name])

        signature = [{name: tf.TensorSpec((), tf.resource) for name in names},
                     tf.TensorSpec(None if rank_free else (None,) * len(collector._batch_shape), "float32")]
        if masked:
            signature.append(tf.TensorSpec((None,), "bool"))
        fn = _SHARED_STEPS[key] = tf.function(update, input_signature=signature, autograph=False,
                                              experimental_attributes={"_noinline": True})
    return fn


@keras.saving.register_keras_serializable(package="keras_quant")
class LayerCollector(Observer):
    """Pass-through layer that gathers the statistics of one tensor in the graph.

    Runs inside compiled steps (`tf.function`, `jit_compile=True`, JAX) with
    fixed memory; `to_statistics()` reads the state into a `LayerStatistics`.

    A batch whose sum is finite (the usual case) takes a fast path: plain
    reductions and an unweighted histogram, with no masking pass. A batch
    with NaN/Inf, or a `sample_mask`, takes the masked path.

    Args:
        spec: The `kq.QuantSpec` of this activation (None: `QuantSpec(bits=8)`);
            its `observer` picks the range stored in the statistics.
        channel_axis: Axis of the per-channel min / max (skipped when the
            axis' size is unknown or the tensor is 1-D).
        num_bins: Histogram bins (at least 8); a histogram-based spec's
            `observer_options["num_bins"]` overrides it.
        statistics: `"full"` (moments, sparsity, per-channel extremes and a
            histogram for percentiles and outliers) or `"range"` (only what
            the spec's observer needs: min/max, plus the histogram for
            `percentile` / `mse` / `kl` / `auto`, the moments for `mean_std`): cheaper
            in the step, with fewer fields in the statistics.
        name: Layer name.
        **kwargs: Other Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument.

    Example:

    >>> c = LayerCollector(kq.QuantSpec(bits=8, observer="percentile"))   # doctest: +SKIP
    >>> _ = c(x); _ = c(x2, sample_mask=keep)                              # doctest: +SKIP
    >>> c.to_statistics().percentile(99.0)                                 # doctest: +SKIP
    """

    def __init__(self, spec=None, channel_axis=-1, num_bins=2048, statistics="full", name=None, **kwargs):
        super().__init__(granularity="per_tensor", name=name, **kwargs)
        if spec is None:
            spec = QuantSpec(bits=8)
        elif isinstance(spec, dict):
            spec = QuantSpec.from_config(spec)
        elif not isinstance(spec, QuantSpec):
            raise ConfigError("spec", spec, "spec must be a kq.QuantSpec, its config dict or None", layer=name)
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise ConfigError("channel_axis", channel_axis, "channel_axis must be an integer", layer=name)
        if statistics not in STATISTICS:
            raise ConfigError("statistics", statistics, f"statistics must be one of {STATISTICS}", layer=name)
        self.spec = spec
        self.channel_axis = int(channel_axis)
        self.statistics = statistics
        if spec.observer in _HISTOGRAM_OBSERVERS and "num_bins" in spec.options:
            num_bins = spec.options["num_bins"]
        self.num_bins = num_bins
        full = statistics == "full"
        per_tensor = spec.granularity == "per_tensor"
        self._with_moments = full or (per_tensor and spec.observer == "mean_std")
        self._with_zeros = full
        self._with_channels = full or (spec.granularity == "per_channel" and spec.observer == "minmax")
        self._with_hist = full or (per_tensor and spec.observer in _HISTOGRAM_OBSERVERS)
        if self._with_hist and (isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer))
                                or num_bins < 8):
            raise ConfigError("num_bins", num_bins, "num_bins must be an integer of at least 8", layer=name)
        self._scalars_var = self._hist_var = self._channel_min_var = self._channel_max_var = None
        self._extra = None
        reusable = per_tensor and spec.observer != "moving_average"
        if not reusable and not (spec.granularity == "per_channel" and spec.observer == "minmax"):
            self._extra = observers.get(spec, name="range_observer")
        self._input_dtype = None
        self._batch_shape = None

    # Building ---------------------------------------------------------------
    def _state_shapes(self, input_shape):
        """`{name: shape}` of the state variables for inputs of `input_shape` (nothing is created)."""
        shapes = {"scalars": (len(_SCALARS),)}
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
                probe = observers.get(self.spec, name="range_observer_probe")
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
            var = self.add_weight(shape=shape, initializer=keras.initializers.Constant(_initial(name, shape)),
                                  dtype="float32", trainable=False, autocast=False,
                                  aggregation="only_first_replica", name=name)
            setattr(self, f"_{name}_var", var)
        if self._extra is not None:
            self._extra.build(input_shape)
        self.built = True

    # The packed state --------------------------------------------------------
    def _state(self):
        """The state variables this collector updates, by name."""
        return {name: var for name in _VARIABLES if (var := getattr(self, f"_{name}_var")) is not None}

    def _with_channel_state(self):
        """Whether the per-channel extremes are kept (the channel axis' size was known at build)."""
        return self._channel_min_var is not None

    def _step_key(self, rank_free=False):
        channel = self._channel_index if self._with_channel_state() else None
        # The rank is part of the key (a relaxed trace keeps the rank, only dimensions become None), unless
        # the function reads its tensor rank-free (`_shared_update`).
        rank = None if rank_free else len(self._batch_shape)
        return (rank, self.num_bins, self._with_moments, self._with_zeros, self._with_hist, channel)

    # Graph-side update ------------------------------------------------------
    def _channel_rows(self, x):
        """`x` as `(N, C)` with the channel axis last (a free reshape when it already is)."""
        if self._channel_index != len(x.shape) - 1:
            x = ops.moveaxis(x, self._channel_index, -1)
        # The channel size is read from the tensor, not fixed: one shared trace serves every width.
        return ops.reshape(x, (-1, ops.shape(x)[-1]))

    def _summary(self, rows, chan, valid, valid_chan, total):
        """The batch's `(n, mean, M2, M3, M4, zeros, min, max, channel_min, channel_max)`.

        `valid=None`: every value counts (fast path; `total` is `sum(rows)`).
        Otherwise `valid` (and `valid_chan`) mask the values that count.
        """
        zero = ops.zeros((), "float32")
        if valid is None:
            n = ops.cast(ops.shape(rows)[0], "float32")
            x = rows
            lo, hi = ops.min(rows), ops.max(rows)
        else:
            w = ops.cast(valid, "float32")
            n = ops.sum(w)
            x = ops.where(valid, rows, 0.0)
            total = ops.sum(x)
            lo = ops.min(ops.where(valid, rows, float("inf")))
            hi = ops.max(ops.where(valid, rows, float("-inf")))
        moments = (n, zero, zero, zero, zero)
        if self._with_moments:
            mean = total / ops.maximum(n, 1.0)
            d = x - mean if valid is None else (x - mean) * w
            d2 = d * d
            moments = (n, mean, ops.sum(d2), ops.sum(d2 * d), ops.sum(d2 * d2))
        zeros = zero
        if self._with_zeros:
            is_zero = ops.equal(rows, 0.0) if valid is None else ops.logical_and(ops.equal(rows, 0.0), valid)
            zeros = ops.sum(ops.cast(is_zero, "float32"))
        channel = (zero, zero)
        if chan is not None:
            if valid_chan is None:
                channel = (ops.min(chan, axis=0), ops.max(chan, axis=0))
            else:
                channel = (ops.min(ops.where(valid_chan, chan, float("inf")), axis=0),
                           ops.max(ops.where(valid_chan, chan, float("-inf")), axis=0))
        return moments + (zeros, lo, hi) + channel

    def call(self, inputs, sample_mask=None):
        """Fold `inputs` into the statistics and return them unchanged.

        The update itself is `_pure_step(state, x, sample_mask) -> new state`,
        shared by every collector of the same kind: on TensorFlow it is one
        `tf.function` (batch, spatial and channel dimensions relaxed), so a
        model's collectors are traced a handful of times, not once per layer,
        shape and call.

        Args:
            inputs: The tensor (batch first).
            sample_mask: Optional bool tensor `(batch,)`; samples where it is
                False are left out of every statistic.
        """
        self._input_dtype = keras.backend.standardize_dtype(inputs.dtype)
        variables = self._state()
        x = ops.cast(inputs, "float32")
        handles = _resource_handles(variables)
        if handles is not None:  # TensorFlow: the reads and writes inside the shared function too
            args = (handles, x) if sample_mask is None else (handles, x, ops.cast(sample_mask, "bool"))
            _shared_update(self, masked=sample_mask is not None)(*args)
            if self._extra is not None:
                self._extra.call(inputs, sample_mask=sample_mask)
            return inputs
        state = {name: _read(v) for name, v in variables.items()}
        if sample_mask is None:
            new = _shared_step(self)(state, x)
        else:
            new = _shared_step(self, masked=True)(state, x, ops.cast(sample_mask, "bool"))
        for name, var in variables.items():
            var.assign(new[name])  # `_pure_step` returns each value in its variable's shape
        if self._extra is not None:
            self._extra.call(inputs, sample_mask=sample_mask)
        return inputs

    def _pure_step(self, state, x, sample_mask=None):
        """The new state after folding `x` in: only `self`'s static settings are read."""
        if sample_mask is None and not (self._with_moments or self._with_zeros or self._with_hist
                                        or self._with_channel_state()):
            return self._range_step(state, x)
        rows = ops.reshape(x, (-1,))
        chan = self._channel_rows(x) if self._with_channel_state() else None
        zero = ops.zeros((), "float32")
        if sample_mask is None:
            total = ops.sum(rows)
            fast = ops.isfinite(total)  # an overflowing sum just takes the exact masked path

            def masked():
                finite = ops.isfinite(x)
                valid_chan = self._channel_rows(finite) if chan is not None else None
                bad = ops.sum(ops.cast(ops.logical_not(finite), "float32"))
                return self._summary(rows, chan, ops.reshape(finite, (-1,)), valid_chan, None) + (bad,)

            summary = ops.cond(fast, lambda: self._summary(rows, chan, None, None, total) + (zero,), masked)
            seen = ops.cast(ops.shape(x)[0], "float32")
        else:
            keep = self._expand_mask(sample_mask, x) > 0.5
            finite = ops.isfinite(x)
            valid = ops.logical_and(finite, keep)
            bad = ops.sum(ops.cast(ops.logical_and(keep, ops.logical_not(finite)), "float32"))
            valid_chan = self._channel_rows(valid) if chan is not None else None
            valid_rows = ops.reshape(valid, (-1,))
            summary = self._summary(rows, chan, valid_rows, valid_chan, None) + (bad,)
            seen = ops.sum(ops.cast(sample_mask, "float32"))
            fast = None
        n_b, mean_b, m2_b, m3_b, m4_b, zeros_b, lo_b, hi_b, clo_b, chi_b, bad_b = summary

        old = dict(zip(_SCALARS, ops.unstack(state["scalars"], num=len(_SCALARS))))
        new = dict(old)
        new["non_finite_count"] = old["non_finite_count"] + bad_b
        new["samples"] = old["samples"] + seen
        if self._with_moments:
            names = ("count", "mean", "m2", "m3", "m4")
            merged = merge_moments(tuple(old[k] for k in names), (n_b, mean_b, m2_b, m3_b, m4_b), maximum=ops.maximum)
            new.update(zip(names, merged))
        else:
            new["count"] = old["count"] + n_b
        if self._with_zeros:
            new["zeros"] = old["zeros"] + zeros_b
        old_lo, old_hi = old["min_val"], old["max_val"]
        has_batch = lo_b <= hi_b
        new["min_val"] = ops.where(has_batch, ops.minimum(old_lo, lo_b), old_lo)
        new["max_val"] = ops.where(has_batch, ops.maximum(old_hi, hi_b), old_hi)
        out = {"scalars": ops.stack([new[k] for k in _SCALARS])}
        if self._with_hist:
            # Masked: the mask already computed; unmasked: the fast path, or (NaN/Inf) `isfinite` again.
            valid_col = None if sample_mask is None else ops.reshape(valid_rows, (-1, 1))
            out["hist"] = self._histogram_step(state["hist"], rows, x, valid_col, fast, old_lo, old_hi,
                                               new["min_val"], new["max_val"])
        if chan is not None:
            out["channel_min"] = ops.minimum(state["channel_min"], clo_b)
            out["channel_max"] = ops.maximum(state["channel_max"], chi_b)
        return out

    def _range_step(self, state, x):
        """`_pure_step` of a collector that keeps only the range and counts (unmasked): the same new
        state, in a few vector ops.

        It is the step of most collectors of `statistics="range"`, and a step
        function is instantiated again at every place a model calls it, so its
        size is paid once per observed tensor on a calibration's first batch.
        """
        rows = ops.reshape(x, (-1,))
        inf = float("inf")

        def masked():
            finite = ops.isfinite(rows)
            return (ops.min(ops.where(finite, rows, inf)), ops.max(ops.where(finite, rows, -inf)),
                    ops.sum(ops.cast(ops.logical_not(finite), "float32")))

        lo, hi, bad = ops.cond(ops.isfinite(ops.sum(rows)),
                               lambda: (ops.min(rows), ops.max(rows), ops.zeros((), "float32")), masked)
        # Counters add (non-finite values, samples, finite values); the extremes take min / max with
        # `(lo, hi)`, which are (inf, -inf), so change nothing, when no value was finite.
        size = ops.cast(ops.size(rows), "float32")
        seen = ops.cast(ops.shape(x)[0], "float32")
        counts = ops.concatenate([ops.stack([bad, seen, size - bad]), ops.zeros((len(_SCALARS) - 3,), "float32")])
        new = state["scalars"] + counts
        new = ops.minimum(new, ops.where(_IS_MIN, lo, inf))
        return {"scalars": ops.maximum(new, ops.where(_IS_MAX, hi, -inf))}

    def _histogram_step(self, hist, rows, x, valid, fast, old_lo, old_hi, new_lo, new_hi):
        """The histogram widened to `[new_lo, new_hi]` with the batch binned in.

        `valid` is the `(N, 1)` mask of a masked batch (then `fast` is None);
        otherwise `fast` says whether the batch is all finite.
        """
        bins = self.num_bins
        lo1, hi1 = ops.reshape(new_lo, (1,)), ops.reshape(new_hi, (1,))
        hist = rebin_counts(ops.reshape(hist, (1, bins)), ops.reshape(old_lo, (1,)), ops.reshape(old_hi, (1,)),
                            lo1, hi1, bins, 1)
        col = ops.reshape(rows, (-1, 1))
        if fast is None:
            counts = bin_counts(col, valid, lo1, hi1, bins, 1)
        else:
            counts = ops.cond(fast, lambda: bin_counts(col, None, lo1, hi1, bins, 1),
                              lambda: bin_counts(col, ops.reshape(ops.isfinite(x), (-1, 1)), lo1, hi1, bins, 1))
        return ops.reshape(hist + counts, (bins,))

    def _update_state(self, rows, finite, all_finite):
        """Not used: `call` replaces the base class's update flow, since the
        per-channel extremes need the tensor before it is flattened."""

    def _build_state(self, shape):
        """Not used: `build` creates the packed state."""

    # Eager API -------------------------------------------------------------
    def reset(self):
        """Restore the empty state (of the range observer too). A collector not yet built is left as is."""
        for name, var in self._state().items():
            var.assign(_initial(name, var.shape))
        if self._extra is not None and self._extra.built:
            self._extra.reset()

    def _check_state(self):
        if not self.built:
            raise NoDataError(self.name, reason="the collector was never called")

    def _range(self, spec=None):
        stats = self.to_statistics()
        stats._require_data()
        lo, hi = stats.compute_range(self.spec if spec is None else spec)
        return np.reshape(lo, -1), np.reshape(hi, -1)

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
        values = dict(zip(_SCALARS, np.asarray(ops.convert_to_numpy(self._scalars_var), np.float64).tolist()))
        count = int(round(values["count"]))
        base.update(num_samples=int(round(values["samples"])), non_finite_count=int(round(values["non_finite_count"])))
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
        rmin, rmax = stats.compute_range(self.spec)
        scale, zero_point = kq_ops.numpy_qparams(np.asarray(rmin, np.float32), np.asarray(rmax, np.float32), self.spec)
        if np.ndim(rmin) == 0:
            rmin, rmax, scale, zero_point = float(rmin), float(rmax), float(scale), int(zero_point)
        return dataclasses.replace(stats, range_min=rmin, range_max=rmax, scale=scale, zero_point=zero_point)

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config.update({"spec": self.spec.get_config(), "channel_axis": self.channel_axis, "num_bins": self.num_bins,
                       "statistics": self.statistics})
        return config
