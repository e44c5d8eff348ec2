"""quantize_model (PTQ): graph rewriting, quantizer placement, numerics, serialization."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.errors import ConfigError, NoDataError, UnsupportedLayerError
from keras_quant.layers import ActivationQuantizer, QuantizeWrapper
from keras_quant.quantize import quantize_model
from tests.layers import ProbeCalibration, to_np

L = keras.layers


def cnn():
    """Conv+BN+ReLU, a depthwise-separable block, a residual Add, pooling and Dense."""
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.BatchNormalization(momentum=0.9, name="bn_dw")(y)
    y = L.ReLU(6.0, name="relu_dw")(y)
    y = L.Conv2D(16, 1, name="pw")(y)
    x = L.Add(name="add")([x, y])
    x = L.MaxPooling2D(2, name="maxpool")(x)
    x = L.AveragePooling2D(2, name="avgpool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return keras.Model(inp, x, name="cnn")


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    model = cnn()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    return model, x_train[:256], x_test, y_test


@pytest.fixture(scope="module")
def ptq(trained):
    model, x_calib, _, _ = trained
    calibration = ProbeCalibration(model, x_calib)
    return quantize_model(model, kq.QuantConfig.int8(), calibration=calibration), calibration


def layer_types(model):
    return [type(layer).__name__ for layer in model.layers]


def test_outputs_close_to_float(trained, ptq):
    model, _, x_test, y_test = trained
    qmodel, _ = ptq
    expected, got = model.predict(x_test, verbose=0), qmodel.predict(x_test, verbose=0)
    assert (expected.argmax(1) == got.argmax(1)).mean() > 0.95
    float_accuracy, ptq_accuracy = (expected.argmax(1) == y_test).mean(), (got.argmax(1) == y_test).mean()
    assert float_accuracy > 0.8 and ptq_accuracy > float_accuracy - 0.03
    assert np.abs(expected - got).mean() < 0.1 * np.abs(expected).mean()


def test_quantizer_placement(ptq):
    qmodel, _ = ptq
    report = qmodel.quantization_report
    assert "BatchNormalization" not in layer_types(qmodel)
    assert report.folded == (("bn1", "conv1"), ("bn_dw", "dw"))
    assert set(report.wrapped) == {"conv1", "dw", "pw", "logits"}
    assert all(isinstance(qmodel.get_layer(name), QuantizeWrapper) for name in report.wrapped)
    assert isinstance(qmodel.get_layer("relu1_quant"), ActivationQuantizer)
    # conv1 -> bn1 -> relu1: one quantizer, after the ReLU, with the ReLU's statistics.
    assert qmodel.get_layer("conv1").output_quantizer is None
    successor = {layer.name: [n.operation.name for n in layer._outbound_nodes] for layer in qmodel.layers}
    assert successor["conv1"] == ["relu1"] and successor["relu1"] == ["relu1_quant"]
    assert successor["image"] == ["image_quant"]
    assert successor["add"] == ["add_quant"] and successor["avgpool"] == ["avgpool_quant"]
    assert successor["maxpool"] == ["avgpool"] and successor["flatten"] == ["logits"]
    assert qmodel.get_layer("pw").output_quantizer is not None
    assert dict(report.activation_quantizers) == {
        "image_quant": "image", "relu1_quant": "relu1", "relu_dw_quant": "relu_dw", "pw": "pw",
        # The average pool keeps its input's range (TFLite's AVERAGE_POOL_2D has one scale).
        "add_quant": "add", "avgpool_quant": "add", "logits": "logits",
    }
    assert layer_types(qmodel).count("ActivationQuantizer") == 5
    assert report.unsupported == () and report.float_layers == ()


def test_activation_ranges_come_from_calibration(ptq):
    qmodel, calibration = ptq
    spec = kq.QuantSpec(bits=8)
    for name, key in (("relu1_quant", "relu1"), ("image_quant", "image")):
        scale, zero_point = calibration.qparams(key, spec)
        layer = qmodel.get_layer(name)
        assert float(to_np(layer.scale)) == pytest.approx(float(scale))
        assert float(to_np(layer.zero_point)) == int(zero_point)


def test_weights_lie_on_the_grid(ptq):
    qmodel, _ = ptq
    for name, axis in (("conv1", -1), ("dw", -2), ("pw", -1), ("logits", -1)):
        wrapper = qmodel.get_layer(name)
        kernel = to_np(wrapper.quantized_weights()["kernel"])
        rows = np.moveaxis(kernel, axis, 0).reshape(kernel.shape[axis], -1)
        assert max(len(np.unique(r)) for r in rows) <= 2**8
        scale = to_np(wrapper.weight_qparams["kernel"][0])
        q = np.moveaxis(kernel, axis, -1) / scale
        np.testing.assert_allclose(q, np.round(q), atol=2e-3)
        assert np.abs(q).max() <= 127 + 1e-3


def test_float_model_untouched(trained):
    model, x_calib, x_test, _ = trained
    weights = [w.copy() for w in model.get_weights()]
    before = model.predict(x_test[:32], verbose=0)
    quantize_model(model, calibration=ProbeCalibration(model, x_calib))
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(x_test[:32], verbose=0), before)
    assert all(len(layer._inbound_nodes) == 1 for layer in model.layers)


def test_save_load_round_trip(ptq, trained, tmp_path):
    qmodel, _ = ptq
    x = trained[2][:64]
    qmodel.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))
    assert layer_types(loaded) == layer_types(qmodel)


def test_config_none_layers_stay_float(trained):
    model, x_calib, x_test, _ = trained
    config = kq.QuantConfig.int8().set_layer_name("logits", None).set_layer_name("add", None)
    qmodel = quantize_model(model, config, calibration=ProbeCalibration(model, x_calib))
    assert type(qmodel.get_layer("logits")) is L.Dense
    names = [layer.name for layer in qmodel.layers]
    # The float Add feeds the (quantized) average pool through the max pool: its output is
    # quantized where it enters the integer graph. The float logits feed nothing quantized.
    assert type(qmodel.get_layer("add")) is L.Add and "add_quant" in names
    assert dict(qmodel.quantization_report.activation_quantizers)["add_quant"] == "add"
    assert "logits_quant" not in names and qmodel.get_layer("flatten")._outbound_nodes[0].operation.name == "logits"
    assert set(qmodel.quantization_report.float_layers) == {"logits", "add"}
    np.testing.assert_array_equal(to_np(qmodel.get_layer("logits").kernel), to_np(model.get_layer("logits").kernel))


def test_weights_only_needs_no_calibration(trained):
    model, _, x_test, _ = trained
    qmodel = quantize_model(model, kq.QuantConfig(activations=None))
    assert "ActivationQuantizer" not in layer_types(qmodel)
    assert all(qmodel.get_layer(n).output_quantizer is None for n in qmodel.quantization_report.wrapped)
    agree = model.predict(x_test, verbose=0).argmax(1) == qmodel.predict(x_test, verbose=0).argmax(1)
    assert agree.mean() > 0.97


def test_missing_calibration_is_a_config_error(trained):
    with pytest.raises(ConfigError) as e:
        quantize_model(trained[0], kq.QuantConfig.int8())
    assert e.value.field == "calibration" and "CalibrationCallback" in str(e.value)


def test_missing_statistics_name_the_layer(trained):
    model, x_calib, _, _ = trained
    with pytest.raises(NoDataError) as e:
        quantize_model(model, calibration=ProbeCalibration(model, x_calib, drop=("relu_dw",)))
    assert e.value.layer == "relu_dw" and "'relu_dw'" in str(e.value) and "dw+bn_dw+relu_dw" in str(e.value)


def test_unknown_mode(trained):
    with pytest.raises(ConfigError) as e:
        quantize_model(trained[0], mode="bogus")
    assert (e.value.field, e.value.value) == ("mode", "bogus")


class Scale(L.Layer):
    """A layer type with no quantization rule."""

    def call(self, x):
        return x * 2.0


def model_with_unknown_layer():
    inp = keras.Input((6,), name="x")
    h = L.Dense(4, name="d1")(inp)
    h = Scale(name="scale")(h)
    return keras.Model(inp, L.Dense(3, name="d2")(h))


def test_rule_less_layer_stays_float_and_is_reported(rng):
    model = model_with_unknown_layer()
    x = rng.normal(size=(32, 6)).astype("float32")
    with pytest.warns(UserWarning, match="scale"):
        qmodel = quantize_model(model, calibration=ProbeCalibration(model, x))
    assert qmodel.quantization_report.unsupported == ("scale",)
    assert type(qmodel.get_layer("scale")) is Scale
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), model.predict(x, verbose=0), atol=0.1)


def test_rule_less_layer_named_in_config_raises(rng):
    model = model_with_unknown_layer()
    config = kq.QuantConfig.int8().set_layer_name("scale", activations=kq.QuantSpec(bits=8))
    with pytest.raises(UnsupportedLayerError) as e:
        quantize_model(model, config, calibration=ProbeCalibration(model, rng.normal(size=(8, 6))))
    assert (e.value.layer, e.value.layer_type) == ("scale", "Scale")
    config = kq.QuantConfig.int8().set_layer_type(Scale, weights=kq.QuantSpec(bits=4))
    with pytest.raises(UnsupportedLayerError):
        quantize_model(model, config, calibration=ProbeCalibration(model, rng.normal(size=(8, 6))))


def test_sequential_batch_norms_fold_into_the_dense_before_and_after(rng):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            L.BatchNormalization(name="bn_in"),  # no compute layer before it: folds into the Dense after it
            L.Dense(8, name="d1"),
            L.BatchNormalization(momentum=0.9, name="bn1"),
            L.Activation("relu", name="act"),
            L.Dense(3, activation="softmax", name="out"),
        ],
        name="seq",
    )
    for bn in (model.get_layer("bn_in"), model.get_layer("bn1")):
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape).astype("float32"))
    x = rng.normal(size=(64, 5)).astype("float32")
    qmodel = quantize_model(model, calibration=ProbeCalibration(model, x))
    names = [layer.name for layer in qmodel.layers]
    assert not {"bn_in", "bn_in_quant", "bn1"} & set(names)
    assert qmodel.quantization_report.folded == (("bn1", "d1"),)
    assert qmodel.quantization_report.input_folds == (("bn_in", "d1"),)
    assert names.index("act_quant") == names.index("act") + 1
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), model.predict(x, verbose=0), atol=0.03)


def test_branching_output_is_not_folded(rng):
    inp = keras.Input((6,), name="x")
    h = L.Dense(4, name="d")(inp)
    a = L.BatchNormalization(name="bn")(h)
    b = L.ReLU(name="relu")(h)
    model = keras.Model(inp, L.Concatenate(name="cat")([a, b]))
    x = rng.normal(size=(32, 6)).astype("float32")
    qmodel = quantize_model(model, calibration=ProbeCalibration(model, x))
    assert qmodel.quantization_report.folded == ()
    assert qmodel.get_layer("d").output_quantizer is not None
    assert {"bn_quant", "relu_quant", "cat_quant"} <= {layer.name for layer in qmodel.layers}


def test_nested_models_are_inlined(rng):
    block_in = keras.Input((6, 6, 4))
    y = L.Conv2D(4, 3, padding="same", name="conv")(block_in)
    y = L.BatchNormalization(name="bn")(y)
    block = keras.Model(block_in, L.ReLU(name="relu")(y), name="block")
    head = keras.Sequential([L.GlobalAveragePooling2D(name="gap"), L.Dense(3, name="fc")], name="head")
    inp = keras.Input((6, 6, 4), name="img")
    model = keras.Model(inp, head(block(inp)), name="outer")
    x = rng.normal(size=(32, 6, 6, 4)).astype("float32")
    qmodel = quantize_model(model, calibration=ProbeCalibration(model, x))
    assert not any(isinstance(layer, keras.Model) for layer in qmodel.layers)
    assert qmodel.quantization_report.folded == (("bn", "conv"),)
    assert set(qmodel.quantization_report.wrapped) == {"conv", "fc"}
    assert "relu_quant" in [layer.name for layer in qmodel.layers]
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), model.predict(x, verbose=0), atol=0.05)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    with pytest.raises(ConfigError) as e:
        quantize_model(Net(), kq.QuantConfig(activations=None))
    assert e.value.value == "net" and "Functional and Sequential" in str(e.value)


def test_unbuilt_sequential_is_refused():
    with pytest.raises(ConfigError) as e:
        quantize_model(keras.Sequential([L.Dense(2)], name="lazy"), kq.QuantConfig(activations=None))
    assert e.value.field == "model" and "not built" in str(e.value)


@pytest.mark.slow
@pytest.mark.tensorflow  # the callback hooks TensorFlow's trainer
def test_with_the_calibration_callback(trained):
    """Integration with the real kq.CalibrationCallback: the keys it records are the keys looked up."""
    model, x_calib, x_test, _ = trained
    callback = kq.CalibrationCallback()
    model.predict(x_calib, batch_size=256, callbacks=[callback], verbose=0)
    qmodel = quantize_model(model, calibration=callback.result)
    agree = model.predict(x_test, verbose=0).argmax(1) == qmodel.predict(x_test, verbose=0).argmax(1)
    assert agree.mean() > 0.95


@pytest.mark.tensorflow
def test_compiled_predict_has_fake_quant_ops(ptq):
    import tensorflow as tf

    qmodel, _ = ptq
    graph = tf.function(qmodel).get_concrete_function(tf.TensorSpec((None, 8, 8, 1))).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("FakeQuantWithMinMaxVarsPerChannel") == 4  # one per kernel
    assert types.count("FakeQuantWithMinMaxVars") == 7  # 5 ActivationQuantizers + 2 wrapper outputs


LAYER_CASES = [
    ("dense", (12,), lambda: L.Dense(6, activation="relu")),
    ("einsum", (5, 12), lambda: L.EinsumDense("abc,cd->abd", output_shape=(5, 6), bias_axes="d")),
    ("conv1d", (10, 3), lambda: L.Conv1D(4, 3, activation="relu")),
    ("conv2d", (6, 6, 3), lambda: L.Conv2D(4, 3)),
    ("conv3d", (4, 4, 4, 2), lambda: L.Conv3D(3, 2)),
    ("depthwise1d", (10, 3), lambda: L.DepthwiseConv1D(3)),
    ("depthwise2d", (6, 6, 3), lambda: L.DepthwiseConv2D(3)),
    ("separable1d", (10, 3), lambda: L.SeparableConv1D(4, 3)),
    ("separable2d", (6, 6, 3), lambda: L.SeparableConv2D(4, 3)),
    ("conv1d_t", (6, 3), lambda: L.Conv1DTranspose(4, 3)),
    ("conv2d_t", (5, 5, 3), lambda: L.Conv2DTranspose(4, 3)),
    ("conv3d_t", (3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2)),
    ("embedding", (7,), lambda: L.Embedding(20, 8)),
]


@pytest.mark.parametrize("name,shape,make", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_every_quantizable_layer_type(name, shape, make):
    keras.utils.set_random_seed(1)
    inp = keras.Input(shape, dtype="int32" if name == "embedding" else "float32", name="x")
    layer = make()
    model = keras.Model(inp, layer(inp))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (32,) + shape) if name == "embedding" else rng.normal(size=(32,) + shape)
    x = x.astype("int32" if name == "embedding" else "float32")
    qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=ProbeCalibration(model, x))
    wrappers = [w for w in qmodel.layers if isinstance(w, QuantizeWrapper)]
    if name.startswith("separable"):  # written as depthwise + pointwise, a quantizer between them (as TFLite runs it)
        dims = name[-2:].upper()
        assert [type(w.layer).__name__ for w in wrappers] == [f"DepthwiseConv{dims}", f"Conv{dims}"]
        assert wrappers[0].output_quantizer is not None
    else:
        assert len(wrappers) == 1 and type(wrappers[0].layer) is type(layer)
    expected, got = to_np(model(x)), to_np(qmodel(x))
    # int8 weights and activations: the error is a few quantization steps of the output range.
    step = (expected.max() - expected.min()) / 255
    assert np.max(np.abs(got - expected)) < 8 * step + 1e-6, name
    for weight_name, w in wrappers[0].quantized_weights().items():
        spec = wrappers[0].weight_specs[weight_name]
        axis = spec.axis % len(w.shape)
        values = np.moveaxis(to_np(w), axis, 0).reshape(w.shape[axis], -1)
        assert max(len(np.unique(row)) for row in values) <= 2 ** spec.bits
