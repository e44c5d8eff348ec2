"""Batch-norm folding: numpy arithmetic and folded clones of compute layers."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.layers.folding import fold_batch_norm, fold_blocker, fold_input_affine, fold_into_layer
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


# Issue "Real models end to end": keras.applications write BatchNormalization(axis=3) on 4-D tensors
# (ResNet50's conv1_bn); tf.keras configs may hold [3] or [-1]. Each spelling of the last axis folds.
AXIS_LAYERS = [
    ("conv2d", lambda: L.Conv2D(5, 3, padding="same", use_bias=False), (2, 6, 6, 3)),
    ("depthwise", lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3)),
    ("dense", lambda: L.Dense(5), (2, 7)),
    ("conv1d", lambda: L.Conv1D(4, 3), (2, 9, 3)),
]
SPELLINGS = ["-1", "last", "[last]", "[-1]"]


def _spelled_bn(spelling, rank):
    """A BatchNormalization over the last axis of a `rank`-D tensor, its axis spelled as given."""
    last = rank - 1
    axis = {"-1": -1, "last": last, "[last]": [last], "[-1]": [-1]}[spelling]
    bn = L.BatchNormalization(axis=axis if isinstance(axis, int) else axis[0], name="bn")
    return bn, axis


def _built_pair(make, shape, spelling, rng):
    """`(x, layer, bn, expected)`: a built layer and a BatchNormalization whose axis has `spelling`, and
    `bn(layer(x))` computed with the plain last axis."""
    x = rng.normal(size=shape).astype("float32")
    layer = make()
    bn, axis = _spelled_bn(spelling, len(shape))
    bn(layer(x), training=False)
    randomize_bn(bn, rng)
    bn.axis = -1
    expected = to_np(bn(layer(x), training=False))
    bn.axis = axis  # Keras 3's constructor casts to int; a restored tf.keras layer keeps a list
    return x, layer, bn, expected


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("kind, make, shape", AXIS_LAYERS, ids=[c[0] for c in AXIS_LAYERS])
def test_every_spelling_of_the_last_axis_folds_ptq(kind, make, shape, spelling, rng):
    x, layer, bn, expected = _built_pair(make, shape, spelling, rng)
    assert fold_blocker(layer, bn) is None
    folded = fold_into_layer(layer, bn)
    np.testing.assert_allclose(to_np(folded(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("kind, make, shape", AXIS_LAYERS, ids=[c[0] for c in AXIS_LAYERS])
def test_every_spelling_of_the_last_axis_folds_qat(kind, make, shape, spelling, rng):
    """The QAT wrapper gets an *unbuilt* layer and BatchNormalization (as `quantize_model` clones them)."""
    from keras_quant.config import LayerQuantConfig, QuantSpec
    from keras_quant.layers import QuantizeWrapper

    x, layer, bn, expected = _built_pair(make, shape, spelling, rng)
    w16 = QuantSpec(bits=16, symmetric=True, granularity="per_channel")
    fresh_bn, axis = _spelled_bn(spelling, len(shape))
    fresh_bn.axis = axis
    wrapper = QuantizeWrapper(type(layer).from_config(layer.get_config()), LayerQuantConfig(w16, None),
                              mode="qat", batch_norm=fresh_bn)
    wrapper.build(shape)
    wrapper.layer.set_weights(layer.get_weights())
    for var, value in zip(fresh_bn.weights, bn.weights):
        var.assign(value)
    wrapper.observe_weights()
    got = to_np(wrapper(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    y = to_np(wrapper(x, training=True))  # batch statistics over every axis but the last
    assert y.shape == expected.shape and np.isfinite(y).all()


@pytest.mark.parametrize("kind, make, shape", AXIS_LAYERS, ids=[c[0] for c in AXIS_LAYERS])
@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_quantize_model_folds_a_positive_last_axis(kind, make, shape, mode, rng):
    import keras_quant as kq

    inp = keras.Input(shape[1:])
    layer = make()
    bn = L.BatchNormalization(axis=len(shape) - 1, name="bn")
    model = keras.Model(inp, bn(layer(inp)))
    randomize_bn(bn, rng)
    w16 = kq.QuantSpec(bits=16, symmetric=True, granularity="per_channel")
    q = kq.quantize_model(model, kq.QuantConfig(weights=w16, activations=None), mode=mode)
    assert q.quantization_report.folded == (("bn", layer.name),)
    x = rng.normal(size=shape).astype("float32")
    expected = to_np(model(x))
    np.testing.assert_allclose(to_np(q(x)), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_axis_blockers_name_the_axis():
    x = np.zeros((1, 6, 6, 3), "float32")
    conv, bn = L.Conv2D(4, 3), L.BatchNormalization(axis=2)
    bn(conv(x))
    assert "axis 2" in fold_blocker(conv, bn) and "4-D" in fold_blocker(conv, bn)
    bn.axis = [1, 3]
    assert "axes [1, 3]" in fold_blocker(conv, bn)
    # An unbuilt conv knows its rank: axis 2 of its 4-D output is not the channel axis.
    assert "axis 2" in fold_blocker(L.Conv2D(4, 3), L.BatchNormalization(axis=2))
    assert fold_blocker(L.Conv2D(4, 3), L.BatchNormalization(axis=3)) is None


INPUT_AFFINE_LAYERS = [
    (lambda: L.Dense(5), (6, 7)),
    (lambda: L.Dense(5, use_bias=False), (2, 4, 7)),
    (lambda: L.Conv2D(5, 3), (2, 6, 6, 3)),
    (lambda: L.Conv2D(5, 3, strides=2, use_bias=False), (2, 7, 7, 3)),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3)),
    (lambda: L.DepthwiseConv1D(3, depth_multiplier=3, use_bias=False), (2, 9, 2)),
    (lambda: L.Conv1D(4, 3), (2, 9, 3)),
]


@pytest.mark.parametrize("make, shape", INPUT_AFFINE_LAYERS)
@pytest.mark.parametrize("with_bn", [False, True])
def test_layer_with_folded_input_affine_matches_affine_then_layer(make, shape, with_bn, rng):
    x = rng.normal(size=shape).astype("float32")
    a = rng.uniform(0.2, 3, size=shape[-1]).astype("float32") * rng.choice([-1, 1], size=shape[-1])
    b = rng.normal(size=shape[-1]).astype("float32")
    layer = make()
    bn = L.BatchNormalization(epsilon=1e-3) if with_bn else None
    y = layer(a * x + b)
    if bn is not None:
        bn(y, training=False)
        randomize_bn(bn, rng)
        y = bn(y, training=False)
    folded = fold_into_layer(layer, bn, input_affine=(a, b), bias_offset=np.float32(0.5))
    assert folded.use_bias and folded.name == layer.name
    np.testing.assert_allclose(to_np(folded(x)), to_np(y) + 0.5, rtol=1e-4, atol=1e-4)


def _reference_input_affine(kernel, bias, a, b, depthwise):
    """`layer(a * x + b) = layer'(x)`, written out one output channel at a time."""
    k = np.asarray(kernel, np.float64)
    cin = k.shape[-2]
    spatial = k.reshape(-1, cin, k.shape[-1])  # (taps, in, out or multiplier)
    new_k = spatial * np.asarray(a, np.float64)[None, :, None]
    if depthwise:
        shift = [sum(spatial[t, c, m] * b[c] for t in range(spatial.shape[0]))
                 for c in range(cin) for m in range(k.shape[-1])]
    else:
        shift = [sum(spatial[t, c, o] * b[c] for t in range(spatial.shape[0]) for c in range(cin))
                 for o in range(k.shape[-1])]
    bias = np.zeros(len(shift)) if bias is None else np.asarray(bias, np.float64)
    return new_k.reshape(k.shape), bias + np.asarray(shift)


@settings(max_examples=40, deadline=None)
@given(taps=st.integers(1, 4), cin=st.integers(1, 4), cout=st.integers(1, 4), depthwise=st.booleans(),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fold_input_affine_against_reference(taps, cin, cout, depthwise, has_bias, seed):
    r = np.random.default_rng(seed)
    kernel = r.normal(size=(taps, cin, cout)).astype("float32")
    bias = r.normal(size=cin * cout if depthwise else cout).astype("float32") if has_bias else None
    a, b = r.normal(size=cin).astype("float32"), r.normal(size=cin).astype("float32")
    got_k, got_b = fold_input_affine(kernel, bias, a, b, depthwise=depthwise)
    want_k, want_b = _reference_input_affine(kernel, bias, a, b, depthwise)
    assert got_k.dtype == np.float32 and got_b.dtype == np.float32
    np.testing.assert_allclose(got_k, want_k, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-5)
