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

__all__ = ["layer_config", "weight_specs", "integer_accumulator"]


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
    return {
        name: spec if spec.granularity == "per_tensor" else spec.replace(axis=axis)
        for name, axis in zip(rule.weights, rule.weight_axes)
    }


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
