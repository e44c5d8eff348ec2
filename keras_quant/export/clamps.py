"""Fold the integer clamps of narrow activation grids into the ops around them.

A 4-bit activation in an int8 file is traced as int8 fake-quant, a clamp to
the 4-bit grid (MAXIMUM and MINIMUM ops with constants, or RELU / RELU6 where
the converter recognises them) and int8 fake-quant again with the same scale
and zero point (`kq.layers.inference.activation_op`). Each clamp op costs a
pass over the tensor, and the XNNPACK delegate runs no int8 MAXIMUM / MINIMUM /
RELU, so each one also splits the delegated graph. Two rewrites of the
converted file remove them where the integers stay the same:

- `shift_narrow_grids` stores each clamped grid at the top of the int8 range:
  every tensor holding it (the producer's output, the clamps', and those that
  MAX_POOL_2D / RESHAPE / PAD / ... pass on with the same quantization) gets
  its zero point, and the clamps' constants, moved by `127 - grid maximum`.
  Every kernel that reads or writes those tensors computes with
  `q - zero_point`, the same numbers, and the producer's int8 saturation is now
  the grid's maximum. A tensor an op reads in raw integers (AVERAGE_POOL_2D
  rounds `sum / count` half away from raw 0), whose quantization an op fixes
  (SOFTMAX's output), or that a CONCATENATION reads, is left where it is.
- `fold_clamps` then removes every clamp op (RELU, RELU6, RELU_N1_TO_1,
  RELU_0_TO_1, MAXIMUM / MINIMUM with a constant) whose input and output hold
  the same quantization: dropped when the input's integers already lie in its
  range (int8 saturation, a fused ReLU / ReLU6 of the producer, a MEAN or
  MAX_POOL_2D of such values; bounds tracked through the graph in stored
  integers), or folded into the producing CONV_2D / DEPTHWISE_CONV_2D /
  FULLY_CONNECTED / ADD / pooling op as its fused activation when that
  activation's integer range on the producer's output is exactly the clamp's
  combined with the producer's own (a RELU when the grid starts at 0).

A clamp op left (on the graph's input, which no op produces) is RELU or
RELU6 kernel work per element, and a split in the delegated graph: on a 4-D
tensor `pool_clamps` writes it as a 1x1 MAX_POOL_2D with that fused
activation, the same integers, which XNNPACK runs.

A fused activation's integer bound is `zero_point + round(bound / scale)`:
TFLite's kernels round halves away from zero, the XNNPACK delegate to even;
a bound is used only where both give the same integer (a RELU's 0 always
does), so the file computes the same integers with and without the delegate.

Example:

>>> flat = flatbuffer.FlatModel(data)              # doctest: +SKIP
>>> shifted = shift_narrow_grids(flat)             # doctest: +SKIP
>>> removed = fold_clamps(flat)                    # doctest: +SKIP
"""

import copy
import math
from typing import Dict, List, Tuple

import numpy as np

from keras_quant.export import flatbuffer

__all__ = ["shift_narrow_grids", "fold_clamps", "pool_clamps", "activation_bounds", "FUSABLE_OPS"]

# Ops whose fused activation both LiteRT's int8 kernels and the XNNPACK delegate apply to their output.
FUSABLE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D")
# Ops that move or average integers of one quantization: their output lies within their input's bounds.
_KEEPS_BOUNDS = ("MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "RESHAPE", "SQUEEZE", "EXPAND_DIMS")
# Fused activation code -> its float (min, max).
_ACTIVATIONS = {0: (None, None), 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}
# Clamp op -> its float (min, max), for the RELU family.
_CLAMP_OPS = {"RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}
_INT8 = (-128, 127)


def _quantize_bound(value, scale, zero_point):
    """`(tflite, xnnpack)` integers of a float activation bound: half away from zero / half to even."""
    v = float(np.float32(value) / np.float32(scale))
    tfl = float(zero_point) + v
    away = int(math.copysign(math.floor(abs(tfl) + 0.5), tfl))
    even = int(np.rint(np.float32(v) + np.float32(zero_point)))
    return away, even


def activation_bounds(lo, hi, scale, zero_point, exact=False):
    """The int8 `(min, max)` a clamp to float `[lo, hi]` (None: open) gives on `(scale, zero_point)`.

    `exact=False`: the widest bounds either runtime gives (what the output may hold);
    `exact=True`: the bounds only if both runtimes give the same integers, else None.
    """
    out = []
    for value, limit, pick in ((lo, _INT8[0], min), (hi, _INT8[1], max)):
        if value is None:
            out.append(limit)
            continue
        a, b = (int(np.clip(q, *_INT8)) for q in _quantize_bound(value, scale, zero_point))
        if exact and a != b:
            return None
        out.append(pick(a, b))
    return tuple(out)


def _params(flat, index):
    t = flat.tensor(index)
    if t.type != "INT8" or t.scales.size != 1:
        return None
    return float(t.scales[0]), int(t.zero_points[0])


def _fused(flat, op_index):
    options = flat.graph.operators[op_index].builtinOptions
    return getattr(options, "fusedActivationFunction", None)


def _clamp(flat, op):
    """`(input, output, float range or None, int range or None)` of a clamp op keeping its quantization, else None."""
    if not op.outputs or (op.name not in _CLAMP_OPS and op.name not in ("MAXIMUM", "MINIMUM")):
        return None
    variable = [i for i in op.inputs if i >= 0 and not flat.tensor(i).constant]
    constant = [i for i in op.inputs if i >= 0 and flat.tensor(i).constant]
    if len(variable) != 1 or _params(flat, variable[0]) is None:
        return None
    x, y = variable[0], op.outputs[0]
    if _params(flat, x) != _params(flat, y) or tuple(flat.tensor(x).shape) != tuple(flat.tensor(y).shape):
        return None
    if op.name in _CLAMP_OPS:
        return x, y, _CLAMP_OPS[op.name], None
    if len(constant) != 1 or _params(flat, constant[0]) != _params(flat, x):
        return None
    values = np.unique(flat.array(constant[0]))
    if values.size != 1:
        return None
    c = int(values[0])
    return x, y, None, ((c, _INT8[1]) if op.name == "MAXIMUM" else (_INT8[0], c))


def _intersect(a, b):
    return max(a[0], b[0]), min(a[1], b[1])


def _inside(a, b):
    """Whether interval `a` lies inside `b`."""
    return b[0] <= a[0] and a[1] <= b[1]


def _output_bounds(flat, op, known):
    """The int8 range `op`'s first output can hold, from its fused activation and its input's bounds."""
    out = op.outputs[0]
    params = _params(flat, out)
    if params is None:
        return _INT8
    bounds = _INT8
    code = _fused(flat, op.index)
    if code in _ACTIVATIONS and op.name in FUSABLE_OPS:
        bounds = activation_bounds(*_ACTIVATIONS[code], *params)
    clamp = _clamp(flat, op)
    if clamp is not None:
        x, _, floats, ints = clamp
        own = ints if ints is not None else activation_bounds(*floats, *params)
        return _intersect(known.get(x, _INT8), own)
    if op.name in _KEEPS_BOUNDS and op.inputs and op.inputs[0] >= 0:
        x = op.inputs[0]
        if _params(flat, x) == params:
            bounds = _intersect(bounds, known.get(x, _INT8))
        elif _params(flat, x) is not None and known.get(x, _INT8)[0] >= _params(flat, x)[1]:
            bounds = _intersect(bounds, (params[1], _INT8[1]))  # non-negative in, non-negative out
    return bounds


def _consumers(flat) -> Dict[int, List[int]]:
    users = {}
    for op in flat.ops():
        for i in op.inputs:
            if i >= 0:
                users.setdefault(i, []).append(op.index)
    return users


def _fuse_code(flat, producer, x, clamp_range):
    """The fused activation that gives the producer's output exactly its own range combined with the clamp's."""
    params = _params(flat, x)
    code = _fused(flat, producer.index)
    own = activation_bounds(*_ACTIVATIONS[code], *params, exact=True) if code in _ACTIVATIONS else None
    if own is None:
        return None
    want = _intersect(own, clamp_range)
    for candidate in (0, 1, 3, 2):
        if activation_bounds(*_ACTIVATIONS[candidate], *params, exact=True) == want:
            return candidate
    return None


def _plan_removal(flat, op, clamp, known, producers, users, outputs):
    """`(action, detail)` for one clamp op: ("drop", None), ("fuse", code) or None to keep it."""
    x, y, floats, ints = clamp
    params = _params(flat, x)
    exact = ints if ints is not None else activation_bounds(*floats, *params, exact=True)
    if exact is None:
        return None
    sole = users.get(x, []) == [op.index] and x not in outputs
    producer = producers.get(x)
    if _inside(known.get(x, _INT8), exact):
        if (producer is not None and sole) or y not in outputs:
            return "drop", None
        return None
    if producer is None or not sole or producer.name not in FUSABLE_OPS or _fused(flat, producer.index) is None:
        return None
    code = _fuse_code(flat, producer, x, exact)
    return None if code is None else ("fuse", code)


def _rewire(flat, op, x, y, producer, users, outputs):
    """Take clamp `op` (x -> y) out of the graph: its producer writes `y`, or `y`'s readers read `x`."""
    graph = flat.graph
    if producer is not None and users.get(x, []) == [op.index] and x not in outputs:
        outs = list(graph.operators[producer.index].outputs)
        outs[outs.index(x)] = y
        graph.operators[producer.index].outputs = outs
        return
    for reader in users.get(y, []):
        graph.operators[reader].inputs = [x if i == y else i for i in graph.operators[reader].inputs]


def fold_clamps(flat) -> List[Tuple[str, str, str]]:
    """Remove the clamp ops of `flat`'s main graph that its integers do not need (see the module).

    Returns:
        `(op, tensor, how)` of each op removed: `how` is `"dropped"` (the values
        already lay in its range) or `"fused as RELU"` (... into the producing op).
    """
    removed = []
    changed = True
    while changed:  # one removal at a time: the graph's producers, readers and bounds change with it
        changed = False
        ops = flat.ops()
        producers = {o: op for op in ops for o in op.outputs}
        users = _consumers(flat)
        outputs = {int(i) for i in flat.graph.outputs}
        known = {}
        for op in ops:
            if op.outputs:
                known[op.outputs[0]] = _output_bounds(flat, op, known)
        for op in ops:
            clamp = _clamp(flat, op)
            plan = None if clamp is None else _plan_removal(flat, op, clamp, known, producers, users, outputs)
            if plan is None:
                continue
            x, y = clamp[0], clamp[1]
            producer = producers.get(x)
            how = "dropped"
            if plan[0] == "fuse":
                flat.graph.operators[producer.index].builtinOptions.fusedActivationFunction = plan[1]
                how = "fused as " + {1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}.get(plan[1], "NONE")
            _rewire(flat, op, x, y, producer, users, outputs)
            del flat.graph.operators[op.index]
            removed.append((op.name, flat.tensor(y).name, how))
            changed = True
            break
    return removed


# Ops that pass integers on unchanged or compare them (input and output share one quantization): a
# grid moved to the top of int8 moves through them. Their int8 constants (a clamp's bound) move with it.
_LINKS = ("MAX_POOL_2D", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "PAD", "MAXIMUM", "MINIMUM",
          "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1")
# Ops that compute with `q - zero_point` of their output / input (any zero point, the same numbers).
# Not CONCATENATION: the XNNPACK delegate takes an int8 one and then fails to prepare it when its
# inputs' zero points differ.
_RELATIVE_WRITERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "MEAN", "QUANTIZE")
_RELATIVE_READERS = _RELATIVE_WRITERS + ("SOFTMAX", "LOGISTIC", "TANH", "DEQUANTIZE")


def _groups(flat, ops):
    """Sets of int8 tensors `_LINKS` ops join (one quantization passed on), each with the ops that touch it."""
    parent = {}

    def find(t):
        while parent.setdefault(t, t) != t:
            t = parent[t]
        return t

    for op in ops:
        if op.name in _LINKS:
            tensors = [i for i in op.inputs + op.outputs if i >= 0 and not flat.tensor(i).constant]
            for t in tensors[1:]:
                parent[find(t)] = find(tensors[0])
    groups = {}
    for t in list(parent):
        groups.setdefault(find(t), set()).add(t)
    return list(groups.values())


def _shift_of(flat, ops, group):
    """The zero-point move `127 - grid maximum` for a group of tensors, or None where it is not exact."""
    params = {_params(flat, t) for t in group}
    if len(params) != 1 or None in params:
        return None
    bounds = set()
    for op in ops:
        touched = [i for i in op.inputs + op.outputs if i in group]
        if not touched:
            continue
        if op.name in _LINKS:
            constants = [i for i in op.inputs if i >= 0 and flat.tensor(i).constant and flat.tensor(i).type == "INT8"]
            if constants and op.name not in ("MAXIMUM", "MINIMUM"):
                return None
            if op.name == "MINIMUM":
                if len(constants) != 1 or np.unique(flat.array(constants[0])).size != 1:
                    return None
                bounds.add(int(flat.array(constants[0]).reshape(-1)[0]))
            continue
        if any(i in group for i in op.outputs) and op.name not in _RELATIVE_WRITERS:
            return None
        if any(i in group for i in op.inputs) and op.name not in _RELATIVE_READERS:
            return None
    if len(bounds) != 1 or not _clamped_chains(flat, ops, group):
        return None
    shift = _INT8[1] - bounds.pop()
    return shift if shift > 0 and next(iter(params))[1] + shift <= _INT8[1] else None


def _is_lower_clamp(flat, op):
    clamp = _clamp(flat, op)
    return clamp is not None and op.name != "MINIMUM" and (clamp[2] is not None or clamp[3][0] > _INT8[0])


def _clamped_chains(flat, ops, group):
    """Whether every tensor of `group` holds the same integers once moved: each MINIMUM ends a chain
    `head -> lower clamp -> MINIMUM` (or MINIMUM first) whose inner tensors only that chain reads,
    and every other tensor of the group lies after a chain's end (through `_LINKS` ops).

    Moved, a chain's head and inner tensors saturate at other integers than before (int8's 127
    is now the grid's maximum, -128 lies below the grid), which only the chain's own clamps read.
    """
    users = _consumers(flat)
    producers = {o: op for op in ops for o in op.outputs}
    outputs = {int(i) for i in flat.graph.outputs}
    inner, after = set(), set()
    for op in ops:
        if op.name != "MINIMUM" or op.outputs[0] not in group:
            continue
        chain, x, has_lower = [op], _clamp(flat, op)[0], False
        while x is not None and len(chain) < 3:
            before = producers.get(x)
            if users.get(x, []) != [chain[-1].index] or x in outputs:
                return False
            inner.add(x)
            if before is None or _clamp(flat, before) is None or before.name == "MINIMUM":
                break
            has_lower = has_lower or _is_lower_clamp(flat, before)
            chain.append(before)
            x = _clamp(flat, before)[0]
        end = op.outputs[0]
        follower = [ops[i] for i in users.get(end, []) if _is_lower_clamp(flat, ops[i])]
        if not has_lower and len(users.get(end, [])) == 1 and follower and end not in outputs:
            inner.add(end)  # MINIMUM first, then the lower clamp
            end, has_lower = follower[0].outputs[0], True
        if not has_lower:
            return False
        after.add(end)
    for op in ops:  # what the chains' ends pass on
        if op.name in _LINKS and op.outputs and op.outputs[0] in group:
            variable = [i for i in op.inputs if i >= 0 and not flat.tensor(i).constant]
            if variable and all(i in after for i in variable):
                after.update(op.outputs)
    return group <= inner | after


def _own_constant(flat, op_index, index):
    """Constant input `index` of op `op_index` as a tensor of its own (a copy where other ops read it too)."""
    readers = sum(1 for op in flat.graph.operators for i in op.inputs if i == index)
    if readers == 1:
        return index
    clone = copy.deepcopy(flat.graph.tensors[index])
    flat.graph.tensors.append(clone)
    new = len(flat.graph.tensors) - 1
    op = flat.graph.operators[op_index]
    op.inputs = [new if i == index else i for i in op.inputs]
    return new


def shift_narrow_grids(flat) -> int:
    """Move each clamped narrow grid of `flat`'s main graph to the top of int8 (see the module); the number moved."""
    ops = flat.ops()
    moved = 0
    for group in _groups(flat, ops):
        shift = _shift_of(flat, ops, group)
        if shift is None:
            continue
        for t in group:
            q = flat.graph.tensors[t].quantization
            q.zeroPoint = [int(z) + shift for z in q.zeroPoint]
        for op in ops:
            if op.name in ("MAXIMUM", "MINIMUM") and any(i in group for i in op.outputs):
                for i in [i for i in op.inputs if i >= 0 and flat.tensor(i).constant]:
                    t = flat.tensor(i)
                    own = _own_constant(flat, op.index, i)
                    values = flat.array(own).astype(np.int32) + shift
                    flat.set_constant(own, np.clip(values, *_INT8), "INT8", t.scales, t.zero_points + shift)
        moved += 1
    return moved


def _max_pool_opcode(flat):
    """The index of MAX_POOL_2D in the model's operator codes (added if missing)."""
    schema = flatbuffer.tflite_schema()
    code = schema.BuiltinOperator.MAX_POOL_2D
    for i, c in enumerate(flat.model.operatorCodes):
        if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
            return i
    entry = schema.OperatorCodeT()
    entry.builtinCode = entry.deprecatedBuiltinCode = code
    entry.version = 2
    flat.model.operatorCodes.append(entry)
    return len(flat.model.operatorCodes) - 1


def pool_clamps(flat) -> int:
    """Write each clamp op left on a 4-D tensor as a 1x1 MAX_POOL_2D with that fused activation; the number.

    A RELU op, a RELU6 / RELU_N1_TO_1 op whose bounds both runtimes quantize alike, and a MAXIMUM at
    the zero point (a RELU) qualify: the pool's fused activation gives the same integer range.
    """
    schema = flatbuffer.tflite_schema()
    codes = {"RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
    done = 0
    for op in flat.ops():
        clamp = _clamp(flat, op)
        if clamp is None or len(flat.tensor(clamp[0]).shape) != 4 or op.name == "MINIMUM":
            continue
        x, _, floats, ints = clamp
        params = _params(flat, x)
        code = codes.get(op.name)
        if op.name == "MAXIMUM":
            code = 1 if ints[0] == params[1] else None
        elif code is not None and activation_bounds(*floats, *params, exact=True) is None:
            code = None
        if code is None:
            continue
        options = schema.Pool2DOptionsT()
        options.padding = schema.Padding.VALID
        options.strideW = options.strideH = options.filterWidth = options.filterHeight = 1
        options.fusedActivationFunction = code
        target = flat.graph.operators[op.index]
        target.opcodeIndex = _max_pool_opcode(flat)
        target.inputs = [x]
        target.builtinOptionsType = schema.BuiltinOptions.Pool2DOptions
        target.builtinOptions = options
        done += 1
    return done
