"""`ONNXRunner`: an ONNX model in onnxruntime behind the runner interface of `keras_quant.runtime`.

Needs `onnxruntime` (and `onnx` to read the quantization of the inputs and
outputs): the `keras-quant[onnx]` extra.

Example:

>>> from keras_quant.runtime.onnx_runner import ONNXRunner
>>> runner = ONNXRunner("model_int8.onnx", num_threads=1)      # doctest: +SKIP
>>> runner.output_quantization                                  # doctest: +SKIP
(0.0039, -128)
"""

import os
import pathlib

import numpy as np

from keras_quant.errors import ConfigError
from keras_quant.runtime.base import ChunkedRunner, as_integer_input, chunks, dequantize_output, dim, float32, quantize_input

__all__ = ["ONNXRunner", "ONNX_FLOAT_TYPES", "ONNX_INT_TYPES", "ONNX_INPUT_INT_TYPES"]

ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
ONNX_INT_TYPES = {
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
}
# Integer inputs a runner takes as they are (indices: an Embedding's token ids), besides quantized ones.
ONNX_INPUT_INT_TYPES = dict(ONNX_INT_TYPES, **{"tensor(int64)": np.int64})


def _onnx_constants(graph):
    """name -> numpy array of every initializer and Constant node output."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    return constants


def _onnx_output_qparams(model_proto, output_name, op_types=("DequantizeLinear",)):
    """Scalar `(scale, zero_point)` of the `op_types` node producing `output_name` (through Identity), or None."""
    graph = model_proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(output_name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is None or node.op_type not in op_types:
        return None
    constants = _onnx_constants(graph)
    scale = constants.get(node.input[1])
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    return float(scale.reshape(())), int(zero_point.reshape(()))


class ONNXRunner(ChunkedRunner):
    """An ONNX model, run with onnxruntime's CPUExecutionProvider.

    Float inputs (float32, float16 or double; QDQ models such as
    `kq.export_onnx`'s take and give float32) get the data as it is. Integer
    inputs: one read by a DequantizeLinear (a quantized input) gets the data
    quantized with that node's scale and zero point; any other (int32 / int64
    indices, e.g. an Embedding's token ids, which `kq.export_onnx` writes as
    int32) gets the values as integers, refusing data with fractions. `output_quantization` is the
    scalar `(scale, zero_point)` of the DequantizeLinear node producing the
    first output (or of the QuantizeLinear node, when the output is integer,
    which `predict` then dequantizes), else None. `size_bytes` is the `.onnx`
    file's size (external data files not counted).

    Args:
        path: The `.onnx` file.
        num_threads: `SessionOptions.intra_op_num_threads`; None lets
            onnxruntime decide.
    """

    kind = "onnx"

    def __init__(self, path, num_threads=None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("Running a .onnx file needs onnxruntime (pip install 'keras-quant[onnx]')") from e
        self.path = pathlib.Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        for node in inputs:
            if node.type not in ONNX_FLOAT_TYPES and node.type not in ONNX_INPUT_INT_TYPES:
                raise ConfigError(
                    "input_type",
                    node.type,
                    f"ONNXRunner takes float or integer inputs, and input '{node.name}' of {self.path.name} is "
                    "neither; export the model with float32 inputs (kq.export_onnx does)",
                )
        self._dtypes = [ONNX_FLOAT_TYPES.get(node.type) or ONNX_INPUT_INT_TYPES[node.type] for node in inputs]
        self._output_names = [node.name for node in self.session.get_outputs()]
        proto = self._load_proto()
        self._output_qparams = self._read_output_qparams(proto)
        self._input_qparams = self._read_input_qparams(proto, inputs)
        shapes = [tuple(dim(d) for d in node.shape) for node in inputs]
        super().__init__(self.path.name, [node.name for node in inputs], shapes)
        first = shapes[0] if shapes else ()
        self._fixed_batch = first[0] if first else None

    def _load_proto(self):
        try:
            import onnx
        except ImportError:
            return None
        return onnx.load(str(self.path), load_external_data=False)

    def _read_input_qparams(self, proto, inputs):
        """Per input: `(scale, zero_point)` of the DequantizeLinear reading an integer input, or None."""
        result = []
        for node in inputs:
            qparams = None
            if proto is not None and node.type in ONNX_INT_TYPES:
                readers = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.name]
                if readers:
                    qparams = _onnx_output_qparams(proto, readers[0].output[0])
            result.append(qparams)
        return result

    def _read_output_qparams(self, proto):
        """Per output: `(scale, zero_point, integer_output)` or None."""
        if proto is None:
            return [None] * len(self._output_names)
        result = []
        for node in self.session.get_outputs():
            integer = node.type in ONNX_INT_TYPES
            ops = ("QuantizeLinear",) if integer else ("DequantizeLinear",)
            qparams = _onnx_output_qparams(proto, node.name, ops)
            result.append(None if qparams is None else (*qparams, integer))
        return result

    @property
    def output_quantization(self):
        first = self._output_qparams[0] if self._output_qparams else None
        return None if first is None else first[:2]

    @property
    def size_bytes(self):
        return os.path.getsize(self.path)

    def _feeds(self, chunk):
        feeds = {}
        for name, a, dtype, qparams in zip(self.input_names, chunk, self._dtypes, self._input_qparams):
            if qparams is not None:
                feeds[name] = quantize_input(a, *qparams, dtype)
            elif np.issubdtype(dtype, np.integer):
                feeds[name] = as_integer_input(a, dtype, name)
            else:
                feeds[name] = np.ascontiguousarray(a, dtype=dtype)
        return feeds

    def _run(self, chunk):
        outputs = self.session.run(self._output_names, self._feeds(chunk))
        result = []
        for out, q in zip(outputs, self._output_qparams):
            result.append(dequantize_output(out, q[0], q[1]) if q and q[2] else float32(out))
        return result

    def _infer_fn(self, sample):
        feeds = self._feeds(next(chunks(sample, self._fixed_batch, 1))[0])
        return lambda: self.session.run(self._output_names, feeds)
