"""`TFLiteRunner`: a TFLite flatbuffer in the LiteRT interpreter behind the runner interface of `keras_quant.runtime`.

Besides `predict` and `latency`, a runner made with `preserve_all_tensors=True`
reads any intermediate tensor of the file (`TFLiteRunner.intermediates`), which
`keras_quant.analysis.layer_errors` compares with the float model's layers.

LiteRT comes from `ai_edge_litert` (the `keras-quant[litert]` extra), else from
`tf.lite`. `ops_details` is the one place that calls a private LiteRT API.

Example:

>>> from keras_quant.runtime.tflite_runner import TFLiteRunner
>>> runner = TFLiteRunner(open("model_int8.tflite", "rb").read(), preserve_all_tensors=True)  # doctest: +SKIP
>>> [op["op_name"] for op in runner.ops()][:2]                                                 # doctest: +SKIP
['QUANTIZE', 'CONV_2D']
"""

import pathlib

import numpy as np

from keras_quant.errors import ConfigError, check_int
from keras_quant.runtime.base import ChunkedRunner, as_integer_input, check_inputs, chunks, dequantize_output, dim, float32
from keras_quant.runtime.base import quantize_input

__all__ = ["TFLiteRunner", "TFLITE_IDENTIFIER", "ops_details", "tflite_qparams"]

# A TFLite flatbuffer carries this file identifier at bytes 4..8.
TFLITE_IDENTIFIER = b"TFL3"


def _litert():
    """`(Interpreter class, flatbuffer schema module)`: ai_edge_litert, else tf.lite."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            import tensorflow as tf
            from tensorflow.lite.python import schema_py_generated as schema
        except ImportError as e:
            raise ImportError(
                "Running a .tflite file needs ai-edge-litert (pip install 'keras-quant[litert]') or tensorflow"
            ) from e
        Interpreter = tf.lite.Interpreter
    return Interpreter, schema


def _tflite_dequantize_source(content, schema):
    """Quantization `(scale, zero_point)` of the tensor a DEQUANTIZE op turns into the first output."""
    model = schema.Model.GetRootAs(content, 0)
    graph = model.Subgraphs(0)
    if graph is None or graph.OutputsLength() == 0:
        return None
    output = graph.Outputs(0)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if output not in op.OutputsAsNumpy():
            continue
        code = model.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != schema.BuiltinOperator.DEQUANTIZE:
            return None
        q = graph.Tensors(op.Inputs(0)).Quantization()
        if q is None or q.ScaleLength() != 1 or q.ScaleAsNumpy()[0] <= 0:
            return None
        zero_point = int(q.ZeroPointAsNumpy()[0]) if q.ZeroPointLength() else 0
        return float(q.ScaleAsNumpy()[0]), zero_point
    return None


def tflite_qparams(detail):
    """`(scale, zero_point)` of a per-tensor quantized tensor, or None.

    Args:
        detail: A tensor's detail dict from the interpreter
            (`get_tensor_details`, `get_input_details`, ...).

    Example:

    >>> tflite_qparams({"quantization": (0.5, -3)}), tflite_qparams({"quantization": (0.0, 0)})
    ((0.5, -3), None)
    """
    scale, zero_point = detail["quantization"]
    return (float(scale), int(zero_point)) if scale > 0 else None


def ops_details(interpreter):
    """Every op the interpreter runs, in its order: dicts of `index`, `op_name`, `inputs`, `outputs`.

    `inputs` / `outputs` are tensor indices (-1 for an omitted optional input).
    This is the one call of LiteRT's private `Interpreter._get_ops_details`:
    LiteRT offers no public way to list the ops with their tensors (the
    flatbuffer's operator list is not the interpreter's, which may reorder
    with a delegate), and `kq.analysis.layer_errors` needs it to order the
    tensors and find the activation op after a layer. `tests/test_runtime.py`
    pins the keys read here.

    Args:
        interpreter: A LiteRT (or `tf.lite`) `Interpreter`, tensors allocated.

    Returns:
        A list of dicts.
    """
    details = interpreter._get_ops_details()  # private LiteRT API: see the docstring
    return [{"index": int(op["index"]), "op_name": op["op_name"], "inputs": [int(i) for i in op["inputs"]],
             "outputs": [int(o) for o in op["outputs"]]} for op in details]


def _as_float(out, detail):
    """An interpreter tensor as float32: integer tensors dequantized with their own scale and zero point."""
    qparams = tflite_qparams(detail) if np.issubdtype(out.dtype, np.integer) else None
    return dequantize_output(out, *qparams) if qparams else float32(out)


class TFLiteRunner(ChunkedRunner):
    """A TFLite flatbuffer, run in the LiteRT interpreter.

    int8 / uint8 / int16 inputs are quantized with the input tensor's scale and
    zero point (see the module docstring) and integer outputs dequantized.
    `output_quantization` is the first output's `(scale, zero_point)` when it is
    integer-typed, else that of the tensor a DEQUANTIZE op turns into it (a
    model quantized inside with float I/O), else None. `size_bytes` is the
    flatbuffer's size.

    Args:
        content: The flatbuffer's bytes.
        name: A label.
        num_threads: Interpreter threads; None lets LiteRT decide.
        path: The file it came from, if any.
        preserve_all_tensors: Keep every intermediate tensor readable after
            `invoke` (LiteRT's debugging mode; more memory), as
            `intermediates` needs.
    """

    kind = "tflite"

    def __init__(self, content, name="tflite", num_threads=None, path=None, preserve_all_tensors=False):
        Interpreter, self._schema = _litert()
        self._content = bytes(content)
        self.path = None if path is None else pathlib.Path(path)
        kwargs = {} if num_threads is None else {"num_threads": int(num_threads)}
        self.preserve_all_tensors = bool(preserve_all_tensors)
        if preserve_all_tensors:  # every intermediate tensor stays readable (intermediates)
            kwargs["experimental_preserve_all_tensors"] = True
        self.interpreter = Interpreter(model_content=self._content, **kwargs)
        self.interpreter.allocate_tensors()
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        shapes = [tuple(dim(d) for d in detail["shape_signature"]) for detail in self._inputs]
        super().__init__(name, [d["name"] for d in self._inputs], shapes)
        first = shapes[0] if shapes else ()
        self._fixed_batch = first[0] if first else None

    @property
    def input_details(self):
        """The interpreter's input tensor details, in `predict`'s input order."""
        return list(self._inputs)

    @property
    def output_details(self):
        """The interpreter's output tensor details, in `predict`'s output order."""
        return list(self._outputs)

    def tensor_details(self):
        """`{tensor index: detail dict}` of every tensor in the file (name, dtype, quantization, ...)."""
        return {d["index"]: d for d in self.interpreter.get_tensor_details()}

    def ops(self):
        """The ops the interpreter runs, in its order (see `ops_details`)."""
        return ops_details(self.interpreter)

    @property
    def output_quantization(self):
        detail = self._outputs[0]
        if np.issubdtype(detail["dtype"], np.integer):
            return tflite_qparams(detail)
        return _tflite_dequantize_source(self._content, self._schema)

    @property
    def size_bytes(self):
        return len(self._content)

    def _prepare(self, detail, a):
        dtype = detail["dtype"]
        if np.issubdtype(dtype, np.integer):
            qparams = tflite_qparams(detail)
            if qparams is not None:
                return quantize_input(a, *qparams, dtype)
            return as_integer_input(a, dtype, detail["name"])
        return np.ascontiguousarray(a, dtype=dtype)

    def _set_inputs(self, chunk):
        """Set the inputs, resizing them to the chunk's shapes first where they differ.

        Every input is resized before the one `allocate_tensors`: allocating after
        resizing only the first of two inputs makes the interpreter prepare each op
        for a batch-32 input beside a batch-1 one (XNNPack's reshape then fails on
        the mismatch), an error of the order of the calls, not of the file.
        """
        resized = False
        for detail, a in zip(self._inputs, chunk):
            if tuple(detail["shape"]) != a.shape:
                self.interpreter.resize_tensor_input(detail["index"], list(a.shape))
                resized = True
        if resized:
            self.interpreter.allocate_tensors()
            self._inputs = self.interpreter.get_input_details()
        for detail, a in zip(self._inputs, chunk):
            self.interpreter.set_tensor(detail["index"], a)

    def _invoke(self, chunk):
        self._set_inputs([self._prepare(d, a) for d, a in zip(self._inputs, chunk)])
        self.interpreter.invoke()

    def _run(self, chunk):
        self._invoke(chunk)
        return [_as_float(self.interpreter.get_tensor(d["index"]), d) for d in self.interpreter.get_output_details()]

    def intermediates(self, x, tensors, batch_size=None):
        """The values any tensors of the file take on `x`, as float32 (integer ones dequantized).

        Runs `x` as `predict` does (quantizing integer inputs, in chunks of the
        file's batch) and reads each tensor after every run, dequantized with
        its own scale and zero point where it is integer-typed (integer tensors
        without one, indices, are converted as they are).

        Args:
            x: The data, as `predict` takes it.
            tensors: Tensor indices or names (see `tensor_details`); the file's
                inputs and outputs may be among them.
            batch_size: As in `predict`.

        Returns:
            A list of float32 numpy arrays, one per tensor, batch on axis 0.

        Raises:
            ConfigError: A runner made without `preserve_all_tensors=True`
                (LiteRT reuses the memory of intermediate tensors), or a tensor
                the file does not have; and what `predict` raises.

        Example:

        >>> runner = TFLiteRunner(content, preserve_all_tensors=True)        # doctest: +SKIP
        >>> out = runner.output_details[0]["index"]                           # doctest: +SKIP
        >>> np.allclose(runner.intermediates(x, [out])[0], runner.predict(x))  # doctest: +SKIP
        True
        """
        if not self.preserve_all_tensors:
            raise ConfigError("preserve_all_tensors", False, "intermediates reads tensors LiteRT frees after each op; "
                              "make the runner with TFLiteRunner(..., preserve_all_tensors=True)")
        batch_size = check_int("batch_size", batch_size, allow_none=True)
        xs = check_inputs(x, self.input_shapes)
        details = self.tensor_details()
        by_name = {d["name"]: i for i, d in details.items()}
        indices = []
        for t in tensors:
            index = by_name.get(t) if isinstance(t, str) else t
            if index not in details:
                raise ConfigError("tensors", t, f"{self.name} has no such tensor (indices 0..{len(details) - 1}, "
                                  "or a name from tensor_details())")
            indices.append(index)
        parts = []
        for chunk, real in chunks(xs, self._fixed_batch, batch_size):
            self._invoke(chunk)
            parts.append([_as_float(self.interpreter.get_tensor(i), details[i])[:real] for i in indices])
        return [np.concatenate(p) for p in zip(*parts)]

    def _infer_fn(self, sample):
        chunk = next(chunks(sample, self._fixed_batch, 1))[0]
        prepared = [self._prepare(d, a) for d, a in zip(self._inputs, chunk)]
        self._set_inputs(prepared)
        indices = [d["index"] for d in self._inputs]
        outputs = [d["index"] for d in self._outputs]

        def call():
            for i, a in zip(indices, prepared):
                self.interpreter.set_tensor(i, a)
            self.interpreter.invoke()
            return [self.interpreter.get_tensor(i) for i in outputs]

        return call
