"""QuantizeWrapper in "qat" mode across layer types: BatchNorm folding, training, weight grids."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.layers import QuantizeWrapper
from keras_quant.layers.folding import fold_blocker
from tests.layers import to_np
from tests.test_quantize import LAYER_CASES

L = keras.layers
W16 = kq.QuantSpec(bits=16, symmetric=True, granularity="per_channel")


def _data(name, shape, n=16):
    rng = np.random.default_rng(0)
    if name == "embedding":
        return rng.integers(0, 20, (n,) + shape).astype("int32")
    return rng.normal(size=(n,) + shape).astype("float32")


def _foldable(layer):
    return fold_blocker(layer, L.BatchNormalization()) is None


def _model(name, shape, make, batch_norm):
    keras.utils.set_random_seed(1)
    inp = keras.Input(shape, dtype="int32" if name == "embedding" else "float32", name="x")
    layer = make()
    y = layer(inp)
    bn = None
    if batch_norm:
        bn = L.BatchNormalization(name="bn")
        y = bn(y)
    model = keras.Model(inp, y)
    if bn is not None:  # non-trivial statistics to fold
        rng = np.random.default_rng(2)
        c = bn.moving_mean.shape[0]
        for var, value in ((bn.gamma, rng.uniform(0.5, 2, c)), (bn.beta, rng.normal(size=c)),
                           (bn.moving_mean, rng.normal(size=c) * 0.3), (bn.moving_variance, rng.uniform(0.5, 3, c))):
            var.assign(value.astype("float32"))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,make", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_qat_model_of_every_layer_type_matches_float_and_trains(name, shape, make):
    fold = _foldable(make())
    model = _model(name, shape, make, batch_norm=fold)
    x = _data(name, shape)
    # 16-bit weights, float activations: the QAT model is the float model up to tiny rounding,
    # which checks the BatchNorm folding arithmetic (inference form) for this layer type.
    qat = kq.quantize_model(model, kq.QuantConfig(weights=W16, activations=None), mode="qat")
    wrappers = [w for w in qat.layers if isinstance(w, QuantizeWrapper)]
    assert len(wrappers) == 1 and (wrappers[0].batch_norm is not None) == fold
    assert qat.quantization_report.folded == ((("bn", wrappers[0].name),) if fold else ())
    expected = to_np(model(x))
    np.testing.assert_allclose(to_np(qat(x)), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    # int8 QAT: one training step runs, counts the step and keeps weights on the 8-bit grid.
    qat = kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat")
    qat.compile(keras.optimizers.SGD(1e-3), "mse")
    qat.train_on_batch(x, np.zeros_like(expected))
    wrapper = next(w for w in qat.layers if isinstance(w, QuantizeWrapper))
    assert float(to_np(wrapper.schedule.step)) == 1.0
    for weight_name, w in wrapper.quantized_weights().items():
        spec = wrapper.weight_specs[weight_name]
        axis = spec.axis % len(w.shape)
        values = np.moveaxis(to_np(w), axis, 0).reshape(w.shape[axis], -1)
        assert max(len(np.unique(row)) for row in values) <= 2**spec.bits


@pytest.mark.parametrize("bn_statistics", ["quantized", "float"])
def test_folded_training_uses_batch_statistics_then_moving_ones(bn_statistics):
    """Until frozen, training output is conv -> BN(batch stats); the moving stats follow the batches."""
    keras.utils.set_random_seed(0)
    model = _model("conv2d", (6, 6, 3), lambda: L.Conv2D(4, 3), batch_norm=True)
    x = _data("conv2d", (6, 6, 3), n=32) * 3.0 + 1.0
    qat = kq.quantize_model(model, kq.QuantConfig(weights=W16, activations=None), mode="qat")
    folded = next(w for w in qat.layers if isinstance(w, QuantizeWrapper))
    config = folded.get_config()
    config["bn_statistics"] = bn_statistics
    wrapper = QuantizeWrapper.from_config(config)
    wrapper.build((None, 6, 6, 3))
    wrapper.set_weights(folded.get_weights())
    assert wrapper.bn_statistics == bn_statistics
    conv = model.get_layer(wrapper.name)
    bn = model.get_layer("bn")
    mean0 = to_np(wrapper.batch_norm.moving_mean).copy()

    y = to_np(wrapper(x, training=True))
    z = to_np(conv(x))
    mu, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
    reference = to_np(bn.gamma) * (z - mu) / np.sqrt(var + bn.epsilon) + to_np(bn.beta)
    np.testing.assert_allclose(y, reference, rtol=2e-3, atol=2e-3)
    m = bn.momentum
    np.testing.assert_allclose(to_np(wrapper.batch_norm.moving_mean), m * mean0 + (1 - m) * mu, rtol=1e-4, atol=1e-5)

    wrapper.freeze_batch_norm()
    frozen_mean = to_np(wrapper.batch_norm.moving_mean).copy()
    y = to_np(wrapper(x, training=True))
    np.testing.assert_array_equal(to_np(wrapper.batch_norm.moving_mean), frozen_mean)
    np.testing.assert_allclose(y, to_np(wrapper(x, training=False)), rtol=1e-5, atol=1e-5)


def test_per_group_4bit_weights_train():
    spec = kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=4, learnable=True)
    wrapper = QuantizeWrapper(L.Dense(6), kq.LayerQuantConfig(weights=spec, activations=None), observe_steps=0)
    model = keras.Sequential([keras.Input((8,)), wrapper])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    delta = wrapper._weight_state["kernel"]["scale_delta"]
    assert tuple(delta.shape) == (6, 2)  # 6 output channels, 8 inputs in groups of 4
    model.fit(x, x[:, :6], epochs=3, verbose=0)
    assert np.abs(to_np(delta)).max() > 0  # LSQ moved the step sizes
    w = to_np(wrapper.quantized_weights()["kernel"])
    scale, _ = wrapper.weight_qparams["kernel"]
    groups = w.T.reshape(6, 2, 4) / to_np(scale)[..., None]
    np.testing.assert_allclose(groups, np.round(groups), atol=1e-3)
    assert np.abs(np.round(groups)).max() <= 8
