"""Calibration sampling: which samples of each batch the observers see.

A sampler looks at a batch inside the compiled step and returns a boolean
mask of shape `(batch,)`; the calibration callback passes it to every
observer (`Observer.call(x, sample_mask=...)`), so samples left out change
no statistic. Samplers are written with `keras.ops` and keep their state in
non-trainable variables, so they run in `tf.function`, XLA and (replicas
having gathered the batch first) under `tf.distribute`.

Randomness is a counter-based hash of `(seed, global sample index)`, not a
stateful generator: the same seed keeps the same samples whatever the batch
size, the number of replicas or the backend.

- `AllSampler`: every sample.
- `RandomSampler(rate, seed)`: each sample with probability `rate`.
- `SystematicSampler(step, offset)`: every `step`-th sample.
- `StratifiedSampler(num_strata)`: at most `max_samples / num_strata` per
  stratum; strata are the labels when the data has them, else quantile bins
  of each sample's input norm (bin edges from the first batch).
- `ImportanceSampler(rate, seed)`: each sample with probability
  `rate * norm / mean_norm` (clipped to 1), favouring large activations.
- Any object with a `select(inputs, labels)` method returning a `(batch,)`
  mask (bool or 0/1) written with `keras.ops` can be passed instead.

`SampleBudget` caps the total at `max_samples`, exactly.

Example:

>>> import keras_quant as kq
>>> cb = kq.CalibrationCallback(sampling="random", max_samples=512, seed=0)
>>> cb = kq.CalibrationCallback(sampling=kq.calibration.SystematicSampler(step=4))
"""

import math

import keras
from keras import ops

from keras_quant.errors import ConfigError

__all__ = [
    "Sampler",
    "AllSampler",
    "RandomSampler",
    "SystematicSampler",
    "StratifiedSampler",
    "ImportanceSampler",
    "SampleBudget",
    "SAMPLINGS",
    "get",
    "hash_uniform",
]


def hash_uniform(index, seed):
    """Uniform floats in `[0, 1)` from integer sample indices: a 32-bit integer hash.

    A pure function of `(index, seed)` (the "lowbias32" mixer), identical on
    every backend and independent of how samples are batched.

    Args:
        index: Integer tensor of sample indices.
        seed: Python int.

    Returns:
        A float32 tensor shaped like `index`.
    """
    x = ops.cast(index, "uint32") * ops.cast(0x9E3779B9, "uint32") + ops.cast(seed & 0xFFFFFFFF, "uint32")
    x = ops.bitwise_xor(x, ops.right_shift(x, 16))
    x = x * ops.cast(0x7FEB352D, "uint32")
    x = ops.bitwise_xor(x, ops.right_shift(x, 15))
    x = x * ops.cast(0x846CA68B, "uint32")
    x = ops.bitwise_xor(x, ops.right_shift(x, 16))
    return ops.cast(ops.right_shift(x, 8), "float32") / float(1 << 24)


def _batch_size(inputs):
    return ops.shape(keras.tree.flatten(inputs)[0])[0]


def _sample_norms(inputs):
    """L2 norm of each sample over all its (float) inputs, shape `(batch,)`."""
    total = None
    for x in keras.tree.flatten(inputs):
        x = ops.cast(x, "float32")
        sq = ops.sum(ops.reshape(ops.square(x), (ops.shape(x)[0], -1)), axis=1)
        total = sq if total is None else total + sq
    return ops.sqrt(total)


def _check_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
        raise ConfigError("rate", rate, "rate must be a number in (0, 1]")
    return float(rate)


def _check_seed(seed):
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", seed, "seed must be an integer or None")
    return seed


class Sampler(keras.layers.Layer):
    """Base of the built-in samplers: a layer holding the sampler's state.

    Subclasses implement `select(inputs, labels)` with `keras.ops`. The
    `offered` variable counts the samples offered so far (the global index of
    the next sample), shared by the counter-based samplers.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)

    def _variable(self, name, shape=(), value=0.0, dtype="float32"):
        return self.add_weight(
            shape=shape,
            initializer=keras.initializers.Constant(value),
            dtype=dtype,
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
            name=name,
        )

    def build(self, input_shape=None):
        self.offered = self._variable("offered", dtype="int32", value=0)
        self.built = True

    def _indices(self, inputs):
        """Global indices of this batch's samples; advances `offered`."""
        n = _batch_size(inputs)
        indices = self.offered + ops.arange(n, dtype="int32")  # read before the assign below
        self.offered.assign(self.offered + ops.cast(n, "int32"))
        return indices

    def select(self, inputs, labels=None):
        """A `(batch,)` boolean mask of the samples to keep."""
        return ops.ones((_batch_size(inputs),), dtype="bool")

    def call(self, inputs, labels=None):
        return self.select(inputs, labels)

    def reset(self):
        """Forget what was selected so far (the budget and any running state start again)."""
        for v in self.weights:
            v.assign(ops.zeros(v.shape, v.dtype))


class AllSampler(Sampler):
    """Every sample."""

    def select(self, inputs, labels=None):
        self._indices(inputs)
        return ops.ones((_batch_size(inputs),), dtype="bool")


class RandomSampler(Sampler):
    """Each sample independently with probability `rate` (seeded, reproducible).

    Args:
        rate: Probability of keeping a sample, in `(0, 1]`.
        seed: Integer seed; the same seed keeps the same sample indices.
    """

    def __init__(self, rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _check_rate(rate)
        self.seed = _check_seed(seed)

    def select(self, inputs, labels=None):
        return hash_uniform(self._indices(inputs), self.seed) < self.rate


class SystematicSampler(Sampler):
    """Every `step`-th sample, starting at `offset`.

    Args:
        step: Keep one sample in `step` (a positive integer).
        offset: Index of the first kept sample, in `[0, step)`.
    """

    def __init__(self, step=2, offset=0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError("step", step, "step must be a positive integer")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < step:
            raise ConfigError("offset", offset, f"offset must be an integer in [0, {step})")
        self.step = step
        self.offset = offset

    def select(self, inputs, labels=None):
        return ops.equal(ops.mod(self._indices(inputs), self.step), self.offset)


class ImportanceSampler(Sampler):
    """Keep a sample with probability `rate * norm / mean_norm`, clipped to 1.

    `norm` is the L2 norm of the sample's inputs and `mean_norm` the running
    mean norm of the samples offered so far (this batch included), so
    samples with large activations are kept more often.

    Args:
        rate: Average keep probability, in `(0, 1]`.
        seed: Integer seed.
    """

    def __init__(self, rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _check_rate(rate)
        self.seed = _check_seed(seed)

    def build(self, input_shape=None):
        super().build(input_shape)
        self.norm_sum = self._variable("norm_sum")

    def select(self, inputs, labels=None):
        index = self._indices(inputs)
        norms = _sample_norms(inputs)
        total = self.norm_sum + ops.sum(norms)
        self.norm_sum.assign(total)
        mean = total / ops.maximum(ops.cast(self.offered, "float32"), 1.0)
        p = ops.clip(self.rate * norms / ops.maximum(mean, 1e-12), 0.0, 1.0)
        return hash_uniform(index, self.seed) < p


class StratifiedSampler(Sampler):
    """At most `ceil(max_samples / num_strata)` samples per stratum.

    Strata are the labels when the data has them (integer class ids, or the
    argmax of one-hot / probability labels; ids are taken modulo
    `num_strata`), otherwise `num_strata` quantile bins of each sample's input
    norm, with the bin edges set from the first batch. Needs `max_samples`.

    Args:
        num_strata: Number of strata (classes or norm bins), at least 1.
    """

    needs_budget = True

    def __init__(self, num_strata=10, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_strata, bool) or not isinstance(num_strata, int) or num_strata < 1:
            raise ConfigError("num_strata", num_strata, "num_strata must be a positive integer")
        self.num_strata = num_strata
        self.quota = None  # set by the budget

    def build(self, input_shape=None):
        super().build(input_shape)
        self.counts = self._variable("counts", shape=(self.num_strata,))
        self.edges = self._variable("edges", shape=(max(self.num_strata - 1, 1),))
        self.has_edges = self._variable("has_edges")

    def _norm_strata(self, inputs):
        norms = _sample_norms(inputs)
        if self.num_strata == 1:
            return ops.zeros_like(ops.cast(norms, "int32"))
        q = ops.linspace(0.0, 1.0, self.num_strata + 1)[1:-1]
        first = ops.quantile(norms, q)
        edges = ops.where(self.has_edges > 0, ops.convert_to_tensor(self.edges), first)
        self.edges.assign(edges)
        self.has_edges.assign(ops.ones(()))
        return ops.sum(ops.cast(norms[:, None] > edges[None, :], "int32"), axis=1)

    def _label_strata(self, labels):
        y = keras.tree.flatten(labels)[0]
        if len(y.shape) >= 2 and y.shape[-1] is not None and y.shape[-1] > 1:
            y = ops.argmax(ops.reshape(y, (ops.shape(y)[0], -1)), axis=-1)
        else:
            y = ops.reshape(ops.cast(ops.round(ops.cast(y, "float32")), "int32"), (-1,))
        return ops.mod(ops.cast(y, "int32"), self.num_strata)

    def select(self, inputs, labels=None):
        self._indices(inputs)
        strata = self._norm_strata(inputs) if labels is None else self._label_strata(labels)
        onehot = ops.one_hot(strata, self.num_strata)  # (B, S)
        rank = ops.sum((ops.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # earlier same-stratum samples
        before = ops.sum(onehot * ops.convert_to_tensor(self.counts)[None, :], axis=1)
        quota = float("inf") if self.quota is None else float(self.quota)
        keep = before + rank < quota
        self.counts.assign(self.counts + ops.sum(onehot * ops.cast(keep, "float32")[:, None], axis=0))
        return keep


class _UserSampler(Sampler):
    """Adapts an object with a `select(inputs, labels)` method."""

    def __init__(self, sampler, **kwargs):
        kwargs.setdefault("name", "user_sampler")
        super().__init__(**kwargs)
        self.sampler = sampler

    def select(self, inputs, labels=None):
        self._indices(inputs)
        mask = self.sampler.select(inputs, labels)
        mask = ops.reshape(ops.convert_to_tensor(mask), (-1,))
        return mask if mask.dtype == "bool" else ops.cast(mask, "float32") > 0.5


class SampleBudget(keras.layers.Layer):
    """Caps the samples kept at `max_samples`, exactly, in batch order.

    Args:
        max_samples: Positive integer, or None for no cap.
    """

    def __init__(self, max_samples=None, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise ConfigError("max_samples", max_samples, "max_samples must be a positive integer or None")
        self.max_samples = max_samples

    def build(self, input_shape=None):
        self.kept = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, autocast=False,
            aggregation="only_first_replica", name="kept",
        )
        self.built = True

    def call(self, mask):
        mask = ops.convert_to_tensor(mask)
        if self.max_samples is not None:
            position = ops.convert_to_tensor(self.kept) + ops.cumsum(ops.cast(mask, "int32"))
            mask = ops.logical_and(mask, position <= self.max_samples)
        self.kept.assign(self.kept + ops.sum(ops.cast(mask, "int32")))
        return mask


SAMPLINGS = {
    "all": AllSampler,
    "random": RandomSampler,
    "systematic": SystematicSampler,
    "stratified": StratifiedSampler,
    "importance": ImportanceSampler,
}


def get(sampling, max_samples=None, seed=None, **options):
    """A sampler from a name, a sampler or an object with a `select` method.

    Args:
        sampling: One of `SAMPLINGS`, a `Sampler`, or any object with
            `select(inputs, labels) -> mask`.
        max_samples: The cap (used for the stratified quota).
        seed: Seed for the random samplers.
        **options: Constructor arguments (`rate`, `step`, `num_strata`, ...).

    Raises:
        ConfigError: For an unknown name, bad options, or `"stratified"`
            without `max_samples`.
    """
    if isinstance(sampling, Sampler):
        sampler = sampling
    elif isinstance(sampling, str):
        if sampling not in SAMPLINGS:
            raise ConfigError("sampling", sampling, f"sampling must be one of {tuple(SAMPLINGS)} or a sampler object")
        cls = SAMPLINGS[sampling]
        if cls in (RandomSampler, ImportanceSampler):
            options.setdefault("seed", seed)
        try:
            sampler = cls(**options)
        except TypeError as e:
            raise ConfigError("sampling_options", options, f"invalid options for {cls.__name__} ({e})") from None
    elif callable(getattr(sampling, "select", None)):
        sampler = _UserSampler(sampling)
    else:
        raise ConfigError(
            "sampling", sampling, f"sampling must be one of {tuple(SAMPLINGS)} or an object with a select() method"
        )
    if isinstance(sampler, StratifiedSampler):
        if max_samples is None:
            raise ConfigError("max_samples", None, "sampling='stratified' needs max_samples to set the per-stratum quota")
        sampler.quota = math.ceil(max_samples / sampler.num_strata)
    return sampler
