"""Quantization-aware training: moving quantizers between modes, the scheduler, subclassed models.

`kq.quantize_model(model, config, mode="qat")` builds the trainable model;
this module steers it. Every QAT quantizer layer (a `QuantizeWrapper` or an
`ActivationQuantizer` in `"qat"` mode) keeps its own step counter and mode
thresholds as variables, so a mode change is a variable write: it takes
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

import inspect
import warnings

import keras

from keras_quant.config import LayerQuantConfig, QuantConfig
from keras_quant.errors import ConfigError, NoDataError
from keras_quant.layers import walk
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.qat_quantizer import default_observe_steps
from keras_quant.layers.rules import get_rule
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = ["QATScheduler", "set_mode", "freeze_batch_norm", "modes", "quantizer_layers", "quantize_subclassed"]


def quantizer_layers(model):
    """The QAT quantizer layers of `model` (wrappers and activation quantizers in `"qat"` mode), in order."""
    found = []
    for _, layer in walk.leaf_layers(model):
        if isinstance(layer, (QuantizeWrapper, ActivationQuantizer)) and layer.mode == "qat" and layer.built:
            found.append(layer)
    return found


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
        layer.set_mode(mode)


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


# Subclassed models ---------------------------------------------------------------------
def _input_shape(layer):
    shape = (layer.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise ConfigError("layer", layer.name, "the layer is not built; call the model on data before quantize_model",
                          layer=layer.name)
    return shape


def _replace(owner, old, new, setter):
    """Swap a tracked sublayer of `owner` for `new` (Keras tracks sublayers in `owner._tracker`)."""
    setter(new)
    tracker = getattr(owner, "_tracker", None)
    if tracker is not None:
        tracker.untrack(old)
        if not tracker.is_in_store("layers", new):
            tracker.track(new)


class _SubclassedWrapping:
    def __init__(self, config, calibration, observe_steps, keys):
        self.config, self.calibration, self.observe_steps = config, calibration, observe_steps
        self.keys = keys  # id(original leaf layer) -> calibration key
        self.wrapped, self.float_layers, self.unsupported = [], [], []

    def wrap(self, layer, original):
        rule = get_rule(layer)
        if rule is None:
            if not layer._layers:
                self.unsupported.append(layer.name)
            return None
        lc = self.config.for_layer(layer)
        if lc is None:
            self.float_layers.append(layer.name)
            return None
        if rule.kind != "compute":
            return None
        lc = LayerQuantConfig(weights=lc.weights, activations=lc.activations)
        wrapper = QuantizeWrapper(layer, lc, mode="qat", observe_steps=self.observe_steps, name=layer.name)
        wrapper.build(_input_shape(layer))
        if wrapper.output_quantizer is not None and self.calibration is not None:
            key = self.keys.get(id(original), layer.name)
            if key not in self.calibration:
                raise NoDataError(key, reason=f"quantize_model needs activation statistics for layer '{key}' "
                                  "(its output quantizer), and the calibration result has none for it", layer=key)
            wrapper.set_output_qparams(*self.calibration.qparams(key, lc.activations))
        self.wrapped.append(wrapper.name)
        return wrapper

    def visit(self, owner, original):
        """Wrap the compute layers held by `owner`'s attributes (and lists of them), recursively."""
        for name, value in list(vars(owner).items()):
            if name.startswith("_"):
                continue
            orig_value = getattr(original, name, None)
            if isinstance(value, keras.layers.Layer):
                self._visit_one(owner, value, orig_value, lambda new, n=name: setattr(owner, n, new))
            elif isinstance(value, (list, tuple)) and not isinstance(value, tuple):
                for i, item in enumerate(list(value)):
                    if isinstance(item, keras.layers.Layer):
                        orig_item = orig_value[i] if isinstance(orig_value, list) and i < len(orig_value) else None
                        self._visit_one(owner, item, orig_item, lambda new, i=i, lst=value: list.__setitem__(lst, i, new))

    def _visit_one(self, owner, layer, original, setter):
        if isinstance(layer, (QuantizeWrapper, ActivationQuantizer)):
            return
        if layer._layers and not isinstance(layer, keras.layers.Wrapper):  # a container: recurse
            self.visit(layer, original)
            return
        wrapper = self.wrap(layer, original)
        if wrapper is not None:
            _replace(owner, layer, wrapper, setter)


def quantize_subclassed(model, config=None, calibration=None, observe_steps=None):
    """A QAT copy of a subclassed model: its compute layers wrapped in `QuantizeWrapper`s.

    The model is copied with `type(model).from_config(model.get_config())`,
    built with its build config and given its weights; then every compute
    layer held in an attribute (or a list attribute) of the model or of its
    sublayers is replaced by a `"qat"` wrapper, which quantizes its weights and
    output. A subclassed model has no graph to read, so BatchNormalization is
    not folded and merges are not requantized (use a Functional model for
    those). `kq.quantize_model(model, config, mode="qat")` calls this.

    Raises:
        ConfigError: If the model cannot be copied or is not built.
        NoDataError: When a given calibration lacks a wrapped layer's statistics.
    """
    from keras_quant.quantize import QuantizationReport

    config = QuantConfig() if config is None else config
    if "training" not in inspect.signature(model.call).parameters:
        warnings.warn(
            f"quantize_model: {type(model).__name__}.call has no `training` argument, so Keras does not tell its "
            "layers whether they train, and the QAT quantizers (like BatchNormalization) act as in inference: "
            "ranges are not observed. Add `training=None` to call() and pass it to the layers.", stacklevel=3,
        )
    build_config = model.get_build_config() if model.built else None
    if not build_config:
        raise ConfigError("model", model.name, "the subclassed model is not built; call it on data first")
    try:
        clone = type(model).from_config(model.get_config())
        clone.build_from_config(build_config)
        clone.set_weights(model.get_weights())
    except Exception as e:  # noqa: BLE001  (any failure of the user's class is reported the same way)
        raise ConfigError(
            "model", model.name, "a subclassed model is copied with type(model).from_config(model.get_config()) "
            f"and its build config before its layers are wrapped, and that failed: {type(e).__name__}: {e}",
        ) from e
    if calibration is not None:
        observe_steps = default_observe_steps(observe_steps, (config.weights, config.activations), True)
    keys = {id(layer): key for key, layer in walk.layer_keys(model).items()}
    wrapping = _SubclassedWrapping(config, calibration, observe_steps, keys)
    wrapping.visit(clone, model)
    clone.quantization_report = QuantizationReport(
        wrapped=tuple(wrapping.wrapped), float_layers=tuple(wrapping.float_layers),
        unsupported=tuple(wrapping.unsupported),
    )
    return clone
