"""QAT models whose TFLite ops constrain their output ranges: same-scale average pools, fixed output grids.

- TFLite's AVERAGE_POOL_2D keeps its input's scale and zero point, and the
  converter refuses a QAT graph whose pool output range differs from its
  input's (DenseNet's transition blocks: 1x1 conv -> average pool ->
  concatenations). The QAT model gives the pool and its input one shared
  quantizer, so the two ranges stay equal while they train.
- TFLite's integer SOFTMAX / LOGISTIC / TANH write a fixed output grid
  (`kq.layers.rules.FIXED_GRIDS`): in QAT those quantizers start on it and
  stay there (not observed, not learned), also after a save / load.
- ConvNeXt's last stage at 1x1 spatial: the converter squeezes each
  LayerScale output with a RESHAPE (same scale in and out) before the
  residual ADD; with the LayerScale's degenerate range (about 1e-6, shared
  with the residual stream or on its own) the QAT model still exports.

The export tests convert with the real TFLite converter and run the file in
the LiteRT interpreter.
"""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.layers.rules import FIXED_GRIDS
from keras_quant.transform import plan_model

L = keras.layers
SOFTMAX, TANH = FIXED_GRIDS[("softmax", 8)], FIXED_GRIDS[("tanh", 8)]


def densenet_like(seed=0):
    """A DenseNet transition and dense block in miniature, with fixed-grid outputs.

    `pool_conv` (1x1, linear) -> `pool` (AveragePooling2D) feeds both a
    BN-ReLU-conv branch and the Concatenate after it, as DenseNet121's
    `pool2_conv` -> `pool2_pool` -> `conv3_block1_concat`; a second average
    pool follows the Concatenate, as DenseNet's next transition. A sigmoid gate (an `Activation` layer, SE
    style), a tanh Dense and a softmax Dense have TFLite's fixed grids.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    x = L.Conv2D(8, 1, use_bias=False, name="pool_conv")(x)
    x = L.AveragePooling2D(2, name="pool")(x)
    y = L.BatchNormalization(name="block_bn")(x)
    y = L.ReLU(name="block_relu")(y)
    y = L.Conv2D(4, 3, padding="same", use_bias=False, name="block_conv")(y)
    x = L.Concatenate(name="concat")([x, y])
    x = L.AveragePooling2D(2, name="pool2")(x)
    gate = L.GlobalAveragePooling2D(name="gap")(x)
    gate = L.Dense(12, name="gate_fc")(gate)
    gate = L.Activation("sigmoid", name="gate")(gate)
    x = L.Multiply(name="scaled")([L.GlobalAveragePooling2D(name="gap2")(x), gate])
    x = L.Dense(16, activation="tanh", name="fc")(x)
    return keras.Model(inp, L.Dense(10, activation="softmax", name="head")(x), name="densenet_like")


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    # Wide inputs: the calibrated (and observed) ranges of the tanh / softmax outputs are not their grids.
    return rng.normal(0.0, 3.0, size=(n, 16, 16, 3)).astype("float32"), rng.integers(0, 10, size=n)


def _qat(model, calibration=None, config=None, **kwargs):
    qat = kq.quantize_model(model, config, mode="qat", calibration=calibration, **kwargs)
    qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    return qat


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v), dtype="float64")


def _qparams(layer):
    qp = layer.output_qparams if isinstance(layer, kq.QuantizeWrapper) else layer.qparams
    return tuple(float(_np(v).reshape(-1)[0]) for v in qp)


def _after(qat, name):
    """The layer that takes layer `name`'s output in the QAT model (its quantizer)."""
    out = qat.get_layer(name).output
    found = [layer for layer in qat.layers for node in layer._inbound_nodes
             if any(t is out for t in node.input_tensors)]
    assert len(found) == 1, (name, found)
    return found[0]


def _fixed_layers(qat):
    return {"gate": _after(qat, "gate"), "fc": qat.get_layer("fc"), "head": qat.get_layer("head")}


def _assert_fixed(qat):
    grids = {"gate": SOFTMAX, "fc": TANH, "head": SOFTMAX}  # int8 logistic is softmax's grid
    for name, layer in _fixed_layers(qat).items():
        assert _qparams(layer) == pytest.approx(grids[name], abs=0.0), name


@pytest.mark.slow
def test_average_pools_share_their_input_quantizer_in_qat():
    qat = _qat(densenet_like())
    # By calibration key (a pool reads its input's): pool_conv, pool and block_conv share one quantizer (the
    # pool joins its input, the Concatenate its inputs); pool2 shares the Concatenate's output quantizer.
    assert qat.quantization_report.shared == (("pool_conv", "pool_conv", "block_conv"), ("concat", "concat"))
    assert _after(qat, "pool").slots == 3 and _after(qat, "pool2").slots == 2
    assert isinstance(qat.get_layer("pool_conv"), kq.QuantizeWrapper)
    assert qat.get_layer("pool_conv").output_quantizer is None  # its output goes through the shared quantizer
    # A pool keeps its input's quantizer even where no merge input is shared.
    unshared = _qat(densenet_like(), shared_merges=())
    assert unshared.quantization_report.shared == (("pool_conv", "pool_conv"), ("concat", "concat"))
    assert _after(unshared, "pool").slots == 2 and _after(unshared, "pool2").slots == 2
    assert unshared.get_layer("block_conv").output_quantizer is not None


def test_plan_records_the_range_an_average_pool_keeps():
    plan = plan_model(densenet_like())
    steps = {plan.flat.key(node.operation): plan.steps[id(node.operation)] for node in plan.flat.nodes}
    assert steps["pool"].same_as is steps["pool_conv"] and steps["pool"].quant_key == "pool_conv"
    assert steps["pool2"].same_as is steps["concat"] and steps["pool2"].quant_key == "concat"


@pytest.mark.slow
def test_fixed_output_grids_stay_frozen_in_qat_training():
    qat = _qat(densenet_like())  # no calibration: the fixed grids are set from the start
    _assert_fixed(qat)
    head = qat.get_layer("head")
    before = _np(head.preactivation_qparams[0])
    x, y = _data()
    qat.fit(x, y, epochs=2, batch_size=32, verbose=0)
    _assert_fixed(qat)
    assert _np(head.preactivation_qparams[0]) != before  # the range before the softmax follows the data
    assert _after(qat, "gate").mode == "frozen"
    assert _after(qat, "gate") not in kq.qat.quantizer_layers(qat)


@pytest.mark.slow
def test_fixed_output_grids_with_learnable_activations_survive_save_and_load(tmp_path):
    config = kq.QuantConfig(activations=kq.QuantSpec(bits=8, learnable=True))
    qat = _qat(densenet_like(), config=config)
    x, y = _data()
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    _assert_fixed(qat)
    trainable = [v.path for v in qat.trainable_weights]
    assert any(p.startswith("head/preactivation_") for p in trainable), trainable  # learned (LSQ) ...
    assert not any(p.startswith(("head/output_", "fc/output_", "gate_quant/")) for p in trainable)  # ... fixed
    kq.qat.set_mode(qat, "learn")
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    _assert_fixed(qat)
    path = tmp_path / "qat.keras"
    qat.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    _assert_fixed(loaded)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qat.predict(x, verbose=0), atol=1e-6)
    loaded.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    kq.qat.set_mode(loaded, "observe")
    loaded.fit(x, y, epochs=1, batch_size=32, verbose=0)
    _assert_fixed(loaded)


@pytest.mark.tensorflow  # kq.CalibrationCallback hooks TensorFlow's trainer; export converts with TFLite
@pytest.mark.slow
def test_calibrated_qat_model_with_average_pools_exports_to_integer_tflite(tmp_path):
    model = densenet_like()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    qat = _qat(model, calibration=cb.result)
    _assert_fixed(qat)
    qat.fit(x, y, epochs=2, batch_size=32, verbose=0)
    _assert_fixed(qat)
    assert _after(qat, "pool").slots == 3  # pool_conv, pool and block_conv: one quantizer
    path = tmp_path / "qat.tflite"
    report = kq.export_tflite(qat, path)
    assert report.ops.get("AVERAGE_POOL_2D") == 2 and not report.float_ops, report
    runner = kq.runtime.load(str(path))
    got, want = runner.predict(x), qat.predict(x, verbose=0)
    scale, zero_point = runner.output_quantization
    assert (float(scale), int(zero_point)) == SOFTMAX
    steps = np.abs(got - want).max(axis=1) / float(scale)
    assert np.percentile(steps, 99) <= 2.0 + 1e-6 and steps.max() <= 4.0 + 1e-6, steps.max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def convnext_like(seed=0):
    """ConvNeXt's last stage in miniature: a stride-4 conv to 1x1 spatial, then two blocks (depthwise conv,
    LayerNormalization, Dense-gelu-Dense, LayerScale at 1e-6, Activation("linear"), residual `+`).

    At 1x1 spatial the converter writes each residual ADD with the LayerScale output squeezed by a RESHAPE
    (a same-scale op), as in ConvNeXtTiny at 32x32; the LayerScale output's own range is about 1e-7.
    """
    from keras.src.applications.convnext import LayerScale

    keras.utils.set_random_seed(seed)
    c = 16
    inp = keras.Input((4, 4, 3), name="image")
    x = L.Conv2D(c, 4, strides=4, name="down")(inp)
    for b in range(2):
        h = L.Conv2D(c, 7, padding="same", groups=c, name=f"b{b}_dw")(x)
        h = L.LayerNormalization(epsilon=1e-6, name=f"b{b}_ln")(h)
        h = L.Dense(4 * c, name=f"b{b}_pw1")(h)
        h = L.Activation("gelu", name=f"b{b}_gelu")(h)
        h = L.Dense(c, name=f"b{b}_pw2")(h)
        h = LayerScale(1e-6, c, name=f"b{b}_layer_scale")(h)
        x = x + L.Activation("linear", name=f"b{b}_identity")(h)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    return keras.Model(inp, L.Dense(10, activation="softmax", name="head")(x), name="convnext_like")


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("shared_merges", [None, ()], ids=["shared", "unshared"])
def test_qat_layer_scale_blocks_export_at_one_pixel(shared_merges, tmp_path):
    model = convnext_like()
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, size=(64, 4, 4, 3)).astype("float32"), rng.integers(0, 10, size=64)
    cb = kq.CalibrationCallback()
    model.predict(x, batch_size=32, callbacks=[cb], verbose=0)
    stats = cb.result["b0_identity"]
    assert max(abs(stats.min), abs(stats.max)) < 1e-5  # the LayerScale output: a range of about 1e-6
    kwargs = {} if shared_merges is None else {"shared_merges": shared_merges}
    qat = kq.quantize_model(model, mode="qat", calibration=cb.result, **kwargs)
    # A step small enough that the LayerScale keeps its degenerate range through QAT, as at initialisation.
    qat.compile(keras.optimizers.Adam(1e-7), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=2, batch_size=32, verbose=0)
    shared = _after(qat, "b0_identity").slots
    assert shared == (2 if shared_merges is None else None)  # with the residual stream, or its own range
    path = tmp_path / "qat.tflite"
    report = kq.export_tflite(qat, path)
    assert "RESHAPE" in report.ops, report.ops  # the squeezed LayerScale outputs (same scale in and out)
    assert {op for op, _, _ in report.float_ops} <= {"MEAN", "SQUARED_DIFFERENCE", "ADD", "RSQRT", "MUL", "NEG"}
    assert all(set(layers) <= {"b0_ln", "b1_ln", "head_ln"} for _, _, layers in report.float_ops), report
    runner = kq.runtime.load(str(path))
    got, want = runner.predict(x), qat.predict(x, verbose=0)
    steps = np.abs(got - want).max(axis=1) / float(runner.output_quantization[0])
    assert np.percentile(steps, 99) <= 2.0 + 1e-6 and steps.max() <= 4.0 + 1e-6, steps.max()
