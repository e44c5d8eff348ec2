"""What every runner shares: the quantize / dequantize of I/O, the input checks, the batching, `Runner`.

The runners themselves live beside this module (`keras_quant.runtime.keras_runner`,
`.tflite_runner`, `.onnx_runner`); `keras_quant.runtime` re-exports them and
`load` picks one. See `keras_quant.runtime` for the behaviour they share.

Example:

>>> import numpy as np
>>> from keras_quant.runtime.base import chunks
>>> [(c[0].tolist(), n) for c, n in chunks([np.arange(3)], fixed_batch=2, batch_size=None)]
[([0, 1], 2), ([2, 2], 1)]
"""

import abc
import statistics
import time

import keras
import numpy as np

from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError, check_int

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Runner",
    "ChunkedRunner",
    "quantize_input",
    "dequantize_output",
    "as_integer_input",
    "check_inputs",
    "chunks",
    "dim",
    "graph_samples",
]

DEFAULT_BATCH_SIZE = 32

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


def check_inputs(x, input_shapes, field="x"):
    """`x` as a list of numpy arrays matching `input_shapes`, batch on axis 0.

    Args:
        x: An array, or a list / tuple of arrays (one per input).
        input_shapes: Per input, its shape (None for a dynamic dimension; the
            batch dimension is not compared), or None: any shape.
        field: The argument's name in the errors; input `i` of several is
            `field[i]`.

    Returns:
        A list of numpy arrays.

    Raises:
        ConfigError: The wrong number of inputs (`len(field)`), or data that is
            not numeric.
        ShapeMismatchError: An input of another rank or per-sample shape, or
            inputs with different numbers of samples.
        NoDataError: No sample.

    Example:

    >>> [a.shape for a in check_inputs(np.zeros((2, 4)), [(None, 4)])]
    [(2, 4)]
    """
    xs = _as_input_list(x)
    n = len(input_shapes)

    def name(i):
        return field if n == 1 else f"{field}[{i}]"

    if len(xs) != n:
        raise ConfigError(f"len({field})", len(xs), f"the model takes {n} input(s); pass a list of {n} arrays")
    for i, (a, want) in enumerate(zip(xs, input_shapes)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ConfigError(f"{name(i)}.dtype", str(a.dtype), "inputs must be numeric (float32 data)")
        if want is None:
            continue
        fits = a.ndim == len(want) and all(w is None or w == s for w, s in zip(want[1:], a.shape[1:]))
        if not fits:
            raise ShapeMismatchError(name(i), tuple(want), tuple(a.shape))
    sizes = {a.shape[0] if a.ndim else 1 for a in xs}
    if len(sizes) > 1:
        raise ShapeMismatchError(field, "the same number of samples in every input", [a.shape for a in xs])
    if 0 in sizes or not xs:
        raise NoDataError(field, "predict needs at least one sample")
    return xs


def graph_samples(graph, data, max_samples, what):
    """The first `max_samples` samples of `data` for a Functional graph's inputs, in the inputs' dtypes.

    `data`: an array with the batch on axis 0, or a list of arrays (one per input).
    `what`: the caller, for the messages. Raises ConfigError (bad `max_samples`),
    ShapeMismatchError (naming `data`) and NoDataError (no sample).
    """
    max_samples = check_int("max_samples", max_samples, allow_none=True)
    if data is None or isinstance(data, (list, tuple)) and not data:
        raise NoDataError("data", f"{what} needs at least one sample")
    shapes = [tuple(dim(d) for d in t.shape) for t in graph.inputs]
    try:
        xs = check_inputs(data, shapes, field="data")
    except NoDataError:
        raise NoDataError("data", f"{what} needs at least one sample") from None
    return [np.asarray(a[:max_samples]).astype(keras.backend.standardize_dtype(t.dtype))
            for a, t in zip(xs, graph.inputs)]


def dim(d):
    """A dimension as an int, or None where it is dynamic (-1, None, a name)."""
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def chunks(xs, fixed_batch, batch_size):
    """Yield `(chunk_arrays, num_real)`: the data in runs of the runner's batch.

    Args:
        xs: A list of arrays with the same number of samples.
        fixed_batch: The artifact's fixed batch dimension, or None (dynamic).
            A fixed batch decides the size, and the last chunk is padded to it
            by repeating its last sample.
        batch_size: The size where the batch is dynamic (default 32).
    """
    n = xs[0].shape[0]
    size = fixed_batch or batch_size or DEFAULT_BATCH_SIZE
    for start in range(0, n, size):
        chunk = [a[start : start + size] for a in xs]
        real = chunk[0].shape[0]
        if fixed_batch and real < fixed_batch:
            chunk = [np.concatenate([c, np.repeat(c[-1:], fixed_batch - real, axis=0)]) for c in chunk]
        yield chunk, real


def float32(a):
    """`a` as a float32 numpy array (no copy where it is one)."""
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
class Runner(abc.ABC):
    """What every runner offers; made by `load`.

    A runner implements `_predict` (the whole prepared input), `_infer_fn`
    (one batch-1 inference, for `latency`) and `size_bytes`; a file runner
    derives from `ChunkedRunner`, which gives `_predict` from a per-chunk `_run`.

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

    @abc.abstractmethod
    def _predict(self, xs, batch_size):
        """The float32 outputs (a list) of the checked inputs `xs`, in batches of `batch_size`."""

    @abc.abstractmethod
    def _infer_fn(self, sample):
        """A no-argument callable running one prepared batch-1 inference."""

    @property
    def output_quantization(self):
        """`(scale, zero_point)` of the first output's grid, or None."""
        return None

    @property
    @abc.abstractmethod
    def size_bytes(self):
        """The artifact's size in bytes."""

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
        batch_size = check_int("batch_size", batch_size, allow_none=True)
        xs = check_inputs(x, self.input_shapes)
        outputs = [float32(o) for o in self._predict(xs, batch_size)]
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
        runs = check_int("runs", runs)
        warmup = check_int("warmup", warmup, minimum=0)
        xs = check_inputs(x, self.input_shapes)
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


class ChunkedRunner(Runner):
    """A runner of a file (TFLite, ONNX): `predict` feeds it chunk by chunk (`chunks`), padding to a fixed batch."""

    _fixed_batch = None  # the artifact's fixed batch dimension, or None

    @abc.abstractmethod
    def _run(self, chunk):
        """The float32 outputs of one chunk of prepared-to-feed arrays."""

    def _predict(self, xs, batch_size):
        parts = [[o[:real] for o in self._run(chunk)] for chunk, real in chunks(xs, self._fixed_batch, batch_size)]
        return [np.concatenate(p) for p in zip(*parts)]
