"""CalibrationCallback: statistics from the compiled step equal a probe model's, the model is left as found."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.calibration import CalibrationCallback
from keras_quant.errors import ConfigError, MemoryLimitExceededError, NoDataError

pytestmark = pytest.mark.tensorflow  # the callback hooks TensorFlow's trainer

TOL = dict(rtol=1e-6, atol=1e-6)


def functional_model(seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(i)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    s = keras.layers.Conv2D(4, 1, name="skip")(i)
    h = keras.layers.Add(name="add")([h, s])
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    o = keras.layers.Dense(3, name="fc")(h)
    return keras.Model(i, o, name="cnn")


def small_model():
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Flatten(name="flat")(i)
    return keras.Model(i, keras.layers.Dense(3, name="fc")(h), name="small")


def data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def probe_outputs(model, names, x):
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outs = probe.predict(x, verbose=0)
    return dict(zip(names, outs if len(names) > 1 else [outs]))


def assert_matches(stats, ref):
    ref = np.asarray(ref, np.float64)
    assert stats.count == ref.size
    np.testing.assert_allclose(stats.min, ref.min(), **TOL)
    np.testing.assert_allclose(stats.max, ref.max(), **TOL)
    np.testing.assert_allclose(stats.mean, ref.mean(), **TOL)
    np.testing.assert_allclose(stats.std, ref.std(), rtol=1e-5, atol=1e-6)
    flat = ref.reshape(-1, ref.shape[-1])
    np.testing.assert_allclose(stats.channel_min, flat.min(axis=0), **TOL)
    np.testing.assert_allclose(stats.channel_max, flat.max(axis=0), **TOL)
    np.testing.assert_allclose(stats.sparsity, np.mean(ref == 0), **TOL)


NAMES = ("conv", "bn", "relu", "skip", "add", "gap", "fc")


@pytest.mark.parametrize("jit", [False, True])
def test_predict_stats_match_probe_model(jit):
    model = functional_model()
    model.compile(jit_compile=jit)
    x, _ = data()
    cb = CalibrationCallback()
    model.predict(x, batch_size=20, callbacks=[cb], verbose=0)
    result = cb.result
    assert result.layer_names == ["image", *NAMES]
    tol = {} if not jit else dict(rtol=1e-5, atol=1e-5)
    for name, ref in probe_outputs(model, NAMES, x).items():
        if jit:  # XLA fuses differently: compare to float rounding
            np.testing.assert_allclose([result[name].min, result[name].max], [ref.min(), ref.max()], **tol)
        else:
            assert_matches(result[name], ref)
    assert_matches(result["image"], x)
    assert cb.samples_seen == len(x)


def test_result_carries_qparams_of_config():
    model = functional_model()
    x, _ = data()
    cb = CalibrationCallback(config=kq.QuantConfig(activations=kq.QuantSpec(bits=8, symmetric=True)))
    model.predict(x, callbacks=[cb], verbose=0)
    st = cb.result["relu"]
    lo, hi = st.min, st.max
    scale, zp = kq.ops.compute_qparams(lo, hi, kq.QuantSpec(bits=8, symmetric=True))
    np.testing.assert_allclose(st.scale, keras.ops.convert_to_numpy(scale), rtol=1e-6)
    assert int(st.zero_point) == 0


def test_evaluate_with_tf_data_and_generator():
    import tensorflow as tf

    model = functional_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    cb = CalibrationCallback()
    model.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), callbacks=[cb], verbose=0)
    assert cb.samples_seen == len(x)

    def gen():
        for i in range(0, len(x), 16):
            yield (x[i : i + 16],)

    cb2 = CalibrationCallback()
    model.predict(gen(), callbacks=[cb2], verbose=0)
    ref = probe_outputs(model, ["add"], x)["add"]
    assert_matches(cb2.result["add"], ref)


def test_fit_leaves_training_unchanged_and_skips_validation():
    x, y = data(64)

    def train(callbacks):
        model = functional_model(seed=3)
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        hist = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, validation_data=(x[:32], y[:32]),
                         callbacks=callbacks, verbose=0)
        return model, hist.history

    plain, h0 = train([])
    cb = CalibrationCallback()
    calibrated, h1 = train([cb])
    assert h0 == h1
    for a, b in zip(plain.get_weights(), calibrated.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Two epochs of 64 training samples; the validation passes were not observed.
    assert cb.samples_seen == 128
    assert cb.result["image"].count == 128 * 64


def test_model_left_as_found():
    model = functional_model()
    x, _ = data()
    model.predict(x, verbose=0)
    fn = model.predict_function
    before = model.predict(x, verbose=0)
    cb = CalibrationCallback()
    model.predict(x, callbacks=[cb], verbose=0)
    assert model.predict_function is fn
    assert "predict_step" not in model.__dict__
    assert all("call" not in layer.__dict__ for layer in model.layers)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)
    count = cb.result["fc"].count
    model.predict(x, verbose=0)  # without the callback: no update
    assert cb.result["fc"].count == count


def test_already_compiled_and_fitted_model():
    model = functional_model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    model.fit(x, y, epochs=1, verbose=0)
    cb = CalibrationCallback()
    model.predict(x, callbacks=[cb], verbose=0)
    assert_matches(cb.result["gap"], probe_outputs(model, ["gap"], x)["gap"])


def test_sequential_subclassed_and_nested():
    x, _ = data(40)
    seq = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="c"), keras.layers.Flatten(),
                            keras.layers.Dense(2, name="d")])
    cb = CalibrationCallback()
    seq.predict(x, callbacks=[cb], verbose=0)
    assert "c" in cb.result and "d" in cb.result and "flatten" not in cb.result

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="relu", name="inner_dense")],
                             name="inner")

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.body = inner
            self.head = keras.layers.Dense(2, name="head")

        def call(self, t):
            return self.head(self.body(t))

    sub = Sub()
    v = np.random.default_rng(1).normal(size=(40, 4)).astype("float32")
    sub(v[:1])
    cb2 = CalibrationCallback()
    sub.predict(v, batch_size=8, callbacks=[cb2], verbose=0)
    hidden = np.maximum(v @ inner.layers[0].kernel.numpy() + inner.layers[0].bias.numpy(), 0)
    assert_matches(cb2.result["inner_dense"], hidden)
    assert cb2.result["input"].count == v.size  # a subclassed model's input
    assert cb2.result["head"].count == 40 * 2


def test_branch_never_reached_reports_why():
    class Branchy(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(2, name="used")
            self.unused = keras.layers.Dense(2, name="unused")

        def call(self, t):
            return self.used(t)

    m = Branchy()
    v = np.ones((8, 3), "float32")
    m(v)
    m.unused.build((None, 3))
    cb = CalibrationCallback()
    m.predict(v, callbacks=[cb], verbose=0)
    with pytest.raises(NoDataError, match="unused"):
        cb.result.qparams("unused", kq.QuantSpec())


def test_config_none_layers_are_not_tracked():
    config = kq.QuantConfig.int8().set_layer_name("fc", None)
    cb = CalibrationCallback(config=config)
    functional_model().predict(data()[0], callbacks=[cb], verbose=0)
    assert "fc" not in cb.result and "conv" in cb.result


def test_max_samples_is_exact():
    x, _ = data(96)
    cb = CalibrationCallback(max_samples=37)
    model = small_model()
    model.predict(x, batch_size=16, callbacks=[cb], verbose=0)
    assert cb.samples_seen == 37
    assert_matches(cb.result["image"], x[:37])
    assert_matches(cb.result["fc"], probe_outputs(model, ["fc"], x[:37])["fc"])


def test_systematic_sampling_takes_every_kth():
    x, _ = data(100)
    model = small_model()
    cb = CalibrationCallback(sampling="systematic", sampling_options={"step": 3, "offset": 1})
    model.predict(x, batch_size=16, callbacks=[cb], verbose=0)
    assert_matches(cb.result["fc"], probe_outputs(model, ["fc"], x[1::3])["fc"])


def test_random_sampling_is_seeded_and_independent_of_batch_size():
    x, _ = data(120)
    model = small_model()
    results = []
    for batch_size, seed in ((16, 5), (40, 5), (16, 6)):  # 120 = 7.5 and 3 batches
        cb = CalibrationCallback(sampling="random", seed=seed, sampling_options={"rate": 0.3})
        model.predict(x, batch_size=batch_size, callbacks=[cb], verbose=0)
        results.append((cb.samples_seen, cb.result["fc"].mean))
    assert results[0][0] == results[1][0]
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)  # same samples, other batching
    assert results[0][1] != pytest.approx(results[2][1], rel=1e-3)
    assert 15 < results[0][0] < 60


def test_stratified_balances_labels():
    x, _ = data(120)
    y = np.repeat([0, 1, 2], [80, 30, 10])
    model = small_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = CalibrationCallback(sampling="stratified", max_samples=30, sampling_options={"num_strata": 3})
    model.evaluate(x, y, batch_size=16, callbacks=[cb], verbose=0)
    counts = keras.ops.convert_to_numpy(cb._sampler.counts)
    np.testing.assert_array_equal(counts, [10, 10, 10])
    assert cb.samples_seen == 30
    with pytest.raises(ConfigError, match="max_samples"):
        CalibrationCallback(sampling="stratified")


def test_stratified_without_labels_uses_norm_bins():
    x, _ = data(120)
    cb = CalibrationCallback(sampling="stratified", max_samples=40, sampling_options={"num_strata": 4})
    small_model().predict(x, batch_size=40, callbacks=[cb], verbose=0)
    counts = keras.ops.convert_to_numpy(cb._sampler.counts)
    assert counts.sum() == cb.samples_seen == 40
    np.testing.assert_array_equal(counts, [10, 10, 10, 10])


def test_importance_sampling_prefers_large_inputs():
    rng = np.random.default_rng(0)
    scale = np.where(np.arange(400) % 2 == 0, 0.1, 3.0).astype("float32")
    x = rng.normal(size=(400, 8, 8, 1)).astype("float32") * scale[:, None, None, None]
    cb = CalibrationCallback(sampling="importance", seed=0, sampling_options={"rate": 0.3})
    small_model().predict(x, batch_size=50, callbacks=[cb], verbose=0)
    big = np.mean(np.abs(x[1::2]))
    # Kept samples are mostly the large ones: the mean |x| is near theirs.
    st = cb.result["image"]
    assert st.std > 0.8 * np.std(x[1::2])
    assert 0 < cb.samples_seen < 400 and big > 0


def test_user_sampler_object():
    class FirstHalf:
        def select(self, inputs, labels):
            n = keras.ops.shape(inputs)[0]
            return keras.ops.arange(n) < n // 2

    x, _ = data(64)
    model = small_model()
    cb = CalibrationCallback(sampling=FirstHalf())
    model.predict(x, batch_size=16, callbacks=[cb], verbose=0)
    keep = np.concatenate([x[i : i + 8] for i in range(0, 64, 16)])
    assert_matches(cb.result["fc"], probe_outputs(model, ["fc"], keep)["fc"])


def test_memory_is_bounded_and_limit_raises():
    x, _ = data(200)
    model = small_model()
    cb = CalibrationCallback()
    model.predict(x[:20], batch_size=20, callbacks=[cb], verbose=0)
    small = cb.state_bytes
    model.predict(x, batch_size=20, callbacks=[cb], verbose=0)
    assert cb.state_bytes == small
    with pytest.raises(MemoryLimitExceededError) as e:
        model.predict(x, callbacks=[CalibrationCallback(memory_limit=small // 2)], verbose=0)
    assert e.value.limit == small // 2
    # The failed attempt left the model as it was.
    assert "predict_step" not in model.__dict__ or model.__dict__.get("predict_step") is None
    model.predict(x, callbacks=[CalibrationCallback(memory_limit=small)], verbose=0)


def test_progress_line(capsys):
    cb = CalibrationCallback(verbose=1)
    small_model().predict(data()[0], batch_size=32, callbacks=[cb], verbose=0)
    out = capsys.readouterr().out
    assert "samples" in out and "layers" in out and "calibrated 96 samples" in out


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="sampling"):
        CalibrationCallback(sampling="bogus")
    with pytest.raises(ConfigError, match="max_samples"):
        CalibrationCallback(max_samples=0)
    with pytest.raises(ConfigError, match="memory_limit"):
        CalibrationCallback(memory_limit=-1)
    with pytest.raises(ConfigError, match="config"):
        CalibrationCallback(config="int8")


MIRRORED = textwrap.dedent(
    """
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, keras_quant as kq

    def build():
        keras.utils.set_random_seed(0)
        i = keras.Input((6,), name="x")
        h = keras.layers.Dense(8, activation="relu", name="h")(i)
        return keras.Model(i, keras.layers.Dense(3, name="o")(h))

    x = np.random.default_rng(0).normal(size=(90, 6)).astype("float32")
    out = {}
    for name, strategy in (("one", tf.distribute.get_strategy()),
                           ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        with strategy.scope():
            model = build()
        cb = kq.CalibrationCallback(config=kq.QuantConfig(activations=kq.QuantSpec(observer="mse")),
                                    max_samples=70)
        model.predict(x, batch_size=20, callbacks=[cb], verbose=0)
        r = cb.result
        out[name] = {k: [r[k].count, r[k].min, r[k].max, r[k].mean, r[k].std, r[k].range_min, r[k].range_max]
                     for k in r.layer_names}
        out[name]["seen"] = cb.samples_seen
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_matches_one_device(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["one"]["seen"] == out["two"]["seen"] == 70
    for key in ("x", "h", "o"):
        np.testing.assert_allclose(out["two"][key], out["one"][key], rtol=1e-5, atol=1e-6)


def test_range_statistics_give_the_same_qparams():
    x, _ = data(64)
    model = functional_model()
    full, lean = CalibrationCallback(), CalibrationCallback(statistics="range")
    model.predict(x, callbacks=[full], verbose=0)
    model.predict(x, callbacks=[lean], verbose=0)
    assert lean.state_bytes < full.state_bytes
    # Only where quantize_model puts activation quantizers: conv and bn fold into relu's.
    assert lean.result.layer_names == ["image", "relu", "skip", "add", "gap", "fc"]
    for name in lean.result.layer_names:
        assert lean.result[name].scale == pytest.approx(full.result[name].scale, rel=1e-6)
        assert lean.result[name].zero_point == full.result[name].zero_point
    q_full = kq.quantize_model(model, calibration=full.result)
    q_lean = kq.quantize_model(model, calibration=lean.result)
    np.testing.assert_array_equal(q_full.predict(x, verbose=0), q_lean.predict(x, verbose=0))
    with pytest.raises(ConfigError, match="statistics"):
        CalibrationCallback(statistics="everything")


def test_range_statistics_of_a_separable_conv_folded_into_batchnorm_and_relu():
    """Xception / NASNet: SeparableConv2D -> BatchNormalization -> ReLU has no quantizer at the conv's own
    output, but its depthwise half writes a tensor of its own in the file: range statistics record it."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="image")
    h = keras.layers.SeparableConv2D(6, 3, padding="same", use_bias=False, name="sep")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    out = keras.layers.Dense(2, name="fc")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32")
    full, lean = CalibrationCallback(), CalibrationCallback(statistics="range")
    model.predict(x, callbacks=[full], verbose=0)
    model.predict(x, callbacks=[lean], verbose=0)
    assert "sep" not in lean.result.layer_names and "sep:depthwise" in lean.result.layer_names
    assert lean.result["sep:depthwise"].scale == pytest.approx(full.result["sep:depthwise"].scale, rel=1e-6)
    q_full = kq.quantize_model(model, calibration=full.result)
    q_lean = kq.quantize_model(model, calibration=lean.result)
    np.testing.assert_array_equal(q_full.predict(x, verbose=0), q_lean.predict(x, verbose=0))


def test_separable_depthwise_collector_is_built_before_the_step_is_traced():
    """A collector built inside the traced step creates variables there, and TensorFlow then traces the whole
    step twice (NASNetMobile: 4.5 s of a 13.7 s calibration). The depthwise output's shape is known up front."""
    from keras_quant.calibration.callback import _depthwise_shape

    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 9, 3), name="image")
    h = keras.layers.SeparableConv2D(6, 3, strides=2, depth_multiplier=2, use_bias=False, name="sep")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    out = keras.layers.Dense(2, name="fc")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inp, out)
    assert _depthwise_shape(model.get_layer("sep")) == (None, 4, 4, 6)
    fc = model.get_layer("fc")
    traces = []
    original = fc.call
    fc.call = lambda *a, **k: (traces.append(1), original(*a, **k))[1]
    x = np.random.default_rng(0).normal(size=(32, 9, 9, 3)).astype("float32")
    lean = CalibrationCallback(statistics="range")
    model.predict(x, batch_size=16, callbacks=[lean], verbose=0)
    assert len(traces) == 1
    assert lean.result["sep:depthwise"].count == 32 * 4 * 4 * 6


def test_detach_after_an_interrupted_call():
    x, _ = data(64)
    model = small_model()
    model.predict(x, verbose=0)
    fn = model.predict_function

    class Interrupt(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    cb = CalibrationCallback()
    with pytest.raises(KeyboardInterrupt):
        model.predict(x, batch_size=16, callbacks=[cb, Interrupt()], verbose=0)
    assert "predict_step" in model.__dict__  # Keras never called on_predict_end
    cb.detach()
    assert "predict_step" not in model.__dict__ and model.predict_function is fn
    assert all("call" not in layer.__dict__ for layer in model.layers)
    assert cb.samples_seen == 16  # what was gathered is kept


def test_predict_step_is_traced_once_for_a_partial_last_batch():
    x, _ = data(70)  # 32 + 32 + 6
    model = small_model()
    cb = CalibrationCallback()
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    assert cb._compiled.experimental_get_tracing_count() == 1
    assert cb.samples_seen == 70
    assert_matches(cb.result["fc"], probe_outputs(model, ["fc"], x)["fc"])


def test_statistics_are_exact_across_the_switch_to_the_optimised_step():
    from keras_quant.calibration import compiled as compiled_lib

    n = 8 * (compiled_lib.UNOPTIMIZED_STEPS + 3)  # unoptimised steps first, then the optimised graph
    x, _ = data(n)
    model = functional_model()
    cb = CalibrationCallback()
    model.predict(x, batch_size=8, callbacks=[cb], verbose=0)
    assert cb.samples_seen == n
    for name, ref in probe_outputs(model, NAMES, x).items():
        assert_matches(cb.result[name], ref)


def test_input_specs_follow_the_config_like_quantize_model():
    x, _ = data(32)
    config = kq.QuantConfig.int8().set_layer_name("image", activations=kq.QuantSpec(bits=16, symmetric=True))
    cb = CalibrationCallback(config=config)
    small_model().predict(x, callbacks=[cb], verbose=0)
    assert cb.result["image"].spec == kq.QuantSpec(bits=16, symmetric=True)
    assert cb.result["image"].zero_point == 0
    config.set_layer_name("image", None)
    cb = CalibrationCallback(config=config)
    small_model().predict(x, callbacks=[cb], verbose=0)
    assert "image" not in cb.result and "fc" in cb.result


def test_result_is_read_once_until_the_statistics_change():
    x, _ = data(64)
    model = small_model()
    cb = CalibrationCallback()
    model.predict(x[:32], callbacks=[cb], verbose=0)
    first = cb.result
    assert cb.result is first
    model.predict(x[32:], callbacks=[cb], verbose=0)
    assert cb.result is not first and cb.result["fc"].count == 2 * first["fc"].count
    cb.reset()
    assert cb.result["fc"].count == 0


@pytest.mark.parametrize("statistics", ["range", "full"])
def test_preactivation_of_a_layers_own_activation_is_recorded(statistics):
    """Dense(activation="softmax"): its logits (the softmax's input) are observed as "<layer>:preactivation"."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax", name="out")(keras.layers.Dense(5)(inp)))
    x = np.random.default_rng(0).normal(size=(40, 6)).astype("float32")
    cb = kq.CalibrationCallback(statistics=statistics)
    model.predict(x, batch_size=8, callbacks=[cb], verbose=0)
    out = model.get_layer("out")
    assert out.activation is keras.activations.softmax  # put back
    hidden = keras.Model(inp, out.input)(x)
    logits = keras.ops.convert_to_numpy(keras.ops.matmul(hidden, out.kernel) + out.bias)
    stats = cb.result["out:preactivation"]
    assert stats.min == pytest.approx(float(logits.min()), abs=1e-5)
    assert stats.max == pytest.approx(float(logits.max()), abs=1e-5)
    assert cb.result["out"].max <= 1.0  # the softmax output, as before


def test_a_later_call_reuses_the_compiled_step_and_accumulates():
    x, _ = data(64)
    model = functional_model()
    plain = model.predict(x, verbose=0)
    plain_fn = model.predict_function
    cb = CalibrationCallback()
    used = []

    class Spy(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):  # the step function under the failure guard
            used.append(getattr(self.model.predict_function, "__wrapped__", self.model.predict_function))

    model.predict(x[:32], batch_size=16, callbacks=[cb, Spy()], verbose=0)
    model.predict(x[32:], batch_size=16, callbacks=[cb, Spy()], verbose=0)
    assert all(fn is used[0] for fn in used)  # one calibrating step for both calls: no new trace
    assert cb._compiled.experimental_get_tracing_count() == 1
    assert model.predict_function is plain_fn  # the model's own step is put back after each call
    np.testing.assert_array_equal(model.predict(x, verbose=0), plain)
    for name, ref in probe_outputs(model, NAMES, x).items():
        assert_matches(cb.result[name], ref)
    cb.reset()
    model.predict(x[:16], callbacks=[cb, Spy()], verbose=0)
    assert used[-1] is used[0]
    assert_matches(cb.result["relu"], probe_outputs(model, ["relu"], x[:16])["relu"])
    other = functional_model(seed=1)  # another model: its own step
    model2_cb = used[-1]
    other.predict(x[:16], callbacks=[cb, Spy()], verbose=0)
    assert used[-1] is not model2_cb


def test_sample_size_reaches_the_collectors():
    x, _ = data(32)
    with pytest.raises(ConfigError, match="sample_size"):
        CalibrationCallback(sample_size=0)
    model = functional_model()
    cb = CalibrationCallback(sample_size=100)  # 32 x 8 x 8 x 4 values a batch: sampled
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    ref = probe_outputs(model, ["relu"], x)["relu"]
    stats = cb.result["relu"]
    assert (stats.count, stats.min, stats.max) == (ref.size, ref.min(), ref.max())  # exact
    np.testing.assert_allclose(stats.mean, ref.astype(np.float64).mean(), rtol=1e-5, atol=1e-6)
    assert stats.std == pytest.approx(ref.std(), rel=0.25)  # estimated from 100 values
