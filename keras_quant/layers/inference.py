"""The inference form of a quantized model, as export traces it.

Inside `inference_scope(plan)`, `QuantizeWrapper` and `ActivationQuantizer`
stop computing their quantization from variables and schedules and emit the
graph an integer runtime executes:

- a wrapper runs its layer with constant weights that already lie on the
  quantization grid (the folded kernel fake-quantized with the weight
  quantizer's scales, the folded bias in float), so a converter reads the
  values and recovers the integers exactly;
- every activation quantizer becomes one
  `tf.quantization.fake_quant_with_min_max_args` with the quantizer's own
  range as constants (the op the TFLite converter turns into a quantized
  tensor). A grid narrower than the storage type (4-bit activations in an
  int8 file) is stored on the wide grid, clipped to its range by integer
  MINIMUM / MAXIMUM ops, and stored again with the same scale and zero
  point, so the file holds values on the narrow grid.

The plan (`InferencePlan`) is computed eagerly before tracing: constants,
per-tensor ranges, and the storage width (8 or 16 bits), or `None` to drop
activation quantizers (dynamic-range and float exports).

Only the TensorFlow backend traces this form.
"""

import contextlib
import dataclasses
import itertools
import math
import threading
from typing import Dict, Optional, Tuple

import keras
import numpy as np
from keras import ops

__all__ = ["InferencePlan", "inference_scope", "active_plan", "activation_op", "weight_op", "quantize_output", "PREACTIVATION",
           "flattens", "flat_dense", "inference_weights", "concrete_values"]

_LOCAL = threading.local()


@dataclasses.dataclass
class InferencePlan:
    """What the traced inference graph uses.

    Attributes:
        weights: `id(wrapper) -> {weight_name: float32 array}`: the values the
            wrapped layer runs with (grid values, or float values when
            `quantize_weights` is False), the folded bias under `"bias"`.
        folded_bias: `id(wrapper) -> float32 array`: bias added after a
            layer with a folded BatchNormalization (its own bias set to 0).
        activations: `id(layer) -> (spec, scale, zero_point)` of each
            activation quantizer (a wrapper's output quantizer or an
            `ActivationQuantizer`), per tensor, as Python numbers; a wrapper's
            quantizer before its own activation under `(id(layer), PREACTIVATION)`.
        storage_bits: Width of the activation integers (8 or 16), or None to
            leave activations in float.
    """

    weights: Dict[int, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    folded_bias: Dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    activations: Dict[object, Tuple[object, float, int]] = dataclasses.field(default_factory=dict)
    storage_bits: Optional[int] = 8


@contextlib.contextmanager
def inference_scope(plan):
    """Within the block, quantized layers trace their inference form from `plan`."""
    previous = getattr(_LOCAL, "plan", None)
    _LOCAL.plan = plan
    try:
        yield plan
    finally:
        _LOCAL.plan = previous


def active_plan():
    """The `InferencePlan` of the enclosing `inference_scope`, else None."""
    return getattr(_LOCAL, "plan", None)


def storage_range(spec, storage_bits):
    """`(qmin, qmax)` of the storage grid a spec's integers are written on."""
    lo, hi = -(2 ** (storage_bits - 1)), 2 ** (storage_bits - 1) - 1
    if spec.narrow_range and spec.bits == storage_bits:
        lo += 1
    return lo, hi


def converter_qparams(rmin, rmax, qmin, qmax):
    """`(float32 scale, zero point)` the TFLite converter writes for a fake-quant op's float32 `min` / `max`.

    It does not keep a scale: it recomputes it in double as `(max - min) / (qmax - qmin)`,
    nudges the zero point `qmin - min / scale` to the nearest integer (halves away from zero,
    clamped to the grid) and stores the scale as float32.
    """
    scale = (float(rmax) - float(rmin)) / (qmax - qmin)
    if scale <= 0.0:
        return np.float32(scale), qmin
    from_min = qmin - float(rmin) / scale
    nudged = qmin if from_min < qmin else qmax if from_min > qmax else int(math.copysign(math.floor(abs(from_min) + 0.5),
                                                                                      from_min))
    return np.float32(scale), nudged


def _ulps(value, count):
    value = np.float32(value)
    toward = np.float32(np.inf if count > 0 else -np.inf)
    for _ in range(abs(count)):
        value = np.nextafter(value, toward)
    return value


# The float32 `min` / `max` tried around the exact ones, in units in the last place, nearest first.
_RANGE_NUDGES = sorted(itertools.product(range(-4, 5), repeat=2), key=lambda d: (abs(d[0]) + abs(d[1]), d))


def exported_range(scale, zero_point, spec, storage_bits=8):
    """The float32 `(min, max)` of the fake-quant op `activation_op` writes, so the file holds `scale` exactly.

    The converter recomputes the scale from the op's range (`converter_qparams`);
    for about 3% of scales the float32 range `(qmin - zero_point) * scale`,
    `(qmax - zero_point) * scale` gives a scale one unit in the last place
    away, the integer kernels would then derive their requantization
    multipliers from another scale than the Keras model's, and at a rounding
    tie the file writes the next integer (MobileNetV2: 8 output steps). So the
    ends are moved by a few units in the last place (far below a step) until
    the converter's scale is the quantizer's float32 scale and its zero point
    the quantizer's. Falls back to the plain range if no nearby pair does.
    """
    lo, hi = storage_range(spec, storage_bits)
    s, zp = np.float32(scale), int(zero_point)
    rmin, rmax = np.float32((lo - zp) * float(s)), np.float32((hi - zp) * float(s))
    for dmin, dmax in _RANGE_NUDGES:
        cmin, cmax = _ulps(rmin, dmin), _ulps(rmax, dmax)
        if cmin <= 0.0 <= cmax and converter_qparams(cmin, cmax, lo, hi) == (s, zp):
            return float(cmin), float(cmax)
    return float(rmin), float(rmax)


def activation_op(x, spec, scale, zero_point, storage_bits):
    """A per-tensor activation quantizer as constant-range TensorFlow fake-quant ops.

    Args:
        x: The tensor.
        spec: The quantizer's `kq.QuantSpec` (per tensor, `bits <= storage_bits`).
        scale: Python float.
        zero_point: Python int on the spec's grid.
        storage_bits: 8 or 16.
    """
    import tensorflow as tf

    scale, zero_point = float(scale), int(zero_point)
    narrow = spec.narrow_range and spec.bits == storage_bits
    rmin, rmax = exported_range(scale, zero_point, spec, storage_bits)

    def store(v):
        return tf.quantization.fake_quant_with_min_max_args(v, min=rmin, max=rmax, num_bits=storage_bits,
                                                            narrow_range=narrow)

    x = store(x)
    if spec.bits < storage_bits:
        # A narrower grid: clip the stored integers to it (integer MINIMUM / MAXIMUM ops on the
        # same scale), and store the result with the same scale and zero point.
        lo, hi = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
        x = store(tf.minimum(tf.maximum(x, lo), hi))
    return x


def weight_op(w, spec, scale, zero_point):
    """A per-tensor frozen weight quantizer as the one TensorFlow fake-quant op the converter reads.

    Its range is computed here, in float32 as `kq.ops.fake_quant` computes it (the same grid), rather
    than by that function's shape and straight-through-gradient ops in the traced graph.

    Args:
        w: The weight tensor.
        spec: Its `kq.QuantSpec` (per tensor).
        scale: Python float.
        zero_point: Python int.
    """
    import tensorflow as tf

    scale, zero_point = np.float32(scale), np.float32(zero_point)
    lo = (np.float32(spec.qmin) - zero_point) * scale
    hi = (np.float32(spec.qmax) - zero_point) * scale
    return tf.quantization.fake_quant_with_min_max_vars(
        tf.cast(w, tf.float32), tf.constant(lo), tf.constant(hi), num_bits=spec.bits, narrow_range=spec.narrow_range)


# Key suffix of a wrapper's quantizer before its own activation in `InferencePlan.activations`.
PREACTIVATION = "preactivation"


def quantize_output(layer, x, plan, which=None):
    """`x` through `layer`'s activation quantizer as the plan has it (unchanged without one).

    `which=PREACTIVATION` picks a wrapper's quantizer before its own activation.
    """
    key = id(layer) if which is None else (id(layer), which)
    if plan.storage_bits is None or key not in plan.activations:
        return x
    spec, scale, zero_point = plan.activations[key]
    return activation_op(x, spec, scale, zero_point, plan.storage_bits)


def flattens(layer, inputs):
    """Whether the inference form writes `layer` as a 2-D matmul between reshapes (`flat_dense`).

    A plain `keras.layers.Dense` (no LoRA, not Keras-quantized) on a float input of rank > 2 whose
    leading dimensions are not all static (a symbolic batch).
    """
    shape = getattr(inputs, "shape", None)
    return (type(layer) is keras.layers.Dense and shape is not None and len(shape) > 2
            and any(d is None for d in shape[:-1]) and shape[-1] is not None
            and not getattr(layer, "lora_enabled", False) and getattr(layer, "quantization_mode", None) is None
            and "float" in str(getattr(inputs, "dtype", "")))


def flat_dense(layer, inputs, values, folded_bias):
    """A Dense on a rank > 2 input with a symbolic leading dimension, as the converters want it.

    `reshape(x, [-1, d_in]) -> matmul + bias -> reshape(y, [-1, ..., units])`. Keras' matmul of
    a rank-3 tensor traces `tf.tensordot`, whose reshape targets are computed from `tf.shape`
    when the batch is symbolic: the TFLite converter then cannot fuse the bias into its
    FULLY_CONNECTED (input shape `[-1, -1]`) and runs the layer in float. Here the first
    reshape's target is static but for the batch, so FULLY_CONNECTED takes `[-1, d_in]` with
    its bias, in int8, and the reshapes only move integers.
    """
    import tensorflow as tf

    kernel = tf.constant(values["kernel"]) if "kernel" in values else ops.convert_to_tensor(layer.kernel)
    d_in, units = int(kernel.shape[0]), int(kernel.shape[1])
    y = tf.matmul(tf.reshape(inputs, [-1, d_in]), tf.cast(kernel, inputs.dtype))
    bias = None
    if getattr(layer, "use_bias", False):  # the plan's bias, else the layer's (a variable, frozen at export)
        bias = tf.constant(values["bias"]) if "bias" in values else tf.convert_to_tensor(layer.bias.value)
    if folded_bias is not None:
        folded = tf.constant(np.asarray(folded_bias, "float32"))
        bias = folded if bias is None else bias + folded
    if bias is not None:
        y = tf.nn.bias_add(y, tf.cast(bias, y.dtype))
    inner = list(inputs.shape[1:-1])
    if all(d is not None for d in inner):
        target = [-1] + [int(d) for d in inner] + [units]
    else:
        target = tf.concat([tf.shape(inputs)[:-1], [units]], axis=0)
    y = tf.reshape(y, target)
    return layer.activation(y) if layer.activation is not None else y


def concrete_values(values):
    """`{name: numpy array}` of tensors whose values are known now (eager TensorFlow, JAX arrays), else None.

    None inside a `tf.function` or a JAX trace, where the values are symbolic.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif backend == "jax":
        import jax

        if any(isinstance(v, jax.core.Tracer) for v in values.values()):
            return None
    else:
        return None
    return {name: np.asarray(ops.convert_to_numpy(v)) for name, v in values.items()}


def inference_weights(wrapper, quantize=True):
    """The weights a `QuantizeWrapper`'s integer model runs with, read now as numpy arrays.

    `QuantizeWrapper.inference_weights` (see there) calls this.
    """

    def np32(v):
        return np.asarray(ops.convert_to_numpy(v), dtype="float32")

    values = wrapper.quantized_weights(training=False) if quantize else wrapper.float_weights()
    out = {n: np32(v) for n, v in values.items() if n in wrapper.weight_specs or not quantize}
    folded_bias = None
    if wrapper.batch_norm is not None:
        name, kernel, bias = wrapper.folded_weights()
        out.setdefault(name, np32(kernel))
        if getattr(wrapper.layer, "use_bias", False):
            out["bias"] = np.zeros(tuple(wrapper.layer.bias.shape), "float32")
        folded_bias = np32(bias)
    return out, folded_bias
