"""`KerasRunner`: a Keras model behind the runner interface of `keras_quant.runtime`.

Example:

>>> import keras, numpy as np
>>> from keras_quant.runtime.keras_runner import KerasRunner
>>> runner = KerasRunner(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
>>> runner.predict(np.zeros((2, 4), "float32")).shape
(2, 3)
"""

import json
import os
import pathlib
import zipfile

import keras
import numpy as np

from keras_quant.errors import ConfigError
from keras_quant.runtime.base import DEFAULT_BATCH_SIZE, Runner, dim

__all__ = ["KerasRunner", "load_keras_model"]


def _lambda_layers(config):
    """Names of the `Lambda` layers anywhere in a model's saved config (nested models included)."""
    found = []
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            found.append(config.get("config", {}).get("name", "lambda"))
        for value in config.values():
            found += _lambda_layers(value)
    elif isinstance(config, list):
        for value in config:
            found += _lambda_layers(value)
    return found


def _saved_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def load_keras_model(path, compile=False):  # noqa: A002 (Keras' argument name)
    """`keras.saving.load_model(path, safe_mode=True)`, in safe mode whatever the process-wide setting.

    Keras lets `keras.config.enable_unsafe_deserialization()` override an
    explicit `safe_mode=True`; this loader holds safe mode on for the load
    itself, so a file's Python code (a `Lambda` layer's function) never runs.

    Args:
        path: A `.keras` file.
        compile: Whether to restore the training configuration.

    Returns:
        The `keras.Model`.

    Raises:
        ConfigError: A file holding a `Lambda` layer (its code is not loaded), naming it; a file Keras
            cannot load (the reason in the message).

    Example:

    >>> model = load_keras_model("model.keras")   # doctest: +SKIP
    """
    from keras.src.saving import serialization_lib  # Keras' safe-mode scope: the global the override reads

    try:
        with serialization_lib.SafeModeScope(True):
            return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
        lambdas = _lambda_layers(_saved_config(path))
        if lambdas:
            raise ConfigError("layer_type", "Lambda", f"the file holds a Lambda layer ('{lambdas[0]}'), whose Python "
                              "code is never loaded from a file (safe_mode=True, whatever keras.config says); "
                              "rebuild the model in Python, or replace the Lambda by a registered layer",
                              layer=lambdas[0]) from None
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError("model", str(path), f"cannot load a Keras model from the file ({type(e).__name__}: "
                          f"{reason})") from None


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
            shapes = [tuple(dim(d) for d in t.shape) for t in inputs]
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
