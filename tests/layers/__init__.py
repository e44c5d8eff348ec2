"""Test helpers shared by the layer and quantize_model tests."""

import keras
import numpy as np

from keras_quant import ops as kq_ops
from keras_quant.errors import NoDataError
from keras_quant.layers import walk
from keras_quant.layers.rules import preactivation_key, split_activation


def _graph(model):
    return model._functional if isinstance(model, keras.Sequential) else model


class ProbeCalibration:
    """TEST HELPER standing in for `kq.CalibrationResult`: min-max ranges of every layer output.

    Runs `keras.Model(inputs, [layer outputs])` probes (nested models probed
    on their own inputs) over `x` (and, for a layer with its own softmax /
    sigmoid / ..., the layer's linear output as `"<key>:preactivation"`) and
    keys each range as `kq.layers.walk` does:
    a layer's name (its path where names collide), a model input by its input
    layer's name. `drop` removes keys, to simulate a branch no sample reached.
    """

    def __init__(self, model, x, drop=()):
        self.keys = {id(layer): key for key, layer in walk.layer_keys(model).items()}
        self.ranges = {}
        xs = x if isinstance(x, (list, tuple)) else [x]
        for key, value in zip(walk.input_keys(model), xs):
            self._record(key, value)
        self._collect(model, xs)
        for key in drop:
            self.ranges.pop(key, None)

    def _record(self, key, value):
        value = np.asarray(value, "float32")
        lo, hi = float(value.min()), float(value.max())
        old = self.ranges.get(key)
        self.ranges[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def _collect(self, model, xs):
        graph = _graph(model)
        nodes = [n for depth in sorted(graph._nodes_by_depth, reverse=True) for n in graph._nodes_by_depth[depth]]
        nodes = [n for n in nodes if n.operation is not None and not n.is_input]
        # A nested model is probed on its own inputs; a leaf layer's output is recorded.
        taps = [n.input_tensors[0] if isinstance(n.operation, keras.Model) else n.outputs[0] for n in nodes]
        values = keras.Model(graph.inputs, taps)(list(xs))
        if len(taps) == 1:  # a one-output model returns the tensor itself, not a list
            values = [values]
        for node, value in zip(nodes, values):
            layer, value = node.operation, keras.ops.convert_to_numpy(value)
            if isinstance(layer, keras.Model):
                self._collect(layer, [value])
            elif "float" in str(value.dtype):
                key = self.keys.get(id(layer), layer.name)
                self._record(key, value)
                activation = split_activation(layer)
                if activation is not None:  # the input of the layer's own softmax / sigmoid / ...
                    inputs = keras.Model(graph.inputs, node.input_tensors[0])(list(xs))
                    layer.activation = keras.activations.linear
                    try:
                        self._record(preactivation_key(key), keras.ops.convert_to_numpy(layer(inputs)))
                    finally:
                        layer.activation = activation
                if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
                    # The depthwise half's output, a tensor of its own once the layer is split.
                    inputs = keras.Model(graph.inputs, node.input_tensors[0])(list(xs))
                    depthwise = keras.ops.depthwise_conv(
                        inputs, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
                        data_format=layer.data_format, dilation_rate=layer.dilation_rate)
                    self._record(f"{key}:depthwise", keras.ops.convert_to_numpy(depthwise))

    def __contains__(self, key):
        return key in self.ranges

    def qparams(self, key, spec):
        if key not in self.ranges:
            raise NoDataError(key, reason="no calibration sample reached this layer")
        scale, zero_point = kq_ops.compute_qparams(*self.ranges[key], spec)
        return np.asarray(keras.ops.convert_to_numpy(scale), "float32"), np.asarray(
            keras.ops.convert_to_numpy(zero_point), "int32"
        )


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))
