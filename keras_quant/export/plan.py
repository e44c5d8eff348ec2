"""What export writes for each quantized layer, and what a target cannot express.

`build_plan(model, mode)` reads the quantized Keras model eagerly (weights on
their grid, folded biases, every activation quantizer's `(scale, zero_point)`)
into a `kq.layers.inference.InferencePlan`, and `check(model, mode)` lists,
before any conversion, what the target format cannot hold: per-group or
asymmetric weight scales, activation grids wider than the storage type,
layers whose integer form TFLite does not have.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np

from keras_quant.errors import ExportError
from keras_quant.layers.inference import PREACTIVATION, InferencePlan
from keras_quant.layers import rules
from keras_quant.layers.rules import PREACTIVATION as PREACTIVATION_KEY
from keras_quant.layers.walk import quantizer_layers
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = ["MODES", "VariableValues", "WeightInfo", "build_plan", "check", "quantizer_layers", "weight_infos"]

# mode -> storage bits of activations (None: activations stay float).
MODES = {"int8": 8, "int16x8": 16, "dynamic": None, "float16": None, "float32": None}

def _export_blocker(wrapper):
    """Why an integer model cannot hold `wrapper`'s layer type, from its rule (`LayerRule.export_blocker`), or None.

    The rule registered for exactly that class: layers whose integer kernels TFLite lacks, or whose
    quantized form needs a tensor keras_quant does not quantize (the depthwise output inside a separable
    convolution). `export_per_tensor` lifts it when every weight has one scale (an Embedding as GATHER).
    """
    rule = rules.lookup(type(wrapper.layer))
    if rule is None or rule.export_blocker is None:
        return None
    if rule.export_per_tensor and all(spec.granularity == "per_tensor" for spec in wrapper.weight_specs.values()):
        return None
    return rule.export_blocker


@dataclasses.dataclass(frozen=True)
class WeightInfo:
    """One quantized weight as the integer model holds it.

    Attributes:
        layer: The wrapper's name.
        layer_type: The wrapped layer's class name.
        name: The weight's name (`"kernel"`).
        values: Float32 values on the grid (BatchNorm folded), Keras layout.
        scale: Per-channel (or scalar) scales, float32.
        zero_point: Integer zero points, same shape.
        bits: Grid width.
        bias: The float bias the integer layer adds (folded), or None.
        qmin: Lowest integer of the grid (e.g. -7 for narrow-range 4-bit).
        qmax: Highest integer of the grid.
    """

    layer: str
    layer_type: str
    name: str
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    bias: Optional[np.ndarray]
    qmin: int = -128
    qmax: int = 127


def _np(x, dtype="float32"):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=dtype)


class VariableValues:
    """Every variable of a model read once, as NumPy arrays; called like `_np`.

    One export reads each activation quantizer's `(scale, zero_point)` in its
    checks, its plan and its activation table, each weight scale in its plan
    and its weight table, and every variable for the frozen trace: reading each
    once (an eager op apiece; a model has hundreds of quantizer variables)
    spares the rest. Anything that is not one of the model's variables (a QAT
    scale computed from its variables) is read when asked for.
    """

    def __init__(self, model):
        self.arrays = {id(v): np.asarray(keras.ops.convert_to_numpy(v)) for v in model.variables}

    def __call__(self, x, dtype="float32"):
        value = self.arrays.get(id(x))
        return np.asarray(keras.ops.convert_to_numpy(x) if value is None else value, dtype=dtype)


def _activation_qparams(layer, read=_np):
    if isinstance(layer, QuantizeWrapper):
        if layer.output_quantizer is None:
            return None
        spec, qp = layer.output_quantizer.spec, layer.output_qparams
    else:
        spec, qp = layer.spec, layer.qparams
    scale, zero_point = (read(v).reshape(-1) for v in qp)
    return spec, scale, zero_point


def _activation_quantizers(layer, read=_np):
    """`[(plan_key, name, (spec, scale, zero_point))]` of a layer's activation quantizers (`read`: `_np` or a
    `VariableValues`)."""
    found = []
    if isinstance(layer, QuantizeWrapper) and layer.preactivation_qparams is not None:
        scale, zero_point = (read(v).reshape(-1) for v in layer.preactivation_qparams)
        found.append(((id(layer), PREACTIVATION), f"{layer.name}{PREACTIVATION_KEY}",
                      (layer.preactivation_quantizer.spec, scale, zero_point)))
    act = _activation_qparams(layer, read)
    if act is not None:
        found.append((id(layer), layer.name, act))
    return found


def _problems(model, mode, read=_np):
    """`[(layer, field, value, reason)]`: what `mode` cannot express."""
    storage = MODES[mode]
    out = []
    for layer in quantizer_layers(model):
        if isinstance(layer, QuantizeWrapper):
            reason = _export_blocker(layer) if storage is not None else None
            if reason is not None:
                out.append((layer.name, "layer_type", type(layer.layer).__name__, reason))
            for wname, spec in layer.weight_specs.items():
                if mode in ("float16", "float32"):
                    continue
                if spec.granularity == "per_group":
                    out.append((layer.name, f"{wname}.granularity", spec.granularity,
                                "TFLite and ONNX QDQ keep one weight scale per output channel, not per group"))
                if not spec.symmetric:
                    out.append((layer.name, f"{wname}.symmetric", spec.symmetric,
                                "integer kernels take symmetric weights (zero point 0)"))
                if spec.bits > 8:
                    out.append((layer.name, f"{wname}.bits", spec.bits, "weights are stored as int8: at most 8 bits"))
        if storage is None:
            continue
        for _, _, (spec, scale, zero_point) in _activation_quantizers(layer, read):
            out += _activation_problems(layer, mode, storage, spec, scale, zero_point)
    return out


def _activation_problems(layer, mode, storage, spec, scale, zero_point):
    if spec.granularity != "per_tensor" or scale.size != 1:
        return [(layer.name, "activations.granularity", spec.granularity, "activations are quantized per tensor")]
    out = []
    if spec.bits > storage:
        hint = "; export with mode='int16x8'" if storage == 8 and spec.bits <= 16 else ""
        out.append((layer.name, "activations.bits", spec.bits,
                    f"mode='{mode}' stores activations in {storage} bits{hint}"))
    if storage == 16 and int(round(float(zero_point[0]))) != 0:
        out.append((layer.name, "activations.zero_point", int(round(float(zero_point[0]))),
                    "16x8 files hold symmetric int16 activations (zero point 0); quantize with "
                    "kq.QuantConfig.int16x8() or a symmetric activation spec"))
    return out


def check(model, mode, values=None):
    """Raise `ExportError` listing everything `mode` cannot express in `model`, before conversion.

    Args:
        model: A model from `kq.quantize_model` (or any Keras model for `"float16"` / `"dynamic"`).
        mode: `"int8"`, `"int16x8"`, `"dynamic"` or `"float16"`.
        values: The model's `VariableValues`, when the caller has read them (else read here).
    """
    if mode not in MODES:
        raise ExportError("mode", mode, f"mode must be one of {tuple(MODES)}")
    if not isinstance(model, keras.Model):
        raise ExportError("model", type(model).__name__, "expected a keras.Model")
    if MODES[mode] is not None and not quantizer_layers(model):
        raise ExportError("model", model.name, f"mode='{mode}' needs a quantized model (kq.quantize_model) with "
                          "keras_quant quantizers; this model has none")
    problems = _problems(model, mode, values or _np)
    if problems:
        layer, field, value, reason = problems[0]
        raise ExportError(field, value, reason, layer=layer, problems=problems)


def weight_infos(model, quantize=True, plan=None, values=None) -> List[WeightInfo]:
    """The quantized weights of every wrapper, read now (grid values, scales, folded bias).

    `plan`: the model's `build_plan` in a weight-quantizing mode, whose values
    are these (read from it, not computed again); `values`: the model's
    `VariableValues`, when the caller has read them.
    """
    read = values or _np
    infos = []
    for layer in quantizer_layers(model):
        if not isinstance(layer, QuantizeWrapper) or not layer.weight_specs:
            continue
        if plan is not None and id(layer) in plan.weights:
            weights, folded_bias = plan.weights[id(layer)], plan.folded_bias.get(id(layer))
        else:
            weights, folded_bias = layer.inference_weights(quantize=quantize)
        qparams = layer.weight_qparams
        bias = folded_bias
        if bias is None and getattr(layer.layer, "use_bias", False):
            bias = read(layer.layer.bias)
        for wname, spec in layer.weight_specs.items():
            scale, zero_point = qparams[wname]
            infos.append(WeightInfo(layer.name, type(layer.layer).__name__, wname, weights[wname], read(scale),
                                    read(zero_point).round().astype("int32"), spec.bits, bias, spec.qmin, spec.qmax))
    return infos


def build_plan(model, mode, values=None):
    """The `InferencePlan` export traces `model` with in `mode` (see `kq.layers.inference`); `values`: the
    model's `VariableValues`, when the caller has read them."""
    storage = MODES[mode]
    plan = InferencePlan(storage_bits=storage)
    quantize_weights = mode not in ("float16", "float32")
    read = values or _np
    for layer in quantizer_layers(model):
        if isinstance(layer, QuantizeWrapper):
            weights, folded_bias = layer.inference_weights(quantize=quantize_weights)
            plan.weights[id(layer)] = weights
            if folded_bias is not None:
                plan.folded_bias[id(layer)] = folded_bias
        for key, _, (spec, scale, zero_point) in (_activation_quantizers(layer, read) if storage is not None else ()):
            plan.activations[key] = (spec, float(scale[0]), int(round(float(zero_point[0]))))
    return plan


def activation_table(model, values=None) -> Dict[str, Tuple[float, int, int]]:
    """`{layer_name: (scale, zero_point, bits)}` of every per-tensor activation quantizer (`values`: the
    model's `VariableValues`, when the caller has read them)."""
    table = {}
    for layer in quantizer_layers(model):
        for _, name, (spec, scale, zero_point) in _activation_quantizers(layer, values or _np):
            if scale.size == 1:
                table[name] = (float(scale[0]), int(round(float(zero_point[0]))), spec.bits)
    return table
