"""Read and edit TFLite flatbuffers: ops, tensors, quantization, weight buffers.

The TFLite converter quantizes a constant weight from its own min-max, so a
weight whose grid is not its min-max (a 4-bit grid stored in int8, a clipped
or learned range) would get the converter's scale, not keras_quant's.
`set_weight_scales` rewrites such weights (and their int32 / int64 biases)
with keras_quant's scales; the integers are then exactly keras_quant's grid.
It also writes 16x8 biases as int64, which the integer kernels require.
"""

import dataclasses
import hashlib
import re
from typing import List, Optional, Tuple

import keras
import numpy as np

from keras_quant.errors import ExportError
from keras_quant.layers.integer import bias_integers

__all__ = ["FlatModel", "TensorInfo", "OpInfo", "WEIGHT_OPS", "pack_int4", "unpack_int4"]

# TFLite op -> (input index of the weights, of the bias, of the activation input). A fact about the
# flatbuffer's builtin ops, not about Keras layer types (several layer types lower to one op, and loop
# bodies hold ops no layer rule names), so it lives with the flatbuffer reader, not in the layer rules.
WEIGHT_OPS = {
    "CONV_2D": (1, 2, 0),
    "DEPTHWISE_CONV_2D": (1, 2, 0),
    "FULLY_CONNECTED": (1, 2, 0),
    "TRANSPOSE_CONV": (1, 3, 2),
}
_NP = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
       "UINT8": "uint8", "INT16": "int16", "BOOL": "bool"}


def tflite_schema():
    """The TFLite flatbuffer schema module (its object API: ModelT, TensorT, ...)."""
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    type: str  # "INT8", "FLOAT32", ...
    shape: Tuple[int, ...]
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int
    constant: bool


@dataclasses.dataclass(frozen=True)
class OpInfo:
    index: int
    name: str  # builtin op name, e.g. "CONV_2D"
    inputs: Tuple[int, ...]
    outputs: Tuple[int, ...]


class FlatModel:
    """A TFLite model held as the flatbuffer object API (`tensorflow.lite.tools.flatbuffer_utils`).

    `type_names` maps the schema's tensor type codes to their names (`"INT8"`), `type_codes` back.
    """

    def __init__(self, data):
        from tensorflow.lite.tools import flatbuffer_utils

        self._fu = flatbuffer_utils
        self.model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
        self.graph = self.model.subgraphs[0]
        schema = tflite_schema()
        self.type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.type_codes = {k: v for v, k in self.type_names.items()}

    def to_bytes(self) -> bytes:
        return bytes(self._fu.convert_object_to_bytearray(self.model))

    # Reading -------------------------------------------------------------------------
    def op_name(self, op) -> str:
        return self._fu.opcode_to_name(self.model, op.opcodeIndex)

    def ops(self, subgraph=0) -> List[OpInfo]:
        """The ops of a subgraph (0: the main graph; loop bodies and conditions follow)."""
        return [
            OpInfo(i, self.op_name(op), tuple(int(t) for t in op.inputs), tuple(int(t) for t in op.outputs))
            for i, op in enumerate(self.model.subgraphs[subgraph].operators)
        ]

    @property
    def num_subgraphs(self) -> int:
        return len(self.model.subgraphs)

    def _data(self, t):
        buf = self.model.buffers[t.buffer] if t.buffer is not None else None
        data = None if buf is None else buf.data
        return None if data is None or len(data) == 0 else data

    def tensor(self, index, subgraph=0) -> TensorInfo:
        t = self.model.subgraphs[subgraph].tensors[index]
        q = t.quantization
        scales = np.asarray(q.scale if q is not None and q.scale is not None else [], "float32")
        zps = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [], "int64")
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        return TensorInfo(int(index), name, self.type_names[t.type], tuple(int(d) for d in t.shape), scales, zps,
                          int(q.quantizedDimension) if q is not None else 0, self._data(t) is not None)

    def tensors(self) -> List[TensorInfo]:
        return [self.tensor(i) for i in range(len(self.graph.tensors))]

    def array(self, index) -> Optional[np.ndarray]:
        """A constant tensor's values in its stored type (None for a non-constant tensor); INT4 unpacked to int8."""
        t = self.graph.tensors[index]
        data = self._data(t)
        if data is None:
            return None
        if self.type_names[t.type] == "INT4":
            return unpack_int4(np.frombuffer(bytes(bytearray(data)), np.uint8), tuple(t.shape))
        dtype = _NP[self.type_names[t.type]]
        return np.frombuffer(bytes(bytearray(data)), dtype=dtype).reshape(tuple(t.shape))

    def dequantized(self, index) -> Optional[np.ndarray]:
        """A constant quantized tensor's float values (per-axis scales applied)."""
        info, q = self.tensor(index), self.array(index)
        if q is None or info.scales.size == 0:
            return q
        shape = [1] * len(info.shape)
        if info.scales.size > 1:
            shape[info.quantized_dimension] = info.scales.size
        s, z = info.scales.reshape(shape), info.zero_points.reshape(shape)
        return (q.astype("float64") - z) * s

    # Writing -------------------------------------------------------------------------
    def drop_unused_tensors(self) -> int:
        """Remove the main graph's tensors no op, graph input / output or signature refers to; the number removed.

        Ops removed from the graph (`kq.export.clamps`) leave such tensors behind. Their buffers are
        emptied when no other tensor shares them (buffer indices stay: other subgraphs refer to them).
        """
        graph = self.graph
        used = {int(i) for i in list(graph.inputs) + list(graph.outputs)}
        for op in graph.operators:
            for field in (op.inputs, op.outputs, op.intermediates):
                used |= {int(i) for i in (field if field is not None else ()) if i >= 0}
        signatures = [m for sig in (self.model.signatureDefs or ()) if sig.subgraphIndex in (0, None)
                      for m in list(sig.inputs or ()) + list(sig.outputs or ())]
        used |= {int(m.tensorIndex) for m in signatures}
        dropped = [i for i in range(len(graph.tensors)) if i not in used]
        if not dropped:
            return 0
        keep = [i for i in range(len(graph.tensors)) if i in used]
        remap = {old: new for new, old in enumerate(keep)}
        buffers = [graph.tensors[i].buffer for i in dropped]
        graph.tensors = [graph.tensors[i] for i in keep]
        shared = {t.buffer for sub in self.model.subgraphs for t in sub.tensors}

        def moved(values):
            return None if values is None else [remap[int(i)] if i >= 0 else int(i) for i in values]

        for op in graph.operators:
            op.inputs, op.outputs, op.intermediates = moved(op.inputs), moved(op.outputs), moved(op.intermediates)
        graph.inputs, graph.outputs = moved(graph.inputs), moved(graph.outputs)
        for m in signatures:
            m.tensorIndex = remap[int(m.tensorIndex)]
        for b in buffers:
            if b and b not in shared:
                self.model.buffers[b].data = None
        return len(dropped)

    def set_constant(self, index, values, type_name, scales=None, zero_points=None, quantized_dimension=None):
        """Give tensor `index` new values (in a buffer of its own), type and quantization.

        `type_name="INT4"` packs integers in [-8, 7] two to a byte (`pack_int4`).
        """
        schema = tflite_schema()
        t = self.graph.tensors[index]
        if type_name == "INT4":
            data = pack_int4(values)
        else:
            values = np.ascontiguousarray(values, dtype=_NP[type_name])
            data = np.frombuffer(values.tobytes(), dtype=np.uint8)
        shared = sum(1 for sub in self.model.subgraphs for other in sub.tensors if other.buffer == t.buffer) > 1
        if t.buffer and not shared:  # rewrite the tensor's own buffer in place (no orphan left in the file)
            self.model.buffers[t.buffer].data = data
        else:
            buf = schema.BufferT()
            buf.data = data
            self.model.buffers.append(buf)
            t.buffer = len(self.model.buffers) - 1
        t.type = self.type_codes[type_name]
        if scales is not None:
            q = t.quantization or schema.QuantizationParametersT()
            q.scale = [float(v) for v in np.asarray(scales, "float32").reshape(-1)]
            q.zeroPoint = [int(v) for v in np.asarray(zero_points, "int64").reshape(-1)]
            if quantized_dimension is not None:
                q.quantizedDimension = int(quantized_dimension)
            t.quantization = q


def pack_int4(values) -> np.ndarray:
    """Integers in [-8, 7] as TFLite's INT4 buffer: two per byte in row-major order, the first in the low nibble.

    The order LiteRT's `tensor_utils::UnpackDenseInt4IntoInt8` reads; an odd count leaves the last
    byte's high nibble 0.
    """
    q = np.asarray(values).reshape(-1).astype(np.int16)
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"INT4 holds integers in [-8, 7], not [{q.min()}, {q.max()}]")
    if q.size % 2:
        q = np.concatenate([q, np.zeros(1, np.int16)])
    return ((q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)).astype(np.uint8)


def unpack_int4(data, shape) -> np.ndarray:
    """The int8 values of an INT4 buffer (`pack_int4`'s inverse) in `shape`."""
    data = np.asarray(data, np.uint8).astype(np.int16)
    low, high = data & 0xF, data >> 4
    q = np.stack([low, high], axis=-1).reshape(-1)
    q = np.where(q > 7, q - 16, q).astype(np.int8)
    return q[:int(np.prod(shape))].reshape(shape)


def layer_names_of(tensor_name, layer_names):
    """The model layers a converted tensor's name mentions (TensorFlow scopes `name` or `name_1`).

    Each `;`-joined name counts its outermost layer scope only: in
    `model/layer_normalization/add` the `add` is the op inside the layer, not
    a layer named `add`.
    """
    found = []
    for name in tensor_name.split(";"):
        for part in name.split("/"):
            base = re.sub(r"_\d+$", "", part)
            match = next((c for c in (part, base) if c in layer_names), None)
            if match is not None:
                if match not in found:
                    found.append(match)
                break
    return found


def tflite_layout(info):
    """keras_quant's grid values and scales (one, or one per output channel) of a weight, in TFLite's layout."""
    v = info.values
    scale = np.asarray(info.scale, "float64").reshape(-1)
    kind = info.layer_type
    if kind == "Dense":
        w = v.T
    elif kind in ("Conv2D",):
        w = np.transpose(v, (3, 0, 1, 2))
    elif kind in ("Conv1D",):
        w = np.transpose(v, (2, 0, 1))[:, None]
    elif kind in ("DepthwiseConv2D", "DepthwiseConv1D"):
        if v.ndim == 3:
            v = v[None]
        h, wd, cin, mult = v.shape
        w = v.reshape(1, h, wd, cin * mult)
        if scale.size == cin:
            scale = np.repeat(scale, mult)
    elif kind in ("Conv2DTranspose",):
        w = np.transpose(v, (2, 0, 1, 3))
    elif kind in ("Conv1DTranspose",):
        w = np.transpose(v, (1, 0, 2))[:, None]
    else:
        return None, None
    return w, scale  # one scale for a per-tensor weight: written so (the converter would repeat it per channel)


def finish_conversion(flat, io_types=None, metadata=None):
    """The TFLite converter's last passes, done on the model already unpacked (`FlatModel`), not on bytes.

    The converter ends each conversion in Python: it sets the model's input and
    output types (`io_types`: `(input, output)` tf dtypes, or None for
    float), shares one buffer among identical read-only constants, and writes
    its conversion metadata (`metadata`, with the model's hash; None: none);
    each pass unpacks and repacks the whole flatbuffer (a fifth of a small
    model's export). `tflite`'s frozen-graph converter leaves them to this
    function, which runs the converter's own IO and metadata functions and the
    same deduplication, so the file is the same.
    """
    from tensorflow.lite.python import util as tflite_util

    model = flat.model
    if io_types is not None and any(t.name != "float32" for t in io_types):
        tflite_util._modify_model_input_type(model, io_types[0])
        tflite_util._modify_model_output_type(model, io_types[1])
        tflite_util._remove_redundant_quantize_ops(model)
        flat.graph = model.subgraphs[0]
    if any(m.name.decode("utf-8") == "buffer_location" for m in (model.metadata or ())):
        return
    _deduplicate_readonly_buffers(model)
    if metadata is not None:
        metadata.options.modelOptimizationModes.extend(tflite_util.get_sparsity_modes(model))
        metadata.environment.modelHash = tflite_util.get_model_hash(model)
        tflite_util.populate_conversion_metadata(model, metadata)


def _deduplicate_readonly_buffers(model):
    """`tensorflow.lite.python.convert.deduplicate_readonly_buffers` on a model object: tensors that only
    feed ops (not variables, outputs or intermediates) and hold equal bytes share the first one's buffer."""
    read_only = set()
    for subgraph in model.subgraphs:
        inputs = set()
        for op in subgraph.operators:
            if op.inputs is None:
                continue
            for i, t in enumerate(op.inputs):
                mutating = op.mutatingVariableInputs
                if mutating is not None and i < len(mutating) and mutating[i]:
                    continue
                if subgraph.tensors[t].isVariable:
                    continue
                inputs.add(t)
        for op in subgraph.operators:
            inputs.difference_update(op.outputs if op.outputs is not None else ())
            inputs.difference_update(op.intermediates if op.intermediates is not None else ())
        inputs.difference_update(subgraph.inputs if subgraph.inputs is not None else ())
        inputs.difference_update(subgraph.outputs if subgraph.outputs is not None else ())
        for t in inputs:
            read_only.add(subgraph.tensors[t].buffer)
    for b in read_only.copy():
        data = model.buffers[b].data if b >= 0 else None
        if b < 0 or data is None or isinstance(data, list) or data.size == 0:
            read_only.discard(b)
    # (index, size, md5) sorted by size and hash, largest first, in the converter's order (a stable sort of
    # the same set's iteration order), so the same buffer of each group is kept.
    entries = [(b, model.buffers[b].data.size, hashlib.md5(model.buffers[b].data.data.tobytes()).hexdigest())
               for b in read_only]
    entries = sorted(entries, key=lambda e: (e[1], e[2]), reverse=True)
    duplicates = {}
    for i, (b_i, size_i, hash_i) in enumerate(entries):
        if b_i in duplicates:
            continue
        for b_j, size_j, hash_j in entries[i + 1:]:
            if b_j in duplicates:
                continue
            if size_i != size_j:
                break
            if hash_i != hash_j:
                continue
            duplicates[b_j] = b_i
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            for t in op.inputs if op.inputs is not None else ():
                b = subgraph.tensors[t].buffer
                if b in duplicates:
                    subgraph.tensors[t].buffer = duplicates[b]
    for b in duplicates:
        model.buffers[b].data = None


def set_weight_scales(flat, infos, int16_bias=False):
    """Write keras_quant's weight scales (and matching biases) into a converted model.

    Each quantized weight of a CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED /
    TRANSPOSE_CONV op is matched to the `WeightInfo` whose grid values it
    holds (the converter's dequantized values lie within half a step of
    them). Where the converter chose another scale, the weight is rewritten
    as `round(values / scale)` with keras_quant's scales and the bias as
    `round(bias / (input_scale * weight_scale))`. With `int16_bias`, biases of
    ops with int16 inputs are written as int64.

    A bias too large for its integer type at `input_scale * weight_scale` (a
    tiny input range meeting a large bias, e.g. a folded `+ 3` after an
    almost silent layer) widens the weight scale of those channels until it
    fits, as the TFLite converter does; `widened` lists those layers.

    Returns:
        `(matched, rewritten, widened)`: layer names matched, those whose
        scales were rewritten, and those whose scales were widened for a bias.
    """
    matched, rewritten, widened, used = [], [], [], set()
    for op in flat.ops():
        found = _weight_match(flat, op, infos, used)
        if found is None:
            continue
        k, info, ours, scale = found
        used.add(k)
        matched.append(info.layer)
        wi, bi, xi = WEIGHT_OPS[op.name]
        x_info = flat.tensor(op.inputs[xi])
        has_bias = bi < len(op.inputs) and op.inputs[bi] >= 0
        wants_int64 = int16_bias and x_info.type == "INT16"
        bias = in_scale = None
        if has_bias:
            bias = info.bias if info.bias is not None else flat.dequantized(op.inputs[bi])
            in_scale = float(x_info.scales[0]) if x_info.scales.size else None
        if bias is not None and in_scale is not None and not wants_int64:
            fitted = _fit_bias(bias, in_scale, scale)
            if fitted is not None:
                widened.append(info.layer)
                scale = fitted
        w_info = flat.tensor(op.inputs[wi])
        same = scale.size == w_info.scales.size and np.allclose(scale, w_info.scales, rtol=1e-6, atol=0)
        if same and not has_bias:
            continue
        if not same:
            _write_weights(flat, op.inputs[wi], info, ours, scale)
            rewritten.append(info.layer)
        if bias is not None and in_scale is not None:
            _write_bias(flat, op.inputs[bi], info, bias, in_scale, scale, wants_int64)
    if int16_bias:
        _widen_int16_biases(flat)
    return matched, rewritten, widened


def _weight_match(flat, op, infos, used):
    """`(k, info, values, scale)`: the unused `WeightInfo` whose grid values `op`'s int8 weights hold, in TFLite's
    layout, or None (not a weight op, or no match: the converter's dequantized values lie within half a step)."""
    if op.name not in WEIGHT_OPS:
        return None
    wi = WEIGHT_OPS[op.name][0]
    if wi >= len(op.inputs) or op.inputs[wi] < 0:
        return None
    w_info = flat.tensor(op.inputs[wi])
    if w_info.type not in ("INT8",) or w_info.scales.size == 0:
        return None
    file_values = flat.dequantized(op.inputs[wi])
    for k, info in enumerate(infos):
        if k in used:
            continue
        ours, scale = tflite_layout(info)
        if ours is None or ours.shape != file_values.shape:
            continue
        s_file = np.max(w_info.scales)
        if np.all(np.abs(file_values - ours) <= 0.5 * s_file + 0.5 * np.max(scale) + 1e-12):
            return k, info, ours, scale
    return None


def _write_weights(flat, index, info, ours, scale):
    """Rewrite weight tensor `index` as `round(values / scale)` in int8 with keras_quant's scales."""
    axis = flat.tensor(index).quantized_dimension
    shape = [1] * ours.ndim
    shape[axis] = scale.size
    q = np.round(ours / scale.reshape(shape))
    if np.any(np.abs(q) > 127):
        raise ExportError("weights", info.name, "a weight lies outside int8 at keras_quant's scale", layer=info.layer)
    flat.set_constant(index, q.astype("int8"), "INT8", scale, np.zeros(scale.size, "int64"), axis)


def _write_bias(flat, index, info, bias, in_scale, scale, wants_int64):
    """Rewrite bias tensor `index` on `input_scale * weight_scale`: int64 (16x8), else the frozen Keras model's
    int32 (`keras_quant.layers.integer.bias_integers`, float32 arithmetic)."""
    b_info = flat.tensor(index)
    bscale = in_scale * np.asarray(scale, "float64")
    if wants_int64:
        q = np.round(np.asarray(bias, "float64").reshape(-1) / bscale)
    else:
        q = keras.ops.convert_to_numpy(bias_integers(np.asarray(bias, "float32").reshape(-1), in_scale,
                                                     np.asarray(scale, "float32").reshape(-1)))
        q = np.asarray(q, "float64")
    type_name = "INT64" if wants_int64 else "INT32"
    limit = 2**63 - 1 if wants_int64 else 2**31 - 1
    if np.any(np.abs(q) > limit):
        raise ExportError("bias", float(np.max(np.abs(bias))), f"the bias overflows {type_name.lower()} at "
                          "input scale x weight scale", layer=info.layer)
    flat.set_constant(index, q.reshape(b_info.shape), type_name, bscale, np.zeros(bscale.size, "int64"), 0)


def _widen_int16_biases(flat):
    """16x8: write as int64 the int32 biases of weight ops with int16 inputs that keras_quant has no weights for."""
    for op in flat.ops():
        if op.name not in WEIGHT_OPS:
            continue
        _, bi, xi = WEIGHT_OPS[op.name]
        if bi >= len(op.inputs) or op.inputs[bi] < 0 or flat.tensor(op.inputs[xi]).type != "INT16":
            continue
        b = flat.tensor(op.inputs[bi])
        if b.type == "INT32":
            values = flat.array(op.inputs[bi]).astype("int64")
            if np.any(np.abs(values) >= 2**31 - 1):
                raise ExportError("bias", b.name, "a 16x8 bias saturated int32 in conversion")
            flat.set_constant(op.inputs[bi], values, "INT64", b.scales, b.zero_points, b.quantized_dimension)


def _fit_bias(bias, in_scale, scale):
    """A widened copy of `scale` (per weight channel) where a channel's bias would overflow int32, else None."""
    scale = np.asarray(scale, "float64")
    # Half the int32 range: rounding and later requantization keep their headroom.
    needed = np.abs(np.asarray(bias, "float64").reshape(-1)) / (in_scale * 2.0**30)
    if scale.size != needed.size:  # one scale for the whole weight
        needed = np.full(scale.shape, needed.max())
    return None if np.all(needed <= scale) else np.maximum(scale, needed)
