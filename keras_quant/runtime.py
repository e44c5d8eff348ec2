"""Run a model in its real runtime: Keras, LiteRT (TFLite) or onnxruntime.

`load(artifact)` gives a runner with one interface whatever the artifact is, so
a Keras model, the `.tflite` file exported from it and the `.onnx` file can be
fed the same float32 data and compared (`kq.analysis.compare_models`):

- `predict(x, batch_size=None)`: float32 numpy outputs (one array, or a list
  for several outputs). Integer-typed inputs are quantized and integer-typed
  outputs dequantized by the runner, with the tensor's own scale and zero point;
  integer inputs without one (indices: an Embedding's token ids) take the
  values as integers, and data with fractions is refused.
- `output_quantization`: `(scale, zero_point)` of the first output's
  quantization grid, or None (see each runner).
- `size_bytes`, `latency(x, runs=50, warmup=5)`, `kind`, `name`,
  `input_names`, `input_shapes` (None for a dynamic dimension).

Inputs are taken in the artifact's input order (a list or tuple of arrays for
several inputs), batch on axis 0. Where the artifact's batch dimension is fixed
at `B` (TFLite files are usually exported with batch 1), the data runs in
chunks of `B`, the last one padded by repeating its last sample; where it is
dynamic, in chunks of `batch_size` (default 32); a TFLite interpreter has every
input resized to the chunk's batch before it allocates its tensors once.

Quantizing an input: `q = clip(round(x / scale) + zero_point, qmin, qmax)` with
`x / scale` in float64 and rounding half away from zero, as TFLite's QUANTIZE
kernel (`std::round`). Dequantizing an output: `(q - zero_point) * scale`.

LiteRT comes from `ai_edge_litert` (the `keras-quant[litert]` extra), else from
`tf.lite`; ONNX needs `onnxruntime` and `onnx` (`keras-quant[onnx]`). Neither
needs the TensorFlow backend.

Example:

>>> import keras, numpy as np
>>> from keras_quant import runtime
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> runner = runtime.load(model)
>>> runner.kind, runner.predict(np.zeros((2, 4), "float32")).shape
('keras', (2, 3))
"""

import os
import pathlib
import statistics
import time

import keras
import numpy as np

from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError

__all__ = [
    "Runner",
    "KerasRunner",
    "TFLiteRunner",
    "ONNXRunner",
    "load",
    "quantize_input",
    "dequantize_output",
    "SUFFIXES",
]

SUFFIXES = (".keras", ".tflite", ".onnx")
DEFAULT_BATCH_SIZE = 32
# A TFLite flatbuffer carries this file identifier at bytes 4..8.
TFLITE_IDENTIFIER = b"TFL3"
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


# Pure functions ----------------------------------------------------------------
def quantize_input(x, scale, zero_point, dtype):
    """`clip(round(x / scale) + zero_point)` in the range of the integer `dtype`.

    Rounds half away from zero (TFLite's QUANTIZE kernel uses `std::round`);
    `x / scale` is computed in float64.

    Args:
        x: Float array.
        scale: Positive float, the step of the grid.
        zero_point: Integer that represents 0.0.
        dtype: Integer numpy dtype of the result (int8, uint8, int16, ...).

    Returns:
        A numpy array of `dtype`.

    Example:

    >>> quantize_input(np.array([0.25, -0.25, 10.0]), 0.5, 0, np.int8).tolist()
    [1, -1, 20]
    """
    info = np.iinfo(dtype)
    v = np.asarray(x, np.float64) / float(scale)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5) + int(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_output(q, scale, zero_point):
    """`(q - zero_point) * scale` as float32.

    Example:

    >>> dequantize_output(np.array([-4, 6], np.int8), 0.5, -4).tolist()
    [0.0, 5.0]
    """
    return ((np.asarray(q, np.float64) - int(zero_point)) * float(scale)).astype(np.float32)


# Input checks ------------------------------------------------------------------
def _as_input_list(x):
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    return [np.asarray(keras.ops.convert_to_numpy(a)) for a in arrays]


def _field(i, n):
    return "x" if n == 1 else f"x[{i}]"


def _check_inputs(x, input_shapes):
    """`x` as a list of arrays matching `input_shapes` (None: any size)."""
    xs = _as_input_list(x)
    n = len(input_shapes)
    if len(xs) != n:
        raise ConfigError("len(x)", len(xs), f"the model takes {n} input(s); pass a list of {n} arrays")
    for i, (a, want) in enumerate(zip(xs, input_shapes)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ConfigError(f"{_field(i, n)}.dtype", str(a.dtype), "inputs must be numeric (float32 data)")
        if want is None:
            continue
        fits = a.ndim == len(want) and all(w is None or w == s for w, s in zip(want[1:], a.shape[1:]))
        if not fits:
            raise ShapeMismatchError(_field(i, n), tuple(want), tuple(a.shape))
    sizes = {a.shape[0] if a.ndim else 1 for a in xs}
    if len(sizes) > 1:
        raise ShapeMismatchError("x", "the same number of samples in every input", [a.shape for a in xs])
    if 0 in sizes or not xs:
        raise NoDataError("x", "predict needs at least one sample")
    return xs


def graph_samples(graph, data, max_samples, what):
    """The first `max_samples` samples of `data` for a Functional graph's inputs, in the inputs' dtypes.

    `data`: an array with the batch on axis 0, or a list of arrays (one per input).
    `what`: the caller, for the messages. Raises ConfigError (bad `max_samples`),
    ShapeMismatchError (naming `data`) and NoDataError (no sample).
    """
    max_samples = _check_positive_int("max_samples", max_samples)
    if data is None or isinstance(data, (list, tuple)) and not data:
        raise NoDataError("data", f"{what} needs at least one sample")
    shapes = [tuple(_dim(d) for d in t.shape) for t in graph.inputs]
    try:
        xs = _check_inputs(data, shapes)
    except ShapeMismatchError as e:  # name the argument as the caller wrote it
        raise ShapeMismatchError(e.field.replace("x", "data", 1), e.expected, e.actual) from None
    except NoDataError:
        raise NoDataError("data", f"{what} needs at least one sample") from None
    return [np.asarray(a[:max_samples]).astype(keras.backend.standardize_dtype(t.dtype))
            for a, t in zip(xs, graph.inputs)]


def _check_positive_int(field, value, allow_none=True, minimum=1):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(field, value, f"{field} must be an integer >= {minimum}")
    return int(value)


def _dim(d):
    """A dimension as an int, or None where it is dynamic (-1, None, a name)."""
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def _chunks(xs, fixed_batch, batch_size):
    """Yield `(chunk_arrays, num_real)`: fixed batches padded with the last sample."""
    n = xs[0].shape[0]
    size = fixed_batch or batch_size or DEFAULT_BATCH_SIZE
    for start in range(0, n, size):
        chunk = [a[start : start + size] for a in xs]
        real = chunk[0].shape[0]
        if fixed_batch and real < fixed_batch:
            chunk = [np.concatenate([c, np.repeat(c[-1:], fixed_batch - real, axis=0)]) for c in chunk]
        yield chunk, real


def _float32(a):
    return np.asarray(a).astype(np.float32, copy=False)


def as_integer_input(a, dtype, field):
    """`a` as the integer `dtype` of an index input (token ids), refusing values that are not integers in range.

    Args:
        a: The data (float or integer array).
        dtype: The input's integer numpy dtype.
        field: The input's name, for the error.

    Raises:
        ConfigError: A value with a fraction, not finite, or outside `dtype`.
    """
    a = np.asarray(a)
    if a.dtype == np.dtype(dtype):
        return np.ascontiguousarray(a)
    info = np.iinfo(dtype)
    values = a.astype(np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < info.min) | (values > info.max)
    if np.any(bad):
        raise ConfigError(field, values[bad].reshape(-1)[0], f"this input takes {np.dtype(dtype).name} values "
                          f"(indices such as token ids) in [{info.min}, {info.max}]; pass integers")
    return np.ascontiguousarray(values.astype(dtype))


# Runners ----------------------------------------------------------------------
class Runner:
    """What every runner offers; made by `load`.

    Attributes:
        kind: `"keras"`, `"tflite"` or `"onnx"`.
        name: A short label (the file name, or the Keras model's name).
        input_names: The inputs' names, in the order `predict` takes them.
        input_shapes: The inputs' shapes, None for a dynamic dimension.
    """

    kind = None

    def __init__(self, name, input_names, input_shapes):
        self.name = name
        self.input_names = list(input_names)
        self.input_shapes = [None if s is None else tuple(s) for s in input_shapes]

    # Subclasses implement these.
    def _predict(self, xs, batch_size):
        raise NotImplementedError

    def _infer_fn(self, sample):
        """A no-argument callable running one prepared batch-1 inference."""
        raise NotImplementedError

    @property
    def output_quantization(self):
        """`(scale, zero_point)` of the first output's grid, or None."""
        return None

    @property
    def size_bytes(self):
        raise NotImplementedError

    def predict(self, x, batch_size=None):
        """Run the model on `x`.

        Args:
            x: A float array with the batch on axis 0, or a list / tuple of
                arrays for a model with several inputs.
            batch_size: Samples per run where the batch dimension is dynamic
                (default 32); a fixed batch dimension decides it instead.

        Returns:
            A float32 numpy array, or a list of them for several outputs.

        Raises:
            ConfigError: Wrong number of inputs, or a bad `batch_size`.
            ShapeMismatchError: An input whose shape the artifact does not take.
            NoDataError: `x` holds no sample.
        """
        batch_size = _check_positive_int("batch_size", batch_size)
        xs = _check_inputs(x, self.input_shapes)
        outputs = [_float32(o) for o in self._predict(xs, batch_size)]
        return outputs[0] if len(outputs) == 1 else outputs

    def latency(self, x, runs=50, warmup=5):
        """Median seconds of one batch-1 inference, timed with `time.perf_counter`.

        The first sample of `x` is prepared once (quantized where the input is
        integer-typed); each timed run is the runtime's own call on it: the
        interpreter's set-tensor / invoke / get-tensor for TFLite,
        `InferenceSession.run` for ONNX, `model.predict_on_batch` (the compiled
        predict function) for Keras.

        Args:
            x: Data as `predict` takes it; only its first sample is used.
            runs: Timed runs (>= 1).
            warmup: Untimed runs first (>= 0).

        Returns:
            A float, seconds.
        """
        runs = _check_positive_int("runs", runs, allow_none=False)
        warmup = _check_positive_int("warmup", warmup, allow_none=False, minimum=0)
        xs = _check_inputs(x, self.input_shapes)
        call = self._infer_fn([a[:1] for a in xs])
        for _ in range(warmup):
            call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return float(statistics.median(times))

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, inputs={self.input_shapes})"


class KerasRunner(Runner):
    """A Keras model, run with `model.predict` (any backend).

    Several outputs come back as a list in `keras.tree.flatten` order (a dict's
    outputs sorted by key).

    `size_bytes` is the `.keras` file's size when loaded from a path, else the
    sum of `nbytes` of `model.weights`. `output_quantization` is None: a Keras
    model's outputs are float. `num_threads` does not apply.

    Args:
        model: A `keras.Model`.
        path: The `.keras` file it was loaded from, if any.
    """

    kind = "keras"

    def __init__(self, model, path=None):
        self.model = model
        self.path = None if path is None else pathlib.Path(path)
        try:
            inputs = list(model.inputs or [])
        except (AttributeError, ValueError):  # subclassed model, never built on data
            inputs = []
        if inputs:
            names = [getattr(t, "name", f"input_{i}") for i, t in enumerate(inputs)]
            shapes = [tuple(_dim(d) for d in t.shape) for t in inputs]
        else:
            names, shapes = ["x"], [None]
        super().__init__(self.path.name if self.path else model.name, names, shapes)

    def _as_model_input(self, xs):
        return xs[0] if len(xs) == 1 else xs

    def _to_list(self, out):
        return keras.tree.flatten(out)  # dict outputs: sorted by key

    def _predict(self, xs, batch_size):
        out = self.model.predict(
            self._as_model_input(xs), batch_size=batch_size or DEFAULT_BATCH_SIZE, verbose=0
        )
        return [keras.ops.convert_to_numpy(o) for o in self._to_list(out)]

    def _infer_fn(self, sample):
        x = self._as_model_input([a.astype(np.float32) for a in sample])
        return lambda: self.model.predict_on_batch(x)

    @property
    def size_bytes(self):
        if self.path is not None:
            return os.path.getsize(self.path)
        total = 0
        for w in self.model.weights:
            itemsize = np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
            total += int(np.prod(w.shape, dtype=np.int64)) * itemsize
        return total


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


def _tflite_qparams(detail):
    """`(scale, zero_point)` of a per-tensor quantized tensor, or None."""
    scale, zero_point = detail["quantization"]
    return (float(scale), int(zero_point)) if scale > 0 else None


class TFLiteRunner(Runner):
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
            `invoke` (LiteRT's debugging mode; more memory).
    """

    kind = "tflite"

    def __init__(self, content, name="tflite", num_threads=None, path=None, preserve_all_tensors=False):
        Interpreter, self._schema = _litert()
        self._content = bytes(content)
        self.path = None if path is None else pathlib.Path(path)
        kwargs = {} if num_threads is None else {"num_threads": int(num_threads)}
        if preserve_all_tensors:  # every intermediate tensor stays readable (kq.analysis.layer_errors)
            kwargs["experimental_preserve_all_tensors"] = True
        self.interpreter = Interpreter(model_content=self._content, **kwargs)
        self.interpreter.allocate_tensors()
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        shapes = [tuple(_dim(d) for d in detail["shape_signature"]) for detail in self._inputs]
        super().__init__(name, [d["name"] for d in self._inputs], shapes)
        first = shapes[0] if shapes else ()
        self._fixed_batch = first[0] if first else None

    @property
    def output_quantization(self):
        detail = self._outputs[0]
        if np.issubdtype(detail["dtype"], np.integer):
            return _tflite_qparams(detail)
        return _tflite_dequantize_source(self._content, self._schema)

    @property
    def size_bytes(self):
        return len(self._content)

    def _prepare(self, detail, a):
        dtype = detail["dtype"]
        if np.issubdtype(dtype, np.integer):
            qparams = _tflite_qparams(detail)
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

    def _get_outputs(self):
        outputs = []
        for detail in self.interpreter.get_output_details():
            out = self.interpreter.get_tensor(detail["index"])
            qparams = _tflite_qparams(detail) if np.issubdtype(out.dtype, np.integer) else None
            outputs.append(dequantize_output(out, *qparams) if qparams else _float32(out))
        return outputs

    def _run(self, chunk):
        self._set_inputs([self._prepare(d, a) for d, a in zip(self._inputs, chunk)])
        self.interpreter.invoke()
        return self._get_outputs()

    def _predict(self, xs, batch_size):
        parts = [[o[:real] for o in self._run(chunk)] for chunk, real in _chunks(xs, self._fixed_batch, batch_size)]
        return [np.concatenate(p) for p in zip(*parts)]

    def _infer_fn(self, sample):
        chunk = next(_chunks(sample, self._fixed_batch, 1))[0]
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


class ONNXRunner(Runner):
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
        shapes = [tuple(_dim(d) for d in node.shape) for node in inputs]
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
            result.append(dequantize_output(out, q[0], q[1]) if q and q[2] else _float32(out))
        return result

    def _predict(self, xs, batch_size):
        parts = [[o[:real] for o in self._run(chunk)] for chunk, real in _chunks(xs, self._fixed_batch, batch_size)]
        return [np.concatenate(p) for p in zip(*parts)]

    def _infer_fn(self, sample):
        feeds = self._feeds(next(_chunks(sample, self._fixed_batch, 1))[0])
        return lambda: self.session.run(self._output_names, feeds)


# Loading ----------------------------------------------------------------------
def load(artifact, num_threads=None):
    """A runner for a Keras model, a `.keras` / `.tflite` / `.onnx` file, or TFLite bytes.

    Args:
        artifact: A `keras.Model`; a path (str or `pathlib.Path`) ending in
            `.keras`, `.tflite` or `.onnx`; the `bytes` of a TFLite
            flatbuffer; or a runner, returned as it is.
        num_threads: CPU threads for the TFLite interpreter and onnxruntime
            (positive int); None lets each runtime decide. Keras ignores it.

    Returns:
        A `KerasRunner`, `TFLiteRunner` or `ONNXRunner`.

    Raises:
        ConfigError: An unknown suffix or type, a missing file, bytes that are
            not a TFLite flatbuffer, a bad `num_threads`, or an ONNX model with
            inputs that are neither float nor integer (strings, booleans).

    Example:

    >>> runner = load("model.tflite", num_threads=1)      # doctest: +SKIP
    >>> runner.predict(x_test).argmax(-1)                 # doctest: +SKIP
    """
    num_threads = _check_positive_int("num_threads", num_threads)
    if isinstance(artifact, Runner):
        return artifact
    if isinstance(artifact, keras.Model):
        return KerasRunner(artifact)
    if isinstance(artifact, (bytes, bytearray, memoryview)):
        content = bytes(artifact)
        if content[4:8] != TFLITE_IDENTIFIER:
            raise ConfigError(
                "artifact", f"<{len(content)} bytes>", "bytes must hold a TFLite flatbuffer (identifier 'TFL3')"
            )
        return TFLiteRunner(content, num_threads=num_threads)
    if not isinstance(artifact, (str, os.PathLike)):
        raise ConfigError(
            "artifact",
            type(artifact).__name__,
            "artifact must be a keras.Model, a path to a .keras / .tflite / .onnx file, or TFLite bytes",
        )
    path = pathlib.Path(artifact)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError("artifact", str(artifact), f"the file must end in one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConfigError("artifact", str(artifact), "no such file")
    if suffix == ".keras":
        return KerasRunner(keras.saving.load_model(path), path=path)
    if suffix == ".tflite":
        return TFLiteRunner(path.read_bytes(), name=path.name, num_threads=num_threads, path=path)
    return ONNXRunner(path, num_threads=num_threads)
