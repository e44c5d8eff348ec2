"""The weights the post-training rounding algorithms change, read and written on the quantizer's grid.

A frozen `kq.QuantizeWrapper` keeps its float weights and fixed weight scales;
it rounds to nearest when it runs and when it is exported. An algorithm that
chooses other integers (AdaRound, GPTQ) writes float values that lie exactly on
the grid: the wrapper's nearest rounding then gives back the chosen integers,
and the TFLite and ONNX exports write them like any other weights.

- `grid_weight(wrapper)`: the weight to round, its (folded) float values, its
  spec, scale and zero point, broadcast to the weight's shape.
- `set_grid_weight(wrapper, weight, values)`: write new (folded) values; with
  a folded BatchNormalization the layer's own kernel becomes
  `values / fold factor`, so the folded kernel the quantizer sees is `values`.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_quant.errors import ConfigError
from keras_quant.layers import folding
from keras_quant.ops import core as kq_ops

__all__ = ["GridWeight", "grid_weight", "set_grid_weight", "channel_qparams"]


@dataclasses.dataclass
class GridWeight:
    """A wrapper's weight to round (numpy, float32).

    Attributes:
        name: The weight's attribute on the wrapped layer (`"kernel"`, `"depthwise_kernel"`).
        values: Its float values as the quantizer sees them (a folded BatchNormalization included).
        spec: The weight's `kq.QuantSpec`.
        scale: The quantizer's scales broadcast to `values.shape`.
        zero_point: Its zero points broadcast to `values.shape`.
    """

    name: str
    values: np.ndarray
    spec: object
    scale: np.ndarray
    zero_point: np.ndarray

    def nearest(self):
        """The integers of round-to-nearest (half away from zero as `kq.ops.quantize`), clipped to the grid."""
        q = np.floor(self.values / self.scale + 0.5) + self.zero_point
        return np.clip(q, self.spec.qmin, self.spec.qmax)

    def dequantize(self, q):
        """Float values of the integers `q` on this weight's grid."""
        return ((np.asarray(q, np.float32) - self.zero_point) * self.scale).astype(np.float32)


def channel_qparams(scale, zero_point, shape, spec):
    """`(scale, zero_point)` broadcast to a weight of `shape` (float32 numpy), in the layout the quantizer
    itself applies them (`keras_quant.ops.core.apply_params`: per tensor, per channel on `spec.axis`, or per group)."""
    zeros = np.zeros(shape, np.float32)

    def spread(which):
        out = kq_ops.apply_params(zeros, scale, zero_point, spec, lambda x, s, z: x + (s if which == 0 else z))
        return np.ascontiguousarray(ops.convert_to_numpy(out), np.float32)

    return spread(0), spread(1)


def _kernel_name(wrapper):
    specs = wrapper.weight_specs
    for name in ("kernel", "depthwise_kernel"):
        if name in specs:
            return name
    if len(specs) == 1:
        return next(iter(specs))
    return None


def grid_weight(wrapper):
    """The `GridWeight` of a frozen wrapper's kernel (read now), or None when it quantizes no single kernel.

    Raises:
        ConfigError: A wrapper that is not frozen (QAT wrappers learn their weights).
    """
    if wrapper.stage != "frozen":
        raise ConfigError("stage", wrapper.stage, "rounding algorithms change frozen (post-training) wrappers",
                          layer=wrapper.name)
    name = _kernel_name(wrapper)
    if name is None:
        return None
    values = np.asarray(keras.ops.convert_to_numpy(wrapper.float_weights()[name]), np.float32)
    spec = wrapper.weight_specs[name]
    scale, zero_point = (keras.ops.convert_to_numpy(v) for v in wrapper.weight_qparams[name])
    scale, zero_point = channel_qparams(scale, zero_point, values.shape, spec)
    return GridWeight(name, values, spec, scale, zero_point)


def set_grid_weight(wrapper, weight, values):
    """Write `values` (the folded values the quantizer sees, e.g. `weight.dequantize(q)`) into the layer.

    The weight scales are kept. With a folded BatchNormalization the layer's
    kernel becomes `values / factor` per output channel (a channel whose
    factor is 0 keeps its kernel: its folded values are 0 whatever it holds).
    """
    var = getattr(wrapper.layer, weight.name)
    values = np.asarray(values, np.float32)
    fold = folding.fold_rule(wrapper.layer)
    if wrapper.batch_norm is not None and fold is not None and fold[0] == weight.name:
        factor, _ = folding.fold_terms(wrapper.layer, wrapper.batch_norm,
                                       *folding.moving_statistics(wrapper.batch_norm))
        factor = np.asarray(keras.ops.convert_to_numpy(factor), np.float32)
        shape = folding.factor_shape(values.shape, fold[1])
        factor = factor.reshape(shape)
        current = np.asarray(keras.ops.convert_to_numpy(var.value), np.float32)
        safe = np.where(factor == 0, 1.0, factor)
        values = np.where(np.broadcast_to(factor == 0, values.shape), current, values / safe)
    var.assign(ops.cast(values, var.dtype))
