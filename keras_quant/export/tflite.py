"""`export_tflite`: a TFLite / LiteRT file whose scales and zero points are keras_quant's.

The quantized Keras model is traced in its inference form
(`kq.layers.inference`): weights as constants on their grid, every
activation quantizer as a constant-range `FakeQuantWithMinMaxArgs`. The
TFLite converter turns each fake-quant op into a quantized tensor with
exactly that range (the quantization-aware-training path: no representative
dataset, so the converter calibrates nothing itself), and quantizes the
constant weights; `flatbuffer.set_weight_scales` then writes keras_quant's
weight scales wherever the converter chose others (sub-8-bit grids, clipped
or learned ranges) and the int64 biases 16x8 kernels need.

Before conversion, `plan.check` reports by name what the mode cannot express;
after it, every compute op left in float is traced back to its layer: a
quantized layer that the converter left in float is an `ExportError`, a
layer the config kept in float is listed in the report.

Example:

>>> qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=result)
>>> report = kq.export_tflite(qmodel, "model.tflite", mode="int8")
>>> print(report)
"""

import collections
import dataclasses
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np

from keras_quant.calibration.result import write_atomic
from keras_quant.errors import ConfigError, ExportError
from keras_quant.export import flatbuffer, plan as plan_lib
from keras_quant.layers.inference import inference_scope

__all__ = ["export_tflite", "tflite_bytes", "ExportReport", "IO_TYPES"]

# mode -> allowed input/output types, default first.
IO_TYPES = {
    "int8": ("int8", "uint8", "float32"),
    "int16x8": ("int16", "float32"),
    "dynamic": ("float32",),
    "float16": ("float32",),
    "float32": ("float32",),
}
# Ops that move data between float and integer, or only shape it.
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
_COMPUTE_FREE = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "PACK", "UNPACK", "STRIDED_SLICE", "GATHER",
                 "CAST", "TRANSPOSE", "CONCATENATION", "PAD", "PADV2"}


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What an export wrote, read back from the file.

    Attributes:
        path: The file written.
        format: `"tflite"` or `"onnx"`.
        mode: The export mode (`"int8"`, `"int16x8"`, `"dynamic"`, `"float16"`, or ONNX `"qdq"`).
        size_bytes: File size.
        ops: `{op_name: count}`.
        float_ops: `(op_name, tensor_name, layers)` of compute ops left in
            float (layers the config keeps in float).
        weights: `(layer, bits, storage)` of every quantized weight; a grid
            narrower than its storage (4-bit values in int8) says so.
        activations: `(layer, scale, zero_point, bits)` of every activation
            quantizer keras_quant wrote.
        input_type: Type of the model input (`"int8"`, `"float32"`, ...).
        output_type: Type of the model output.
        notes: Sentences about choices made (storage of narrow grids, scales rewritten).
    """

    path: str
    format: str
    mode: str
    size_bytes: int
    ops: Dict[str, int]
    float_ops: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = ()
    weights: Tuple[Tuple[str, int, str], ...] = ()
    activations: Tuple[Tuple[str, float, int, int], ...] = ()
    input_type: str = "float32"
    output_type: str = "float32"
    notes: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self):
        lines = [
            f"{self.format} {self.mode}: {self.path} ({self.size_bytes / 1024:.1f} KiB), "
            f"input {self.input_type}, output {self.output_type}",
            "ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items())),
        ]
        if self.float_ops:
            lines.append("float ops: " + ", ".join(f"{op} ({'/'.join(layers) or name})"
                                                   for op, name, layers in self.float_ops))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _input_specs(model, batch_size):
    import tensorflow as tf

    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ExportError("model.inputs", None, "export needs a model with known inputs (a Functional or "
                          "Sequential model, or a subclassed model that has been built by calling it on "
                          "keras.Input tensors)", layer=model.name)
    specs = []
    for i, t in enumerate(inputs):
        shape = (batch_size,) + tuple(t.shape[1:])
        if any(d is None for d in shape[1:]):
            raise ExportError("input_shape", tuple(t.shape), "export needs every input dimension but the batch "
                              "known", layer=model.name)
        specs.append(tf.TensorSpec(shape, t.dtype, name=f"input_{i}"))
    return specs


def concrete_function(model, plan, batch_size=1):
    """`model`'s inference form traced with `plan` and frozen (variables become constants)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    specs = _input_specs(model, batch_size)
    single = len(specs) == 1

    def serve(*xs):
        return model(xs[0] if single else list(xs), training=False)

    with inference_scope(plan):
        cf = tf.function(serve, autograph=False).get_concrete_function(*specs)
    return convert_variables_to_constants_v2(cf)


def _converter(cf, mode, input_type, output_type):
    import tensorflow as tf

    types = {"int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16, "float32": tf.float32}
    conv = tf.lite.TFLiteConverter.from_concrete_functions([cf])
    if mode == "float32":
        return conv
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int16x8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "int16x8"):
        conv.inference_input_type = types[input_type]
        conv.inference_output_type = types[output_type]
    return conv


def _io_type(value, field, mode):
    allowed = IO_TYPES[mode]
    value = allowed[0] if value is None else str(getattr(value, "name", value))
    if value not in allowed:
        raise ConfigError(field, value, f"mode='{mode}' takes {field} in {allowed}")
    return value


def _float_ops(flat, layer_names):
    """Compute ops whose inputs or outputs are float, with the layers their names mention."""
    found = []
    for op in flat.ops():
        if op.name in _BOUNDARY_OPS or op.name in _COMPUTE_FREE:
            continue
        types = [flat.tensor(i).type for i in op.inputs + op.outputs if i >= 0]
        if "FLOAT32" in types or "FLOAT16" in types:
            name = flat.tensor(op.outputs[0]).name if op.outputs else ""
            found.append((op.name, name, tuple(flatbuffer.layer_names_of(name, layer_names))))
    return found


def _check_float_ops(model, float_ops):
    from keras_quant.layers.fake_quant import ActivationQuantizer
    from keras_quant.layers.wrapper import QuantizeWrapper

    # By name: a wrapper and the layer it wraps share one.
    quantizing = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)
                  if isinstance(layer, (QuantizeWrapper, ActivationQuantizer))}
    problems = []
    for op, name, mentioned in float_ops:
        quantized = [n for n in mentioned if n in quantizing]
        if quantized or not mentioned:
            who = quantized[0] if quantized else None
            problems.append((who, "op", op, f"the converter left {op} ({name}) in float although keras_quant "
                             "quantizes it"))
    if problems:
        layer, field, value, reason = problems[0]
        raise ExportError(field, value, reason, layer=layer, problems=problems)


def _atomic_write(path, data):
    """`write_atomic` (temporary file, fsync, rename), creating the parent folder first."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def _check_backend():
    if keras.backend.backend() != "tensorflow":
        raise ExportError("backend", keras.backend.backend(), "export traces the model with TensorFlow; run it "
                          "with KERAS_BACKEND=tensorflow (a model saved under JAX loads there unchanged)")


def tflite_bytes(model, mode="int8", input_type=None, output_type=None, batch_size=1, strict=True):
    """Convert `model` to TFLite bytes; returns `(bytes, details)` (see `export_tflite`)."""
    _check_backend()
    plan_lib.check(model, mode)
    input_type = _io_type(input_type, "input_type", mode)
    output_type = _io_type(output_type, "output_type", mode)
    plan = plan_lib.build_plan(model, mode)
    cf = concrete_function(model, plan, batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        data = _converter(cf, mode, input_type, output_type).convert()
    flat = flatbuffer.FlatModel(data)
    infos = plan_lib.weight_infos(model) if mode not in ("float16", "float32") else []
    notes = []
    rewritten = []
    if mode in ("int8", "int16x8"):
        _, rewritten = flatbuffer.set_weight_scales(flat, infos, int16_bias=mode == "int16x8")
        if rewritten:
            notes.append("weight scales set to keras_quant's (the converter's min-max differs) for: "
                         + ", ".join(sorted(set(rewritten))))
        data = flat.to_bytes()
        flat = flatbuffer.FlatModel(data)
    layer_names = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}
    float_ops = _float_ops(flat, layer_names) if mode in ("int8", "int16x8") else []
    if strict and float_ops:
        _check_float_ops(model, float_ops)
    weights = []
    for info in infos:
        storage = "int8" if mode in ("int8", "int16x8", "dynamic") else "float"
        weights.append((info.layer, info.bits, storage))
        if info.bits < 8 and storage == "int8":
            notes.append(f"{info.layer}.{info.name}: {info.bits}-bit weights stored as int8 holding values in "
                         f"[{info.qmin}, {info.qmax}]")
    learning = sorted(layer.name for layer in plan_lib.quantizer_layers(model)
                      if getattr(layer, "range_mode", "frozen") == "learn")
    if learning and mode in ("int8", "int16x8"):
        notes.append("QAT quantizers still learning (" + ", ".join(learning) + ") are written with their zero "
                     "points rounded, as frozen; kq.qat.set_mode(model, 'frozen') makes Keras compute the same")
    if mode == "dynamic":
        kept = sorted({info.layer for info in infos} - _int8_weight_layers(flat, infos))
        if kept:
            notes.append("the converter keeps small weights (under 1024 elements) in float in dynamic-range "
                         "mode: " + ", ".join(kept))
    activations = []
    if mode in ("int8", "int16x8"):
        storage = plan_lib.MODES[mode]
        for name, (scale, zp, bits) in plan_lib.activation_table(model).items():
            activations.append((name, scale, zp, bits))
            if bits < storage:
                notes.append(f"{name}: {bits}-bit activations stored as int{storage} (clipped to the {bits}-bit grid)")
    io = flat.ops()
    first_in = flat.tensor(int(flat.graph.inputs[0]))
    first_out = flat.tensor(int(flat.graph.outputs[0]))
    details = dict(
        ops=dict(collections.Counter(op.name for op in io)),
        float_ops=tuple(float_ops),
        weights=tuple(weights),
        activations=tuple(activations),
        input_type=first_in.type.lower(),
        output_type=first_out.type.lower(),
        notes=tuple(notes),
    )
    return data, details


def _int8_weight_layers(flat, infos):
    """Layers whose weights the file holds as int8 (matched by shape in TFLite's layout)."""
    shapes = {}
    for info in infos:
        layout, _ = flatbuffer.tflite_layout(info, 1)
        if layout is not None:
            shapes.setdefault(layout.shape, set()).add(info.layer)
    found = set()
    for op in flat.ops():
        if op.name in flatbuffer.WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
            t = flat.tensor(op.inputs[1])
            if t.type == "INT8":
                found |= shapes.get(t.shape, set())
    return found


def export_tflite(model, path, mode="int8", input_type=None, output_type=None, batch_size=1, strict=True):
    """Write a quantized Keras model to a TFLite / LiteRT file with keras_quant's own ranges.

    Args:
        model: A model from `kq.quantize_model` (PTQ or QAT; a QAT model is
            written as it infers now: current ranges, BatchNorm folded with its
            moving statistics). `"float16"`, `"float32"` and `"dynamic"` also
            take a plain float Keras model.
        path: Output file (written to a temporary file, then renamed).
        mode: `"int8"` (full integer: int8 activations and weights, int32
            biases), `"int16x8"` (int16 activations, int8 weights, int64
            biases), `"dynamic"` (int8 weights, float activations quantized at
            run time), `"float16"` (float16 weights of the float folded model)
            or `"float32"` (the float folded model, the size and latency baseline).
        input_type: Type of the model input: `"int8"` (default), `"uint8"` or
            `"float32"` for int8; `"int16"` (default) or `"float32"` for
            int16x8; float32 otherwise.
        output_type: Same choices for the model output.
        batch_size: Batch dimension of the file's input (1 for on-device latency).
        strict: Raise `ExportError` when the converter leaves a quantized
            layer in float (otherwise the report lists it).

    Returns:
        An `ExportReport` read back from the file.

    Raises:
        ExportError: What the mode cannot express, named by layer, before conversion.
    """
    data, details = tflite_bytes(model, mode, input_type, output_type, batch_size, strict)
    _atomic_write(path, data)
    return ExportReport(path=str(path), format="tflite", mode=mode, size_bytes=len(data), **details)
