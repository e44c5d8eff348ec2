"""kq.QuantizationTensorBoard: quantizer ranges, scales and errors logged during QAT, read back from the event files."""

import glob
import math
import os

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.analysis import tensorboard as tb
from keras_quant.errors import ConfigError
from keras_quant.export.plan import quantizer_layers

# The callback writes TensorBoard event files with `tf.summary` (as keras.callbacks.TensorBoard does),
# under any Keras backend: it needs the tensorflow package installed, not the TensorFlow backend.
pytest.importorskip("tensorflow")

N, BATCH, EPOCHS = 192, 32, 2
BATCHES = N // BATCH * EPOCHS


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def read_events(log_dir):
    """`{tag: [(step, value)]}` and `{tag: plugin}` of the callback's event files."""
    import tensorflow as tf

    values, plugins = {}, {}
    for path in sorted(glob.glob(os.path.join(log_dir, tb.RUN_NAME, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                values.setdefault(v.tag, []).append((event.step, tf.make_ndarray(v.tensor)))
                if v.metadata.plugin_data.plugin_name:
                    plugins[v.tag] = v.metadata.plugin_data.plugin_name
    return values, plugins


def tiny_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, activation="softmax", name="dense"),  # softmax: a preactivation quantizer
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    (x, y), _ = datasets.load_digits()
    x, y = x[:N], y[:N]
    qat = kq.quantize_model(tiny_cnn(), kq.QuantConfig.int8(), mode="qat")
    qat.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    epoch_dir, batch_dir = (str(tmp_path_factory.mktemp(n)) for n in ("epoch", "batch"))
    by_epoch = kq.QuantizationTensorBoard(epoch_dir, data=(x, y), max_samples=64)
    by_batch = kq.QuantizationTensorBoard(batch_dir, update_freq=4)
    qat.fit(x, y, batch_size=BATCH, epochs=EPOCHS, callbacks=[by_epoch, by_batch], verbose=0, shuffle=False)
    return qat, x, by_epoch, read_events(epoch_dir), read_events(batch_dir)


def roles(layer):
    if isinstance(layer, kq.ActivationQuantizer):
        return ["output"]
    return (["preactivation"] if layer.preactivation_quantizer is not None else []) + (
        ["output"] if layer.output_quantizer is not None else [])


@pytest.mark.slow
def test_tags_of_every_quantizer_at_every_epoch(trained):
    qat, _, cb, (values, plugins), _ = trained
    layers = quantizer_layers(qat)
    assert {q.name for q in layers} >= {"conv", "dense"} and any(isinstance(q, kq.ActivationQuantizer) for q in layers)
    assert cb._writer is None  # closed on train end
    for q in layers:
        expected = [f"{q.name}/range_mode"]
        for role in roles(q):
            expected += [f"{q.name}/{role}/{k}" for k in ("scale", "zero_point", "range_min", "range_max",
                                                          "sqnr_db", "mse")]
        for weight in getattr(q, "weight_specs", {}):  # int8: per-channel weight scales
            expected += [f"{q.name}/{weight}/{k}" for k in ("scale_min", "scale_mean", "scale_max", "sqnr_db",
                                                            "scales")]
        for tag in expected:
            assert [s for s, _ in values[tag]] == list(range(EPOCHS)), tag
            assert plugins[tag] == ("histograms" if tag.endswith("/scales") else "scalars")
    assert "dense/preactivation/scale" in values
    assert all(float(v) == tb.RANGE_MODE_CODES["observe"] for _, v in values["conv/range_mode"])


@pytest.mark.slow
def test_last_logged_ranges_are_the_trained_layers(trained):
    qat, _, _, (values, _), _ = trained
    for q in quantizer_layers(qat):
        for role in roles(q):
            if isinstance(q, kq.ActivationQuantizer):
                spec, (scale, zero_point) = q.spec, q.qparams
            else:
                quantizer, qp = ((q.output_quantizer, q.output_qparams) if role == "output"
                                 else (q.preactivation_quantizer, q.preactivation_qparams))
                spec, (scale, zero_point) = quantizer.spec, qp
            scale, zero_point = float(to_np(scale)), float(to_np(zero_point))
            last = {k: float(values[f"{q.name}/{role}/{k}"][-1][1]) for k in ("scale", "zero_point", "range_min",
                                                                               "range_max")}
            assert last["scale"] == pytest.approx(scale, rel=1e-6)
            assert last["zero_point"] == zero_point
            assert last["range_min"] == pytest.approx((spec.qmin - zero_point) * scale, rel=1e-5, abs=1e-7)
            assert last["range_max"] == pytest.approx((spec.qmax - zero_point) * scale, rel=1e-5)
    # The scale moved during training: the two epochs' conv output scales differ.
    first, last = (float(v) for _, v in (values["conv/output/scale"][0], values["conv/output/scale"][-1]))
    assert first != last


def reference_sqnr(w, scale, zero_point, spec):
    """10 log10(|w|^2 / |w - fq(w)|^2) with the per-channel fake quantization written out in numpy."""
    q = np.clip(np.floor(w / scale + 0.5) + zero_point, spec.qmin, spec.qmax)
    e = (q - zero_point) * scale - w
    return 10.0 * math.log10(np.sum(w * w) / np.sum(e * e))


@pytest.mark.slow
def test_weight_scales_and_sqnr(trained):
    qat, _, _, (values, _), _ = trained
    for name, channels in (("conv", 4), ("dense", 10)):
        q = qat.get_layer(name)
        w = to_np(q.float_weights()["kernel"])
        scale, zero_point = (to_np(v) for v in q.weight_qparams["kernel"])
        logged = float(values[f"{name}/kernel/sqnr_db"][-1][1])
        assert logged > 30.0
        assert logged == pytest.approx(reference_sqnr(w, scale, zero_point, q.weight_specs["kernel"]), abs=0.05)
        assert float(values[f"{name}/kernel/scale_max"][-1][1]) == pytest.approx(scale.max(), rel=1e-6)
        assert float(values[f"{name}/kernel/scale_mean"][-1][1]) == pytest.approx(scale.mean(), rel=1e-5)
        hist = values[f"{name}/kernel/scales"][-1][1]
        assert hist.shape == (tb.HISTOGRAM_BUCKETS, 3) and hist[:, 2].sum() == channels
        assert hist[0, 0] == pytest.approx(scale.min(), rel=1e-6) and hist[-1, 1] == pytest.approx(scale.max(), rel=1e-6)


@pytest.mark.slow
def test_activation_errors_on_the_sample(trained):
    qat, x, _, (values, _), _ = trained
    errors = tb.activation_errors(qat, x[:64])
    for tag, v in errors.items():
        assert float(values[tag][-1][1]) == pytest.approx(v, rel=1e-5, abs=1e-12), tag
    for q in quantizer_layers(qat):
        for role in roles(q):
            assert errors[f"{q.name}/{role}/sqnr_db"] > 25.0  # 8-bit activations
            assert 0.0 < errors[f"{q.name}/{role}/mse"] < 1e-3
    # conv's output quantizer measured by hand: its input is ReLU(conv(quantized input, fake-quantized kernel))
    conv = qat.get_layer("conv")
    input_quantizer = next(q for q in quantizer_layers(qat) if isinstance(q, kq.ActivationQuantizer))
    xq = input_quantizer(x[:64], training=False)
    kernel = conv.quantized_weights(training=False)["kernel"]
    z = to_np(keras.ops.relu(keras.ops.conv(xq, kernel, padding="valid") + conv.layer.bias))
    scale, zero_point = (float(to_np(v)) for v in conv.output_qparams)
    spec = conv.output_quantizer.spec
    zq = (np.clip(np.floor(z / scale + 0.5) + zero_point, spec.qmin, spec.qmax) - zero_point) * scale
    want = 10.0 * math.log10(np.sum(z * z) / np.sum((zq - z) ** 2))
    assert errors["conv/output/sqnr_db"] == pytest.approx(want, abs=0.05)
    assert errors["conv/output/mse"] == pytest.approx(np.mean((zq - z) ** 2), rel=1e-3)


@pytest.mark.slow
def test_probe_leaves_the_model_unchanged(trained):
    qat, x, _, _, _ = trained
    before = [to_np(v) for v in qat.variables]
    quantizers = [(q, getattr(q, "output_quantizer", None), getattr(q, "quantizer", None)) for q in quantizer_layers(qat)]
    y0 = to_np(qat(x[:16], training=False))
    tb.activation_errors(qat, x[:64])
    for (q, out, act) in quantizers:
        assert getattr(q, "output_quantizer", None) is out and getattr(q, "quantizer", None) is act
    for a, v in zip(before, qat.variables):
        np.testing.assert_array_equal(a, to_np(v))
    np.testing.assert_array_equal(y0, to_np(qat(x[:16], training=False)))


@pytest.mark.slow
def test_integer_update_freq_logs_every_n_batches_without_data(trained):
    *_, (values, _) = trained
    assert [s for s, _ in values["conv/output/scale"]] == list(range(4, BATCHES + 1, 4))
    assert not any(t.endswith("/mse") or t.endswith("/output/sqnr_db") for t in values)  # no data, no activation error
    assert "conv/kernel/sqnr_db" in values


@pytest.mark.slow
def test_range_mode_after_freezing(trained):
    qat, *_ = trained
    kq.qat.set_mode(qat, "frozen")
    try:
        scalars, _ = tb.quantizer_summaries(qat)
        assert {k: v for k, v in scalars.items() if k.endswith("range_mode")} == {
            f"{q.name}/range_mode": 2.0 for q in quantizer_layers(qat)}
    finally:
        kq.qat.set_mode(qat, "observe")


def test_arguments_and_empty_models(tmp_path):
    for bad in ("batch", 0, True, 1.5):
        with pytest.raises(ConfigError) as e:
            kq.QuantizationTensorBoard(tmp_path, update_freq=bad)
        assert e.value.field == "update_freq"
    with pytest.raises(ConfigError) as e:
        kq.QuantizationTensorBoard(tmp_path, max_samples=0)
    assert e.value.field == "max_samples"
    cb = kq.QuantizationTensorBoard(tmp_path, data=(np.zeros((10, 3)), np.zeros(10)), max_samples=4)
    assert cb.data.shape == (4, 3)
    with pytest.raises(ConfigError) as e:
        tb.quantizer_summaries(tiny_cnn())
    assert e.value.field == "model"


def test_histogram_buckets():
    h = tb.histogram_buckets([1.0, 2.0, 3.0, np.inf, np.nan], bucket_count=2)
    np.testing.assert_array_equal(h, [[1.0, 2.0, 1.0], [2.0, 3.0, 2.0]])
    np.testing.assert_array_equal(tb.histogram_buckets([0.5, 0.5]), [[0.0, 1.0, 2.0]])
    assert tb.histogram_buckets([np.nan]).shape == (0, 3)
