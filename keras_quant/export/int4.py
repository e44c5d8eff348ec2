"""INT4 weight storage in TFLite files: 4-bit weights packed two to a byte where LiteRT reads them.

An int8 file holds 4-bit weights as int8 integers in [-8, 7]; the TFLite schema
also has an INT4 tensor type, packed two values per byte (the first in the low
nibble, `flatbuffer.pack_int4`). Which int8-activation kernels read INT4
weights, per channel (LiteRT 2.3, `ai_edge_litert`):

- LiteRT's builtin kernels: FULLY_CONNECTED, CONV_2D and DEPTHWISE_CONV_2D
  (they unpack the weights once, at preparation, and compute as with int8);
- the XNNPACK delegate (the interpreter's default): FULLY_CONNECTED with an
  even number of inputs only (XNNPACK packs each output row to whole bytes,
  TFLite packs the tensor densely). It leaves an INT4 CONV_2D /
  DEPTHWISE_CONV_2D, or a FULLY_CONNECTED with an odd number of inputs, to the
  builtin kernel: slower, and that kernel's fixed-point requantization differs
  from XNNPACK's float one by an output step here and there.

`weight_storage="int4"` packs the weights of all three ops (the smallest file;
exactly the int8-storage file's integers under the builtin kernels),
`"int4_xnnpack"` only those XNNPACK runs (the default interpreter's outputs and
speed are the int8-storage file's), `"int8"` none.

Example:

>>> packed = store_int4(flat, infos, "int4")          # doctest: +SKIP
"""

from typing import Dict, List, Tuple

import numpy as np

from keras_quant.errors import ConfigError
from keras_quant.export import flatbuffer

__all__ = ["WEIGHT_STORAGE", "INT4_OPS", "check_weight_storage", "store_int4"]

WEIGHT_STORAGE = ("int8", "int4", "int4_xnnpack")
# weight_storage -> the ops whose <= 4-bit weights are written as INT4.
INT4_OPS = {
    "int8": (),
    "int4": ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"),
    "int4_xnnpack": ("FULLY_CONNECTED",),
}


def check_weight_storage(weight_storage, mode):
    """`weight_storage` as given, or a `ConfigError` (an unknown value, or INT4 outside `mode="int8"`)."""
    if weight_storage not in WEIGHT_STORAGE:
        raise ConfigError("weight_storage", weight_storage, f"weight_storage is one of {WEIGHT_STORAGE}")
    if weight_storage != "int8" and mode != "int8":
        raise ConfigError("weight_storage", weight_storage, f"INT4 weights are written in mode='int8' files only, "
                          f"not mode='{mode}'")
    return weight_storage


def _readable(op_name, shape, weight_storage):
    """Whether `weight_storage` writes an INT4 weight of `shape` read by op `op_name`."""
    if op_name not in INT4_OPS[weight_storage]:
        return False
    return weight_storage != "int4_xnnpack" or shape[-1] % 2 == 0  # XNNPACK: whole bytes per output row


def _matches(flat, index, info):
    """Whether int8 weight tensor `index` holds `info`'s grid values (TFLite's layout, within half a step)."""
    ours, scale = flatbuffer.tflite_layout(info)
    t = flat.tensor(index)
    if ours is None or tuple(ours.shape) != t.shape:
        return False
    values = flat.dequantized(index)
    return bool(np.all(np.abs(values - ours) <= 0.5 * float(np.max(t.scales)) + 1e-12))


def _weight_tensors(flat, infos) -> Dict[int, Tuple[object, List[str]]]:
    """`{weight tensor: (WeightInfo, [reading op names])}` of the file's int8 weight tensors keras_quant wrote."""
    found, used = {}, set()
    for op in flat.ops():
        if op.name not in flatbuffer.WEIGHT_OPS:
            continue
        wi = flatbuffer.WEIGHT_OPS[op.name][0]
        if wi >= len(op.inputs) or op.inputs[wi] < 0:
            continue
        index = op.inputs[wi]
        if index in found:
            found[index][1].append(op.name)
            continue
        if flat.tensor(index).type != "INT8" or flat.tensor(index).scales.size == 0:
            continue
        for k, info in enumerate(infos):
            if k not in used and _matches(flat, index, info):
                used.add(k)
                found[index] = (info, [op.name])
                break
    return found


def store_int4(flat, infos, weight_storage) -> Dict[Tuple[str, str], str]:
    """Write the <= 4-bit weights of the ops `weight_storage` names as packed INT4 tensors.

    A weight is packed when keras_quant quantized it to at most 4 bits, its
    integers lie in [-8, 7] with zero points 0, and every op reading it is one
    of `INT4_OPS[weight_storage]` (for `"int4_xnnpack"`: with an even number of
    inputs).

    Returns:
        `{(layer, weight name): "int4"}` of the weights packed.
    """
    packed = {}
    if not INT4_OPS[weight_storage]:
        return packed
    for index, (info, readers) in _weight_tensors(flat, infos).items():
        t = flat.tensor(index)
        if info.bits > 4 or not all(_readable(name, t.shape, weight_storage) for name in readers):
            continue
        if np.any(t.zero_points != 0):
            continue
        q = flat.array(index)
        if q.min() < -8 or q.max() > 7:
            continue
        flat.set_constant(index, q, "INT4", t.scales, t.zero_points, t.quantized_dimension)
        packed[(info.layer, info.name)] = "int4"
    return packed
