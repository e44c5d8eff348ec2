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

The runners live in `keras_quant.runtime.keras_runner`, `.tflite_runner` and
`.onnx_runner`, on the shared `keras_quant.runtime.base`; this module
re-exports them and `load` picks one.

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

import keras

from keras_quant.errors import ConfigError, check_int
from keras_quant.runtime.base import (
    DEFAULT_BATCH_SIZE,
    Runner,
    as_integer_input,
    check_inputs,
    chunks,
    dequantize_output,
    graph_samples,
    quantize_input,
)
from keras_quant.runtime.keras_runner import KerasRunner, load_keras_model
from keras_quant.runtime.onnx_runner import ONNXRunner
from keras_quant.runtime.tflite_runner import TFLITE_IDENTIFIER, TFLiteRunner, ops_details, tflite_qparams

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
# Also importable from here for the library's own modules: DEFAULT_BATCH_SIZE, TFLITE_IDENTIFIER,
# as_integer_input, check_inputs, chunks, graph_samples, ops_details, tflite_qparams.

SUFFIXES = (".keras", ".tflite", ".onnx")


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
            inputs that are neither float nor integer (strings, booleans), or a
            `.keras` file Keras cannot load.
            A `.keras` file holding a `Lambda` layer too: files load with
            `safe_mode=True` whatever `keras.config` says, so a file's Python
            code never runs.

    Example:

    >>> runner = load("model.tflite", num_threads=1)      # doctest: +SKIP
    >>> runner.predict(x_test).argmax(-1)                 # doctest: +SKIP
    """
    num_threads = check_int("num_threads", num_threads, allow_none=True)
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
        return KerasRunner(load_keras_model(path, compile=True), path=path)
    if suffix == ".tflite":
        return TFLiteRunner(path.read_bytes(), name=path.name, num_threads=num_threads, path=path)
    return ONNXRunner(path, num_threads=num_threads)
