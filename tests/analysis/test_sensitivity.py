"""Tests of kq.analysis.sensitivity / mixed_precision / model_size_bytes.

The proof point: a layer made fragile on purpose ranks first. The model is an
MLP on the digits whose middle Dense ("fragile") reads the flattened image
next to the first Dense's output; pixel 0 is 0 in every digits image, so a
huge weight on that input row changes no float output, but it sets every
output channel's per-channel weight scale to 1000 / 127, which rounds every
ordinary weight of that layer to 0.
"""

import math

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.analysis.sensitivity import SQNR_CAP_DB
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError

L = keras.layers
OUTLIER = 1000.0
ZERO_PIXEL = 0  # flattened index of a pixel that is 0 in every digits image


def fragile_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    flat = L.Flatten(name="flat")(inp)
    a = L.Dense(24, activation="relu", name="dense_a")(flat)
    x = L.Concatenate(name="concat")([flat, a])
    x = L.Dense(24, activation="relu", name="fragile")(x)
    out = L.Dense(10, name="head")(x)
    model = keras.Model(inp, out, name="fragile_mlp")
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def minmax_calibration(model, x):
    """A min/max `CalibrationResult` of every layer's output, computed with any backend.

    Under TensorFlow the tests calibrate with `kq.CalibrationCallback` (it hooks TensorFlow's
    trainer); under JAX this gives the same min/max ranges for the flat models here.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]
    outputs = keras.Model(model.inputs, [layer.output for layer in layers]).predict(x, verbose=0)
    stats = [kq.LayerStatistics(model.inputs[0]._keras_history.operation.name, count=x.size,
                                min=float(x.min()), max=float(x.max()))]
    stats += [kq.LayerStatistics(layer.name, count=out.size, min=float(out.min()), max=float(out.max()))
              for layer, out in zip(layers, outputs)]
    return kq.CalibrationResult(stats)


def calibrate(model, x):
    if keras.backend.backend() != "tensorflow":
        return minmax_calibration(model, x)
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=64, callbacks=[cb], verbose=0)
    return cb.result


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y))


@pytest.fixture(scope="module")
def setup():
    (x, y), (x_test, y_test) = datasets.load_digits()
    everything = np.concatenate([x, x_test]).reshape(len(x) + len(x_test), -1)
    assert np.all(everything[:, ZERO_PIXEL] == 0.0)
    model = fragile_model()
    model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    before = model.predict(x_test, verbose=0)
    kernel, bias = model.get_layer("fragile").get_weights()
    kernel[ZERO_PIXEL, :] = OUTLIER  # an outlier in every output channel: per-channel scales all blow up
    model.get_layer("fragile").set_weights([kernel, bias])
    after = model.predict(x_test, verbose=0)
    return {
        "model": model, "x": x, "y": y, "x_test": x_test, "y_test": y_test, "before": before, "after": after,
        "calibration": calibrate(model, x[:256]), "float_accuracy": float(np.mean(np.argmax(after, -1) == y_test)),
    }


@pytest.fixture(scope="module")
def rankings(setup):
    s = setup
    return {
        method: kq.analysis.sensitivity(s["model"], None, (s["x_test"], s["y_test"]), method=method,
                                        calibration=s["calibration"])
        for method in ("quantize_one", "float_one")
    }


# The fragile layer -----------------------------------------------------------------
@pytest.mark.slow
def test_surgery_leaves_the_float_model_unchanged(setup):
    np.testing.assert_array_equal(setup["before"], setup["after"])
    assert setup["float_accuracy"] > 0.9
    kernel = setup["model"].get_layer("fragile").get_weights()[0]
    np.testing.assert_array_equal(np.max(np.abs(kernel), axis=0), OUTLIER)  # every channel's scale is 1000/127


@pytest.mark.slow
@pytest.mark.parametrize("method", ["quantize_one", "float_one"])
def test_fragile_layer_ranks_first(setup, rankings, method):
    ranking = rankings[method]
    assert isinstance(ranking, list) and isinstance(ranking, kq.analysis.SensitivityRanking)
    assert ranking.method == method and ranking.metric == "accuracy"
    name, change = ranking[0]
    assert name == "fragile"
    assert change > 0.6  # about 0.87: the layer's weights all round to 0, so it predicts one class
    assert all(abs(c) < 0.05 for _, c in ranking[1:])
    assert ranking.baseline == pytest.approx(setup["float_accuracy"])
    assert ranking.quantized < 0.3
    changes = [c for _, c in ranking]
    assert changes == sorted(changes, reverse=True)
    # The candidates are the layers quantize_model wraps.
    qmodel = kq.quantize_model(setup["model"], kq.QuantConfig.int8(), calibration=setup["calibration"])
    assert sorted(ranking.layers) == sorted(qmodel.quantization_report.wrapped) == ["dense_a", "fragile", "head"]


@pytest.mark.slow
@pytest.mark.tensorflow
def test_calibration_data_is_calibrated_once_with_the_callback(setup, rankings):
    s = setup
    ranking = kq.analysis.sensitivity(s["model"], s["x"][:256], (s["x_test"], s["y_test"]))
    assert ranking == rankings["quantize_one"] and ranking.values == rankings["quantize_one"].values


@pytest.mark.slow
def test_metric_change_is_the_degradation(setup, rankings):
    one, all_but = rankings["quantize_one"], rankings["float_one"]
    base, full = one.baseline, one.quantized
    for name, change in one:
        assert change == pytest.approx(base - one.values[name])
    for name, change in all_but:
        assert change == pytest.approx((base - full) - (base - all_but.values[name]))
    # Keeping only the fragile layer float recovers the float accuracy here.
    assert all_but.values["fragile"] == pytest.approx(base, abs=0.02)


@pytest.mark.slow
def test_ranking_to_dict_and_table(rankings):
    ranking = rankings["float_one"]
    d = ranking.to_dict()
    assert d["method"] == "float_one" and d["metric"] == "accuracy"
    assert [r["layer"] for r in d["ranking"]] == ranking.layers
    assert d["ranking"][0]["metric_change"] == ranking[0][1]
    table = ranking.table()
    assert "fragile" in table.splitlines()[3] and "rank" in table


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["sqnr", "mse"])
def test_output_metrics_need_no_labels(setup, metric):
    s = setup
    ranking = kq.analysis.sensitivity(s["model"], None, s["x_test"], metric=metric, calibration=s["calibration"])
    assert ranking[0][0] == "fragile"
    if metric == "sqnr":
        assert ranking.baseline == SQNR_CAP_DB
        assert ranking[0][1] > SQNR_CAP_DB - 10  # the fragile layer alone leaves the output at ~0 dB
        assert all(0 < c < SQNR_CAP_DB - 20 for _, c in ranking[1:])  # others keep > 20 dB
    else:
        assert ranking.baseline == 0.0
        assert ranking[0][1] > 100 * ranking[1][1] > 0
    assert all(math.isfinite(c) for _, c in ranking)


@pytest.mark.slow
def test_callable_metric_without_labels_compares_with_float_outputs(setup):
    s = setup
    seen = []

    def agreement(y_true, y_pred):
        seen.append(np.shape(y_true))
        return float(np.mean(np.argmax(y_true, -1) == np.argmax(y_pred, -1)))

    ranking = kq.analysis.sensitivity(s["model"], None, s["x_test"], metric=agreement, calibration=s["calibration"])
    assert ranking.metric == "agreement" and ranking.baseline == 1.0
    assert ranking[0][0] == "fragile" and ranking[0][1] > 0.6
    assert seen[0] == (len(s["x_test"]), 10)  # y_true: the float model's outputs


@pytest.mark.slow
def test_loss_metric_uses_the_compiled_loss(setup):
    s = setup
    ranking = kq.analysis.sensitivity(s["model"], None, (s["x_test"], s["y_test"]), metric="loss",
                                      calibration=s["calibration"])
    assert ranking[0][0] == "fragile" and ranking[0][1] > 1.0  # cross-entropy of a constant prediction
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(s["y_test"], s["after"])
    assert ranking.baseline == pytest.approx(float(keras.ops.convert_to_numpy(loss)), rel=1e-4)


# Mixed precision -----------------------------------------------------------------------
@pytest.mark.slow
def test_mixed_precision_meets_the_budget_keeping_the_fragile_layer_float(setup):
    s = setup
    result = kq.analysis.mixed_precision(s["model"], None, (s["x_test"], s["y_test"]), budget=0.02,
                                         calibration=s["calibration"])
    assert result.met and result.metric_change <= 0.02
    assert result.high_precision == ("fragile",)
    assert result.config.for_layer(s["model"].get_layer("fragile")) is None
    assert result.config.for_layer(s["model"].get_layer("head")) is not None
    assert len(result.steps) == 2 and result.steps[0][0] == () and result.steps[0][1] > 0.6
    # The config gives the model the result describes.
    qmodel = kq.quantize_model(s["model"], result.config, calibration=s["calibration"])
    assert kq.analysis.model_size_bytes(qmodel) == result.size_bytes
    assert s["float_accuracy"] - accuracy(qmodel, s["x_test"], s["y_test"]) == pytest.approx(result.metric_change)
    # The fragile kernel (88 x 24) went from 1 byte to 4 per element.
    assert result.size_bytes - result.steps[0][2] == 88 * 24 * 3
    assert result.float_size_bytes == s["model"].count_params() * 4
    assert "fragile" in str(result) and result.to_dict()["high_precision"] == ["fragile"]


@pytest.mark.slow
def test_looser_budget_keeps_fewer_layers_high_and_sizes_grow(setup, rankings):
    s = setup
    args = (s["model"], None, (s["x_test"], s["y_test"]))
    loose = kq.analysis.mixed_precision(*args, budget=1.0, ranking=rankings["float_one"], calibration=s["calibration"])
    assert loose.high_precision == () and loose.met and len(loose.steps) == 1
    assert loose.size_bytes == loose.steps[0][2] < loose.float_size_bytes
    # A ranking that puts the fragile layer last: every layer goes high, sizes grow at each step.
    tight = kq.analysis.mixed_precision(*args, budget=0.0, ranking=["dense_a", "head", "fragile"],
                                        calibration=s["calibration"])
    assert tight.high_precision == ("dense_a", "head", "fragile")
    assert [names for names, _, _ in tight.steps] == [(), ("dense_a",), ("dense_a", "head"),
                                                      ("dense_a", "head", "fragile")]
    sizes = [size for _, _, size in tight.steps]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    # Every layer high: only the input and the Concatenate stay 8-bit (the flattened image requantized to
    # the Concatenate's range, as TFLite writes it), at most one test image changes.
    assert tight.steps[1][1] > 0.6 and tight.steps[-1][1] == pytest.approx(0.0, abs=1.0 / len(s["y_test"]) + 1e-9)
    assert tight.met == (tight.metric_change <= 0.0)
    assert len(loose.high_precision) < len(tight.high_precision)
    assert tight.to_dict()["steps"][2]["high_precision"] == ["dense_a", "head"]


@pytest.mark.slow
def test_int16_high_precision_keeps_8_bit_weights(setup):
    s = setup
    result = kq.analysis.mixed_precision(s["model"], None, (s["x_test"], s["y_test"]), budget=0.0, high="int16",
                                         ranking=["fragile"], calibration=s["calibration"])
    lc = result.config.for_layer(s["model"].get_layer("fragile"))
    assert lc.weights.bits == 8 and lc.activations == kq.QuantSpec(bits=16, symmetric=True)
    assert result.high == "int16"
    assert result.steps[1][2] == result.steps[0][2]  # same weight bytes
    assert not result.met and result.metric_change > 0.6  # 16-bit activations do not cure weight outliers


@pytest.mark.slow
def test_layer_config_high_precision_w16a16_cures_the_outliers(setup):
    s = setup
    w16 = kq.QuantSpec(bits=16, symmetric=True, granularity="per_channel", narrow_range=True)
    high = kq.LayerQuantConfig(weights=w16, activations=kq.QuantSpec(bits=16, symmetric=True))
    result = kq.analysis.mixed_precision(s["model"], None, (s["x_test"], s["y_test"]), budget=0.02, high=high,
                                         ranking=["fragile", "head"], calibration=s["calibration"])
    assert result.high_precision == ("fragile",) and result.met
    assert result.size_bytes - result.steps[0][2] == 88 * 24  # 2 bytes instead of 1 per kernel element


# model_size_bytes --------------------------------------------------------------------------
def tiny():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((4,)), L.Dense(3, activation="relu", name="d1"), L.Dense(2, name="d2")],
                            name="tiny")


def tiny_data(n=32):
    return np.random.default_rng(0).normal(size=(n, 4)).astype("float32")


@pytest.fixture(scope="module")
def tiny_setup():
    model = tiny()
    return model, calibrate(model, tiny_data())


def test_model_size_bytes_matches_a_hand_count(tiny_setup):
    model, calibration = tiny_setup
    assert kq.analysis.model_size_bytes(model) == (4 * 3 + 3 + 3 * 2 + 2) * 4  # 92: float32 everywhere
    q8 = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibration)
    assert kq.analysis.model_size_bytes(q8) == (12 + 3 * 4) + (6 + 2 * 4)  # int8 kernels, int32 biases: 38
    q4 = kq.quantize_model(model, kq.QuantConfig.w4a8(), calibration=calibration)
    assert kq.analysis.model_size_bytes(q4) == (6 + 12) + (3 + 8)  # half a byte per 4-bit weight: 29
    mixed = kq.QuantConfig.int8().set_layer_name("d2", None)
    qm = kq.quantize_model(model, mixed, calibration=calibration)
    assert kq.analysis.model_size_bytes(qm) == (12 + 12) + (6 + 2) * 4  # 56


def test_mixed_precision_sizes_on_a_tiny_model(tiny_setup):
    model, calibration = tiny_setup
    x = tiny_data(16)
    result = kq.analysis.mixed_precision(model, None, x, metric="mse", budget=0.0, ranking=["d2", "d1"],
                                         calibration=calibration)
    assert [s[2] for s in result.steps] == [38, 56, 92]
    assert result.float_size_bytes == 92
    # With both Dense layers float the model input's int8 quantizer remains (it is no candidate): mse > 0.
    assert 0.0 < result.steps[-1][1] < result.steps[0][1] and not result.met


# Errors ------------------------------------------------------------------------------------
def test_unknown_metric_and_method(tiny_setup):
    model, calibration = tiny_setup
    with pytest.raises(ConfigError) as e:
        kq.analysis.sensitivity(model, None, tiny_data(), metric="top5", calibration=calibration)
    assert e.value.field == "metric" and e.value.value == "top5"
    with pytest.raises(ConfigError) as e:
        kq.analysis.sensitivity(model, None, tiny_data(), method="leave_out", calibration=calibration)
    assert e.value.field == "method" and e.value.value == "leave_out"
    with pytest.raises(ConfigError) as e:
        kq.analysis.sensitivity(model, None, tiny_data(), verbose=3, calibration=calibration)
    assert e.value.field == "verbose"


def test_accuracy_and_loss_need_labels(tiny_setup):
    model, calibration = tiny_setup
    for metric in ("accuracy", "loss"):
        with pytest.raises(NoDataError, match="labels") as e:
            kq.analysis.sensitivity(model, None, tiny_data(), metric=metric, calibration=calibration)
        assert e.value.field == "eval_data"


def test_loss_needs_a_compiled_model(tiny_setup):
    model, calibration = tiny_setup
    with pytest.raises(ConfigError, match="not compiled") as e:
        kq.analysis.sensitivity(model, None, (tiny_data(), np.zeros(32)), metric="loss", calibration=calibration)
    assert e.value.field == "metric" and e.value.value == "loss"


@pytest.mark.parametrize("budget", [-0.01, "0.01", float("nan"), float("inf"), True, None])
def test_bad_budget(tiny_setup, budget):
    model, calibration = tiny_setup
    with pytest.raises(ConfigError) as e:
        kq.analysis.mixed_precision(model, None, tiny_data(), metric="mse", budget=budget, calibration=calibration)
    assert e.value.field == "budget"
    assert e.value.value is budget or e.value.value == budget


def test_bad_high_and_ranking(tiny_setup):
    model, calibration = tiny_setup
    with pytest.raises(ConfigError) as e:
        kq.analysis.mixed_precision(model, None, tiny_data(), metric="mse", high="int4", calibration=calibration)
    assert e.value.field == "high" and e.value.value == "int4"
    with pytest.raises(ConfigError) as e:
        kq.analysis.mixed_precision(model, None, tiny_data(), metric="mse", ranking=["d1", "nope"],
                                    calibration=calibration)
    assert e.value.field == "ranking" and e.value.value == "nope"


def test_model_with_no_quantizable_layer():
    model = keras.Sequential([keras.Input((4, 2)), L.Flatten(), L.ReLU()], name="no_weights")
    with pytest.raises(ConfigError, match="no layer to quantize") as e:
        kq.analysis.sensitivity(model, None, np.zeros((4, 4, 2), "float32"), metric="mse")
    assert e.value.field == "model" and e.value.value == "no_weights"
    # A config that keeps every layer float leaves nothing to rank either.
    with pytest.raises(ConfigError, match="no layer to quantize"):
        kq.analysis.sensitivity(tiny(), None, tiny_data(), metric="mse",
                                config=kq.QuantConfig(weights=None, activations=None))


def test_eval_data_of_the_wrong_shape(tiny_setup):
    model, calibration = tiny_setup
    with pytest.raises(ShapeMismatchError) as e:
        kq.analysis.sensitivity(model, None, np.zeros((8, 5), "float32"), metric="mse", calibration=calibration)
    assert e.value.field == "eval_data" and e.value.actual == (8, 5)
    with pytest.raises(ShapeMismatchError) as e:
        kq.analysis.sensitivity(model, None, (tiny_data(8), np.zeros(7)), calibration=calibration)
    assert e.value.field == "eval_data labels" and e.value.actual == (7,)
    with pytest.raises(NoDataError) as e:
        kq.analysis.sensitivity(model, None, np.zeros((0, 4), "float32"), metric="mse", calibration=calibration)
    assert e.value.field == "eval_data"
    with pytest.raises(NoDataError) as e:
        kq.analysis.sensitivity(model, None, tiny_data(), metric="mse")
    assert e.value.field == "calibration_data"


@pytest.mark.tensorflow
def test_calibration_data_of_the_wrong_shape(tiny_setup):
    model, _ = tiny_setup
    with pytest.raises(ShapeMismatchError) as e:
        kq.analysis.sensitivity(model, np.zeros((8, 3), "float32"), tiny_data(), metric="mse")
    assert e.value.field == "calibration_data" and e.value.actual == (8, 3)


def test_progress_bar_with_verbose(tiny_setup, capsys):
    model, calibration = tiny_setup
    ranking = kq.analysis.sensitivity(model, None, tiny_data(), metric="mse", calibration=calibration, verbose=1)
    assert sorted(ranking.layers) == ["d1", "d2"]
    assert "3/3" in capsys.readouterr().err  # the all-quantized model and one per layer


@pytest.mark.tensorflow
def test_nested_models_name_layers_by_their_calibration_key():
    a = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")], name="a")
    b = keras.Sequential([keras.Input((3,)), L.Dense(2, name="d")], name="b")
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, b(a(inp)))
    calibration = calibrate(model, tiny_data())
    ranking = kq.analysis.sensitivity(model, None, tiny_data(), metric="mse", calibration=calibration)
    assert sorted(ranking.layers) == ["a/d", "b/d"]  # the names collide: keyed by path
    result = kq.analysis.mixed_precision(model, None, tiny_data(), metric="mse", budget=0.0, ranking=["b/d"],
                                         calibration=calibration)
    qmodel = kq.quantize_model(model, result.config, calibration=calibration)
    assert qmodel.quantization_report.float_layers == ("b/d",)
    assert qmodel.quantization_report.wrapped == ("a_d",)
    assert [s[2] for s in result.steps] == [38, 56]
