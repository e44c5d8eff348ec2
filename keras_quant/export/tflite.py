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
a converter failure becomes an `ExportError` naming the layers its
diagnostics point at. After conversion, every op that reads or writes a float
tensor is traced back to its layer: a layer keras_quant quantizes that the
file runs in float is an `ExportError` (strict), a layer the config kept in
float is listed in the report.

The trace and the converter run live in `keras_quant.export.converter`; the
file is written with `keras_quant.io.write_atomic`.

Example:

>>> qmodel = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=result)
>>> report = kq.export_tflite(qmodel, "model.tflite", mode="int8")
>>> print(report)
"""

import collections
import dataclasses
from typing import Dict, Tuple

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant.errors import ConfigError, ExportError
from keras_quant.export import clamps, converter as converter_lib, flatbuffer, int4, loops, plan as plan_lib
from keras_quant.io import write_atomic
from keras_quant.transform.guards import export_ready

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
        float_ops: `(op_name, tensor_name, layers)` of every op of an int8 /
            int16x8 file that reads or writes a float tensor (compute and
            data-movement ops; not QUANTIZE / DEQUANTIZE, nor data movement on
            a float input / output), with the model layers it belongs to.
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
        """The report's fields as a plain dict (JSON-serializable)."""
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


def check_batch_size(batch_size):
    """`batch_size` as an int, or None (a dynamic batch dimension); `ConfigError` for anything else."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ConfigError("batch_size", batch_size, "batch_size must be None (a dynamic batch dimension) or an "
                          "integer >= 1")
    return None if batch_size is None else int(batch_size)


def _io_type(value, field, mode):
    allowed = IO_TYPES[mode]
    value = allowed[0] if value is None else str(getattr(value, "name", value))
    if value not in allowed:
        raise ConfigError(field, value, f"mode='{mode}' takes {field} in {allowed}")
    return value


def _boundary_float_tensors(flat):
    """Float tensors of the file's float input / output boundary.

    The graph's inputs and outputs, and the tensors linked to them through
    data-movement ops only (a RESHAPE before the input's QUANTIZE, after the
    output's DEQUANTIZE): float there is the interface the caller asked for.
    """
    ops = flat.ops()
    boundary = {int(i) for i in flat.graph.inputs} | {int(i) for i in flat.graph.outputs}
    moving = [op for op in ops if op.name in _COMPUTE_FREE]
    changed = True
    while changed:
        changed = False
        for op in moving:
            ins = [i for i in op.inputs if i >= 0 and not flat.tensor(i).constant]
            if ins and all(i in boundary for i in ins):  # forward from the inputs
                new = set(op.outputs) - boundary
            elif op.outputs and all(o in boundary for o in op.outputs):  # backward from the outputs
                new = set(ins) - boundary
            else:
                continue
            if new:
                boundary |= new
                changed = True
    return boundary


def _op_layers(flat, op, layer_names):
    """The model layers an op belongs to: those its output names mention, else its float inputs'."""
    found = []
    for i in op.outputs:
        found += [n for n in flatbuffer.layer_names_of(flat.tensor(i).name, layer_names) if n not in found]
    if not found:  # an op the converter named after something else (a fused constant): read its inputs
        for i in op.inputs:
            if i >= 0 and not flat.tensor(i).constant:
                found += [n for n in flatbuffer.layer_names_of(flat.tensor(i).name, layer_names) if n not in found]
    return found


def _float_ops(flat, layer_names):
    """`(op, tensor, layers)` of every op that reads or writes a float tensor inside the graph.

    Each op is listed (compute ops, and data-movement ops such as RESHAPE or
    CONCATENATION on float tensors) but for the QUANTIZE / DEQUANTIZE ops that
    convert between float and integer (the float op they serve is listed), and
    data-movement ops on the float input / output boundary (float I/O asked for).
    Constant tensors (float weights a float op reads) count too.
    """
    boundary = _boundary_float_tensors(flat)
    found = []
    for op in flat.ops():
        if op.name in _BOUNDARY_OPS:
            continue
        tensors = [i for i in op.inputs + op.outputs if i >= 0]
        floats = [i for i in tensors if flat.tensor(i).type in ("FLOAT32", "FLOAT16")]
        if not floats:
            continue
        if op.name in _COMPUTE_FREE and all(i in boundary or flat.tensor(i).constant for i in floats):
            continue
        name = flat.tensor(op.outputs[0]).name if op.outputs else ""
        found.append((op.name, name, tuple(_op_layers(flat, op, layer_names))))
    return found


def _quantizing_layers(model):
    """`{name: why}` of the layers keras_quant quantizes, by name.

    A `QuantizeWrapper` and each `ActivationQuantizer` (a wrapper and the
    layer it wraps share one name), and every layer whose output an
    `ActivationQuantizer` quantizes (an unfolded BatchNormalization, a
    LayerNormalization, a merge), but for layers the config keeps in float.
    """
    from keras_quant.layers.fake_quant import ActivationQuantizer
    from keras_quant.layers.wrapper import QuantizeWrapper

    report = getattr(model, "quantization_report", None)
    kept_float = {key.split("/")[-1] for key in getattr(report, "float_layers", ())}
    # Float islands the plan chose and names (recurrent layers, attention, ...): float by design.
    kept_float |= {key.split("/")[-1] for key, _, _ in getattr(report, "float_islands", ())
                   if key not in getattr(report, "unsupported", ())}
    no_rule = {key.split("/")[-1] for key in getattr(report, "unsupported", ())}
    found = {}
    for layer in graph_lib.sublayers(model):
        if isinstance(layer, QuantizeWrapper):
            found[layer.name] = "keras_quant quantizes its weights and output"
        elif isinstance(layer, ActivationQuantizer):
            found[layer.name] = "an activation quantizer"
            for node in graph_lib.calls(layer):
                for tensor in graph_lib.node_inputs(node):
                    producer = graph_lib.producer(tensor)[0]
                    if producer is None:
                        continue
                    if isinstance(producer, keras.layers.InputLayer) or producer.name in kept_float:
                        continue
                    if producer.name in no_rule:
                        found.setdefault(producer.name, f"keras_quant has no rule for {type(producer).__name__} "
                                         f"but quantizes its output ({layer.name})")
                    else:
                        found.setdefault(producer.name, f"keras_quant quantizes its output ({layer.name})")
    return found


def _check_float_ops(model, float_ops):
    """Raise `ExportError` naming every quantized layer the file runs in float (ops grouped by layer)."""
    quantizing = _quantizing_layers(model)
    by_layer = collections.OrderedDict()
    for op, name, mentioned in float_ops:
        quantized = [n for n in mentioned if n in quantizing]
        if quantized or not mentioned:
            by_layer.setdefault(quantized[0] if quantized else None, []).append(op)
    if not by_layer:
        return
    problems = []
    for layer, ops in by_layer.items():
        counts = collections.Counter(ops)
        value = ", ".join(op if counts[op] == 1 else f"{op} x{counts[op]}" for op in dict.fromkeys(ops))
        if layer is None:
            reason = (f"the file runs {len(ops)} op(s) in float that belong to no layer of the model, so nothing "
                      "says they may; export with strict=False to accept them (the report lists them)")
        elif "no rule" in quantizing[layer]:
            reason = (f"the file runs {len(ops)} op(s) of this layer in float although {quantizing[layer]}; "
                      "declare a rule for it (kq.layers.register_rule), or export with strict=False to accept "
                      "the float ops (the report lists them)")
        else:
            reason = (f"the file runs {len(ops)} op(s) of this layer in float although {quantizing[layer]}; set "
                      "its config to None to keep it float deliberately (the report then lists it), or export "
                      "with strict=False")
        problems.append((layer, "float_ops", value, reason))
    layer, field, value, reason = problems[0]
    raise ExportError(field, value, reason, layer=layer, problems=problems)


def _check_backend():
    if keras.backend.backend() != "tensorflow":
        raise ExportError("backend", keras.backend.backend(), "export traces the model with TensorFlow; run it "
                          "with KERAS_BACKEND=tensorflow (a model saved under JAX loads there unchanged)")


def _write_weight_scales(flat, infos, mode):
    """Write keras_quant's weight scales into an int8 / int16x8 `flat` (`flatbuffer.set_weight_scales`); the notes."""
    notes = []
    _, rewritten, widened = flatbuffer.set_weight_scales(flat, infos, int16_bias=mode == "int16x8")
    if widened:
        notes.append("weight scales widened so the bias fits int32 at input scale x weight scale (as the TFLite "
                     "converter does; those channels differ from the Keras model by the coarser grid) for: "
                     + ", ".join(sorted(set(widened))))
    if rewritten:
        notes.append("weight scales set to keras_quant's (the converter's min-max differs) for: "
                     + ", ".join(sorted(set(rewritten))))
    return notes


def _fold_clamps(flat):
    """Move narrow activation grids to the top of int8 and fold their clamp ops (`clamps`); the notes."""
    moved = clamps.shift_narrow_grids(flat)
    removed = clamps.fold_clamps(flat)
    if removed:
        flat.drop_unused_tensors()
    pooled = clamps.pool_clamps(flat)
    notes = []
    if moved:
        notes.append(f"{moved} narrow activation grid(s) stored at the top of int8 (zero point moved with the "
                     "integers: int8 saturation is the grid's maximum)")
    if removed:
        counts = collections.Counter(f"{op} {how}" for op, _, how in removed)
        notes.append("clamp ops of narrow activation grids removed, the integers unchanged: "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if pooled:
        notes.append(f"{pooled} clamp op(s) on 4-D tensors written as 1x1 MAX_POOL_2D with the same fused activation "
                     "(the same integers; the XNNPACK delegate runs it)")
    return notes


def _weight_rows(infos, mode, packed=None):
    """`(layer, bits, storage)` of each quantized weight, and notes on grids narrower than their storage.

    `packed`: `{(layer, weight name): "int4"}` of the weights written as INT4 (`int4.store_int4`).
    """
    weights, notes, narrow = [], [], []
    packed = packed or {}
    storage = "int8" if mode in ("int8", "int16x8", "dynamic") else "float"
    for info in infos:
        kind = packed.get((info.layer, info.name), storage)
        weights.append((info.layer, info.bits, kind))
        if info.bits < 8 and kind == "int8":
            notes.append(f"{info.layer}.{info.name}: {info.bits}-bit weights stored as int8 holding values in "
                         f"[{info.qmin}, {info.qmax}]")
            narrow.append(info.layer)
    if packed:
        notes.append("4-bit weights stored as INT4 (two per byte): " + ", ".join(sorted({k[0] for k in packed})))
        if narrow:
            notes.append("4-bit weights left in int8 (their op reads no INT4 in this weight_storage, or their "
                         "integers do not fit it): " + ", ".join(sorted(set(narrow))))
    return weights, notes


def _dynamic_notes(flat, infos, layer_names):
    """Notes of a dynamic-range file: the weights inside recurrent loops, and those the converter kept float."""
    notes = []
    kept = sorted({info.layer for info in infos} - _int8_weight_layers(flat, infos))
    looped = loops.loop_weights(flat, layer_names)
    int8_loops = sorted(n for n, types in looped.items() if all(t == "INT8" for t in types))
    kept += sorted(n for n, types in looped.items() if n not in int8_loops and n not in kept)
    if int8_loops:
        notes.append("int8 weights inside the recurrent loops of: " + ", ".join(int8_loops))
    if kept:
        notes.append("the converter keeps small weights (under 1024 elements) in float in dynamic-range "
                     "mode: " + ", ".join(kept))
    return notes


def _activation_rows(model, values, mode):
    """`(layer, scale, zero_point, bits)` of each activation quantizer written, and notes for narrow grids."""
    activations, notes = [], []
    storage = plan_lib.MODES[mode]
    for name, (scale, zp, bits) in plan_lib.activation_table(model, values).items():
        activations.append((name, scale, zp, bits))
        if bits < storage:
            notes.append(f"{name}: {bits}-bit activations stored as int{storage} (clipped to the {bits}-bit grid)")
    return activations, notes


@graph_lib.gc_paused()
def tflite_bytes(model, mode="int8", input_type=None, output_type=None, batch_size=1, strict=True,
                 weight_storage="int8", fold_clamps=True):
    """Convert `model` to TFLite bytes; returns `(bytes, details)` (see `export_tflite`).

    `fold_clamps=False` keeps the clamps of narrow (4-bit) activations as the
    explicit MAXIMUM / MINIMUM ops the converter writes, at the spec's zero
    point: the same integers as the folded file, for comparing the two.
    """
    _check_backend()
    model = export_ready(model)  # finite grids, float32 (a mixed_float16 model's copy)
    weight_storage = int4.check_weight_storage(weight_storage, mode)
    values = plan_lib.VariableValues(model) if isinstance(model, keras.Model) else None  # each variable read once
    plan_lib.check(model, mode, values)
    batch_size = check_batch_size(batch_size)
    input_type = _io_type(input_type, "input_type", mode)
    output_type = _io_type(output_type, "output_type", mode)
    plan = plan_lib.build_plan(model, mode, values)
    data, flat, finished = converter_lib.convert(model, plan, values, mode, input_type, output_type, batch_size)
    integer = mode in ("int8", "int16x8")
    infos = plan_lib.weight_infos(model, plan=plan, values=values) if mode not in ("float16", "float32") else []
    notes = []
    if integer:
        notes += _write_weight_scales(flat, infos, mode)
    packed = {}
    if mode == "int8" and fold_clamps:
        notes += _fold_clamps(flat)
        packed = int4.store_int4(flat, infos, weight_storage)
    if finished or integer:
        data = flat.to_bytes()  # `flat` now reads as the bytes do
    layer_names = {layer.name for layer in graph_lib.sublayers(model)}
    float_ops = _float_ops(flat, layer_names) if integer else []
    if strict and float_ops:
        _check_float_ops(model, float_ops)
    weights, weight_notes = _weight_rows(infos, mode, packed)
    notes += weight_notes
    learning = sorted(layer.name for layer in plan_lib.quantizer_layers(model)
                      if getattr(layer, "range_mode", "frozen") == "learn")
    if learning and integer:
        notes.append("QAT quantizers still learning (" + ", ".join(learning) + ") are written with their zero "
                     "points rounded, as frozen; kq.qat.set_mode(model, 'frozen') makes Keras compute the same")
    if mode == "dynamic":
        notes += _dynamic_notes(flat, infos, layer_names)
    activations, activation_notes = _activation_rows(model, values, mode) if integer else ([], [])
    notes += activation_notes
    details = dict(
        ops=dict(collections.Counter(op.name for op in flat.ops())),
        float_ops=tuple(float_ops),
        weights=tuple(weights),
        activations=tuple(activations),
        input_type=flat.tensor(int(flat.graph.inputs[0])).type.lower(),
        output_type=flat.tensor(int(flat.graph.outputs[0])).type.lower(),
        notes=tuple(notes),
    )
    return data, details


def _int8_weight_layers(flat, infos):
    """Layers whose weights the file holds as int8 (matched by shape in TFLite's layout)."""
    shapes = {}
    for info in infos:
        layout, _ = flatbuffer.tflite_layout(info)
        if layout is not None:
            shapes.setdefault(layout.shape, set()).add(info.layer)
    found = set()
    for op in flat.ops():
        if op.name in flatbuffer.WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
            t = flat.tensor(op.inputs[1])
            if t.type == "INT8":
                found |= shapes.get(t.shape, set())
    return found


def export_tflite(model, path, mode="int8", input_type=None, output_type=None, batch_size=1, strict=True,
                  weight_storage="int8"):
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
        batch_size: Batch dimension of the file's inputs: 1 (default, for
            on-device latency), another integer, or None for a resizable file
            (`shape_signature` -1: resize every input with the interpreter's
            `resize_tensor_input`, then `allocate_tensors` once; `kq.runtime`
            does, in chunks of its `batch_size`).
        strict: Raise `ExportError` naming the layers when the file runs in
            float a layer keras_quant quantizes (a `QuantizeWrapper`, or a layer
            whose output an `ActivationQuantizer` quantizes: an unfolded
            BatchNormalization, a LayerNormalization); otherwise the report
            lists the ops.

    Returns:
        An `ExportReport` read back from the file.

    Raises:
        ExportError: What the mode cannot express, named by layer, before
            conversion; a converter failure (the converter's exception
            chained), with the layers its diagnostics name; under `strict`, a
            quantized layer the file runs in float.
    """
    data, details = tflite_bytes(model, mode, input_type, output_type, batch_size, strict, weight_storage)
    write_atomic(path, data, make_parents=True)
    return ExportReport(path=str(path), format="tflite", mode=mode, size_bytes=len(data), **details)
