"""QDQ graph edits: pure rewrites of an `onnx.ModelProto` that tf2onnx wrote from the int8 flatbuffer.

`keras_quant.export.onnx` converts with tf2onnx, then runs these in place:
`decompose_gelu` (TFLite's GELU, which tf2onnx leaves, as Erf / Tanh ops),
`qdq_around_data_movement` (one QuantizeLinear / DequantizeLinear pair around
each chain of integer data-movement ops), `name_batch_dimension`,
`activations_to_uint8` and `weights_to_uint8` (the same grids stored as uint8,
zero point + 128), `int4_weights` (sub-8-bit weights as INT4 initializers);
`qdq_tables` reads the quantized activations and weights back for the report.
Each function takes the model proto and knows nothing of Keras, so each can be
tested on a hand-made graph.

Example:

>>> from keras_quant.export import qdq
>>> qdq.qdq_around_data_movement(proto)          # doctest: +SKIP
3
"""

import collections

import numpy as np

__all__ = ["int4_weights", "qdq_around_data_movement", "decompose_gelu", "activations_to_uint8", "weights_to_uint8",
           "qdq_tables", "name_batch_dimension"]


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


def int4_weights(model, infos):
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


def qdq_around_data_movement(proto):
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


def decompose_gelu(proto):
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


def activations_to_uint8(proto):
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


def weights_to_uint8(proto):
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


def name_batch_dimension(proto, name="batch"):
    """Call the symbolic first dimension of every graph input and output `name` (tf2onnx writes `unk__N`)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def qdq_tables(proto):
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
