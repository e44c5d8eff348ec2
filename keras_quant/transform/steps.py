"""The layer each planned step of `quantize_model` becomes, and how it gets its weights and ranges.

`build_step` creates a step's new layer (a `QuantizeWrapper` in the `"qat"`
or `"frozen"` stage, a weight-only attention, or a copy), `finish_step`
gives it the float model's weights (PTQ: folded, built with them before the
wrapper observes their ranges) and its calibrated ranges;
`build_separable` / `finish_separable` do the same for a separable
convolution split into its depthwise and pointwise halves.
"""

import contextlib

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant.config import LayerQuantConfig
from keras_quant.layers.folding import fold_into_layer, fold_weights
from keras_quant.layers.specs import check_weight_axis
from keras_quant.layers.weight_only import WeightOnlyMultiHeadAttention
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.transform.guards import copy_operation
from keras_quant.transform.integer_layers import tensor_scale
from keras_quant.transform.rewrite import affine_layer, set_affine_weights

__all__ = ["Names", "build_step", "finish_step", "build_separable", "finish_separable"]


class Names:
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
    return copy_operation(staging)


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
    `finish_step` has nothing left to set (a BatchNormalization folded in, a constant folded into the bias,
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


def build_step(step, staging, mode, observe_steps, bn_statistics, flat, input_scale=None, fused_scale=None):
    """Create the new model's layer for one planned step (not yet built); and whether its weights are final.

    `input_scale`: PTQ, the scale of the quantized tensor the layer reads, for
    the frozen wrapper's integer arithmetic (`kq.layers.integer`); `fused_scale`:
    the scale of the quantizer after a fused activation layer that follows it.
    """
    if step.kind == "wrap":
        lc = step.layer_config
        if step.affine is None:
            check_weight_axis(_original(flat, staging), lc.weights)  # built: the weights' ranks are known
        if mode == "qat":
            if step.group is not None:  # the output goes through the shared quantizer instead
                lc = LayerQuantConfig(weights=lc.weights, activations=None)
            bn = copy_operation(step.fold) if step.fold is not None else None
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
    return copy_operation(staging), False


def finish_step(step, staging, mode, flat, final):
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



def build_separable(step, staging, mode, observe_steps, bn_statistics, flat, input_scale=None, fused_scale=None):
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
        bn = copy_operation(step.fold) if step.fold is not None else None
        pointwise = QuantizeWrapper(pointwise, lc, batch_norm=bn, bn_statistics=bn_statistics, name=staging.name,
                                    **kwargs)
    else:
        pointwise = QuantizeWrapper(pointwise, lc, name=staging.name, input_scale=tensor_scale(
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


def finish_separable(step, staging, mode, flat, final):
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
