"""`QuantizeWrapper`: a layer whose weights (and output) are fake-quantized.

The wrapper owns every quantizer variable; the quantizers (`MODES`) hold none.
For each weight its layer rule names (`rules.get_rule`), the wrapper keeps a
`scale` / `zero_point` pair on the rule's output-channel axis. In `call` the
wrapped layer runs inside a `keras.StatelessScope` that maps those weights to
their fake-quantized values, so the wrapped layer's own `call` is used
unchanged and no private attribute is touched. That works in TensorFlow graph
mode (`tf.function`, `model.predict`) and in JAX's jitted, stateless steps:
the scope maps *every* variable of the wrapped layer (the others to their
current value), because a nested scope does not fall back to the outer one.

Example:

>>> import keras, keras_quant as kq
>>> layer = QuantizeWrapper(keras.layers.Dense(10), kq.QuantConfig.int8())
>>> y = layer(x)                    # builds the Dense layer, freezes weight scales
>>> layer.layer                     # the wrapped Dense
"""

import keras

from keras_quant import ops as kq_ops
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec
from keras_quant.errors import ConfigError, UnsupportedLayerError
from keras_quant.layers.fake_quant import FrozenQuantizer, assign_qparams
from keras_quant.layers.rules import get_rule

__all__ = ["QuantizeWrapper", "MODES", "weight_specs"]

# Quantizer class of each wrapper mode. A mode's quantizer has
# `build(layer, shape, name) -> state` and `__call__(x, state, training)`.
MODES = {"frozen": FrozenQuantizer}


def _layer_config(config, layer):
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


@keras.saving.register_keras_serializable(package="keras_quant")
class QuantizeWrapper(keras.layers.Wrapper):
    """Fake-quantizes a layer's weights and, optionally, its output.

    Weight scales are per channel on the rule's axis by default (the config's
    weight spec with `axis` set per weight) and are computed from the weights'
    values when the wrapper is built (`freeze()` recomputes them). The output
    quantizer, if the config quantizes activations, is applied after the
    layer, i.e. after its fused activation; its scale and zero point come from
    calibration (`set_output_qparams`).

    Args:
        layer: The layer to wrap (it must have a rule in `kq.layers.RULES`).
        config: A `kq.QuantConfig` (resolved with `config.for_layer(layer)`),
            a `kq.LayerQuantConfig`, or a `(weights, activations)` pair of
            specs. None means `kq.QuantConfig()` (int8 per-channel weights,
            int8 activations). An `activations` of None means no output quantizer.
        mode: Quantizer mode, a key of `MODES` (`"frozen"`).
        **kwargs: Base layer arguments (`name`, ...).

    Raises:
        ConfigError: For an unknown mode or config.
        UnsupportedLayerError: For a layer type without a rule, or a rule
            weight that is not a variable.

    Example:

    >>> wrapper = QuantizeWrapper(keras.layers.Conv2D(8, 3), kq.QuantConfig.w4a8())
    >>> y = wrapper(x)
    >>> wrapper.set_output_qparams(0.05, -128)
    """

    def __init__(self, layer, config=None, mode="frozen", **kwargs):
        kwargs.setdefault("name", getattr(layer, "name", None))
        super().__init__(layer, **kwargs)
        if mode not in MODES:
            raise ConfigError("mode", mode, f"mode must be one of {tuple(MODES)}", layer=self.name)
        self.mode = mode
        self.quant_config = _layer_config(config, layer)
        self.weight_specs = weight_specs(layer, self.quant_config.weights)
        quantizer = MODES[mode]
        self.weight_quantizers = {name: quantizer(spec) for name, spec in self.weight_specs.items()}
        spec = self.quant_config.activations
        self.output_quantizer = None if spec is None else quantizer(spec)
        self._weight_state = {}
        self._output_state = None
        self.supports_masking = getattr(layer, "supports_masking", False)

    # Build / freeze ------------------------------------------------------
    def _variable(self, name):
        var = getattr(self.layer, name, None)
        if not isinstance(var, keras.Variable):
            raise UnsupportedLayerError(
                self.layer.name, type(self.layer).__name__,
                f"weight '{name}' named by its rule is not a keras.Variable (received {type(var).__name__})",
            )
        return var

    def build(self, input_shape=None):
        super().build(input_shape)
        for name, quantizer in self.weight_quantizers.items():
            var = self._variable(name)
            self._weight_state[name] = quantizer.build(self, tuple(var.shape), name)
        if self.output_quantizer is not None:
            shape = self.layer.compute_output_shape(input_shape) if input_shape is not None else ()
            self._output_state = self.output_quantizer.build(self, shape, "output")
        self.built = True
        self.freeze()

    def freeze(self):
        """Recompute each weight's scale and zero point from its current values (min-max)."""
        for name, state in self._weight_state.items():
            scale, zero_point = kq_ops.tensor_qparams(self._variable(name).value, self.weight_specs[name])
            assign_qparams(state, scale, zero_point, layer=self.name)

    def set_output_qparams(self, scale, zero_point):
        """Set the frozen scale and zero point of the output quantizer.

        Raises:
            ConfigError: If the wrapper has no output quantizer or is not built.
            ShapeMismatchError: If the values' size differs from the variables'.
        """
        if self._output_state is None:
            raise ConfigError(
                "activations", self.quant_config.activations,
                "this wrapper has no (built) output quantizer", layer=self.name,
            )
        assign_qparams(self._output_state, scale, zero_point, layer=self.name)

    @property
    def weight_qparams(self):
        """`{weight_name: (scale, zero_point)}` variables of the weight quantizers."""
        return {name: (s["scale"], s["zero_point"]) for name, s in self._weight_state.items()}

    @property
    def output_qparams(self):
        """`(scale, zero_point)` variables of the output quantizer, or None."""
        s = self._output_state
        return None if s is None else (s["scale"], s["zero_point"])

    # Call ----------------------------------------------------------------
    def quantized_weights(self, training=None):
        """`{weight_name: fake-quantized tensor}` for the quantized weights."""
        return {
            name: quantizer(self._variable(name).value, self._weight_state[name], training)
            for name, quantizer in self.weight_quantizers.items()
        }

    def call(self, inputs, training=None, **kwargs):
        overrides = {id(self._variable(n)): v for n, v in self.quantized_weights(training).items()}
        # Every variable of the wrapped layer is mapped: a nested StatelessScope
        # does not fall back to an outer one (JAX's stateless training step).
        mapping = [(v, overrides.get(id(v), v.value)) for v in self.layer.variables]
        with keras.StatelessScope(state_mapping=mapping):
            outputs = self.layer(inputs, **kwargs)
        if self.output_quantizer is not None:
            outputs = self.output_quantizer(outputs, self._output_state, training)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    # Serialization ---------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        qc = self.quant_config
        config["config"] = {
            "weights": None if qc.weights is None else qc.weights.get_config(),
            "activations": None if qc.activations is None else qc.activations.get_config(),
        }
        config["mode"] = self.mode
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, **config)

    def __repr__(self):
        return f"<QuantizeWrapper name={self.name} layer={type(self.layer).__name__} mode={self.mode}>"

