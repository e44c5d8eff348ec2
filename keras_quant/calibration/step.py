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

Example:

>>> key = StepKey(rank=2, num_bins=64, moments=True, zeros=True, hist=True, channel=None)
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

__all__ = ["StepKey", "step", "step_function", "update_function", "resource_handles", "merge_moments",
           "initial", "SCALARS", "VARIABLES"]

# The per-tensor statistics, packed in one `(len(SCALARS),)` variable, and their empty values.
SCALARS = ("non_finite_count", "samples", "count", "min_val", "max_val", "mean", "m2", "m3", "m4", "zeros")
_SCALAR_INITIAL = dict.fromkeys(SCALARS, 0.0) | {"min_val": float("inf"), "max_val": float("-inf")}
_IS_MIN = np.array([k == "min_val" for k in SCALARS])
_IS_MAX = np.array([k == "max_val" for k in SCALARS])
VARIABLES = ("scalars", "hist", "channel_min", "channel_max")
_FILLS = {"hist": 0.0, "channel_min": float("inf"), "channel_max": float("-inf")}


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
    """

    rank: Optional[int]
    num_bins: int
    moments: bool
    zeros: bool
    hist: bool
    channel: Optional[int]

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

def _summary(key, rows, chan, valid, valid_chan, total):
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
    if key.moments:
        mean = total / ops.maximum(n, 1.0)
        d = x - mean if valid is None else (x - mean) * w
        d2 = d * d
        moments = (n, mean, ops.sum(d2), ops.sum(d2 * d), ops.sum(d2 * d2))
    zeros = zero
    if key.zeros:
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
    zero = ops.zeros((), "float32")
    if sample_mask is None:
        total = ops.sum(rows)
        fast = ops.isfinite(total)  # an overflowing sum just takes the exact masked path

        def masked():
            finite = ops.isfinite(x)
            valid_chan = _channel_rows(key, finite) if chan is not None else None
            bad = ops.sum(ops.cast(ops.logical_not(finite), "float32"))
            return _summary(key, rows, chan, ops.reshape(finite, (-1,)), valid_chan, None) + (bad,)

        summary = ops.cond(fast, lambda: _summary(key, rows, chan, None, None, total) + (zero,), masked)
        seen = ops.cast(ops.shape(x)[0], "float32")
    else:
        keep = expand_mask(sample_mask, x) > 0.5
        finite = ops.isfinite(x)
        valid = ops.logical_and(finite, keep)
        bad = ops.sum(ops.cast(ops.logical_and(keep, ops.logical_not(finite)), "float32"))
        valid_chan = _channel_rows(key, valid) if chan is not None else None
        valid_rows = ops.reshape(valid, (-1,))
        summary = _summary(key, rows, chan, valid_rows, valid_chan, None) + (bad,)
        seen = ops.sum(ops.cast(sample_mask, "float32"))
        fast = None
    n_b, mean_b, m2_b, m3_b, m4_b, zeros_b, lo_b, hi_b, clo_b, chi_b, bad_b = summary

    old = dict(zip(SCALARS, ops.unstack(state["scalars"], num=len(SCALARS))))
    new = dict(old)
    new["non_finite_count"] = old["non_finite_count"] + bad_b
    new["samples"] = old["samples"] + seen
    if key.moments:
        names = ("count", "mean", "m2", "m3", "m4")
        merged = merge_moments(tuple(old[k] for k in names), (n_b, mean_b, m2_b, m3_b, m4_b), maximum=ops.maximum)
        new.update(zip(names, merged))
    else:
        new["count"] = old["count"] + n_b
    if key.zeros:
        new["zeros"] = old["zeros"] + zeros_b
    old_lo, old_hi = old["min_val"], old["max_val"]
    has_batch = lo_b <= hi_b
    new["min_val"] = ops.where(has_batch, ops.minimum(old_lo, lo_b), old_lo)
    new["max_val"] = ops.where(has_batch, ops.maximum(old_hi, hi_b), old_hi)
    out = {"scalars": ops.stack([new[k] for k in SCALARS])}
    if key.hist:
        # Masked: the mask already computed; unmasked: the fast path, or (NaN/Inf) `isfinite` again.
        valid_col = None if sample_mask is None else ops.reshape(valid_rows, (-1, 1))
        out["hist"] = _histogram_step(key, state["hist"], rows, x, valid_col, fast, old_lo, old_hi,
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
                ops.sum(ops.cast(ops.logical_not(finite), "float32")))

    lo, hi, bad = ops.cond(ops.isfinite(ops.sum(rows)),
                           lambda: (ops.min(rows), ops.max(rows), ops.zeros((), "float32")), masked)
    # Counters add (non-finite values, samples, finite values); the extremes take min / max with
    # `(lo, hi)`, which are (inf, -inf), so change nothing, when no value was finite.
    size = ops.cast(ops.size(rows), "float32")
    seen = ops.cast(ops.shape(x)[0], "float32")
    counts = ops.concatenate([ops.stack([bad, seen, size - bad]), ops.zeros((len(SCALARS) - 3,), "float32")])
    new = state["scalars"] + counts
    new = ops.minimum(new, ops.where(_IS_MIN, lo, inf))
    return {"scalars": ops.maximum(new, ops.where(_IS_MAX, hi, -inf))}

def _histogram_step(key, hist, rows, x, valid, fast, old_lo, old_hi, new_lo, new_hi):
    """The histogram widened to `[new_lo, new_hi]` with the batch binned in.

    `valid` is the `(N, 1)` mask of a masked batch (then `fast` is None);
    otherwise `fast` says whether the batch is all finite.
    """
    bins = key.num_bins
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
