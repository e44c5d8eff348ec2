"""What the `keras-quant` commands share: argument types, model loading, evaluation data.

Each helper turns a bad input into one `keras_quant.errors.ConfigError` (or an argparse error),
which `keras_quant.cli.main` prints as one line.
"""

import argparse
import os
import zipfile

from keras_quant.errors import ConfigError

__all__ = ["positive_int", "check_output_file", "check_input_file", "load_model", "load_artifact", "load_eval_data"]


def positive_int(text):
    """argparse type: an integer of at least 1.

    Raises:
        argparse.ArgumentTypeError: If `text` is not such an integer.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def check_output_file(path, field, suffixes, what="output"):
    """Refuse, before any work, an output file the command could not write (so none is half-made).

    Args:
        path: The output file named on the command line.
        field: The option, for the error (`"output"`).
        suffixes: The name endings accepted (lower case, with the dot).
        what: What the file is, for the error (`"report"`).

    Raises:
        ConfigError: For another ending, a directory, a missing or read-only folder.
    """
    if not path.lower().endswith(tuple(suffixes)):
        raise ConfigError(field, path, f"the {what} name must end in {' or '.join(suffixes)}")
    if os.path.isdir(path):
        raise ConfigError(field, path, "the output path is a directory; name a file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(field, path, f"the output directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(field, path, f"the output directory {directory} is not writable")


def check_input_file(path, field, what="file"):
    """Refuse an input path that is missing, not a regular file, unreadable or empty.

    Raises:
        ConfigError: Naming `field`, `path` and what is wrong with it (`what`: `"model file"`, ...).
    """
    if not os.path.exists(path):
        raise ConfigError(field, path, f"no such {what}")
    if not os.path.isfile(path):
        raise ConfigError(field, path, f"the {what} is a directory or a special file, not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(field, path, f"the {what} is not readable")
    if os.path.getsize(path) == 0:
        raise ConfigError(field, path, f"the {what} is empty")


def load_model(path, field="model"):
    """`keras.models.load_model(path, safe_mode=True, compile=False)`, with one-line errors.

    A model with a Python `Lambda` layer is refused (safe mode: loading it would run code from the file),
    even after `keras.config.enable_unsafe_deserialization()`
    (`keras_quant.runtime.keras_runner.load_keras_model`).

    Raises:
        ConfigError: If `path` is missing, not a `.keras` file, or does not load.
            Also for a file holding a `Lambda` layer (its code is not loaded).
    """
    import importlib

    importlib.import_module("keras_quant")  # registers the toolkit's layers for deserialization
    from keras_quant.runtime.keras_runner import load_keras_model

    check_input_file(path, field, "model file")
    if not path.lower().endswith(".keras"):
        raise ConfigError(field, path, "the model must be a .keras file (Keras 3's native format)")
    if not zipfile.is_zipfile(path):
        raise ConfigError(field, path, "cannot load a Keras model from the file: it is not a zip archive (what Keras 3 writes)")
    try:
        return load_keras_model(path, compile=False)  # safe mode held on, whatever keras.config says
    except ConfigError as e:
        if e.field == "layer_type":  # a Lambda layer: its code is not loaded
            raise ConfigError(field, path, f"the model holds a Python lambda (Lambda layer '{e.layer}'), which is "
                              "not loaded: it could run any code; rebuild it without Lambda layers") from None
        raise
    except Exception as e:  # noqa: BLE001 - a hostile file may raise anything from Keras' deserializer
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(field, path, f"cannot load a Keras model from the file ({type(e).__name__}: {reason})") from None


def load_artifact(path, field="artifact"):
    """Check that an exported `.tflite` / `.onnx` (or `.keras`) file loads in its runtime, before any work.

    Raises:
        ConfigError: If it is missing, of another kind, or does not load (a Lambda `.keras` file included).
    """
    from keras_quant import runtime
    from keras_quant.errors import KerasQuantError

    check_input_file(path, field, "file")
    if path.lower().endswith(".keras"):
        return load_model(path, field)
    if not path.lower().endswith((".tflite", ".onnx")):
        raise ConfigError(field, path, "the file must end in .tflite, .onnx or .keras")
    try:
        return runtime.load(path)
    except KerasQuantError:
        raise
    except Exception as e:  # noqa: BLE001 - LiteRT and onnxruntime raise their own types for a bad file
        raise ConfigError(field, path, f"the file does not load in its runtime ({type(e).__name__}: "
                          f"{' '.join(str(e).split())})") from None


def load_eval_data(path, model, samples, normalize="unit"):
    """`(x, labels or None)`: at most `samples` inputs from DATA, and the `.npz` array 'y' as labels.

    Raises:
        ConfigError: If the data does not load for `model`, or 'y' holds a different number of samples.
    """
    import numpy as np

    from keras_quant.data import load_array_file, load_calibration_data

    x = load_calibration_data(path, model, normalize=normalize)
    labels = None
    if str(path).lower().endswith(".npz"):
        arrays = load_array_file(path)
        if "y" in arrays:
            labels = np.asarray(arrays["y"])
            n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
            if labels.ndim == 0:
                raise ConfigError("data", path, f"the array 'y' is a scalar ({labels.dtype}), not one label per sample")
            if len(labels) != n:
                raise ConfigError("data", path, f"the array 'y' holds {len(labels)} labels for {n} samples")
    if samples is not None:
        x = {k: v[:samples] for k, v in x.items()} if isinstance(x, dict) else x[:samples]
        labels = None if labels is None else labels[:samples]
    return x, labels
