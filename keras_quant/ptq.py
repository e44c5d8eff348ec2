"""Post-training algorithms that refine a quantized model after calibration.

`correct_bias(float_model, qmodel, data)`: empirical bias correction. Rounding
weights and activations shifts the mean of each layer's output a little (a
rounding that is biased, such as TFLite's int8 swish, or weights whose
rounding errors do not cancel over the channel's inputs); through a deep
network these shifts add up. Bias correction measures, on calibration data,
the mean per output channel of each quantized layer's linear output (before
its activation and requantization) and of the float layer's, on the inputs
each model really sees, and adds the difference to the layer's bias (Nagel et
al. 2019, "Data-Free Quantization", section 4.2, empirical variant; AIMET's
`correct_bias`). Layers are corrected in graph order, each one seeing its
inputs from the already corrected layers before it, in one pass over the data.

The corrected biases are ordinary weights of the quantized model: the TFLite
and ONNX exports write them (as int32 biases) like any other.

`narrow_softmax_inputs(float_model, qmodel, data)`: a tighter grid for the
tensor a softmax reads. TFLite's integer SOFTMAX writes a fixed grid (int8:
1/256), so a logit far enough below its row's largest one gives 0 whatever its
value; the min-max range of the logits spends most of its steps there, and top
logits closer than a step tie (the argmax then takes the lower class). The
lower end is raised to where clipping provably moves no output by more than
one step on the calibration samples.

Example:

>>> qmodel = kq.quantize_model(model, calibration=result)                # doctest: +SKIP
>>> report = kq.ptq.correct_bias(model, qmodel, x_calib[:512])           # doctest: +SKIP
>>> print(report)                                                        # doctest: +SKIP
"""

import dataclasses
import math
from typing import Tuple

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant import runtime
from keras_quant import ops as kq_ops
from keras_quant.errors import check_int
from keras_quant.formatting import text_table
from keras_quant.layers.rules import activation_function, fixed_output_qparams, get_rule, without_activation
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = ["BiasCorrection", "SoftmaxRanges", "correct_bias", "narrow_softmax_inputs"]


@dataclasses.dataclass(frozen=True)
class BiasCorrection:
    """What `correct_bias` changed.

    Attributes:
        corrected: `(layer, mean_abs_shift, max_abs_shift)` per corrected
            layer, in graph order: the shift added to its bias, in the
            layer's output units.
        skipped: `(layer, reason)` for wrapped layers left as they were.
        num_samples: Samples the means were measured on.
    """

    corrected: Tuple[Tuple[str, float, float], ...]
    skipped: Tuple[Tuple[str, str], ...]
    num_samples: int

    def table(self) -> str:
        rows = [{"layer": name, "mean |shift|": mean, "max |shift|": peak} for name, mean, peak in self.corrected]
        return text_table(rows, ["layer", "mean |shift|", "max |shift|"])

    def __str__(self):
        lines = [f"bias correction on {self.num_samples} samples: {len(self.corrected)} layers corrected, "
                 f"{len(self.skipped)} skipped"]
        if self.corrected:
            lines.append(self.table())
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _channel_sum(y):
    y = keras.ops.cast(y, "float32")
    return keras.ops.sum(keras.ops.reshape(y, (-1, y.shape[-1])), axis=0)


def _is_linear(activation):
    return getattr(activation, "__name__", "linear") == "linear"


def _float_references(fgraph, qmodel, wrappers, index=None):
    """`{wrapper name: (float tensor, layer or None)}`: where each wrapper's float linear output is read.

    A float layer without an activation of its own stands for the tensor after the layers folded into
    the wrapper (`quantization_report.folded`: a BatchNormalization, a constant added): that tensor,
    with None. A layer with its own activation has nothing folded after it: its input tensor, with the
    layer, whose call without the activation gives the linear output. Also the skip reasons. `index`:
    `graph_lib.index(fgraph)`, where the caller has it.
    """
    report = getattr(qmodel, "quantization_report", None)
    folded_into = {}
    for name, into in (report.folded if report else ()):
        folded_into.setdefault(into, set()).add(name)
    readers, calls = index or graph_lib.index(fgraph)
    found, skipped = {}, []
    for w in wrappers:
        hits = calls.get(w.name, [])
        if len(hits) != 1:
            skipped.append((w.name, "no single call of a float layer of that name"))
            continue
        node = hits[0]
        layer = graph_lib.operation_of(node)
        if type(layer) is not type(w.layer):
            skipped.append((w.name, f"its float layer is a {type(layer).__name__}, rewritten as a "
                                    f"{type(w.layer).__name__}"))
            continue
        inputs, outputs = graph_lib.node_inputs(node), graph_lib.node_outputs(node)
        if len(inputs) != 1 or len(outputs) != 1:
            skipped.append((w.name, "not a layer with one input and one output"))
            continue
        if not _is_linear(getattr(layer, "activation", None)):
            found[w.name] = (inputs[0], layer)
            continue
        tensor, chain = outputs[0], folded_into.get(w.name, set())
        while chain:
            nxt = [n for n in readers.get(id(tensor), ()) if graph_lib.operation_of(n).name in chain]
            if len(nxt) != 1:
                break
            tensor = graph_lib.node_outputs(nxt[0])[0]
            chain = chain - {graph_lib.operation_of(nxt[0]).name}
        found[w.name] = (tensor, None)
    return found, skipped


@dataclasses.dataclass
class _Setup:
    """What both algorithms start from: the graphs, the samples, the items to treat (each with a `name`) and
    the float tensor each reads its float values from (`{name: (tensor, layer or None)}`)."""

    fgraph: object
    qgraph: object
    xs: list
    num_samples: int
    items: list
    references: dict
    skipped: list


def _setup(float_model, qmodel, data, max_samples, batch_size, what, select):
    """`(_Setup, batch_size)`; `select(fgraph, qgraph, qmodel) -> (items, references, skipped)`."""
    fgraph = graph_lib.require_functional(float_model, "float_model")
    qgraph = graph_lib.require_functional(qmodel, "qmodel")
    batch_size = check_int("batch_size", batch_size, allow_none=True) or 64
    xs = runtime.graph_samples(fgraph, data, max_samples, what)
    items, references, skipped = select(fgraph, qgraph, qmodel)
    items = [item for item in items if item.name in references]
    return _Setup(fgraph, qgraph, xs, int(xs[0].shape[0]), items, references, skipped), batch_size


def _float_pass(setup, batch_size, reduce):
    """`{item name: value}` folding `reduce(value or None, float linear output of a batch)` over the samples.

    One pass of the float model in batches; each wrapper's linear output is read from the tensor
    `_float_references` found (the layer called without its activation where it has one).
    """
    tensors = list({id(t): t for t, _ in setup.references.values()}.values())
    index = {id(t): i for i, t in enumerate(tensors)}
    probe = keras.Model(setup.fgraph.inputs, tensors)
    values = {}
    for start in range(0, setup.num_samples, batch_size):
        outs = probe([x[start:start + batch_size] for x in setup.xs], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for w in setup.items:
            tensor, layer = setup.references[w.name]
            y = outs[index[id(tensor)]]
            if layer is not None:
                with without_activation(layer):
                    y = layer(y, training=False)
            values[w.name] = reduce(values.get(w.name), y)
    return values


def _correctable_wrappers(fgraph, qgraph, qmodel):
    wrappers, skipped = [], []
    for layer in graph_lib.operations(qgraph):
        if isinstance(layer, QuantizeWrapper):
            reason = _correctable(layer)
            if reason:
                skipped.append((layer.name, reason))
            else:
                wrappers.append(layer)
    references, not_found = _float_references(fgraph, qmodel, wrappers)
    return wrappers, references, skipped + not_found


def _correctable(layer):
    """Why a wrapper's bias cannot be corrected, or None."""
    if layer.stage != "frozen":
        return "a QAT wrapper (bias correction is for post-training models)"
    inner = layer.layer
    if len(graph_lib.calls(layer)) != 1:
        return "called more than once"
    if layer.batch_norm is None and not getattr(inner, "use_bias", False):
        return "the layer has no bias"
    if layer.batch_norm is not None and not layer.batch_norm.center:
        return "its folded BatchNormalization has no beta"
    if getattr(inner, "data_format", "channels_last") == "channels_first":
        return "channels_first"
    if layer.batch_norm is None and len(inner.bias.shape) != 1:
        return f"a bias of shape {tuple(inner.bias.shape)} (one value per output channel is corrected)"
    return None


def correct_bias(float_model, qmodel, data, max_samples=512, batch_size=64):
    """Empirical bias correction of a post-training quantized model, in place.

    For each frozen `kq.QuantizeWrapper` with a bias (a folded
    BatchNormalization gives one), in graph order: the mean per output
    channel of its linear output in `qmodel` (inputs from the corrected layers
    before it, integer arithmetic where the model uses it) is made equal to
    the float layer's mean on the float model's inputs, by adding the
    difference to the bias. One pass of the float model in batches, one pass
    of `qmodel` over all samples at once (memory: the tensors alive at one
    point of the graph, for `max_samples` samples).

    Args:
        float_model: The float Functional or Sequential model `qmodel` was made from.
        qmodel: A PTQ model from `kq.quantize_model(..., mode="ptq")`; its
            biases are changed.
        data: Calibration inputs as the float model takes them (an array with
            the batch on axis 0, or a list of arrays for several inputs).
        max_samples: The first this many samples are used (None: all).
        batch_size: Samples per batch of the float pass.

    Returns:
        A `BiasCorrection` naming the corrected layers with the shift each
        received, and the wrapped layers skipped and why.

    Raises:
        ConfigError: A model that is not Functional / Sequential, a bad
            `max_samples` / `batch_size`.
        ShapeMismatchError: `data` does not fit the model's inputs.
        NoDataError: `data` holds no sample.
    """
    setup, batch_size = _setup(float_model, qmodel, data, max_samples, batch_size, "correct_bias",
                               _correctable_wrappers)
    wrappers, skipped, n = setup.items, setup.skipped, setup.num_samples
    if not wrappers:
        return BiasCorrection(corrected=(), skipped=tuple(skipped), num_samples=n)
    # The float means, from the float model alone.
    float_sums = _float_pass(setup, batch_size,
                             lambda total, y: _channel_sum(y) if total is None else total + _channel_sum(y))

    # The quantized pass: all samples at once, each layer corrected before its output feeds the next.
    targets = {id(w): w for w in wrappers}
    corrected = []

    def call_fn(op, *args, **kwargs):
        w = targets.get(id(op))
        if w is not None:
            y = w.linear_output(args[0])
            count = float(np.prod(y.shape[:-1]))
            shift = (float_sums[w.name] - _channel_sum(y)) / count
            bias = w.layer.bias if w.batch_norm is None else w.batch_norm.beta  # beta enters the folded bias as is
            bias.assign(keras.ops.cast(keras.ops.add(bias, keras.ops.cast(shift, bias.dtype)), bias.dtype))
            shift = np.abs(keras.ops.convert_to_numpy(shift))
            corrected.append((w.name, float(shift.mean()), float(shift.max())))
        return op(*args, **kwargs)

    with keras.name_scope("correct_bias"):
        graph_lib.run_releasing(setup.qgraph, [keras.ops.convert_to_tensor(x) for x in setup.xs], call_fn)
    return BiasCorrection(corrected=tuple(corrected), skipped=tuple(skipped), num_samples=n)


@dataclasses.dataclass(frozen=True)
class SoftmaxRanges:
    """What `narrow_softmax_inputs` changed.

    Attributes:
        narrowed: `(layer, old_min, new_min, old_step, new_step)` per
            wrapper with its own softmax, or softmax layer, whose input range
            was narrowed (the maximum is kept).
        skipped: `(layer, reason)` for softmax layers left as they were.
        num_samples: Samples the logits were measured on.
    """

    narrowed: Tuple[Tuple[str, float, float, float, float], ...]
    skipped: Tuple[Tuple[str, str], ...]
    num_samples: int

    def __str__(self):
        lines = [f"softmax inputs on {self.num_samples} samples: {len(self.narrowed)} narrowed, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"{name}: min {lo0:.4g} -> {lo1:.4g}, step {s0:.4g} -> {s1:.4g}"
                  for name, lo0, lo1, s0, s1 in self.narrowed]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


@dataclasses.dataclass
class _SoftmaxInput:
    """The per-tensor quantizer a softmax reads: a wrapper's own one before its softmax, or the output quantizer of
    the wrapper whose output reaches a softmax layer through layers that keep its grid (Flatten, Reshape)."""

    name: str  # the wrapper with its own softmax, or the softmax layer
    wrapper: QuantizeWrapper
    own: bool  # the wrapper's quantizer before its own softmax (else its output quantizer)
    classes: int  # the softmax axis' length

    @property
    def qparams(self):
        return self.wrapper.preactivation_qparams if self.own else self.wrapper.output_qparams

    def set_qparams(self, scale, zero_point):
        if self.own:
            self.wrapper.set_preactivation_qparams(scale, zero_point)
        else:
            self.wrapper.set_output_qparams(scale, zero_point)


def _is_softmax_layer(op):
    if isinstance(op, keras.layers.Softmax):
        return op.axis in (-1, [-1], (-1,))
    return isinstance(op, keras.layers.Activation) and activation_function(op.activation) == "softmax"


def _single_call(op):
    return graph_lib.is_layer(op) and len(graph_lib.calls(op)) == 1


def _quantizer_before(op, readers):
    """`(wrapper, None)` whose output quantizer a softmax layer reads (through grid-keeping layers read by nothing
    else), or `(None, reason)`."""
    tensor = graph_lib.node_inputs(graph_lib.calls(op)[0])[0]
    while True:
        producer, _, _ = graph_lib.producer(tensor)
        if len(readers.get(id(tensor), ())) != 1 or producer is None or not _single_call(producer):
            return None, "the tensor it reads has other readers or no single producer"
        if isinstance(producer, QuantizeWrapper):
            if producer.stage != "frozen" or producer.output_qparams is None or producer.activation is not None:
                return None, f"{producer.name} has no frozen per-tensor output quantizer"
            return producer, None
        if getattr(get_rule(producer), "kind", None) != "passthrough":
            return None, (f"its input comes from {producer.name} ({type(producer).__name__}), not a wrapper's "
                          "output quantizer")
        tensor = graph_lib.node_inputs(graph_lib.calls(producer)[0])[0]


def _softmax_inputs(fgraph, qgraph, qmodel):
    """The softmax inputs to narrow, their float tensors, and the softmax layers skipped with the reason."""
    found, skipped, standalone = [], [], {}
    readers, _ = graph_lib.index(qgraph)
    for op in graph_lib.operations(qgraph):
        if isinstance(op, QuantizeWrapper) and activation_function(op.activation) == "softmax":
            if op.stage != "frozen":
                skipped.append((op.name, "a QAT wrapper (the ranges train)"))
            elif op.preactivation_qparams is None or op.fixed_output is None:
                skipped.append((op.name, "no per-tensor quantizer before its softmax"))
            elif not _single_call(op):
                skipped.append((op.name, "called more than once"))
            else:
                found.append(_SoftmaxInput(op.name, op, own=True, classes=int(op.output.shape[-1])))
        elif _is_softmax_layer(op) and _single_call(op):
            wrapper, reason = _quantizer_before(op, readers)
            if wrapper is None:
                skipped.append((op.name, reason))
            else:
                standalone[op.name] = _SoftmaxInput(op.name, wrapper, own=False, classes=int(op.output.shape[-1]))
    float_index = graph_lib.index(fgraph)
    references, not_found = _float_references(fgraph, qmodel, [item.wrapper for item in found], float_index)
    skipped += not_found
    float_calls = float_index[1]
    for name, item in standalone.items():
        calls = float_calls.get(name, [])
        if len(calls) != 1 or not _is_softmax_layer(graph_lib.operation_of(calls[0])):
            skipped.append((name, "no single call of a float softmax layer of that name"))
            continue
        references[name] = (graph_lib.node_inputs(calls[0])[0], None)
        found.append(item)
    return found, references, skipped


def narrow_softmax_inputs(float_model, qmodel, data, max_samples=512, batch_size=64):
    """Raise the lower end of each softmax input's range to what the integer softmax can tell apart, in place.

    For each frozen `kq.QuantizeWrapper` with its own softmax (`Dense(10,
    activation="softmax")`), and each softmax layer (`Activation("softmax")`,
    `Softmax()` on the last axis) that reads a wrapper's output quantizer
    directly or through Flatten / Reshape (keras.applications' MobileNets):
    TFLite's SOFTMAX writes the fixed output grid of
    step `s` (int8: 1/256). If every logit below `c = m - ln(2 * N / s)` is
    raised to `c`, where `m` is the smallest row maximum over the samples and
    `N` the number of classes, the raised terms add at most `s / 2` of the
    softmax denominator, so no output moves by more than one step (a
    raised logit's own output stays under half a step). The quantizer's
    range `[min, max]` becomes `[max(min, c), max]` (0 stays inside), a finer
    grid for the top logits: fewer ties between the two largest, which on an
    int8 file otherwise go to the lower class index. The maximum is kept.

    Args:
        float_model: The float Functional or Sequential model `qmodel` was made from.
        qmodel: A PTQ model from `kq.quantize_model(..., mode="ptq")`; its
            quantizers before a softmax are changed.
        data: Calibration inputs as the float model takes them.
        max_samples: The first this many samples are used (None: all).
        batch_size: Samples per batch of the float pass.

    Returns:
        A `SoftmaxRanges` with the old and new minimum and step per layer.

    Raises:
        ConfigError: A model that is not Functional / Sequential, a bad
            `max_samples` / `batch_size`.
        ShapeMismatchError: `data` does not fit the model's inputs.
        NoDataError: `data` holds no sample.
    """
    setup, batch_size = _setup(float_model, qmodel, data, max_samples, batch_size, "narrow_softmax_inputs",
                               _softmax_inputs)
    items, skipped, n = setup.items, setup.skipped, setup.num_samples
    if not items:
        return SoftmaxRanges(narrowed=(), skipped=tuple(skipped), num_samples=n)

    def smallest_row_max(low, logits):
        value = float(keras.ops.convert_to_numpy(keras.ops.min(keras.ops.max(logits, axis=-1))))
        return value if low is None else min(low, value)

    row_max_min = _float_pass(setup, batch_size, smallest_row_max)

    narrowed = []
    for item in items:
        spec = item.wrapper.quant_config.activations
        scale, zero_point = (float(keras.ops.convert_to_numpy(v)) for v in item.qparams)
        lo, hi = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
        grid = fixed_output_qparams("softmax", spec)  # the grid TFLite's SOFTMAX writes
        if grid is None:
            skipped.append((item.name, f"its {spec.bits}-bit spec has no fixed softmax output grid"))
            continue
        step = grid[0]
        cut = min(row_max_min[item.name] - math.log(2 * item.classes / step), 0.0)
        if cut <= lo + scale:  # nothing below the cut, or within a step (a narrowed range, its zero point nudged)
            where = "above" if cut <= lo else "within a step of"
            skipped.append((item.name, f"the range's minimum {lo:.4g} is already {where} {cut:.4g}"))
            continue
        new_scale, new_zero_point = kq_ops.compute_qparams(np.float32(cut), np.float32(hi), spec)
        step_now, zp_now = (float(keras.ops.convert_to_numpy(v)) for v in (new_scale, new_zero_point))
        if (spec.qmin - zp_now) * step_now > cut:  # the zero point's nudge lifted the minimum: a step lower
            new_scale, new_zero_point = kq_ops.compute_qparams(np.float32(cut - step_now), np.float32(hi), spec)
        item.set_qparams(new_scale, new_zero_point)
        narrowed.append((item.name, lo, cut, scale, float(keras.ops.convert_to_numpy(new_scale))))
    return SoftmaxRanges(narrowed=tuple(narrowed), skipped=tuple(skipped), num_samples=n)
