"""`export_onnx`: QuantizeLinear / DequantizeLinear (QDQ) ONNX with keras_quant's own ranges.

The model is first written as a full-integer TFLite flatbuffer with float
input and output (`export_tflite`'s int8 path: keras_quant's scales and zero
points, BatchNorm folded, narrow-range per-channel int8 weights), and
tf2onnx turns every quantized tensor of it into QDQ: activations as
QuantizeLinear -> DequantizeLinear pairs with keras_quant's scale and zero
point, weights as int8 initializers behind a DequantizeLinear with per-channel
scales (`axis`). Activations are stored as uint8 by default (zero point + 128,
the same grid), int8 on request; 8-bit weights as uint8 with zero point 128
by default (the same grid: onnxruntime's U8U8 kernels, which never saturate;
its int8-weight kernels do on x86 CPUs without VNNI), int8 on request.
Data-movement ops (Reshape, Transpose, ...) that tf2onnx leaves on an int8
tensor get one QDQ pair around each chain of them (`Q -> DQ -> ops -> Q -> DQ`,
same scale), the form onnxruntime fuses into integer kernels. tf2onnx writes
no 4-bit type, so for opset 21 and above the exporter rewrites the weights of
sub-8-bit layers itself (onnx helper) as INT4 initializers, the type the opset
has for them; below opset 21 they stay 8-bit initializers holding 4-bit
values, and the report says so.

The batch dimension is symbolic (`"batch"`) unless `batch_size` fixes it:
the int8 flatbuffer is converted with a dynamic batch, which tf2onnx keeps
(a Dense on a rank-3 input is traced as reshape -> 2-D matmul -> reshape, so
it stays one integer FULLY_CONNECTED). A model with LSTM / GRU / SimpleRNN
layers converts only with a fixed batch (their while loops' TensorLists need
a static element shape): with a symbolic batch, the recurrent layers are
traced unrolled over their (static) time steps, float ops with no loop, and
the report says so; where that fails too (an unknown sequence length), the
file is written with batch 1 and the report says so (`kq.runtime` runs such a
file sample by sample). With `batch_size` set, the recurrent layers stay
float ONNX Loops; the quantized tensor a loop reads is dequantized before it
(`flatbuffer.float_loop_carries`: tf2onnx would otherwise feed the Loop a
float tensor its body declares int8, which onnxruntime refuses).
GELU, which tf2onnx cannot convert, is written as its Erf (or Tanh)
formula between the same QDQ pair; any other TFLite op tf2onnx leaves
unconverted is an `ExportError` naming its layer. tf2onnx's transpose optimizer
runs with one fix (`_squared_mul_handler`): a LayerNormalization on a 1x1 feature
map (ConvNeXt's last stage at small inputs) was written with a wrong Reshape.

The file passes `onnx.checker` and is loaded in onnxruntime before it is
written.

Example:

>>> report = kq.export_onnx(qmodel, "model.onnx", opset=21)
>>> print(report)
"""

import collections
import contextlib
import os
import tempfile
import threading
import warnings

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant.errors import ConfigError, ExportError
from keras_quant.export import flatbuffer, plan as plan_lib
from keras_quant.export.tflite import ExportReport, check_batch_size, tflite_bytes
from keras_quant.io import write_atomic

__all__ = ["export_onnx", "onnx_model", "MIN_OPSET", "INT4_OPSET"]

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
INT4_OPSET = 21  # INT4 / UINT4 tensors in QuantizeLinear / DequantizeLinear
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("uint8", "int8")
_TF2ONNX_MAX_OPSET = 18


def _check_opset(opset):
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ConfigError("opset", opset, f"QDQ with per-channel weight scales needs opset {MIN_OPSET} or later")
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise ConfigError("opset", opset, f"the installed onnx knows opsets up to {onnx.defs.onnx_opset_version()}")


def _initializers(model):
    return {init.name: init for init in model.graph.initializer}


def _drop_unread_initializers(proto):
    """Remove the initializers no node reads any more (after a rewrite replaced them)."""
    read = {i for n in proto.graph.node for i in n.input}
    keep = [init for init in proto.graph.initializer if init.name in read]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _uint8_copies(proto, suffix):
    """`copy(name)`: the name of a uint8 initializer holding int8 initializer `name` + 128 (made once)."""
    from onnx import numpy_helper

    inits, made = _initializers(proto), {}

    def copy(name):
        if name not in made:
            q = numpy_helper.to_array(inits[name]).astype("int16") + 128
            tensor = numpy_helper.from_array(q.astype("uint8"), name + suffix)
            proto.graph.initializer.append(tensor)
            made[name] = tensor.name
        return made[name]

    return copy


def _int4_weights(model, infos):
    """Rewrite the int8 initializers holding sub-8-bit weights as INT4 (opset >= 21); returns the layers."""
    import ml_dtypes
    from onnx import numpy_helper

    inits = _initializers(model)
    narrow = [i for i in infos if i.bits <= 4]
    if not narrow:
        return []
    wanted = []
    for info in narrow:
        scale = np.asarray(info.scale, "float64")
        axis = (info.values.ndim - 2) if info.layer_type in ("DepthwiseConv2D", "DepthwiseConv1D", "Conv2DTranspose",
                                                              "Conv1DTranspose") else info.values.ndim - 1
        shape = [1] * info.values.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        q = np.round(info.values / scale.reshape(shape)).astype("int64")
        wanted.append((info, np.sort(q.reshape(-1))))
    done, used = [], set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        x = numpy_helper.to_array(inits[node.input[0]])
        if x.dtype != np.int8:
            continue
        key = np.sort(x.astype("int64").reshape(-1))
        for k, (info, q) in enumerate(wanted):
            if k in used or q.size != key.size or not np.array_equal(q, key):
                continue
            used.add(k)
            tensor = numpy_helper.from_array(x.astype(ml_dtypes.int4), node.input[0] + "_int4")  # packed 2 per byte
            model.graph.initializer.append(tensor)
            node.input[0] = tensor.name
            if len(node.input) > 2 and node.input[2]:
                zp = numpy_helper.to_array(inits[node.input[2]])
                zt = numpy_helper.from_array(zp.astype(ml_dtypes.int4), node.input[0] + "_zero_point")
                model.graph.initializer.append(zt)
                node.input[2] = zt.name
            done.append(info.layer)
            break
    _drop_unread_initializers(model)
    return done


# Ops that only move integers around: tf2onnx writes them on the int8 tensor between a
# QuantizeLinear and a DequantizeLinear, a pattern onnxruntime does not fuse (the next layer then
# runs in float, dequantizing its weights on every call).
_DATA_MOVEMENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _qdq_around_data_movement(proto):
    """Rewrite `Q -> Reshape(int8) -> DQ` as `Q -> DQ -> Reshape(float) -> Q -> DQ` with the same scale.

    The standard QDQ form of a data-movement op: onnxruntime drops the inner pair and fuses the
    layers on either side into integer kernels. The values are unchanged (the op moves the
    integers; requantizing them with the same scale and zero point is exact). A chain of such ops
    (tf2onnx writes Conv1D as Reshape -> Transpose) gets one pair around the whole chain:
    onnxruntime's layout optimizer computed wrong values when each link had its own pair. A
    quantized tensor read by several such ops (a U-Net's skip tensor, transposed once, then read by
    UpSampling2D and Conv2DTranspose) gets one DequantizeLinear that all of them read.
    Returns the number of ops rewritten.
    """
    import onnx

    graph = proto.graph
    uses = collections.Counter(name for node in graph.node for name in node.input)
    uses.update(out.name for out in graph.output)
    nodes, count, producers = [], 0, {}
    chained = {}  # requantized output of a rewritten op -> (its QuantizeLinear, the float value it quantizes)
    dequantized_of = {}  # quantized tensor -> its one DequantizeLinear output (a tensor read by several ops)
    for node in graph.node:  # in topological order: a chain is extended op by op
        q = producers.get(node.input[0]) if node.op_type in _DATA_MOVEMENT and node.input else None
        if q is None or q.op_type != "QuantizeLinear":
            nodes.append(node)
            producers.update((out, node) for out in node.output)
            continue
        qparams = list(q.input[1:])
        link = chained.get(node.input[0])
        if link is not None and uses[node.input[0]] == 1:
            nodes.remove(link[0])  # the chain goes on in float: no requantize between its ops
            node.input[0] = link[1]
        else:
            dequantized = dequantized_of.get(node.input[0])
            if dequantized is None:  # one DequantizeLinear per tensor: names stay single-assignment (SSA)
                dequantized = dequantized_of[node.input[0]] = node.input[0] + "_kq_dq"
                nodes.append(onnx.helper.make_node("DequantizeLinear", [node.input[0]] + qparams, [dequantized],
                                                   name=node.name + "_kq_dq"))
            node.input[0] = dequantized
        output, moved = node.output[0], node.output[0] + "_kq_float"
        node.output[0] = moved
        nodes.append(node)
        requantize = onnx.helper.make_node("QuantizeLinear", [moved] + qparams, [output], name=node.name + "_kq_q")
        nodes.append(requantize)
        producers[output] = requantize
        chained[output] = (requantize, moved)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _decompose_gelu(proto):
    """Write each `TFL_GELU` node tf2onnx left (it has no handler for it) as ONNX ops; returns their count.

    Exact GELU (`approximate=False`, Keras' default) is `0.5 * x * (1 + erf(x / sqrt(2)))`; the tanh
    approximation `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`. tf2onnx reads the
    quantized TFLite GELU as `DequantizeLinear -> TFL_GELU -> QuantizeLinear`, so the decomposition
    runs in float between the same QDQ pair (TFLite's int8 kernel is a table of the same function).
    """
    from onnx import helper, numpy_helper

    graph, nodes, count = proto.graph, [], 0
    for node in graph.node:
        if node.op_type != "TFL_GELU":
            nodes.append(node)
            continue
        approximate = any(a.name == "approximate" and a.i for a in node.attribute)
        x, y, tag = node.input[0], node.output[0], f"{node.name or 'gelu'}_kq_gelu{count}"

        def const(name, value):
            graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), f"{tag}_{name}"))
            return f"{tag}_{name}"

        if approximate:
            nodes += [
                helper.make_node("Mul", [x, x], [f"{tag}_x2"]),
                helper.make_node("Mul", [f"{tag}_x2", x], [f"{tag}_x3"]),
                helper.make_node("Mul", [f"{tag}_x3", const("c", 0.044715)], [f"{tag}_cx3"]),
                helper.make_node("Add", [x, f"{tag}_cx3"], [f"{tag}_inner"]),
                helper.make_node("Mul", [f"{tag}_inner", const("k", np.sqrt(2.0 / np.pi))], [f"{tag}_arg"]),
                helper.make_node("Tanh", [f"{tag}_arg"], [f"{tag}_t"]),
            ]
        else:
            nodes += [
                helper.make_node("Mul", [x, const("k", 1.0 / np.sqrt(2.0))], [f"{tag}_arg"]),
                helper.make_node("Erf", [f"{tag}_arg"], [f"{tag}_t"]),
            ]
        nodes += [
            helper.make_node("Add", [f"{tag}_t", const("one", 1.0)], [f"{tag}_1t"]),
            helper.make_node("Mul", [x, const("half", 0.5)], [f"{tag}_hx"]),
            helper.make_node("Mul", [f"{tag}_hx", f"{tag}_1t"], [y], name=tag),
        ]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _unconverted_ops(proto, model):
    """Raise `ExportError` naming the layers of TFLite ops tf2onnx could not convert (left as `TFL_*` nodes)."""
    from keras_quant.export.flatbuffer import layer_names_of

    names = {layer.name for layer in graph_lib.sublayers(model)}
    problems = []
    for node in proto.graph.node:
        if node.op_type.startswith("TFL_"):
            layers = layer_names_of(";".join(node.output), names)
            problems.append((", ".join(layers) or None, "op", node.op_type[4:],
                             f"tf2onnx has no ONNX conversion for the TFLite op {node.op_type[4:]}; replace the "
                             "layer's activation or op with one ONNX has (relu, sigmoid, tanh, swish, gelu), or "
                             "export this model to TFLite only"))
    if problems:
        layer, field, value, reason = problems[0]
        raise ExportError(field, value, reason, layer=layer, problems=problems)


def _activations_to_uint8(proto):
    """Store activations as uint8 (zero point + 128), weights staying int8: onnxruntime's U8S8 layout.

    The same grid and scale: `q_u8 = q_s8 + 128` with `zero_point_u8 = zero_point_s8 + 128`, so every
    QuantizeLinear -> DequantizeLinear pair computes the same values. onnxruntime's CPU kernels
    take uint8 activations; given int8 it converts pairs to uint8 itself, but only where a
    QuantizeLinear feeds a single DequantizeLinear, and a layer whose input and output then
    differ in type is not fused (it ran in float). Returns the number of QuantizeLinear rewritten.
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = _initializers(proto)
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    uint8_zero_point, count = _uint8_copies(proto, "_u8"), 0

    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if numpy_helper.to_array(inits[node.input[2]]).dtype != np.int8 or node.input[0] in inits:
            continue
        users = consumers[node.output[0]]
        if not users or any(u.op_type != "DequantizeLinear" or list(u.input[1:3]) != list(node.input[1:3])
                            for u in users):
            continue
        zp = uint8_zero_point(node.input[2])
        node.input[2] = zp
        for u in users:
            u.input[2] = zp
        count += 1
    _drop_unread_initializers(proto)
    return count


def _weights_to_uint8(proto):
    """Store 8-bit weights as uint8 (zero point 128): onnxruntime's U8U8 layout, exact on every CPU.

    The same grid (`q_u8 = q_s8 + 128`, zero point `0 + 128`). With int8 weights onnxruntime runs
    U8S8 kernels, which on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of u8 * s8 products
    in saturating int16 (VPMADDUBSW): two large activations against two large weights of one
    channel overflow, and the output is off by tens of steps. Narrow-range int8 weights reach
    127 in every channel, so trained layers do hit it. U8U8 kernels widen to int16 first and
    never saturate. Weights on a grid of 7 bits or fewer (|q| <= 64: no pair of products can
    reach 32767) keep int8 and its faster kernels; INT4 initializers are left as they are.
    Returns the number of weight initializers rewritten.
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = _initializers(proto)
    shifted, count = _uint8_copies(proto, "_u8w"), 0

    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 3:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        if node.input[2] not in inits or q.dtype != np.int8 or 2 * 255 * int(np.abs(q.astype("int16")).max()) <= 32767:
            continue  # not an int8 weight, or one that cannot saturate int16 (a 7-bit or narrower grid)
        node.input[0], node.input[2] = shifted(node.input[0]), shifted(node.input[2])
        count += 1
    _drop_unread_initializers(proto)
    return count


class _DropTFLGelu:
    """A logging filter: tf2onnx logs an ERROR for each TFL_GELU it leaves, which `_decompose_gelu` converts."""

    def filter(self, record):
        return "TFL_GELU" not in record.getMessage()


class _quiet_tf2onnx:
    """A context manager that keeps tf2onnx's TFL_GELU errors out of the log while it converts."""

    def __enter__(self):
        import logging

        self._loggers = [logging.getLogger(n) for n in ("tf2onnx", "tf2onnx.tfonnx")]
        self._filter = _DropTFLGelu()
        for logger in self._loggers:
            logger.addFilter(self._filter)

    def __exit__(self, *exc):
        for logger in self._loggers:
            logger.removeFilter(self._filter)
        return False


@contextlib.contextmanager
def _unrolled_recurrent(model):
    """Every recurrent layer of `model` unrolled while the block runs (an export trace), then as it was.

    Yields the names of the layers it unrolled (empty: nothing recurrent, or already unrolled).
    """
    layers = [layer for layer in graph_lib.sublayers(model)
              if isinstance(layer, keras.layers.RNN) and not layer.unroll]
    for layer in layers:
        layer.unroll = True
    try:
        yield [layer.name for layer in layers]
    finally:
        for layer in layers:
            layer.unroll = False


_TF2ONNX_LOCK = threading.Lock()


def _squared_mul_handler(handler):
    """tf2onnx's TransposeOptimizer `_mul_handler`, also transposing the shape it records for `Mul(t, t)`.

    When both inputs of a Mul are one NHWC Transpose `t` (TFLite's SQUARED_DIFFERENCE, as in
    LayerNormalization's variance, becomes `Sub` then `Mul(d, d)`), tf2onnx 1.17 moves the Transpose
    after the Mul but keeps the Mul's NHWC shape on what is now an NCHW tensor (its other branches
    transpose it back: `_switch_transpose_and_node`). `post_optimize_action` then replaces a
    Transpose of that tensor whose spatial size is 1x1 by a Reshape to the wrong shape
    (`[-1, 1, C, 1]` instead of `[-1, 1, 1, C]`): the file loads, and a later op fails at run time
    or broadcasts to a wrong result (ConvNeXt's last stage at 1x1: its residual QLinearAdd of
    `(batch, C, 1, 1)` and `(batch * C, C, 1, 1)`). This records the shape the Mul really has.
    """
    from tf2onnx.optimizer.transpose_optimizer import invert_perm

    def mul_handler(self, trans, node):
        squared = all(name == trans.output[0] for name in node.input)
        shape = self._g.get_shape(node.output[0])
        handled = handler(self, trans, node)
        if handled and squared and shape:
            perm_inv = invert_perm(trans.get_attr_value("perm"))
            self._g.set_shape(node.output[0], [shape[i] for i in perm_inv])
        return handled

    return mul_handler


class _tf2onnx_fixes:
    """A context manager: tf2onnx's TransposeOptimizer with `_squared_mul_handler` while it converts.

    Held under a lock (the handler is a class attribute); the original is restored on exit.
    """

    def __enter__(self):
        from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

        _TF2ONNX_LOCK.acquire()
        try:
            self._original = TransposeOptimizer.__dict__["_mul_handler"]
            TransposeOptimizer._mul_handler = _squared_mul_handler(self._original)
        except BaseException:
            _TF2ONNX_LOCK.release()
            raise

    def __exit__(self, *exc):
        from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

        TransposeOptimizer._mul_handler = self._original
        _TF2ONNX_LOCK.release()
        return False


def _name_batch_dimension(proto, name="batch"):
    """Call the symbolic first dimension of every graph input and output `name` (tf2onnx writes `unk__N`)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def onnx_model(model, opset=INT4_OPSET, strict=True, activation_type="uint8", weight_type="uint8", batch_size=None):
    """The QDQ `onnx.ModelProto` of a quantized Keras model, and the report details (see `export_onnx`)."""
    import onnx
    import tf2onnx

    _check_opset(opset)
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError("activation_type", activation_type, f"activation_type must be one of {ACTIVATION_TYPES}")
    if weight_type not in WEIGHT_TYPES:
        raise ConfigError("weight_type", weight_type, f"weight_type must be one of {WEIGHT_TYPES}")
    batch_size = check_batch_size(batch_size)
    batch_note = None
    try:
        data, details = tflite_bytes(model, "int8", input_type="float32", output_type="float32", strict=strict,
                                     batch_size=batch_size)
    except ExportError as e:
        if batch_size is not None or (e.field != "float_ops" and e.__cause__ is None):
            raise  # a fixed batch asked for, or what the mode cannot express: batch 1 would fail the same
        # Some graphs convert only with a static batch (a recurrent layer's while loop: the converter lowers
        # its TensorList only with a static element shape). Unrolled, the loops are plain float ops that take
        # any batch; where that fails too, write batch 1 rather than nothing. The report says which.
        why = (("fails" if e.field != "float_ops" else f"leaves {e.layer} in float") +
               f" ({str(e).splitlines()[0][:200]})")
        try:
            with _unrolled_recurrent(model) as unrolled:
                if not unrolled:
                    raise e
                data, details = tflite_bytes(model, "int8", input_type="float32", output_type="float32",
                                             strict=strict, batch_size=None)
            batch_note = (f"recurrent layers traced unrolled over their time steps ({', '.join(unrolled)}), "
                          f"float ops with no loop, for a symbolic batch: with their loops the TFLite converter "
                          f"{why}")
        except (ExportError, ValueError):  # ValueError: Keras cannot unroll an unknown sequence length
            data, details = tflite_bytes(model, "int8", input_type="float32", output_type="float32",
                                         strict=strict, batch_size=1)
            batch_size = 1
            batch_note = f"written with batch 1: with a symbolic batch the TFLite converter {why}"
    data, _ = flatbuffer.float_loop_carries(data)  # recurrent loops: tf2onnx types int8 loop carries wrongly
    fd, tmp = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        base = min(opset, _TF2ONNX_MAX_OPSET)
        with warnings.catch_warnings():  # tf2onnx reads the flatbuffer with the deprecated tf.lite.Interpreter
            warnings.simplefilter("ignore")
            with _quiet_tf2onnx(), _tf2onnx_fixes():
                proto, _ = tf2onnx.convert.from_tflite(tmp, opset=base)
    except Exception as e:  # tf2onnx raises plain exceptions; name what failed
        raise ExportError("opset", opset, f"tf2onnx could not convert the integer model ({type(e).__name__}: "
                          f"{e})") from e
    finally:
        os.remove(tmp)
    notes = list(details["notes"]) + ([batch_note] if batch_note else [])
    if _decompose_gelu(proto):
        notes.append("GELU written as ONNX Erf / Tanh ops in float between its QuantizeLinear / DequantizeLinear "
                     "pair (tf2onnx has no conversion for TFLite's GELU)")
    _unconverted_ops(proto, model)
    if opset > base:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as e:  # the C++ converter's assertions arrive as RuntimeError
            raise ExportError("opset", opset, f"onnx's version converter could not raise the model from opset "
                              f"{base} to {opset} ({type(e).__name__}: {e}); pass opset={base}") from e
        del proto.graph.value_info[:]  # shapes the converter inferred: not needed, and they double small files
    _qdq_around_data_movement(proto)
    if batch_size is None:
        _name_batch_dimension(proto)
    if activation_type == "uint8":
        _activations_to_uint8(proto)
    infos = plan_lib.weight_infos(model)
    if opset >= INT4_OPSET:
        int4 = _int4_weights(proto, infos)
        if int4:
            notes.append("4-bit weights written as INT4 initializers for: " + ", ".join(int4))
    elif any(i.bits < 8 for i in infos):
        notes.append(f"opset {opset} has no 4-bit type: sub-8-bit weights are int8 initializers holding values "
                     f"on their grid (INT4 needs opset {INT4_OPSET})")
    if weight_type == "uint8" and _weights_to_uint8(proto):
        notes.append("8-bit weights stored as uint8 with zero point 128 (the same grid): onnxruntime's U8U8 "
                     "kernels, exact on x86 CPUs without VNNI where its int8-weight kernels saturate")
    proto.producer_name = "keras_quant"
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # a rewrite above wrote an invalid graph: a keras_quant bug, named as such
        raise ExportError("opset", opset, f"the QDQ model fails onnx.checker ({type(e).__name__}: {e}); please "
                          "report it to keras_quant with the model") from e
    return proto, dict(details, notes=tuple(n for n in notes if "stored as int8" not in n or opset < INT4_OPSET))


def _qdq_tables(proto):
    """Activation `(tensor, scale, zero_point)` of QuantizeLinear nodes, and weight DequantizeLinear layers."""
    from onnx import numpy_helper

    inits = _initializers(proto)
    acts, weights = [], []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            s = numpy_helper.to_array(inits[node.input[1]])
            z = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else 0
            if np.size(s) == 1:
                acts.append((node.output[0], float(np.reshape(s, -1)[0]), int(np.reshape(z, -1)[0])))
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights.append(node.input[0])
    return acts, weights


def _load_error(model, opset, error):
    """An `ExportError` for a model onnxruntime refuses: the layers of the nodes it names, and the remedy."""
    import re

    from keras_quant.export.flatbuffer import layer_names_of

    text = str(error)
    names = {layer.name for layer in graph_lib.sublayers(model)}
    layers = []
    for node in re.findall(r"Node:?\s*\(?([^\s()]+)", text):
        layers += [n for n in layer_names_of(node, names) if n not in layers]
    return ExportError("opset", opset, f"onnxruntime cannot load the exported model ({text.strip()[:400]}); "
                       f"try another opset (tf2onnx writes up to {_TF2ONNX_MAX_OPSET}), or export this model to "
                       "TFLite (kq.export_tflite), which runs the named layers", layer=", ".join(layers) or None)


@graph_lib.gc_paused()
def export_onnx(model, path, opset=INT4_OPSET, strict=True, activation_type="uint8", weight_type="uint8",
                batch_size=None):
    """Write a quantized Keras model as QDQ ONNX with keras_quant's scales and zero points.

    Args:
        model: A model from `kq.quantize_model` (PTQ or QAT) whose activations
            are at most 8 bits.
        path: Output `.onnx` file (written to a temporary file, then renamed).
        opset: ONNX opset, at least 13 (per-axis QDQ). From 21, 4-bit weights
            are INT4 initializers; below, int8 initializers on the 4-bit grid.
        strict: As for `export_tflite`: a quantized layer left in float is an error.
        activation_type: `"uint8"` (default; onnxruntime's CPU layout, U8S8) or
            `"int8"` for the activation integers. The same grid either way: uint8
            zero points are keras_quant's plus 128.
        weight_type: `"uint8"` (default: zero point 128, the same grid, for
            weights that reach beyond +-64) or `"int8"` (zero point 0) for 8-bit weights. onnxruntime's int8-weight
            (U8S8) kernels saturate on x86 CPUs without VNNI (AVX2, AVX-512F)
            and then differ from Keras by tens of steps; its uint8-weight (U8U8)
            kernels are exact everywhere, about 2x slower on such CPUs. Choose
            `"int8"` for runtimes that require signed symmetric weights
            (TensorRT) or CPUs with VNNI / ARM dot-product instructions.
        batch_size: None (default): a symbolic batch dimension named `"batch"`
            on every input and output, so one session runs any batch size. An
            integer fixes it (the file then takes only that batch).

    Returns:
        An `ExportReport` (`format="onnx"`, `mode="qdq"`) read back from the model.

    Raises:
        ExportError: What QDQ cannot express, named by layer, before conversion.
        ConfigError: For an opset below 13 or above the installed onnx's, or a bad `batch_size`.
    """
    import onnxruntime as ort

    proto, details = onnx_model(model, opset, strict, activation_type, weight_type, batch_size)
    data = proto.SerializeToString()
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _load_error(model, opset, e) from e
    write_atomic(path, data, make_parents=True)
    ops = dict(collections.Counter(n.op_type for n in proto.graph.node))
    _, dq_weights = _qdq_tables(proto)
    elem = {1: "float32", 3: "int8", 2: "uint8", 5: "int16", 6: "int32", 7: "int64"}
    in_type = elem.get(proto.graph.input[0].type.tensor_type.elem_type, "other")
    out_type = elem.get(proto.graph.output[0].type.tensor_type.elem_type, "other")
    return ExportReport(
        path=str(path), format="onnx", mode="qdq", size_bytes=len(data), ops=ops, float_ops=details["float_ops"],
        weights=details["weights"], activations=details["activations"], input_type=in_type, output_type=out_type,
        notes=details["notes"],
    )
