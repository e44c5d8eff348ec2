"""Mean and standard deviation observer: range `mean +- num_std * std`.

Batches are merged exactly with the parallel algorithm of Chan, Golub and
LeVeque (1979): each batch's count, mean and sum of squared deviations `M2`
(computed two-pass within the batch) are combined with the running ones,

    n = n_a + n_b,   d = mean_b - mean_a
    mean = mean_a + d * n_b / n
    M2   = M2_a + M2_b + d**2 * n_a * n_b / n

so the result does not depend on how the data was split into batches and does
not suffer the cancellation of `E[x**2] - E[x]**2`.

Example:

>>> import numpy as np, keras_quant as kq
>>> obs = kq.observers.MeanStdObserver(num_std=2.0)
>>> lo, hi = obs.update(np.random.default_rng(0).normal(size=10_000)).compute_range()
"""

import keras
import numpy as np
from keras import ops

from keras_quant.errors import ConfigError, is_number
from keras_quant.observers.base import Observer

__all__ = ["MeanStdObserver", "mean_std_range"]


def mean_std_range(mean, std, min_val, max_val, num_std):
    """`mean +- num_std * std`, clipped to `[min_val, max_val]` (numbers or numpy arrays).

    Example:

    >>> [float(v) for v in mean_std_range(0.0, 1.0, -2.0, 5.0, 3.0)]
    [-2.0, 3.0]
    """
    return np.maximum(mean - num_std * std, min_val), np.minimum(mean + num_std * std, max_val)


@keras.saving.register_keras_serializable(package="keras_quant")
class MeanStdObserver(Observer):
    """Range `mean +- num_std * std`, clipped to the observed `[min, max]`.

    State (each of shape `()` or `(C,)`): `count`, `mean`, `m2` (sum of
    squared deviations), `min_val`, `max_val`, plus `non_finite_count`. The
    standard deviation is the population one, `sqrt(m2 / count)`.

    Args:
        num_std: Number of standard deviations on each side, > 0.
        granularity: `"per_tensor"` or `"per_channel"`.
        axis: Channel axis for `per_channel`.
        nan_policy: `"omit"` or `"raise"`.
        **kwargs: Keras layer arguments.

    Raises:
        ConfigError: For an invalid argument (including `per_group`).

    Example:

    >>> obs = MeanStdObserver(num_std=1.0)
    >>> obs.update([0.0, 2.0, 4.0, 6.0]).compute_mean_std()
    (3.0, 2.2360680103302)
    """

    def __init__(self, num_std=3.0, granularity="per_tensor", axis=-1, nan_policy="omit", **kwargs):
        super().__init__(granularity=granularity, axis=axis, nan_policy=nan_policy, **kwargs)
        if not is_number(num_std) or not num_std > 0:
            raise ConfigError("num_std", num_std, "num_std must be a positive number")
        self.num_std = float(num_std)

    def _build_state(self, shape):
        self._state_variable("count", shape, 0.0)
        self._state_variable("mean", shape, 0.0)
        self._state_variable("m2", shape, 0.0)
        self._state_variable("min_val", shape, float("inf"))
        self._state_variable("max_val", shape, float("-inf"))

    def _update_state(self, rows, finite, all_finite):
        w = ops.cast(finite, "float32")
        x = ops.where(finite, rows, 0.0)
        n_b = ops.sum(w, axis=0)
        mean_b = ops.sum(x, axis=0) / ops.maximum(n_b, 1.0)
        m2_b = ops.sum(ops.square((x - mean_b) * w), axis=0)

        n_a, mean_a, m2_a = self._read(self.count), self._read(self.mean), self._read(self.m2)
        n = n_a + n_b
        safe_n = ops.maximum(n, 1.0)
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / safe_n)
        m2 = m2_a + m2_b + ops.square(delta) * (n_a * (n_b / safe_n))
        lo, hi = self._masked_min_max(rows, finite, all_finite)
        self._assign(self.count, n)
        self._assign(self.mean, mean)
        self._assign(self.m2, m2)
        self._assign(self.min_val, ops.minimum(self._read(self.min_val), lo))
        self._assign(self.max_val, ops.maximum(self._read(self.max_val), hi))

    def _state(self):
        read = lambda v: np.asarray(ops.convert_to_numpy(v), np.float64).reshape(-1)  # noqa: E731
        return read(self.count), read(self.mean), read(self.m2), read(self.min_val), read(self.max_val)

    def compute_mean_std(self):
        """Mean and (population) standard deviation of the finite values seen.

        Returns:
            `(mean, std)`: floats per tensor, float32 arrays of shape `(C,)`
            per channel.

        Raises:
            NoDataError, NonFiniteError: As `compute_range`.
        """
        self._check_state()
        count, mean, m2, _, _ = self._state()
        self._no_data(count == 0)
        return self._format(mean, np.sqrt(np.maximum(m2, 0.0) / count))

    def _range(self, spec=None):
        count, mean, m2, lo, hi = self._state()
        self._no_data(count == 0)
        return mean_std_range(mean, np.sqrt(np.maximum(m2, 0.0) / count), lo, hi, self.num_std)

    def get_config(self):
        config = super().get_config()
        config["num_std"] = self.num_std
        return config
