"""Range planning: which quantizers of a `quantize_model` plan share or take another's range, as TFLite does.

`plan.plan_graph` matches the graph to the layer rules and gives each node a
`Step`; the functions here then tie the steps' ranges together where the
integer kernels need one scale: an average pool keeps its input's
(`plan_pool_ranges`), a PTQ Concatenate's sole-reader inputs take its range
(`plan_concat_ranges`), the first input an Add alone reads spans the Add's
output range (`plan_add_ranges`), and a QAT model shares one quantizer among
a merge's inputs (`share_merge_inputs`). `resolve_ranges` carries the
calibrated ranges along those ties once they are known.
"""

import collections

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant import ops as kq_ops
from keras_quant.layers.rules import INFERENCE_IDENTITY, fixed_output_qparams, get_rule, is_keras_op

__all__ = [
    "SHARED_INPUT_MERGES", "FUSING_MERGES", "SAME_RANGE_POOLS", "merge_class", "is_merge", "plan_pool_ranges",
    "plan_concat_ranges", "plan_add_ranges", "resolve_ranges", "union_qparams", "producer", "has_fixed_grid",
    "share_merge_inputs",
]

L = keras.layers
# Merge layers whose inputs share one activation quantizer in a QAT model.
SHARED_INPUT_MERGES = (L.Add, L.Concatenate)
# Merge layers TFLite fuses a following ReLU / ReLU6 into (ADD, SUB, MUL have a fused activation).
FUSING_MERGES = (L.Add, L.Subtract, L.Multiply)
# The merge layer each bare keras.ops merge operation computes like.
_OP_MERGES = {"Add": L.Add, "Subtract": L.Subtract, "Multiply": L.Multiply, "Maximum": L.Maximum,
              "Minimum": L.Minimum, "Concatenate": L.Concatenate}
# Pools whose TFLite kernel keeps the input's scale and zero point (AVERAGE_POOL_2D).
SAME_RANGE_POOLS = (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)


def merge_class(op):
    """The merge layer class `op` computes like (itself for a layer), or None."""
    if is_keras_op(op):
        return _OP_MERGES.get(type(op).__name__)
    return type(op)


def is_merge(op, merges):
    cls = merge_class(op)
    return bool(merges) and cls is not None and issubclass(cls, tuple(merges))


def plan_pool_ranges(flat, plan):
    """Average pools take their input's range: TFLite's AVERAGE_POOL_2D has one scale for input and output.

    With its own range the file would need a requantize op after every pool (the
    converter refuses a QAT graph whose pool output range differs from its
    input's). The pool's step reads its source's calibration key (and fixed
    grid, after a sigmoid), and `same_as` names that step: a QAT model gives
    both one shared quantizer (`share_merge_inputs`), so the ranges stay
    equal while they train.
    """
    for node in flat.nodes:
        layer = node.operation
        step = plan.get(id(layer))
        if step is None or step.quant_spec is None or not isinstance(flat.origin[id(layer)], SAME_RANGE_POOLS):
            continue
        inputs = graph_lib.node_inputs(node)
        source = producer(flat, plan, [], inputs[0]) if len(inputs) == 1 else None
        if source is not None and source.quant_spec == step.quant_spec and source.quant_key is not None:
            step.quant_key, step.same_as, step.fixed = source.quant_key, source, source.fixed
            step.quant_what += f" (the range of '{source.quant_key}': TFLite's average pool keeps its input's scale)"


def _concat_source(flat, plan, tensor):
    """`(layer, step, tensor)` that computes `tensor` in the integer graph: a folded BatchNormalization's
    compute layer, else the tensor's own producer; None for a model input or an unplanned producer."""
    while True:
        op, node = flat.producer(tensor)
        step = None if op is None else plan.get(id(op))
        if step is None:
            return None
        if step.kind != "folded":
            return op, step, tensor
        tensor = graph_lib.node_inputs(node)[0]


def plan_concat_ranges(flat, plan):
    """PTQ: quantize each Concatenate input on the Concatenate's own range, where TFLite does.

    TFLite's CONCATENATION has one scale for its inputs and its output: the
    converter gives each input the output's scale. An input computed by a
    layer with its own output quantizer and read by nothing else is written
    on that scale directly (the converter folds the requantize into the
    producing op: one rounding of the accumulator, not two); an input that a
    passthrough layer (MaxPool, ZeroPadding, ...) produces, with no
    quantizer of its own, is requantized to that scale for every reader (a
    DenseNet block's BatchNormalization reads the pooled tensor the
    Concatenate reads). Each such step gets `range_from`, the Concatenate's
    step, and takes its range once the ranges are known (`resolve_ranges`).
    Inputs that other layers also read keep their own range (TFLite
    requantizes them for the Concatenate alone, as the Concatenate's own
    quantizer does here).
    """
    concats = []
    for node in flat.nodes:
        op = graph_lib.operation_of(node)
        step = plan.get(id(op))
        if (step is not None and step.quant_spec is not None and step.kind == "clone"
                and is_merge(flat.origin[id(op)], (L.Concatenate,))):
            concats.append((node, step))
    for node, target in reversed(concats):  # a Concatenate feeding another takes the later one's range first
        for tensor in graph_lib.node_inputs(node):
            found = _concat_source(flat, plan, tensor)
            if found is None:
                continue
            op, step, out = found
            if step.range_from is not None or step is target:
                continue
            readers = flat.consumers[id(out)]
            if step.quant_spec is not None:
                sole = len(readers) == 1 and readers[0] is node and len(flat.calls(op)) == 1
                if (sole and step.quant_spec == target.quant_spec and step.fixed is None
                        and not isinstance(flat.origin[id(op)], SAME_RANGE_POOLS)):
                    step.range_from = target
                    step.quant_what += f" (the range of '{target.quant_key}': TFLite writes it on the " \
                                       "Concatenate's scale)"
            elif step.kind == "clone" and not step.fused and len(flat.calls(op)) == 1:
                rule = get_rule(flat.origin[id(op)])
                if rule is not None and rule.kind == "passthrough" and len(graph_lib.node_inputs(
                        flat.calls(op)[0])) == 1 and "float" in str(out.dtype):
                    step.quant_spec, step.quant_key, step.range_from = target.quant_spec, flat.key(op), target
                    step.quant_what = (f"{flat.key(op)} requantized to the range of '{target.quant_key}' "
                                       "(TFLite's Concatenate inputs take its scale)")


def plan_add_ranges(flat, plan):
    """PTQ: widen the range of the first Add input that the Add alone reads to include the Add's output range.

    The converter's own int8 files do this: of the inputs of a residual ADD
    that nothing else reads, the first (the one its ADD computes in place)
    gets a range spanning the ADD's output. Measured on MobileNetV2,
    ResNet50V2 and EfficientNetV2B0: 8 of 13, 11 of 16 and 15 of 19
    convolutions feeding an ADD, every one of them the first sole-reader
    input, to the last digit of the scale. The grid is coarser than the
    branch's own, but the branch no longer clips: a hundred calibration
    samples rarely show a branch's extremes, and a clipped residual branch
    is carried undamped down the residual stream. On EfficientNetV2B0 over
    six calibration sets the branch's own range lost 1.4 points of accuracy
    and 1.5 of top-1 agreement with the float model against this one
    (`benchmarks/bench_calibration_sets.py`). The input is followed through
    a folded BatchNormalization and layers that are the identity at
    inference (Dropout, ...). Nothing is widened where that first input is
    not a wrapper's output (a max pool's), has a fixed grid or a
    per-channel spec. Such a step gets `range_union`, resolved once the
    ranges are known (`resolve_ranges`).
    """
    for node in flat.nodes:
        op = graph_lib.operation_of(node)
        target = plan.get(id(op))
        if (target is None or target.quant_spec is None or target.kind != "clone" or target.fused
                or not is_merge(flat.origin[id(op)], (L.Add,))):
            continue
        # The first input the Add alone reads (the one the converter's ADD overwrites in place), if a wrapper's.
        sources = (_sole_source(flat, plan, tensor, node) for tensor in graph_lib.node_inputs(node))
        step = next((found[1] for found in sources if found is not None), None)
        if (step is not None and step is not target and step.kind == "wrap" and step.quant_spec == target.quant_spec
                and step.fixed is None and step.range_from is None and step.range_union is None
                and step.quant_spec.granularity == "per_tensor"):
            step.range_union = target
            step.quant_what += f" (widened to the range of '{target.quant_key}', the Add it alone feeds)"


def _sole_source(flat, plan, tensor, reader):
    """`(layer, step)` computing `tensor` for `reader` alone (through folded layers and inference identities),
    or None."""
    while True:
        op, node = flat.producer(tensor)
        step = None if op is None else plan.get(id(op))
        readers = flat.consumers.get(id(tensor), [])
        if step is None or len(readers) != 1 or readers[0] is not reader or len(flat.calls(op)) != 1:
            return None
        if step.kind == "folded" or (step.kind == "clone" and step.quant_spec is None
                                     and isinstance(flat.origin[id(op)], INFERENCE_IDENTITY)):
            reader, tensor = node, graph_lib.node_inputs(node)[0]
            continue
        return op, step


def resolve_ranges(steps):
    """Give every step with `range_from` the qparams of the step it takes its range from, and every step with
    `range_union` the union of its own range and that step's."""
    for step in steps:
        source = step.range_from
        while source is not None and source.range_from is not None:
            source = source.range_from
        if source is not None:
            step.qparams = source.qparams
    for step in steps:
        if step.range_union is not None and step.qparams is not None and step.range_union.qparams is not None:
            step.qparams = union_qparams([step.qparams, step.range_union.qparams], step.quant_spec)


def union_qparams(qparams, spec):
    """Per-tensor `(scale, zero_point)` (numpy) on `spec`'s grid covering the ranges of every `(scale,
    zero_point)` in `qparams`: a residual branch widened to its Add's range, a QAT group's shared quantizer."""
    lows, highs = [], []
    for scale, zero_point in qparams:
        scale, zero_point = (float(np.asarray(keras.ops.convert_to_numpy(v)).reshape(-1)[0])
                             for v in (scale, zero_point))
        lows.append((spec.qmin - zero_point) * scale)
        highs.append((spec.qmax - zero_point) * scale)
    return kq_ops.numpy_qparams(np.float32(min(lows)), np.float32(max(highs)), spec)


def producer(flat, plan, inputs, tensor):
    """The step whose activation quantizer quantizes `tensor` (through passthrough layers), or None."""
    while True:
        op, node = flat.producer(tensor)
        if op is None:
            for step, t in zip(inputs, flat.model.inputs):
                if t is tensor:
                    return step if step.quant_spec is not None else None
            return None
        step = plan.get(id(op))
        if step is None:
            return None
        if step.quant_spec is not None:
            return step
        node_inputs = graph_lib.node_inputs(node)
        rule = get_rule(flat.origin[id(op)])
        if step.kind != "folded" and (rule is None or rule.kind != "passthrough") or len(node_inputs) != 1:
            return None
        tensor = node_inputs[0]


def has_fixed_grid(step):
    """Whether a step's output quantizer is TFLite's fixed softmax / sigmoid / tanh grid (never learned)."""
    return fixed_output_qparams(step.fixed, step.quant_spec) is not None


def _components(links, order):
    """The connected components of `links` (pairs of steps), each a list of steps in graph `order`."""
    parent = {}

    def find(step):
        while parent.setdefault(id(step), step) is not step:
            step = parent[id(step)]
        return step

    members = {}
    for a, b in links:
        members[id(a)], members[id(b)] = a, b
        root_a, root_b = find(a), find(b)
        if root_a is not root_b:
            parent[id(root_b)] = root_a
    groups = collections.defaultdict(list)
    for st in sorted(members.values(), key=lambda x: order[id(x)]):
        groups[id(find(st))].append(st)
    return list(groups.values())


def share_merge_inputs(flat, plan, inputs, merges=SHARED_INPUT_MERGES):
    """Group the quantizers that share one scale in a QAT model.

    Two kinds of link join quantizers: an average pool's output and its input
    (`Step.same_as`: TFLite's AVERAGE_POOL_2D keeps one scale, and the
    converter refuses a graph whose two ranges differ), always; and the
    inputs of each Add / Concatenate among `merges`. Groups are joined across
    links (a tensor feeding two merges joins both groups, a pool joins its
    input's). A group whose members' specs differ is not shared as a whole:
    only its pool links are kept. A quantizer on TFLite's fixed softmax /
    sigmoid / tanh grid joins nothing: it stays on that grid (a pool after it
    has the same one). Returns the groups, each a list of steps in graph
    order; every member gets `step.group` and `step.slot`.
    """
    order = {id(s): i for i, s in enumerate(inputs + list(plan.values()))}
    same = [(st.same_as, st) for st in plan.values() if st.same_as is not None]
    merged = []
    for node in flat.nodes:
        if not is_merge(flat.origin[id(graph_lib.operation_of(node))], merges):
            continue
        steps = [producer(flat, plan, inputs, t) for t in graph_lib.node_inputs(node)]
        steps = [st for st in steps if st is not None and not has_fixed_grid(st)]
        merged += [(steps[0], st) for st in steps[1:]]
    same = [(a, b) for a, b in same if not has_fixed_grid(a) and not has_fixed_grid(b)]
    groups = []
    for group in _components(same + merged, order):
        if all(st.quant_spec == group[0].quant_spec for st in group):
            groups.append(group)
        else:  # mixed specs: the pools still share their input's quantizer
            ids = {id(st) for st in group}
            groups += _components([(a, b) for a, b in same if id(a) in ids], order)
    shared = []
    for group in sorted(groups, key=lambda g: order[id(g[0])]):
        if len(group) < 2 or any(st.quant_spec != group[0].quant_spec for st in group):
            continue
        for slot, st in enumerate(group):
            st.group, st.slot = group, slot
        shared.append(group)
    return shared
