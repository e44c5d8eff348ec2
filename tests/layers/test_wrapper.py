"""QuantizeWrapper: frozen per-channel weight quantizers, output quantizer, serialization."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.config import LayerQuantConfig
from keras_quant.errors import ConfigError, UnsupportedLayerError
from keras_quant.layers import QuantizeWrapper
from tests.layers import to_np

L = keras.layers
W8 = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel", narrow_range=True)
W4 = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True)


def reference_fake_quant(w, bits, axis):
    """Numpy symmetric narrow-range per-channel fake quantization (half-up rounding)."""
    qmax = 2 ** (bits - 1) - 1
    moved = np.moveaxis(w, axis, -1)
    scale = np.maximum(np.abs(moved).reshape(-1, moved.shape[-1]).max(0) / qmax, np.finfo(np.float32).eps)
    q = np.clip(np.floor(moved / scale + 0.5), -qmax, qmax)
    return np.moveaxis(q * scale, -1, axis).astype("float32")


def distinct_per_channel(w, axis):
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return max(len(np.unique(r)) for r in rows)


CASES = [
    (lambda: L.Dense(6), (5, 7), {"kernel": -1}),
    (lambda: L.Conv2D(6, 3, activation="relu"), (2, 6, 6, 3), {"kernel": -1}),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3), {"kernel": -2}),
    (lambda: L.SeparableConv2D(4, 3), (2, 6, 6, 3), {"depthwise_kernel": -2, "pointwise_kernel": -1}),
]


@pytest.mark.parametrize("make, shape, axes", CASES)
@pytest.mark.parametrize("spec, bits", [(W8, 8), (W4, 4)])
def test_matches_layer_with_fake_quantized_weights(make, shape, axes, spec, bits, rng):
    x = rng.normal(size=shape).astype("float32")
    wrapper = QuantizeWrapper(make(), LayerQuantConfig(weights=spec, activations=None))
    y = to_np(wrapper(x))
    layer = wrapper.layer
    float_weights = {name: to_np(getattr(layer, name)) for name in axes}
    assert {n: s.axis for n, s in wrapper.weight_specs.items()} == axes
    reference = make()
    reference(x)
    reference.set_weights(layer.get_weights())
    for name, axis in axes.items():
        getattr(reference, name).assign(reference_fake_quant(float_weights[name], bits, axis))
    np.testing.assert_allclose(y, to_np(reference(x)), rtol=1e-5, atol=1e-5)
    # The wrapped layer's own variables keep their float values.
    for name in axes:
        np.testing.assert_array_equal(to_np(getattr(layer, name)), float_weights[name])


@pytest.mark.parametrize("make, shape, axes", CASES)
def test_quantized_weights_lie_on_the_grid(make, shape, axes, rng):
    wrapper = QuantizeWrapper(make(), (W4, None))
    wrapper(rng.normal(size=shape).astype("float32"))
    for name, w in wrapper.quantized_weights().items():
        w = to_np(w)
        assert distinct_per_channel(w, axes[name]) <= 2**4
        scale = to_np(wrapper.weight_qparams[name][0])
        q = np.moveaxis(w, axes[name], -1) / scale
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)


def test_default_config_and_output_quantizer(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    wrapper = QuantizeWrapper(L.Dense(3, activation="relu"))  # QuantConfig() defaults: W8A8
    assert wrapper.weight_specs["kernel"] == W8 and wrapper.output_quantizer is not None
    wrapper(x)
    wrapper.set_output_qparams(0.01, -128)
    y = to_np(wrapper(x))
    assert y.min() >= 0.0 and y.max() <= 2.55 + 1e-6
    np.testing.assert_allclose(y / 0.01, np.round(y / 0.01), atol=1e-3)
    assert wrapper.layer.name == wrapper.name


def test_quant_config_is_resolved_per_layer():
    config = kq.QuantConfig.int8().set_layer_name("head", weights=W4, activations=None)
    wrapper = QuantizeWrapper(L.Dense(3, name="head"), config)
    assert wrapper.weight_specs["kernel"] == W4 and wrapper.output_quantizer is None


def test_save_load_round_trip(tmp_path, rng):
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    inp = keras.Input((6, 6, 3))
    wrapper = QuantizeWrapper(L.DepthwiseConv2D(3, name="dw"), (W8, kq.QuantSpec(bits=8)), mode="frozen")
    model = keras.Model(inp, L.Flatten()(wrapper(inp)))
    wrapper.set_output_qparams(0.02, 3)
    model.save(tmp_path / "w.keras")
    loaded = keras.models.load_model(tmp_path / "w.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    again = loaded.get_layer("dw")
    assert isinstance(again, QuantizeWrapper) and isinstance(again.layer, L.DepthwiseConv2D)
    assert again.quant_config == wrapper.quant_config and again.stage == "frozen"


def test_trains_with_straight_through_gradient(rng):
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    wrapper = QuantizeWrapper(L.Dense(2), (W8, None))
    model = keras.Sequential([keras.Input((4,)), wrapper])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    kernel = to_np(wrapper.layer.kernel).copy()
    bias = to_np(wrapper.layer.bias).copy()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert not np.allclose(to_np(wrapper.layer.kernel), kernel)
    assert not np.allclose(to_np(wrapper.layer.bias), bias)


def test_observe_weights_follows_new_weights(rng):
    wrapper = QuantizeWrapper(L.Dense(2), (W8, None))
    wrapper(np.zeros((1, 3), "float32"))
    wrapper.layer.kernel.assign(np.full((3, 2), 12.7, "float32"))
    wrapper.observe_weights()
    np.testing.assert_allclose(to_np(wrapper.weight_qparams["kernel"][0]), [0.1, 0.1], rtol=1e-6)


def test_errors():
    with pytest.raises(UnsupportedLayerError) as e:
        QuantizeWrapper(L.Lambda(lambda t: t, name="lam"))
    assert e.value.layer == "lam"
    with pytest.raises(ConfigError) as e:
        QuantizeWrapper(L.Dense(2), mode="bogus")
    assert e.value.field == "mode"
    with pytest.raises(ConfigError):
        QuantizeWrapper(L.Dense(2), config="int8")
    wrapper = QuantizeWrapper(L.Dense(2), (W8, None))
    wrapper(np.zeros((1, 3), "float32"))
    with pytest.raises(ConfigError):
        wrapper.set_output_qparams(0.1, 0)


@pytest.mark.tensorflow
def test_compiled_graph_has_fake_quant_ops():
    import tensorflow as tf

    wrapper = QuantizeWrapper(L.Conv2D(4, 3), (W8, kq.QuantSpec(bits=8)))
    wrapper(np.zeros((1, 6, 6, 3), "float32"))
    graph = tf.function(wrapper).get_concrete_function(tf.TensorSpec((None, 6, 6, 3))).graph
    types = {op.type for op in graph.get_operations()}
    assert {"FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxVars"} <= types


@pytest.mark.parametrize("mode", ["frozen", "qat"])
def test_own_activation_is_quantized_before_and_after(mode, rng, tmp_path):
    """A softmax / sigmoid / tanh the layer applies itself: quantized input and output, as TFLite runs it."""
    a8 = kq.QuantSpec(bits=8)
    wrapper = QuantizeWrapper(L.Dense(4, activation="softmax", name="out"), LayerQuantConfig(W8, a8), mode=mode)
    x = rng.normal(size=(32, 6)).astype("float32")
    wrapper(x)
    assert wrapper.layer.activation is keras.activations.linear and wrapper.activation.__name__ == "softmax"
    linear = x @ to_np(wrapper.quantized_weights()["kernel"]) + to_np(wrapper.layer.bias)
    wrapper.set_preactivation_qparams(*kq.ops.compute_qparams(np.float32(linear.min()), np.float32(linear.max()), a8))
    wrapper.set_output_qparams(*kq.ops.compute_qparams(np.float32(0.0), np.float32(1.0), a8))
    if mode == "qat":
        wrapper.set_range_mode("frozen")
    pre = to_np(kq.ops.fake_quant(linear, *wrapper.preactivation_qparams, a8))
    probs = np.exp(pre - pre.max(-1, keepdims=True))
    want = to_np(kq.ops.fake_quant(probs / probs.sum(-1, keepdims=True), *wrapper.output_qparams, a8))
    np.testing.assert_allclose(to_np(wrapper(x)), want, atol=1e-6)

    model = keras.Sequential([keras.Input((6,)), wrapper])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(to_np(loaded(x)), to_np(model(x)))
    assert loaded.layers[-1].activation.__name__ == "softmax"


def test_fused_activations_and_weight_only_configs_stay_inside_the_layer():
    relu = QuantizeWrapper(L.Dense(4, activation="relu"), kq.QuantConfig.int8(), mode="frozen")
    weights_only = QuantizeWrapper(L.Dense(4, activation="softmax"), LayerQuantConfig(W8, None), mode="frozen")
    for wrapper in (relu, weights_only):
        wrapper.build((None, 6))
        assert wrapper.activation is None and wrapper.preactivation_qparams is None
        assert wrapper.layer.activation.__name__ in ("relu", "softmax")
