"""The frozen model's integer arithmetic (`kq.layers.integer`) against numpy references and LiteRT's file.

A post-training model computes its convolutions, Dense layers and two-input Adds as LiteRT's
int8 (XNNPACK) kernels do, so its outputs equal the exported file's bit for bit: before, float
accumulation and an unrounded bias made them differ by several output steps on deep residual nets.
"""

import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.errors import ConfigError
from keras_quant.layers import integer

L = keras.layers
tf_only = pytest.mark.tensorflow

scales = st.floats(min_value=1e-3, max_value=0.5, allow_nan=False, allow_infinity=False).map(np.float32)


# References ------------------------------------------------------------------------------
def xnnpack_add_reference(a, b, a_scale, b_scale, out_scale):
    """XNNPACK's int8 ADD (`xnn_init_qs8_add_minmax_scalar_params` and its scalar kernel), in Python integers."""
    a_ratio = np.float32(a_scale) / np.float32(out_scale)
    b_ratio = np.float32(b_scale) / np.float32(out_scale)
    bits = np.array([max(a_ratio, b_ratio)], np.float32).view(np.uint32)[0]
    shift = 20 - (int(bits >> 23) - 127)
    two_to_shift = np.array([(shift + 127) << 23], np.uint32).view(np.float32)[0]
    a_mult = int(np.rint(np.float32(two_to_shift * a_ratio)))
    b_mult = int(np.rint(np.float32(two_to_shift * b_ratio)))
    rounding = 1 << (shift - 1)
    return [(int(x) * a_mult + int(y) * b_mult + rounding) >> shift for x, y in zip(a, b)]


@settings(max_examples=60, deadline=None)
@given(a_scale=scales, b_scale=scales, out_scale=scales, seed=st.integers(0, 2**31 - 1))
def test_add_integers_is_xnnpacks_fixed_point_add(a_scale, b_scale, out_scale, seed):
    if max(a_scale, b_scale) / out_scale >= 256 or max(a_scale, b_scale) / out_scale < 2**-10:
        return  # outside the ratios XNNPACK accepts
    rng = np.random.default_rng(seed)
    a = rng.integers(-255, 256, 64)
    b = rng.integers(-255, 256, 64)
    params = integer.add_multipliers(a_scale, b_scale, out_scale)
    got = keras.ops.convert_to_numpy(integer.add_integers(a.astype("float32"), b.astype("float32"), *params))
    assert got.tolist() == xnnpack_add_reference(a, b, a_scale, b_scale, out_scale)
    # and it is the rounded sum, to within the 21-bit multipliers' precision
    exact = (a * np.float64(a_scale) + b * np.float64(b_scale)) / np.float64(out_scale)
    assert np.all(np.abs(got - exact) <= 0.5 + 1e-4 * (np.abs(exact) + 1))


@settings(max_examples=60, deadline=None)
@given(in_scale=scales, w_scale=scales, out_scale=scales, seed=st.integers(0, 2**31 - 1))
def test_requantize_and_bias_are_float32_as_the_kernel_computes_them(in_scale, w_scale, out_scale, seed):
    rng = np.random.default_rng(seed)
    acc = rng.integers(-2**20, 2**20, 256).astype("float32")
    multiplier = (np.float32(in_scale) * np.float32(w_scale)) / np.float32(out_scale)  # float32, in this order
    got = keras.ops.convert_to_numpy(integer.requantize(acc, keras.ops.convert_to_tensor(multiplier)))
    np.testing.assert_array_equal(got, np.round(acc * multiplier))  # ties to even, as the fp32 kernels round
    bias = rng.normal(0, 1, 16).astype("float32")
    got = keras.ops.convert_to_numpy(integer.bias_integers(bias, in_scale, np.full(16, w_scale, "float32")))
    np.testing.assert_array_equal(got, np.round(bias / (np.float32(in_scale) * np.float32(w_scale))))


@settings(max_examples=60, deadline=None)
@given(in_scale=scales, out_scale=scales, seed=st.integers(0, 2**31 - 1))
def test_convert_integers_is_xnnpacks_int8_requantize(in_scale, out_scale, seed):
    if not 2**-8 <= in_scale / out_scale < 2**7:
        return  # outside the ratios XNNPACK's int8 QUANTIZE accepts
    x = np.random.default_rng(seed).integers(-255, 256, 128)
    multiplier = int(np.rint(np.float32(256.0) * (np.float32(in_scale) / np.float32(out_scale))))
    got = keras.ops.convert_to_numpy(integer.convert(x.astype("float32") * in_scale, in_scale, out_scale))
    assert np.round(got / out_scale).tolist() == [(int(v) * multiplier + 128) >> 8 for v in x]


def average_pool_reference(q, pool, stride, padding):
    """TFLite's reference int8 AVERAGE_POOL_2D (NHWC), in Python integers."""
    n, h, w, c = q.shape
    if padding == "same":
        oh, ow = -(-h // stride), -(-w // stride)
        top = max((oh - 1) * stride + pool - h, 0) // 2
        left = max((ow - 1) * stride + pool - w, 0) // 2
    else:
        oh, ow, top, left = (h - pool) // stride + 1, (w - pool) // stride + 1, 0, 0
    out = np.zeros((n, oh, ow, c), "int64")
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * stride - top, j * stride - left
            window = q[:, max(r0, 0):min(r0 + pool, h), max(c0, 0):min(c0 + pool, w), :].astype("int64")
            acc, count = window.sum(axis=(1, 2)), window.shape[1] * window.shape[2]
            out[:, i, j, :] = np.where(acc > 0, (acc + count // 2) // count, -((-acc + count // 2) // count))
    return out


@pytest.mark.parametrize("pool, stride, padding", [(3, 1, "same"), (2, 2, "valid"), (3, 2, "same")])
def test_average_pool_integers_is_tflites_int8_average_pool(pool, stride, padding):
    q = np.random.default_rng(pool + stride).integers(-128, 128, (2, 7, 6, 3))
    got = integer.average_pool_integers(keras.ops.convert_to_tensor(q.astype("float32")), (pool, pool),
                                        (stride, stride), padding)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), average_pool_reference(q, pool, stride, padding))


@pytest.mark.parametrize("grid", [(0.05, 3), (0.2, -128), (0.01, 40)])
def test_logistic_table_is_tflites_int8_lookup_table(grid):
    # TFLite's PopulateLookupTable: float32, 1 / (1 + exp(-x)), times 1 / scale, std::round (half away).
    v = np.arange(-128, 128)
    x = np.float32(grid[0]) * (v - grid[1]).astype("float32")
    scaled = (np.float32(1) / (np.float32(1) + np.exp(-x))) * np.float32(256)
    want = np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) - 128, -128, 127)
    got = keras.ops.convert_to_numpy(integer.logistic_table(*grid))
    assert np.sum(got != want) <= 1 and np.max(np.abs(got - want)) <= 1  # exp may differ in the last bit


def hard_swish_reference(in_scale, in_zero_point, out_scale):
    """TFLite's int8 HARD_SWISH (`HardSwishPrepare` and `reference_ops::HardSwish`) in Python integers: the
    output integers less the output zero point for inputs -128..127, or None where TFLite refuses the scales."""
    def int16_multiplier(m):  # QuantizeMultiplier (double frexp) then DownScaleInt32ToInt16Multiplier
        q, exponent = math.frexp(float(m))
        q32 = int(round(q * (1 << 31)))
        if q32 == 1 << 31:
            q32, exponent = q32 // 2, exponent + 1
        return (32767 if q32 >= 2**31 - 1 - (1 << 15) else (q32 + (1 << 15)) >> 16), exponent

    def div(a, b):  # C: toward zero
        return -((-a) // b) if a < 0 else a // b

    def high_mul(a, b, rounding):  # gemmlowp SaturatingRoundingDoublingHighMul / TFLite SaturatingDoublingHighMul
        ab = a * b
        return div(ab + ((1 << 14) if ab >= 0 else 1 - (1 << 14)), 1 << 15) if rounding else div(ab, 1 << 15)

    def pot(x, e):  # RoundingDivideByPOT
        mask = (1 << e) - 1
        return (x >> e) + ((x & mask) > (mask >> 1) + (x < 0))

    hires = np.float32(np.float32(1.0 / 128.0) * np.float32(in_scale))
    out_m, out_e = int16_multiplier(np.float32(hires / np.float32(out_scale)))
    relu_m, relu_e = int16_multiplier(np.float32(hires / np.float32(3.0 / 32768.0)))
    if out_e > 0:
        return None
    out = []
    for q in range(-128, 128):
        x = (q - in_zero_point) * 128
        pre = high_mul(x, out_m, True)
        r = min(max(x * (1 << (relu_e - 1)), -32768), 32767) if relu_e > 0 else x
        r = high_mul(r, relu_m, True)
        if relu_e > 0:
            r = min(max(r * 2, -32768), 32767)
        elif relu_e < 0:
            r = pot(r, -relu_e)
        out.append(pot(high_mul((r + (1 << 15)) >> 1, pre, False), -out_e))
    return np.array(out)


@settings(max_examples=80, deadline=None)
@given(in_scale=st.floats(1e-3, 3.0).map(np.float32), zero_point=st.integers(-128, 127),
       ratio=st.floats(0.05, 2.0))
def test_hard_swish_table_is_tflites_fixed_point_kernel(in_scale, zero_point, ratio):
    out_scale = np.float32(in_scale * ratio)
    want = hard_swish_reference(in_scale, zero_point, out_scale)
    if want is None:
        return
    got = keras.ops.convert_to_numpy(integer.hard_swish_table(float(in_scale), zero_point, float(out_scale)))
    np.testing.assert_array_equal(got, want)


@tf_only
@pytest.mark.parametrize("low, high", [(-6.0, 9.0), (-3.0, 100.0), (-1.0, 1.0), (-0.3, 0.2), (-200.0, 300.0)])
def test_hard_swish_equals_litert_at_every_input(low, high, tmp_path):
    """Every int8 input through LiteRT's HARD_SWISH, standalone (an Activation layer) and fused (a Dense's own
    activation): the Keras model computes the same integers. Rounding the exact `x * relu6(x + 3) / 6`
    instead misses by a step at one or two of the 256 inputs of most of these grids."""
    inp = keras.Input((256,))
    x = L.Activation("hard_swish", name="hswish")(inp)
    fused = L.Dense(256, activation="hard_silu", name="dense_hswish", kernel_initializer="identity")(inp)
    model = keras.Model(inp, [x, fused])
    rng = np.random.default_rng(0)
    data = np.concatenate([np.linspace(low, high, 256)[None], rng.uniform(low, high, (31, 256))]).astype("float32")
    cb = kq.CalibrationCallback(statistics="range")
    model.predict(data, verbose=0, callbacks=[cb])
    qmodel = kq.quantize_model(model, calibration=cb.result)
    path = tmp_path / "hswish.tflite"
    kq.export_tflite(qmodel, path, input_type="int8", output_type="int8")
    from ai_edge_litert.interpreter import Interpreter

    in_scale, in_zp = Interpreter(model_path=str(path)).get_input_details()[0]["quantization"]
    runner = kq.runtime.load(str(path))
    every = ((np.arange(-128, 128) - in_zp) * in_scale).astype("float32")[None]  # each int8 input once
    want = qmodel.predict(every, verbose=0)
    got = runner.predict(every)
    for w, g in zip(want, got):
        step = float(np.min(np.diff(np.unique(w))))  # the output grid (dequantized in float32 on both sides)
        steps = np.abs(np.asarray(g).reshape(w.shape) - w) / step
        assert float(steps.max()) < 1e-3, np.flatnonzero(steps >= 1e-3)


def converter_reference(rmin, rmax, qmin, qmax):
    """TFLite's `fakeQuantAttrsToType` (tensorflow/compiler/mlir/quantization), as its C++ computes it in double."""
    rmin, rmax = np.float64(np.float32(rmin)), np.float64(np.float32(rmax))
    scale = (rmax - rmin) / (np.float64(qmax) - np.float64(qmin))
    from_min = np.float64(qmin) - rmin / scale
    if from_min < qmin:
        nudged = qmin
    elif from_min > qmax:
        nudged = qmax
    else:  # std::round: halves away from zero
        nudged = int(np.sign(from_min) * np.floor(np.abs(from_min) + 0.5))
    return np.float32(scale), nudged


@settings(max_examples=300, deadline=None)
@given(scale=st.floats(1e-6, 100.0).map(np.float32), data=st.data(), narrow=st.booleans(), bits=st.sampled_from([8, 16]))
def test_exported_range_gives_the_converter_the_scale_exactly(scale, data, narrow, bits):
    """The fake-quant range the export writes: the converter's recomputed float32 scale and nudged zero point
    are the quantizer's own, with ends a few units in the last place from the plain range."""
    from keras_quant.layers import inference

    spec = kq.QuantSpec(bits=bits, narrow_range=narrow)
    lo, hi = inference.storage_range(spec, bits)
    zero_point = data.draw(st.integers(lo, hi))
    rmin, rmax = inference.exported_range(scale, zero_point, spec, bits)
    assert converter_reference(rmin, rmax, lo, hi) == (scale, zero_point)
    assert inference.converter_qparams(rmin, rmax, lo, hi) == (scale, zero_point)
    assert rmin == np.float32(rmin) and rmax == np.float32(rmax) and rmin <= 0.0 <= rmax
    plain_min, plain_max = np.float32((lo - zero_point) * float(scale)), np.float32((hi - zero_point) * float(scale))
    for got, plain in ((rmin, plain_min), (rmax, plain_max)):
        assert abs(got - float(plain)) <= 4 * abs(float(np.spacing(plain))) + 1e-44


def test_bad_scales_are_config_errors():
    with pytest.raises(ConfigError, match="input_scales"):
        integer.IntegerAdd([0.1], 0.1, name="add")
    with pytest.raises(ConfigError, match="output_scale"):
        integer.IntegerAdd([0.1, 0.2], -1.0, name="add")
    with pytest.raises(ConfigError, match="input_scale"):
        kq.QuantizeWrapper(L.Dense(4), mode="frozen", input_scale=math.nan)
    with pytest.raises(ConfigError, match="frozen"):
        kq.QuantizeWrapper(L.Dense(4), mode="qat", input_scale=0.1)
    with pytest.raises(ConfigError, match="zero point"):
        integer.IntegerAveragePooling2D((0.1, 0.5), pool_size=2, name="pool")
    with pytest.raises(ConfigError, match="input_scales"):
        integer.IntegerConcatenate([], 0.1, name="concat")


# The model and its file ------------------------------------------------------------------
def _compiled(inp, out, name):
    model = keras.Model(inp, out, name=name)
    model.compile(keras.optimizers.Adam(0.003), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def residual_cnn():
    """Conv+BN+ReLU, depthwise+BN+ReLU6, 1x1 conv+BN, residual Add+ReLU, max pool, Dense: no MEAN or softmax."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    for i in range(3):
        y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw{i}")(x)
        y = L.BatchNormalization(momentum=0.9, name=f"bn_dw{i}")(y)
        y = L.ReLU(6.0, name=f"relu_dw{i}")(y)
        y = L.Conv2D(16, 1, name=f"pw{i}")(y)
        y = L.BatchNormalization(momentum=0.9, name=f"bn_pw{i}")(y)
        x = L.Add(name=f"add{i}")([x, y])
        x = L.ReLU(name=f"relu_add{i}")(x)
    x = L.MaxPooling2D(2, name="maxpool")(x)
    x = L.Conv2D(24, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return _compiled(inp, x, "residual_cnn")


def inception_block():
    """A stem, then 1x1 / 3x3-average-pool+1x1 / 3x3-max-pool branches concatenated (the max pool branch is on
    the stem's scale and is requantized to the concatenation's), average pool, Flatten, Dense."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 1), name="image")
    stem = L.Conv2D(12, 3, padding="same", activation="relu", name="stem")(inp)
    a = L.Conv2D(8, 1, activation="relu", name="branch_1x1")(stem)
    b = L.AveragePooling2D(3, strides=1, padding="same", name="branch_pool")(stem)
    b = L.Conv2D(8, 1, activation="relu", name="branch_pool_1x1")(b)
    c = L.MaxPooling2D(3, strides=1, padding="same", name="branch_max")(stem)
    x = L.Concatenate(name="mixed")([a, b, c])
    x = L.AveragePooling2D(2, name="reduce")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return _compiled(inp, x, "inception_block")


def squeeze_excite_block():
    """EfficientNet's pieces: Conv+BN+swish, squeeze-excite (global average pool, 1x1 conv with swish, 1x1 conv
    with sigmoid, Multiply), a residual Add, Flatten, Dense."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = L.Activation("swish", name="stem_swish")(x)
    se = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    se = L.Conv2D(4, 1, activation="swish", name="reduce")(se)
    se = L.Conv2D(16, 1, activation="sigmoid", name="expand")(se)
    y = L.Multiply(name="excite")([x, se])
    y = L.Conv2D(16, 1, name="project")(y)
    x = L.Add(name="add")([x, y])
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return _compiled(inp, x, "squeeze_excite")


def ops_graph():
    """Bare keras.ops nodes between int8 tensors: a constant added on the left (`pos + h`, as a positional
    embedding; the converter quantizes the constant on a grid of its own), `h + d` and `s * gate`."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 1), name="image")
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    pos = np.random.default_rng(4).normal(0.2, 0.3, (8, 8, 8)).astype("float32")
    h = keras.ops.add(pos, h)
    d = L.Conv2D(8, 1, name="pw")(h)
    s = h + d
    gate = L.Conv2D(8, 1, activation="sigmoid", name="gate")(s)
    x = L.Flatten(name="flatten")(s * gate)
    x = L.Dense(10, name="logits")(x)
    return _compiled(inp, x, "ops_graph")


def nasnet_reduction_cell():
    """NASNet's first reduction cell, small: a stem conv+BN read by one `Activation("relu")` per branch (TFLite
    merges the identical ReLUs and fuses the one left into the conv); a 1x1 conv+BN `h` read by a ReLU and a
    ZeroPadding2D; ReLU + ZeroPadding2D + strided valid SeparableConv2D + BN + ReLU (fused into the pointwise
    half) + SeparableConv2D; ZeroPadding2D + Cropping2D + strided 1x1 average pool; an average pool of the
    padded `h`; Adds, two ReLUs of an Add (fused into the ADD as one), and a Concatenate. (Not NASNet's max
    pool of the padded `h` added to a branch: in a model this small the converter leaves that ADD in float.)"""
    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    h = L.Activation("relu", name="relu_h")(x)
    h = L.Conv2D(8, 1, use_bias=False, name="conv_h")(h)
    h = L.BatchNormalization(momentum=0.9, name="conv_h_bn")(h)
    h3 = L.ZeroPadding2D(((1, 1), (1, 1)), name="pad_h")(h)
    a = L.Activation("relu", name="relu_a")(h)
    a = L.ZeroPadding2D(((1, 1), (1, 1)), name="pad_a")(a)
    a = L.SeparableConv2D(8, 3, strides=2, use_bias=False, name="sep_a")(a)
    a = L.BatchNormalization(momentum=0.9, name="sep_a_bn")(a)
    a = L.Activation("relu", name="sep_a_relu")(a)
    a = L.SeparableConv2D(8, 3, padding="same", use_bias=False, name="sep_a2")(a)
    a = L.BatchNormalization(momentum=0.9, name="sep_a2_bn")(a)
    b = L.Activation("relu", name="relu_b")(x)
    b = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad_b")(b)
    b = L.Cropping2D(((1, 0), (1, 0)), name="crop_b")(b)
    b = L.AveragePooling2D(1, strides=2, name="pool_b")(b)
    b = L.Conv2D(8, 1, use_bias=False, name="conv_b")(b)
    b = L.BatchNormalization(momentum=0.9, name="conv_b_bn")(b)
    c = L.Activation("relu", name="relu_c")(x)
    c = L.ZeroPadding2D(((1, 1), (1, 1)), name="pad_c")(c)
    c = L.SeparableConv2D(8, 3, strides=2, use_bias=False, name="sep_c")(c)
    c = L.BatchNormalization(momentum=0.9, name="sep_c_bn")(c)
    x1 = L.Add(name="add1")([a, b])
    x2 = L.Add(name="add2")([c, b])
    x3 = L.Add(name="add3")([L.AveragePooling2D(3, strides=2, name="avg_h")(h3), a])
    x4 = L.Add(name="add4")([x2, L.AveragePooling2D(3, strides=1, padding="same", name="avg_x1")(x1)])
    r1 = L.Activation("relu", name="relu_x4a")(x4)
    r2 = L.Activation("relu", name="relu_x4b")(x4)
    r1 = L.SeparableConv2D(8, 3, padding="same", use_bias=False, name="sep_x4")(r1)
    r2 = L.Conv2D(8, 1, name="conv_x4")(r2)
    x = L.Concatenate(name="concat")([x2, x3, r1, r2])
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return _compiled(inp, x, "nasnet_reduction_cell")


def _ptq(build):
    (x_train, y_train), (x_test, _) = datasets.load_digits()
    model = build()
    model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)
    cb = kq.CalibrationCallback()
    model.predict(x_train[:256], batch_size=64, callbacks=[cb], verbose=0)
    return model, kq.quantize_model(model, calibration=cb.result), x_test


@pytest.fixture(scope="module")
def ptq_se():
    return _ptq(squeeze_excite_block)


@pytest.fixture(scope="module")
def ptq_inception():
    return _ptq(inception_block)


@pytest.fixture(scope="module")
def ptq_ops():
    return _ptq(ops_graph)


@pytest.fixture(scope="module")
def ptq_nasnet():
    return _ptq(nasnet_reduction_cell)


@pytest.fixture(scope="module")
def ptq():
    return _ptq(residual_cnn)


@tf_only
def test_the_frozen_model_runs_the_integer_kernels(ptq):
    _, qmodel, _ = ptq
    wrappers = [layer for layer in qmodel.layers if isinstance(layer, kq.QuantizeWrapper)]
    assert wrappers and all(w._integer_op is not None for w in wrappers), [w.name for w in wrappers]
    assert all(w.input_scale > 0 for w in wrappers)
    assert sorted(layer.name for layer in qmodel.layers if isinstance(layer, integer.IntegerAdd)) == [
        "add0", "add1", "add2"]


@tf_only
@pytest.mark.parametrize("which", ["ptq", "ptq_inception", "ptq_se", "ptq_ops", "ptq_nasnet"])
def test_the_file_equals_the_keras_model_bit_for_bit(which, request, tmp_path):
    _, qmodel, x_test = request.getfixturevalue(which)
    path = tmp_path / "residual.tflite"
    kq.export_tflite(qmodel, path)
    runner = kq.runtime.load(str(path))
    scale = runner.output_quantization[0]
    got = np.asarray(runner.predict(x_test[:200]))
    want = qmodel.predict(x_test[:200], verbose=0)
    steps = np.abs(got - want) / scale
    assert float(steps.max()) < 1e-3, np.percentile(steps, [50, 99, 100])
    # Per layer too: the file's tensors are the Keras model's. (A layer followed by its own quantizer, X and
    # X_quant, writes its integers unclamped and the quantizer clamps them: its row is compared via X_quant.)
    errs = kq.analysis.layer_errors(qmodel, path, x_test[:100])
    names = {layer.name for layer in qmodel.layers}
    exact = [r for r in errs if f"{r.name}_quant" not in names]
    assert len(exact) > 5 and all(r.max_error_steps is None or r.max_error_steps < 1e-3 for r in exact), errs.table()


@tf_only
def test_integer_layers_survive_safe_mode_loading(ptq, tmp_path):
    _, qmodel, x_test = ptq
    path = tmp_path / "ptq.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x_test[:64], verbose=0), qmodel.predict(x_test[:64], verbose=0))
    assert loaded.get_layer("add1").input_scales == qmodel.get_layer("add1").input_scales
    assert loaded.get_layer("pw1").input_scale == qmodel.get_layer("pw1").input_scale


@tf_only
def test_pools_and_concatenations_run_the_integer_kernels(ptq_inception):
    _, qmodel, _ = ptq_inception
    kinds = {layer.name: type(layer).__name__ for layer in qmodel.layers}
    assert kinds["branch_pool"] == kinds["reduce"] == "IntegerAveragePooling2D"
    assert kinds["mixed"] == "IntegerConcatenate"
    # The max pool branch is on the stem's scale: its quantizer requantizes it (LiteRT's QUANTIZE) onto the
    # concatenation's, which the 1x1 branches write directly.
    stem_scale = float(qmodel.get_layer("stem").output_qparams[0])
    assert qmodel.get_layer("branch_max_quant").input_scale == pytest.approx(stem_scale)
    assert qmodel.get_layer("mixed").input_scales == [qmodel.get_layer("mixed").output_scale] * 3


@tf_only
def test_swish_sigmoid_and_squeeze_excite_run_the_integer_kernels(ptq_se):
    _, qmodel, _ = ptq_se
    kinds = {layer.name: type(layer).__name__ for layer in qmodel.layers}
    assert kinds["stem_swish"] == "IntegerActivation" and kinds["squeeze"] == "IntegerGlobalAveragePooling2D"
    assert kinds["excite"] == "IntegerMultiply" and kinds["add"] == "IntegerAdd"
    assert all(qmodel.get_layer(n)._integer_op is not None for n in ("reduce", "expand", "project"))


@tf_only
def test_keras_ops_adds_and_multiplies_run_the_integer_kernels(ptq_ops, tmp_path):
    model, qmodel, x_test = ptq_ops
    ops = [layer for layer in qmodel.layers if isinstance(layer, integer.IntegerBinaryOp)]
    assert sorted((layer.op, layer.constant_shape or (), layer.constant_first) for layer in ops) == [
        ("add", (), False), ("add", (8, 8, 8), True), ("multiply", (), False)]
    const = next(layer for layer in ops if layer.constant_shape is not None)
    # The constant's grid is the converter's: asymmetric 8-bit over its min / max, computed in double.
    pos = keras.ops.convert_to_numpy(const.constant)
    lo, hi = min(float(pos.min()), 0.0), max(float(pos.max()), 0.0)
    assert const.input_scales[0] == pytest.approx((hi - lo) / 255, rel=1e-6)  # the left operand
    path = tmp_path / "ops.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x_test[:64], verbose=0), qmodel.predict(x_test[:64], verbose=0))


@tf_only
def test_identical_relus_of_one_tensor_are_fused_as_one(ptq_nasnet):
    # TFLite's converter merges the ReLUs (and their identical quantizers) that read one tensor and fuses the
    # ReLU left into the conv / ADD: one rounding of the accumulator onto the ReLU's grid, not two.
    _, qmodel, _ = ptq_nasnet
    assert qmodel.get_layer("stem").output_quantizer is None
    keys = dict(qmodel.quantization_report.activation_quantizers)
    assert keys["relu_h_quant"] == keys["relu_b_quant"] == keys["relu_c_quant"] in ("relu_h", "relu_b", "relu_c")
    assert keys["relu_x4a_quant"] == keys["relu_x4b_quant"] in ("relu_x4a", "relu_x4b")
    assert qmodel.get_layer("stem").fused_output_scale == pytest.approx(float(qmodel.get_layer("relu_b_quant").scale))
    add4 = qmodel.get_layer("add4")
    assert isinstance(add4, integer.IntegerAdd)
    assert add4.output_scale == pytest.approx(float(qmodel.get_layer("relu_x4b_quant").scale))
    # The pointwise half of a separable conv with a fused ReLU runs the integer kernel too.
    assert qmodel.get_layer("sep_a").fused_output_scale is not None and qmodel.get_layer("sep_a")._integer_op


@pytest.mark.parametrize("shapes, constant_first", [(((None, 5, 4), (None, 5, 4)), False),
                                                    (((None, 5, 1), (None, 1, 4)), False),
                                                    (((None, 5, 4), (5, 4)), False),
                                                    (((None, 5, 4), (1, 4)), True)])
def test_binary_op_spec_is_the_float_ops_without_a_trace(shapes, constant_first, monkeypatch):
    """A symbolic call takes the float op's broadcast shape, as the traced call gives it, without tracing."""
    x_shape, other = shapes
    constant = other[0] is not None
    layer = integer.IntegerBinaryOp("add", [0.1, 0.2], 0.3, constant=np.ones(other, "float32") if constant else None,
                                    constant_first=constant_first)
    symbolic = [keras.KerasTensor(x_shape)] + ([] if constant else [keras.KerasTensor(other)])
    monkeypatch.setattr(layer, "_integer_call", lambda *a: pytest.fail("the integer form was traced"))
    spec = layer(*symbolic)
    monkeypatch.undo()
    concrete = [np.ones((2,) + s[1:], "float32") for s in [x_shape] + ([] if constant else [other])]
    assert spec.shape == (None,) + tuple(layer(*concrete).shape[1:])
