"""`QuantizeWrapper`: a layer whose weights (and output) are fake-quantized.

Two stages (`QUANTIZERS`; the constructor's `mode` argument): `"qat"` (the
default) trains: `QATQuantizer`s observe,
learn (LSQ) or freeze their ranges per the wrapper's `Schedule`, and a
BatchNormalization given as `batch_norm` is folded into the weights as in
Jacob et al. 2018. `"frozen"` is the post-training model: `FrozenQuantizer`s
with fixed scales.

The wrapper owns every quantizer variable; the quantizers hold none.
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
from keras import ops

from keras_quant import ops as kq_ops
from keras_quant.errors import ConfigError, UnsupportedLayerError
from keras_quant.layers import folding, inference, integer, qat_quantizer as qat
from keras_quant.layers.fake_quant import FrozenQuantizer, assign_qparams
from keras_quant.layers.folding import bn_axes, fold_blocker, fold_rule, scale_channels
from keras_quant.layers.specs import integer_accumulator, layer_config, weight_specs
from keras_quant.layers.rules import activation_function, fixed_output_qparams, split_activation, without_activation

__all__ = ["QuantizeWrapper", "QUANTIZERS", "weight_specs"]

# Quantizer class of each wrapper stage (`qat_quantizer.STAGES`). A stage's quantizer has
# `build(layer, shape, name) -> state`, `__call__(x, state, training, observing=, frozen=, seed=)`
# and `qparams(state)`.
QUANTIZERS = {"qat": qat.QATQuantizer, "frozen": FrozenQuantizer}
# Where a folded BatchNormalization's batch statistics come from in QAT training.
BN_STATISTICS = ("quantized", "float")


@keras.saving.register_keras_serializable(package="keras_quant")
class QuantizeWrapper(keras.layers.Wrapper):
    """Fake-quantizes a layer's weights and, optionally, its output.

    Weight scales are per channel on the rule's axis by default (the config's
    weight spec with `axis` set per weight). The output quantizer, if the
    config quantizes activations, is applied after the layer, i.e. after its
    fused activation.

    In the `"qat"` stage each quantizer observes, learns (LSQ, for `learnable`
    specs) or is frozen, per the wrapper's schedule (`set_range_mode`,
    `kq.qat.QATScheduler`): weight ranges follow the weights until frozen;
    the output range is a moving average of batch ranges (or set from a
    calibration with `set_output_qparams`). In the `"frozen"` stage weight scales
    are computed when the wrapper is built (`observe_weights()` recomputes
    them) and the output range is set from calibration.

    With `batch_norm`, the BatchNormalization that follows the layer is folded
    into it (Jacob et al. 2018, section 3.2): the quantizer sees
    `kernel * gamma / sigma_moving`, the bias is
    `beta + (bias - mean) * gamma / sigma`, and in training (until
    `freeze_batch_norm`) the output is normalised with batch statistics: it
    is corrected by `sigma_moving / sigma_batch`, the bias uses the batch
    mean, and the moving statistics are updated. The batch statistics come
    from the quantized output divided by the fold factor (`bn_statistics=
    "quantized"`, one pass, as PyTorch's fused ConvBn QAT modules do) or from
    an extra float pass of the layer (`"float"`, the paper's graph; a second
    convolution per step). At inference the wrapper computes exactly the
    folded layer that export writes.

    A layer whose own activation is a softmax, sigmoid or tanh (run by TFLite
    as its own op) is quantized before it too, and its output, in either stage,
    by a frozen quantizer on TFLite's fixed grid for that function
    (`kq.layers.rules.FIXED_GRIDS`, `fixed_output`): the integer op writes that
    grid whatever the data, so QAT neither observes nor learns it.

    Args:
        layer: The layer to wrap (it must have a rule in `kq.layers.RULES`,
            a `quantization_rule()` method, or a `kq.register_rule` entry).
        config: A `kq.QuantConfig` (resolved with `config.for_layer(layer)`),
            a `kq.LayerQuantConfig`, or a `(weights, activations)` pair of
            specs. None means `kq.QuantConfig()` (int8 per-channel weights,
            int8 activations). An `activations` of None means no output quantizer.
        mode: The wrapper's stage (`keras_quant.layers.qat_quantizer.STAGES`),
            read back as `stage`: `"qat"` (default: trainable ranges) or
            `"frozen"` (post-training). The argument and the saved config
            keep the name `mode`. The default differs from
            `ActivationQuantizer`'s (`"frozen"`) on purpose: a wrapper used
            directly is for QAT (`kq.QuantizeWrapper(layer, config)`), and
            each default is what saved configs without the key were written with.
        batch_norm: A BatchNormalization applied to the layer's output, to fold.
        observe_steps: QAT: training steps the ranges are observed before
            learnable quantizers learn. Default: until changed, or
            `LSQ_OBSERVE_STEPS` when a spec is learnable.
        momentum: QAT: momentum of the moving-average output range.
        seed: Seed of the stochastic rounding of weights.
        bn_statistics: Source of a folded BatchNormalization's batch
            statistics in training: `"quantized"` (default) or `"float"`.
        **kwargs: Base layer arguments (`name`, ...).

    Raises:
        ConfigError: For an unknown stage or config, a BatchNormalization that
            cannot be folded into the layer, or stochastic rounding together
            with a learnable weight spec.
        UnsupportedLayerError: For a layer type without a rule, or a rule
            weight that is not a variable.

    Example:

    >>> wrapper = QuantizeWrapper(keras.layers.Conv2D(8, 3), kq.QuantConfig.w4a8())
    >>> y = wrapper(x, training=True)        # observes the output range
    >>> wrapper.set_range_mode("frozen")
    """

    def __init__(self, layer, config=None, mode="qat", batch_norm=None, observe_steps=None, momentum=0.99,
                 seed=None, bn_statistics="quantized", activation=None, input_scale=None, fused_output_scale=None,
                 **kwargs):
        kwargs.setdefault("name", getattr(layer, "name", None))
        super().__init__(layer, **kwargs)
        if mode not in QUANTIZERS:
            raise ConfigError("mode", mode, f"mode must be one of {tuple(QUANTIZERS)}", layer=self.name)
        self.stage = mode
        if (input_scale is not None or fused_output_scale is not None) and mode != "frozen":
            raise ConfigError("input_scale", input_scale, "input and fused output scales (integer arithmetic) are "
                              "for frozen wrappers; a QAT wrapper trains through the float form", layer=self.name)
        self.input_scale = None if input_scale is None else integer.check_scale(input_scale, "input_scale", self.name)
        self.fused_output_scale = (None if fused_output_scale is None
                                   else integer.check_scale(fused_output_scale, "fused_output_scale", self.name))
        self.quant_config = layer_config(config, layer)
        self.weight_specs = weight_specs(layer, self.quant_config.weights)
        self.batch_norm = batch_norm
        if bn_statistics not in BN_STATISTICS:
            raise ConfigError("bn_statistics", bn_statistics, f"bn_statistics must be one of {BN_STATISTICS}",
                              layer=self.name)
        self.bn_statistics = bn_statistics
        self._fold = None
        if batch_norm is not None:
            reason = fold_blocker(layer, batch_norm)
            if reason:
                raise ConfigError("batch_norm", batch_norm.name, f"cannot fold it into {layer.name}: {reason}",
                                  layer=self.name)
            self._fold = fold_rule(layer)
        specs = list(self.weight_specs.values()) + [self.quant_config.activations]
        if any(s is not None and s.learnable and s.stochastic_rounding for s in self.weight_specs.values()):
            raise ConfigError("stochastic_rounding", True, "stochastic rounding applies to weights with fixed "
                              "ranges; it cannot be combined with learnable=True", layer=self.name)
        self.observe_steps = qat.default_observe_steps(observe_steps, specs, initialized=False)
        self.momentum = momentum
        self.seed = seed
        quantizer = QUANTIZERS[mode]
        kw = {"momentum": momentum} if mode == "qat" else {}
        self.weight_quantizers = {
            name: quantizer(spec, **({"role": "weight"} if mode == "qat" else {})) for name, spec in self.weight_specs.items()
        }
        spec = self.quant_config.activations
        # A softmax / sigmoid / tanh / ... the layer applies itself: TFLite runs it as its own op on a
        # quantized input, so the wrapper quantizes the layer's output before it too.
        if activation is not None:
            self.activation = keras.activations.get(activation)
        else:
            self.activation = split_activation(layer) if spec is not None else None
            if self.activation is not None:
                layer.activation = keras.activations.linear  # the wrapped layer computes the pre-activation
        self.preactivation_quantizer = None if self.activation is None else quantizer(spec, **kw)
        # TFLite's integer softmax / logistic / tanh write a fixed output grid: a frozen quantizer on that
        # grid in either stage (QAT neither observes nor learns it).
        self.fixed_output = None
        if self.activation is not None:
            self.fixed_output = fixed_output_qparams(activation_function(self.activation), spec)
        if spec is None:
            self.output_quantizer = None
        else:
            self.output_quantizer = FrozenQuantizer(spec) if self.fixed_output is not None else quantizer(spec, **kw)
        self.seed_generator = (
            keras.random.SeedGenerator(seed)
            if any(s.stochastic_rounding for s in self.weight_specs.values()) else None
        )
        self.schedule = None
        self._integer_op = None  # set in build where the frozen form runs the integer arithmetic
        self._fused_scale = None
        self._weight_state = {}
        self._output_state = None
        self._preact_state = None
        self.supports_masking = getattr(layer, "supports_masking", False)

    @property
    def mode(self):
        """The stage under its constructor's and saved config's name (`stage`)."""
        return self.stage

    # Build -------------------------------------------------------------------
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
        if self.batch_norm is not None:
            out_shape = self.layer.compute_output_shape(input_shape)
            # The constructor could not judge a non-negative axis without the rank (an unbuilt Dense).
            reason = fold_blocker(self.layer, self.batch_norm, rank=len(out_shape))
            if reason:
                raise ConfigError("batch_norm", self.batch_norm.name,
                                  f"cannot fold it into {self.layer.name}: {reason}", layer=self.name)
            if not self.batch_norm.built:
                if isinstance(self.batch_norm.axis, (list, tuple)):  # Keras 3's build indexes with an int
                    self.batch_norm.axis = bn_axes(self.batch_norm)[0]
                self.batch_norm.build(out_shape)
        if self.stage == "qat":
            self.schedule = qat.Schedule(self, self.observe_steps, batch_norm=self.batch_norm is not None)
        # Frozen: the weight ranges are known now, and the variables are created holding them.
        initial = self._numpy_weight_qparams() if self.stage == "frozen" else None
        for name, quantizer in self.weight_quantizers.items():
            var = self._variable(name)
            kwargs = {} if initial is None else {"initial": initial[name]}
            self._weight_state[name] = quantizer.build(self, tuple(var.shape), name, **kwargs)
        if self.output_quantizer is not None:
            shape = self.layer.compute_output_shape(input_shape) if input_shape is not None else ()
            if self.fixed_output is not None:  # TFLite's fixed grid, frozen in either stage
                self._output_state = self.output_quantizer.build(self, shape, "output", initial=self.fixed_output)
            else:
                self._output_state = self.output_quantizer.build(self, shape, "output")
        if self.preactivation_quantizer is not None:
            self._preact_state = self.preactivation_quantizer.build(self, shape, "preactivation")
        self._integer_op = integer_accumulator(self.layer, self.weight_specs, self.quant_config.activations,
                                              self.input_scale, self.fused_output_scale, self.batch_norm)
        self._fused_scale = None
        if self._integer_op is not None and self.quant_config.activations is None:
            # A variable, not a constant: graph optimizers turn a division by a constant into a multiplication
            # by its reciprocal, which rounds the requantization multiplier differently from the kernel's.
            self._fused_scale = self.add_weight(
                name="fused_output_scale", shape=(), trainable=False, dtype="float32", autocast=False,
                initializer=keras.initializers.Constant(self.fused_output_scale),
            )
        self.built = True
        if initial is None:
            self.observe_weights()

    def _numpy_weight_qparams(self):
        """`{weight_name: (scale, zero_point)}` of the current (float) weights computed in numpy, or None when
        the weights are not concrete now (a traced build)."""
        concrete = inference.concrete_values(self.float_weights())
        if concrete is None:
            return None
        return {name: kq_ops.numpy_weight_qparams(concrete[name], spec) for name, spec in self.weight_specs.items()}

    def observe_weights(self):
        """Set each weight quantizer's range from the weights' current (folded) values.

        Min-max, or for a weight spec with `observer="mse"` / `"auto"` the
        clipped range of least quantization error (`kq.ops.weight_range`).
        """
        numpy_qparams = self._numpy_weight_qparams() if self.stage == "frozen" else None
        values = self.float_weights() if numpy_qparams is None else None
        for name, state in self._weight_state.items():
            if numpy_qparams is not None:  # the same ranges, computed in numpy (no eager op per reduction)
                scale, zero_point = numpy_qparams[name]
            else:
                scale, zero_point = kq_ops.weight_qparams(values[name], self.weight_specs[name])
            self._set_range(self.weight_quantizers[name], state, scale, zero_point)

    def _set_range(self, quantizer, state, scale, zero_point):
        assign_qparams(state, scale, zero_point, layer=self.name)  # checks the sizes
        if hasattr(quantizer, "set_range"):
            quantizer.set_range(state, scale, zero_point)

    def set_output_qparams(self, scale, zero_point):
        """Set the output quantizer's range (a QAT quantizer's moving range starts from it).

        Raises:
            ConfigError: If the wrapper has no output quantizer or is not built.
            ShapeMismatchError: If the values' size differs from the variables'.
        """
        if self._output_state is None:
            raise ConfigError(
                "activations", self.quant_config.activations,
                "this wrapper has no (built) output quantizer", layer=self.name,
            )
        self._set_range(self.output_quantizer, self._output_state, scale, zero_point)

    def set_preactivation_qparams(self, scale, zero_point):
        """Set the range of the quantizer before the layer's own activation (see `preactivation_qparams`).

        Raises:
            ConfigError: If the wrapper applies no activation of its own or is not built.
        """
        if self._preact_state is None:
            raise ConfigError("activation", None, "this wrapper has no (built) quantizer before an activation "
                              "of its own", layer=self.name)
        self._set_range(self.preactivation_quantizer, self._preact_state, scale, zero_point)

    @property
    def preactivation_qparams(self):
        """`(scale, zero_point)` before the layer's own softmax / sigmoid / ... activation, or None."""
        s = self._preact_state
        return None if s is None else self.preactivation_quantizer.qparams(s)

    # Integer arithmetic ------------------------------------------------------------
    def _integer_sums(self, inputs):
        """`(acc, s_in, channel_scales)`: the int32 kernel's sums with its bias, and their real scale's factors."""
        layer = self.layer
        s_in = ops.convert_to_tensor(self.input_scale, "float32")
        x_int = ops.round(ops.divide(ops.cast(inputs, "float32"), s_in))
        spec, state = self.weight_specs["kernel"], self._weight_state["kernel"]
        w = self._quantize_weights(self.float_weights(), False)["kernel"]
        scale, zero_point = self.weight_quantizers["kernel"].qparams(state)
        zeros = ops.zeros(ops.shape(zero_point))  # weights are symmetric; zeros_like needs a tensor on JAX
        w_scales = kq_ops.dequantize(ops.ones(ops.shape(w), "float32"), scale, zeros, spec)
        w_int = ops.where(w_scales > 0, ops.round(ops.divide(w, ops.where(w_scales > 0, w_scales, 1.0))), 0.0)
        acc = self._integer_op(x_int, w_int)
        channel_scales = integer.output_channel_scales(layer, w_scales)
        if getattr(layer, "use_bias", False):
            acc = ops.add(acc, integer.bias_integers(layer.bias, s_in, channel_scales))
        return acc, s_in, channel_scales

    def _integer_call(self, inputs):
        """The frozen layer as the int8 kernel computes it: exact integer sums, int32 bias, fp32 requantization.

        Returns the dequantized output of the quantizer after the layer (before
        the wrapper's own activation, if any), with the layer's fused activation
        applied to it; the quantizers that follow find it on their grid.
        """
        layer = self.layer
        dtype = inputs.dtype
        acc, s_in, channel_scales = self._integer_sums(inputs)
        if self.quant_config.activations is None:  # the quantizer after a fused activation layer sets the grid
            s_out = self._fused_scale
        else:
            quantizer, out_state = ((self.preactivation_quantizer, self._preact_state)
                                    if self.activation is not None else (self.output_quantizer, self._output_state))
            s_out = quantizer.qparams(out_state)[0]
        s_out = ops.cast(s_out, "float32")
        q = integer.requantize(acc, ops.divide(ops.multiply(s_in, channel_scales), s_out))
        y = ops.cast(ops.multiply(q, s_out), dtype)
        activation = getattr(layer, "activation", None)
        return y if activation is None else activation(y)

    def _integer_activation(self, inputs, kind):
        """The wrapper's own sigmoid / swish / hard swish on the pre-activation grid, as the int8 kernels compute it."""
        s_pre, zp_pre = self.preactivation_quantizer.qparams(self._preact_state)
        s_pre = ops.cast(s_pre, "float32")
        s_out = ops.cast(self.output_quantizer.qparams(self._output_state)[0], "float32")
        x_int = ops.round(ops.divide(ops.cast(inputs, "float32"), s_pre))
        q = integer.activation_integers(kind, x_int, (s_pre, zp_pre), s_out)
        return ops.cast(ops.multiply(q, s_out), inputs.dtype)

    # Modes ---------------------------------------------------------------------
    def _require_schedule(self, what):
        if self.schedule is None:
            raise ConfigError("mode", self.stage, f"{what} needs a built wrapper in 'qat' mode", layer=self.name)
        return self.schedule

    def set_range_mode(self, range_mode):
        """Move every quantizer of the wrapper to a range mode now: `"observe"`, `"learn"` or `"frozen"`."""
        self._require_schedule("set_mode").set_range_mode(range_mode)

    @property
    def range_mode(self):
        """The quantizers' current range mode (`"frozen"` for a wrapper in the frozen stage)."""
        return "frozen" if self.schedule is None else self.schedule.range_mode

    def freeze_batch_norm(self):
        """Stop using batch statistics (and updating the moving ones) from the next training step."""
        if self.batch_norm is None:
            raise ConfigError("batch_norm", None, "this wrapper folds no BatchNormalization", layer=self.name)
        self._require_schedule("freeze_batch_norm").set(freeze_bn=0)

    def _flags(self):
        return self.schedule.flags() if self.schedule is not None else (True, False)

    # Qparams -------------------------------------------------------------------
    @property
    def weight_qparams(self):
        """`{weight_name: (scale, zero_point)}` of the weight quantizers, as the integer model uses them.

        A QAT weight range that follows its weights (fixed spec, not frozen) is
        computed from the current values, not the last training step's.
        """
        following = self.schedule is not None and self.schedule.range_mode != "frozen"
        values = self.float_weights() if following else {}
        out = {}
        for name, state in self._weight_state.items():
            if following and not self.weight_specs[name].learnable:
                out[name] = kq_ops.weight_qparams(values[name], self.weight_specs[name])
            else:
                out[name] = self.weight_quantizers[name].qparams(state)
        return out

    @property
    def output_qparams(self):
        """`(scale, zero_point)` of the output quantizer, or None."""
        s = self._output_state
        return None if s is None else self.output_quantizer.qparams(s)

    # Folding -------------------------------------------------------------------
    def folded_weights(self):
        """`(kernel_name, folded kernel, folded bias)` of a wrapper that folds a BatchNormalization.

        These are the float weights of the single layer the integer model runs
        (inference form, moving statistics).
        """
        if self.batch_norm is None:
            raise ConfigError("batch_norm", None, "this wrapper folds no BatchNormalization", layer=self.name)
        name, axes = self._fold
        factor, bias = folding.fold_terms(self.layer, self.batch_norm, *folding.moving_statistics(self.batch_norm))
        return name, scale_channels(ops.cast(self._variable(name).value, "float32"), factor, axes), bias

    def float_weights(self):
        """`{weight_name: float tensor}` the weight quantizers see (the folded kernel with a BatchNormalization)."""
        values = {name: self._variable(name).value for name in self.weight_specs}
        if self.batch_norm is not None:
            name, kernel, _ = self.folded_weights()
            if name in values:
                values[name] = kernel
        return values

    # Call ----------------------------------------------------------------------
    def _quantize_weights(self, values, training, flags=None):
        observing, frozen = self._flags() if flags is None else flags
        return {
            name: quantizer(values[name], self._weight_state[name], training, observing=observing, frozen=frozen,
                            seed=self.seed_generator)
            for name, quantizer in self.weight_quantizers.items()
        }

    def quantized_weights(self, training=None):
        """`{weight_name: fake-quantized tensor}` for the quantized weights."""
        return self._quantize_weights(self.float_weights(), training)

    def inference_weights(self, quantize=True):
        """The weights the integer model runs with, read now as numpy arrays.

        Args:
            quantize: Values on the quantization grid (True) or the float
                (folded) values.

        Returns:
            `(weights, folded_bias)`: `weights` maps each overridden weight
            name to a float32 array (the quantized weights; with a folded
            BatchNormalization also the folded kernel and a zero `"bias"`),
            and `folded_bias` is the bias added after the layer when a
            BatchNormalization is folded, else None.
        """
        return inference.inference_weights(self, quantize)

    def run_with_weights(self, inputs, overrides, kwargs=None):
        """The wrapped layer's call with some of its variables (`{weight name: tensor}`) replaced by tensors."""
        overrides = {id(self._variable(n)): v for n, v in overrides.items()}
        # Every variable of the wrapped layer is mapped: a nested StatelessScope
        # does not fall back to an outer one (JAX's stateless training step). A replaced variable is
        # not read (in export's trace a read embeds its value as a constant the graph never uses).
        mapping = [(v, overrides[id(v)] if id(v) in overrides else v.value) for v in self.layer.variables]
        with keras.StatelessScope(state_mapping=mapping):
            return self.layer(inputs, **(kwargs or {}))

    def linear_output(self, inputs):
        """The frozen layer's output before any activation and output quantizer: the tensor its bias shifts.

        Inference only: with the integer form, the int32 sums with the int32
        bias, in real units, before requantization; else the layer with its
        quantized weights (a folded BatchNormalization included) and no
        activation. Post-training algorithms compare it with the float layer's
        (`kq.ptq.correct_bias`).
        """
        if self._integer_op is not None:
            acc, s_in, channel_scales = self._integer_sums(inputs)
            return ops.cast(ops.multiply(acc, ops.multiply(s_in, channel_scales)), inputs.dtype)
        with without_activation(self.layer):
            if self.batch_norm is not None:
                return self._call_folded(inputs, False, {}, self._flags())
            return self.run_with_weights(inputs, self._quantize_weights(self.float_weights(), False), {})

    def _call_folded(self, inputs, training, kwargs, flags):
        """The layer with its BatchNormalization folded in: moving statistics, or in QAT training the batch's."""
        bn = self.batch_norm
        name, axes = self._fold
        mean, var = folding.moving_statistics(bn)
        factor, bias = folding.fold_terms(self.layer, bn, mean, var)
        batch = training and self.schedule is not None
        if batch:
            bn_frozen = self.schedule.bn_frozen()
            if self.bn_statistics == "float":  # Jacob et al.: batch statistics from a float pass
                if bn.synchronized:  # the cross-replica all-reduce cannot run inside a cond branch
                    b_mean, b_var = folding.batch_moments(self.layer(inputs, **kwargs), bn)
                    b_mean, b_var = ops.where(bn_frozen, mean, b_mean), ops.where(bn_frozen, var, b_var)
                else:  # skip the float pass once the statistics are frozen
                    b_mean, b_var = ops.cond(bn_frozen, lambda: (mean, var),
                                             lambda: folding.batch_moments(self.layer(inputs, **kwargs), bn))
        values = {n: self._variable(n).value for n in self.weight_specs}
        values[name] = scale_channels(ops.cast(self._variable(name).value, "float32"), factor, axes)
        overrides = self._quantize_weights(values, training, flags) if self.weight_specs else {}
        overrides.setdefault(name, values[name])
        if getattr(self.layer, "use_bias", False):
            overrides["bias"] = ops.zeros_like(self.layer.bias.value)
        y = self.run_with_weights(inputs, overrides, kwargs)
        if not batch:
            return ops.add(y, ops.cast(bias, y.dtype))
        if self.bn_statistics == "quantized":  # one pass: from the quantized output
            b_mean, b_var = folding.statistics_from_folded_output(y, factor, self.layer, bn)
            b_mean, b_var = ops.where(bn_frozen, mean, b_mean), ops.where(bn_frozen, var, b_var)
        return folding.train_batch_norm(y, self.layer, bn, (mean, var), (b_mean, b_var), bn_frozen)

    def _inference_call(self, inputs, plan, kwargs):
        """The traced inference form (`kq.layers.inference`): constant weights, constant-range output."""
        import tensorflow as tf

        values = plan.weights[id(self)]
        if inference.flattens(self.layer, inputs):
            outputs = inference.flat_dense(self.layer, inputs, values, plan.folded_bias.get(id(self)))
        else:
            outputs = self.run_with_weights(inputs, {n: tf.constant(v) for n, v in values.items()}, kwargs)
            if id(self) in plan.folded_bias:
                outputs = ops.add(outputs, tf.constant(plan.folded_bias[id(self)], dtype=outputs.dtype))
        if self.activation is not None:
            outputs = self.activation(inference.quantize_output(self, outputs, plan, inference.PREACTIVATION))
        return inference.quantize_output(self, outputs, plan)

    def call(self, inputs, training=None, **kwargs):
        plan = inference.active_plan()
        if plan is not None and id(self) in plan.weights:
            return self._inference_call(inputs, plan, kwargs)
        training = bool(training)
        flags = self._flags()  # read once: weights and output see the same step's range mode
        if not training and self._integer_op is not None:
            outputs = self._integer_call(inputs)
        elif self.batch_norm is not None:
            outputs = self._call_folded(inputs, training, kwargs, flags)
        else:
            outputs = self.run_with_weights(inputs, self._quantize_weights(self.float_weights(), training, flags), kwargs)
        observing, frozen = flags
        if self.activation is not None:
            outputs = self.preactivation_quantizer(outputs, self._preact_state, training, observing=observing,
                                                   frozen=frozen)
            kind = getattr(self.activation, "__name__", None)
            if not training and self._integer_op is not None and kind in integer.INTEGER_ACTIVATIONS:
                outputs = self._integer_activation(outputs, kind)  # LOGISTIC (and MUL) or HARD_SWISH, as the file runs
            else:
                outputs = self.activation(outputs)
        if self.output_quantizer is not None:
            outputs = self.output_quantizer(outputs, self._output_state, training, observing=observing, frozen=frozen)
        if training and self.schedule is not None:
            self.schedule.advance()
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    # Serialization -----------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        qc = self.quant_config
        config["config"] = {
            "weights": None if qc.weights is None else qc.weights.get_config(),
            "activations": None if qc.activations is None else qc.activations.get_config(),
        }
        config.update(mode=self.stage, observe_steps=self.observe_steps, momentum=self.momentum, seed=self.seed,
                      bn_statistics=self.bn_statistics)
        if self.input_scale is not None:
            config["input_scale"] = self.input_scale
        if self.fused_output_scale is not None:
            config["fused_output_scale"] = self.fused_output_scale
        if self.activation is not None:
            config["activation"] = keras.activations.serialize(self.activation)
        if self.batch_norm is not None:
            config["batch_norm"] = keras.saving.serialize_keras_object(self.batch_norm)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        if config.get("batch_norm") is not None:
            config["batch_norm"] = keras.saving.deserialize_keras_object(config["batch_norm"],
                                                                         custom_objects=custom_objects)
        return cls(layer, **config)

    def __repr__(self):
        return f"<QuantizeWrapper name={self.name} layer={type(self.layer).__name__} mode={self.stage}>"

