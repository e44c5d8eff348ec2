"""Trainable fake-quantizers for quantization-aware training: observe, learn (LSQ), frozen.

`QATQuantizer` follows the quantizer contract of `FrozenQuantizer` (it holds
no variables; `build(layer, shape, name)` creates them on the layer that owns
them and returns them as a dict) and adds three range modes:

- **observe**: the range follows the data. Activations keep a moving average
  of the batch min / max (the first batch initialises it); weights take the
  min / max of their current values, and every weight, the largest on the
  bound included, gets the straight-through gradient 1. A range given before training (a
  calibration, `set_range`) is widened on the first training batch to cover
  that batch too: a calibration describes the inference-mode model, and a
  folded BatchNormalization normalises training outputs with *batch*
  statistics, which are wider when its moving variance exceeds the batch
  variance. Clipping them would leave the next folded BatchNormalization a
  nearly constant input, whose `1 / sqrt(var + eps)` gain then compounds
  layer after layer (gradients of 1e19 on MobileNetV2, NaN after two Adam
  steps).
- **learn** (specs with `learnable=True`): LSQ / LSQ+ (Esser et al. 2019,
  Bhalgat et al. 2020). The step size is `scale * exp(LOG_STEP_GAIN *
  scale_delta)` (`kq.ops.log_step`; `lsq_param="linear"`: `scale +
  scale_delta`), where `scale` is what observation (or calibration) set, now
  held fixed, and `scale_delta` is the trainable variable (initially 0);
  likewise the offset of an asymmetric spec is `-zero_point * scale +
  OFFSET_GAIN * scale * offset_delta` (`kq.ops.scaled_offset`; linear:
  `+ offset_delta`). The step size receives LSQ's gradient, with the paper's
  scale `1 / sqrt(numel * qmax)`; the log domain makes an Adam step a
  relative change of the step size (`keras_quant.ops.lsq`). Splitting the step size this
  way lets observation hand over to learning inside the compiled training
  step on every backend: JAX's stateless step cannot assign a trainable
  variable, only non-trainable ones.
- **frozen**: the range no longer changes and gets no gradient; a learned
  offset is rounded to an integer zero point, as the integer model needs.

These are *range modes* (`RANGE_MODES`, `Schedule.range_mode`). They are
distinct from the *stage* of a quantizing layer (`STAGES`: `"qat"`, whose
quantizers are `QATQuantizer`s with a schedule, or `"frozen"`, the
post-training model with fixed scales), which the layers' constructors and
saved configs still call `mode`, and from the `mode` of `kq.quantize_model`
(`"ptq"` / `"qat"`) and of the exporters.

Which range mode is active comes from a `Schedule`: non-trainable step counters on
the owning layer, compared with the step at which observation ends and the
step at which ranges freeze. Moving between modes therefore only writes
variables, so it needs no retracing, works under `jit_compile=True`, and is
saved with the model (`kq.qat.set_mode`, `kq.qat.QATScheduler`).

Example:

>>> spec = kq.QuantSpec(bits=4, learnable=True)
>>> quantizer = QATQuantizer(spec)
>>> state = quantizer.build(layer, (None, 16), "output")
>>> y = quantizer(x, state, training=True, observing=True, frozen=False)
"""

import math

import keras
from keras import ops

from keras_quant import ops as kq_ops
from keras_quant.errors import ConfigError
from keras_quant.config import as_spec as _spec

__all__ = [
    "QATQuantizer", "Schedule", "NEVER", "RANGE_MODES", "STAGES", "LSQ_OBSERVE_STEPS", "default_observe_steps",
    "effective_qparams", "learned_step", "learned_offset", "sync_range",
]

# Threshold meaning "not at any step".
NEVER = float("inf")
ROLES = ("activation", "weight")
RANGE_MODES = ("observe", "learn", "frozen")
# The stage of a quantizing layer (its constructor's and saved config's `mode` argument).
STAGES = ("qat", "frozen")
# Steps a learnable quantizer with no calibration observes before it learns.
LSQ_OBSERVE_STEPS = 20
# `seen` of an activation range given by `set_range` (a calibration) that no training batch has
# updated yet: the first batch takes the union with it (see the module docstring). Counts then
# go on from 1, so `seen > 0` still means "has a range".
GIVEN = 0.5


def default_observe_steps(observe_steps, specs, initialized):
    """The observe steps a quantizing layer uses when `observe_steps` is None.

    Learnable specs learn from the first step when their range was
    initialised (a calibration or a given scale), else after
    `LSQ_OBSERVE_STEPS`; without a learnable spec, observation lasts until
    changed (None). An explicit `observe_steps` is returned unchanged.
    """
    if observe_steps is not None or not any(s is not None and s.learnable for s in specs):
        return observe_steps
    return 0 if initialized else LSQ_OBSERVE_STEPS


def sync_range(lo, hi):
    """Min and max over all replicas under `tf.distribute` (identity elsewhere).

    Each replica sees a shard of the batch; the observed range must be that of
    the whole batch, so every replica writes the same state.
    """
    if keras.backend.backend() != "tensorflow":
        return lo, hi
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return lo, hi
    both = ctx.all_gather(tf.stack([lo, hi])[None], axis=0)
    return tf.reduce_min(both[:, 0], axis=0), tf.reduce_max(both[:, 1], axis=0)


def _state_weight(layer, name, shape, value, trainable=False, dtype="float32"):
    # float32 whatever the layer's policy: autocast=False keeps a mixed_float16 layer from
    # reading the state as float16.
    return layer.add_weight(
        name=name, shape=shape, initializer=keras.initializers.Constant(value), trainable=trainable, dtype=dtype,
        aggregation="mean" if trainable else "only_first_replica", autocast=False,
    )


class Schedule:
    """Step counter and range-mode thresholds of one quantizing layer (non-trainable variables).

    `step` counts the layer's training calls. Quantizers observe while
    `step < observe_until` and are frozen once `step >= freeze_at`; a folded
    BatchNormalization stops using batch statistics once `step >= bn_freeze_at`.
    Counts are float32 (exact up to 2**24 steps) so that they live on any device.

    Args:
        layer: The layer that owns the variables.
        observe_steps: Steps to observe from the start (`None`: until changed).
        batch_norm: Whether to create the BatchNormalization threshold.
    """

    def __init__(self, layer, observe_steps=None, batch_norm=False):
        if observe_steps is not None and (
            isinstance(observe_steps, bool) or not isinstance(observe_steps, (int, float)) or observe_steps < 0
        ):
            raise ConfigError("observe_steps", observe_steps, "observe_steps must be a non-negative number or None",
                              layer=getattr(layer, "name", None))
        self.step = _state_weight(layer, "qat_step", (), 0.0)
        self.observe_until = _state_weight(layer, "observe_until", (), NEVER if observe_steps is None else observe_steps)
        self.freeze_at = _state_weight(layer, "freeze_at", (), NEVER)
        self.bn_freeze_at = _state_weight(layer, "bn_freeze_at", (), NEVER) if batch_norm else None

    def flags(self):
        """`(observing, frozen)` boolean tensors for the current step."""
        step = ops.convert_to_tensor(self.step)
        return ops.less(step, self.observe_until), ops.greater_equal(step, self.freeze_at)

    def bn_frozen(self):
        return ops.greater_equal(ops.convert_to_tensor(self.step), self.bn_freeze_at)

    def advance(self):
        self.step.assign(self.step + 1.0)

    def set(self, observe=None, freeze=None, freeze_bn=None):
        """Set thresholds relative to the current step (eagerly, between steps).

        Args:
            observe: Observe for this many more steps (`NEVER`: until changed).
            freeze: Freeze ranges in this many steps.
            freeze_bn: Stop using batch statistics in this many steps.
        """
        now = float(keras.ops.convert_to_numpy(self.step))
        for var, delta in ((self.observe_until, observe), (self.freeze_at, freeze), (self.bn_freeze_at, freeze_bn)):
            if delta is not None and var is not None:
                var.assign(now + float(delta))

    def set_range_mode(self, range_mode):
        """Switch to a range mode now: `"observe"`, `"learn"` or `"frozen"`.

        Raises:
            ConfigError: For another value (field `"mode"`, as `kq.qat.set_mode` names it).
        """
        if range_mode not in RANGE_MODES:
            raise ConfigError("mode", range_mode, f"mode must be one of {RANGE_MODES}")
        if range_mode == "frozen":
            self.set(freeze=0)
        else:
            self.set(observe=NEVER if range_mode == "observe" else 0, freeze=NEVER)

    @property
    def range_mode(self):
        """The current range mode (read eagerly)."""
        step, until, freeze = (float(keras.ops.convert_to_numpy(v)) for v in (self.step, self.observe_until, self.freeze_at))
        return "frozen" if step >= freeze else "observe" if step < until else "learn"

    @property
    def batch_norm_frozen(self):
        """Whether a folded BatchNormalization uses its moving statistics in training now."""
        if self.bn_freeze_at is None:
            return True
        return float(keras.ops.convert_to_numpy(self.step)) >= float(keras.ops.convert_to_numpy(self.bn_freeze_at))


def learned_step(scale, delta, spec):
    """The learned step size from the observed `scale` and the trainable `delta`, per `spec.lsq_param`."""
    delta = ops.convert_to_tensor(delta)
    if spec.lsq_param == "linear":
        return scale + delta
    return kq_ops.log_step(scale, delta)


def learned_offset(scale, delta, spec):
    """The learned change of the offset from the trainable `delta` (in units of `scale` unless linear)."""
    delta = ops.convert_to_tensor(delta)
    if spec.lsq_param == "linear":
        return delta
    return kq_ops.scaled_offset(scale, delta)


def integer_offset(offset, step, spec):
    """`offset` moved onto the integer zero point the integer model uses (`effective_qparams`), straight-through.

    The forward value is `-clip(round(-offset / step)) * step`: training then sees the grid that inference
    and export see (0 exactly representable, as a ReLU output needs), not one shifted by a fraction of a step,
    which the network learns to rely on and loses at inference. The gradients are those of `offset` itself.
    """
    zp = -offset / ops.maximum(step, kq_ops.EPS)
    rounded = ops.clip(kq_ops.round_half_up(zp), float(spec.qmin), float(spec.qmax))
    return offset + ops.stop_gradient(-rounded * step - offset)


def effective_qparams(state, spec):
    """`(scale, zero_point)` of a QAT quantizer's state as the integer model uses them.

    The learned step size `scale + scale_delta` (at least `EPS`) and the
    zero point `round(-offset / scale)` clipped to the grid, where `offset` is
    `-zero_point * scale + offset_delta` (symmetric specs: zero point 0), in
    the spec's `lsq_param` form (`learned_step`, `learned_offset`).
    """
    scale = ops.convert_to_tensor(state["scale"])
    zero_point = ops.convert_to_tensor(state["zero_point"])
    if "scale_delta" not in state:
        return scale, zero_point
    learned = ops.maximum(learned_step(scale, state["scale_delta"], spec), kq_ops.EPS)
    if "offset_delta" not in state:
        return learned, ops.zeros_like(learned)
    offset = -zero_point * scale + learned_offset(scale, state["offset_delta"], spec)
    zp = ops.clip(kq_ops.round_half_up(-offset / learned), float(spec.qmin), float(spec.qmax))
    return learned, zp


class QATQuantizer:
    """Fake-quantizer whose range is observed, learned (LSQ) or frozen; it holds no variables.

    Args:
        spec: The `kq.QuantSpec`; `learnable=True` enables the learn range mode.
        role: `"activation"` (moving-average range over batches) or
            `"weight"` (range of the current values).
        momentum: Moving-average momentum of the activation range.

    Raises:
        ConfigError: For an unknown role or a momentum outside [0, 1).
    """

    trainable = True

    def __init__(self, spec, role="activation", momentum=0.99):
        self.spec = _spec(spec)
        if role not in ROLES:
            raise ConfigError("role", role, f"role must be one of {ROLES}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ConfigError("momentum", momentum, "momentum must be in [0, 1)")
        self.role = role
        self.momentum = float(momentum)

    def build(self, layer, shape, name, slots=None):
        """Create the quantizer's variables on `layer`.

        Args:
            layer: The layer that owns the state.
            shape: Shape of the quantized tensor (for per-channel sizes).
            name: Prefix of the variable names.
            slots: For an activation quantizer shared by several tensors, their
                number; each keeps its own moving range and the union is used.

        Returns:
            A dict of variables: `scale`, `zero_point` (non-trainable, float32),
            for activations `min`, `max`, `seen`, and for learnable specs the
            trainable `scale_delta` (and `offset_delta` when asymmetric).
        """
        spec = self.spec
        pshape = tuple(kq_ops.param_shape(shape, spec))
        p = f"{name}_" if name else ""
        state = {
            "scale": _state_weight(layer, f"{p}scale", pshape, 1.0),
            "zero_point": _state_weight(layer, f"{p}zero_point", pshape, 0.0),
        }
        if self.role == "activation":
            rshape = pshape if slots is None else (int(slots),) + pshape
            state["min"] = _state_weight(layer, f"{p}min", rshape, 0.0)
            state["max"] = _state_weight(layer, f"{p}max", rshape, 0.0)
            state["seen"] = _state_weight(layer, f"{p}seen", () if slots is None else (int(slots),), 0.0)
        if spec.learnable:
            state["scale_delta"] = _state_weight(layer, f"{p}scale_delta", pshape, 0.0, trainable=True)
            if not spec.symmetric:
                state["offset_delta"] = _state_weight(layer, f"{p}offset_delta", pshape, 0.0, trainable=True)
        return state

    # Range ------------------------------------------------------------------
    def _grad_scale(self, x, state):
        """LSQ's gradient scale: elements per step size (per sample for activations)."""
        shape = tuple(x.shape[1:] if self.role == "activation" else x.shape)
        if any(d is None for d in shape):
            return 1.0 / math.sqrt(self.spec.qmax)
        params = max(math.prod(tuple(state["scale"].shape)), 1)
        return kq_ops.lsq_grad_scale(max(math.prod(shape) // params, 1), self.spec)

    def _observed_activation(self, x, state, training, observe, slot):
        """`(scale, zero_point)` from the moving range, updated when training and observing."""
        if not training:
            return ops.convert_to_tensor(state["scale"]), ops.convert_to_tensor(state["zero_point"])
        lo, hi = kq_ops.tensor_range(ops.stop_gradient(ops.cast(x, "float32")), self.spec)
        lo, hi = sync_range(lo, hi)
        mins, maxs, seen = (ops.convert_to_tensor(state[k]) for k in ("min", "max", "seen"))
        old_seen = seen if slot is None else seen[slot]
        old_lo, old_hi = (mins, maxs) if slot is None else (mins[slot], maxs[slot])
        first, given = ops.equal(old_seen, 0.0), ops.equal(old_seen, GIVEN)
        m = self.momentum
        new_lo = ops.where(first, lo, ops.where(given, ops.minimum(old_lo, lo), kq_ops.moving_average(old_lo, lo, m)))
        new_hi = ops.where(first, hi, ops.where(given, ops.maximum(old_hi, hi), kq_ops.moving_average(old_hi, hi, m)))
        new_lo, new_hi = ops.where(observe, new_lo, old_lo), ops.where(observe, new_hi, old_hi)
        counted = ops.floor(seen) + 1.0  # a given range (GIVEN) counts as no batch
        if slot is None:
            new_seen = ops.where(observe, counted, seen)
            lo_all, hi_all = new_lo, new_hi
        else:
            onehot = ops.equal(ops.arange(seen.shape[0]), slot)
            mask = ops.reshape(onehot, (-1,) + (1,) * len(new_lo.shape))
            new_lo, new_hi = ops.where(mask, new_lo[None], mins), ops.where(mask, new_hi[None], maxs)
            new_seen = ops.where(ops.logical_and(onehot, observe), counted, seen)
            # The union of the ranges of the tensors seen so far.
            valid = ops.reshape(ops.greater(new_seen, 0.0), (-1,) + (1,) * (len(new_lo.shape) - 1))
            lo_all = ops.min(ops.where(valid, new_lo, float("inf")), axis=0)
            hi_all = ops.max(ops.where(valid, new_hi, float("-inf")), axis=0)
        state["min"].assign(new_lo)
        state["max"].assign(new_hi)
        state["seen"].assign(new_seen)
        return kq_ops.compute_qparams(lo_all, hi_all, self.spec)

    def _base_qparams(self, x, state, training, observe, slot):
        if self.role == "weight":
            scale, zp = kq_ops.weight_qparams(ops.stop_gradient(ops.cast(x, "float32")), self.spec)
        else:
            scale, zp = self._observed_activation(x, state, training, observe, slot)
        zp = ops.cast(zp, "float32")
        scale = ops.where(observe, scale, ops.convert_to_tensor(state["scale"]))
        zp = ops.where(observe, zp, ops.convert_to_tensor(state["zero_point"]))
        if training:
            state["scale"].assign(scale)
            state["zero_point"].assign(zp)
        return scale, zp

    # Call ---------------------------------------------------------------------
    def __call__(self, x, state, training=None, observing=True, frozen=False, slot=None, seed=None):
        """Fake-quantize `x` in the range mode the flags select.

        Args:
            x: Tensor to quantize.
            state: The dict `build` returned.
            training: Whether this is a training step (activation ranges are
                updated only then; weights always follow their values while
                observing).
            observing: Boolean (tensor): the observe mode.
            frozen: Boolean (tensor): the frozen mode (wins over observing).
            slot: Index of `x` in a shared quantizer (`build(slots=...)`).
            seed: Seed generator for stochastic rounding (training only).
        """
        spec = self.spec
        frozen = ops.convert_to_tensor(frozen)
        observe = ops.logical_and(ops.convert_to_tensor(observing), ops.logical_not(frozen))
        if self.role == "weight" and not spec.learnable:
            observe = ops.logical_not(frozen)  # weights' range follows them until frozen
        scale, zp = self._base_qparams(x, state, training, observe, slot)
        if not spec.learnable:
            fq_spec = spec if training and spec.stochastic_rounding else spec.replace(stochastic_rounding=False)
            y = kq_ops.fake_quant(x, scale, zp, fq_spec, seed=seed if fq_spec.stochastic_rounding else None)
            return self._observed_weight_gradient(x, y, observe)
        learning = ops.logical_not(ops.logical_or(observe, frozen))
        frozen_scale, frozen_zp = effective_qparams(state, spec)
        frozen_scale, frozen_zp = ops.stop_gradient(frozen_scale), ops.stop_gradient(frozen_zp)
        learned = learned_step(scale, state["scale_delta"], spec)
        step = ops.where(frozen, frozen_scale, ops.where(learning, learned, scale))
        offset = None
        if not spec.symmetric:
            moved = ops.where(learning, learned_offset(scale, state["offset_delta"], spec), 0.0)
            offset = ops.where(frozen, -frozen_zp * frozen_scale, integer_offset(-zp * scale + moved, step, spec))
        y = kq_ops.lsq_fake_quant(x, step, offset, spec, grad_scale=self._grad_scale(x, state))
        return self._observed_weight_gradient(x, y, observe)

    def _observed_weight_gradient(self, x, y, observe):
        """`y` with the gradient 1 for every weight while the weights' range is observed from them.

        That range covers every weight, but a channel's largest one lies on its
        bound, and whether the fake-quant's closed-range mask counts it inside
        (`w <= (w / qmax) * qmax`) is decided by float rounding: a change in
        the last bit of the weights (another reduction order: another device
        count, another process count) switched its gradient between 1 and 0,
        a jump of a whole learning-rate step in that weight. The forward value
        is `y` exactly (`x - stop_gradient(x)` is 0).
        """
        if self.role != "weight":
            return y
        return ops.where(observe, ops.stop_gradient(y) + (x - ops.stop_gradient(x)), y)

    def qparams(self, state):
        """`(scale, zero_point)` as the integer model uses them (see `effective_qparams`)."""
        return effective_qparams(state, self.spec)

    def set_range(self, state, scale, zero_point):
        """Initialise the range from `(scale, zero_point)` (e.g. a calibration), for every slot.

        An observing activation quantizer widens it to cover its first
        training batch, then keeps the moving average (module docstring).
        """
        spec = self.spec
        scale = ops.reshape(ops.cast(ops.convert_to_tensor(scale), "float32"), state["scale"].shape)
        zero_point = ops.reshape(ops.cast(ops.convert_to_tensor(zero_point), "float32"), state["zero_point"].shape)
        state["scale"].assign(scale)
        state["zero_point"].assign(zero_point)
        if "min" in state:
            lo = (spec.qmin - zero_point) * scale
            hi = (spec.qmax - zero_point) * scale
            state["min"].assign(ops.broadcast_to(lo, state["min"].shape))
            state["max"].assign(ops.broadcast_to(hi, state["max"].shape))
            state["seen"].assign(ops.full(state["seen"].shape, GIVEN))
        for key in ("scale_delta", "offset_delta"):
            if key in state:
                state[key].assign(ops.zeros(state[key].shape))
