"""TFLite loops (WHILE bodies of recurrent layers): their weights, and float loop carries.

A recurrent layer (LSTM, GRU, SimpleRNN) converts to a WHILE loop whose body
subgraph holds its kernels. `loop_weights` lists how those weights are stored;
`float_loop_carries` rewires quantized loop-carried tensors to float so the
loop state does not accumulate rounding (see its docstring).
"""

import numpy as np

from keras_quant.export.flatbuffer import WEIGHT_OPS, FlatModel, layer_names_of, tflite_schema

__all__ = ["loop_weights", "float_loop_carries"]


# Ops that only move values (same scale and zero point in and out): a quantized tensor's value read
# through them is exactly its dequantized value read through them in float. Input 0 is the data.
_PASS_THROUGH = ("GATHER", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "SLICE", "STRIDED_SLICE")
_QUANTIZED_TYPES = ("INT8", "UINT8", "INT16")


def loop_weights(flat, layer_names):
    """`{layer: [storage type of each weight]}` of the weight ops inside loops (WHILE bodies).

    A recurrent layer (LSTM, GRU, SimpleRNN) traces a while loop whose body holds its kernels as
    FULLY_CONNECTED weights; the main graph's weights are not listed. Layers are named from the
    weight tensors' names (`model/bilstm/forward_lstm/while/.../MatMul`).
    """
    found = {}
    for s in range(1, flat.num_subgraphs):
        for op in flat.ops(s):
            if op.name not in WEIGHT_OPS or len(op.inputs) <= WEIGHT_OPS[op.name][0]:
                continue
            w = op.inputs[WEIGHT_OPS[op.name][0]]
            if w < 0 or not flat.tensor(w, s).constant:
                continue
            t = flat.tensor(w, s)
            for layer in layer_names_of(t.name, layer_names)[:1]:
                found.setdefault(layer, []).append(t.type)
    return found


class _Subgraph:
    """Edits of one subgraph of a `FlatModel` (object API): new tensors, ops, rewiring."""

    def __init__(self, flat, index):
        self.flat, self.graph, self.schema = flat, flat.model.subgraphs[index], tflite_schema()

    def type_name(self, t):
        return self.flat.type_names[self.graph.tensors[t].type]

    def quantized(self, t):
        tensor = self.graph.tensors[t]
        q = tensor.quantization
        return (self.type_name(t) in _QUANTIZED_TYPES and q is not None and q.scale is not None
                and len(q.scale) == 1)

    def float_twin(self, t, suffix):
        """A new float32 tensor of `t`'s shape, unquantized, with no data."""
        import copy

        twin = copy.deepcopy(self.graph.tensors[t])
        twin.type = self.flat.type_codes["FLOAT32"]
        twin.quantization = None
        twin.buffer = self._empty_buffer()
        name = twin.name.decode() if isinstance(twin.name, bytes) else str(twin.name)
        twin.name = (name + suffix).encode()
        self.graph.tensors.append(twin)
        return len(self.graph.tensors) - 1

    def _empty_buffer(self):
        buf = self.schema.BufferT()
        self.flat.model.buffers.append(buf)
        return len(self.flat.model.buffers) - 1

    def opcode(self, name):
        code = getattr(self.schema.BuiltinOperator, name)
        for i, oc in enumerate(self.flat.model.operatorCodes):
            if max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) == code:
                return i
        oc = self.schema.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
        self.flat.model.operatorCodes.append(oc)
        return len(self.flat.model.operatorCodes) - 1

    def insert_op(self, position, name, inputs, outputs):
        op = self.schema.OperatorT()
        op.opcodeIndex = self.opcode(name)
        op.inputs = np.asarray(inputs, "int32")
        op.outputs = np.asarray(outputs, "int32")
        if name == "QUANTIZE":
            op.builtinOptionsType = self.schema.BuiltinOptions.QuantizeOptions
            op.builtinOptions = self.schema.QuantizeOptionsT()
        elif name == "DEQUANTIZE":
            op.builtinOptionsType = self.schema.BuiltinOptions.DequantizeOptions
            op.builtinOptions = self.schema.DequantizeOptionsT()
        self.graph.operators.insert(position, op)
        return op

    def consumers(self, t):
        return [op for op in self.graph.operators if t in [int(i) for i in op.inputs]]

    def replace_uses(self, old, new, ops=None):
        """Read `new` wherever `ops` (default: every op) and the subgraph's outputs read `old`."""
        for op in self.graph.operators if ops is None else ops:
            op.inputs = np.asarray([new if int(i) == old else int(i) for i in op.inputs], "int32")
        self.graph.outputs = np.asarray([new if int(i) == old else int(i) for i in self.graph.outputs], "int32")

    def float_reads(self, old, new):
        """Make the ops reading quantized tensor `old` read float tensor `new` (its dequantized value).

        A DEQUANTIZE of `old` is dropped (its readers read `new`); a value-moving op (GATHER, RESHAPE,
        ...) runs in float on `new` and its output is handled the same way; anything else reads `old`
        again from a QUANTIZE of `new` (exact: the same scale and zero point). Subgraph outputs that
        were `old` become `new`.
        """
        requantize = False
        for op in self.consumers(old):
            name = self.flat.op_name(op)
            ins = [int(i) for i in op.inputs]
            if name == "DEQUANTIZE":
                out = int(op.outputs[0])
                self.graph.operators.remove(op)
                self.replace_uses(out, new)
            elif name in _PASS_THROUGH and ins[0] == old and old not in ins[1:] and self.quantized(int(op.outputs[0])):
                out = int(op.outputs[0])
                twin = self.float_twin(out, "_kq_float")
                op.inputs = np.asarray([new] + ins[1:], "int32")
                op.outputs = np.asarray([twin], "int32")
                position = self.graph.operators.index(op) + 1
                self.float_reads(out, twin)
                if self.consumers(out) or out in [int(i) for i in self.graph.outputs]:  # still read quantized
                    self.insert_op(position, "QUANTIZE", [twin], [out])
            else:
                requantize = True
        self.graph.outputs = np.asarray([new if int(i) == old else int(i) for i in self.graph.outputs], "int32")
        if requantize:
            self.insert_op(0 if old in [int(i) for i in self.graph.inputs] else self._after(new), "QUANTIZE",
                           [new], [old])

    def _after(self, t):
        for k, op in enumerate(self.graph.operators):
            if t in [int(i) for i in op.outputs]:
                return k + 1
        return 0


def float_loop_carries(data):
    """Rewrite a TFLite model so that no WHILE loop carries a quantized tensor; returns `(bytes, count)`.

    The converter sinks the DEQUANTIZE of a loop's input into the loop body (a recurrent layer's
    float loop reads the int8 output of the quantized layer before it, and dequantizes each step's
    slice), so the WHILE op carries an int8 tensor. tf2onnx then dequantizes it outside the ONNX
    Loop while the body still declares it int8, a type mismatch onnxruntime refuses. Here each
    quantized tensor a WHILE op carries is dequantized before the loop, carried in float, and the
    body's DEQUANTIZE (after value-moving ops such as GATHER) dropped; what the body still reads as
    integers it quantizes again, and a quantized loop result is quantized again after the loop. The
    values are the same (dequantize then quantize on one grid is exact). `count`: tensors rewritten.
    """
    flat = FlatModel(data)
    count = 0
    for s in range(len(flat.model.subgraphs)):
        outer = _Subgraph(flat, s)
        for op in list(outer.graph.operators):
            if flat.op_name(op) != "WHILE":
                continue
            opts = op.builtinOptions
            cond, body = _Subgraph(flat, opts.condSubgraphIndex), _Subgraph(flat, opts.bodySubgraphIndex)
            for k, t in enumerate([int(i) for i in op.inputs]):
                if not outer.quantized(t):
                    continue
                carried = outer.float_twin(t, "_kq_dequantized")
                outer.insert_op(outer.graph.operators.index(op), "DEQUANTIZE", [t], [carried])
                op.inputs[k] = carried
                result = int(op.outputs[k])
                if outer.quantized(result):
                    float_result = outer.float_twin(result, "_kq_float")
                    op.outputs[k] = float_result
                    if outer.consumers(result) or result in [int(i) for i in outer.graph.outputs]:
                        outer.insert_op(outer.graph.operators.index(op) + 1, "QUANTIZE", [float_result], [result])
                for sub in (cond, body):
                    old = int(sub.graph.inputs[k])
                    if not sub.quantized(old):
                        continue
                    new = sub.float_twin(old, "_kq_float")
                    sub.graph.inputs[k] = new
                    sub.float_reads(old, new)
                out = int(body.graph.outputs[k])
                if body.quantized(out):  # the body writes the carried value back as integers
                    back = body.float_twin(out, "_kq_float")
                    body.insert_op(len(body.graph.operators), "DEQUANTIZE", [out], [back])
                    body.graph.outputs[k] = back
                count += 1
    return (flat.to_bytes(), count) if count else (data, 0)
