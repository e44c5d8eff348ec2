"""GPTQ (`kq.ptq.gptq`) against a numpy reference of the paper's Algorithm 1, the im2col Hessians against
numpy, its error against round-to-nearest, and the exported integers."""

import itertools

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_quant as kq
from keras_quant.errors import ConfigError, NoDataError, UnsupportedLayerError
from keras_quant.ptq.gptq import gptq_integers, layer_hessian
from keras_quant.ptq.weights import grid_weight
from tests.layers import ProbeCalibration, to_np


# The numpy reference: Frantar et al. 2022, Algorithm 1, one column at a time, no lazy blocks --------
def reference_gptq(w, h, scale, zero_point, qmin, qmax, damp=0.01, act_order=True):
    """Integers for `w (rows, cols)` on the fixed grid `scale` / `zero_point` (per weight)."""
    w, h = w.astype("float64").copy(), h.astype("float64").copy()
    scale, zero_point = scale.astype("float64"), zero_point.astype("float64")
    cols = w.shape[1]
    for i in range(cols):
        if h[i, i] == 0:  # dead input: the weight does not matter, it becomes 0
            h[i, i], w[:, i] = 1.0, 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    w, scale, zero_point, h = w[:, perm], scale[:, perm], zero_point[:, perm], h[perm][:, perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    for i in range(cols):
        col = w[:, i]
        q[:, i] = np.clip(np.floor(col / scale[:, i] + 0.5) + zero_point[:, i], qmin, qmax)
        err = (col - (q[:, i] - zero_point[:, i]) * scale[:, i]) / hinv[i, i]
        w[:, i:] -= np.outer(err, hinv[i, i:])
    out = np.empty_like(q)
    out[:, perm] = q
    return out


def correlated(n, d, seed, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ (np.eye(d) + 0.5 * rng.normal(size=(d, d))) + 0.3
    x[:, list(dead)] = 0.0
    return x.astype("float32")


def dense_model(d_in, d_out, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((d_in,), name="x")
    return keras.Model(inp, L.Dense(d_out, name="dense")(inp))


def ptq(model, x, weights, activations=None):
    return kq.quantize_model(model, kq.QuantConfig(weights=weights, activations=activations),
                             calibration=ProbeCalibration(model, x))


SPECS = {
    "per_channel": kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel"),
    "per_group": kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=8),
    "asymmetric": kq.QuantSpec(bits=4, symmetric=False, granularity="per_channel"),
    "asym_group": kq.QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=16),
}


@pytest.mark.parametrize("spec_name, act_order", list(itertools.product(SPECS, [True, False])))
def test_dense_integers_equal_the_reference(spec_name, act_order):
    spec = SPECS[spec_name]
    x = correlated(200, 48, seed=1, dead=(5, 17))
    model = dense_model(48, 12, seed=2)
    qmodel = ptq(model, x, spec)
    wrapper = qmodel.get_layer("dense")
    before = grid_weight(wrapper)
    h = 2.0 * x.astype("float64").T @ x.astype("float64") / len(x)
    expected = reference_gptq(before.values.T, h, before.scale.T, before.zero_point.T, spec.qmin, spec.qmax,
                              act_order=act_order).T
    # block_size 16 < 48 columns: the lazy block updates are exercised; batch_size 64: the Hessian in chunks
    report = kq.ptq.gptq(qmodel, x, block_size=16, batch_size=64, act_order=act_order, progress=False)
    after = grid_weight(wrapper)
    np.testing.assert_array_equal(after.scale, before.scale)  # the grid is kept
    got = after.nearest()
    assert np.mean(got != expected) <= 0.002, np.argwhere(got != expected)
    np.testing.assert_allclose(after.values, after.dequantize(got), rtol=0, atol=1e-6)  # on the grid
    np.testing.assert_array_equal(got[[5, 17]], after.nearest()[[5, 17]] * 0 + before.zero_point[[5, 17]])
    (row,) = report.layers
    assert row.name == "dense" and row.columns == 48 and row.bits == spec.bits
    assert row.error <= row.nearest_error and row.changed > 0


def test_block_size_does_not_change_the_integers():
    rng = np.random.default_rng(3)
    x = correlated(300, 40, seed=4)
    w = rng.normal(size=(3, 10, 40))
    h = np.stack([2 * x.T.astype("float64") @ x / len(x)] * 3)
    scale = np.broadcast_to(np.abs(w).max(-1, keepdims=True) / 7, w.shape)
    zp = np.zeros_like(w)
    one = gptq_integers(w, h, scale, zp, -8, 7, block_size=40)
    for block in (1, 7, 128):
        assert np.mean(gptq_integers(w, h, scale, zp, -8, 7, block_size=block) != one) <= 0.002
    # batched (a depthwise layer's channels) == one at a time
    for b in range(3):
        np.testing.assert_array_equal(gptq_integers(w[b], h[b], scale[b], zp[b], -8, 7, block_size=40), one[b])


@pytest.mark.parametrize("seed", range(4))
def test_gptq_error_is_at_most_nearest_rounding(seed):
    rng = np.random.default_rng(seed)
    d_in, d_out = int(rng.integers(16, 64)), int(rng.integers(4, 24))
    x = correlated(256, d_in, seed=seed + 10)
    model = dense_model(d_in, d_out, seed)
    bits = int(rng.integers(2, 6))
    qmodel = ptq(model, x, kq.QuantSpec(bits=bits, symmetric=bool(seed % 2), granularity="per_channel"))
    ref = model.predict(x, verbose=0)
    nearest_out = qmodel.predict(x, verbose=0)
    (row,) = kq.ptq.gptq(qmodel, x, progress=False).layers
    gptq_out = qmodel.predict(x, verbose=0)
    assert row.error <= row.nearest_error
    # The report's errors are the layer's: measured on its outputs (less the bias), they agree.
    bias = to_np(model.get_layer("dense").bias)
    for err, out in ((row.nearest_error, nearest_out), (row.error, gptq_out)):
        measured = np.sum((out - ref) ** 2) / np.sum((ref - bias) ** 2)
        assert measured == pytest.approx(err, rel=1e-3, abs=1e-7)


# im2col Hessians ---------------------------------------------------------------------------------
def numpy_patches(x, k, stride, dilation, padding):
    """`(n, kh * kw * c)` receptive fields of a channels_last 2-D input, loops over output positions."""
    n, hgt, wid, c = x.shape
    eff = [(kk - 1) * d + 1 for kk, d in zip(k, dilation)]
    if padding == "same":
        outs = [-(-s // st) for s, st in zip((hgt, wid), stride)]
        pads = [max((o - 1) * st + e - s, 0) for o, st, e, s in zip(outs, stride, eff, (hgt, wid))]
        x = np.pad(x, [(0, 0), (pads[0] // 2, pads[0] - pads[0] // 2), (pads[1] // 2, pads[1] - pads[1] // 2),
                       (0, 0)])
    else:
        outs = [(s - e) // st + 1 for s, e, st in zip((hgt, wid), eff, stride)]
    rows = []
    for b, i, j in itertools.product(range(n), range(outs[0]), range(outs[1])):
        rows.append(np.concatenate([x[b, i * stride[0] + a * dilation[0], j * stride[1] + e * dilation[1]]
                                    for a in range(k[0]) for e in range(k[1])]))
    return np.asarray(rows, "float64")


@pytest.mark.parametrize("kw", [dict(strides=2, padding="same"), dict(dilation_rate=2, padding="valid"),
                                dict(strides=(1, 2), padding="same")])
def test_conv_hessian_equals_numpy_im2col(kw):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(6, 9, 8, 3)).astype("float32")
    inp = keras.Input((9, 8, 3))
    model = keras.Model(inp, [L.Conv2D(4, (3, 2), name="conv", **kw)(inp),
                              L.DepthwiseConv2D((2, 3), name="dw", **kw)(inp)])
    qmodel = ptq(model, x, kq.QuantSpec(bits=4))
    stride = kw.get("strides", 1)
    stride = stride if isinstance(stride, tuple) else (stride, stride)
    dilation = (kw.get("dilation_rate", 1),) * 2
    p = numpy_patches(x.astype("float64"), (3, 2), stride, dilation, kw["padding"])
    np.testing.assert_allclose(layer_hessian(qmodel.get_layer("conv"), x, batch_size=4)[0],
                               2 * p.T @ p / len(p), rtol=1e-4, atol=1e-4)
    p = numpy_patches(x.astype("float64"), (2, 3), stride, dilation, kw["padding"]).reshape(-1, 6, 3)
    expected = np.stack([2 * p[:, :, c].T @ p[:, :, c] / len(p) for c in range(3)])
    np.testing.assert_allclose(layer_hessian(qmodel.get_layer("dw"), x), expected, rtol=1e-4, atol=1e-4)


def test_conv1d_causal_and_einsum_hessians():
    x = np.random.default_rng(1).normal(size=(5, 7, 4)).astype("float32")
    inp = keras.Input((7, 4))
    conv = L.Conv1D(3, 3, padding="causal", dilation_rate=2, name="conv")(inp)
    ein = L.EinsumDense("abc,cd->abd", output_shape=(None, 6), name="ein")(inp)
    model = keras.Model(inp, [conv, ein])
    qmodel = ptq(model, x, kq.QuantSpec(bits=4))
    padded = np.pad(x.astype("float64"), [(0, 0), (4, 0), (0, 0)])
    p = np.asarray([np.concatenate([padded[b, t + a * 2] for a in range(3)]) for b in range(5) for t in range(7)])
    np.testing.assert_allclose(layer_hessian(qmodel.get_layer("conv"), x)[0], 2 * p.T @ p / len(p),
                               rtol=1e-4, atol=1e-4)
    flat = x.reshape(-1, 4).astype("float64")
    np.testing.assert_allclose(layer_hessian(qmodel.get_layer("ein"), x)[0], 2 * flat.T @ flat / len(flat),
                               rtol=1e-4, atol=1e-4)


def test_conv_and_einsum_layers_beat_nearest_and_others_are_skipped():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(2).normal(size=(64, 8, 8, 3)).astype("float32")
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.Conv2DTranspose(4, 2, strides=2, name="up")(h)
    h = L.EinsumDense("abcd,de->abce", output_shape=(16, 16, 6), name="ein")(h)
    qmodel = ptq(keras.Model(inp, h), x, kq.QuantSpec(bits=3), kq.QuantSpec(bits=8))
    report = kq.ptq.gptq(qmodel, x, progress=False)
    assert [r.name for r in report.layers] == ["conv", "dw", "ein"]
    assert [name for name, _ in report.skipped] == ["up"] and "Conv2DTranspose" in report.skipped[0][1]
    assert all(r.error <= r.nearest_error for r in report.layers)
    text = str(report)
    assert "3 layers rounded, 1 skipped" in text and "gptq err" in text and "skipped up:" in text


def test_bad_arguments_raise():
    x = correlated(32, 8, seed=0)
    model = dense_model(8, 4, seed=0)
    qmodel = ptq(model, x, SPECS["per_channel"])
    for kwargs, field in [({"damp": -0.1}, "damp"), ({"damp": "big"}, "damp"), ({"block_size": 0}, "block_size"),
                          ({"act_order": "yes"}, "act_order"), ({"layers": ["nope"]}, "layers"),
                          ({"layers": "dense"}, "layers"), ({"batch_size": 0}, "batch_size"),
                          ({"max_samples": 0}, "max_samples")]:
        with pytest.raises(ConfigError, match=field):
            kq.ptq.gptq(qmodel, x, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="QuantizeWrapper"):
        kq.ptq.gptq(model, x, progress=False)
    with pytest.raises(NoDataError):
        kq.ptq.gptq(qmodel, x[:0], progress=False)
    with pytest.raises(UnsupportedLayerError):
        layer_hessian(ptq(keras.Sequential([keras.Input((4, 4, 2)), L.Conv2DTranspose(2, 2, name="t")]),
                          np.ones((2, 4, 4, 2), "float32"), SPECS["per_channel"]).get_layer("t"), x)
    report = kq.ptq.gptq(qmodel, x, layers=[], progress=False)
    assert report.layers == () and report.skipped == ()


# Export and a trained model -------------------------------------------------------------------------
@pytest.mark.tensorflow
def test_tflite_file_holds_the_integers_gptq_chose(tmp_path):
    from keras_quant.export.flatbuffer import FlatModel

    x = correlated(128, 24, seed=5)
    keras.utils.set_random_seed(5)
    inp = keras.Input((24,))
    h = L.Dense(16, activation="relu", name="d1")(inp)
    model = keras.Model(inp, L.Dense(6, name="d2")(h))
    qmodel = ptq(model, x, SPECS["per_channel"], kq.QuantSpec(bits=8))
    nearest = {n: grid_weight(qmodel.get_layer(n)).nearest() for n in ("d1", "d2")}
    report = kq.ptq.gptq(qmodel, x, progress=False)
    assert [r.name for r in report.layers] == ["d1", "d2"]
    path = tmp_path / "gptq.tflite"
    kq.export_tflite(qmodel, path, mode="int8")
    flat = FlatModel(path.read_bytes())
    kernels = [flat.array(op.inputs[1]) for op in flat.ops() if op.name == "FULLY_CONNECTED"]
    assert len(kernels) == 2
    for name, found in zip(("d1", "d2"), kernels):
        chosen = grid_weight(qmodel.get_layer(name)).nearest()
        assert np.any(chosen != nearest[name])
        np.testing.assert_array_equal(found, chosen.T)  # FULLY_CONNECTED stores (out, in)
    got = kq.runtime.load(path).predict(x)
    assert np.mean(np.abs(got - qmodel.predict(x, verbose=0))) < 0.02 * np.mean(np.abs(got)) + 1e-3


@pytest.mark.slow
def test_digits_w4a8_accuracy_after_gptq_at_least_nearest():
    from tests.test_quantize import cnn
    from keras_quant.cli import datasets

    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    model = cnn()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    x_calib = x_train[:256]
    qmodel = ptq(model, x_calib, kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel"),
                 kq.QuantSpec(bits=8))
    # Scored on every digit GPTQ did not see (the test set and the rest of the training set: 1.5k digits; the
    # 449 test digits alone are a noisy measure, one digit is 0.2%).
    x_eval, y_eval = np.concatenate([x_test, x_train[256:]]), np.concatenate([y_test, y_train[256:]])
    reference = model.predict(x_eval, verbose=0)
    before = qmodel.predict(x_eval, verbose=0)
    report = kq.ptq.gptq(qmodel, x_calib, progress=False)
    after = qmodel.predict(x_eval, verbose=0)
    assert {r.name for r in report.layers} >= {"conv1", "dw", "pw", "logits"}
    assert sum(r.error for r in report.layers) < 0.7 * sum(r.nearest_error for r in report.layers)
    assert np.mean((after - reference) ** 2) < np.mean((before - reference) ** 2)  # closer to the float logits
    nearest, accuracy = (np.mean(y.argmax(1) == y_eval) for y in (before, after))
    assert accuracy >= nearest, (accuracy, nearest)


def test_weight_only_attention_kernels_are_rounded_on_their_grids():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 10, 16)).astype("float32")
    inp = keras.Input((10, 16))
    h = L.MultiHeadAttention(2, 8, name="mha")(inp, inp, use_causal_mask=True)
    model = keras.Model(inp, L.Dense(16, name="ff")(L.Add()([inp, h])))
    spec = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    qmodel = ptq(model, x, spec)
    mha = qmodel.get_layer("mha")
    assert isinstance(mha, kq.layers.WeightOnlyMultiHeadAttention)
    reference = model.predict(x, verbose=0)
    before = qmodel.predict(x, verbose=0)
    report = kq.ptq.gptq(qmodel, x, progress=False)
    after = qmodel.predict(x, verbose=0)
    names = [r.name for r in report.layers]
    assert names == ["mha/query_dense", "mha/key_dense", "mha/value_dense", "mha/output_dense", "ff"]
    assert all(r.error <= r.nearest_error for r in report.layers)
    for name, (scale, zero_point) in mha.kernel_qparams.items():
        kernel = to_np(getattr(mha, name[1:]).kernel) / scale
        np.testing.assert_allclose(kernel, np.round(kernel), atol=1e-4)  # on the grid
        assert np.abs(kernel).max() <= mha.weight_spec.qmax
    assert np.mean((after - reference) ** 2) < np.mean((before - reference) ** 2)
