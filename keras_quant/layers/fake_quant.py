"""Frozen fake-quantizers: the quantizer (no state) and the activation layer.

A quantizer holds no variables: `FrozenQuantizer.build(layer, shape, name)`
creates the `scale` / `zero_point` variables on the layer that owns them and
returns them as a dict, and `quantizer(x, state)` fake-quantizes `x` with that
state. `QuantizeWrapper` owns the weight and output quantizer state of a
wrapped layer; `ActivationQuantizer` is the standalone layer placed after model
inputs, merges, pools and fused activations.

Both are frozen: the variables are non-trainable, set once from weights
(`QuantizeWrapper.freeze`) or calibration statistics (`set_qparams`).

Example:

>>> import numpy as np, keras_quant as kq
>>> from keras_quant.layers import ActivationQuantizer
>>> q = ActivationQuantizer(kq.QuantSpec(bits=8), scale=0.1, zero_point=-128)
>>> y = q(np.array([0.0, 0.26, 100.0], "float32"))   # [0.0, 0.3, 25.5]
"""

import keras
from keras import ops
import numpy as np

from keras_quant import graph as graph_lib, ops as kq_ops
from keras_quant.config import QuantSpec, as_spec as _spec
from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.layers import inference, qat_quantizer as qat

__all__ = ["FrozenQuantizer", "ActivationQuantizer", "assign_qparams"]


def assign_qparams(state, scale, zero_point, layer=None):
    """Write `(scale, zero_point)` into a quantizer's state, checking shapes.

    Args:
        state: The dict returned by `FrozenQuantizer.build`.
        scale: Scale, scalar or array of the variable's shape.
        zero_point: Integer zero point, same shape.
        layer: Layer name for error messages.

    Raises:
        ShapeMismatchError: When a value's size differs from the variable's.
    """
    for field, value in (("scale", scale), ("zero_point", zero_point)):
        var = state[field]
        var.assign(_qparam_array(field, value, tuple(var.shape), layer))


def _qparam_array(field, value, want, layer):
    """`value` as a float32 array of shape `want`, or ShapeMismatchError when its size differs."""
    value = np.asarray(ops.convert_to_numpy(value), dtype="float32")
    if value.size != int(np.prod(want)):
        raise ShapeMismatchError(field, want, value.shape, layer=layer)
    return value.reshape(want)


class FrozenQuantizer:
    """Fake-quantizer with a fixed scale and zero point; it holds no variables.

    Args:
        spec: The `kq.QuantSpec`.

    Example:

    >>> quantizer = FrozenQuantizer(kq.QuantSpec(bits=8))
    >>> state = quantizer.build(layer, (None, 16), "output")   # layer.add_weight(...)
    >>> y = quantizer(x, state)
    """

    trainable = False

    def __init__(self, spec):
        self.spec = _spec(spec)

    def build(self, layer, shape, name, initial=None):
        """Create this quantizer's variables on `layer`.

        Args:
            layer: The Keras layer that owns the state.
            shape: Shape of the tensor this quantizer sees (for per-channel sizes).
            name: Prefix of the variable names (`"kernel"`, `"output"`); empty
                for plain `scale` / `zero_point`.
            initial: Optional `(scale, zero_point)` the variables are created
                with (as `assign_qparams` would write them), instead of 1 and 0.

        Returns:
            `{"scale": Variable, "zero_point": Variable}` (float32, non-trainable).

        Raises:
            ShapeMismatchError: When an initial value's size differs from the variable's.
        """
        pshape = kq_ops.param_shape(shape, self.spec)
        prefix = f"{name}_" if name else ""
        inits = {"scale": "ones", "zero_point": "zeros"}
        if initial is not None:  # created with their values: no fill, no assignment after
            for field, value in zip(("scale", "zero_point"), initial):
                inits[field] = graph_lib.ValueInitializer(_qparam_array(field, value, tuple(pshape), getattr(layer, "name", None)))
        return {
            "scale": layer.add_weight(
                name=f"{prefix}scale", shape=pshape, initializer=inits["scale"], trainable=self.trainable,
                dtype="float32", autocast=False,
            ),
            "zero_point": layer.add_weight(
                name=f"{prefix}zero_point", shape=pshape, initializer=inits["zero_point"], trainable=False,
                dtype="float32", autocast=False,
            ),
        }

    def __call__(self, x, state, training=None, **flags):
        """Fake-quantize `x` with the state's scale and zero point (mode flags are ignored)."""
        return kq_ops.fake_quant(x, state["scale"], state["zero_point"], self.spec)

    def qparams(self, state):
        """`(scale, zero_point)` variables."""
        return state["scale"], state["zero_point"]


@keras.saving.register_keras_serializable(package="keras_quant")
class ActivationQuantizer(keras.layers.Layer):
    """An activation fake-quantizer layer: frozen (post-training) or trainable (QAT).

    In the `"frozen"` stage it holds non-trainable `scale` and `zero_point`
    variables (float32; shape `()` per tensor, `(C,)` per channel on
    `spec.axis`) set from calibration, and returns
    `kq.ops.fake_quant(x, scale, zero_point, spec)`. In the `"qat"` stage it
    uses a `keras_quant.layers.qat_quantizer.QATQuantizer`: the range is a moving average of batch
    ranges (from the calibration, if set, else from the first batch), learned
    with LSQ for a `learnable` spec, or frozen, per its schedule.

    One quantizer can be shared by several tensors (`slots`), e.g. the inputs
    of a residual Add or a Concatenate, which integer kernels want on one
    scale: the layer is called once per tensor with `slot=i`, each slot keeps
    its own moving range, and all use the union.

    Args:
        spec: The `kq.QuantSpec` (per tensor or per channel). Defaults to int8
            asymmetric per tensor.
        scale: Optional initial scale, written when the layer is built.
        zero_point: Optional initial zero point, written when the layer is built.
        mode: The layer's stage (`keras_quant.layers.qat_quantizer.STAGES`):
            `"frozen"` (default) or `"qat"`; read back as `stage`. The default
            differs from `QuantizeWrapper`'s (`"qat"`) and stays so: a frozen
            quantizer's saved config has no `mode` key, so files written
            before would load in the other stage.
        slots: Number of tensors sharing this quantizer (QAT stage).
        observe_steps: QAT: training steps to observe before learning
            (default: until changed; `LSQ_OBSERVE_STEPS` for a learnable spec
            with no initial range, 0 with one).
        momentum: QAT: momentum of the moving-average range.
        input_scale: Frozen stage: the scale of the int8 grid the input already
            lies on (a max pool or reshape of a quantized tensor). The layer then
            requantizes as LiteRT's int8 QUANTIZE op does
            (`kq.layers.integer.convert`), not in float.
        **kwargs: Base layer arguments (`name`, ...).

    Raises:
        ConfigError: For a per-group spec (activations have no fixed group
            layout), an unknown stage, or slots below 1.

    Example:

    >>> q = ActivationQuantizer(kq.QuantSpec(bits=8), scale=0.02, zero_point=-128, name="relu_quant")
    >>> y = q(x)
    """

    def __init__(self, spec=None, scale=None, zero_point=None, mode="frozen", slots=None, observe_steps=None,
                 momentum=0.99, input_scale=None, **kwargs):
        super().__init__(**kwargs)
        self.spec = _spec(spec, layer=self.name)
        if input_scale is not None:
            from keras_quant.layers.integer import check_scale

            if mode != "frozen" or self.spec.granularity != "per_tensor" or self.spec.bits > 8:
                raise ConfigError("input_scale", input_scale, "an input scale (integer requantization) is for frozen "
                                  "per-tensor quantizers of at most 8 bits", layer=self.name)
            input_scale = check_scale(input_scale, "input_scale", self.name)
        self.input_scale = input_scale
        if self.spec.granularity == "per_group":
            raise ConfigError(
                "granularity", self.spec.granularity,
                "activation quantizers support per_tensor and per_channel specs", layer=self.name,
            )
        if mode not in qat.STAGES:
            raise ConfigError("mode", mode, "mode must be 'frozen' or 'qat'", layer=self.name)
        if slots is not None and (not isinstance(slots, int) or slots < 1 or mode != "qat"):
            raise ConfigError("slots", slots, "slots must be a positive int, in 'qat' mode", layer=self.name)
        self.supports_masking = True
        self.stage, self.slots, self.momentum = mode, slots, momentum
        self._initial = None if scale is None else (scale, 0 if zero_point is None else zero_point)
        self.observe_steps = qat.default_observe_steps(observe_steps, [self.spec], self._initial is not None)
        if mode == "qat":
            self.quantizer = qat.QATQuantizer(self.spec, momentum=momentum)
        else:
            self.quantizer = FrozenQuantizer(self.spec)
        self.schedule = None
        self._state = None

    @property
    def mode(self):
        """The stage under its constructor's and saved config's name (`stage`)."""
        return self.stage

    def build(self, input_shape):
        if self.stage == "qat":
            self.schedule = qat.Schedule(self, self.observe_steps)
            self._state = self.quantizer.build(self, input_shape, "", slots=self.slots)
            if self._initial is not None:
                self.set_qparams(*self._initial)
        else:  # created with the initial scale and zero point, if any
            self._state = self.quantizer.build(self, input_shape, "", initial=self._initial)
        self.built = True

    @property
    def scale(self):
        """The scale variable."""
        return self._state["scale"]

    @property
    def zero_point(self):
        """The zero-point variable (float32 holding an integer)."""
        return self._state["zero_point"]

    @property
    def qparams(self):
        """`(scale, zero_point)` as the integer model uses them (a learned range included)."""
        return self.quantizer.qparams(self._state)

    def set_qparams(self, scale, zero_point):
        """Set the scale and zero point (QAT: the moving range starts from them)."""
        if self._state is None:
            self._initial = (scale, zero_point)
            return
        assign_qparams(self._state, scale, zero_point, layer=self.name)
        if self.stage == "qat":
            self.quantizer.set_range(self._state, scale, zero_point)

    def set_range_mode(self, range_mode):
        """QAT: move to a range mode now: `"observe"`, `"learn"` or `"frozen"`."""
        if self.schedule is None:
            raise ConfigError("mode", self.stage, "set_mode needs a built quantizer in 'qat' mode", layer=self.name)
        self.schedule.set_range_mode(range_mode)

    @property
    def range_mode(self):
        """The current range mode (`"frozen"` in the frozen stage)."""
        return "frozen" if self.schedule is None else self.schedule.range_mode

    def call(self, inputs, slot=None, training=None):
        plan = inference.active_plan()
        if plan is not None:  # the traced inference form (kq.layers.inference)
            return inference.quantize_output(self, inputs, plan)
        if self.schedule is None:
            if self.input_scale is not None and not training:  # an int8 tensor moved to this grid (QUANTIZE)
                from keras_quant.layers.integer import convert

                inputs = convert(inputs, self.input_scale, self._state["scale"])
            return self.quantizer(inputs, self._state)
        training = bool(training)
        observing, frozen = self.schedule.flags()
        outputs = self.quantizer(inputs, self._state, training, observing=observing, frozen=frozen, slot=slot)
        if training and (slot is None or slot == self.slots - 1):
            self.schedule.advance()
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["spec"] = self.spec.get_config()
        if self.input_scale is not None:
            config["input_scale"] = self.input_scale
        if self.stage == "qat":  # saved under its constructor's name, `mode`
            config.update(mode=self.stage, slots=self.slots, observe_steps=self.observe_steps, momentum=self.momentum)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["spec"] = QuantSpec.from_config(config.get("spec", {}))
        return cls(**config)
