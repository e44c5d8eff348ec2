"""Min-max observers: the running extremes, or their exponential moving average.

`MinMaxObserver` keeps the smallest and largest finite value seen (per tensor,
per channel or per group); `MovingAverageMinMaxObserver` keeps an exponential
moving average of each batch's extremes, which ignores rare outlier batches
(the observer TF-MOT and PyTorch use for activations in QAT).

Example:

>>> import numpy as np, keras_quant as kq
>>> obs = kq.observers.MinMaxObserver(granularity="per_channel")
>>> obs.update(np.array([[-1.0, 2.0], [3.0, -4.0]], "float32")).compute_range()
(array([-1., -4.], dtype=float32), array([3., 2.], dtype=float32))
"""

import keras
import numpy as np
from keras import ops

import keras_quant.ops as kq_ops
from keras_quant.errors import ConfigError, is_number
from keras_quant.observers.base import Observer

__all__ = ["MinMaxObserver", "MovingAverageMinMaxObserver"]

_UNSET = object()  # `averaging_constant` not given (None is an invalid value, as it always was)


@keras.saving.register_keras_serializable(package="keras_quant")
class MinMaxObserver(Observer):
    """Running minimum and maximum of the finite values seen.

    State: `min_val`, `max_val` (shape `()`, `(C,)` or `(C, G)`), initially
    `+inf` / `-inf`, and `non_finite_count`.

    Args:
        granularity: `"per_tensor"`, `"per_channel"` or `"per_group"`.
        axis: Channel axis for `per_channel` / `per_group`.
        group_size: Elements per group for `per_group` (as `kq.ops.tensor_range`).
        nan_policy: `"omit"` or `"raise"`.
        **kwargs: Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument.

    Example:

    >>> obs = MinMaxObserver()
    >>> obs.update([[-2.0, 0.5], [1.0, 4.0]]).compute_range()
    (-2.0, 4.0)
    """

    supports_per_group = True

    def _build_state(self, shape):
        self._state_variable("min_val", shape, float("inf"))
        self._state_variable("max_val", shape, float("-inf"))

    def _update_state(self, rows, finite, all_finite):
        lo, hi = self._masked_min_max(rows, finite, all_finite)
        self._assign(self.min_val, ops.minimum(self._read(self.min_val), lo))
        self._assign(self.max_val, ops.maximum(self._read(self.max_val), hi))

    def _range(self, spec=None):
        lo = np.asarray(ops.convert_to_numpy(self.min_val)).reshape(-1)
        hi = np.asarray(ops.convert_to_numpy(self.max_val)).reshape(-1)
        self._no_data(lo > hi)
        return lo, hi


@keras.saving.register_keras_serializable(package="keras_quant")
class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's minimum and maximum.

    The first batch (with finite data, per slot) sets the range directly;
    later batches move it with `keras_quant.ops.moving_average` (Keras'
    convention, as `keras.layers.BatchNormalization`):
    `min = momentum * min + (1 - momentum) * batch_min`, likewise `max`. A
    batch with no finite value in a slot leaves that slot unchanged.

    Args:
        momentum: In `[0, 1)`: the weight kept by the running range per batch
            (default 0.99); `0.0` keeps only the last batch.
        averaging_constant: The older spelling, `c = 1 - momentum` in
            `(0, 1]` (PyTorch's convention). Configs saved before `momentum`
            carry this key, so it is still accepted; give one or the other.
            `get_config` writes `momentum`.
        granularity: `"per_tensor"`, `"per_channel"` or `"per_group"`.
        axis: Channel axis for `per_channel` / `per_group`.
        group_size: Elements per group for `per_group`.
        nan_policy: `"omit"` or `"raise"`.
        **kwargs: Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument, or both `momentum` and
            `averaging_constant`.

    Example:

    >>> obs = MovingAverageMinMaxObserver(momentum=0.5)
    >>> obs.update([0.0, 2.0]).update([0.0, 4.0]).compute_range()
    (0.0, 3.0)
    """

    def __init__(self, *, momentum=None, granularity="per_tensor", axis=-1, group_size=None, nan_policy="omit",
                 averaging_constant=_UNSET, **kwargs):
        # Keyword-only: the first positional argument used to be `averaging_constant`, so a
        # positional call from older code fails loudly instead of reading its value as momentum.
        super().__init__(granularity=granularity, axis=axis, group_size=group_size, nan_policy=nan_policy, **kwargs)
        if averaging_constant is not _UNSET:
            c = averaging_constant
            if momentum is not None:
                raise ConfigError("averaging_constant", c, f"give momentum or averaging_constant, not both. "
                                  f"Received: momentum={momentum}")
            if not is_number(c) or not 0.0 < float(c) <= 1.0:
                raise ConfigError("averaging_constant", c, "averaging_constant must be a number in (0, 1]")
            momentum = 1.0 - float(c)
        elif momentum is None:
            momentum = 0.99
        elif not is_number(momentum) or not 0.0 <= float(momentum) < 1.0:
            raise ConfigError("momentum", momentum, "momentum must be a number in [0, 1)")
        self.momentum = float(momentum)

    @property
    def averaging_constant(self):
        """`1 - momentum`: the weight of each new batch (the older spelling of `momentum`)."""
        return 1.0 - self.momentum

    def _update_state(self, rows, finite, all_finite):
        lo_b, hi_b = self._masked_min_max(rows, finite, all_finite)
        lo, hi = self._read(self.min_val), self._read(self.max_val)
        has_batch = lo_b <= hi_b
        first = lo > hi
        # Unselected branches may hold inf - inf = nan; `where` drops them.
        new_lo = ops.where(has_batch, ops.where(first, lo_b, kq_ops.moving_average(lo, lo_b, self.momentum)), lo)
        new_hi = ops.where(has_batch, ops.where(first, hi_b, kq_ops.moving_average(hi, hi_b, self.momentum)), hi)
        self._assign(self.min_val, new_lo)
        self._assign(self.max_val, new_hi)

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config
