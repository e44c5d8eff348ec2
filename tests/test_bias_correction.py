"""Empirical bias correction (`kq.ptq.correct_bias`) against a numpy reference, on models with folds."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_quant as kq
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError
from tests.layers import ProbeCalibration, to_np
from tests.test_quantize import trained  # noqa: F401  (the digits CNN, trained once per module)


def mlp():
    inp = keras.Input((16,), name="x")
    h = L.Dense(12, name="d1")(inp)
    h = L.ReLU(name="relu")(h)
    return keras.Model(inp, L.Dense(4, name="d2")(h), name="mlp")


def data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 16)) + 0.5).astype("float32")


def ptq(model, x, config=None):
    return kq.quantize_model(model, config or kq.QuantConfig.int8(), calibration=ProbeCalibration(model, x))


def biases(qmodel):
    return {w.name: to_np(w.layer.bias).copy() for w in qmodel.layers if isinstance(w, kq.QuantizeWrapper)}


def reference_quantized_mean(wrapper, x_in, float_bias):
    """The mean per channel of a frozen integer layer's linear output (int32 sums and int32 bias), numpy."""
    weights, _ = wrapper.inference_weights()
    s_w = np.asarray(to_np(wrapper.weight_qparams["kernel"][0]), "float64")
    s_in = float(wrapper.input_scale)
    w_int = np.round(weights["kernel"].astype("float64") / s_w)
    bias_int = np.round(float_bias.astype("float64") / (s_in * s_w))
    return ((np.round(x_in.astype("float64") / s_in) @ w_int + bias_int) * (s_in * s_w)).mean(0)


def test_first_layer_shift_matches_a_numpy_reference():
    keras.utils.set_random_seed(0)
    model, x = mlp(), data()
    qmodel = ptq(model, x)
    d1 = qmodel.get_layer("d1")
    assert d1.input_scale is not None  # the integer form: int32 sums and bias
    x_hat = to_np(keras.Model(qmodel.inputs, d1.input)(x))
    kernel, bias = (to_np(v).astype("float64") for v in model.get_layer("d1").weights)
    before = biases(qmodel)
    report = kq.ptq.correct_bias(model, qmodel, x)
    # d1 sees the quantized input; the float layer the float input.
    expected = (x.astype("float64") @ kernel + bias).mean(0) - reference_quantized_mean(d1, x_hat, bias)
    np.testing.assert_allclose(to_np(d1.layer.bias) - before["d1"], expected, atol=1e-5)
    assert [name for name, _, _ in report.corrected] == ["d1", "d2"]
    assert report.num_samples == len(x) and report.skipped == ()
    assert report.corrected[0][2] == pytest.approx(np.abs(expected).max(), abs=1e-5)
    assert "d1" in str(report) and "2 layers corrected" in str(report)


def test_corrected_means_equal_the_float_means_at_every_layer():
    keras.utils.set_random_seed(0)
    model, x = mlp(), data()
    qmodel = ptq(model, x, kq.QuantConfig.w4a8())  # coarse weights: shifts of a step or more
    first = kq.ptq.correct_bias(model, qmodel, x)
    assert max(peak for _, _, peak in first.corrected) > 0.01
    again = kq.ptq.correct_bias(model, qmodel, x)
    # What is left is the int32 bias' rounding (half a step of s_in * s_w) and its effect downstream.
    for (name, mean1, _), (_, mean2, _) in zip(first.corrected, again.corrected):
        assert mean2 < 0.05 * mean1 + 1e-4, (name, mean1, mean2)


def test_held_out_output_bias_shrinks_on_a_folded_cnn(trained):
    # Conv+BN+ReLU (folded, no bias of its own), depthwise, residual Add: the digits CNN test_quantize trains
    model, x_calib, x_test, _ = trained
    qmodel = ptq(model, x_calib, kq.QuantConfig.w4a8())
    reference = model.predict(x_test, verbose=0)

    def output_bias():
        return np.abs((qmodel.predict(x_test, verbose=0) - reference).mean(0)).mean()

    before = output_bias()
    report = kq.ptq.correct_bias(model, qmodel, x_calib)
    assert {name for name, _, _ in report.corrected} == {"conv1", "dw", "pw", "logits"}
    assert output_bias() < 0.25 * before, (before, output_bias())  # 0.21 -> 0.013 when written


def test_input_folds_and_rewritten_layers():
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 3), name="image")
    h = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    h = L.Conv2D(4, 3, activation="relu", name="stem")(h)  # takes the Rescaling into its weights
    h = L.SeparableConv2D(6, 3, name="sep")(h)  # a depthwise and a pointwise wrapper
    h = L.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inp, L.Dense(3, name="head")(h))
    x = np.random.default_rng(0).uniform(0, 255, (128, 8, 8, 3)).astype("float32")
    qmodel = ptq(model, x)
    assert ("rescale", "stem") in qmodel.quantization_report.input_folds
    report = kq.ptq.correct_bias(model, qmodel, x)
    corrected = [name for name, _, _ in report.corrected]
    assert corrected[0] == "stem" and "head" in corrected
    assert "sep" in dict(report.skipped)
    # The stem's float mean is measured on the raw input its folded weights read: the shift is small.
    stem_step = float(qmodel.get_layer("stem")._fused_scale or qmodel.get_layer("stem").output_qparams[0])
    assert report.corrected[0][2] < 2 * stem_step


def test_qat_models_and_bad_arguments():
    keras.utils.set_random_seed(0)
    model, x = mlp(), data(64)
    qat = kq.quantize_model(model, mode="qat")
    qat(x[:8])
    report = kq.ptq.correct_bias(model, qat, x)
    assert report.corrected == () and all("QAT" in why for _, why in report.skipped)
    qmodel = ptq(model, x)
    with pytest.raises(ConfigError, match="max_samples"):
        kq.ptq.correct_bias(model, qmodel, x, max_samples=0)
    with pytest.raises(NoDataError):
        kq.ptq.correct_bias(model, qmodel, x[:0])
    with pytest.raises(ShapeMismatchError):
        kq.ptq.correct_bias(model, qmodel, x[:, :3])
    with pytest.raises(ConfigError, match="float_model"):
        kq.ptq.correct_bias(object(), qmodel, x)


@pytest.mark.tensorflow
def test_the_tflite_file_carries_the_corrected_biases(tmp_path):
    keras.utils.set_random_seed(0)
    model, x = mlp(), data()
    qmodel = ptq(model, x, kq.QuantConfig.w4a8())
    kq.ptq.correct_bias(model, qmodel, x)
    path = tmp_path / "m.tflite"
    kq.export_tflite(qmodel, path)
    runner = kq.runtime.load(path)
    steps = np.abs(runner.predict(x) - qmodel.predict(x, verbose=0)) / qmodel.get_layer("d2").output_qparams[0]
    assert steps.max() <= 1.0


# narrow_softmax_inputs -------------------------------------------------------------------------
def classifier(gain=8.0):
    """A softmax head whose logits have a long negative tail (as a trained classifier's do)."""
    inp = keras.Input((16,), name="x")
    h = L.Dense(32, activation="relu", name="h")(inp)
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="head")(h))
    rng = np.random.default_rng(3)  # the same weights on every backend
    model.get_layer("h").set_weights([rng.normal(0, 0.25, (16, 32)).astype("float32"), np.zeros(32, "float32")])
    model.get_layer("head").set_weights([rng.normal(0, 0.3 * gain, (32, 10)).astype("float32"),
                                         np.zeros(10, "float32")])
    return model


def test_softmax_input_range_follows_the_bound_and_output_error_falls():
    keras.utils.set_random_seed(0)
    model = classifier()
    x = (np.random.default_rng(0).normal(size=(512, 16)) * 3).astype("float32")
    qmodel = ptq(model, x)
    head = qmodel.get_layer("head")
    scale, zero_point = (float(to_np(v)) for v in head.preactivation_qparams)
    old_lo, old_hi = (-128 - zero_point) * scale, (127 - zero_point) * scale
    reference = model.predict(x, verbose=0)
    error_before = np.abs(qmodel.predict(x, verbose=0) - reference).mean()

    report = kq.ptq.narrow_softmax_inputs(model, qmodel, x)

    hidden = np.maximum(x @ to_np(model.get_layer("h").kernel) + to_np(model.get_layer("h").bias), 0)
    logits = hidden.astype("float64") @ to_np(model.get_layer("head").kernel) + to_np(model.get_layer("head").bias)
    cut = logits.max(1).min() - np.log(2 * 10 * 256)
    assert old_lo < cut < 0
    spec = kq.QuantSpec(bits=8)
    want = kq.ops.compute_qparams(np.float32(cut), np.float32(old_hi), spec)
    if (-128 - float(to_np(want[1]))) * float(to_np(want[0])) > cut:  # the nudge lifted the minimum: a step lower
        want = kq.ops.compute_qparams(np.float32(cut - float(to_np(want[0]))), np.float32(old_hi), spec)
    got = head.preactivation_qparams
    assert (-128 - float(to_np(got[1]))) * float(to_np(got[0])) <= cut  # the range reaches the cut
    assert float(to_np(got[0])) == pytest.approx(float(to_np(want[0])))
    assert float(to_np(got[1])) == float(to_np(want[1]))
    (name, lo0, lo1, step0, step1), = report.narrowed
    assert name == "head" and lo1 == pytest.approx(cut) and step1 < 0.75 * step0
    # The bound: clipping the float logits at `cut` moves no softmax output by a step of 1/256.
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    assert np.abs(softmax(np.maximum(logits, cut)) - softmax(logits)).max() < 1 / 256
    assert np.abs(qmodel.predict(x, verbose=0) - reference).mean() < error_before
    assert "narrowed" in str(report)
    # Once narrowed, a second call finds nothing left to do.
    again = kq.ptq.narrow_softmax_inputs(model, qmodel, x)
    assert again.narrowed == () and "within a step" in dict(again.skipped)["head"]


def test_softmax_narrowing_skips():
    keras.utils.set_random_seed(0)
    model, x = mlp(), data(64)  # no softmax: nothing to do
    report = kq.ptq.narrow_softmax_inputs(model, ptq(model, x), x)
    assert report.narrowed == () and report.skipped == ()
    model = classifier()
    qat = kq.quantize_model(model, mode="qat")
    qat(x[:8])
    report = kq.ptq.narrow_softmax_inputs(model, qat, x)
    assert report.narrowed == () and "QAT" in dict(report.skipped)["head"]


def test_a_softmax_layer_narrows_the_output_quantizer_it_reads():
    """keras.applications' MobileNets end in Conv -> Reshape / Flatten -> Activation("softmax")."""
    keras.utils.set_random_seed(0)
    dense = classifier()
    inp = keras.Input((16,), name="x")
    h = L.Dense(32, activation="relu", name="h")(inp)
    logits = L.Dense(10, name="logits")(h)
    out = L.Activation("softmax", name="predictions")(L.Reshape((10,), name="flat")(logits))
    model = keras.Model(inp, out)
    model.set_weights(dense.get_weights())
    x = (np.random.default_rng(0).normal(size=(512, 16)) * 3).astype("float32")
    qmodel = ptq(model, x)
    wrapper = qmodel.get_layer("logits")
    scale, zero_point = (float(to_np(v)) for v in wrapper.output_qparams)
    report = kq.ptq.narrow_softmax_inputs(model, qmodel, x)
    (name, lo0, lo1, step0, step1), = report.narrowed
    assert name == "predictions" and lo0 == pytest.approx((-128 - zero_point) * scale) and step1 < 0.75 * step0
    hidden = np.maximum(x @ to_np(model.get_layer("h").kernel) + to_np(model.get_layer("h").bias), 0)
    logits = hidden.astype("float64") @ to_np(model.get_layer("logits").kernel) + to_np(model.get_layer("logits").bias)
    assert lo1 == pytest.approx(logits.max(1).min() - np.log(2 * 10 * 256))
    assert float(to_np(wrapper.output_qparams[0])) == pytest.approx(step1)
    # The same head after an Add: the quantizer it reads is not a wrapper's, so it is left alone, with the reason.
    inp = keras.Input((16,), name="x")
    a, b = L.Dense(10, name="a")(inp), L.Dense(10, name="b")(inp)
    model = keras.Model(inp, L.Activation("softmax", name="predictions")(L.Add(name="add")([a, b])))
    report = kq.ptq.narrow_softmax_inputs(model, ptq(model, x), x)
    assert report.narrowed == () and "add" in dict(report.skipped)["predictions"]
