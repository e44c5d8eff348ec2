"""Rewrites into integer form: per-channel affine layers as 1x1 depthwise convolutions.

TFLite has no integer kernel for a standalone BatchNormalization (one not
after a convolution), a `Rescaling`, a `Normalization` or ConvNeXt's
`LayerScale`: the converter lowers them to a float MUL and ADD, a float island
in an "int8" file. Each is `y = a * x + b` per channel, which is exactly a
1x1 depthwise convolution with kernel `a` and bias `b`: TFLite runs that in
int8 (per-channel weight scales hold each `a` exactly, the bias is int32),
and a following ReLU / ReLU6 fuses into it.

Example:

>>> a, b = affine_of(keras.layers.BatchNormalization())   # after build: per-channel scale and offset
"""

import keras
import numpy as np

__all__ = ["affine_of", "affine_layer", "set_affine_weights"]

_EPS_NORMALIZATION = 1e-7  # keras.layers.Normalization divides by max(sqrt(variance), this)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def _channels_last(layer, axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    axes = [a % rank for a in axes if a is not None]
    return axes == [rank - 1]


def affine_of(layer, rank, channels):
    """`(a, b)`, per-channel float32 arrays with `layer(x) == a * x + b` on the last axis, or None.

    Args:
        layer: A built BatchNormalization, Rescaling, Normalization or LayerScale.
        rank: Rank of the layer's input (batch included).
        channels: Size of the last axis.
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        if not _channels_last(layer, layer.axis, rank):
            return None
        var = _np(layer.moving_variance)
        a = (_np(layer.gamma) if layer.scale else 1.0) / np.sqrt(var + layer.epsilon)
        b = (_np(layer.beta) if layer.center else 0.0) - _np(layer.moving_mean) * a
    elif isinstance(layer, keras.layers.Rescaling):
        a, b = _np(layer.scale), _np(layer.offset)
    elif isinstance(layer, keras.layers.Normalization):
        if layer.axis and not _channels_last(layer, tuple(layer.axis), rank):
            return None
        mean, var = _np(layer.mean), _np(layer.variance)
        std = np.maximum(np.sqrt(var), _EPS_NORMALIZATION)
        a, b = (std, mean) if layer.invert else (1.0 / std, -mean / std)
    elif type(layer).__name__ == "LayerScale" and hasattr(layer, "gamma"):  # keras.applications.convnext
        a, b = _np(layer.gamma), 0.0
    else:
        return None
    try:
        a = np.broadcast_to(np.asarray(a).reshape(-1) if np.size(a) == channels else a, (channels,))
        b = np.broadcast_to(np.asarray(b).reshape(-1) if np.size(b) == channels else b, (channels,))
    except ValueError:
        return None
    return a.astype("float32"), b.astype("float32")


def affine_layer(rank, name):
    """The unbuilt 1x1 depthwise convolution that computes a per-channel affine map at this input rank."""
    if rank == 4:
        return keras.layers.DepthwiseConv2D(1, use_bias=True, name=name)
    if rank == 3:
        return keras.layers.DepthwiseConv1D(1, use_bias=True, name=name)
    return None


def set_affine_weights(layer, a, b):
    """Give a built `affine_layer` the kernel `a` and bias `b`."""
    kernel = layer.kernel
    layer.set_weights([np.reshape(a, tuple(kernel.shape)), np.asarray(b)])
