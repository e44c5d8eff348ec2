"""The quantization plan: where `quantize_model` puts each quantizer, read from the layer rules.

`plan_graph(flat, config)` decides, for every node of a `FlatGraph`, what
the quantized model does there (a `Step`), as TFLite computes it:

- each compute layer gets a `QuantizeWrapper` (frozen per-channel weight
  quantizers). A BatchNormalization that is the compute layer's only
  consumer is folded into it, and a ReLU/ReLU6 after that is fused (TFLite
  fuses both), so the output quantizer goes after the last layer of that
  chain, with that layer's calibration statistics;
- a per-channel affine layer (Rescaling, Normalization, a lone
  BatchNormalization, LayerScale) folds into the next affine layer or into
  the Dense / Conv / DepthwiseConv that reads it where that is exact
  (`_affine_absorber`); otherwise it is wrapped as a 1x1 depthwise conv;
- merge, pool, unfolded norm and other activation layers (and the
  `keras.ops` operations of those kinds), and every float model input, get an
  `ActivationQuantizer` on their output; passthrough layers get nothing;
- an Add / Subtract / Multiply followed by a ReLU / ReLU6 has one quantizer,
  after the activation (ADD fuses it); an average pool keeps its input's
  range (AVERAGE_POOL_2D has one scale; `Step.same_as`, and a QAT model
  shares the quantizer); a layer computing in float (kept by
  the config, by its rule, or for want of one) whose output feeds the integer
  graph gets a quantizer there (an integer runtime quantizes that tensor);
- a compute layer with its own softmax / sigmoid / tanh / ... activation
  (TFLite runs it as a separate op) is also quantized before it, with the
  statistics keyed `"<layer>:preactivation"`.

The steps' ranges are then tied together where TFLite's kernels need one
scale (`keras_quant.transform.ranges`; its names are re-exported here).

`plan_model(model, config)` gives the public `QuantizationPlan`: the points
calibration must observe (`points`), the float islands and what is folded,
read by calibration, `quantize_model`, sensitivity and the analysis.
"""

import collections
import dataclasses
import threading
import weakref
from typing import Dict, Optional, Tuple

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant.config import LayerQuantConfig, QuantConfig
from keras_quant.errors import UnsupportedLayerError
from keras_quant.layers.folding import fold_blocker
from keras_quant.layers.rules import (
    get_rule, is_fusable_activation, output_function, preactivation_key, split_activation,
)
from keras_quant.layers.weight_only import weight_only_spec
from keras_quant.transform.graph import FlatGraph, already_flat
from keras_quant.transform.ranges import (
    FUSING_MERGES, SAME_RANGE_POOLS, SHARED_INPUT_MERGES, has_fixed_grid, is_merge, plan_add_ranges,
    plan_concat_ranges, plan_pool_ranges, producer, resolve_ranges, share_merge_inputs, union_qparams,
)
from keras_quant.transform.rewrite import affine_of

__all__ = [
    "Step", "plan_graph", "input_steps", "producer", "share_merge_inputs", "has_fixed_grid", "QuantizationPlan",
    "plan_model", "activation_points", "plan_concat_ranges", "plan_add_ranges", "resolve_ranges", "union_qparams",
    "SHARED_INPUT_MERGES",
    "FUSING_MERGES", "SAME_RANGE_POOLS", "SEPARABLE", "separable_key",
]

L = keras.layers
SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
# Calibration key of the depthwise output inside a separable convolution.
SEPARABLE_SUFFIX = ":depthwise"


def separable_key(key):
    """The calibration key of a separable convolution's depthwise output (`"sep:depthwise"`)."""
    return f"{key}{SEPARABLE_SUFFIX}"


def _float_reason(rule, lc, original):
    if rule is None:
        return "no quantization rule for this type (declare one with kq.layers.register_rule)"
    if lc is None:
        return "the config keeps it in float (None)"
    return (f"kept in float by default: no integer TFLite kernel takes keras_quant's ranges for "
            f"{type(original).__name__}; its output is quantized where it enters the integer graph")


@dataclasses.dataclass
class Step:
    """What the rebuilt graph does at one layer of the flat graph."""

    kind: str  # "clone", "wrap", "folded" (a BatchNormalization, constant or affine layer folded away) or "input"
    layer_config: Optional[LayerQuantConfig] = None  # "wrap": the wrapper's specs
    fold: object = None  # "wrap": the BatchNormalization folded into the layer
    bias_offset: object = None  # "wrap": a constant added to the output (`conv(x) + 3.0`), folded into the bias
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
    affine: tuple = None  # "wrap": (a, b, rank) of a per-channel affine layer rewritten as a 1x1 depthwise conv
    input_affine: tuple = None  # "wrap": (a, b) of the affine layers before it, folded into its kernel and bias
    inner_key: Optional[str] = None  # "wrap" of a SeparableConv: calibration key of its depthwise output
    inner_spec: object = None
    inner_qparams: tuple = None
    inner_layer: object = None  # the depthwise half built for the new model
    fixed: Optional[str] = None  # the output is a softmax / sigmoid / tanh's: TFLite's fixed grid may apply
    same_as: object = None  # a same-scale op (average pool): the Step whose range it keeps (QAT: its quantizer)
    weight_only: object = None  # "clone" of a float MultiHeadAttention: the QuantSpec of its int8 kernels
    chain: tuple = ()  # "wrap", fused merge: the staging layers TFLite computes as one op (layer, folded BN, ReLU)
    range_from: object = None  # PTQ: the step whose range this quantizer takes (a Concatenate it feeds)
    range_union: object = None  # PTQ: the step whose range this quantizer's range widens to (the Add it feeds)


def plan_graph(flat, config, fold_inputs=True):
    """`({id(staging layer): Step}, report)` for every node of a `FlatGraph` (see the module docstring).

    `fold_inputs=False` keeps every affine layer as its own (1x1 depthwise) step: QAT, where folding
    `Rescaling(1 / 255)` into a kernel would shrink it 255 times and change what a learning rate does to it.
    """
    plan, report = {}, collections.defaultdict(list)
    pending = {}  # id(staging layer) -> (a, b): the affine layers before it, folded into it

    def cfg(layer):
        return config.for_layer(flat.origin[id(layer)], flat.path(layer))

    def quantized_output(step, layer, spec, what):
        if spec is not None:
            step.quant_spec, step.quant_key, step.quant_what = spec, flat.key(layer), what
            step.fixed = output_function(flat.origin[id(layer)])
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
            report["float_islands"].append((key, type(original).__name__, _float_reason(rule, lc, original)))
            plan[id(layer)] = Step("clone")
        elif lc is None or rule.kind == "float":
            report["float_layers" if lc is None else "kept_float"].append(key)
            reason = _float_reason(rule, lc, original)
            weight_only = None
            if lc is not None and lc.weights is not None and type(original) is L.MultiHeadAttention:
                weight_only = weight_only_spec(lc.weights)
                reason += f"; its kernels are stored as {weight_only.bits}-bit integers (weight-only)"
            report["float_islands"].append((key, type(original).__name__, reason))
            plan[id(layer)] = Step("clone", weight_only=weight_only)
        elif rule.kind == "compute":
            _plan_compute(flat, layer, lc, cfg, plan, report, quantized_output, config,
                          input_affine=pending.get(id(layer)))
        elif rule.kind == "norm" and not _float_inputs(node):  # a Rescaling of uint8 pixels: it casts them
            report["float_islands"].append((key, type(original).__name__, "reads an integer tensor, which it casts "
                                            "to float itself; its output is quantized where it enters the "
                                            "integer graph"))
            plan[id(layer)] = Step("clone")
        elif rule.kind == "norm" and (affine := _layer_affine(flat, layer, pending.get(id(layer)))) is not None and (
                (consumer := fold_inputs and _affine_absorber(flat, layer, affine, cfg))
                or (rank := _depthwise_rank(flat, layer))):
            if consumer:  # a Rescaling / Normalization / ... whose one reader computes `a * x + b` in its weights
                pending[id(consumer)] = affine
                plan[id(layer)] = Step("folded")
                report["input_folds"].append((key, flat.key(consumer)))
            else:  # no integer kernel for a lone BatchNormalization / Rescaling / ...: a 1x1 depthwise conv
                _plan_compute(flat, layer, lc, cfg, plan, report, quantized_output, config,
                              affine=(*affine, rank))
                report["rewritten"].append((key, "per-channel affine as a 1x1 depthwise convolution"))
        elif rule.kind == "passthrough":
            plan[id(layer)] = Step("clone")
        elif rule.kind == "merge" and is_merge(original, FUSING_MERGES) and _fused_activation(flat, layer, cfg):
            # TFLite's ADD / SUB / MUL fuse a following ReLU / ReLU6: one quantizer, after it.
            acts = _fused_activations(flat, layer, cfg)
            plan[id(layer)] = Step("clone", fused=True, chain=(layer, acts[0]))
            _plan_fused(flat, acts, cfg, plan, quantized_output, f"output quantizer after {key}+{flat.key(acts[0])}")
        else:  # activation, merge, pool, unfolded norm: requantized output
            plan[id(layer)] = quantized_output(Step("clone"), layer, lc.activations, f"{rule.kind} layer output")
    _plan_float_boundaries(flat, config, plan, quantized_output)
    plan_pool_ranges(flat, plan)
    return plan, report


def _feeds_integer_graph(flat, plan, layer, seen=None):
    """Whether `layer`'s output reaches a quantized layer, directly or through passthrough layers."""
    seen = set() if seen is None else seen
    for out in flat.outputs_of(layer):
        for node in flat.consumers[id(out)]:
            if node is None or id(node.operation) in seen:
                continue
            consumer = graph_lib.operation_of(node)
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

    A layer kept in float (config None, its rule, or no rule) whose output feeds a
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
        out = flat.single_output(layer)
        if out is None or "float" not in str(out.dtype):
            continue
        if _feeds_integer_graph(flat, plan, layer):
            quantized_output(step, layer, spec, "float layer output entering the integer graph")


def _fused_activations(flat, layer, cfg):
    """The fusable ReLU / ReLU6 layers TFLite fuses into `layer`'s op, all quantized, else ().

    `layer`'s only output has one such consumer, or several identical ones
    (same type and config, each called once, on the same activation spec):
    the converter merges identical ops reading one tensor, and their
    identical quantizers, then fuses the activation left into the op. (NASNet
    applies `Activation("relu")` to a cell's input once per branch.) The
    first one is the fused activation; the others compute the same tensor.
    """
    out = flat.single_output(layer)
    users = flat.consumers[id(out)] if out is not None else []
    if not users or any(u is None or len(flat.calls(u.operation)) != 1 for u in users):
        return ()
    acts = [u.operation for u in users]
    if len({id(a) for a in acts}) != len(acts):  # one layer reading the tensor twice
        return ()
    first = acts[0]
    rule = get_rule(first)
    if rule is None or rule.kind != "activation" or not is_fusable_activation(first) or cfg(first) is None:
        return ()
    spec, config = cfg(first).activations, _anonymous_config(first)
    if any(type(a) is not type(first) or cfg(a) is None or cfg(a).activations != spec
           or _anonymous_config(a) != config for a in acts[1:]):
        return ()
    return tuple(acts)


def _anonymous_config(layer):
    config = dict(layer.get_config()) if graph_lib.is_layer(layer) else {}
    config.pop("name", None)
    return config


def _fused_activation(flat, layer, cfg):
    """The fusable ReLU / ReLU6 TFLite fuses into `layer`'s op (`_fused_activations`' first), else None."""
    acts = _fused_activations(flat, layer, cfg)
    return acts[0] if acts else None


def _plan_fused(flat, acts, cfg, plan, quantized_output, what):
    """Plan the quantizer after a fused activation and its duplicates: one range, the first one's (QAT: one
    shared quantizer, as for an average pool and its input). Returns the first one's step."""
    first = quantized_output(Step("clone"), acts[0], cfg(acts[0]).activations, what)
    plan[id(acts[0])] = first
    for act in acts[1:]:
        step = quantized_output(Step("clone"), act, cfg(act).activations, what)
        if step.quant_spec is not None:
            step.quant_key, step.same_as = first.quant_key, first
            step.quant_what += f" (the range of '{first.quant_key}': TFLite computes both as one op)"
        plan[id(act)] = step
    return first


def _depthwise_rank(flat, layer):
    """The rank of a layer's output when a 1x1 depthwise conv can compute a map on it (3 or 4), else None."""
    out = flat.single_output(layer)
    return len(out.shape) if out is not None and len(out.shape) in (3, 4) else None


def _float_inputs(node):
    """Whether every input of a call is float: a norm layer reading integers (a `Rescaling` of uint8 pixels)
    casts them itself, so it stays float, not folded into a kernel that would then read the integers."""
    return all("float" in str(t.dtype) for t in graph_lib.node_inputs(node))


def _layer_affine(flat, layer, before=None):
    """`(a, b)` (float32, per channel) of a norm layer that is `a * x + b` on its last axis (after `before`'s)."""
    out = flat.single_output(layer)
    if out is None or len(out.shape) < 2 or out.shape[-1] is None:
        return None
    found = affine_of(flat.origin[id(layer)], len(out.shape), int(out.shape[-1]))  # the original's weights
    if found is None or before is None:
        return found
    a, b = found
    return (a * before[0]).astype("float32"), (a * before[1] + b).astype("float32")


# Layers that can take a per-channel affine map of their input into their kernel and bias exactly.
_INPUT_AFFINE_LAYERS = (L.Dense, L.Conv1D, L.Conv2D, L.DepthwiseConv1D, L.DepthwiseConv2D)
_ZERO_PADDING = (L.ZeroPadding1D, L.ZeroPadding2D)


def _affine_absorber(flat, layer, affine, cfg):
    """The one layer reading the affine norm layer `layer` (`affine`: its `(a, b)`, with the folds before it)
    when `a * x + b` folds into it, else None.

    TFLite runs `a * x + b` (a Rescaling or Normalization of the input, a
    lone BatchNormalization) as its own op; the converter folds it into the
    convolution that follows. Folded here where that is exact: the reader is
    the next affine layer (the two compose), or a channels-last Dense /
    Conv1D / Conv2D / DepthwiseConv with no groups, whose kernel takes `a`
    per input channel and whose bias takes the kernel applied to `b`. Zero
    padding breaks `b` (padded zeros would become `b`): through a ZeroPadding
    layer, or into a convolution that pads itself, only `b = 0` folds.
    """
    if not (np.all(np.isfinite(affine[0])) and np.all(np.isfinite(affine[1]))):
        return None
    zero_offset = not np.any(affine[1])
    consumer = flat.sole_consumer(layer)
    while isinstance(consumer, _ZERO_PADDING) and zero_offset and cfg(consumer) is not None:
        consumer = flat.sole_consumer(consumer)
    if consumer is None or cfg(consumer) is None:
        return None
    original = flat.origin[id(consumer)]
    kind = getattr(get_rule(original), "kind", None)
    if kind == "norm":  # composes, if the next one is planned as an affine map itself or folds on in turn
        composed = _layer_affine(flat, consumer, affine)
        folds_on = composed is not None and (_depthwise_rank(flat, consumer) or _affine_absorber(flat, consumer,
                                                                                                composed, cfg))
        return consumer if folds_on else None
    if kind != "compute" or not isinstance(original, _INPUT_AFFINE_LAYERS):
        return None
    if getattr(original, "data_format", "channels_last") != "channels_last" or getattr(original, "groups", 1) != 1:
        return None
    if not zero_offset and getattr(original, "padding", "valid") != "valid":
        return None
    return consumer


# Compute layers whose output a constant can be folded into: a bias on the last (channel) axis, no activation.
_BIAS_LAYERS = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv1D, L.DepthwiseConv2D,
                L.Conv1DTranspose, L.Conv2DTranspose)


def _bias_offset(flat, layer, op, cfg):
    """`c` (float32, scalar or per channel) when `op` is `layer(x) + c` / `layer(x) - c` with a constant `c`, else None.

    Only where folding is exact: `op` is the layer's sole consumer, a bare
    keras.ops Add / Subtract whose other operand is a constant that
    broadcasts along the last (channel) axis, and the layer is a
    channels-last convolution or Dense with no activation of its own.
    """
    original = flat.origin[id(layer)]
    if op is None or not isinstance(original, _BIAS_LAYERS) or isinstance(original, SEPARABLE):
        return None
    if getattr(getattr(original, "activation", None), "__name__", "linear") != "linear":
        return None
    if getattr(original, "data_format", "channels_last") != "channels_last" or cfg(op) is None:
        return None
    op_type = type(flat.origin[id(op)]).__name__
    if op_type not in ("Add", "Subtract") or graph_lib.is_layer(op):
        return None
    calls = flat.calls(op)
    if len(calls) != 1:
        return None
    args, kwargs = graph_lib.node_arguments(calls[0])
    out = flat.single_output(layer)
    if kwargs or len(args) != 2 or out is None or not any(a is out for a in args):
        return None
    const = args[1] if args[0] is out else args[0]
    if op_type == "Subtract" and args[0] is not out:  # c - conv(x) negates the output: not a bias
        return None
    if isinstance(const, bool) or not isinstance(const, (int, float, np.ndarray, np.number)):
        return None
    c = np.asarray(const, dtype="float32")
    channels = out.shape[-1]
    if c.ndim > 1 and any(d != 1 for d in c.shape[:-1]) or c.ndim > len(out.shape):
        return None
    c = c.reshape(-1)
    if c.size not in (1, channels) or not np.all(np.isfinite(c)):
        return None
    return -c if op_type == "Subtract" else c


def _plan_compute(flat, layer, lc, cfg, plan, report, quantized_output, config, affine=None, input_affine=None):
    """Plan a compute layer and the BatchNormalization / activation TFLite fuses into it (and `input_affine`,
    the `(a, b)` of affine layers before it, see `_affine_absorber`)."""
    chain, nxt = [layer], flat.sole_consumer(layer)
    bn = offset = None
    if isinstance(nxt, keras.layers.BatchNormalization) and cfg(nxt) is not None and fold_blocker(layer, nxt) is None:
        bn = nxt
    elif affine is None:
        offset = _bias_offset(flat, layer, nxt, cfg)
    if bn is not None or offset is not None:  # folded into the layer's weights / bias (TFLite: one op)
        chain.append(nxt)
    if offset is not None:  # `conv(x) + c`
        plan[id(nxt)] = Step("folded")
        report["folded"].append((flat.key(nxt), flat.key(layer)))
    own_activation = getattr(getattr(layer, "activation", None), "__name__", "linear")
    activations = _fused_activations(flat, chain[-1], cfg) if own_activation == "linear" else ()
    activation = activations[0] if activations else None
    if activation is not None:
        chain.append(activation)
    last = chain[-1]
    what = "output quantizer after " + "+".join(flat.key(x) for x in chain)
    step = Step("wrap", fold=bn, chain=tuple(chain), affine=affine, bias_offset=offset, input_affine=input_affine)
    if bn is not None:
        plan[id(bn)] = Step("folded")
        report["folded"].append((flat.key(bn), flat.key(layer)))
    if activation is None:  # the wrapper's own output quantizer
        spec = cfg(last).activations
        quantized_output(step, last, spec, what)
    else:  # a fused activation layer: the quantizer goes after it
        spec = None
        _plan_fused(flat, activations, cfg, plan, quantized_output, what)
    weights = lc.weights
    if (weights is not None and isinstance(flat.origin[id(layer)], L.Embedding) and weights.granularity != "per_tensor"
            and not config.names_layer(flat.origin[id(layer)], flat.path(layer))):
        # TFLite's integer GATHER reads one scale for the whole table: per-tensor unless the config asks otherwise.
        weights = dataclasses.replace(weights, granularity="per_tensor")
    elif (weights is not None and affine is not None and weights.granularity != "per_tensor"
          and not config.names_layer(flat.origin[id(layer)], flat.path(layer))):
        # A lone BatchNormalization / LayerScale / Rescaling: the converter writes it as MUL and ADD by one
        # per-tensor int8 constant each; a 1x1 depthwise conv with a per-tensor kernel is as fine and as small
        # (per-channel, each channel also stores a weight and a bias scale and zero point: DenseNet121's 62
        # BatchNormalizations after a Concatenate made its file 1.13x the converter's). Per-channel if named.
        weights = dataclasses.replace(weights, granularity="per_tensor")
    step.layer_config = LayerQuantConfig(weights=weights, activations=spec)
    if isinstance(flat.origin[id(layer)], SEPARABLE) and lc.activations is not None:
        # Written as depthwise + pointwise convolutions with a quantizer between them (TFLite has no separable op).
        step.inner_key, step.inner_spec = separable_key(flat.key(layer)), lc.activations
        report["rewritten"].append((flat.key(layer), "depthwise + pointwise convolutions"))
    if spec is not None and split_activation(flat.origin[id(layer)]) is not None:
        # The wrapper quantizes before the layer's own activation too (TFLite runs it as its own op).
        step.preact_key, step.preact_spec = preactivation_key(flat.key(layer)), spec
    plan[id(layer)] = step



def input_steps(flat, config):
    """A `Step` per model input: its quantizer (float inputs, and integers a Dense / Conv reads) and calibration key."""
    steps = []
    for t, key in zip(flat.model.inputs, flat.input_keys):
        spec = config.for_layer(key)
        readers = flat.consumers.get(id(t), [])  # integers only where kernels read them as values (not ids)
        values = readers and all(n is not None and isinstance(flat.origin[id(n.operation)], _INPUT_AFFINE_LAYERS)
                                 for n in readers)
        spec = None if spec is None or not ("float" in str(t.dtype) or values) else spec.activations
        steps.append(Step("input", quant_spec=spec, quant_key=key, quant_what="model input"))
    return steps


@dataclasses.dataclass
class QuantizationPlan:
    """The plan of a Functional / Sequential model under a config, as `quantize_model` will carry it out.

    Attributes:
        flat: The `FlatGraph` planned.
        steps: `{id(staging layer): Step}` in graph order.
        inputs: The model inputs' steps.
        report: `{field: [...]}`: folded pairs, float islands, unsupported keys, ...
    """

    flat: FlatGraph
    steps: Dict[int, Step]
    inputs: list
    report: dict

    @property
    def points(self) -> Dict[str, object]:
        """`{calibration key: QuantSpec}`: every tensor whose statistics the quantized model reads, in graph order."""
        points = {}
        for s in self.inputs + list(self.steps.values()):
            if s.preact_key is not None:
                points[s.preact_key] = s.preact_spec
            if s.inner_key is not None:
                points[s.inner_key] = s.inner_spec
            if s.quant_spec is not None and s.quant_key is not None:
                points[s.quant_key] = s.quant_spec
        return points

    @property
    def float_islands(self) -> Tuple[Tuple[str, str, str], ...]:
        """`(key, type, reason)` of every layer or operation left computing in float."""
        return tuple(self.report.get("float_islands", ()))



def plan_model(model, config=None, weights=True, fold_inputs=True) -> Optional[QuantizationPlan]:
    """The `QuantizationPlan` of a Functional or Sequential model, or None for one with no graph (subclassed).

    `weights=False` plans on a read-only graph (see `FlatGraph`): the points,
    chains and float islands are the same, but the plan cannot be built.
    `fold_inputs`: fold affine layers into the layer reading them where exact
    (the PTQ plan); False keeps them as their own steps (QAT's).

    Example:

    >>> plan = plan_model(model, kq.QuantConfig.int8())
    >>> list(plan.points)[:2]
    ['input_layer', 'conv']
    """
    config = QuantConfig() if config is None else config
    graph = graph_lib.functional(model)
    if graph is None:
        return None
    flat = _read_only_graph(model, graph) if not weights else FlatGraph(model, graph, weights=True)
    steps, report = plan_graph(flat, config, fold_inputs)
    return QuantizationPlan(flat, steps, input_steps(flat, config), report)


# model -> (fingerprint, read-only FlatGraph) of a model with nested models: calibration and quantize_model plan the same model in turn
# (`activation_points`, then `plan_model(weights=False)`), and copying a large graph is most of a plan's cost
# (about 1 s of NASNetMobile's 770 operations). Nothing writes to a read-only FlatGraph; each plan is made
# afresh from it (the config and the rules may have changed). Weakly keyed: the model's lifetime, no longer.
_READ_ONLY_GRAPHS = weakref.WeakKeyDictionary()
_READ_ONLY_LOCK = threading.Lock()


def _graph_fingerprint(graph):
    """What a read-only FlatGraph of `graph` depends on: each operation (nested graphs too) and its config."""
    parts = []
    for op in graph_lib.operations(graph):
        sub = graph_lib.functional(op) if isinstance(op, keras.Model) else None
        # `FlatGraph` copies every operation from its config (`copy_operation`), so each has one.
        parts.append((id(op), type(op), repr(op.get_config()), None if sub is None else _graph_fingerprint(sub)))
    return (id(graph), tuple(parts))


def _read_only_graph(model, graph):
    """The read-only `FlatGraph` of `model`: a view of an already flat graph (nothing to copy), else the
    copy, reused while the model's graph and layer configs are unchanged."""
    if already_flat(graph):
        return FlatGraph(model, graph, weights=False)
    fingerprint = _graph_fingerprint(graph)
    with _READ_ONLY_LOCK:
        cached = _READ_ONLY_GRAPHS.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    flat = FlatGraph(model, graph, weights=False)
    with _READ_ONLY_LOCK:
        _READ_ONLY_GRAPHS[model] = (fingerprint, flat)
    return flat


def activation_points(model, config=None):
    """The calibration keys whose statistics `quantize_model` reads, with their specs.

    These are the places activation quantizers go (model inputs, after fused
    activations, after merges and average pooling, where float layers enter
    the integer graph); a calibration restricted to them
    (`CalibrationCallback(statistics="range")`) is all the PTQ model needs.

    Args:
        model: A Functional or Sequential model.
        config: A `kq.QuantConfig` (default `QuantConfig()`).

    Returns:
        `{key: QuantSpec}` in graph order, or None for a model whose graph
        `quantize_model` cannot rewrite (subclassed, unbuilt).
    """
    # QAT's plan: its points include the outputs of the affine layers PTQ folds, so one calibration serves both.
    plan = plan_model(model, config, weights=False, fold_inputs=False)
    return None if plan is None else plan.points
