"""`quantize_model`: a new Keras model with quantizers placed where TFLite quantizes.

Post-training quantization (`mode="ptq"`) rewrites a Functional or Sequential
model's graph (nested models are inlined) in three steps:

1. Flatten: run the graph with Keras' own traversal
   (`Functional._run_through_graph`, as `keras.models.clone_model` does), each
   leaf layer replaced by a clone with the same weights, nested
   Functional/Sequential models run inline. The float model is not touched.
2. Plan, from the layer rules (`kq.layers.RULES`) and the config: each
   compute layer gets a `QuantizeWrapper` (frozen per-channel weight
   quantizers). A BatchNormalization that is the compute layer's only
   consumer is folded into it, and a ReLU/ReLU6 after that is fused (TFLite
   fuses both), so the output quantizer goes after the last layer of that
   chain, with that layer's calibration statistics. Merge, pool, unfolded
   norm and other activation layers, and every float model input, get an
   `ActivationQuantizer` on their output; passthrough layers get nothing.
3. Rebuild: run the flat graph again over new `keras.Input`s, creating the
   planned layers, with activation scales from `calibration.qparams(key, spec)`.

Layers the config sets to None stay float. Layers with no rule stay float and
are listed in `qmodel.quantization_report.unsupported` (with a warning),
unless the config names them explicitly, which raises `UnsupportedLayerError`.

Example:

>>> cb = kq.CalibrationCallback()
>>> model.predict(x_calib, callbacks=[cb])
>>> qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=cb.result)
>>> qmodel.quantization_report.folded
(('bn', 'conv'),)
"""

import collections
import dataclasses
import warnings
from typing import Optional, Tuple

import keras
from keras import tree

from keras_quant.config import LayerQuantConfig, QuantConfig
from keras_quant.errors import ConfigError, NoDataError, UnsupportedLayerError
from keras_quant.layers import walk
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.folding import fold_blocker, fold_into_layer
from keras_quant.layers.rules import get_rule, is_fusable_activation
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = ["quantize_model", "QuantizationReport", "MODES"]

# The modes this module implements.
MODES = ("ptq",)


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` did, attached to the new model as `quantization_report`.

    Attributes:
        wrapped: Names of the `QuantizeWrapper` layers.
        folded: `(batch_norm, into)` name pairs of folded BatchNormalizations.
        activation_quantizers: `(layer, stats_key)`: every activation quantizer
            (an `ActivationQuantizer` layer, or a wrapper's output quantizer)
            and the calibration key its range came from.
        float_layers: Keys of layers the config keeps in float (config None).
        unsupported: Keys of layers with no quantization rule, left in float.
    """

    wrapped: Tuple[str, ...] = ()
    folded: Tuple[Tuple[str, str], ...] = ()
    activation_quantizers: Tuple[Tuple[str, str], ...] = ()
    float_layers: Tuple[str, ...] = ()
    unsupported: Tuple[str, ...] = ()


def _graph_of(model):
    """The Functional graph behind a Functional or built Sequential model, else None."""
    if isinstance(model, keras.Sequential):
        return model._functional
    if isinstance(model, keras.Model) and hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth"):
        return model
    return None


def _clone_unbuilt(layer, name=None):
    config = layer.get_config()
    if name is not None:
        config["name"] = name
    return type(layer).from_config(config)


class _Flat:
    """The model as one flat Functional graph of staging clones, with each clone's key and path."""

    def __init__(self, model, graph):
        self.keys = {id(layer): key for key, layer in walk.layer_keys(model).items()}
        self.paths = {id(layer): path for path, layer in walk.leaf_layers(model)}
        self.input_keys = walk.input_keys(model) or [t.name for t in graph.inputs]
        self._clones = {}  # id(original) -> staging clone
        self.origin = {}  # id(staging clone) -> original
        inputs = [
            keras.Input(batch_shape=t.shape, dtype=t.dtype, name=name) for t, name in zip(graph.inputs, self.input_keys)
        ]
        outputs = self._run(graph, inputs)
        self.model = keras.Model(inputs, outputs, name=model.name)
        self.inputs_struct = getattr(graph, "_inputs_struct", None)
        self.nodes = [
            node
            for depth in sorted(self.model._nodes_by_depth, reverse=True)
            for node in self.model._nodes_by_depth[depth]
            if node.operation is not None and not node.is_input
        ]
        self.consumers = collections.defaultdict(list)
        for node in self.nodes:
            for t in node.input_tensors:
                self.consumers[id(t)].append(node)
        for t in self.model.outputs:
            self.consumers[id(t)].append(None)  # a model output

    def _run(self, graph, inputs):
        return graph._run_through_graph(inputs, call_fn=self._call)

    def _call(self, op, *args, **kwargs):
        sub = _graph_of(op) if isinstance(op, keras.Model) else None
        if sub is not None:  # a nested model: run its graph inline
            inner = args[0] if args else kwargs.get("inputs")
            return self._run(sub, tree.flatten(inner))
        clone = self._clones.get(id(op))
        first = clone is None
        if first:
            key = self.keys.get(id(op), op.name)
            clone = _clone_unbuilt(op, name=key.replace("/", "_") if "/" in key else None)
            self._clones[id(op)] = clone
            self.origin[id(clone)] = op
        outputs = clone(*args, **kwargs)
        if first and op.weights:
            clone.set_weights(op.get_weights())
        return outputs

    def key(self, layer):
        return self.keys.get(id(self.origin[id(layer)]), layer.name)

    def path(self, layer):
        return self.paths.get(id(self.origin[id(layer)]))

    def sole_consumer(self, layer):
        """The one layer that consumes `layer`'s only output, if there is exactly one and neither is shared."""
        if len(layer._inbound_nodes) != 1 or len(layer._inbound_nodes[0].outputs) != 1:
            return None
        users = self.consumers[id(layer._inbound_nodes[0].outputs[0])]
        if len(users) != 1 or users[0] is None or len(users[0].operation._inbound_nodes) != 1:
            return None
        return users[0].operation


@dataclasses.dataclass
class _Step:
    """What the rebuilt graph does at one layer of the flat graph."""

    kind: str  # "clone", "wrap", "folded" (a BatchNormalization folded away) or "input"
    layer_config: Optional[LayerQuantConfig] = None  # "wrap": the wrapper's specs
    fold: object = None  # "wrap": the BatchNormalization folded into the layer
    quant_spec: object = None  # spec of the activation quantizer after the layer
    quant_key: Optional[str] = None  # calibration key of that quantizer's range
    quant_what: str = ""  # description for error messages
    qparams: tuple = None
    layer: object = None  # the layer built for the new model
    quantizer: object = None


def _plan(flat, config):
    plan, report = {}, collections.defaultdict(list)

    def cfg(layer):
        return config.for_layer(flat.origin[id(layer)], flat.path(layer))

    def quantized_output(step, layer, spec, what):
        if spec is not None:
            step.quant_spec, step.quant_key, step.quant_what = spec, flat.key(layer), what
        return step

    for node in flat.nodes:
        layer = node.operation
        if id(layer) in plan:
            continue
        original, key = flat.origin[id(layer)], flat.key(layer)
        rule, lc = get_rule(original), cfg(layer)
        if rule is None:
            if config.names_layer(original, flat.path(layer)):
                raise UnsupportedLayerError(
                    key, type(original).__name__, "the config names it, but there is no quantization rule for "
                    "this layer type; declare one with kq.layers.register_rule or set its config to None",
                )
            report["unsupported"].append(key)
            plan[id(layer)] = _Step("clone")
        elif lc is None:
            report["float_layers"].append(key)
            plan[id(layer)] = _Step("clone")
        elif rule.kind == "compute":
            _plan_compute(flat, layer, lc, cfg, plan, report, quantized_output)
        elif rule.kind == "passthrough":
            plan[id(layer)] = _Step("clone")
        else:  # activation, merge, pool, unfolded norm: requantized output
            plan[id(layer)] = quantized_output(_Step("clone"), layer, lc.activations, f"{rule.kind} layer output")
    return plan, report


def _plan_compute(flat, layer, lc, cfg, plan, report, quantized_output):
    """Plan a compute layer and the BatchNormalization / activation TFLite fuses into it."""
    chain, nxt = [layer], flat.sole_consumer(layer)
    if isinstance(nxt, keras.layers.BatchNormalization) and cfg(nxt) is not None and fold_blocker(layer, nxt) is None:
        chain.append(nxt)
        nxt = flat.sole_consumer(nxt)
    own_activation = getattr(getattr(layer, "activation", None), "__name__", "linear")
    rule = get_rule(nxt) if nxt is not None else None
    if (
        rule is not None and rule.kind == "activation" and is_fusable_activation(nxt)
        and cfg(nxt) is not None and own_activation == "linear"
    ):
        chain.append(nxt)
    bn = chain[1] if len(chain) > 1 and isinstance(chain[1], keras.layers.BatchNormalization) else None
    last = chain[-1]
    what = "output quantizer after " + "+".join(flat.key(x) for x in chain)
    step = _Step("wrap", fold=bn)
    if bn is not None:
        plan[id(bn)] = _Step("folded")
        report["folded"].append((flat.key(bn), flat.key(layer)))
    if last is layer or last is bn:  # the wrapper's own output quantizer
        spec = cfg(last).activations
        quantized_output(step, last, spec, what)
    else:  # a fused activation layer: the quantizer goes after it
        spec = None
        plan[id(last)] = quantized_output(_Step("clone"), last, cfg(last).activations, what)
    step.layer_config = LayerQuantConfig(weights=lc.weights, activations=spec)
    plan[id(layer)] = step


def _fetch_qparams(steps, calibration):
    """Look up every activation quantizer's scale and zero point before anything is built."""
    requests = [s for s in steps if s.quant_spec is not None]
    if requests and calibration is None:
        raise ConfigError(
            "calibration", None,
            f"the config quantizes activations (first: '{requests[0].quant_key}'), so quantize_model needs a "
            "kq.CalibrationResult; calibrate first with kq.CalibrationCallback, or use a weights-only config "
            "(activations=None)",
        )
    for step in requests:
        key = step.quant_key
        if key not in calibration:
            raise NoDataError(
                key, reason=f"quantize_model needs activation statistics for layer '{key}' ({step.quant_what}), "
                "and the calibration result has none for it", layer=key,
            )
        try:
            step.qparams = calibration.qparams(key, step.quant_spec)
        except NoDataError as e:
            raise NoDataError(
                key, reason=f"quantize_model needs activation statistics for layer '{key}' ({step.quant_what}): {e}",
                layer=key,
            ) from e


class _Names:
    """Unique layer names: `base`, else `base_1`, `base_2`, ..."""

    def __init__(self, taken):
        self.taken = set(taken)

    def __call__(self, base):
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _build_step(step, staging):
    """Create the new model's layer for one planned step (not yet built)."""
    if step.kind == "wrap":
        inner = fold_into_layer(staging, step.fold) if step.fold is not None else _clone_unbuilt(staging)
        if step.layer_config.weights is None and step.layer_config.activations is None:
            return inner
        return QuantizeWrapper(inner, step.layer_config, name=staging.name)
    return _clone_unbuilt(staging)


def _finish_step(step, staging):
    """Copy weights into a freshly built layer, freeze weight scales, set the output range."""
    layer = step.layer
    inner = layer.layer if isinstance(layer, QuantizeWrapper) else layer
    if step.fold is None and staging.weights:
        inner.set_weights(staging.get_weights())
    if isinstance(layer, QuantizeWrapper):
        layer.freeze()
        if layer.output_quantizer is not None:
            layer.set_output_qparams(*step.qparams)


def _input_steps(flat, config):
    steps = []
    for t, key in zip(flat.model.inputs, flat.input_keys):
        spec = config.for_layer(key)
        spec = None if spec is None or "float" not in str(t.dtype) else spec.activations
        steps.append(_Step("input", quant_spec=spec, quant_key=key, quant_what="model input"))
    return steps


def activation_points(model, config=None):
    """The calibration keys whose statistics `quantize_model` reads, with their specs.

    These are the places activation quantizers go (model inputs, after fused
    activations, after merges and average pooling); a calibration restricted
    to them (`CalibrationCallback(statistics="range")`) is all the PTQ model
    needs.

    Args:
        model: A Functional or Sequential model.
        config: A `kq.QuantConfig` (default `QuantConfig()`).

    Returns:
        `{key: QuantSpec}` in graph order, or None for a model whose graph
        `quantize_model` cannot rewrite (subclassed, unbuilt).
    """
    config = QuantConfig() if config is None else config
    graph = _graph_of(model)
    if graph is None:
        return None
    flat = _Flat(model, graph)
    plan, _ = _plan(flat, config)
    steps = _input_steps(flat, config) + list(plan.values())
    return {s.quant_key: s.quant_spec for s in steps if s.quant_spec is not None and s.quant_key is not None}


def quantize_model(model, config=None, calibration=None, mode="ptq"):
    """A new Keras model with fake-quantized weights and activations (post-training).

    Args:
        model: A Functional or Sequential Keras model (nested ones are
            inlined). It is not modified.
        config: A `kq.QuantConfig`; None means `kq.QuantConfig()` (W8A8:
            int8 per-channel symmetric weights, int8 per-tensor activations).
        calibration: A `kq.CalibrationResult` (anything with
            `qparams(key, spec)` and `key in calibration`), needed when the
            config quantizes activations.
        mode: `"ptq"`: frozen quantizers with scales from the weights and the
            calibration statistics.

    Returns:
        A new `keras.Model` with the float model's input names, shapes and
        dtypes, and a `quantization_report` attribute (`QuantizationReport`).

    Raises:
        ConfigError: For an unknown mode or config, a subclassed or unbuilt
            model, or missing calibration when activations are quantized.
        UnsupportedLayerError: For a rule-less layer the config names explicitly.
        NoDataError: When the calibration has no statistics for a layer that
            needs an activation quantizer (the message names the layer).

    Example:

    >>> qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=result)
    >>> qmodel.save("model_int8.keras")
    """
    if mode not in MODES:
        raise ConfigError("mode", mode, f"mode must be one of {MODES}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError("config", config, "expected a kq.QuantConfig or None")
    graph = _graph_of(model)
    if graph is None:
        reason = (
            "the Sequential model is not built; give it a keras.Input or call build() first"
            if isinstance(model, keras.Sequential)
            else "quantize_model rewrites the graph of Functional and Sequential models only; wrap the "
            f"layers of this subclassed {type(model).__name__} in kq.QuantizeWrapper yourself"
        )
        raise ConfigError("model", getattr(model, "name", model), reason)

    flat = _Flat(model, graph)
    plan, report = _plan(flat, config)
    input_steps = _input_steps(flat, config)
    _fetch_qparams(input_steps + list(plan.values()), calibration)

    names = _Names(layer.name for layer in flat.model.layers)
    quantizers = []

    def add_quantizer(step, x, base):
        if step.quant_spec is None:
            return x
        if step.quantizer is None:
            step.quantizer = ActivationQuantizer(step.quant_spec, *step.qparams, name=names(f"{base}_quant"))
            quantizers.append((step.quantizer.name, step.quant_key))
        return step.quantizer(x)

    new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in flat.model.inputs]
    quantized_inputs = [add_quantizer(s, x, s.quant_key) for s, x in zip(input_steps, new_inputs)]

    def call_fn(staging, *args, **kwargs):
        step = plan[id(staging)]
        if step.kind == "folded":
            return args[0]
        first = step.layer is None
        if first:
            step.layer = _build_step(step, staging)
        outputs = step.layer(*args, **kwargs)
        if first:
            _finish_step(step, staging)
            if isinstance(step.layer, QuantizeWrapper) and step.quant_spec is not None:
                quantizers.append((step.layer.name, step.quant_key))
        if step.kind == "wrap":
            return outputs
        return add_quantizer(step, outputs, staging.name)

    outputs = flat.model._run_through_graph(quantized_inputs, call_fn=call_fn)
    inputs = new_inputs
    if flat.inputs_struct is not None:
        inputs = tree.pack_sequence_as(flat.inputs_struct, new_inputs)
    qmodel = keras.Model(inputs, outputs, name=model.name)
    if getattr(model, "compiled", False):
        qmodel.compile_from_config(model.get_compile_config())

    wrapped = tuple(s.layer.name for s in plan.values() if isinstance(s.layer, QuantizeWrapper))
    qmodel.quantization_report = QuantizationReport(
        wrapped=wrapped,
        folded=tuple(report["folded"]),
        activation_quantizers=tuple(quantizers),
        float_layers=tuple(report["float_layers"]),
        unsupported=tuple(report["unsupported"]),
    )
    if report["unsupported"]:
        warnings.warn(
            f"quantize_model: no quantization rule for layer(s) {report['unsupported']}; they stay in float "
            "(see qmodel.quantization_report.unsupported, or declare rules with kq.layers.register_rule)",
            stacklevel=2,
        )
    return qmodel
