"""AdaRound (`kq.ptq.adaround`): its functions and gradient against numpy references, its result on the
grid and no worse than nearest rounding, the time budget, the TFLite export and a trained digits model."""

import importlib
import math
import time

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers as L

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.ptq.weights import GridWeight, grid_weight
from tests.layers import ProbeCalibration, to_np

ar = importlib.import_module("keras_quant.ptq.adaround")  # the module (kq.ptq.adaround is the function)

GAMMA, ZETA = -0.1, 1.1
W4A8 = kq.QuantConfig(weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True),
                      activations=kq.QuantSpec(bits=8))


# numpy references --------------------------------------------------------------------------------
def np_h(v):
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def np_reg(h, beta):
    return np.sum(1.0 - np.abs(2.0 * h - 1.0) ** beta)


def np_beta(step, total, beta_range, warmup):
    start, end = beta_range
    if step < warmup * total:
        return start, False
    rel = min((step - warmup * total) / (total - warmup * total), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * rel)) / 2, True


def test_rectified_sigmoid_matches_numpy():
    v = np.linspace(-8, 8, 101).astype("float32")
    np.testing.assert_allclose(to_np(ar.rectified_sigmoid(keras.ops.convert_to_tensor(v))), np_h(v), atol=1e-6)
    assert np_h(np.array([-8.0]))[0] == 0.0 and np_h(np.array([8.0]))[0] == 1.0  # reaches 0 and 1 exactly


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 1.0, exclude_max=True))
def test_initial_v_gives_the_fractional_part(frac):
    v = ar.initial_v(np.array([frac], "float32"))
    assert np.isfinite(v).all()
    assert to_np(ar.rectified_sigmoid(keras.ops.convert_to_tensor(v)))[0] == pytest.approx(frac, abs=1e-5)


@pytest.mark.parametrize("beta", [2.0, 7.5, 20.0])
def test_regularizer_matches_numpy(beta):
    h = np.random.default_rng(0).uniform(size=(5, 7)).astype("float32")
    h[0, :3] = [0.0, 1.0, 0.5]
    got = float(to_np(ar.rounding_regularizer(keras.ops.convert_to_tensor(h), beta)))
    assert got == pytest.approx(np_reg(h.astype("float64"), beta), rel=1e-5)
    assert float(to_np(ar.rounding_regularizer(keras.ops.convert_to_tensor(np.array([0.0, 1.0])), beta))) == 0.0


def test_beta_schedule_matches_numpy():
    for step in range(0, 101):
        assert ar.beta_schedule(step, 100, (20, 2), 0.2) == pytest.approx(np_beta(step, 100, (20, 2), 0.2))
    assert ar.beta_schedule(19, 100) == (20.0, False) and ar.beta_schedule(20, 100) == (20.0, True)
    assert ar.beta_schedule(100, 100)[0] == pytest.approx(2.0)
    betas = [ar.beta_schedule(s, 100)[0] for s in range(20, 101)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))  # annealed from high to low


# small models --------------------------------------------------------------------------------------
def one_layer(layer, shape):
    inp = keras.Input(shape, name="x")
    return keras.Model(inp, layer(inp))


def quantized(model, x, config=W4A8):
    return kq.quantize_model(model, config, calibration=ProbeCalibration(model, x))


def layer_input(qmodel, wrapper, x):
    return to_np(keras.Model(qmodel.inputs, wrapper.input)(x))


def test_loss_gradient_matches_numpy_for_a_dense_layer():
    """One SGD step of learning rate 1 through Keras' step is minus the numpy gradient of the loss."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 6)).astype("float32")
    model = one_layer(L.Dense(4, name="d"), (6,))
    qmodel = quantized(model, x)
    wrapper = qmodel.get_layer("d")
    base = grid_weight(wrapper)
    # A grid wider than the weights (no weight at a clip boundary): every gradient is defined.
    scale = np.broadcast_to(np.abs(base.values).max(0) / 5.3, base.values.shape).astype("float32")
    grid = GridWeight(base.name, base.values, base.spec, scale, np.zeros_like(scale))
    x_in = layer_input(qmodel, wrapper, x)
    beta, lam = 3.0, 0.05
    rounder = ar.LayerRounder(wrapper, grid)
    rounder.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    v0 = to_np(rounder.v).astype("float64")
    rounder.train_on_batch([x_in, np.tile([[beta, lam]], (len(x_in), 1)).astype("float32")])
    got = v0 - to_np(rounder.v)

    floor = np.floor(grid.values / scale).astype("float64")  # in float32, as the rounder splits W / s
    w, s, xx = grid.values.astype("float64"), scale.astype("float64"), x_in.astype("float64")

    def loss(v):
        h = np_h(v)
        y = xx @ (w - s * (floor + h))
        return np.sum(y ** 2) / len(xx) + lam * np_reg(h, beta)

    sig = 1.0 / (1.0 + np.exp(-v0))
    h = np_h(v0)
    dh = sig * (1 - sig) * (ZETA - GAMMA)
    y = xx @ (w - s * (floor + h))
    d_recon = (2.0 / len(xx)) * xx.T @ y * (-s)
    d_reg = -beta * np.abs(2 * h - 1) ** (beta - 1) * np.sign(2 * h - 1) * 2
    expected = (d_recon + lam * d_reg) * dh
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)
    # The analytic numpy gradient agrees with central differences of the numpy loss.
    eps, i = 1e-6, (2, 1)
    bump = np.zeros_like(v0)
    bump[i] = eps
    assert (loss(v0 + bump) - loss(v0 - bump)) / (2 * eps) == pytest.approx(expected[i], rel=1e-4, abs=1e-8)


LAYERS = {
    "dense": (lambda: L.Dense(6, name="t"), (10,)),
    "conv2d": (lambda: L.Conv2D(5, 3, padding="same", name="t"), (6, 6, 3)),
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, name="t"), (6, 6, 3)),
    "transpose": (lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same", name="t"), (4, 4, 3)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_result_is_on_the_grid_and_no_worse_than_nearest(kind):
    keras.utils.set_random_seed(0)
    make, shape = LAYERS[kind]
    x = np.random.default_rng(2).normal(size=(128,) + shape).astype("float32")
    model = one_layer(make(), shape)
    qmodel = quantized(model, x)
    wrapper = qmodel.get_layer("t")
    before = grid_weight(wrapper)
    report = kq.ptq.adaround(qmodel, x, iterations=150, batch_size=16, progress=False)
    (row,) = report.layers
    assert row.name == "t" and row.iterations == 150 and report.num_samples == 128 and report.skipped == ()
    assert row.adaround_error <= row.nearest_error
    after = grid_weight(wrapper)
    np.testing.assert_array_equal(after.scale, before.scale)  # the grid is fixed
    q = after.values / after.scale + after.zero_point
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)  # on the grid
    q = np.round(q)
    assert q.min() >= before.spec.qmin and q.max() <= before.spec.qmax
    np.testing.assert_array_equal(after.nearest(), q)  # the wrapper's nearest rounding gives them back
    np.testing.assert_allclose(to_np(wrapper.quantized_weights()[after.name]), after.dequantize(q), atol=1e-6)
    assert np.all(np.abs(q - before.nearest()) <= 1)  # up or down, never further
    assert row.changed == pytest.approx(np.mean(q != before.nearest()))
    if kind == "dense":  # the reported error against numpy: mean over samples of the channel sum of squares
        x_in = layer_input(qmodel, wrapper, x).astype("float64")
        err = np.sum((x_in @ (before.values - after.dequantize(q))) ** 2) / len(x_in)
        assert row.adaround_error == pytest.approx(err, rel=1e-3)
        assert row.changed > 0
    assert "t" in str(report) and "1 layers rounded" in str(report)


def test_per_group_dense_weights_stay_on_their_grid():
    keras.utils.set_random_seed(0)
    config = kq.QuantConfig(weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=4),
                            activations=kq.QuantSpec(bits=8))
    x = np.random.default_rng(3).normal(size=(96, 16)).astype("float32")
    qmodel = quantized(one_layer(L.Dense(5, name="t"), (16,)), x, config)
    before = grid_weight(qmodel.get_layer("t"))
    assert len(np.unique(before.scale[:, 0])) > 1  # several scales along the input axis: groups
    (row,) = kq.ptq.adaround(qmodel, x, iterations=100, progress=False).layers
    after = grid_weight(qmodel.get_layer("t"))
    q = np.round(after.values / after.scale)
    np.testing.assert_allclose(after.values, after.dequantize(q), atol=1e-6)
    assert row.adaround_error <= row.nearest_error and np.all(np.abs(q - before.nearest()) <= 1)


def stack(n=3):
    inp = keras.Input((12,), name="x")
    h = inp
    for i in range(n):
        h = L.Dense(12, activation="relu", name=f"d{i}")(h)
    return keras.Model(inp, L.Dense(3, name="out")(h))


def test_time_budget_is_honoured_loosely():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    model = stack(1)
    qmodel = quantized(model, x)
    budget = 6.0
    start = time.perf_counter()
    report = kq.ptq.adaround(qmodel, x, iterations=10**6, time_budget=budget, progress=False)
    elapsed = time.perf_counter() - start
    assert len(report.layers) + len(report.skipped) == 2
    assert all(r.iterations < 10**6 for r in report.layers) and report.layers[0].iterations > 10
    # Within the budget plus one layer's setup (tracing, measuring): a loose bound, no tighter timing.
    assert elapsed <= budget + max(r.seconds for r in report.layers) + 2.0
    assert report.time_budget == budget


def test_a_spent_budget_keeps_nearest_rounding():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 12)).astype("float32")
    qmodel = quantized(stack(), x)
    nearest = {w.name: grid_weight(w).nearest() for w in qmodel.layers if isinstance(w, kq.QuantizeWrapper)}
    report = kq.ptq.adaround(qmodel, x, time_budget=1e-3, progress=False)
    # Spent before the first layer, or during its first step: nearest rounding everywhere else.
    assert all(r.iterations == 1 for r in report.layers) and len(report.layers) <= 1
    assert [name for name, _ in report.skipped][-3:] == ["d1", "d2", "out"]
    assert all("time budget" in why for _, why in report.skipped)
    for name in ("d1", "d2", "out"):
        np.testing.assert_array_equal(grid_weight(qmodel.get_layer(name)).nearest(), nearest[name])


def test_other_layer_types_are_skipped_with_a_reason():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 4, 2), name="x")
    h = L.Conv3D(3, 2, name="c3")(inp)
    model = keras.Model(inp, L.Dense(2, name="d")(L.Flatten()(h)))
    x = np.random.default_rng(0).normal(size=(32, 4, 4, 4, 2)).astype("float32")
    report = kq.ptq.adaround(quantized(model, x), x, iterations=5, progress=False)
    assert [r.name for r in report.layers] == ["d"]
    assert report.skipped == (("c3", "a Conv3D (AdaRound treats Dense, Conv1D, Conv2D, DepthwiseConv2D, "
                                      "Conv2DTranspose)"),)
    assert "skipped c3: a Conv3D" in str(report)


def test_layers_selection_and_bad_arguments():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 12)).astype("float32")
    qmodel = quantized(stack(2), x)
    report = kq.ptq.adaround(qmodel, x, iterations=5, layers=["d1"], progress=False)
    assert [r.name for r in report.layers] == ["d1"] and report.skipped == ()
    with pytest.raises(ConfigError, match="nope"):
        kq.ptq.adaround(qmodel, x, layers=["nope"])
    for kwargs in ({"iterations": 0}, {"batch_size": 1.5}, {"reg_weight": -1}, {"beta_range": (20,)},
                   {"warmup": 1.0}, {"learning_rate": 0}, {"time_budget": -3}):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            kq.ptq.adaround(qmodel, x, **kwargs)


@pytest.mark.tensorflow
def test_the_int8_tflite_file_gives_the_keras_outputs(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 2), name="x")
    h = L.Conv2D(6, 3, padding="same", use_bias=False, name="c")(inp)
    h = L.BatchNormalization(name="bn")(h)  # folded into the kernel AdaRound rounds
    h = L.ReLU()(h)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.Flatten()(h)
    model = keras.Model(inp, L.Dense(4, name="out")(h))
    x = np.random.default_rng(0).uniform(size=(64, 8, 8, 2)).astype("float32")
    bn = model.get_layer("bn")
    bn.set_weights([w + np.random.default_rng(i).uniform(0.2, 0.5, w.shape).astype("float32")
                    for i, w in enumerate(bn.get_weights())])  # statistics that are not the identity
    qmodel = quantized(model, x)
    report = kq.ptq.adaround(qmodel, x, iterations=100, progress=False)
    assert sum(r.changed for r in report.layers) > 0
    path = tmp_path / "m.tflite"
    kq.export_tflite(qmodel, path, mode="int8")
    runner = kq.runtime.load(path)
    steps = np.abs(runner.predict(x) - qmodel.predict(x, verbose=0)) / qmodel.get_layer("out").output_qparams[0]
    assert steps.max() <= 1.0


@pytest.mark.slow
def test_digits_w4a8_per_channel_accuracy_no_worse_than_nearest():
    from keras_quant.cli import datasets

    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    inp = keras.Input(x_train.shape[1:])
    h = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = L.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = L.Flatten()(h)
    model = keras.Model(inp, L.Dense(10)(h))
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=5, batch_size=64, verbose=0)
    x_calib = x_train[:512]
    calibration = ProbeCalibration(model, x_calib)  # runs on every backend

    def acc(m):
        return float(np.mean(np.argmax(m.predict(x_test, verbose=0), -1) == y_test))

    nearest = acc(kq.quantize_model(model, W4A8, calibration=calibration))
    qmodel = kq.quantize_model(model, W4A8, calibration=calibration)
    report = kq.ptq.adaround(qmodel, x_calib, iterations=400, progress=False)
    assert all(r.adaround_error <= r.nearest_error for r in report.layers)
    assert acc(qmodel) >= nearest - 0.01
