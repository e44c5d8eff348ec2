"""Quantization-aware training: moving quantizers between range modes, the scheduler, subclassed models.

`kq.quantize_model(model, config, mode="qat")` builds the trainable model;
this module steers it. Every QAT quantizer layer (a `QuantizeWrapper` or an
`ActivationQuantizer` in the `"qat"` stage) keeps its own step counter and
range-mode thresholds as variables, so a range-mode change is a variable write: it takes
effect at the next step of an already compiled `fit`, on TensorFlow (also
with `jit_compile=True`) and JAX, and is saved with the model.

- `set_mode(model, "observe" | "learn" | "frozen")` and
  `freeze_batch_norm(model)` act now.
- `QATScheduler(observe_steps=..., freeze_bn_step=..., freeze_step=...)`
  is a Keras callback that sets the thresholds when training starts; the
  switches then happen inside the training step at exactly those steps.

Example:

>>> qat = kq.quantize_model(model, kq.QuantConfig.int8(), mode="qat")
>>> qat.compile("adam", "sparse_categorical_crossentropy")
>>> qat.fit(x, y, epochs=3, callbacks=[kq.qat.QATScheduler(freeze_bn_step=500, freeze_step=1000)])
>>> kq.qat.modes(qat)
{'conv': 'frozen', ...}
"""

import keras

from keras_quant.errors import ConfigError
from keras_quant.layers import walk

__all__ = ["QATScheduler", "set_mode", "freeze_batch_norm", "modes", "quantizer_layers"]


def quantizer_layers(model):
    """The built QAT quantizer layers of `model` (wrappers and activation quantizers in the `"qat"` stage), in
    order: `keras_quant.layers.walk.quantizer_layers(model, stage="qat")`."""
    return walk.quantizer_layers(model, stage="qat")


def _sync_jax_state(model):
    """Inside a JAX `fit`, write the trainer's state back to the variables before changing them."""
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()


def _targets(model, layers):
    found = quantizer_layers(model)
    if not found:
        raise ConfigError("model", getattr(model, "name", model), "the model has no QAT quantizers; build it with "
                          "kq.quantize_model(model, config, mode='qat') or kq.QuantizeWrapper")
    if layers is None:
        return found
    names = {layers} if isinstance(layers, str) else set(layers)
    chosen = [q for q in found if q.name in names]
    missing = names - {q.name for q in chosen}
    if missing:
        raise ConfigError("layers", sorted(missing), "no QAT quantizer layer has these names")
    return chosen


def set_mode(model, mode, layers=None):
    """Move quantizers to a range mode from the next training step.

    Args:
        model: A model with QAT quantizers.
        mode: `"observe"` (ranges follow the data), `"learn"` (LSQ: learnable
            specs train their step size; the others keep their range) or
            `"frozen"` (ranges fixed, rounded to the integer grid).
        layers: Names of the quantizer layers to change (default: all).

    Raises:
        ConfigError: For an unknown mode, a model without QAT quantizers, or
            names that match no quantizer layer.
    """
    targets = _targets(model, layers)
    _sync_jax_state(model)
    for layer in targets:
        layer.set_range_mode(mode)


def freeze_batch_norm(model, layers=None):
    """Folded BatchNormalizations use their moving statistics from the next training step on."""
    targets = [q for q in _targets(model, layers) if getattr(q, "batch_norm", None) is not None]
    _sync_jax_state(model)
    for layer in targets:
        layer.freeze_batch_norm()


def modes(model):
    """`{layer_name: range mode}` of every QAT quantizer layer."""
    return {q.name: q.range_mode for q in quantizer_layers(model)}


class QATScheduler(keras.callbacks.Callback):
    """Moves QAT quantizers between modes at given training steps.

    When training starts it writes, into every quantizer layer, the step at
    which observation ends, BatchNormalization statistics freeze and ranges
    freeze, counted from that moment; the training step then switches modes
    itself at exactly those steps (no retracing, any backend, `jit_compile`).

    Args:
        observe_steps: Observe ranges for this many steps, then learnable
            quantizers learn (LSQ) and the others keep their range. None
            leaves the current setting.
        freeze_bn_step: Step at which folded BatchNormalizations stop using
            batch statistics (Jacob et al. 2018 freeze them late in training).
        freeze_step: Step at which every range freezes.

    Raises:
        ConfigError: For a negative or non-integer step.

    Example:

    >>> qat.fit(x, y, epochs=5, callbacks=[QATScheduler(observe_steps=100, freeze_bn_step=2000)])
    """

    def __init__(self, observe_steps=None, freeze_bn_step=None, freeze_step=None):
        super().__init__()
        for field, value in (("observe_steps", observe_steps), ("freeze_bn_step", freeze_bn_step),
                             ("freeze_step", freeze_step)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(field, value, f"{field} must be a non-negative int or None")
        self.observe_steps = observe_steps
        self.freeze_bn_step = freeze_bn_step
        self.freeze_step = freeze_step

    def on_train_begin(self, logs=None):
        targets = _targets(self.model, None)
        _sync_jax_state(self.model)
        for layer in targets:
            schedule = layer.schedule
            schedule.set(observe=self.observe_steps, freeze=self.freeze_step, freeze_bn=self.freeze_bn_step)
