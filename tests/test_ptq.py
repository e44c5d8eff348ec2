"""Post-training quantization end to end: CalibrationCallback -> CalibrationResult -> quantize_model."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.cli import datasets
from tests.test_quantize import cnn  # Conv+BN+ReLU, depthwise-separable block, residual Add, pooling, Dense

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]  # the callback hooks TensorFlow's trainer


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    model = cnn()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=20, batch_size=64, verbose=0)
    return model, x_train, y_train, x_test, y_test


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == y))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_int8_ptq_within_one_point_of_float(trained, observer, tmp_path):
    model, x_train, y_train, x_test, y_test = trained
    config = kq.QuantConfig(activations=kq.QuantSpec(bits=8, observer=observer))
    cb = kq.CalibrationCallback(config=config, max_samples=512, sampling="random", seed=0,
                                sampling_options={"rate": 0.6})
    model.predict(x_train, batch_size=64, callbacks=[cb], verbose=0)
    assert cb.samples_seen == 512
    path = tmp_path / "calib.msgpack.zst"
    cb.result.save(path)
    result = kq.CalibrationResult.load(path)
    qmodel = kq.quantize_model(model, config, calibration=result)
    float_acc, q_acc = accuracy(model, x_test, y_test), accuracy(qmodel, x_test, y_test)
    assert float_acc > 0.85
    assert q_acc >= float_acc - 0.01, (float_acc, q_acc)
    # The activation quantizers use the calibrated ranges.
    for layer in qmodel.layers:
        if isinstance(layer, kq.ActivationQuantizer):
            assert float(layer.scale.numpy()) > 0


def test_calibrate_during_fit_then_quantize(trained):
    model, x_train, y_train, x_test, y_test = trained
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.compile(keras.optimizers.SGD(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kq.CalibrationCallback()
    clone.fit(x_train, y_train, epochs=1, batch_size=64,
              callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(clone, calibration=cb.result)
    assert accuracy(qmodel, x_test, y_test) >= accuracy(clone, x_test, y_test) - 0.02
