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
   As in TFLite: an Add / Subtract / Multiply followed by a ReLU / ReLU6 has
   one quantizer, after the activation (ADD fuses it); an average pool
   keeps its input's range (AVERAGE_POOL_2D has one scale); and a layer kept
   in float whose output feeds the integer graph gets a quantizer there (an
   integer runtime quantizes that tensor, and must not borrow a range). A
   compute layer with its own softmax / sigmoid / tanh / ... activation
   (TFLite runs it as a separate op) is also quantized before it, with the
   statistics the callback keys `"<layer>:preactivation"`.
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
from keras_quant.layers import qat_quantizer, walk
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.folding import fold_blocker, fold_into_layer
from keras_quant.layers.rules import (
    PREACTIVATION, get_rule, is_fusable_activation, preactivation_key, split_activation,
)
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = ["quantize_model", "QuantizationReport", "MODES"]

# The modes this module implements: a frozen post-training model, or a trainable QAT model.
MODES = ("ptq", "qat")
# Merge layers whose inputs share one activation quantizer in a QAT model.
SHARED_INPUT_MERGES = (keras.layers.Add, keras.layers.Concatenate)
# Merge layers TFLite fuses a following ReLU / ReLU6 into (ADD, SUB, MUL have a fused activation).
FUSING_MERGES = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply)


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
        shared: QAT: groups of calibration keys whose tensors share one
            activation quantizer (the inputs of an Add or Concatenate).
    """

    wrapped: Tuple[str, ...] = ()
    folded: Tuple[Tuple[str, str], ...] = ()
    activation_quantizers: Tuple[Tuple[str, str], ...] = ()
    float_layers: Tuple[str, ...] = ()
    unsupported: Tuple[str, ...] = ()
    shared: Tuple[Tuple[str, ...], ...] = ()


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
    slot: Optional[int] = None  # QAT: this step's slot in a shared quantizer
    group: Optional[list] = None  # QAT: the steps sharing one quantizer (merge inputs)
    fused: bool = False  # a merge whose activation TFLite fuses (the quantizer is after the activation)
    preact_key: Optional[str] = None  # "wrap": calibration key before the layer's own softmax / sigmoid / ...
    preact_spec: object = None
    preact_qparams: tuple = None


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
        elif rule.kind == "merge" and isinstance(original, FUSING_MERGES) and _fused_activation(flat, layer, cfg):
            # TFLite's ADD / SUB / MUL fuse a following ReLU / ReLU6: one quantizer, after it.
            act = flat.sole_consumer(layer)
            plan[id(layer)] = _Step("clone", fused=True)
            plan[id(act)] = quantized_output(_Step("clone"), act, cfg(act).activations,
                                             f"output quantizer after {key}+{flat.key(act)}")
        else:  # activation, merge, pool, unfolded norm: requantized output
            plan[id(layer)] = quantized_output(_Step("clone"), layer, lc.activations, f"{rule.kind} layer output")
    _plan_float_boundaries(flat, config, plan, quantized_output)
    _plan_pool_ranges(flat, plan)
    return plan, report


# Pools whose TFLite kernel keeps the input's scale and zero point (AVERAGE_POOL_2D).
SAME_RANGE_POOLS = (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D)


def _plan_pool_ranges(flat, plan):
    """Average pools take their input's range: TFLite's AVERAGE_POOL_2D has one scale for input and output.

    With its own range the file would need a requantize op after every pool.
    """
    for node in flat.nodes:
        layer = node.operation
        step = plan.get(id(layer))
        if step is None or step.quant_spec is None or not isinstance(flat.origin[id(layer)], SAME_RANGE_POOLS):
            continue
        source = _producer(flat, plan, [], node.input_tensors[0]) if len(node.input_tensors) == 1 else None
        if source is not None and source.quant_spec == step.quant_spec and source.quant_key is not None:
            step.quant_key = source.quant_key
            step.quant_what += f" (the range of '{source.quant_key}': TFLite's average pool keeps its input's scale)"


def _feeds_integer_graph(flat, plan, layer, seen=None):
    """Whether `layer`'s output reaches a quantized layer, directly or through passthrough layers."""
    seen = set() if seen is None else seen
    for out in (t for node in layer._inbound_nodes for t in node.outputs):
        for node in flat.consumers[id(out)]:
            if node is None or id(node.operation) in seen:
                continue
            consumer = node.operation
            seen.add(id(consumer))
            step = plan.get(id(consumer))
            if step is None:
                continue
            if step.kind == "wrap" or step.quant_spec is not None or step.fused:
                return True
            rule = get_rule(flat.origin[id(consumer)])
            if step.kind == "clone" and rule is not None and rule.kind == "passthrough":
                if _feeds_integer_graph(flat, plan, consumer, seen):
                    return True
    return False


def _plan_float_boundaries(flat, config, plan, quantized_output):
    """Quantize the output of a float layer where it enters the integer graph.

    A layer kept in float (config None, or no rule) whose output feeds a
    quantized layer gets an output quantizer with the config's activation
    spec: an integer runtime quantizes that tensor there (TFLite writes a
    QUANTIZE op), and without a range of its own it would borrow one.
    """
    spec = config.activations
    if spec is None:
        return
    for node in flat.nodes:
        layer = node.operation
        step = plan.get(id(layer))
        if step is None or step.kind != "clone" or step.quant_spec is not None or step.fused:
            continue
        rule = get_rule(flat.origin[id(layer)])
        if rule is not None and rule.kind == "passthrough":
            continue
        if len(layer._inbound_nodes) != 1 or len(layer._inbound_nodes[0].outputs) != 1:
            continue
        if _feeds_integer_graph(flat, plan, layer):
            quantized_output(step, layer, spec, "float layer output entering the integer graph")


def _fused_activation(flat, layer, cfg):
    """The fusable ReLU / ReLU6 that is `layer`'s only consumer and is quantized, else None."""
    nxt = flat.sole_consumer(layer)
    rule = get_rule(nxt) if nxt is not None else None
    if rule is not None and rule.kind == "activation" and is_fusable_activation(nxt) and cfg(nxt) is not None:
        return nxt
    return None


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
    if spec is not None and split_activation(flat.origin[id(layer)]) is not None:
        # The wrapper quantizes before the layer's own activation too (TFLite runs it as its own op).
        step.preact_key, step.preact_spec = preactivation_key(flat.key(layer)), spec
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
        step.qparams = _lookup(calibration, step.quant_key, step.quant_spec, step.quant_what)
        if step.preact_key is not None:
            step.preact_qparams = _lookup(calibration, step.preact_key, step.preact_spec,
                                          "the input of the layer's own activation")


def _lookup(calibration, key, spec, what):
    if key not in calibration:
        raise NoDataError(
            key, reason=f"quantize_model needs activation statistics for layer '{key}' ({what}), "
            "and the calibration result has none for it", layer=key,
        )
    try:
        return calibration.qparams(key, spec)
    except NoDataError as e:
        raise NoDataError(
            key, reason=f"quantize_model needs activation statistics for layer '{key}' ({what}): {e}", layer=key,
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


def _build_step(step, staging, mode, observe_steps, bn_statistics):
    """Create the new model's layer for one planned step (not yet built)."""
    if step.kind == "wrap":
        lc = step.layer_config
        if mode == "qat":
            if step.group is not None:  # the output goes through the shared quantizer instead
                lc = LayerQuantConfig(weights=lc.weights, activations=None)
            bn = _clone_unbuilt(step.fold) if step.fold is not None else None
            if lc.weights is None and lc.activations is None and bn is None:
                return _clone_unbuilt(staging)
            return QuantizeWrapper(_clone_unbuilt(staging), lc, mode="qat", batch_norm=bn,
                                   observe_steps=observe_steps, bn_statistics=bn_statistics, name=staging.name)
        inner = fold_into_layer(staging, step.fold) if step.fold is not None else _clone_unbuilt(staging)
        if lc.weights is None and lc.activations is None:
            return inner
        return QuantizeWrapper(inner, lc, mode="frozen", name=staging.name)
    return _clone_unbuilt(staging)


def _finish_step(step, staging, mode):
    """Copy weights into a freshly built layer, set weight ranges, set the output range."""
    layer = step.layer
    inner = layer.layer if isinstance(layer, QuantizeWrapper) else layer
    if (step.fold is None or mode == "qat") and staging.weights:
        inner.set_weights(staging.get_weights())
    if isinstance(layer, QuantizeWrapper):
        if layer.batch_norm is not None:
            layer.batch_norm.set_weights(step.fold.get_weights())
        layer.observe_weights()
        if layer.output_quantizer is not None and step.qparams is not None:
            layer.set_output_qparams(*step.qparams)
        if layer.preactivation_quantizer is not None and step.preact_qparams is not None:
            layer.set_preactivation_qparams(*step.preact_qparams)


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
    points = {}
    for s in steps:
        if s.preact_key is not None:
            points[s.preact_key] = s.preact_spec
        if s.quant_spec is not None and s.quant_key is not None:
            points[s.quant_key] = s.quant_spec
    return points


def _producer(flat, plan, input_steps, tensor):
    """The step whose activation quantizer quantizes `tensor` (through passthrough layers), or None."""
    while True:
        history = getattr(tensor, "_keras_history", None)
        op = getattr(history, "operation", None)
        if op is None or isinstance(op, keras.layers.InputLayer):
            for step, t in zip(input_steps, flat.model.inputs):
                if t is tensor:
                    return step if step.quant_spec is not None else None
            return None
        step = plan.get(id(op))
        if step is None:
            return None
        if step.quant_spec is not None:
            return step
        node = op._inbound_nodes[history.node_index]
        rule = get_rule(flat.origin[id(op)])
        if step.kind != "folded" and (rule is None or rule.kind != "passthrough") or len(node.input_tensors) != 1:
            return None
        tensor = node.input_tensors[0]


def _share_merge_inputs(flat, plan, input_steps, merges=SHARED_INPUT_MERGES):
    """Group the quantizers feeding each Add / Concatenate so that they share one scale (QAT).

    Groups are joined across merges (a tensor feeding two merges joins both
    groups). A group whose members' specs differ is left unshared. Returns the
    groups, each a list of steps; every member gets `step.group` and `step.slot`.
    """
    parent = {}

    def find(step):
        while parent.setdefault(id(step), step) is not step:
            step = parent[id(step)]
        return step

    members = {}
    for node in flat.nodes:
        if not merges or not isinstance(flat.origin[id(node.operation)], tuple(merges)):
            continue
        steps = [_producer(flat, plan, input_steps, t) for t in node.input_tensors]
        steps = [st for st in steps if st is not None]
        for st in steps:
            members[id(st)] = st
            parent.setdefault(id(st), st)
        for st in steps[1:]:
            root_a, root_b = find(steps[0]), find(st)
            if root_a is not root_b:
                parent[id(root_b)] = root_a
    groups = collections.defaultdict(list)
    order = {id(s): i for i, s in enumerate(input_steps + list(plan.values()))}
    for st in sorted(members.values(), key=lambda x: order[id(x)]):
        groups[id(find(st))].append(st)
    shared = []
    for group in groups.values():
        if len(group) < 2 or any(st.quant_spec != group[0].quant_spec for st in group):
            continue
        for slot, st in enumerate(group):
            st.group, st.slot = group, slot
        shared.append(group)
    return shared


def _union_qparams(group):
    """Scale and zero point covering the calibrated ranges of every member of a shared group."""
    from keras_quant import ops as kq_ops

    spec = group[0].quant_spec
    lows, highs = [], []
    for st in group:
        scale, zp = (float(keras.ops.convert_to_numpy(v)) for v in st.qparams)
        lows.append((spec.qmin - zp) * scale)
        highs.append((spec.qmax - zp) * scale)
    return kq_ops.compute_qparams(min(lows), max(highs), spec)


def quantize_model(model, config=None, calibration=None, mode="ptq", observe_steps=None, bn_statistics="quantized",
                   shared_merges=SHARED_INPUT_MERGES):
    """A new Keras model with fake-quantized weights and activations: post-training or trainable.

    `mode="ptq"` gives the frozen post-training model. `mode="qat"` gives a
    model to train with ordinary `fit`: compute layers become
    `kq.QuantizeWrapper`s in `"qat"` mode (a following BatchNormalization is
    folded into them as in Jacob et al. 2018, not removed), activation
    quantizers observe, learn (LSQ, for `learnable` specs) or freeze their
    ranges, and the inputs of each residual Add and each Concatenate share
    one quantizer. A subclassed model (no graph to rewrite) is copied and
    its compute layers wrapped in place of the originals.

    Args:
        model: A Functional or Sequential Keras model (nested ones are
            inlined; `"qat"` also takes subclassed models). It is not modified.
        config: A `kq.QuantConfig`; None means `kq.QuantConfig()` (W8A8:
            int8 per-channel symmetric weights, int8 per-tensor activations).
        calibration: A `kq.CalibrationResult` (anything with
            `qparams(key, spec)` and `key in calibration`). Needed by
            `"ptq"` when the config quantizes activations; optional for
            `"qat"`, where it initialises the activation ranges (else the first
            training batches do).
        mode: `"ptq"`: frozen quantizers with scales from the weights and the
            calibration statistics. `"qat"`: trainable quantizers.
        observe_steps: QAT: training steps the ranges are observed before
            learnable quantizers learn. Default: learnable quantizers learn
            from the first step when a calibration is given, else after
            `kq.layers.qat.LSQ_OBSERVE_STEPS`; the others observe (moving
            average) until changed (`kq.qat.set_mode`, `kq.qat.QATScheduler`).
        bn_statistics: QAT: where a folded BatchNormalization's batch
            statistics come from in training, `"quantized"` (one pass) or
            `"float"` (an extra float pass, as in Jacob et al. 2018); see
            `kq.QuantizeWrapper`.
        shared_merges: QAT: merge layer types whose inputs share one
            activation quantizer (default Add and Concatenate). TFLite's
            CONCATENATION needs one scale; its ADD rescales its inputs, so
            `(keras.layers.Concatenate,)` keeps each residual input on its own
            range, which can matter at 4 bits when a skip tensor also feeds
            other layers; `()` shares nothing.

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
    if graph is None and mode == "qat" and model.built and not isinstance(model, keras.Sequential):
        from keras_quant.qat import quantize_subclassed

        return quantize_subclassed(model, config, calibration, observe_steps)
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
    steps = input_steps + list(plan.values())
    if mode == "ptq" or calibration is not None:
        _fetch_qparams(steps, calibration)
    groups = _share_merge_inputs(flat, plan, input_steps, shared_merges) if mode == "qat" else []
    if mode == "qat" and calibration is not None:
        observe_steps = qat_quantizer.default_observe_steps(observe_steps, [s.quant_spec for s in steps], True)
    quantizer_kwargs = {"mode": "qat", "observe_steps": observe_steps} if mode == "qat" else {}

    names = _Names(layer.name for layer in flat.model.layers)
    quantizers = []

    def add_quantizer(step, x, base):
        if step.quant_spec is None:
            return x
        if step.group is not None:  # QAT: one quantizer shared by the inputs of a merge
            first = step.group[0]
            if first.quantizer is None:
                qparams = _union_qparams(step.group) if first.qparams is not None else (None, None)
                first.quantizer = ActivationQuantizer(
                    step.quant_spec, *qparams, slots=len(step.group), name=names(f"{first.quant_key}_shared_quant"),
                    **quantizer_kwargs,
                )
            quantizers.append((first.quantizer.name, step.quant_key))
            return first.quantizer(x, slot=step.slot)
        if step.quantizer is None:
            qparams = step.qparams if step.qparams is not None else (None, None)
            step.quantizer = ActivationQuantizer(step.quant_spec, *qparams, name=names(f"{base}_quant"),
                                                 **quantizer_kwargs)
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
            step.layer = _build_step(step, staging, mode, observe_steps, bn_statistics)
        outputs = step.layer(*args, **kwargs)
        if first:
            _finish_step(step, staging, mode)
            if isinstance(step.layer, QuantizeWrapper) and step.layer.preactivation_quantizer is not None:
                quantizers.append((step.layer.name + PREACTIVATION, step.preact_key))
            if isinstance(step.layer, QuantizeWrapper) and step.layer.output_quantizer is not None:
                quantizers.append((step.layer.name, step.quant_key))
        if step.kind == "wrap" and step.group is None:
            return outputs  # the wrapper's own output quantizer, if any
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
        shared=tuple(tuple(st.quant_key for st in group) for group in groups),
    )
    if report["unsupported"]:
        warnings.warn(
            f"quantize_model: no quantization rule for layer(s) {report['unsupported']}; they stay in float "
            "(see qmodel.quantization_report.unsupported, or declare rules with kq.layers.register_rule)",
            stacklevel=2,
        )
    return qmodel
