"""Batch-norm folding: numpy arithmetic and folded clones of compute layers."""

import keras
import numpy as np
import pytest

from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.layers.folding import fold_batch_norm, fold_blocker, fold_into_layer
from tests.layers import to_np

L = keras.layers


def randomize_bn(bn, rng):
    for var in bn.weights:
        values = rng.uniform(0.5, 1.5, size=var.shape) if "variance" in var.name else rng.normal(size=var.shape)
        var.assign(values.astype("float32"))


LAYERS = [
    (lambda: L.Dense(5), (6, 7)),
    (lambda: L.Dense(5, use_bias=False), (6, 7)),
    (lambda: L.Conv2D(5, 3, padding="same"), (2, 6, 6, 3)),
    (lambda: L.Conv2D(5, 3, use_bias=False), (2, 6, 6, 3)),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3)),
    (lambda: L.SeparableConv2D(4, 3), (2, 6, 6, 3)),
    (lambda: L.Conv2DTranspose(4, 3), (2, 5, 5, 3)),
    (lambda: L.Conv1D(4, 3), (2, 9, 3)),
]


@pytest.mark.parametrize("make, shape", LAYERS)
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False), (False, False)])
def test_folded_layer_matches_layer_then_batch_norm(make, shape, center, scale, rng):
    x = rng.normal(size=shape).astype("float32")
    layer, bn = make(), L.BatchNormalization(center=center, scale=scale, epsilon=1e-3)
    bn(layer(x), training=False)  # builds both
    randomize_bn(bn, rng)
    expected = to_np(bn(layer(x), training=False))
    folded = fold_into_layer(layer, bn)
    assert folded is not layer and folded.name == layer.name and folded.use_bias
    np.testing.assert_allclose(to_np(folded(x)), expected, rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_numbers():
    kernel = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")
    k, b = fold_batch_norm(kernel, np.array([1.0, 1.0]), np.array([2.0, 1.0]), np.array([0.5, 0.0]),
                           np.array([1.0, 3.0]), np.array([4.0, 1.0]), 0.0, channel_axis=-1)
    np.testing.assert_allclose(k, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(b, [0.5, -2.0])
    k, b = fold_batch_norm(kernel, None, None, None, np.zeros(2), np.full(2, 4.0), 0.0)
    np.testing.assert_allclose(k, kernel / 2)
    np.testing.assert_allclose(b, [0.0, 0.0])


def test_depthwise_channel_order():
    kernel = np.ones((1, 1, 2, 3), "float32")  # in=2, multiplier=3: output channel i * 3 + m
    k, _ = fold_batch_norm(kernel, None, np.arange(6.0), None, np.zeros(6), np.ones(6), 0.0, channel_axis=(-2, -1))
    np.testing.assert_allclose(k[0, 0], [[0, 1, 2], [3, 4, 5]])


def test_channel_mismatch():
    with pytest.raises(ShapeMismatchError):
        fold_batch_norm(np.ones((3, 4)), None, None, None, np.zeros(5), np.ones(5), 1e-3)


def test_blockers():
    x = np.zeros((1, 6, 6, 3), "float32")
    relu_conv, bn = L.Conv2D(4, 3, activation="relu"), L.BatchNormalization()
    bn(relu_conv(x))
    assert "activation" in fold_blocker(relu_conv, bn)
    with pytest.raises(ConfigError):
        fold_into_layer(relu_conv, bn)
    conv, bn_axis1 = L.Conv2D(4, 3), L.BatchNormalization(axis=1)
    bn_axis1(conv(x))
    assert "axis" in fold_blocker(conv, bn_axis1)
    assert fold_blocker(L.Dense(3), L.LayerNormalization()) is not None
