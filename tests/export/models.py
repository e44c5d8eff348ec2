"""The model and data every export test uses (trained once per process, in seconds).

A CNN with the parts the export issue names: Conv+BN+ReLU, a depthwise-
separable block (DepthwiseConv2D+BN+ReLU6, 1x1 Conv+BN), a residual Add with
a ReLU, max pooling, global average pooling, Dense layers (optionally an
AveragePooling2D before the global pool); on scikit-learn's digits.
"""

import functools

import keras
import numpy as np

import keras_quant as kq
from keras_quant.cli import datasets

L = keras.layers


def cnn(seed=0, average_pool=False):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.BatchNormalization(momentum=0.9, name="bn_dw")(y)
    y = L.ReLU(6.0, name="relu_dw")(y)
    y = L.Conv2D(16, 1, use_bias=False, name="pw")(y)
    y = L.BatchNormalization(momentum=0.9, name="bn_pw")(y)
    x = L.Add(name="add")([x, y])
    x = L.ReLU(name="relu_add")(x)
    x = L.MaxPooling2D(2, name="maxpool")(x)
    x = L.Conv2D(24, 3, padding="same", activation="relu", name="conv2")(x)
    if average_pool:
        x = L.AveragePooling2D(2, name="avgpool")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(32, activation="relu", name="fc")(x)
    x = L.Dense(10, name="logits")(x)
    return keras.Model(inp, x, name="export_cnn")


def compile_model(model, lr=0.003):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@functools.lru_cache(maxsize=None)
def _trained_weights(epochs, average_pool):
    """The CNN's weights after training, computed once per process (the export and analysis tests share it)."""
    (x_train, y_train), _ = datasets.load_digits()
    model = compile_model(cnn(average_pool=average_pool))
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return tuple(model.get_weights())


def trained(epochs=12, average_pool=False):
    """`(model, (x_train, y_train), (x_test, y_test))`: the CNN trained on the digits.

    A new compiled model each call, with the trained weights: trained once per process (one
    pytest-xdist worker), however many test modules ask, and no caller sees another's changes.
    """
    weights = _trained_weights(epochs, average_pool)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    model = compile_model(cnn(average_pool=average_pool))
    model.set_weights([w.copy() for w in weights])
    return model, (x_train, y_train), (x_test, y_test)


def calibrate(model, x):
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=64, callbacks=[cb], verbose=0)
    return cb.result


def output_steps(reference, got, scale):
    """Max |reference - got| in output quantization steps."""
    return float(np.max(np.abs(np.asarray(reference) - np.asarray(got))) / scale)


def within_steps(reference, got, scale, steps=2.0, fraction=0.99, max_steps=4.0):
    """At least `fraction` of the samples within `steps` output steps, and none beyond `max_steps`.

    For sub-8-bit schemes: an integer runtime rounds each layer once more than Keras' float
    simulation (int32 bias, fixed-point requantization), and a one-step difference in a wide-step
    tensor grows through the layers after it; the integer runtimes agree with each other closely.
    """
    per_sample = np.abs(np.asarray(reference) - np.asarray(got)).reshape(len(got), -1).max(axis=1) / scale
    return float(np.mean(per_sample <= steps + 1e-4)) >= fraction and float(per_sample.max()) <= max_steps + 1e-4
