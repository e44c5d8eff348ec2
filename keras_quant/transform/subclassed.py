"""QAT for subclassed models: no graph to rewrite, so their compute layers are wrapped in place.

`kq.quantize_model(model, config, mode="qat")` calls `quantize_subclassed`
for a built subclassed model.
"""

import inspect
import warnings

import keras

from keras_quant import graph as graph_lib
from keras_quant.config import LayerQuantConfig, QuantConfig
from keras_quant.errors import ConfigError, NoDataError
from keras_quant.layers import walk
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.qat_quantizer import default_observe_steps
from keras_quant.layers.rules import get_rule
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.transform.report import QuantizationReport

__all__ = ["quantize_subclassed"]


def _input_shape(layer):
    shape = (layer.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise ConfigError("layer", layer.name, "the layer is not built; call the model on data before quantize_model",
                          layer=layer.name)
    return shape


def _replace(owner, old, new, setter):
    """Swap a tracked sublayer of `owner` for `new`."""
    setter(new)
    graph_lib.untrack(owner, old)
    graph_lib.track(owner, new)


class _SubclassedWrapping:
    def __init__(self, config, calibration, observe_steps, keys):
        self.config, self.calibration, self.observe_steps = config, calibration, observe_steps
        self.keys = keys  # id(original leaf layer) -> calibration key
        self.wrapped, self.float_layers, self.unsupported = [], [], []

    def wrap(self, layer, original):
        rule = get_rule(layer)
        if rule is None:
            if not graph_lib.tracked_layers(layer):
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
        if wrapper.output_quantizer is not None and wrapper.fixed_output is None and self.calibration is not None:
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
        if graph_lib.tracked_layers(layer) and not isinstance(layer, keras.layers.Wrapper):  # a container: recurse
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
