"""The `Observer` base layer: fixed-size range statistics kept in Keras variables.

An observer is a `keras.layers.Layer` that returns its input unchanged and, on
every call, folds the batch into a few non-trainable variables (the way
`BatchNormalization` updates its moving statistics). It can therefore sit
inside a model and run in a compiled `predict` / `fit` step: `tf.function`,
XLA (`jit_compile=True`) and the JAX backend. Its memory is fixed when it is
built; it never stores data.

    x ──> [observer] ──> x           (state: min/max, moments or a histogram)

After calibration, `compute_range()` and `compute_qparams(spec)` read the
state (numpy, outside the compiled step); they are pure functions of it.

Non-finite values (NaN, +-Inf) are left out of every statistic and counted in
the `non_finite_count` variable. With `nan_policy="raise"`, eager `update(x)`
raises `kq.errors.NonFiniteError` before touching the state; inside a compiled
graph nothing can be raised, so the count is recorded and `compute_range()`
raises instead.

Counts are float32 variables: exact up to 2**24 elements, then approximate
(relative error ~6e-8), which is harmless for range estimation.
"""

import abc
import math

import keras
import numpy as np
from keras import ops

import keras_quant.ops as kq_ops
from keras_quant.config import QuantSpec
from keras_quant.errors import ConfigError, NoDataError, NonFiniteError, ShapeMismatchError

__all__ = ["Observer", "NAN_POLICIES", "expand_mask", "state_bytes"]

NAN_POLICIES = ("omit", "raise")


def state_bytes(layer):
    """Bytes held by a layer's variables, its sublayers' included: an observer's or a collector's state."""
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in layer.weights)


def expand_mask(sample_mask, inputs):
    """A `(batch,)` sample mask as a float32 tensor shaped like `inputs` (1.0 where kept)."""
    mask = ops.cast(ops.reshape(sample_mask, (-1,) + (1,) * (len(inputs.shape) - 1)), "float32")
    return ops.broadcast_to(mask, ops.shape(inputs))


class Observer(keras.layers.Layer, metaclass=abc.ABCMeta):
    """Base class of the observers: a pass-through layer that records statistics.

    Subclasses implement `_build_state(shape)` (create variables with
    `_state_variable`), `_update_state(rows, finite, all_finite)` (fold a batch given as a
    `(N, K)` float32 tensor, `K` the number of slots: 1 per tensor, `C` per
    channel, `C * G` per group) and `_range()` (numpy `(min, max)` of shape
    `(K,)`).

    Args:
        granularity: `"per_tensor"`, `"per_channel"` or (for observers that
            support it) `"per_group"`.
        axis: Channel axis for `per_channel` / `per_group`; all other axes are
            reduced.
        group_size: For `per_group`: number of consecutive elements of a
            channel (in the row-major order of the tensor with `axis` moved
            first) sharing one range, as in `kq.ops.tensor_range`.
        nan_policy: `"omit"` (count non-finite values and leave them out) or
            `"raise"` (eager `update` raises, `compute_range` raises if any were
            recorded in a graph).
        **kwargs: Keras layer arguments (`name`, ...).

    Raises:
        ConfigError: For an invalid argument.
    """

    supports_per_group = False

    def __init__(self, granularity="per_tensor", axis=-1, group_size=None, nan_policy="omit", **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        # The state's layout follows kq.ops' per-tensor / per-channel / per-group
        # rules, so the spec validates the arguments and the ops shape the state.
        self._layout = QuantSpec(
            granularity=granularity,
            axis=int(axis) if isinstance(axis, np.integer) else axis,
            group_size=int(group_size) if isinstance(group_size, np.integer) else group_size,
        )
        if granularity == "per_group" and not self.supports_per_group:
            raise ConfigError(
                "granularity",
                granularity,
                f"{type(self).__name__} supports 'per_tensor' and 'per_channel' only",
            )
        if nan_policy not in NAN_POLICIES:
            raise ConfigError("nan_policy", nan_policy, f"nan_policy must be one of {NAN_POLICIES}")
        self.granularity = self._layout.granularity
        self.axis = self._layout.axis
        self.group_size = self._layout.group_size
        self.nan_policy = nan_policy
        self._initial_values = {}

    # Building ---------------------------------------------------------------
    def _state_variable(self, name, shape, value):
        """Create `self.<name>`: a non-trainable float32 variable filled with `value`.

        `reset()` fills it with `value` again.
        """
        var = self.add_weight(
            shape=shape,
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            trainable=False,
            autocast=False,
            # Replicas apply identical updates (the calibration gathers the
            # batch across replicas first), so the first replica's write is
            # the state, as with tf.distribute's ONLY_FIRST_REPLICA.
            aggregation="only_first_replica",
            name=name,
        )
        setattr(self, name, var)
        self._initial_values[name] = float(value)
        return var

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.granularity == "per_tensor":
            shape = ()
        else:
            self._axis_index = kq_ops.channel_axis(self._layout, len(input_shape))
            if self.granularity == "per_channel" and input_shape[self._axis_index] is None:
                raise ShapeMismatchError("x", f"a known size on axis {self.axis}", input_shape, layer=self.name)
            if self.granularity == "per_group" and None in input_shape:
                raise ShapeMismatchError("x", "a fully defined shape for per_group", input_shape, layer=self.name)
            try:
                shape = kq_ops.param_shape(input_shape, self._layout)
            except ShapeMismatchError as e:
                raise ShapeMismatchError(e.field, e.expected, e.actual, layer=self.name) from None
        self.state_shape = shape
        self.num_slots = math.prod(shape) if shape else 1
        self._state_variable("non_finite_count", (), 0.0)
        self._build_state(shape)
        self.built = True

    @abc.abstractmethod
    def _build_state(self, shape):
        """Create the state variables for a state of `shape` (`()`, `(C,)` or `(C, G)`)."""

    # Graph-side update ------------------------------------------------------
    def _rows(self, x):
        """`x` as a `(N, K)` float32 tensor, one column per slot."""
        x = ops.cast(x, "float32")
        if self.granularity == "per_tensor":
            return ops.reshape(x, (-1, 1))
        if self.granularity == "per_channel":
            return ops.reshape(ops.moveaxis(x, self._axis_index, -1), (-1, self.num_slots))
        grouped, _ = kq_ops.to_groups(x, self._layout)  # (C, G, group_size)
        return ops.transpose(ops.reshape(grouped, (self.num_slots, self._layout.group_size)))

    @staticmethod
    def _masked_min_max(rows, finite, all_finite):
        """Per-column min and max over finite values (+inf / -inf for none).

        Batches are almost always finite: then a plain reduction is exact and
        skips materialising two masked copies of the batch.
        """

        def plain():
            return ops.min(rows, axis=0), ops.max(rows, axis=0)

        def masked():
            lo = ops.min(ops.where(finite, rows, float("inf")), axis=0)
            hi = ops.max(ops.where(finite, rows, float("-inf")), axis=0)
            return lo, hi

        return ops.cond(all_finite, plain, masked)

    def call(self, inputs, sample_mask=None):
        """Fold `inputs` into the state and return them unchanged.

        Args:
            inputs: The tensor to observe.
            sample_mask: Optional boolean tensor of shape `(batch,)`: samples
                (entries of the first axis) where it is False are left out
                of every statistic, as if they had not been seen. Used by the
                calibration samplers; non-finite values of masked-out samples
                are not counted.
        """
        rows = self._rows(inputs)
        finite = ops.isfinite(rows)
        bad = ops.sum(ops.cast(ops.logical_not(finite), "float32"))
        if sample_mask is None:
            self.non_finite_count.assign(self.non_finite_count + bad)
            self._update_state(rows, finite, ops.equal(bad, 0.0))
            return inputs
        keep = self._rows(expand_mask(sample_mask, inputs)) > 0.5
        valid = ops.logical_and(finite, keep)
        bad = ops.sum(ops.cast(ops.logical_and(keep, ops.logical_not(finite)), "float32"))
        self.non_finite_count.assign(self.non_finite_count + bad)
        self._update_state(rows, valid, ops.all(valid))
        return inputs

    @abc.abstractmethod
    def _update_state(self, rows, finite, all_finite):
        """Fold `rows` `(N, K)` into the state with `keras.ops`.

        `finite` is the mask of finite values and `all_finite` a scalar bool
        telling whether the whole batch is finite.
        """

    def compute_output_shape(self, input_shape):
        return input_shape

    def _assign(self, var, value):
        var.assign(ops.reshape(value, var.shape))

    def _read(self, var):
        """A variable as a `(K,)` (or `(K, ...)`) tensor."""
        return ops.reshape(var, (self.num_slots,) + tuple(var.shape[len(self.state_shape):]))

    # Eager API -------------------------------------------------------------
    def update(self, x):
        """Fold a batch into the state (eagerly).

        Args:
            x: A tensor or array-like of floats.

        Returns:
            The observer itself.

        Raises:
            NonFiniteError: If `x` holds NaN/Inf and `nan_policy="raise"`;
                the state is left untouched.
        """
        x = ops.convert_to_tensor(x)
        if "float" not in str(x.dtype):
            x = ops.cast(x, "float32")
        if self.nan_policy == "raise":
            count = int(ops.convert_to_numpy(ops.sum(ops.cast(ops.logical_not(ops.isfinite(x)), "int32"))))
            if count:
                raise NonFiniteError(count, field=self.name)
        self(x)
        return self

    def reset(self):
        """Restore the initial (empty) state. A layer not yet built is left as is."""
        for name, value in self._initial_values.items():
            var = getattr(self, name)
            var.assign(ops.full(var.shape, value, dtype="float32"))

    def _check_state(self):
        if not self.built:
            raise NoDataError(self.name, reason="the observer was never called")
        count = int(ops.convert_to_numpy(self.non_finite_count))
        if count and self.nan_policy == "raise":
            raise NonFiniteError(count, field=self.name)

    @abc.abstractmethod
    def _range(self, spec=None):
        """`(min, max)` numpy arrays of shape `(K,)` from the state (for `spec`'s grid if it matters)."""

    def _format(self, lo, hi):
        lo = np.asarray(lo, np.float32).reshape(self.state_shape)
        hi = np.asarray(hi, np.float32).reshape(self.state_shape)
        if self.granularity == "per_tensor":
            return float(lo), float(hi)
        return lo, hi

    def _no_data(self, empty):
        """Raise NoDataError if any slot (a bool `(K,)` array) saw no finite data."""
        empty = np.asarray(empty, bool).reshape(-1)
        if empty.all():
            raise NoDataError(self.name)
        if empty.any():
            slots = np.flatnonzero(empty)
            raise NoDataError(
                self.name, reason=f"{slots.size} channel(s)/group(s) saw none, first {slots[:8].tolist()}"
            )

    def compute_range(self):
        """The range the observer recommends.

        Returns:
            `(min, max)`: Python floats per tensor, float32 numpy arrays of
            shape `(C,)` per channel or `(C, G)` per group.

        Raises:
            NoDataError: If no finite value has been seen (for some channel).
            NonFiniteError: If non-finite values were recorded and
                `nan_policy="raise"`.
        """
        self._check_state()
        return self._format(*self._range())

    def compute_qparams(self, spec):
        """Scale and zero point for `spec` from the observed range.

        Args:
            spec: The `kq.QuantSpec` (bits, symmetric, narrow_range).

        Returns:
            `(scale, zero_point)`: float32 and int32 numpy arrays with the
            shape of the range (0-d per tensor).

        Raises:
            NoDataError, NonFiniteError: As `compute_range`.
        """
        self._check_state()
        lo, hi = self._format(*self._range(spec))
        scale, zero_point = kq_ops.compute_qparams(lo, hi, spec)
        return np.asarray(ops.convert_to_numpy(scale)), np.asarray(ops.convert_to_numpy(zero_point))

    @property
    def state_bytes(self):
        """Bytes held by the observer's variables (fixed once built)."""
        return state_bytes(self)

    # Serialization ----------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update({"granularity": self.granularity, "axis": self.axis, "nan_policy": self.nan_policy})
        if self.supports_per_group:
            config["group_size"] = self.group_size
        return config
