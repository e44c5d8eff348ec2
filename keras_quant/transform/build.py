"""`quantize_model`: a new Keras model with quantizers placed where TFLite quantizes.

Post-training quantization (`mode="ptq"`) rewrites a Functional or Sequential
model's graph (nested models are inlined) in three steps:

1. Flatten: run the graph with Keras' own traversal
   (`Functional._run_through_graph`, as `keras.models.clone_model` does), each
   leaf layer replaced by a clone with the same weights, nested
   Functional/Sequential models run inline. The float model is not touched.
2. Plan, from the layer rules (`kq.layers.RULES`) and the config: each
   compute layer gets a `QuantizeWrapper` (frozen per-channel weight
   quantizers). A BatchNormalization that is the compute layer's only
   consumer is folded into it, and a ReLU/ReLU6 after that is fused (TFLite
   fuses both), so the output quantizer goes after the last layer of that
   chain, with that layer's calibration statistics. Merge, pool, unfolded
   norm and other activation layers, and every float model input, get an
   `ActivationQuantizer` on their output; passthrough layers get nothing.
   As in TFLite: an Add / Subtract / Multiply followed by a ReLU / ReLU6 has
   one quantizer, after the activation (ADD fuses it); an average pool
   keeps its input's range (AVERAGE_POOL_2D has one scale); a Concatenate's
   inputs take its range where the converter writes them on its scale (an
   input only the Concatenate reads, and a pooled / padded tensor with no
   quantizer of its own, requantized for all its readers:
   `plan.plan_concat_ranges`); the first input an Add alone reads spans
   the Add's output range too, as in the converter's files
   (`plan.plan_add_ranges`); and a layer kept
   in float whose output feeds the integer graph gets a quantizer there (an
   integer runtime quantizes that tensor, and must not borrow a range). A
   compute layer with its own softmax / sigmoid / tanh / ... activation
   (TFLite runs it as a separate op) is also quantized before it, with the
   statistics the callback keys `"<layer>:preactivation"`.
3. Rebuild: run the flat graph again over new `keras.Input`s, creating the
   planned layers, with activation scales from `calibration.qparams(key, spec)`.

Layers the config sets to None stay float. Layers with no rule stay float and
are listed in `qmodel.quantization_report.unsupported` (with a warning),
unless the config names them explicitly, which raises `UnsupportedLayerError`.

Example:

>>> cb = kq.CalibrationCallback()
>>> model.predict(x_calib, callbacks=[cb])
>>> qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=cb.result)
>>> qmodel.quantization_report.folded
(('bn', 'conv'),)
"""

import contextlib
import math
import warnings

import keras
import numpy as np
from keras import tree

from keras_quant import graph as graph_lib
from keras_quant.config import LayerQuantConfig, QuantConfig
from keras_quant.errors import ConfigError, NoDataError
from keras_quant.layers import qat_quantizer
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.integer import (
    INTEGER_ACTIVATIONS, IntegerActivation, IntegerAdd, IntegerAveragePooling2D, IntegerBinaryOp, IntegerConcatenate,
    IntegerGlobalAveragePooling2D, IntegerMultiply,
)
from keras_quant.layers.folding import fold_into_layer, fold_weights
from keras_quant.layers.rules import PREACTIVATION, fixed_output_qparams, get_rule, is_keras_op
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.layers.weight_only import WeightOnlyMultiHeadAttention
from keras_quant.transform.plan import (
    SHARED_INPUT_MERGES, has_fixed_grid, plan_add_ranges, plan_concat_ranges, plan_model, resolve_ranges,
    share_merge_inputs, union_qparams,
)
from keras_quant.transform.report import QuantizationReport
from keras_quant.transform.rewrite import affine_layer, set_affine_weights

__all__ = ["quantize_model", "MODES"]

# The modes this module implements: a frozen post-training model, or a trainable QAT model.
MODES = ("ptq", "qat")


def _fixed_qparams(steps):
    """Give each quantizer of a softmax / sigmoid / tanh output TFLite's fixed grid (PTQ and QAT alike).

    TFLite's integer SOFTMAX / LOGISTIC / TANH write that grid whatever the
    calibration says; a QAT model keeps it frozen (it is neither observed
    nor learned), or the file would requantize where the Keras model did not.
    """
    for step in steps:
        fixed = fixed_output_qparams(step.fixed, step.quant_spec)
        if fixed is not None:
            step.qparams = tuple(np.asarray(v, dtype="float32") for v in fixed)


def _fetch_qparams(steps, calibration):
    """Look up every activation quantizer's scale and zero point before anything is built."""
    requests = [s for s in steps if s.quant_spec is not None and s.range_from is None and not has_fixed_grid(s)]
    inner = [s for s in steps if s.inner_key is not None]
    if (requests or inner) and calibration is None:
        first = requests[0].quant_key if requests else inner[0].inner_key
        raise ConfigError(
            "calibration", None,
            f"the config quantizes activations (first: '{first}'), so quantize_model needs a kq.CalibrationResult; "
            "calibrate first with kq.CalibrationCallback, or use a weights-only config (activations=None)",
        )
    for step in requests:
        step.qparams = _lookup(calibration, step.quant_key, step.quant_spec, step.quant_what)
    for step in steps:  # quantizers inside a layer: before its own activation, between separable halves
        if step.preact_key is not None and calibration is not None:
            step.preact_qparams = _lookup(calibration, step.preact_key, step.preact_spec,
                                          "the input of the layer's own activation")
        if step.inner_key is not None and calibration is not None:
            step.inner_qparams = _lookup(calibration, step.inner_key, step.inner_spec,
                                         "the depthwise output inside the separable convolution")
    resolve_ranges(steps)


def _lookup(calibration, key, spec, what):
    """The calibrated `(scale, zero_point)` of a quantizer."""
    if key not in calibration:
        raise NoDataError(
            key, reason=f"quantize_model needs activation statistics for layer '{key}' ({what}), "
            "and the calibration result has none for it", layer=key,
        )
    try:
        scale, zero_point = calibration.qparams(key, spec)
    except NoDataError as e:
        raise NoDataError(
            key, reason=f"quantize_model needs activation statistics for layer '{key}' ({what}): {e}", layer=key,
        ) from e
    return scale, zero_point


class _Names:
    """Unique layer names: `base`, else `base_1`, `base_2`, ..."""

    def __init__(self, taken):
        self.taken = set(taken)

    def __call__(self, base):
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _inner(step, staging):
    """The unbuilt layer a wrap step wraps: a copy of the staging layer, or its integer rewrite."""
    if step.affine is not None:
        return affine_layer(step.affine[2], staging.name)
    if step.bias_offset is not None and not staging.use_bias:  # the folded constant needs a bias
        config = staging.get_config()
        config["use_bias"] = True
        return type(staging).from_config(config)
    return graph_lib.copy_operation(staging)


def _original(flat, staging):
    """The float model's layer a staging copy stands for: the plan's copies hold no weights, it does."""
    return flat.origin[id(staging)]


def _built_with(layer, staging, weights, scope):
    """Build an unbuilt copy as `staging` was built, then give it `weights`; False when it cannot be built so.

    `scope`: the name scope the layer is built in (a wrapper's name, so the variable paths are those the
    wrapper's own build would give, `wrapper/layer/kernel`), or None.
    """
    config = staging.get_build_config()
    if not config:
        return False
    with keras.name_scope(scope) if scope else contextlib.nullcontext():
        return graph_lib.build_with_weights(layer, config, weights)


def _ptq_inner(step, staging, flat, scope):
    """PTQ: the layer a wrap step wraps, and whether it is built and holds its final weights already.

    Built before the wrapper is, its weights are final when the wrapper's build observes their ranges, so
    `_finish_step` has nothing left to set (a BatchNormalization folded in, a constant folded into the bias,
    the affine layers before it folded in: `step.input_affine`, planned for PTQ only).
    """
    if step.fold is not None or step.input_affine is not None:
        bn = _original(flat, step.fold) if step.fold is not None else None
        return fold_into_layer(_original(flat, staging), bn, name=staging.name, input_affine=step.input_affine,
                               bias_offset=step.bias_offset), True
    inner = _inner(step, staging)
    if step.affine is not None or not graph_lib.is_layer(staging):
        return inner, False
    weights = _original(flat, staging).get_weights()
    if step.bias_offset is not None:
        if not weights:
            return inner, False
        bias = weights[1] if staging.use_bias else None
        weights = [weights[0], _offset_bias(bias, step.bias_offset, inner, staging)] + weights[2:]
    elif not weights:
        return inner, False
    return inner, _built_with(inner, staging, weights, scope)


def _offset_bias(bias, offset, inner, staging):
    """The bias of `layer(x) + c`: the layer's bias (zeros without one) plus `c`, float32."""
    if bias is None:
        channels = staging.compute_output_shape(staging.get_build_config()["input_shape"])[-1]
        bias = np.zeros((channels,), "float32")
    return (np.asarray(keras.ops.convert_to_numpy(bias)) + offset).astype("float32")


def _build_step(step, staging, mode, observe_steps, bn_statistics, flat, input_scale=None, fused_scale=None):
    """Create the new model's layer for one planned step (not yet built); and whether its weights are final.

    `input_scale`: PTQ, the scale of the quantized tensor the layer reads, for
    the frozen wrapper's integer arithmetic (`kq.layers.integer`); `fused_scale`:
    the scale of the quantizer after a fused activation layer that follows it.
    """
    if step.kind == "wrap":
        lc = step.layer_config
        if mode == "qat":
            if step.group is not None:  # the output goes through the shared quantizer instead
                lc = LayerQuantConfig(weights=lc.weights, activations=None)
            bn = graph_lib.copy_operation(step.fold) if step.fold is not None else None
            if lc.weights is None and lc.activations is None and bn is None:
                return _inner(step, staging), False
            return QuantizeWrapper(_inner(step, staging), lc, mode="qat", batch_norm=bn,
                                   observe_steps=observe_steps, bn_statistics=bn_statistics, name=staging.name), False
        wrapped = not (lc.weights is None and lc.activations is None)
        inner, final = _ptq_inner(step, staging, flat, staging.name if wrapped else None)
        if not wrapped:
            return inner, final
        return QuantizeWrapper(inner, lc, mode="frozen", input_scale=input_scale, fused_output_scale=fused_scale,
                               name=staging.name), final
    if step.weight_only is not None:  # a float MultiHeadAttention with int8 kernels
        return WeightOnlyMultiHeadAttention.from_config({**staging.get_config(),
                                                         "weight_spec": step.weight_only.get_config()}), False
    return graph_lib.copy_operation(staging), False


def _finish_step(step, staging, mode, flat, final):
    """Copy weights into a freshly built layer, set weight ranges, set the output range.

    `final`: the layer was given its weights before it was built (the wrapper's build observed their ranges).
    """
    layer = step.layer
    inner = layer.layer if isinstance(layer, QuantizeWrapper) else layer
    if final:
        pass
    elif step.affine is not None:
        set_affine_weights(inner, *step.affine[:2])
    elif step.bias_offset is not None:  # `layer(x) + c`: c goes into the bias
        weights = [keras.ops.convert_to_numpy(w) for w in _original(flat, staging).get_weights()]
        bias = weights[1] if staging.use_bias else None
        inner.set_weights([weights[0], _offset_bias(bias, step.bias_offset, inner, staging)] + weights[2:])
    elif (step.fold is None or mode == "qat") and graph_lib.is_layer(staging) and _original(flat, staging).weights:
        inner.set_weights(_original(flat, staging).get_weights())
    if mode == "ptq" and isinstance(inner, WeightOnlyMultiHeadAttention):
        inner.freeze()  # its kernels' grids held as constants: no range reduction in every predict step
    if isinstance(layer, QuantizeWrapper):
        if layer.batch_norm is not None:
            layer.batch_norm.set_weights(_original(flat, step.fold).get_weights())
        if not final:
            layer.observe_weights()
        if layer.output_quantizer is not None and step.qparams is not None:
            layer.set_output_qparams(*step.qparams)
        if layer.preactivation_quantizer is not None and step.preact_qparams is not None:
            layer.set_preactivation_qparams(*step.preact_qparams)



def _separable(step, staging, mode, observe_steps, bn_statistics, flat, input_scale=None, fused_scale=None):
    """`(depthwise, pointwise, final)`: the layers computing a SeparableConv, each wrapped per the step (unbuilt).

    The depthwise half quantizes its weights and its output (the step's
    `inner_key` range); the pointwise 1x1 convolution takes the bias, the
    activation, a folded BatchNormalization and the step's output quantizer
    (PTQ: or writes on `fused_scale`, the grid after a fused ReLU).
    PTQ builds both halves with their weights before they are wrapped (`final`).
    """
    rank = 2 if isinstance(staging, keras.layers.SeparableConv2D) else 1
    depthwise_cls = keras.layers.DepthwiseConv2D if rank == 2 else keras.layers.DepthwiseConv1D
    conv_cls = keras.layers.Conv2D if rank == 2 else keras.layers.Conv1D
    depthwise = depthwise_cls(
        staging.kernel_size, strides=staging.strides, padding=staging.padding,
        depth_multiplier=staging.depth_multiplier, dilation_rate=staging.dilation_rate,
        data_format=staging.data_format, use_bias=False, name=f"{staging.name}_depthwise",
    )
    use_bias = staging.use_bias or (step.fold is not None and mode != "qat")
    pointwise = conv_cls(staging.filters, 1, data_format=staging.data_format, use_bias=use_bias,
                         activation=staging.activation, name=staging.name)
    final = False
    if mode != "qat":
        final = _build_separable(step, staging, flat, depthwise, pointwise)
    lc = step.layer_config
    inner_lc = LayerQuantConfig(weights=lc.weights, activations=step.inner_spec)
    kwargs = {"mode": "qat", "observe_steps": observe_steps} if mode == "qat" else {"mode": "frozen"}
    frozen_scale = {} if mode == "qat" else {"input_scale": input_scale}
    depthwise = QuantizeWrapper(depthwise, inner_lc, name=f"{staging.name}_depthwise", **kwargs, **frozen_scale)
    if mode == "qat":
        if step.group is not None:
            lc = LayerQuantConfig(weights=lc.weights, activations=None)
        bn = graph_lib.copy_operation(step.fold) if step.fold is not None else None
        pointwise = QuantizeWrapper(pointwise, lc, batch_norm=bn, bn_statistics=bn_statistics, name=staging.name,
                                    **kwargs)
    else:
        pointwise = QuantizeWrapper(pointwise, lc, name=staging.name, input_scale=_tensor_scale(
            step.inner_qparams, step.inner_spec), fused_output_scale=fused_scale, **kwargs)
    return depthwise, pointwise, final


def _separable_weights(step, staging, flat, mode, use_bias):
    """`(depthwise weights, pointwise weights)` of a separable layer's halves (BatchNorm folded in PTQ)."""
    source = _original(flat, staging)
    arrays = {"depthwise_kernel": source.depthwise_kernel, "pointwise_kernel": source.pointwise_kernel}
    if source.use_bias:
        arrays["bias"] = source.bias
    arrays = {k: keras.ops.convert_to_numpy(v) for k, v in arrays.items()}
    if step.fold is not None and mode != "qat":
        dtypes = {"pointwise_kernel": source.pointwise_kernel.dtype,
                  "bias": source.bias.dtype if source.use_bias else source.pointwise_kernel.dtype}
        for name, value in fold_weights(source, _original(flat, step.fold)).items():
            arrays[name] = value.astype(dtypes[name])
    return [arrays["depthwise_kernel"]], [arrays["pointwise_kernel"]] + ([arrays["bias"]] if use_bias else [])


def _build_separable(step, staging, flat, depthwise, pointwise):
    """PTQ: build a separable layer's halves with their weights, in their wrappers' name scopes; False if not built."""
    config = staging.get_build_config()
    if not config or "input_shape" not in config:
        return False
    shape = config["input_shape"]
    dw_weights, pw_weights = _separable_weights(step, staging, flat, "ptq", pointwise.use_bias)
    with keras.name_scope(depthwise.name):
        depthwise.build(shape)
    with keras.name_scope(pointwise.name):
        pointwise.build(depthwise.compute_output_shape(shape))
    depthwise.set_weights(dw_weights)
    pointwise.set_weights(pw_weights)
    return True


def _finish_separable(step, staging, mode, flat, final):
    """Give the depthwise / pointwise halves the separable layer's weights (BatchNorm folded in PTQ) and ranges."""
    depthwise, pointwise = step.inner_layer, step.layer
    if not final:
        dw_weights, pw_weights = _separable_weights(step, staging, flat, mode, pointwise.layer.use_bias)
        depthwise.layer.set_weights(dw_weights)
        pointwise.layer.set_weights(pw_weights)
    if pointwise.batch_norm is not None:
        pointwise.batch_norm.set_weights(_original(flat, step.fold).get_weights())
    if not final:
        for layer in (depthwise, pointwise):
            layer.observe_weights()
    if step.inner_qparams is not None:
        depthwise.set_output_qparams(*step.inner_qparams)
    if pointwise.output_quantizer is not None and step.qparams is not None:
        pointwise.set_output_qparams(*step.qparams)
    if pointwise.preactivation_quantizer is not None and step.preact_qparams is not None:
        pointwise.set_preactivation_qparams(*step.preact_qparams)


def _tensor_scale(qparams, spec):
    """The float32 scale of a per-tensor int8 (or narrower) quantizer's qparams, else None.

    The integer arithmetic (`kq.layers.integer`) is the int8 kernels'; 16-bit activations keep the float form.
    """
    if qparams is None or spec is None or spec.granularity != "per_tensor" or spec.bits > 8 or qparams[0] is None:
        return None
    scale = np.asarray(qparams[0], "float32").reshape(-1)
    return float(scale[0]) if scale.size == 1 else None


def _tensor_grid(qparams, spec):
    """`(scale, zero_point)` of a per-tensor int8 (or narrower) quantizer's qparams, else None."""
    scale = _tensor_scale(qparams, spec)
    return None if scale is None else (scale, int(np.asarray(qparams[1]).reshape(-1)[0]))


def _output_scale(step, fused_into):
    """PTQ: the scale of the int8 grid a step's op writes: its own quantizer's, or (`fused_into`: the step of
    the activation TFLite fuses into the op) the quantizer's after that activation; else None."""
    after = fused_into if step.quant_spec is None else step
    return None if after is None else _tensor_scale(after.qparams, after.quant_spec)


def _fused_scale(step, plan):
    """PTQ: the scale of the int8 quantizer after the activation fused into a wrap step, else None."""
    if step.kind != "wrap" or step.quant_spec is not None or len(step.chain) < 2:
        return None
    return _output_scale(step, plan.get(id(step.chain[-1])))


def _integer_merge(step, staging, args, tensor_grids, flat, plan):
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


def _integer_binary_op(step, staging, args, kwargs, tensor_grids, plan):
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


def _call_binary_op(layer, args):
    """Call an `IntegerBinaryOp` on a node's arguments: the tensor alone when it holds the constant."""
    if layer.constant_shape is None:
        return layer(*args)
    return layer(next(a for a in args if keras.backend.is_keras_tensor(a)))


def _integer_layer(step, staging, in_grid, config, flat):
    """PTQ: the integer form (`kq.layers.integer`) of a one-input layer on an int8 grid, else None."""
    out_grid = _tensor_grid(step.qparams, step.quant_spec)
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


@graph_lib.gc_paused()
def quantize_model(model, config=None, calibration=None, mode="ptq", observe_steps=None, bn_statistics="quantized",
                   shared_merges=SHARED_INPUT_MERGES):
    """A new Keras model with fake-quantized weights and activations: post-training or trainable.

    `mode="ptq"` gives the frozen post-training model. `mode="qat"` gives a
    model to train with ordinary `fit`: compute layers become
    `kq.QuantizeWrapper`s in `"qat"` mode (a following BatchNormalization is
    folded into them as in Jacob et al. 2018, not removed), activation
    quantizers observe, learn (LSQ, for `learnable` specs) or freeze their
    ranges, and the inputs of each residual Add and each Concatenate share
    one quantizer, as do an average pool's input and output (TFLite's
    AVERAGE_POOL_2D keeps one scale). The output of a softmax / sigmoid /
    tanh keeps TFLite's fixed grid (`kq.layers.rules.FIXED_GRIDS`), frozen:
    neither observed nor learned. A subclassed model (no graph to rewrite)
    is copied and its compute layers wrapped in place of the originals.

    Args:
        model: A Functional or Sequential Keras model (nested ones are
            inlined; `"qat"` also takes subclassed models). It is not modified.
        config: A `kq.QuantConfig`; None means `kq.QuantConfig()` (W8A8:
            int8 per-channel symmetric weights, int8 per-tensor activations).
        calibration: A `kq.CalibrationResult` (anything with
            `qparams(key, spec)` and `key in calibration`). Needed by
            `"ptq"` when the config quantizes activations; optional for
            `"qat"`, where it initialises the activation ranges (else the first
            training batches do).
        mode: `"ptq"`: frozen quantizers with scales from the weights and the
            calibration statistics. `"qat"`: trainable quantizers.
        observe_steps: QAT: training steps the ranges are observed before
            learnable quantizers learn. Default: learnable quantizers learn
            from the first step when a calibration is given, else after
            `keras_quant.layers.qat_quantizer.LSQ_OBSERVE_STEPS`; the others observe (moving
            average) until changed (`kq.qat.set_mode`, `kq.qat.QATScheduler`).
        bn_statistics: QAT: where a folded BatchNormalization's batch
            statistics come from in training, `"quantized"` (one pass) or
            `"float"` (an extra float pass, as in Jacob et al. 2018); see
            `kq.QuantizeWrapper`.
        shared_merges: Merge layer types whose inputs are put on a shared
            range (default Add and Concatenate). QAT: their inputs share one
            activation quantizer. PTQ: with Add listed, the first input that
            an Add alone reads (the residual branch's last convolution, through
            a folded BatchNormalization or Dropout) takes the union of its
            range and the Add's output range, as the converter's own files do
            (`keras_quant.transform.plan.plan_add_ranges`: a coarser grid, but no
            clipping of the branch where held-out data exceeds the
            calibration). TFLite's CONCATENATION needs one scale, so a PTQ
            Concatenate's sole-reader inputs always take its range; its ADD
            rescales its inputs, so `(keras.layers.Concatenate,)` keeps each
            residual input on its own range (in QAT this can matter at 4 bits
            when a skip tensor also feeds other layers); `()` shares no merge
            inputs in QAT. An average pool shares its input's quantizer
            whatever this says.

    Returns:
        A new `keras.Model` with the float model's input names, shapes and
        dtypes, and a `quantization_report` attribute (`QuantizationReport`).

    Raises:
        ConfigError: For an unknown mode or config, a subclassed or unbuilt
            model, or missing calibration when activations are quantized.
        UnsupportedLayerError: For a rule-less layer the config names explicitly.
        NoDataError: When the calibration has no statistics for a layer that
            needs an activation quantizer (the message names the layer).

    Example:

    >>> qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=result)
    >>> qmodel.save("model_int8.keras")
    """
    if mode not in MODES:
        raise ConfigError("mode", mode, f"mode must be one of {MODES}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError("config", config, "expected a kq.QuantConfig or None")
    graph = graph_lib.functional(model)
    if graph is None and mode == "qat" and model.built and not isinstance(model, keras.Sequential):
        from keras_quant.transform.subclassed import quantize_subclassed

        return quantize_subclassed(model, config, calibration, observe_steps)
    if graph is None:
        reason = (
            "the Sequential model is not built; give it a keras.Input or call build() first"
            if isinstance(model, keras.Sequential)
            else "quantize_model rewrites the graph of Functional and Sequential models only; wrap the "
            f"layers of this subclassed {type(model).__name__} in kq.QuantizeWrapper yourself"
        )
        raise ConfigError("model", getattr(model, "name", model), reason)

    # The copies' weights are read from the originals. QAT trains the affine layers' float form (not folded).
    planned = plan_model(model, config, weights=False, fold_inputs=mode == "ptq")
    flat, plan, report, input_steps = planned.flat, planned.steps, planned.report, planned.inputs
    if mode == "ptq":
        plan_concat_ranges(flat, plan)
        if any(issubclass(keras.layers.Add, cls) for cls in shared_merges):
            plan_add_ranges(flat, plan)
    steps = input_steps + list(plan.values())
    _fixed_qparams(steps)
    if mode == "ptq" or calibration is not None:
        _fetch_qparams(steps, calibration)
    groups = share_merge_inputs(flat, plan, input_steps, shared_merges) if mode == "qat" else []
    if mode == "qat" and calibration is not None:
        observe_steps = qat_quantizer.default_observe_steps(observe_steps, [s.quant_spec for s in steps], True)
    quantizer_kwargs = {"mode": "qat", "observe_steps": observe_steps} if mode == "qat" else {}

    names = _Names(op.name for op in graph_lib.operations(flat.model))
    quantizers = []
    # PTQ: id(Keras tensor) -> `(scale, zero_point)` of the int8 grid its values lie on (a per-tensor quantizer's
    # output, or a tensor read through layers that keep their input's grid): the integer layers that read it.
    tensor_grids = {}

    def add_quantizer(step, x, base, input_scale=None):
        if step.quant_spec is None:
            return x
        if step.group is not None:  # QAT: one quantizer shared by the inputs of a merge
            first = step.group[0]
            if first.quantizer is None:
                qparams = (union_qparams([st.qparams for st in step.group], step.quant_spec)
                           if first.qparams is not None else (None, None))
                first.quantizer = ActivationQuantizer(
                    step.quant_spec, *qparams, slots=len(step.group), name=names(f"{first.quant_key}_shared_quant"),
                    **quantizer_kwargs,
                )
            quantizers.append((first.quantizer.name, step.quant_key))
            return first.quantizer(x, slot=step.slot)
        if step.quantizer is None:
            qparams = step.qparams if step.qparams is not None else (None, None)
            # A fixed softmax / sigmoid / tanh grid is a frozen quantizer in QAT too: never observed or learned.
            kwargs = {} if has_fixed_grid(step) else quantizer_kwargs
            if input_scale is not None and _tensor_scale(step.qparams, step.quant_spec) is not None:
                kwargs = {"input_scale": input_scale}  # PTQ: a requantization of an int8 tensor (QUANTIZE)
            step.quantizer = ActivationQuantizer(step.quant_spec, *qparams, name=names(f"{base}_quant"), **kwargs)
            quantizers.append((step.quantizer.name, step.quant_key))
        out = step.quantizer(x)
        if mode == "ptq":
            tensor_grids[id(out)] = _tensor_grid(step.qparams, step.quant_spec)
        return out

    new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=key) for t, key in zip(flat.model.inputs, flat.input_keys)]

    def call_fn(staging, *args, **kwargs):
        step = plan[id(staging)]
        if step.kind == "folded":  # a BatchNormalization, or `+ c` folded into a bias: its tensor passes through
            return next(a for a in args if keras.backend.is_keras_tensor(a))
        first, final = step.layer is None, False
        source = args[0] if args and keras.backend.is_keras_tensor(args[0]) else None
        in_grid = tensor_grids.get(id(source)) if mode == "ptq" and source is not None else None
        in_scale = None if in_grid is None else in_grid[0]
        if step.affine is not None:  # the 1x1 depthwise conv takes the tensor alone (no mask, ...)
            args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k == "training"}
        if (first and mode == "ptq" and step.kind == "clone"
                and type(staging) in (keras.layers.Add, keras.layers.Concatenate, keras.layers.Multiply)
                and config.for_layer(flat.origin[id(staging)], flat.path(staging)) is not None):
            step.layer = _integer_merge(step, staging, args, tensor_grids, flat, plan)
        elif (first and mode == "ptq" and step.kind == "clone" and is_keras_op(staging)
              and config.for_layer(flat.origin[id(staging)], flat.path(staging)) is not None):
            step.layer = _integer_binary_op(step, staging, args, kwargs, tensor_grids, plan)
        elif first and mode == "ptq" and step.kind == "clone" and in_grid is not None:
            step.layer = _integer_layer(step, staging, in_grid, config, flat)
        if first and step.layer is None:
            if step.inner_key is not None:  # a separable convolution: depthwise, quantizer, pointwise
                step.inner_layer, step.layer, final = _separable(
                    step, staging, mode, observe_steps, bn_statistics, flat, in_scale,
                    _fused_scale(step, plan) if mode == "ptq" else None)
            else:
                step.layer, final = _build_step(step, staging, mode, observe_steps, bn_statistics, flat, in_scale,
                                                _fused_scale(step, plan) if mode == "ptq" else None)
        if step.inner_layer is not None:
            outputs = step.layer(step.inner_layer(*args, **kwargs), **kwargs)
        elif isinstance(step.layer, IntegerBinaryOp):
            outputs = _call_binary_op(step.layer, args)
        else:
            outputs = step.layer(*args, **kwargs)
        if first:
            if step.inner_layer is not None:
                _finish_separable(step, staging, mode, flat, final)
                quantizers.append((step.inner_layer.name, step.inner_key))
            else:
                _finish_step(step, staging, mode, flat, final)
            if isinstance(step.layer, QuantizeWrapper) and step.layer.preactivation_quantizer is not None:
                quantizers.append((step.layer.name + PREACTIVATION, step.preact_key))
            if isinstance(step.layer, QuantizeWrapper) and step.layer.output_quantizer is not None:
                quantizers.append((step.layer.name, step.quant_key))
        if step.kind == "wrap" and step.group is None:
            if mode == "ptq" and getattr(step.layer, "output_quantizer", None) is not None:
                tensor_grids[id(outputs)] = _tensor_grid(step.qparams, step.quant_spec)
            return outputs  # the wrapper's own output quantizer, if any
        passthrough = (source is not None and keras.backend.is_keras_tensor(outputs)
                       and getattr(get_rule(staging), "kind", None) == "passthrough")  # max pool, padding, reshape
        if step.quant_spec is None and passthrough:
            tensor_grids[id(outputs)] = tensor_grids.get(id(source))  # the same grid
        requantized = in_grid[0] if passthrough and in_grid is not None and mode == "ptq" else None
        return add_quantizer(step, outputs, staging.name, requantized)

    with graph_lib.fast_variable_creation():
        quantized_inputs = [add_quantizer(s, x, s.quant_key) for s, x in zip(input_steps, new_inputs)]
        outputs = graph_lib.run(flat.model, quantized_inputs, call_fn)
    inputs = new_inputs
    if flat.inputs_struct is not None:
        inputs = tree.pack_sequence_as(flat.inputs_struct, new_inputs)
    qmodel = keras.Model(inputs, outputs, name=model.name)
    if getattr(model, "compiled", False):
        # `compile`, not `compile_from_config`: that also creates the optimizer's slot variables now
        # (a tenth of a small model's quantize_model); `fit` creates them when it first needs them.
        qmodel.compile(**keras.saving.deserialize_keras_object(model.get_compile_config()))

    wrapped = tuple(layer.name for s in plan.values() for layer in (s.inner_layer, s.layer)
                    if isinstance(layer, QuantizeWrapper))
    qmodel.quantization_report = QuantizationReport(
        wrapped=wrapped,
        folded=tuple(report["folded"]),
        activation_quantizers=tuple(quantizers),
        float_layers=tuple(report["float_layers"]),
        unsupported=tuple(report["unsupported"]),
        shared=tuple(tuple(st.quant_key for st in group) for group in groups),
        float_islands=tuple(report["float_islands"]),
        rewritten=tuple(report["rewritten"]),
        input_folds=tuple(report["input_folds"]),
    )
    if report["unsupported"]:
        warnings.warn(
            f"quantize_model: no quantization rule for layer(s) {report['unsupported']}; they stay in float "
            "(see qmodel.quantization_report.unsupported, or declare rules with kq.layers.register_rule)",
            stacklevel=2,
        )
    return qmodel
