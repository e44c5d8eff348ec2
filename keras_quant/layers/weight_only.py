"""Weight-only quantization of float islands: float compute, kernels on an integer grid.

A `MultiHeadAttention` has no integer TFLite kernel that takes keras_quant's
ranges, so PTQ and QAT keep its compute in float (a float island the report
names). Its four projection kernels still lie on an int8 grid here: each
`EinsumDense` reads `fake_quant(kernel)` with one symmetric scale per kernel,
which the TFLite converter writes as an int8 constant and a DEQUANTIZE that
LiteRT evaluates once, at load (the file's weights are a quarter of the size;
the arithmetic is the float model's).

Example:

>>> mha = WeightOnlyMultiHeadAttention(num_heads=2, key_dim=8, weight_spec=kq.QuantSpec(bits=8))
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_quant import ops as kq_ops
from keras_quant.config import QuantSpec, as_spec
from keras_quant.layers.inference import active_plan, weight_op

__all__ = ["WeightOnlyMultiHeadAttention", "weight_only_spec"]

_PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def weight_only_spec(spec):
    """The per-tensor symmetric form of a weight spec that weight-only kernels use (one scale per kernel)."""
    return dataclasses.replace(spec, granularity="per_tensor", symmetric=True, group_size=None)


def _weight_only_call(layer, spec, owner, name):
    """`EinsumDense.call` with the kernel fake-quantized on one scale: the owner's frozen grid of this kernel
    (`WeightOnlyMultiHeadAttention.freeze`), else `kq.ops.weight_qparams` of the kernel, as QAT weights."""

    def call(inputs, training=None):
        kernel = layer.kernel
        frozen = owner.kernel_qparams.get(name)
        if frozen is not None and active_plan() is not None and keras.backend.backend() == "tensorflow":
            kernel = weight_op(kernel, spec, *frozen)
        else:
            scale, zero_point = frozen if frozen is not None else kq_ops.weight_qparams(kernel, spec)
            kernel = kq_ops.fake_quant(kernel, scale, zero_point, spec)
        x = ops.einsum(layer.equation, inputs, kernel)
        if layer.bias is not None:
            x = ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    return call


@keras.saving.register_keras_serializable(package="keras_quant")
class WeightOnlyMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose query, key, value and output kernels are fake-quantized.

    Args:
        weight_spec: The `kq.QuantSpec` of the kernels (made per-tensor and
            symmetric; default 8 bits, narrow range).
        kernel_qparams: `{projection: (scale, zero_point)}` of frozen kernels
            (`freeze`, which PTQ calls); a kernel not listed takes its scale
            from its current values at every call (QAT: the kernels train).
        **kwargs: `MultiHeadAttention`'s arguments.
    """

    def __init__(self, *args, weight_spec=None, kernel_qparams=None, **kwargs):
        super().__init__(*args, **kwargs)
        spec = as_spec(weight_spec, layer=self.name) if weight_spec is not None else QuantSpec(
            bits=8, symmetric=True, narrow_range=True)
        self.weight_spec = weight_only_spec(spec)
        self.kernel_qparams = {k: (float(s), int(z)) for k, (s, z) in (kernel_qparams or {}).items()}

    def build(self, query_shape, value_shape, key_shape=None):  # Keras maps call arguments to these names
        super().build(query_shape, value_shape, key_shape)
        for name in _PROJECTIONS:
            dense = getattr(self, name, None)
            if dense is not None:
                dense.call = _weight_only_call(dense, self.weight_spec, self, name)

    def freeze(self):
        """Hold each kernel's grid as it is now (post-training: the kernels no longer change), so a call
        fake-quantizes with constants instead of reducing every kernel again; saved in the config."""
        self.kernel_qparams = {}
        for name in _PROJECTIONS:
            dense = getattr(self, name, None)
            if dense is not None:
                kernel = np.asarray(ops.convert_to_numpy(dense.kernel))
                scale, zero_point = kq_ops.numpy_weight_qparams(kernel, self.weight_spec)
                self.kernel_qparams[name] = (float(np.reshape(scale, -1)[0]), int(np.reshape(zero_point, -1)[0]))

    def get_config(self):
        config = super().get_config()
        config["weight_spec"] = self.weight_spec.get_config()
        config["kernel_qparams"] = {k: list(v) for k, v in self.kernel_qparams.items()}
        return config
