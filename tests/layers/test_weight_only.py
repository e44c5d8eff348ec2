"""WeightOnlyMultiHeadAttention: float attention whose four projection kernels lie on an integer grid.

Backend-agnostic (keras.ops): also runs under JAX.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.layers.weight_only import WeightOnlyMultiHeadAttention

PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def _grid(kernel, bits):
    """Reference: symmetric narrow-range fake quantization with one scale, round half up (numpy)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.float32(np.abs(kernel).max()) / np.float32(qmax)
    return np.clip(np.floor(kernel / scale + np.float32(0.5)), -qmax, qmax) * scale


@pytest.mark.parametrize("bits", [8, 4])
def test_outputs_equal_float_attention_with_kernels_on_the_grid(bits):
    keras.utils.set_random_seed(0)
    spec = kq.QuantSpec(bits=bits, symmetric=True, narrow_range=True, granularity="per_channel")
    layer = WeightOnlyMultiHeadAttention(num_heads=2, key_dim=4, weight_spec=spec)
    reference = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    rng = np.random.default_rng(1)
    q, v = rng.normal(size=(3, 5, 6)).astype("float32"), rng.normal(size=(3, 7, 6)).astype("float32")
    layer(q, v)
    reference(q, v)
    assert layer.weight_spec.granularity == "per_tensor" and layer.weight_spec.bits == bits
    weights = [rng.normal(size=w.shape).astype("float32") for w in layer.weights]
    layer.set_weights(weights)
    kernels = {id(getattr(layer, name).kernel) for name in PROJECTIONS}
    reference.set_weights([_grid(w, bits) if id(v_) in kernels else w for w, v_ in zip(weights, layer.weights)])
    got = keras.ops.convert_to_numpy(layer(q, v))
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(reference(q, v)), atol=2e-5, rtol=1e-5)
    # The stored kernels stay float: only the computation reads the grid.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer._query_dense.kernel), weights[0])


def test_config_round_trip_keeps_the_spec_and_the_grid():
    keras.utils.set_random_seed(0)
    layer = WeightOnlyMultiHeadAttention(num_heads=2, key_dim=4, weight_spec=kq.QuantSpec(bits=6))
    x = np.random.default_rng(2).normal(size=(2, 5, 6)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x, x))
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
    clone(x, x)
    clone.set_weights(layer.get_weights())
    assert clone.weight_spec == layer.weight_spec
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone(x, x)), out)


def test_frozen_kernels_give_the_same_outputs_with_constant_grids_and_save_them():
    """PTQ freezes the kernels' grids: the same bits as computing them each call, no reduction left in the
    traced graph, and the grids travel in the config (safe_mode)."""
    keras.utils.set_random_seed(0)
    layer = WeightOnlyMultiHeadAttention(num_heads=2, key_dim=4, weight_spec=kq.QuantSpec(bits=8))
    x = np.random.default_rng(3).normal(size=(2, 5, 6)).astype("float32")
    live = keras.ops.convert_to_numpy(layer(x, x))
    layer.freeze()
    assert set(layer.kernel_qparams) == set(PROJECTIONS)
    for name in PROJECTIONS:
        kernel = keras.ops.convert_to_numpy(getattr(layer, name).kernel)
        scale, zero_point = layer.kernel_qparams[name]
        assert zero_point == 0 and scale == np.float32(np.abs(kernel).max()) / np.float32(127)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, x)), live)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer), safe_mode=True)
    clone(x, x)
    clone.set_weights(layer.get_weights())
    assert clone.kernel_qparams == layer.kernel_qparams
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone(x, x)), live)
    if keras.backend.backend() == "tensorflow":  # the frozen call reduces no kernel: no Abs / Max ops
        import tensorflow as tf

        graph = tf.function(lambda t: layer(t, t)).get_concrete_function(tf.TensorSpec(x.shape)).graph
        types = {op.type for op in graph.get_operations()}
        assert not types & {"Abs", "Max"} and "FakeQuantWithMinMaxVars" in types, sorted(types)


@pytest.mark.tensorflow
def test_an_export_trace_of_frozen_kernels_is_one_fake_quant_op_each_with_the_same_values():
    """In an inference scope (export), a frozen kernel is the one op the converter reads, with the range
    `kq.ops.fake_quant` computes: the same values, without its dozen shape and gradient ops per kernel."""
    import tensorflow as tf

    from keras_quant.layers.inference import InferencePlan, inference_scope

    keras.utils.set_random_seed(0)
    layer = WeightOnlyMultiHeadAttention(num_heads=2, key_dim=4, weight_spec=kq.QuantSpec(bits=8))
    x = np.random.default_rng(3).normal(size=(2, 5, 6)).astype("float32")
    layer(x, x)
    layer.freeze()
    expected = keras.ops.convert_to_numpy(layer(x, x))
    fn = tf.function(lambda t: layer(t, t))
    with inference_scope(InferencePlan()):
        cf = fn.get_concrete_function(tf.TensorSpec(x.shape))
        got = cf(tf.constant(x)).numpy()
    types = [op.type for op in cf.graph.get_operations()]
    assert types.count("FakeQuantWithMinMaxVars") == len(PROJECTIONS)
    assert "StopGradient" not in types  # no straight-through gradient: nothing trains in an export
    outside = tf.function(lambda t: layer(t, t)).get_concrete_function(tf.TensorSpec(x.shape))
    assert len(types) < len(outside.graph.get_operations()) - 8 * len(PROJECTIONS)
    np.testing.assert_array_equal(got, expected)
