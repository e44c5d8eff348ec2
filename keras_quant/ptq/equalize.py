"""`equalize(model, data)`: cross-layer equalization and high-bias absorption of a float model, before
calibration and quantization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction", sections 4.1 and 4.2.1; AIMET's `equalize_model`).

A compute layer whose output reaches exactly one other compute layer through a positively homogeneous
path (`layer1 -> [BatchNormalization] -> [ReLU | linear] -> layer2`, with zero padding, dropout and
pooling allowed in between) can move a positive factor `s_i` per channel from one to the other:
`relu(x / s) * s == relu(x)`. Choosing `s_i = sqrt(r1_i / r2_i)` (the paper's
`s_i = sqrt(r1_i r2_i) / r2_i`), where `r1_i` is the range of layer1's BN-folded output channel `i` and
`r2_i` that of layer2's (BN-folded) input channel `i`, gives both the same range, so that per-tensor
weight grids waste fewer levels on a few wide channels. Chains (conv -> depthwise -> pointwise) are
swept until the scales converge. A BatchNormalization between carries the scale in its gamma and beta.

ReLU6 (any ReLU with a `max_value`) is not positively homogeneous: `relu6(x / s) * s == min(max(x, 0),
6 s)`. `relu6="bounded"` only equalizes a channel within the scales where, on `data`, its
pre-activation never reaches the clip, before or after; `"replace"` replaces ReLU6 by ReLU (as the paper
and AIMET do; the function changes where activations exceeded 6); `"skip"` leaves such pairs alone.

High-bias absorption moves `c_i >= 0` from layer1's output channel bias (or BN beta) into layer2's bias
(`W2 . c`), where the ReLU between sees `x >= c`: `relu(x - c) == relu(x) - c`. With `data`,
`c_i` is the observed minimum of the pre-activation, clipped at 0 (exact on the data); without it, the
paper's rule `max(0, beta_i - 3 |gamma_i|)` from the BatchNormalization (approximate: the tail below
`beta - 3 gamma` changes).

Example:

>>> eq = kq.ptq.equalize(model, data=x_calib[:256])                      # doctest: +SKIP
>>> print(eq.equalization_report)                                        # doctest: +SKIP
>>> qmodel = kq.quantize_model(eq, config, calibration=result)           # doctest: +SKIP
"""

import dataclasses
import math
from typing import Tuple

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant import runtime
from keras_quant.errors import ConfigError, check_int, is_number
from keras_quant.formatting import text_table
from keras_quant.layers.rules import without_activation

__all__ = ["EqualizedPair", "Equalization", "equalize"]

RELU6_MODES = ("bounded", "replace", "skip")
L = keras.layers
COMPUTE = (L.Conv2D, L.Dense, L.DepthwiseConv2D, L.Conv1D)
# Layers between layer1 and layer2 that commute with a positive per-channel scale (and a zero stays a zero).
PASS_THROUGH = (L.ZeroPadding1D, L.ZeroPadding2D, L.Dropout, L.Identity, L.MaxPooling1D, L.MaxPooling2D,
                L.AveragePooling1D, L.AveragePooling2D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
                L.GlobalMaxPooling1D, L.GlobalMaxPooling2D)
PADDING = (L.ZeroPadding1D, L.ZeroPadding2D)


@dataclasses.dataclass(frozen=True)
class EqualizedPair:
    """One equalized pair.

    Attributes:
        layer1: The layer whose output channels were divided by `scales`.
        layer2: The layer whose input channels were multiplied by `scales`.
        path: The layers between, e.g. `"bn -> relu"`.
        scales: Per channel, the factor moved from layer1 to layer2 (all sweeps together).
        ratio_before: Per channel, `r1_i / r2_i` (BN-folded weight ranges) before equalization.
        ratio_after: The same after.
        clamped: Channels whose scale the ReLU6 bound limited (`relu6="bounded"`).
    """

    layer1: str
    layer2: str
    path: str
    scales: np.ndarray
    ratio_before: np.ndarray
    ratio_after: np.ndarray
    clamped: int = 0


@dataclasses.dataclass(frozen=True)
class Equalization:
    """What `equalize` did, as `model.equalization_report` of the model it returns.

    Attributes:
        pairs: The equalized `EqualizedPair`s, in graph order.
        absorbed: `(layer1, layer2, channels, mean c, max c, into)` per high-bias absorption: `c` was
            taken from layer1's output and `W2 . c` added to `into` (`"bias"`, `"moving_mean"` of
            layer2's BatchNormalization, or `"new bias"`).
        absorb_rule: `"data minimum"` or `"beta - 3 gamma"` (no data), or None (not asked for).
        skipped: `(layer or pair, reason)` for candidates left alone.
        replaced: Layers whose ReLU6 became ReLU (`relu6="replace"`).
        notes: Other remarks (e.g. `"bounded"` without data).
        sweeps: Sweeps over the pairs run; `converged`: whether the last one moved no scale by more
            than `tolerance`.
        num_samples: Samples of `data` read (0 without data).
    """

    pairs: Tuple[EqualizedPair, ...]
    absorbed: Tuple[tuple, ...]
    absorb_rule: object
    skipped: Tuple[Tuple[str, str], ...]
    replaced: Tuple[str, ...]
    notes: Tuple[str, ...]
    sweeps: int
    converged: bool
    num_samples: int

    def table(self) -> str:
        """The report as a plain-text table, one row per equalized pair."""
        rows = [{"layer1": p.layer1, "layer2": p.layer2, "path": p.path, "channels": len(p.scales),
                 "max ratio before": _spread(p.ratio_before), "max ratio after": _spread(p.ratio_after),
                 "clamped": p.clamped} for p in self.pairs]
        return text_table(rows)

    def __str__(self):
        lines = [f"cross-layer equalization: {len(self.pairs)} pairs equalized in {self.sweeps} sweeps "
                 f"({'converged' if self.converged else 'not converged'}), {len(self.absorbed)} high biases "
                 f"absorbed, {len(self.skipped)} skipped"]
        if self.pairs:
            lines.append(self.table())
        lines += [f"absorbed {a} -> {b}: {n} channels, mean c {m:.4g}, max c {x:.4g}, into {into} "
                  f"({self.absorb_rule})" for a, b, n, m, x, into in self.absorbed]
        lines += [f"replaced ReLU6 by ReLU in {name}" for name in self.replaced]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines + list(self.notes))


def _spread(ratio):
    """The worst per-channel imbalance, `max(r, 1/r)`."""
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.max(np.maximum(ratio, 1.0 / ratio))) if ratio.size else 1.0


# The graph: which pairs there are ---------------------------------------------------------------------
@dataclasses.dataclass
class _Pair:
    layer1: object
    layer2: object
    bn: object  # the BatchNormalization carrying layer1's scale, or None
    act: str  # "linear", "relu" or "bounded"
    bound: object  # the clip of a bounded ReLU
    act_layer: object  # the layer applying the activation (layer1 itself where it is its own), or None
    padded: bool  # zero padding between: the border would not follow a shifted bias
    point: tuple  # (tensor, layer or None): where the pre-activation is read on data
    path: str


def _activation_kind(layer):
    """`(kind, bound)` of an activation layer or a compute layer's own activation; kind None if not allowed."""
    if isinstance(layer, L.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None, None
        return ("relu", None) if layer.max_value is None else ("bounded", float(layer.max_value))
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", "linear") if fn is not None else "linear"
    return {"linear": ("linear", None), "relu": ("relu", None), "relu6": ("bounded", 6.0)}.get(name, (None, None))


def _compute_reason(layer, calls):
    """Why a compute layer cannot take part in a pair, or None (`calls`: `graph_lib.index`'s, of this graph:
    a loaded Sequential's layers also keep the nodes of the graph it was rebuilt from)."""
    if type(layer) not in COMPUTE:
        return f"a {type(layer).__name__}"
    if len(calls.get(layer.name, ())) != 1:
        return "called more than once"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "channels_first"
    if getattr(layer, "groups", 1) != 1:
        return "a grouped convolution"
    return None


def _trace(node, readers, outputs, calls):
    """The `_Pair` starting at a compute layer's node, or the reason there is none."""
    layer1 = graph_lib.operation_of(node)
    act, bound = _activation_kind(layer1)
    if act is None:
        return f"its activation {layer1.activation.__name__!r} is not positively homogeneous"
    tensor = graph_lib.node_outputs(node)[0]
    bn, act_layer, padded, names = None, (layer1 if act != "linear" else None), False, []
    point = (graph_lib.node_inputs(node)[0], layer1) if act_layer is not None else (tensor, None)
    while True:
        if id(tensor) in outputs:
            return "its output is a model output"
        nxt = readers.get(id(tensor), [])
        if len(nxt) != 1:
            return f"its output is read by {len(nxt)} layers"
        op = graph_lib.operation_of(nxt[0])
        if graph_lib.is_layer(op) and len(calls.get(op.name, ())) != 1:
            return f"{op.name} is called more than once"
        if type(op) in COMPUTE:
            reason = _compute_reason(op, calls)
            if reason:
                return f"its reader {op.name} is {reason}"
            return _Pair(layer1, op, bn, act, bound, act_layer, padded, point, " -> ".join(names) or "direct")
        tensor = graph_lib.node_outputs(nxt[0])[0]
        if isinstance(op, L.BatchNormalization) and not names and act_layer is None:
            if not _foldable(op, tensor):
                return f"{op.name}: a BatchNormalization without a last-axis gamma"
            bn, point = op, (tensor, None)
        elif isinstance(op, (L.Activation, L.ReLU)) and act_layer is None:
            act, bound = _activation_kind(op)
            if act is None:
                return f"{op.name}: activation is not positively homogeneous"
            act_layer = op
        elif isinstance(op, PASS_THROUGH) and getattr(op, "data_format", "channels_last") == "channels_last":
            padded = padded or isinstance(op, PADDING)
        else:
            return f"reaches {op.name} (a {type(op).__name__}), not a per-channel scalable path"
        names.append(op.name)


def _foldable(bn, tensor):
    return bn.axis in (-1, len(tensor.shape) - 1) and bool(bn.scale)


def _find_pairs(graph):
    readers, calls = graph_lib.index(graph)
    outputs = {id(t) for t in graph.outputs}
    pairs, skipped = [], []
    for node in graph_lib.nodes(graph):
        layer = graph_lib.operation_of(node)
        if type(layer) not in COMPUTE:
            continue
        found = _compute_reason(layer, calls) or _trace(node, readers, outputs, calls)
        if isinstance(found, _Pair):
            pairs.append(found)
        else:
            skipped.append((layer.name, found))
    return pairs, skipped


def _folded_bn(graph):
    """`{compute layer name: BatchNormalization}` for a BN that alone reads a linear compute layer (it folds)."""
    readers, calls = graph_lib.index(graph)
    found = {}
    for node in graph_lib.nodes(graph):
        layer = graph_lib.operation_of(node)
        if type(layer) not in COMPUTE or _activation_kind(layer)[0] != "linear":
            continue
        nxt = readers.get(id(graph_lib.node_outputs(node)[0]), [])
        bn = graph_lib.operation_of(nxt[0]) if len(nxt) == 1 else None
        if isinstance(bn, L.BatchNormalization) and _foldable(bn, graph_lib.node_outputs(nxt[0])[0]) \
                and len(calls.get(bn.name, ())) == 1:
            found[layer.name] = bn
    return found


# The weights, as numpy -----------------------------------------------------------------------------------
class _Unit:
    """A compute layer's kernel and bias (float64) and the BatchNormalization folded after it, if any."""

    def __init__(self, layer, bn):
        self.layer, self.bn_layer = layer, bn
        self.kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
        self.bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float64) if layer.use_bias else None
        self.bn = None
        if bn is not None:
            get = lambda v, default: (np.asarray(keras.ops.convert_to_numpy(v), np.float64) if v is not None
                                      else default)
            n = self.channels_out
            self.bn = {"gamma": get(bn.gamma, np.ones(n)), "beta": get(bn.beta, np.zeros(n)),
                       "mean": get(bn.moving_mean, None), "var": get(bn.moving_variance, None)}

    @property
    def depthwise(self):
        return isinstance(self.layer, L.DepthwiseConv2D)

    @property
    def channels_out(self):
        k = self.kernel
        return k.shape[-2] * k.shape[-1] if self.depthwise else k.shape[-1]

    def fold(self):
        """Per output channel, the factor a folded BatchNormalization multiplies the kernel by."""
        if self.bn is None:
            return np.ones(self.channels_out)
        return self.bn["gamma"] / np.sqrt(self.bn["var"] + float(self.bn_layer.epsilon))

    def out_range(self):
        k = self.kernel.reshape(-1, self.channels_out)
        return np.max(np.abs(k), axis=0) * np.abs(self.fold())

    def in_range(self):
        k = np.abs(self.kernel * self.fold().reshape(self.kernel.shape[-2:] if self.depthwise else -1))
        return np.max(np.moveaxis(k, -2, 0).reshape(k.shape[-2], -1), axis=1)

    def scale_out(self, s):
        """Divide output channel i by s_i (through the BN's gamma and beta where there is one)."""
        if self.bn is not None:
            self.bn["gamma"] = self.bn["gamma"] / s
            self.bn["beta"] = self.bn["beta"] / s
            return
        self.kernel = self.kernel / s.reshape(self.kernel.shape[-2:] if self.depthwise else -1)
        if self.bias is not None:
            self.bias = self.bias / s

    def scale_in(self, s):
        """Multiply input channel i by s_i."""
        shape = [1] * self.kernel.ndim
        shape[-2] = -1
        self.kernel = self.kernel * s.reshape(shape)

    def absorbed_shift(self, c):
        """`W . c` per output channel: what a constant input `c` per channel adds to the linear output."""
        k = self.kernel.reshape((-1,) + self.kernel.shape[-2:])  # (spatial, in, out or multiplier)
        if self.depthwise:
            return np.sum(k * c[:, None], axis=0).reshape(-1)
        return np.einsum("sio,i->o", k, c)

    def write(self, layer, bn):
        layer.kernel.assign(self.kernel.astype(keras.backend.standardize_dtype(layer.kernel.dtype)))
        if self.bias is not None:
            layer.bias.assign(self.bias.astype(keras.backend.standardize_dtype(layer.bias.dtype)))
        if self.bn is not None:
            for key, var in (("gamma", bn.gamma), ("beta", bn.beta), ("mean", bn.moving_mean),
                             ("var", bn.moving_variance)):
                if var is not None:
                    var.assign(self.bn[key].astype(keras.backend.standardize_dtype(var.dtype)))


# Statistics on data ----------------------------------------------------------------------------------------
def _statistics(graph, pairs, xs, batch_size):
    """`{layer1 name: (max, min)}` per channel of each pair's pre-activation on the samples."""
    tensors = list({id(p.point[0]): p.point[0] for p in pairs}.values())
    where = {id(t): i for i, t in enumerate(tensors)}
    probe = keras.Model(graph.inputs, tensors)
    stats = {}
    for start in range(0, int(xs[0].shape[0]), batch_size):
        outs = probe([x[start:start + batch_size] for x in xs], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for p in pairs:
            y = outs[where[id(p.point[0])]]
            if p.point[1] is not None:
                with without_activation(p.point[1]):
                    y = p.point[1](y, training=False)
            y = keras.ops.reshape(keras.ops.cast(y, "float32"), (-1, y.shape[-1]))
            hi = np.asarray(keras.ops.convert_to_numpy(keras.ops.max(y, axis=0)), np.float64)
            lo = np.asarray(keras.ops.convert_to_numpy(keras.ops.min(y, axis=0)), np.float64)
            old = stats.get(p.layer1.name)
            stats[p.layer1.name] = (hi, lo) if old is None else (np.maximum(old[0], hi), np.minimum(old[1], lo))
    return stats


# The algorithm -----------------------------------------------------------------------------------------------
def _lower_bounds(pair, stats):
    """Per channel, the smallest total scale keeping a bounded ReLU's input under its clip on the data
    (`m / S < bound`), or +inf where the channel reaches the clip already (its scale stays 1)."""
    peak = stats[pair.layer1.name][0]
    low = np.where(peak > 0, peak / pair.bound * (1 + 1e-6), 0.0)
    return np.where(peak >= pair.bound, np.inf, np.minimum(low, 1.0))


def _sweeps(pairs, units, bounds, iterations, tolerance):
    """Sweep the pairs in graph order until no scale moves by more than `tolerance` (relative).

    Returns `(total scale per pair, sweeps, converged, clamped channels per pair)`."""
    totals = [np.ones(units[p.layer1.name].channels_out) for p in pairs]
    clamped = [np.zeros(len(t), bool) for t in totals]
    for sweep in range(1, iterations + 1):
        moved = 0.0
        for i, p in enumerate(pairs):
            u1, u2 = units[p.layer1.name], units[p.layer2.name]
            r1, r2 = u1.out_range(), u2.in_range()
            ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
            s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
            lo = bounds.get(i)
            if lo is not None:
                want = totals[i] * s
                total = np.where(np.isinf(lo), 1.0, np.maximum(want, np.where(np.isinf(lo), 0.0, lo)))
                clamped[i] = np.isinf(lo) | (want < total)
                s = total / totals[i]
            totals[i] = totals[i] * s
            u1.scale_out(s)
            u2.scale_in(s)
            moved = max(moved, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
        if moved <= tolerance:
            return totals, sweep, True, clamped
    return totals, iterations, False, clamped


def _absorb_reason(pair, unit1, unit2, stats):
    """Why a pair's high bias cannot be absorbed, or None."""
    if pair.act == "linear":
        return "no ReLU between"
    if pair.padded:
        return "zero padding between: the padded border would not be shifted"
    layer2 = pair.layer2
    if isinstance(layer2, (L.Conv1D, L.Conv2D, L.DepthwiseConv2D)) and layer2.padding != "valid" \
            and any(int(k) != 1 for k in layer2.kernel_size):
        return f"{layer2.name} pads its input ({layer2.padding!r}): its border would differ"
    if unit1.bn is not None and not pair.bn.center:
        return f"{pair.bn.name} has no beta"
    if unit1.bn is None and unit1.bias is None:
        return f"{pair.layer1.name} has no bias"
    if stats is None and unit1.bn is None:
        return "no BatchNormalization statistics and no data"
    return None


def _absorb(pair, units, stats, total, new_bias):
    """Move the high bias of a pair's layer1 into layer2; `(channels, mean c, max c, into)` or a reason."""
    unit1, unit2 = units[pair.layer1.name], units[pair.layer2.name]
    reason = _absorb_reason(pair, unit1, unit2, stats)
    if reason:
        return reason
    if stats is not None:
        peak, low = (v / total for v in stats[pair.layer1.name])
        c = np.maximum(low, 0.0)
    else:
        peak, c = None, np.maximum(unit1.bn["beta"] - 3.0 * np.abs(unit1.bn["gamma"]), 0.0)
    if pair.act == "bounded":  # relu6(x - c) == relu6(x) - c only where x stays under the clip
        c = np.where(peak < pair.bound, c, 0.0)
    if not np.any(c > 0):
        return "no channel with a high bias"
    shift = unit2.absorbed_shift(c)
    if unit2.bias is not None:
        unit2.bias, into = unit2.bias + shift, "bias"
    elif unit2.bn is not None:
        unit2.bn["mean"], into = unit2.bn["mean"] - shift, "moving_mean"
    else:
        unit2.bias, into = shift, "new bias"
        new_bias.add(pair.layer2.name)
    if unit1.bn is not None:
        unit1.bn["beta"] = unit1.bn["beta"] - c
    else:
        unit1.bias = unit1.bias - c
    return int(np.sum(c > 0)), float(np.mean(c)), float(np.max(c)), into


def _clone(graph, units, replaced, new_bias):
    """A Functional clone of the graph with the original weights, then the units' new ones."""
    originals = {layer.name: layer for layer in graph.layers}

    def clone_fn(layer):
        config = layer.get_config()
        if layer.name in new_bias:
            config["use_bias"] = True
        if layer.name in replaced:
            if isinstance(layer, L.ReLU):
                config["max_value"] = None
            else:
                config["activation"] = "relu"
        return type(layer).from_config(config)

    clone = keras.models.clone_model(graph, clone_function=clone_fn)
    for layer in clone.layers:
        if layer.name not in originals:
            continue
        weights = originals[layer.name].get_weights()
        if layer.name in new_bias:
            weights = weights + [np.zeros(units[layer.name].channels_out)]
        if weights:
            layer.set_weights(weights)
    by_name = {layer.name: layer for layer in clone.layers}
    for name, unit in units.items():
        unit.write(by_name[name], by_name[unit.bn_layer.name] if unit.bn_layer is not None else None)
    return clone


def _check_options(relu6, absorb_high_bias, iterations, tolerance, batch_size):
    if relu6 not in RELU6_MODES:
        raise ConfigError("relu6", relu6, f"relu6 must be one of {RELU6_MODES}")
    if not isinstance(absorb_high_bias, (bool, np.bool_)):
        raise ConfigError("absorb_high_bias", absorb_high_bias, "absorb_high_bias must be True or False")
    iterations = check_int("iterations", iterations)
    if not is_number(tolerance) or not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError("tolerance", tolerance, "tolerance must be a finite number >= 0")
    return iterations, float(tolerance), check_int("batch_size", batch_size)


def _select(pairs, relu6, have_data):
    """Split the pairs by the ReLU6 option: `(kept, skipped, replaced layer names, notes)`."""
    kept, skipped, replaced, notes = [], [], [], []
    for p in pairs:
        if p.act != "bounded":
            kept.append(p)
        elif relu6 == "replace":
            p.act, p.bound = "relu", None
            replaced.append(p.act_layer.name)
            kept.append(p)
        elif relu6 == "bounded" and have_data:
            kept.append(p)
        else:
            why = "relu6='skip'" if relu6 == "skip" else "relu6='bounded' needs data"
            skipped.append((f"{p.layer1.name} -> {p.layer2.name}", f"a bounded ReLU between ({why})"))
    if relu6 == "bounded" and not have_data and any(p.act == "bounded" for p in pairs):
        notes.append("relu6='bounded' without data: pairs through a ReLU6 were skipped (as relu6='skip')")
    if replaced:
        notes.append("relu6='replace': the function differs where a replaced ReLU6 saw inputs above its clip")
    return kept, skipped, replaced, notes


def equalize(model, data=None, relu6="bounded", absorb_high_bias=True, iterations=100, tolerance=1e-6,
             max_samples=512, batch_size=64):
    """Cross-layer equalization and high-bias absorption of a float model: a new, equivalent model.

    Finds each pair `layer1 -> [BatchNormalization] -> [ReLU | ReLU6 | linear] -> layer2` (layer1 and
    layer2 Conv2D, Dense, DepthwiseConv2D or Conv1D, each called once; zero padding, dropout and pooling
    allowed between; the tensors between read by the next layer only, so no Add or Concatenate), divides
    layer1's output channel `i` (kernel and bias, or the BatchNormalization's gamma and beta) by
    `s_i = sqrt(r1_i / r2_i)` and multiplies layer2's input channel `i` by it, where `r1_i` and `r2_i` are
    the ranges (max |w|) of the BN-folded weights. Pairs are swept in graph order until no scale moves by
    more than `tolerance`, so chains (conv -> depthwise -> pointwise) converge to balanced ranges. Then,
    with `absorb_high_bias`, each pair through a ReLU moves `c_i >= 0` from layer1's bias into layer2's
    (see the module's doc for `c`). The user's model is not modified.

    Args:
        model: A float Functional or Sequential Keras model.
        data: Optional samples (an array, batch on axis 0, or a list of arrays for several inputs). Needed
            by `relu6="bounded"`; with data, the absorbed bias is the observed pre-activation minimum.
        relu6: `"bounded"`: equalize a channel through a ReLU6 (any ReLU with a `max_value`) only with
            scales keeping its pre-activation, before and after, under the clip on `data` (channels that
            reach it keep scale 1); without data, as `"skip"` (noted in the report). `"replace"`: replace
            those ReLU6 by ReLU, as the paper and AIMET do (the function changes where activations
            exceeded 6; the report lists the layers). `"skip"`: leave such pairs alone.
        absorb_high_bias: Whether to absorb high biases (section 4.2.1). The result is exact on `data`
            when given; without data the paper's `beta - 3 gamma` rule changes the tail below it.
        iterations: Most sweeps over the pairs.
        tolerance: Convergence: the largest `|log s_i|` of a sweep.
        max_samples: The first this many samples of `data` are read.
        batch_size: Samples per batch of the statistics pass.

    Returns:
        A Functional `keras.Model` with the same layers (a layer2 without bias may gain one for an
        absorbed bias; a replaced ReLU6 is a ReLU) and equalized weights, whose outputs equal the
        model's to float rounding (except as documented for `relu6="replace"` and absorption without
        data). Its `equalization_report` attribute is an `Equalization`.

    Raises:
        ConfigError: A model that is not Functional / Sequential, a bad option.
        ShapeMismatchError: `data` does not fit the model's inputs.

    Example:

    >>> eq = kq.ptq.equalize(model, data=x_calib[:256])                  # doctest: +SKIP
    >>> print(eq.equalization_report)                                    # doctest: +SKIP
    """
    graph = graph_lib.require_functional(model, "model")
    iterations, tolerance, batch_size = _check_options(relu6, absorb_high_bias, iterations, tolerance, batch_size)
    xs = None if data is None else runtime.graph_samples(graph, data, max_samples, "equalize")
    pairs, skipped = _find_pairs(graph)
    pairs, relu6_skipped, replaced, notes = _select(pairs, relu6, xs is not None)
    skipped += relu6_skipped
    stats = _statistics(graph, pairs, xs, batch_size) if xs is not None and pairs else None
    folded = _folded_bn(graph)
    units = {}
    for p in pairs:
        for layer in (p.layer1, p.layer2):
            units.setdefault(layer.name, _Unit(layer, folded.get(layer.name)))
    before = [units[p.layer1.name].out_range() / units[p.layer2.name].in_range() for p in pairs]
    bounds = {i: _lower_bounds(p, stats) for i, p in enumerate(pairs) if p.act == "bounded"}
    totals, sweeps, converged, clamped = _sweeps(pairs, units, bounds, iterations, tolerance)
    done = tuple(EqualizedPair(p.layer1.name, p.layer2.name, p.path, totals[i], before[i],
                               units[p.layer1.name].out_range() / units[p.layer2.name].in_range(),
                               int(np.sum(clamped[i])))
                 for i, p in enumerate(pairs))
    absorbed, new_bias = [], set()
    for i, p in enumerate(pairs if absorb_high_bias else ()):
        result = _absorb(p, units, stats, totals[i], new_bias)
        if isinstance(result, str):
            skipped.append((f"{p.layer1.name} -> {p.layer2.name}", f"high-bias absorption: {result}"))
        else:
            absorbed.append((p.layer1.name, p.layer2.name) + result)
    clone = _clone(graph, units, set(replaced), new_bias)
    rule = None if not absorb_high_bias else ("data minimum" if stats is not None else "beta - 3 gamma")
    clone.equalization_report = Equalization(
        pairs=done, absorbed=tuple(absorbed), absorb_rule=rule, skipped=tuple(skipped), replaced=tuple(replaced),
        notes=tuple(notes), sweeps=sweeps, converged=converged, num_samples=0 if xs is None else len(xs[0]))
    return clone
