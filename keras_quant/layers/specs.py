"""The specs a quantizing layer uses: its config resolved for it, and its rule's weights with their axes.

`layer_config(config, layer)` turns whatever `kq.QuantizeWrapper` accepts as
`config` into the layer's `LayerQuantConfig`; `weight_specs(layer, spec)`
gives each weight the rule quantizes its spec, on the rule's output-channel
axis (`keras_quant.layers.rules`); `integer_accumulator` says whether those
specs let a frozen wrapper run the int8 kernel's arithmetic.
"""

from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec
from keras_quant.errors import ConfigError, UnsupportedLayerError
from keras_quant.layers import integer
from keras_quant.layers.rules import get_rule

__all__ = ["layer_config", "weight_specs", "check_weight_axis", "integer_accumulator"]


def layer_config(config, layer):
    """Resolve `config` to the `LayerQuantConfig` of `layer`."""
    if config is None:
        config = QuantConfig()
    if isinstance(config, dict):
        config = QuantConfig.from_config(config) if "layer_types" in config else LayerQuantConfig(
            weights=_spec_or_none(config.get("weights")), activations=_spec_or_none(config.get("activations"))
        )
    if isinstance(config, QuantConfig):
        resolved = config.for_layer(layer)
        return resolved if resolved is not None else LayerQuantConfig(None, None)
    if isinstance(config, LayerQuantConfig):
        return config
    if isinstance(config, (tuple, list)) and len(config) == 2:
        return LayerQuantConfig(weights=_spec_or_none(config[0]), activations=_spec_or_none(config[1]))
    raise ConfigError(
        "config", config, "expected a kq.QuantConfig, a kq.LayerQuantConfig or a (weights, activations) pair",
        layer=getattr(layer, "name", None),
    )


def _spec_or_none(value):
    if value is None or isinstance(value, QuantSpec):
        return value
    return QuantSpec.from_config(value)


def weight_specs(layer, spec):
    """`{weight_name: spec}` for the weights `layer`'s rule quantizes, axes set from the rule.

    Per-channel and per-group specs get `axis` set to the rule's output-channel
    axis of each weight (e.g. -2 for depthwise kernels); per-tensor specs are
    returned unchanged.

    Args:
        layer: A Keras layer with a rule.
        spec: The weight `QuantSpec`, or None (no weight is quantized).

    Raises:
        UnsupportedLayerError: If the layer type has no rule.
    """
    rule = get_rule(layer)
    if rule is None:
        raise UnsupportedLayerError(
            layer.name, type(layer).__name__, "there is no quantization rule for this layer type; "
            "declare one with kq.layers.register_rule"
        )
    if spec is None:
        return {}
    check_weight_axis(layer, spec)
    return {
        name: spec if spec.granularity == "per_tensor" else spec.replace(axis=axis)
        for name, axis in zip(rule.weights, rule.weight_axes)
    }


def check_weight_axis(layer, spec):
    """Raise `ConfigError` unless `spec.axis` is the output-channel axis of each weight `layer`'s rule quantizes.

    Per-channel and per-group weight scales lie on the output channels (the
    layout TFLite's and ONNX's per-channel kernels take): the default
    `axis=-1` means "the rule's axis" (e.g. -2 for a depthwise kernel); any
    other value must name that axis (either sign, once the weight's rank is
    known), or the spec is refused rather than silently replaced.

    Args:
        layer: A Keras layer with a rule (its weights' ranks are read if it is built).
        spec: The weight `QuantSpec`, or None.

    Raises:
        ConfigError: Naming the layer, the field (`weights.axis`) and the value.

    Example:

    >>> check_weight_axis(dense, kq.QuantSpec(granularity="per_channel", axis=0))  # doctest: +SKIP
    """
    rule = get_rule(layer)
    if rule is None or spec is None or spec.granularity == "per_tensor" or spec.axis == -1:
        return
    for name, axis in zip(rule.weights, rule.weight_axes):
        variable = getattr(layer, name, None) if getattr(layer, "built", False) else None
        rank = len(variable.shape) if hasattr(variable, "shape") else None
        if rank is not None and not -rank <= spec.axis < rank:
            raise ConfigError("weights.axis", spec.axis, f"axis is out of range for '{name}' of rank {rank}",
                              layer=layer.name)
        if spec.axis == axis or (rank is not None and spec.axis % rank == axis % rank):
            continue
        if rank is None and spec.axis >= 0:  # unbuilt: judged once built (`quantize_model` checks the original)
            continue
        raise ConfigError(
            "weights.axis", spec.axis,
            f"{type(layer).__name__} quantizes '{name}' per channel on its output-channel axis {axis}, the layout "
            "TFLite's and ONNX's per-channel kernels take; leave axis=-1 (the rule's axis) or give that axis",
            layer=layer.name,
        )


def integer_accumulator(layer, weight_specs, activations, input_scale, fused_output_scale, batch_norm=None):
    """The accumulator op of a frozen wrapper's integer form (`keras_quant.layers.integer`), or None for the float form.

    It needs the input's scale (`input_scale`, set by `kq.quantize_model`), no
    folded BatchNormalization, symmetric 8-bit weights per tensor or per output
    channel, an 8-bit per-tensor output quantizer (or the `fused_output_scale`
    of one after a fused activation) and a layer `integer.accumulator_op` knows.
    """
    if input_scale is None or batch_norm is not None or set(weight_specs) != {"kernel"}:
        return None
    w, a = weight_specs["kernel"], activations
    if a is None and fused_output_scale is None or a is not None and (a.granularity != "per_tensor" or a.bits > 8):
        return None
    if w.granularity not in ("per_tensor", "per_channel") or not w.symmetric or w.bits > 8 or w.stochastic_rounding:
        return None
    return integer.accumulator_op(layer)
