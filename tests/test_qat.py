"""Quantization-aware training end to end: `kq.quantize_model(model, config, mode="qat")` and `kq.qat`.

One small CNN (`tests.qat_models.cnn`: Conv+BN+ReLU twice, a residual Add, a
folded Conv+BN head, Dense) is trained in every way Keras trains: eagerly, in
a `tf.function`, with XLA, under mixed precision, under `MirroredStrategy`
(TensorFlow), and with the JAX trainer (the tests not marked `tensorflow` run
in the JAX CI pass). Then: saving and loading, the `QATScheduler` and manual
mode switches, BatchNormalization folding (Jacob et al. 2018), subclassed
models, user-defined layers, and accuracy on digits (W8A8 QAT, W4A4 LSQ vs PTQ).

Trained models are shared through module-scoped fixtures: each new `fit`
costs a trace of the QAT training step (seconds on CPU).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_quant as kq
from tests import qat_models as qm
from tests.qat_models import to_np

BACKEND = keras.backend.backend()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Plain graph mode for the shared model: `tf.function` without XLA on TensorFlow, JAX's (jitted) step on JAX.
DEFAULT_COMPILE = {"jit_compile": False} if BACKEND == "tensorflow" else {}


@pytest.fixture(scope="module")
def data():
    (x, y), (x_test, y_test) = qm.digits()
    return x[: qm.N_TRAIN], y[: qm.N_TRAIN], x_test, y_test


@pytest.fixture(scope="module")
def float_cnn():
    model = qm.cnn()
    return model, [w.copy() for w in model.get_weights()]


def train_qat(float_model, data, config=None, **compile_kwargs):
    """W8A8 QAT copy of `float_model`, trained for `qm.STEPS` steps on the shared data (no shuffling)."""
    x, y, _, _ = data
    qat = kq.quantize_model(float_model, config or kq.QuantConfig.int8(), mode="qat")
    qm.compile_for_qat(qat, **compile_kwargs)
    history = qat.fit(x, y, batch_size=qm.BATCH, epochs=qm.EPOCHS, shuffle=False, verbose=0)
    return qat, history.history


@pytest.fixture(scope="module")
def w8a8(float_cnn, data):
    """The CNN's W8A8 QAT copy trained in the backend's default graph mode: `(qat, history)`."""
    return train_qat(float_cnn[0], data, **DEFAULT_COMPILE)


def assert_trained(qat, history):
    loss, accuracy = np.asarray(history["loss"]), np.asarray(history["accuracy"])
    assert np.isfinite(loss).all(), loss
    assert np.all(np.diff(loss) < 0), f"loss does not decrease: {loss}"
    assert accuracy[-1] > accuracy[0] + 0.2, f"accuracy does not rise: {accuracy}"
    counts = qm.step_counts(qat)
    assert len(counts) == 7  # image_quant, conv1, relu1_shared_quant, conv2, add_quant, conv3, logits
    assert set(counts.values()) == {float(qm.STEPS)}, counts
    assert set(kq.qat.modes(qat).values()) == {"observe"}
    # Every activation range was observed: no quantizer kept its initial scale of 1.
    scales = {k: v for k, v in qm.snapshot(qat)["act"].items() if k.endswith("/scale")}
    assert len(scales) == 5 and all(0 < float(v) < 0.5 for v in scales.values()), scales


@pytest.mark.slow
def test_qat_model_structure(w8a8):
    qat, _ = w8a8
    report = qat.quantization_report
    assert report.wrapped == ("conv1", "conv2", "conv3", "logits")
    assert report.folded == (("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "conv3"))
    assert report.shared == (("relu1", "relu2"),)  # the residual Add's inputs share one quantizer
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in qat.layers)
    for name in report.wrapped:
        wrapper = qat.get_layer(name)
        assert isinstance(wrapper, kq.QuantizeWrapper) and wrapper.mode == "qat"
    assert qat.get_layer("conv3").batch_norm is not None and qat.get_layer("conv3").output_quantizer is not None
    assert qat.get_layer("conv1").output_quantizer is None  # the ReLU is fused; its quantizer follows it


# 1. Training modes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_in_mode(float_cnn, data, w8a8):
    """`fit_in_mode(mode) -> (qat, history)`, each mode trained once from the same float model."""
    cache = {"graph": w8a8}
    kwargs = {"eager": {"run_eagerly": True}, "xla": {"jit_compile": True}}

    def fit(mode):
        if mode not in cache:
            cache[mode] = train_qat(float_cnn[0], data, **kwargs[mode])
        return cache[mode]

    return fit


@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_trains_in_every_tensorflow_execution_mode(fit_in_mode, mode):
    qat, history = fit_in_mode(mode)
    assert qat.run_eagerly == (mode == "eager")
    assert qat.jit_compile == (mode == "xla")  # not silently turned off: the QAT step compiles with XLA
    assert_trained(qat, history)
    if mode != "graph":  # the same model, data and steps: the same training, up to float rounding
        np.testing.assert_allclose(history["loss"], fit_in_mode("graph")[1]["loss"], rtol=0.02)


@pytest.mark.slow
@pytest.mark.tensorflow
def test_trains_under_mixed_precision(data):
    """Regression: the QAT state was autocast to float16 inside mixed_float16 layers (float32/float16 AddV2)."""
    x, y, x_test, _ = data
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        float_model = qm.cnn()
        qat = kq.quantize_model(float_model, kq.QuantConfig.int8(), mode="qat")
        assert qat.get_layer("conv1").dtype_policy.name == "mixed_float16"
        qm.compile_for_qat(qat)
        history = qat.fit(x, y, batch_size=qm.BATCH, epochs=qm.EPOCHS, shuffle=False, verbose=0).history
        assert_trained(qat, history)
        assert to_np(qat.predict(x_test[:4], verbose=0)).dtype == np.float16
        # The quantizer state stays float32.
        for layer in kq.qat.quantizer_layers(qat):
            assert {v.dtype for v in layer.non_trainable_variables} == {"float32"}
    finally:
        keras.mixed_precision.set_global_policy(previous)


MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, sys.argv[1])
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, keras_quant as kq
    from tests import qat_models as qm

    (x, y), _ = qm.digits()
    # One global batch of 64, the same at every step. Each replica gets 32 samples and
    # their ranges differ: the largest value (2.0) is only in the second half.
    x = x[:64] * np.linspace(0.5, 2.0, 64, dtype="float32")[:, None, None, None]
    y = y[:64]
    STEPS = 6
    xs, ys = np.concatenate([x] * STEPS), np.concatenate([y] * STEPS)


    def state_of(model):
        return {
            f"{layer.name}/{v.name}": np.asarray(v.numpy(), "float64").tolist()
            for layer in kq.qat.quantizer_layers(model) for v in layer.non_trainable_variables
        }


    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.state, self.losses = None, []

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.state = state_of(self.model)
            self.losses.append(float(logs["loss"]))  # the epoch's running mean


    def build(bn_statistics):
        return kq.quantize_model(qm.cnn(synchronized=True), kq.QuantConfig.int8(), mode="qat",
                                 bn_statistics=bn_statistics)


    def run(strategy, bn_statistics):
        try:
            with strategy.scope():
                qat = build(bn_statistics)
                qat.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            record = Record()
            qat.fit(xs, ys, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"[:1000]}
        return {"state": record.state, "losses": record.losses, "replicas": strategy.num_replicas_in_sync,
                "steps": sorted(set(qm.step_counts(qat).values()))}


    def one_device_first_step(bn_statistics):
        # The state after one training step is set by its forward pass (weights change after it):
        # one forward pass over the whole batch on one device gives the expected state.
        qat = build(bn_statistics)
        qat(x, training=True)
        return {"state": state_of(qat)}


    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"batch_max": float(x.max()), "half_max": float(x[:32].max())}
    # Synchronized BatchNormalization: the replicas agree on the batch statistics, so every
    # observed range after one step must be the full batch's, as on one device.
    for bn_statistics in ("quantized", "float"):
        out[bn_statistics] = {"two": run(two, bn_statistics), "one": one_device_first_step(bn_statistics)}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """Runs `MIRRORED` in a subprocess (logical devices must be set before TensorFlow starts)."""
    script = tmp_path_factory.mktemp("mirrored") / "mirrored.py"
    script.write_text(MIRRORED)
    proc = subprocess.run([sys.executable, str(script), REPO], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def check_mirrored(mirrored, bn_statistics):
    two = mirrored[bn_statistics]["two"]
    assert "error" not in two, two["error"]
    one = mirrored[bn_statistics]["one"]
    assert two["replicas"] == 2
    # After one step every range is the full batch's: each replica wrote the union of both shards
    # (and, with synchronized BatchNormalization, the same batch statistics).
    assert mirrored["half_max"] < mirrored["batch_max"] == 2.0
    assert two["state"]["image_quant/max"] == mirrored["batch_max"]
    assert two["state"]["image_quant/min"] == 0.0
    assert_same_state(two["state"], one["state"])
    assert two["steps"] == [6.0]
    # And it trains: the running mean of the loss falls.
    losses = np.asarray(two["losses"])
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.tensorflow
@pytest.mark.slow
def test_mirrored_strategy_combines_observer_state_across_replicas(mirrored):
    check_mirrored(mirrored, "quantized")


@pytest.mark.tensorflow
@pytest.mark.slow
def test_mirrored_strategy_with_float_pass_batch_statistics(mirrored):
    """Regression: with bn_statistics="float" the synchronized moments (an all-reduce) ran inside ops.cond:
    "merge_call called while defining a new graph" under MirroredStrategy."""
    check_mirrored(mirrored, "float")


# 2. The same code trains with the JAX trainer (and TensorFlow's) -----------------------------------
@pytest.mark.slow
def test_w8a8_qat_trains(w8a8):
    """Runs in the JAX CI pass too: the QAT training step works on JAX (jitted, stateless) and TensorFlow."""
    assert_trained(*w8a8)


@pytest.mark.slow
def test_float_model_is_left_unchanged(float_cnn, w8a8):
    model, weights = float_cnn
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert not any(isinstance(layer, kq.QuantizeWrapper) for layer in model.layers)


# 3. Save and load ----------------------------------------------------------------------------
def assert_same_variables(a, b):
    va, vb = a.variables, b.variables
    assert [v.name for v in va] == [v.name for v in vb]
    for x, y in zip(va, vb):
        np.testing.assert_array_equal(to_np(x), to_np(y), err_msg=x.path)


@pytest.mark.slow
def test_save_load_round_trip_and_continue_training(w8a8, data, tmp_path):
    qat, history = w8a8
    x, y, x_test, _ = data
    qat.save(tmp_path / "qat.keras")
    loaded = keras.models.load_model(tmp_path / "qat.keras", safe_mode=True)  # no custom_objects
    np.testing.assert_array_equal(to_np(loaded.predict(x_test, verbose=0)), to_np(qat.predict(x_test, verbose=0)))
    assert_same_variables(loaded, qat)
    assert kq.qat.modes(loaded) == kq.qat.modes(qat)
    assert qm.step_counts(loaded) == qm.step_counts(qat)
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in qat.layers]
    for name in ("conv1", "conv3"):
        assert loaded.get_layer(name).batch_norm is not None

    # Modes are variables: a mixed state survives another round trip.
    kq.qat.set_mode(loaded, "frozen", layers=["add_quant", "logits"])
    loaded.save(tmp_path / "mixed.keras")
    again = keras.models.load_model(tmp_path / "mixed.keras", safe_mode=True)
    modes = kq.qat.modes(again)
    assert modes == kq.qat.modes(loaded)
    assert modes["add_quant"] == modes["logits"] == "frozen" and modes["conv1"] == "observe"
    assert_same_variables(again, loaded)

    # Training continues where it stopped: compiled, optimizer state restored, counters resumed.
    assert again.compiled and again.optimizer.iterations.numpy() == qm.STEPS
    before = qm.snapshot(again)
    more = again.fit(x, y, batch_size=qm.BATCH, epochs=1, shuffle=False, verbose=0).history
    assert np.isfinite(more["loss"][0]) and more["loss"][0] < history["loss"][-1] * 1.2
    assert set(qm.step_counts(again).values()) == {float(qm.STEPS + qm.N_TRAIN // qm.BATCH)}
    after = qm.snapshot(again)
    frozen = [k for k in before["act"] if k.startswith(("add_quant/", "logits/"))]
    assert frozen and all(np.array_equal(before["act"][k], after["act"][k]) for k in frozen)
    assert any(not np.array_equal(before["act"][k], after["act"][k]) for k in before["act"] if k not in frozen)


# 4. QATScheduler and manual mode switches -----------------------------------------------------
OBSERVE, FREEZE_BN, FREEZE = 2, 4, 6
SCHEDULED_STEPS, SCHEDULED_BATCH = 8, 16


@pytest.fixture(scope="module")
def scheduled(float_cnn, data):
    """A QAT model trained 8 steps under `QATScheduler(observe_steps=2, freeze_bn_step=4, freeze_step=6)`.

    Returns `(qat, recorder)`; the recorder holds the modes and state at the start and after each step.
    The BatchNormalization folding tests read this model (BN frozen, ranges frozen).
    """
    x, y, _, _ = data
    qat = kq.quantize_model(float_cnn[0], kq.QuantConfig.int8(), mode="qat")
    qm.compile_for_qat(qat, **DEFAULT_COMPILE)
    recorder = qm.Recorder()
    scheduler = kq.QATScheduler(observe_steps=OBSERVE, freeze_bn_step=FREEZE_BN, freeze_step=FREEZE)
    n = SCHEDULED_STEPS * SCHEDULED_BATCH
    qat.fit(x[:n], y[:n], batch_size=SCHEDULED_BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[scheduler, recorder])
    return qat, recorder


@pytest.mark.slow
def test_scheduler_switches_modes_at_exactly_the_given_steps(scheduled):
    qat, rec = scheduled
    assert len(rec.modes) == SCHEDULED_STEPS + 1
    names = [q.name for q in kq.qat.quantizer_layers(qat)]
    for done, modes in enumerate(rec.modes):  # modes after `done` training steps
        expected = "observe" if done < OBSERVE else "learn" if done < FREEZE else "frozen"
        assert modes == dict.fromkeys(names, expected), (done, modes)
        assert set(rec.steps[done].values()) == {float(done)}


@pytest.mark.slow
def test_scheduler_freezes_batch_norm_statistics_and_ranges(scheduled):
    _, rec = scheduled
    for step in range(1, SCHEDULED_STEPS + 1):  # what training step `step` (1-based) changed
        before, after = rec.states[step - 1], rec.states[step]
        bn, act, weight = (qm.changed(before[k], after[k]) for k in ("bn", "act", "weight"))
        # Folded BatchNormalizations update every moving statistic until freeze_bn_step, then none.
        if step <= FREEZE_BN:
            assert len(bn) == len(before["bn"]) == 6, (step, bn)
        else:
            assert bn == [], (step, bn)
        # Activation ranges follow the data while observing, then stay fixed ("learn" keeps a
        # non-learnable range; "frozen" fixes it).
        if step <= OBSERVE:
            assert len(act) >= 8, (step, act)  # all but the input's (always [0, 1] on digits)
        else:
            assert act == [], (step, act)
        # Weight ranges follow the (folded) weights until freeze_step. The first step sees the initial
        # weights, whose range the wrapper already holds.
        if 2 <= step <= FREEZE:
            assert len(weight) >= 4, (step, weight)
        elif step > FREEZE:
            assert weight == [], (step, weight)


@pytest.mark.slow
def test_set_mode_and_freeze_batch_norm_act_from_the_next_step(scheduled, data):
    """Continues training the scheduled model: the scheduler re-opens observation, the switch closes it."""
    qat, _ = scheduled
    x, y, _, _ = data
    big = 10**6  # far beyond this fit: the thresholds are counted from the start of this fit

    def freeze(model):
        kq.qat.set_mode(model, "frozen")
        kq.qat.freeze_batch_norm(model)
        assert set(kq.qat.modes(model).values()) == {"frozen"}  # read at once

    recorder = qm.Recorder()
    callbacks = [kq.QATScheduler(observe_steps=big, freeze_bn_step=big, freeze_step=big), recorder,
                 qm.SwitchAt(1, freeze)]
    n = 4 * SCHEDULED_BATCH
    qat.fit(x[:n], y[:n], batch_size=SCHEDULED_BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    assert set(recorder.modes[0].values()) == {"observe"}
    assert set(recorder.steps[-1].values()) == {float(SCHEDULED_STEPS + 4)}
    for step in (1, 2, 3, 4):
        before, after = recorder.states[step - 1], recorder.states[step]
        bn, act, weight = (qm.changed(before[k], after[k]) for k in ("bn", "act", "weight"))
        if step <= 2:  # observing, batch statistics
            assert len(bn) == 6 and len(act) >= 8 and len(weight) >= 4, (step, bn, act, weight)
        else:  # switched after step 2: steps 3 and 4 change nothing
            assert bn == act == weight == [], (step, bn, act, weight)
    assert set(recorder.modes[-1].values()) == {"frozen"}
    assert all(q.schedule.batch_norm_frozen for q in kq.qat.quantizer_layers(qat) if getattr(q, "batch_norm", None))


def test_schedule_arguments_are_checked():
    with pytest.raises(kq.errors.ConfigError, match="freeze_step"):
        kq.QATScheduler(freeze_step=-1)
    with pytest.raises(kq.errors.ConfigError, match="observe_steps"):
        kq.QATScheduler(observe_steps=1.5)


# 5. BatchNormalization folding ------------------------------------------------------------------
@pytest.mark.slow
def test_folded_wrapper_is_one_quantized_conv_at_inference(scheduled, rng):
    """After QAT with BN frozen: conv3's wrapper == Conv2D(fq(folded kernel), folded bias), then fq(output)."""
    qat, _ = scheduled
    wrapper = qat.get_layer("conv3")
    assert wrapper.range_mode == "frozen" and wrapper.schedule.batch_norm_frozen
    z = rng.uniform(0.0, 3.0, size=(16, 8, 8, 8)).astype("float32")

    name, kernel, bias = wrapper.folded_weights()
    assert name == "kernel"
    scale, zero_point = wrapper.weight_qparams["kernel"]
    q_kernel = kq.ops.fake_quant(kernel, scale, zero_point, wrapper.weight_specs["kernel"])
    config = dict(wrapper.layer.get_config(), use_bias=True, name="reference")
    reference = keras.layers.Conv2D.from_config(config)
    reference.build(z.shape)
    reference.set_weights([to_np(q_kernel), to_np(bias)])
    out_scale, out_zero_point = wrapper.output_qparams
    expected = kq.ops.fake_quant(reference(z), out_scale, out_zero_point, wrapper.quant_config.activations)

    got = to_np(wrapper(z, training=False))
    step = float(to_np(out_scale))
    # Equal up to float rounding, which may move a value across a rounding boundary: one grid step.
    assert np.abs(got - to_np(expected)).max() <= step * 1.01
    assert np.mean(np.isclose(got, to_np(expected), atol=1e-5)) > 0.99
    # The kernel the wrapper quantizes lies on the grid of weight_qparams.
    on_grid = to_np(q_kernel) / to_np(scale)
    np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-3)


@pytest.mark.parametrize("bn_statistics", ["quantized", "float"])
def test_folding_matches_conv_then_batch_norm_without_quantization_effects(bn_statistics, rng):
    """16-bit weights and activations: the wrapper is conv -> BN, in inference and in training (batch stats)."""
    float_model = qm.cnn(seed=3)
    bn = float_model.get_layer("bn3")
    c = bn.gamma.shape[0]
    bn.set_weights([rng.uniform(0.5, 2.0, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c), rng.uniform(0.3, 3.0, c)])
    w16 = kq.QuantSpec(bits=16, symmetric=True, granularity="per_channel")
    a16 = kq.QuantSpec(bits=16)
    qat = kq.quantize_model(float_model, kq.QuantConfig(weights=w16, activations=a16), mode="qat",
                            bn_statistics=bn_statistics)
    wrapper, conv = qat.get_layer("conv3"), float_model.get_layer("conv3")
    z = rng.uniform(0.0, 3.0, size=(32, 8, 8, 8)).astype("float32")

    def reference(training):
        return to_np(bn(conv(z), training=training))

    lo, hi = -20.0, 20.0
    wrapper.set_output_qparams(*kq.ops.compute_qparams(lo, hi, a16))
    tol = 2 * (hi - lo) / 2**16
    expected = reference(False)
    assert np.abs(expected).max() < hi
    np.testing.assert_allclose(to_np(wrapper(z, training=False)), expected, atol=tol)

    # Training: batch statistics, moving statistics updated like BatchNormalization's (Jacob et al. 2018).
    got = to_np(wrapper(z, training=True))
    expected = reference(True)  # updates bn's moving statistics
    np.testing.assert_allclose(got, expected, atol=tol)
    # "quantized" takes the statistics of the layer with (16-bit) quantized weights: nearly the float ones.
    atol = 1e-6 if bn_statistics == "float" else 1e-4
    for ours, theirs in ((wrapper.batch_norm.moving_mean, bn.moving_mean),
                         (wrapper.batch_norm.moving_variance, bn.moving_variance)):
        np.testing.assert_allclose(to_np(ours), to_np(theirs), rtol=1e-5, atol=atol)
    # After freeze_batch_norm, training uses the moving statistics: the inference output.
    wrapper.freeze_batch_norm()
    np.testing.assert_allclose(to_np(wrapper(z, training=True)), reference(False), atol=tol)


@pytest.mark.slow
def test_weight_qparams_are_those_inference_uses_while_observing(w8a8):
    """Not frozen, weight ranges follow the weights: `weight_qparams` must be the current ones, not the last step's."""
    qat, _ = w8a8
    for name in ("conv1", "conv3", "logits"):
        wrapper = qat.get_layer(name)
        assert wrapper.range_mode == "observe"
        used = to_np(wrapper.quantized_weights(training=False)["kernel"])
        scale, zero_point = wrapper.weight_qparams["kernel"]
        kernel = wrapper.float_weights()["kernel"]
        expected = kq.ops.fake_quant(kernel, scale, zero_point, wrapper.weight_specs["kernel"])
        np.testing.assert_allclose(used, to_np(expected), rtol=0, atol=1e-6, err_msg=name)


# 6. Subclassed and Functional models ------------------------------------------------------------
@pytest.mark.slow
def test_subclassed_model_trains_in_qat_mode(data):
    x, y, x_test, _ = data
    keras.utils.set_random_seed(0)
    model = qm.SmallNet(blocks=1)
    model(x[:2])
    weights = [w.copy() for w in model.get_weights()]
    before = to_np(model(x_test[:8]))

    qat = kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat")
    assert type(qat) is qm.SmallNet and qat is not model
    assert isinstance(qat.stem, kq.QuantizeWrapper) and isinstance(qat.head, kq.QuantizeWrapper)
    assert isinstance(qat.blocks[0], kq.QuantizeWrapper)
    assert sorted(qat.quantization_report.wrapped) == ["block0", "head", "stem"]
    assert not any(isinstance(layer, kq.QuantizeWrapper) for layer in model._flatten_layers())
    # The copy starts from the float weights.
    np.testing.assert_array_equal(to_np(qat.stem.layer.kernel), to_np(model.stem.kernel))

    qm.compile_for_qat(qat, **DEFAULT_COMPILE)
    history = qat.fit(x, y, batch_size=qm.BATCH, epochs=qm.EPOCHS, shuffle=False, verbose=0).history
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert history["accuracy"][-1] > history["accuracy"][0]
    assert set(qm.step_counts(qat).values()) == {float(qm.STEPS)}
    # Trainable weights of the copy moved; the float model is unchanged.
    for before_w, after_w in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before_w, after_w)
    assert not np.array_equal(to_np(qat.head.layer.kernel), to_np(model.head.kernel))
    np.testing.assert_array_equal(to_np(model(x_test[:8])), before)


@pytest.mark.slow
def test_residual_functional_model_trains_in_qat_mode(w8a8, float_cnn):
    """The residual Functional CNN (Add with a shared input quantizer) trained; the float model is unchanged."""
    qat, history = w8a8
    assert_trained(qat, history)
    shared = qat.get_layer("relu1_shared_quant")
    assert shared.slots == 2
    mins, maxs = to_np(shared._state["min"]), to_np(shared._state["max"])
    assert mins.shape == maxs.shape == (2,) and np.all(maxs > 0)  # each Add input keeps its own range
    model, weights = float_cnn
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_merge_input_sharing_can_be_limited_to_concatenate(float_cnn):
    model, _ = float_cnn
    config = kq.QuantConfig.int8()
    assert kq.quantize_model(model, config, mode="qat").quantization_report.shared  # the residual Add
    only_concat = kq.quantize_model(model, config, mode="qat", shared_merges=(keras.layers.Concatenate,))
    assert only_concat.quantization_report.shared == ()  # this model has no Concatenate
    assert not any(isinstance(q, kq.ActivationQuantizer) and q.slots for q in only_concat.layers)
    none = kq.quantize_model(model, config, mode="qat", shared_merges=())
    assert none.quantization_report.shared == ()


def test_subclassed_model_without_training_argument_warns():
    class NoTraining(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = NoTraining()
    model(np.zeros((1, 4), "float32"))
    with pytest.warns(UserWarning, match="training"):
        try:
            kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat")
        except kq.errors.ConfigError:
            pass  # copying needs get_config/from_config; the warning comes first


# 7. User-defined layers ---------------------------------------------------------------------------
@pytest.mark.slow
def test_user_defined_layers_are_wrapped_and_train(data):
    with kq.layers.rule_scope():
        kq.register_rule(qm.RuleDense, weights=("w",))
        _train_user_defined_layers(data)
    assert kq.layers.get_rule(qm.RuleDense) is None


def _train_user_defined_layers(data):
    x, y, _, _ = data
    model = qm.custom_mlp()
    assert kq.layers.get_rule(qm.RuleDense).weights == ("w",)
    assert kq.layers.get_rule(model.get_layer("method_dense")).weights == ("w",)
    qat = kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat")
    assert qat.quantization_report.wrapped == ("rule_dense", "method_dense")
    assert qat.quantization_report.unsupported == ()
    for name in ("rule_dense", "method_dense"):
        wrapper = qat.get_layer(name)
        assert isinstance(wrapper, kq.QuantizeWrapper) and set(wrapper.weight_qparams) == {"w"}
    qm.compile_for_qat(qat, **DEFAULT_COMPILE)
    history = qat.fit(x, y, batch_size=qm.BATCH, epochs=qm.EPOCHS, shuffle=False, verbose=0).history
    assert np.isfinite(history["loss"]).all() and np.all(np.diff(history["loss"]) < 0)
    assert history["accuracy"][-1] > 0.6
    assert set(qm.step_counts(qat).values()) == {float(qm.STEPS)}
    # The weights the layer computes with are on the int8 grid of each output channel.
    for name in ("rule_dense", "method_dense"):
        wrapper = qat.get_layer(name)
        w = to_np(wrapper.quantized_weights(training=False)["w"])
        scale = to_np(wrapper.weight_qparams["w"][0])
        assert scale.shape == (w.shape[-1],)
        np.testing.assert_allclose(w / scale, np.round(w / scale), atol=1e-3)
        assert np.abs(np.round(w / scale)).max() <= 127


# 8. Accuracy on digits ------------------------------------------------------------------------------
# Measured with the 64-16 MLP over seeds 0-4 (TensorFlow, CPU): float 96.4-98.0 %; W8A8 QAT -0.2..+0.2
# points from float; W4A4 PTQ 94.0-95.6 %; W4A4 LSQ QAT +0.2..+2.5 points over PTQ, lower test loss
# every time.
ACC_SEED, FLOAT_EPOCHS, W8_EPOCHS, W4_EPOCHS = 2, 40, 3, 8
W4A4 = kq.QuantConfig(
    weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", learnable=True),
    activations=kq.QuantSpec(bits=4, learnable=True),
)


def cosine_adam(lr, epochs, n, batch=64):
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, epochs * -(-n // batch)))


def evaluate(model, x, y):
    """`(accuracy, cross-entropy)` on `(x, y)`."""
    logits = to_np(model.predict(x, batch_size=512, verbose=0))
    loss = float(to_np(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)))
    return float(np.mean(logits.argmax(axis=1) == y)), loss


@pytest.fixture(scope="module")
def digits_mlp():
    (x, y), (x_test, y_test) = qm.digits()
    model = qm.mlp(seed=ACC_SEED)
    model.compile(cosine_adam(0.01, FLOAT_EPOCHS, len(x)), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=FLOAT_EPOCHS, batch_size=64, verbose=0)
    return model, x, y, x_test, y_test


def fine_tune(qat, x, y, lr, epochs):
    keras.utils.set_random_seed(ACC_SEED)
    qat.compile(cosine_adam(lr, epochs, len(x)), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


@pytest.mark.tensorflow  # kq.CalibrationCallback hooks TensorFlow's trainer
@pytest.mark.slow
def test_w8a8_qat_reaches_float_accuracy(digits_mlp):
    model, x, y, x_test, y_test = digits_mlp
    float_accuracy, _ = evaluate(model, x_test, y_test)
    assert float_accuracy >= 0.95
    qat = kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat")
    fine_tune(qat, x, y, 1e-3, W8_EPOCHS)
    qat_accuracy, _ = evaluate(qat, x_test, y_test)
    assert qat_accuracy >= float_accuracy - 0.01, (float_accuracy, qat_accuracy)


@pytest.mark.tensorflow
@pytest.mark.slow
def test_w4a4_lsq_qat_beats_w4a4_ptq(digits_mlp):
    model, x, y, x_test, y_test = digits_mlp
    cb = kq.CalibrationCallback(W4A4)
    model.predict(x, batch_size=512, callbacks=[cb], verbose=0)
    ptq = kq.quantize_model(model, W4A4, calibration=cb.result)
    qat = kq.quantize_model(model, W4A4, mode="qat", calibration=cb.result)
    # Initialised from the calibration: the QAT model starts as the PTQ model and learns (LSQ) from step one.
    assert set(kq.qat.modes(qat).values()) == {"learn"}
    ptq_accuracy, ptq_loss = evaluate(ptq, x_test, y_test)
    start = to_np(qat.predict(x_test, batch_size=512, verbose=0)).argmax(axis=1)
    assert np.mean(start == to_np(ptq.predict(x_test, batch_size=512, verbose=0)).argmax(axis=1)) > 0.99

    fine_tune(qat, x, y, 1e-3, W4_EPOCHS)
    qat_accuracy, qat_loss = evaluate(qat, x_test, y_test)
    float_accuracy, _ = evaluate(model, x_test, y_test)
    assert qat_accuracy > ptq_accuracy and qat_loss < ptq_loss, (ptq_accuracy, qat_accuracy, ptq_loss, qat_loss)
    assert qat_accuracy >= float_accuracy - 0.03
    # The step sizes were learned (LSQ), not only the weights.
    deltas = [v for v in qat.trainable_variables if v.name.endswith("scale_delta")]
    assert deltas and any(np.abs(to_np(v)).max() > 0 for v in deltas)
