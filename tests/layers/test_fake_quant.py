"""ActivationQuantizer and FrozenQuantizer: frozen fake-quantization of activations."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.layers import ActivationQuantizer, FrozenQuantizer
from tests.layers import to_np


def test_values_on_grid_and_clipped():
    q = ActivationQuantizer(kq.QuantSpec(bits=8), scale=0.1, zero_point=-128)
    y = to_np(q(np.array([0.0, 0.26, 0.24, 100.0, -1.0], "float32")))
    np.testing.assert_allclose(y, [0.0, 0.3, 0.2, 25.5, 0.0], atol=1e-6)


def test_matches_ops_fake_quant(rng):
    spec = kq.QuantSpec(bits=4, symmetric=True)
    x = rng.normal(size=(16, 5)).astype("float32")
    q = ActivationQuantizer(spec, scale=0.25, zero_point=0)
    np.testing.assert_array_equal(to_np(q(x)), to_np(kq.ops.fake_quant(x, 0.25, 0, spec)))


def test_per_channel_and_shape_check(rng):
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    q = ActivationQuantizer(spec)
    x = rng.normal(size=(4, 3)).astype("float32")
    q.build(x.shape)
    assert tuple(q.scale.shape) == (3,) and not q.scale.trainable and q.scale.dtype == "float32"
    q.set_qparams(np.array([0.01, 0.02, 0.03]), np.zeros(3))
    y = to_np(q(x))
    np.testing.assert_allclose(np.round(y / [0.01, 0.02, 0.03]), y / [0.01, 0.02, 0.03], atol=1e-3)
    with pytest.raises(ShapeMismatchError):
        q.set_qparams(np.ones(4), np.zeros(4))


def test_per_group_is_rejected():
    with pytest.raises(ConfigError) as e:
        ActivationQuantizer(kq.QuantSpec(granularity="per_group", group_size=4))
    assert e.value.field == "granularity"


def test_config_round_trip():
    spec = kq.QuantSpec(bits=16, symmetric=True)
    q = ActivationQuantizer(spec, name="relu_quant")
    clone = ActivationQuantizer.from_config(q.get_config())
    assert clone.spec == spec and clone.name == "relu_quant"


def test_save_load_keeps_scale(tmp_path):
    q = ActivationQuantizer(kq.QuantSpec(bits=8), scale=0.05, zero_point=-10, name="q")
    model = keras.Sequential([keras.Input((3,)), q])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    layer = loaded.get_layer("q")
    assert float(to_np(layer.scale)) == pytest.approx(0.05) and float(to_np(layer.zero_point)) == -10
    x = np.linspace(-2, 8, 12, dtype="float32").reshape(4, 3)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_frozen_quantizer_state_lives_on_the_layer():
    layer = keras.layers.Layer()
    state = FrozenQuantizer(kq.QuantSpec(granularity="per_channel", axis=-1)).build(layer, (None, 7), "output")
    assert {v.name for v in layer.weights} == {"output_scale", "output_zero_point"}
    assert tuple(state["scale"].shape) == (7,) and not state["zero_point"].trainable
