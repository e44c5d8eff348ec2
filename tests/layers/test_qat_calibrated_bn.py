"""QAT from a calibration when BatchNorm moving statistics differ from the batch statistics.

A calibration sees the inference-mode model (moving statistics); QAT training
normalises with batch statistics. With moving variance far above the batch
variance the training outputs are much wider than the calibrated ranges. Before
the fix those ranges clipped the training outputs, each folded BatchNormalization
then re-normalised a nearly constant input with gain up to `1 / sqrt(eps)`, and
the gain compounded through the depth: gradients of 1e19 on MobileNetV2 and a
NaN loss after two Adam steps. On this small model the same clipping leaves the
loss stuck at 1.3863 (= ln 4) for all 12 steps before the fix (no gradient
gets through the clipped ranges); after it the loss falls and gradients stay small.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq

pytestmark = pytest.mark.tensorflow  # calibrates with kq.CalibrationCallback (TensorFlow's trainer)
tf = pytest.importorskip("tensorflow")  # collected (and skipped) under JAX where TensorFlow is absent

L = keras.layers


def _model(depth=6, moving_variance=100.0):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    y = inp
    for i in range(depth):
        y = L.Conv2D(8, 3, padding="same", use_bias=False, name=f"conv{i}")(y)
        y = L.BatchNormalization(name=f"bn{i}")(y)
        y = L.ReLU(name=f"relu{i}")(y)
    y = L.GlobalAveragePooling2D()(y)
    model = keras.Model(inp, L.Dense(4, name="logits")(y))
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):  # far above the batch variance (about 1 or less)
            layer.moving_variance.assign(np.full(8, moving_variance, "float32"))
    return model


def _train(qmodel, x, labels, steps):
    opt = keras.optimizers.Adam(1e-3)
    lossf = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses, gmax = [], []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = lossf(labels, qmodel(x, training=True))
        grads = tape.gradient(loss, qmodel.trainable_variables)
        pairs = [(g, v) for g, v in zip(grads, qmodel.trainable_variables) if g is not None]
        gmax.append(max(float(tf.reduce_max(tf.abs(g))) for g, _ in pairs))
        losses.append(float(loss))
        opt.apply_gradients(pairs)
    return np.array(losses), np.array(gmax)


def test_qat_from_a_calibration_trains_when_moving_variance_exceeds_batch_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 4, 64)
    model = _model()
    model.predict(x, verbose=0, callbacks=[cb := kq.CalibrationCallback()])
    # The calibrated ranges are those of outputs about 10x narrower than the training outputs.
    bn0 = model.get_layer("bn0")
    z = keras.ops.convert_to_numpy(model.get_layer("conv0")(x))
    assert float(bn0.moving_variance[0]) > 50 * z.var(axis=(0, 1, 2)).max()
    qmodel = kq.quantize_model(model, mode="qat", calibration=cb.result)
    losses, gmax = _train(qmodel, x, labels, steps=12)
    assert np.isfinite(losses).all()
    assert gmax.max() < 100.0, gmax  # a float model's training-mode gradients here stay below 10
    assert losses[-1] < losses[0] - 0.05, losses
    # The ranges now cover the training outputs: the first layer's output range is at least the
    # training-mode (batch-normalised) output's, not the calibrated one's.
    relu0 = keras.Model(model.inputs, model.get_layer("relu0").output)
    bn_train = keras.ops.convert_to_numpy(relu0(x, training=True))
    q_hi = [float(keras.ops.convert_to_numpy(v)) for v in qmodel.non_trainable_variables
            if v.path.startswith("relu0") and v.path.endswith("/max")]
    assert q_hi and q_hi[0] > 0.5 * bn_train.max()
