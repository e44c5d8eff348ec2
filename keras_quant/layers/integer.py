"""The integer arithmetic of TFLite's int8 kernels, written with `keras.ops`.

A post-training model that fake-quantizes in float (dequantized input times
dequantized weight, summed in float32, then rounded) disagrees with the
integer file on about 1 output in 5,000 per layer: float accumulation and an
unrounded bias put values that lie within 1e-4 of a rounding boundary on the
other side. Each such element changes its neighbours' inputs in the next
layer, so over 50 layers the disagreement grows to several output steps
(ResNet50: 6 steps at p99 at the softmax). The frozen `QuantizeWrapper` of a
convolution, depthwise convolution or Dense therefore computes what
LiteRT's XNNPACK kernels compute, bit for bit:

- the input's integers `x_q - zp` (recovered as `round(x / input_scale)`)
  and the weights' integers are multiplied and summed exactly (float32 holds
  every integer below 2**24; int8 accumulators of the zoo stay under 2**20);
- the bias is `round(bias / (input_scale * weight_scale))`, the value
  `bias_integers` also gives the exporter, so the file holds the same int32;
- the sum is requantized as XNNPACK's "fp32" requantization does it:
  `round_half_to_even(float32(acc) * (input_scale * weight_scale / output_scale))`
  with that multiplier computed in float32 in this order (the quantizer
  that follows clamps it).

`add_integers` is XNNPACK's int8 ADD: 20-bit fixed-point multipliers per
input, a rounding bias, an arithmetic right shift. `convert` is its
int8-to-int8 QUANTIZE (a requantization, e.g. of a Concatenate's input on
another scale): an 8-bit multiplier, `(x * round(256 * s_in / s_out) + 128) >> 8`.

Nothing here runs in QAT training: the straight-through estimator needs the
float form's gradients.
"""

import math

import keras
import numpy as np
from keras import ops

__all__ = [
    "accumulator_op", "bias_integers", "requantize", "add_integers", "add_multipliers", "check_scale", "convert",
    "convert_integers", "IntegerAdd", "IntegerAveragePooling2D", "IntegerConcatenate", "average_pool_integers",
    "logistic_table", "hard_swish_table", "multiply_integers", "multiply_multiplier", "IntegerActivation",
    "IntegerMultiply", "IntegerBinaryOp", "IntegerGlobalAveragePooling2D", "SIGMOID_GRID",
]

# TFLite's int8 LOGISTIC writes this grid whatever the calibration says: (scale, zero point).
SIGMOID_GRID = (1.0 / 256, -128)


def accumulator_op(layer):
    """`fn(x_int, kernel_int) -> accumulator` for a layer whose int8 TFLite kernel this module simulates, or None.

    Conv1D / Conv2D (with groups), DepthwiseConv1D / 2D and Dense; not the
    transposed or 3-D convolutions (other kernels), nor Dense layers that are
    LoRA-enabled or Keras-quantized.
    """
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv

    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None) is not None:
        return None
    if isinstance(layer, BaseConv) and type(layer).__name__ in ("Conv1D", "Conv2D"):
        return layer.convolution_op
    if isinstance(layer, BaseDepthwiseConv) and type(layer).__name__ in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return lambda x, kernel: ops.depthwise_conv(
            x, kernel, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
    if type(layer) is keras.layers.Dense:
        return ops.matmul
    return None


def output_channel_scales(layer, kernel_scales):
    """The weight scale of each output channel, from scales broadcast to the kernel's shape.

    Convolutions and Dense: the last kernel axis. Depthwise convolutions
    (`(..., in, multiplier)` kernels): channel `c * multiplier + m` of the output.
    """
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv

    rank = len(kernel_scales.shape)
    if isinstance(layer, BaseDepthwiseConv):
        return ops.reshape(kernel_scales[(0,) * (rank - 2)], (-1,))
    return kernel_scales[(0,) * (rank - 1)]


def bias_integers(bias, input_scale, weight_scale):
    """`round(bias / (input_scale * weight_scale))` in float32: the int32 bias of the integer op.

    The exporter writes this value and the frozen wrapper adds it, so both use
    this one function (float32 throughout, ties to even).
    """
    product = ops.multiply(ops.cast(input_scale, "float32"), ops.cast(weight_scale, "float32"))
    return ops.round(ops.divide(ops.cast(bias, "float32"), product))


def requantize(acc, multiplier):
    """XNNPACK's fp32 requantization, `round_half_to_even(float32(acc) * multiplier)`, in float32.

    Returns the output's integers less its zero point, not clamped: a
    quantizer on the same grid follows (after the fused activation, if any),
    and clamps as the kernel's output range does. The pre-activation tensor
    keeps its negative values for analysis.
    """
    return ops.round(ops.multiply(ops.cast(acc, "float32"), ops.cast(multiplier, "float32")))


def add_multipliers(a_scale, b_scale, out_scale):
    """`(a_multiplier, b_multiplier, shift)` of XNNPACK's int8 ADD for these float32 scales.

    The larger of `a_scale / out_scale` and `b_scale / out_scale` becomes a
    21-bit multiplier; both share one right shift (`xnn_init_qs8_add_minmax_*_params`).
    """
    a_ratio = np.float32(np.float32(a_scale) / np.float32(out_scale))
    b_ratio = np.float32(np.float32(b_scale) / np.float32(out_scale))
    exponent = math.frexp(float(max(a_ratio, b_ratio)))[1] - 1  # floor(log2), as the float's exponent bits
    shift = 20 - exponent
    factor = np.float32(2.0**shift)
    a_mult = int(np.rint(np.float32(factor * a_ratio)))
    b_mult = int(np.rint(np.float32(factor * b_ratio)))
    return a_mult, b_mult, shift


def add_integers(a_int, b_int, a_mult, b_mult, shift):
    """XNNPACK's int8 ADD on the inputs' integers less their zero points (float tensors holding integers).

    `(a * a_mult + b * b_mult + 2**(shift - 1)) >> shift`: the output's
    integers less its zero point (float32), not clamped (see `requantize`).
    """
    a = ops.cast(a_int, "int32")
    b = ops.cast(b_int, "int32")
    acc = a * a_mult + b * b_mult + (1 << (shift - 1))
    return ops.cast(ops.floor_divide(acc, 1 << shift), "float32")  # an arithmetic right shift


def convert_integers(x_int, multiplier):
    """XNNPACK's int8-to-int8 QUANTIZE on integers less the zero point: `(x * multiplier + 128) >> 8` (float32)."""
    acc = ops.cast(x_int, "int32") * multiplier + 128
    return ops.cast(ops.floor_divide(acc, 256), "float32")


def convert(x, in_scale, out_scale):
    """Values on the grid of step `in_scale` moved to the grid of step `out_scale` as the int8 QUANTIZE op does.

    The multiplier is `round(256 * float32(in_scale / out_scale))`; the result
    is dequantized and not clamped (the quantizer it feeds clamps). The scales
    may be numbers or tensors (a frozen quantizer's variable).
    """
    in_scale = ops.convert_to_tensor(in_scale, "float32")
    out_scale = ops.cast(out_scale, "float32")
    x_int = ops.round(ops.divide(ops.cast(x, "float32"), in_scale))
    multiplier = ops.cast(ops.round(256.0 * ops.divide(in_scale, out_scale)), "int32")
    return ops.cast(ops.multiply(convert_integers(x_int, multiplier), out_scale), x.dtype)


def average_pool_integers(q, pool_size, strides, padding):
    """TFLite's int8 AVERAGE_POOL_2D on raw int8 values `q` (NHWC, float tensors holding integers).

    The window's integer sum over the valid (unpadded) positions, divided by
    their count rounding half away from zero: `(acc + n/2) / n` for a
    positive sum, `(acc - n/2) / n` otherwise, with C's truncating division.
    """
    channels = q.shape[-1]
    kernel = ops.ones(tuple(pool_size) + (channels, 1), "float32")
    acc = ops.depthwise_conv(q, kernel, strides=strides, padding=padding)
    ones = ops.ones((1,) + tuple(q.shape[1:3]) + (1,), "float32")
    count = ops.conv(ones, ops.ones(tuple(pool_size) + (1, 1), "float32"), strides=strides, padding=padding)
    acc, count = ops.cast(ops.round(acc), "int32"), ops.cast(ops.round(count), "int32")
    half = ops.floor_divide(count, 2)
    positive = ops.floor_divide(acc + half, count)
    negative = -ops.floor_divide(half - acc, count)
    return ops.cast(ops.where(acc > 0, positive, negative), "float32")


def logistic_table(in_scale, in_zero_point, out_scale=1.0 / 256, out_zero_point=-128):
    """TFLite's int8 LOGISTIC lookup table (256 float32 entries holding int8 values; index `q + 128`).

    As its kernel builds it in float32: `x = in_scale * (q - zp)`,
    `round_half_away(1 / (1 + exp(-x)) * (1 / out_scale)) + out_zp`, clamped.
    The scales may be tensors (the frozen wrapper's variables).
    """
    v = ops.arange(-128, 128, dtype="float32")
    x = ops.multiply(ops.cast(in_scale, "float32"), v - ops.cast(in_zero_point, "float32"))
    sig = ops.divide(1.0, ops.add(1.0, ops.exp(ops.negative(x))))
    scaled = ops.multiply(sig, ops.divide(1.0, ops.cast(out_scale, "float32")))
    q = ops.multiply(ops.sign(scaled), ops.floor(ops.abs(scaled) + 0.5))  # std::round: half away from zero
    return ops.clip(q + ops.cast(out_zero_point, "float32"), -128.0, 127.0)


def lookup(table, x_int, zero_point):
    """`table[q + 128]` for the raw int8 values `q = x_int + zero_point`."""
    index = ops.cast(ops.add(x_int, ops.cast(zero_point, "float32")), "int32") + 128
    return ops.take(table, ops.clip(index, 0, 255))


def _trunc_divide(x, divisor):
    """C's integer division (toward zero) of int32 `x` by a positive int32."""
    return ops.where(x >= 0, ops.floor_divide(x, divisor), ops.negative(ops.floor_divide(ops.negative(x), divisor)))


def _rounding_high_mul(a, b):
    """gemmlowp's int16 `SaturatingRoundingDoublingHighMul` (`b` is never -32768 here)."""
    ab = ops.multiply(a, b)
    return _trunc_divide(ab + ops.where(ab >= 0, 16384, -16383), 32768)


def _rounding_shift_right(x, exponent):
    """gemmlowp's `RoundingDivideByPOT`: `x / 2**exponent` rounded to nearest, ties away from zero."""
    divisor = ops.cast(ops.power(2, exponent), "int32")
    floor = ops.floor_divide(x, divisor)
    remainder = x - floor * divisor  # `x & mask` of a two's complement integer
    threshold = ops.floor_divide(divisor - 1, 2) + ops.cast(x < 0, "int32")
    return floor + ops.cast(remainder > threshold, "int32")


def _int16_multiplier(multiplier):
    """TFLite's `QuantizeMultiplier` then `DownScaleInt32ToInt16Multiplier` of a positive float32: `(m16, exponent)`
    with `multiplier ~ m16 / 2**15 * 2**exponent`. A float32's 24-bit mantissa makes the int32 multiplier
    `mantissa << 7` exactly, so the int16 one is `(mantissa + 256) >> 9`, saturated."""
    m = ops.cast(multiplier, "float32")
    exponent = ops.cast(ops.floor(ops.log2(m)), "int32") + 1
    exponent = exponent + ops.cast(m * ops.power(2.0, ops.cast(-exponent, "float32")) >= 1.0, "int32")
    exponent = exponent - ops.cast(m * ops.power(2.0, ops.cast(-exponent, "float32")) < 0.5, "int32")
    mantissa = ops.cast(ops.round(m * ops.power(2.0, ops.cast(24 - exponent, "float32"))), "int32")
    return ops.minimum(ops.floor_divide(mantissa + 256, 512), 32767), exponent


def hard_swish_table(in_scale, in_zero_point, out_scale):
    """TFLite's int8 HARD_SWISH kernel for every input value: 256 float32 entries (index `q + 128`) holding
    the output's integers less its zero point, unclamped (the quantizer that follows clamps them).

    The kernel works in 16-bit fixed point (`reference_ops::HardSwish`, which XNNPACK's path matches):
    the input on a 2**7 finer scale, a "relu-ish" factor `relu6(x + 3) / 6` from a rounding
    fixed-point multiply and shifts, a truncating multiply of the two, a rounding shift to the output
    scale. It differs from rounding the exact `x * relu6(x + 3) / 6` by one step at a few inputs,
    which on a trained MobileNetV3 compounded to tens of steps at the output. The scales may be
    tensors (the frozen wrapper's variables).
    """
    hires = ops.multiply(ops.cast(in_scale, "float32"), 1.0 / 128.0)
    out_m16, out_exp = _int16_multiplier(ops.divide(hires, ops.cast(out_scale, "float32")))
    relu_m16, relu_exp = _int16_multiplier(ops.divide(hires, np.float32(3.0 / 32768.0)))
    x = ops.arange(-128, 128, dtype="int32") - ops.cast(ops.round(ops.cast(in_zero_point, "float32")), "int32")
    hires_x = x * 128
    preshift_out = _rounding_high_mul(hires_x, out_m16)
    relu = ops.where(relu_exp > 0, ops.clip(hires_x * ops.cast(ops.power(2, ops.maximum(relu_exp - 1, 0)), "int32"),
                                            -32768, 32767), hires_x)
    relu = _rounding_high_mul(relu, relu_m16)
    relu = ops.where(relu_exp > 0, ops.clip(relu * 2, -32768, 32767), relu)
    relu = _rounding_shift_right(relu, ops.maximum(-relu_exp, 0))
    relu = ops.floor_divide(relu + 32768, 2)  # [-1, 1] in Q15 -> [0, 1]
    out = _trunc_divide(relu * preshift_out, 32768)  # SaturatingDoublingHighMul: truncating
    return ops.cast(_rounding_shift_right(out, ops.maximum(-out_exp, 0)), "float32")


def multiply_integers(a_int, b_int, multiplier):
    """XNNPACK's int8 MUL: `round_half_to_even(float32(a * b) * multiplier)` on integers less their zero points."""
    # The product in int32, then float32: grappler reassociates a float `(a * b) * constant` into
    # `a * (b * constant)`, which rounds differently.
    product = ops.cast(ops.multiply(ops.cast(a_int, "int32"), ops.cast(b_int, "int32")), "float32")
    return ops.round(ops.multiply(product, ops.cast(multiplier, "float32")))


def check_scale(scale, field, name):
    """A positive finite scale as the float32 value it is stored as (ConfigError names the field)."""
    from keras_quant.errors import ConfigError

    ok = not isinstance(scale, bool) and isinstance(scale, (int, float, np.floating))
    if not ok or not math.isfinite(scale) or scale <= 0:
        raise ConfigError(field, scale, f"{field} must be a positive finite number", layer=name)
    return float(np.float32(scale))


class _TwoInputMerge:
    """What the two-input integer merges share: their scales, the integer call and the config.

    A subclass sets `_combine(a_int, b_int)`: the output's integers less its
    zero point from the inputs' integers less theirs.
    """

    def _set_scales(self, input_scales, output_scale):
        from keras_quant.errors import ConfigError

        if not isinstance(input_scales, (list, tuple)) or len(input_scales) != 2:
            raise ConfigError("input_scales", input_scales, "expected the scales of the two inputs", layer=self.name)
        self.input_scales = [check_scale(s, "input_scales", self.name) for s in input_scales]
        self.output_scale = check_scale(output_scale, "output_scale", self.name)

    def call(self, inputs, training=None):
        if _float_form(training) or len(inputs) != 2:
            return super().call(inputs)
        return self._integer_call(*inputs, dtype=inputs[0].dtype)

    def _integer_call(self, x1, x2, dtype):
        """The two inputs (on their grids; a constant too) combined as the int8 kernel does, unclamped."""
        a, b = (ops.round(ops.divide(ops.cast(x, "float32"), s)) for x, s in zip((x1, x2), self.input_scales))
        return ops.cast(ops.multiply(self._combine(a, b), self.output_scale), dtype)

    def get_config(self):
        config = super().get_config()
        config.update(input_scales=list(self.input_scales), output_scale=self.output_scale)
        return config


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerAdd(_TwoInputMerge, keras.layers.Add):
    """A frozen model's two-input `Add` computed as LiteRT's int8 ADD computes it (`add_integers`).

    `kq.quantize_model` puts it where a post-training model adds two int8
    tensors; it keeps the original layer's name. Its inputs lie on grids of
    step `input_scales`; the sum is written on the grid of step `output_scale`
    (the quantizer after it, or after the activation TFLite fuses into the
    ADD), which clamps it. In training, in the export trace and for other
    inputs it is a plain `Add`.
    """

    def __init__(self, input_scales, output_scale, **kwargs):
        super().__init__(**kwargs)
        self._set_scales(input_scales, output_scale)
        self._params = add_multipliers(*self.input_scales, self.output_scale)

    def _combine(self, a, b):
        return add_integers(a, b, *self._params)


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerConcatenate(keras.layers.Concatenate):
    """A frozen model's `Concatenate` whose inputs are requantized as LiteRT's int8 QUANTIZE does it.

    TFLite's int8 CONCATENATION needs one scale; the converter puts a QUANTIZE
    op (int8 to int8, `convert`) before each input on another scale.
    `kq.quantize_model` puts this layer where a post-training model concatenates
    int8 tensors of steps `input_scales` onto the grid of step `output_scale`
    (the quantizer after it, which clamps). In training, in the export trace
    and for other inputs it is a plain `Concatenate`.
    """

    def __init__(self, input_scales, output_scale, **kwargs):
        super().__init__(**kwargs)
        from keras_quant.errors import ConfigError

        if not isinstance(input_scales, (list, tuple)) or len(input_scales) < 1:
            raise ConfigError("input_scales", input_scales, "expected one scale per input", layer=self.name)
        self.input_scales = [check_scale(s, "input_scales", self.name) for s in input_scales]
        self.output_scale = check_scale(output_scale, "output_scale", self.name)

    def call(self, inputs, training=None):
        if _float_form(training) or len(inputs) != len(self.input_scales):
            return super().call(inputs)
        return super().call([x if scale == self.output_scale else convert(x, scale, self.output_scale)
                             for x, scale in zip(inputs, self.input_scales)])

    def get_config(self):
        config = super().get_config()
        config.update(input_scales=list(self.input_scales), output_scale=self.output_scale)
        return config


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerAveragePooling2D(keras.layers.AveragePooling2D):
    """A frozen model's `AveragePooling2D` computed as TFLite's int8 AVERAGE_POOL_2D (`average_pool_integers`).

    TFLite's integer average pool keeps its input's scale and zero point:
    `grid` is that `(scale, zero_point)`. `kq.quantize_model` puts it where a
    post-training model pools an int8 tensor (channels last, static spatial
    size). In training, in the export trace and elsewhere it is a plain
    `AveragePooling2D`.
    """

    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = check_grid(grid, "grid", self.name)

    def call(self, inputs, training=None):
        static = len(inputs.shape) == 4 and all(d is not None for d in inputs.shape[1:])
        if _float_form(training) or self.data_format != "channels_last" or not static:
            return super().call(inputs)
        scale, zero_point = self.grid
        q = ops.add(ops.round(ops.divide(ops.cast(inputs, "float32"), scale)), float(zero_point))
        out = average_pool_integers(q, self.pool_size, self.strides, self.padding)
        return ops.cast(ops.multiply(out - float(zero_point), scale), inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config["grid"] = list(self.grid)
        return config


def check_grid(grid, field, name):
    """`(scale, zero_point)` checked: a positive finite scale stored as float32, an integer zero point."""
    from keras_quant.errors import ConfigError

    if not isinstance(grid, (list, tuple)) or len(grid) != 2:
        raise ConfigError(field, grid, "expected (scale, zero_point)", layer=name)
    zero_point = grid[1]
    if isinstance(zero_point, bool) or not isinstance(zero_point, (int, float, np.number)) \
            or not float(zero_point).is_integer():
        raise ConfigError(field, grid, "the zero point must be an integer", layer=name)
    return check_scale(grid[0], field, name), int(zero_point)


def _float_form(training):
    """Whether an integer layer runs its plain Keras computation (training, the export trace)."""
    from keras_quant.layers import inference

    return bool(training) or inference.active_plan() is not None


def activation_integers(kind, x_int, in_grid, out_scale):
    """The int8 kernels of `kind` (`"sigmoid"`: LOGISTIC; `"silu"`: LOGISTIC then MUL, as the converter writes
    swish; `"hard_silu"`: HARD_SWISH) on the input's integers less its zero point; returns the output's
    integers less its zero point."""
    in_scale, in_zero_point = in_grid
    if kind == "hard_silu":
        return lookup(hard_swish_table(in_scale, in_zero_point, out_scale), x_int, in_zero_point)
    table = logistic_table(in_scale, in_zero_point)
    sig = lookup(table, x_int, in_zero_point) - SIGMOID_GRID[1]  # on the fixed grid, less its zero point
    if kind == "sigmoid":
        return sig
    multiplier = ops.divide(ops.multiply(ops.cast(in_scale, "float32"), SIGMOID_GRID[0]), ops.cast(out_scale, "float32"))
    return multiply_integers(x_int, sig, multiplier)


# Activations `activation_integers` computes, by the Keras function's name.
INTEGER_ACTIVATIONS = ("sigmoid", "silu", "hard_silu")


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerActivation(keras.layers.Activation):
    """A frozen model's sigmoid, swish or hard swish computed as LiteRT's int8 LOGISTIC (and MUL) or
    HARD_SWISH do it.

    The input lies on `input_grid` (`(scale, zero_point)`), the output is
    written on the grid of step `output_scale` (sigmoid: TFLite's fixed
    1/256 grid). In training and in the export trace it is a plain `Activation`.
    """

    def __init__(self, activation, input_grid, output_scale, **kwargs):
        super().__init__(activation, **kwargs)
        from keras_quant.errors import ConfigError

        self.kind = getattr(self.activation, "__name__", None)
        if self.kind not in INTEGER_ACTIVATIONS:
            raise ConfigError("activation", self.kind, f"integer activations are {INTEGER_ACTIVATIONS}",
                              layer=self.name)
        self.input_grid = check_grid(input_grid, "input_grid", self.name)
        self.output_scale = check_scale(output_scale, "output_scale", self.name)

    def call(self, inputs, training=None):
        if _float_form(training):
            return super().call(inputs)
        x_int = ops.round(ops.divide(ops.cast(inputs, "float32"), self.input_grid[0]))
        q = activation_integers(self.kind, x_int, self.input_grid, self.output_scale)
        return ops.cast(ops.multiply(q, self.output_scale), inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(input_grid=list(self.input_grid), output_scale=self.output_scale)
        return config


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerMultiply(_TwoInputMerge, keras.layers.Multiply):
    """A frozen model's two-input `Multiply` computed as XNNPACK's int8 MUL (`multiply_integers`)."""

    def __init__(self, input_scales, output_scale, **kwargs):
        super().__init__(**kwargs)
        self._set_scales(input_scales, output_scale)
        self._multiplier = multiply_multiplier(*self.input_scales, self.output_scale)

    def _combine(self, a, b):
        return multiply_integers(a, b, self._multiplier)


def multiply_multiplier(scale_a, scale_b, output_scale):
    """XNNPACK's fp32 MUL multiplier: `float32(float32(scale_a * scale_b) / output_scale)`."""
    a, b = np.float32(scale_a), np.float32(scale_b)
    return float(np.float32(np.float32(a * b) / np.float32(output_scale)))


# The keras.ops nodes `IntegerBinaryOp` computes: name -> (float op, whether it adds).
_BINARY_OPS = {"add": (ops.add, True), "multiply": (ops.multiply, False)}


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerBinaryOp(_TwoInputMerge, keras.layers.Layer):
    """A frozen model's `keras.ops.add` / `keras.ops.multiply` node (`x + y`, `h + pos`) as LiteRT's int8 ADD / MUL.

    The graph's bare `x + y` between int8 tensors, called like the op,
    `layer(x1, x2)`; or with a constant operand (a positional embedding
    `h + pos`), which the layer holds as its non-trainable weight `constant`
    (`constant_shape`, on the left when `constant_first`) and is called
    `layer(x)`. The converter quantizes a constant operand on a grid of its
    own (asymmetric 8-bit over its min / max and 0), whose scale
    `kq.quantize_model` passes in `input_scales`. The output is on the grid of
    step `output_scale` (the quantizer after it clamps). In training and in
    the export trace it is the plain op. The constant is a variable so that
    its integers are divided out at run time, as the converter does, rather
    than constant-folded (grappler folds a division by a constant into a
    multiplication by its reciprocal, which rounds differently).

    Args:
        op: `"add"` or `"multiply"`.
        input_scales: The two operands' scales (in call order, the constant's included).
        output_scale: The output grid's step.
        constant_shape: The constant operand's shape, or None (two tensor operands).
        constant_first: Whether the constant is the left operand.
        constant: The constant's value, the weight's initial value (a saved model restores it from its
            weights; the config keeps only its shape).
    """

    def __init__(self, op, input_scales, output_scale, constant_shape=None, constant_first=False, constant=None,
                 **kwargs):
        super().__init__(**kwargs)
        from keras_quant.errors import ConfigError

        if op not in _BINARY_OPS:
            raise ConfigError("op", op, f"op must be one of {tuple(_BINARY_OPS)}", layer=self.name)
        self.op = op
        self._set_scales(input_scales, output_scale)
        self._initial = None if constant is None else np.asarray(keras.ops.convert_to_numpy(constant), "float32")
        if self._initial is not None:
            constant_shape = self._initial.shape
        self.constant_shape = None if constant_shape is None else tuple(int(d) for d in constant_shape)
        self.constant_first = bool(constant_first)
        self.constant = None
        if _BINARY_OPS[op][1]:
            self._params = add_multipliers(*self.input_scales, self.output_scale)
        else:
            self._multiplier = multiply_multiplier(*self.input_scales, self.output_scale)

    def build(self, *shapes):
        if self.constant_shape is not None:
            initializer = "zeros" if self._initial is None else keras.initializers.Constant(self._initial)
            self.constant = self.add_weight(name="constant", shape=self.constant_shape, initializer=initializer,
                                            trainable=False, autocast=False)
        self.built = True

    def _combine(self, a, b):
        if _BINARY_OPS[self.op][1]:
            return add_integers(a, b, *self._params)
        return multiply_integers(a, b, self._multiplier)

    def call(self, x1, x2=None, training=None):
        dtype = x1.dtype
        if self.constant is not None:
            x1, x2 = (ops.cast(self.constant, dtype), x1) if self.constant_first else (x1, ops.cast(self.constant, dtype))
        if _float_form(training):
            return _BINARY_OPS[self.op][0](x1, x2)
        return self._integer_call(x1, x2, dtype)

    def compute_output_spec(self, x1, x2=None, training=None):
        # The float op's spec, which Keras derives from the operands' shapes: a symbolic call (the model
        # `quantize_model` builds) does not trace the integer form in a scratch graph to find it.
        if self.constant_shape is not None:
            constant = keras.KerasTensor(self.constant_shape, dtype=x1.dtype)
            x1, x2 = (constant, x1) if self.constant_first else (x1, constant)
        return _BINARY_OPS[self.op][0](x1, x2)

    def get_config(self):
        config = super().get_config()
        config.update(op=self.op, constant_shape=None if self.constant_shape is None else list(self.constant_shape),
                      constant_first=self.constant_first)
        return config


@keras.saving.register_keras_serializable(package="keras_quant")
class IntegerGlobalAveragePooling2D(keras.layers.GlobalAveragePooling2D):
    """A frozen model's global average pool computed as LiteRT's int8 MEAN over the spatial axes.

    `round_half_to_even(float32(sum) * (float32(in_scale / out_scale) / n))`
    on the input's integers less its zero point (channels last, static size).
    """

    def __init__(self, input_scale, output_scale, **kwargs):
        super().__init__(**kwargs)
        self.input_scale = check_scale(input_scale, "input_scale", self.name)
        self.output_scale = check_scale(output_scale, "output_scale", self.name)

    def call(self, inputs, training=None):
        static = len(inputs.shape) == 4 and all(d is not None for d in inputs.shape[1:])
        if _float_form(training) or self.data_format != "channels_last" or not static:
            return super().call(inputs)
        n = int(inputs.shape[1]) * int(inputs.shape[2])
        multiplier = float(np.float32(np.float32(np.float32(self.input_scale) / np.float32(self.output_scale))
                                      / np.float32(n)))
        x_int = ops.round(ops.divide(ops.cast(inputs, "float32"), self.input_scale))
        total = ops.sum(x_int, axis=(1, 2), keepdims=self.keepdims)
        q = ops.round(ops.multiply(total, multiplier))
        return ops.cast(ops.multiply(q, self.output_scale), inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(input_scale=self.input_scale, output_scale=self.output_scale)
        return config
