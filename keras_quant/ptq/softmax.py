"""`narrow_softmax_inputs(float_model, qmodel, data)`: a tighter grid for the
tensor a softmax reads. TFLite's integer SOFTMAX writes a fixed grid (int8:
1/256), so a logit far enough below its row's largest one gives 0 whatever its
value; the min-max range of the logits spends most of its steps there, and top
logits closer than a step tie (the argmax then takes the lower class). The
lower end is raised to where clipping provably moves no output by more than
one step on the calibration samples.
"""

import dataclasses
import math
from typing import Tuple

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant import ops as kq_ops
from keras_quant.layers.rules import activation_function, fixed_output_qparams, get_rule
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.ptq import common
from keras_quant.ptq.common import float_pass, float_references

__all__ = ["SoftmaxRanges", "narrow_softmax_inputs"]


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
    references, not_found = float_references(fgraph, qmodel, [item.wrapper for item in found], float_index)
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
    setup, batch_size = common.setup(float_model, qmodel, data, max_samples, batch_size, "narrow_softmax_inputs",
                               _softmax_inputs)
    items, skipped, n = setup.items, setup.skipped, setup.num_samples
    if not items:
        return SoftmaxRanges(narrowed=(), skipped=tuple(skipped), num_samples=n)

    def smallest_row_max(low, logits):
        value = float(keras.ops.convert_to_numpy(keras.ops.min(keras.ops.max(logits, axis=-1))))
        return value if low is None else min(low, value)

    row_max_min = float_pass(setup, batch_size, smallest_row_max)

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
