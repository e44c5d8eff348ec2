"""The `LayerCollector`'s update step, as pure functions of (static key, state, batch).

A collector (`keras_quant.calibration.stats.LayerCollector`) keeps a few
packed float32 state vectors (`VARIABLES`): `scalars` (the per-tensor
statistics `SCALARS`), `hist` (a histogram over the running `[min, max]`) and
`channel_min` / `channel_max`. What it keeps is fixed by a `StepKey`, a frozen
value of static facts; `step(key, state, x, sample_mask)` returns the new
state and reads nothing else, so collectors of one kind share it:

- `step_function(key, masked)`: on TensorFlow one `tf.function` per key,
  traced once for every batch, spatial and channel size (the signature
  leaves them unknown) and reused by every collector, callback and predict
  call, instead of each collector adding its own copy of the ops to every
  trace of a step (elsewhere `step` itself);
- `update_function(key, masked)` (TensorFlow): read the state, `step`, write
  it, as one stateful `tf.function` of the variables' resource handles (see
  `resource_handles`).

Both are cached on the key alone (`functools.lru_cache`): no collector is
captured. The histogram kernels are `keras_quant.ops.histogram`'s.

Batch moments are computed two-pass within the batch and merged with the
running ones by `merge_moments` (Chan et al. 1979, Pébay 2008; see
`keras_quant.calibration.stats`).

What is exact and what is sampled: the counts (values, samples, non-finite
values), the sum (hence the mean), the min / max and the per-channel min /
max read every value of every batch. The central moments `M2`..`M4`, the
zero count and the histogram counts read every value of a batch of at most
`key.sample` values; of a larger batch they read `key.sample` of its values,
one from each of `key.sample` equal runs of the flattened batch (run `i`
holds the positions `[floor(i n / m), floor((i + 1) n / m))`; the value
taken is at offset `(7919 i) mod width` in it: deterministic, and not
aligned with a channel or row period), and are scaled by `n / m` (values
over values read), so they estimate the batch's sums about its exact
mean. `key.sample=None` reads every value for everything.

Example:

>>> key = StepKey(rank=2, num_bins=64, moments=True, zeros=True, hist=True, channel=None, sample=None)
>>> state = {"scalars": initial("scalars", None), "hist": initial("hist", (64,))}
>>> new = step(key, state, np.ones((4, 3), "float32"))
"""

import dataclasses
import functools
from typing import Optional

import keras
import numpy as np
from keras import ops

from keras_quant.observers.base import expand_mask
from keras_quant.ops.histogram import bin_counts, rebin_counts

__all__ = ["StepKey", "SAMPLE", "COUNT_UNIT", "counter", "sample_positions", "step", "step_function", "update_function", "resource_handles", "merge_moments",
           "initial", "SCALARS", "VARIABLES"]

# The per-tensor statistics, packed in one `(len(SCALARS),)` variable, and their empty values.
SCALARS = ("non_finite_count", "samples", "count", "min_val", "max_val", "mean", "m2", "m3", "m4", "zeros",
           "non_finite_high", "samples_high", "count_high")
# The counters are exact at any size: each is two float32 parts, `low + high * COUNT_UNIT` with `low <
# COUNT_UNIT` (a float32 holds every integer only up to 2**24, which a calibration passes in a few batches;
# this way up to 2**46). A batch's counts are int32; `counter(values, name)` reads one back.
COUNT_UNIT = 2 ** 22
_COUNTERS = (("non_finite_count", "non_finite_high"), ("samples", "samples_high"), ("count", "count_high"))
_SCALAR_INITIAL = dict.fromkeys(SCALARS, 0.0) | {"min_val": float("inf"), "max_val": float("-inf")}
VARIABLES = ("scalars", "hist", "channel_min", "channel_max")
# The values of a batch that its moments, zero count and histogram read (`StepKey.sample`'s default). 16384:
# full statistics at about 2x plain predict (65536 cost 2.6x on benchmarks/bench_calibration.py's CNN at
# batch 200); a calibration of a few dozen batches still bins hundreds of thousands of values per tensor.
SAMPLE = 16384
_STRIDE_HASH = 7919  # a prime: the offset inside each run, (7919 i) mod width, in int32 for i < 2**18
_FILLS = {"hist": 0.0, "channel_min": float("inf"), "channel_max": float("-inf")}


def counter(values, name):
    """The exact value of the counter `name` (`"count"`, `"samples"`, `"non_finite_count"`) in `values`,
    a `{scalar name: number}` of a collector's state, as a Python int."""
    high = dict(_COUNTERS)[name]
    return int(round(values[name])) + int(round(values[high])) * COUNT_UNIT


def _add_count(low, high, n):
    """`(low, high)` with the int32 count `n` added, exactly (see `COUNT_UNIT`)."""
    n = ops.cast(n, "int32")
    n_high = n // COUNT_UNIT
    s = low + ops.cast(n - n_high * COUNT_UNIT, "float32")  # below 2**23: exact
    carry = ops.floor(s / COUNT_UNIT)
    return s - carry * COUNT_UNIT, high + ops.cast(n_high, "float32") + carry


def _add_counts(old, counts):
    """A copy of the scalars `old` with the int32 batch `counts` (`{counter name: n}`) added to its counters."""
    new = dict(old)
    for name, high in _COUNTERS:
        new[name], new[high] = _add_count(old[name], old[high], counts[name])
    return new


def _total(old, name):
    """A counter as one float32 (for the moments' weights; not exact past 2**24)."""
    return old[name] + old[dict(_COUNTERS)[name]] * float(COUNT_UNIT)


def initial(name, shape):
    """The empty value of the state variable `name` (numpy float32)."""
    if name == "scalars":
        return np.asarray([_SCALAR_INITIAL[k] for k in SCALARS], np.float32)
    return np.full(tuple(shape), _FILLS[name], np.float32)


@dataclasses.dataclass(frozen=True)
class StepKey:
    """The static facts of a collector's step: equal keys, one shared (compiled) step.

    Attributes:
        rank: The batch's rank (None: the update reads it rank-free as `(batch, -1)`).
        num_bins: Histogram bins.
        moments: Whether the moments are kept.
        zeros: Whether exact zeros are counted.
        hist: Whether the histogram is kept.
        channel: The channel axis (an index) of the per-channel extremes, or None.
        sample: The most values of a batch the moments, zero count and histogram
            read (a larger batch: that many, spread over it; see the module
            docstring), or None: every value.
    """

    rank: Optional[int]
    num_bins: int
    moments: bool
    zeros: bool
    hist: bool
    channel: Optional[int]
    sample: Optional[int] = None

    @property
    def state_names(self):
        """The names of the state vectors, in `VARIABLES` order."""
        names = ("scalars",) + (("hist",) if self.hist else ())
        return names + (("channel_min", "channel_max") if self.channel is not None else ())


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

    >>> from keras_quant.calibration.stats import batch_moments
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




def resource_handles(variables):
    """`{name: resource handle}` of TensorFlow state variables for `update_function`, or None: another
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




def _channel_rows(key, x):
    """`x` as `(N, C)` with the channel axis last (a free reshape when it already is)."""
    if key.channel != len(x.shape) - 1:
        x = ops.moveaxis(x, key.channel, -1)
    # The channel size is read from the tensor, not fixed: one shared trace serves every width.
    return ops.reshape(x, (-1, ops.shape(x)[-1]))

def sample_positions(n, m):
    """int32 positions of `min(n, m)` values spread over `[0, n)`: one in each of that many equal runs.

    Run `i` is `[floor(i n / m), floor((i + 1) n / m))`; its value is taken at
    offset `(7919 i) mod width`, so the positions follow no fixed stride that
    could line up with a channel or row period. With `n <= m` every position,
    in order. Deterministic; `n` may be a tensor (no branch in the graph).

    Example:

    >>> sorted(set(np.asarray(sample_positions(100, 10)) // 10)) == list(range(10))
    True
    """
    m = min(n, m) if isinstance(n, int) else ops.minimum(n, m)
    i = ops.arange(m, dtype="int32")
    run = ops.cast(n, "float32") / ops.maximum(ops.cast(m, "float32"), 1.0)
    start = ops.cast(ops.floor(ops.cast(i, "float32") * run), "int32")
    stop = ops.cast(ops.floor(ops.cast(i + 1, "float32") * run), "int32")
    width = ops.maximum(stop - start, 1)
    return ops.minimum(start + ops.mod(i * _STRIDE_HASH, width), n - 1)


def _sampled(key, rows, valid):
    """`(values, valid)`: all of `rows` (and `valid`), or the `key.sample` values at `sample_positions`."""
    n = ops.shape(rows)[0]
    if key.sample is None or (isinstance(n, int) and n <= key.sample):
        return rows, valid
    if not isinstance(n, int) and keras.backend.backend() != "tensorflow":
        return rows, valid  # a symbolic size (shape inference only): read it all
    pos = sample_positions(n, key.sample)  # a gather of every value when n <= sample: no branch to instantiate
    return ops.take(rows, pos), (None if valid is None else ops.take(valid, pos))


def _weighted_sample(key, rows, valid, n):
    """`(values, weights)` the moments, zero count and histogram read: the values of `_sampled`, each
    weighted by how many values of the batch it stands for (exactly 1 when every value is read). A
    value that does not count (masked, non-finite) is 0 with weight 0."""
    values, keep = _sampled(key, rows, valid)
    if keep is None:
        m = ops.cast(ops.shape(values)[0], "float32")
        return values, ops.ones_like(values) * (n / ops.maximum(m, 1.0))
    w = ops.cast(keep, "float32")
    return ops.where(keep, values, 0.0), w * (n / ops.maximum(ops.sum(w), 1.0))


def _extremes(rows, chan, valid, valid_chan):
    """`(min, max, (channel_min, channel_max))` of the values that count, exact.

    With per-channel state the tensor's extremes are those of the channels'
    (two passes over the batch, not four).
    """
    inf = float("inf")
    if chan is not None:
        if valid_chan is not None:
            chan_lo, chan_hi = ops.where(valid_chan, chan, inf), ops.where(valid_chan, chan, -inf)
        else:
            chan_lo = chan_hi = chan
        clo, chi = ops.min(chan_lo, axis=0), ops.max(chan_hi, axis=0)
        return ops.min(clo), ops.max(chi), (clo, chi)
    zero = ops.zeros((), "float32")
    if valid is None:
        return ops.min(rows), ops.max(rows), (zero, zero)
    return ops.min(ops.where(valid, rows, inf)), ops.max(ops.where(valid, rows, -inf)), (zero, zero)


def _summary(key, rows, chan, valid, valid_chan, total):
    """The batch's `(n, mean, M2, M3, M4, zeros, min, max, channel_min, channel_max, values, weights)`.

    `valid=None`: every value counts (fast path; `total` is `sum(rows)`).
    Otherwise `valid` (and `valid_chan`) mask the values that count. The
    count, mean and extremes read every value; `M2`..`M4` (about the exact
    mean) and the zero count are the weighted sums over `(values, weights)`
    (`_weighted_sample`), which the histogram then bins.
    """
    zero = ops.zeros((), "float32")
    if valid is None:
        n = ops.cast(ops.shape(rows)[0], "float32")
    else:
        n = ops.sum(ops.cast(valid, "float32"))
        total = ops.sum(ops.where(valid, rows, 0.0))
    lo, hi, channel = _extremes(rows, chan, valid, valid_chan)
    if not (key.moments or key.zeros or key.hist):
        return (n, zero, zero, zero, zero, zero, lo, hi) + channel + (zero, zero)
    values, weights = _weighted_sample(key, rows, valid, n)
    moments = (n, zero, zero, zero, zero)
    if key.moments:
        mean = total / ops.maximum(n, 1.0)
        d = values - mean
        wd2 = weights * d * d
        moments = (n, mean, ops.sum(wd2), ops.sum(wd2 * d), ops.sum(wd2 * d * d))
    zeros = ops.sum(ops.where(ops.equal(values, 0.0), weights, 0.0)) if key.zeros else zero
    return moments + (zeros, lo, hi) + channel + (values, weights)


def step(key, state, x, sample_mask=None):
    """The new state after folding the batch `x` in: a pure function of its arguments.

    Args:
        key: The collector's `StepKey` (what it keeps; static).
        state: `{name: tensor}` of the state vectors named by `key.state_names`.
        x: The float32 batch, batch first.
        sample_mask: Optional bool `(batch,)`: samples where it is False are
            left out of every statistic.

    Returns:
        The new `{name: tensor}`, each in its variable's shape.
    """
    if sample_mask is None and not (key.moments or key.zeros or key.hist
                                    or key.channel is not None):
        return _range_step(state, x)
    rows = ops.reshape(x, (-1,))
    chan = _channel_rows(key, x) if key.channel is not None else None
    if sample_mask is None:
        total = ops.sum(rows)  # also the test for NaN / Inf: an overflowing sum just takes the exact masked path

        def masked():
            finite = ops.isfinite(x)
            valid_chan = _channel_rows(key, finite) if chan is not None else None
            bad = ops.sum(ops.cast(ops.logical_not(finite), "int32"))
            return _summary(key, rows, chan, ops.reshape(finite, (-1,)), valid_chan, None) + (bad,)

        summary = ops.cond(ops.isfinite(total),
                           lambda: _summary(key, rows, chan, None, None, total) + (ops.zeros((), "int32"),), masked)
        seen = ops.cast(ops.shape(x)[0], "int32")
        n_int = ops.cast(ops.shape(rows)[0], "int32") - summary[-1]
    else:
        keep = expand_mask(sample_mask, x) > 0.5
        finite = ops.isfinite(x)
        valid = ops.logical_and(finite, keep)
        bad = ops.sum(ops.cast(ops.logical_and(keep, ops.logical_not(finite)), "int32"))
        valid_chan = _channel_rows(key, valid) if chan is not None else None
        summary = _summary(key, rows, chan, ops.reshape(valid, (-1,)), valid_chan, None) + (bad,)
        seen = ops.sum(ops.cast(sample_mask, "int32"))
        n_int = ops.sum(ops.cast(valid, "int32"))
    n_b, mean_b, m2_b, m3_b, m4_b, zeros_b, lo_b, hi_b, clo_b, chi_b, values, weights, bad_b = summary

    old = dict(zip(SCALARS, ops.unstack(state["scalars"], num=len(SCALARS))))
    new = _add_counts(old, {"non_finite_count": bad_b, "samples": seen, "count": n_int})
    if key.moments:
        names = ("mean", "m2", "m3", "m4")
        merged = merge_moments((_total(old, "count"),) + tuple(old[k] for k in names), (n_b, mean_b, m2_b, m3_b, m4_b),
                               maximum=ops.maximum)
        new.update(zip(names, merged[1:]))
    if key.zeros:
        new["zeros"] = old["zeros"] + zeros_b
    old_lo, old_hi = old["min_val"], old["max_val"]
    has_batch = lo_b <= hi_b
    new["min_val"] = ops.where(has_batch, ops.minimum(old_lo, lo_b), old_lo)
    new["max_val"] = ops.where(has_batch, ops.maximum(old_hi, hi_b), old_hi)
    out = {"scalars": ops.stack([new[k] for k in SCALARS])}
    if key.hist:
        out["hist"] = _histogram_step(key, state["hist"], values, weights, old_lo, old_hi,
                                      new["min_val"], new["max_val"])
    if chan is not None:
        out["channel_min"] = ops.minimum(state["channel_min"], clo_b)
        out["channel_max"] = ops.maximum(state["channel_max"], chi_b)
    return out

def _range_step(state, x):
    """`step` of a collector that keeps only the range and counts (unmasked): the same new
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
                ops.sum(ops.cast(ops.logical_not(finite), "int32")))

    # The sum is the finiteness test: NaN and inf reach it whatever the backend, while min / max may drop
    # NaN (XLA's fast min / max on CPU, JAX's default).
    lo, hi, bad = ops.cond(ops.isfinite(ops.sum(rows)),
                           lambda: (ops.min(rows), ops.max(rows), ops.zeros((), "int32")), masked)
    # Counters add (non-finite values, samples, finite values); the extremes take min / max with
    # `(lo, hi)`, which are (inf, -inf), so change nothing, when no value was finite.
    size = ops.cast(ops.shape(rows)[0], "int32")
    seen = ops.cast(ops.shape(x)[0], "int32")
    old = dict(zip(SCALARS, ops.unstack(state["scalars"], num=len(SCALARS))))
    new = _add_counts(old, {"non_finite_count": bad, "samples": seen, "count": size - bad})
    new["min_val"] = ops.minimum(old["min_val"], lo)
    new["max_val"] = ops.maximum(old["max_val"], hi)
    return {"scalars": ops.stack([new[k] for k in SCALARS])}

def _histogram_step(key, hist, values, weights, old_lo, old_hi, new_lo, new_hi):
    """The histogram widened to `[new_lo, new_hi]` with the weighted `values` binned in.

    Every value of weight > 0 lies in the new range (it is exact); the others
    are clipped into a bin with weight 0.
    """
    bins = key.num_bins
    lo1, hi1 = ops.reshape(new_lo, (1,)), ops.reshape(new_hi, (1,))
    hist = rebin_counts(ops.reshape(hist, (1, bins)), ops.reshape(old_lo, (1,)), ops.reshape(old_hi, (1,)),
                        lo1, hi1, bins, 1)
    counts = bin_counts(ops.reshape(values, (-1, 1)), None, lo1, hi1, bins, 1, weights=weights)
    return ops.reshape(hist + counts, (bins,))


def _signature(key, masked, x_shape):
    import tensorflow as tf

    extra = [tf.TensorSpec((None,), "bool")] if masked else []
    return [{name: tf.TensorSpec((None,), "float32") for name in key.state_names}, tf.TensorSpec(x_shape, "float32")] \
        + extra


@functools.lru_cache(maxsize=None)
def step_function(key, masked=False):
    """`step` for collectors of `key`: one shared `tf.function` on TensorFlow, `step` itself elsewhere.

    Call it as `fn(state, x)` (or `fn(state, x, sample_mask)` when `masked`).
    """
    fn = functools.partial(step, key)
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    # Not inlined: the runtime instantiates (and optimises) the body once, not again inside
    # every step graph that calls it, which halves the first run of a new step function.
    return tf.function(fn, input_signature=_signature(key, masked, (None,) * key.rank), autograph=False,
                       experimental_attributes={"_noinline": True})


def update_function(key, masked=False):
    """TensorFlow: the whole update (read the state, `step`, write it) as one shared stateful `tf.function`.

    Call it as `fn(handles, x)` (or with a `sample_mask`), `handles` from
    `resource_handles`. In a step graph each collector is then one call,
    without the read, write and identity ops that reading and assigning the
    variables outside added per collector (a millisecond each to trace; a
    model has a hundred collectors). Unmasked and without per-channel state,
    the update reads its tensor as `(batch, -1)` (the same values): one
    function serves every rank, traced once per process instead of once per
    rank.
    """
    if not masked and key.channel is None:
        key = dataclasses.replace(key, rank=None)
    return _update_function(key, masked)


@functools.lru_cache(maxsize=None)
def _update_function(key, masked):
    import tensorflow as tf

    names = key.state_names

    def update(handles, x, sample_mask=None):
        if key.rank is None:
            x = tf.reshape(x, tf.stack([tf.shape(x)[0], -1]))
        state = {}
        for name in names:
            value = tf.raw_ops.ReadVariableOp(resource=handles[name], dtype=tf.float32)
            value.set_shape([None])  # every state variable is a vector
            state[name] = value
        new = step(key, state, x) if sample_mask is None else step(key, state, x, sample_mask)
        for name in names:
            tf.raw_ops.AssignVariableOp(resource=handles[name], value=new[name])

    signature = _signature(key, masked, None if key.rank is None else (None,) * key.rank)
    signature[0] = {name: tf.TensorSpec((), tf.resource) for name in names}
    return tf.function(update, input_signature=signature, autograph=False,
                       experimental_attributes={"_noinline": True})
