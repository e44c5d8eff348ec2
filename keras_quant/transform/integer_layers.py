"""PTQ's integer-arithmetic layers: where `quantize_model` runs a layer on int8 grids as LiteRT does.

A merge, a keras.ops `x + y` / `x * y`, an average pool or a lookup-table
activation between per-tensor int8 quantizers becomes its integer form
(`keras_quant.layers.integer`), so the Keras model computes what the
TFLite file computes. Each function returns None where the float form stays.
"""

import math

import keras
import numpy as np

from keras_quant.layers.integer import (
    INTEGER_ACTIVATIONS, IntegerActivation, IntegerAdd, IntegerAveragePooling2D, IntegerBinaryOp, IntegerConcatenate,
    IntegerGlobalAveragePooling2D, IntegerMultiply,
)

__all__ = [
    "tensor_scale", "tensor_grid", "fused_scale", "integer_merge", "integer_binary_op", "call_binary_op",
    "integer_layer",
]


def tensor_scale(qparams, spec):
    """The float32 scale of a per-tensor int8 (or narrower) quantizer's qparams, else None.

    The integer arithmetic (`kq.layers.integer`) is the int8 kernels'; 16-bit activations keep the float form.
    """
    if qparams is None or spec is None or spec.granularity != "per_tensor" or spec.bits > 8 or qparams[0] is None:
        return None
    scale = np.asarray(qparams[0], "float32").reshape(-1)
    return float(scale[0]) if scale.size == 1 else None


def tensor_grid(qparams, spec):
    """`(scale, zero_point)` of a per-tensor int8 (or narrower) quantizer's qparams, else None."""
    scale = tensor_scale(qparams, spec)
    return None if scale is None else (scale, int(np.asarray(qparams[1]).reshape(-1)[0]))


def _output_scale(step, fused_into):
    """PTQ: the scale of the int8 grid a step's op writes: its own quantizer's, or (`fused_into`: the step of
    the activation TFLite fuses into the op) the quantizer's after that activation; else None."""
    after = fused_into if step.quant_spec is None else step
    return None if after is None else tensor_scale(after.qparams, after.quant_spec)


def fused_scale(step, plan):
    """PTQ: the scale of the int8 quantizer after the activation fused into a wrap step, else None."""
    if step.kind != "wrap" or step.quant_spec is not None or len(step.chain) < 2:
        return None
    return _output_scale(step, plan.get(id(step.chain[-1])))


def integer_merge(step, staging, args, tensor_grids, flat, plan):
    """PTQ: an `IntegerAdd` (two inputs) or `IntegerConcatenate` whose input and output grids are int8, else None."""
    inputs = args[0] if args and isinstance(args[0], (list, tuple)) else ()
    grids = [tensor_grids.get(id(t)) for t in inputs]
    if not grids or None in grids:
        return None
    scales = [g[0] for g in grids]
    # A fused merge's quantizer follows the activation TFLite fuses into the ADD.
    scale = _output_scale(step, plan.get(id(step.chain[-1])) if step.fused else None)
    if scale is None:
        return None
    if type(staging) is keras.layers.Add and len(scales) == 2:
        return IntegerAdd(scales, scale, name=staging.name)
    if type(staging) is keras.layers.Concatenate:
        return IntegerConcatenate(scales, scale, axis=staging.axis, name=staging.name)
    if type(staging) is keras.layers.Multiply and len(scales) == 2 and not step.fused:
        return IntegerMultiply(scales, scale, name=staging.name)
    return None


# keras.ops nodes with an integer form (`IntegerBinaryOp`), by operation class name.
_BINARY_OP_NAMES = {"Add": "add", "Multiply": "multiply"}


def _constant_grid(value):
    """`(scale, zero_point)` the TFLite converter gives a float constant operand of an int8 ADD, else None.

    As its quantizer does (`GetUniformQuantizedTypeForWeight`, `getNudgedScaleAndZeroPoint`), in double:
    8-bit asymmetric over the constant's min / max widened to 0, `scale = (max - min) / 255`, the zero point
    from the end with the smaller rounding error, nudged into [-128, 127]; the scale is stored as float32.
    """
    array = np.asarray(keras.ops.convert_to_numpy(value))
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        return None
    rmin, rmax = min(float(array.min()), 0.0), max(float(array.max()), 0.0)
    if abs(rmax - rmin) < np.finfo(np.float64).eps:
        return None  # an all-zero constant: the converter writes scale 1
    qmin, qmax = -128.0, 127.0
    scale = (rmax - rmin) / (qmax - qmin)
    from_min, from_max = qmin - rmin / scale, qmax - rmax / scale
    zero_point = from_min if abs(qmin) + abs(rmin / scale) < abs(qmax) + abs(rmax / scale) else from_max
    zero_point = (int(min(max(zero_point, qmin), qmax)) if not qmin <= zero_point <= qmax
                  else int(math.copysign(math.floor(abs(zero_point) + 0.5), zero_point)))  # C's round
    return float(np.float32(scale)), zero_point


def integer_binary_op(step, staging, args, kwargs, tensor_grids, plan):
    """PTQ: an `IntegerBinaryOp` for a keras.ops `x + y` node between int8 tensors, or with a constant
    operand (which the converter quantizes on its own grid), else None."""
    op = _BINARY_OP_NAMES.get(type(staging).__name__)
    if op is None or len(args) != 2 or kwargs or not any(keras.backend.is_keras_tensor(a) for a in args):
        return None
    grids, constants = [], [i for i, a in enumerate(args) if not keras.backend.is_keras_tensor(a)]
    for a in args:
        if keras.backend.is_keras_tensor(a):
            grids.append(tensor_grids.get(id(a)))
        elif op == "add":  # a constant: the converter's grid for it (a MUL's constant is quantized otherwise)
            grids.append(_constant_grid(a))
        else:
            return None
    if None in grids:
        return None
    scale = _output_scale(step, plan.get(id(step.chain[-1])) if step.fused else None)
    if scale is None or op == "multiply" and step.fused:
        return None
    return IntegerBinaryOp(op, [g[0] for g in grids], scale, name=staging.name,
                           constant=args[constants[0]] if constants else None, constant_first=constants == [0])


def call_binary_op(layer, args):
    """Call an `IntegerBinaryOp` on a node's arguments: the tensor alone when it holds the constant."""
    if layer.constant_shape is None:
        return layer(*args)
    return layer(next(a for a in args if keras.backend.is_keras_tensor(a)))


def integer_layer(step, staging, in_grid, config, flat):
    """PTQ: the integer form (`kq.layers.integer`) of a one-input layer on an int8 grid, else None."""
    out_grid = tensor_grid(step.qparams, step.quant_spec)
    if out_grid is None or config.for_layer(flat.origin[id(staging)], flat.path(staging)) is None:
        return None
    kind = type(staging)
    if kind is keras.layers.AveragePooling2D and out_grid == in_grid:
        return IntegerAveragePooling2D(in_grid, **staging.get_config())
    if kind is keras.layers.GlobalAveragePooling2D:
        return IntegerGlobalAveragePooling2D(in_grid[0], out_grid[0], **staging.get_config())
    if kind is keras.layers.Activation and getattr(staging.activation, "__name__", None) in INTEGER_ACTIVATIONS:
        config = staging.get_config()
        activation = config.pop("activation")
        return IntegerActivation(activation, in_grid, out_grid[0], **config)
    return None
