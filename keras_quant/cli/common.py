"""What the `keras-quant` commands share: argument types, model loading, evaluation data.

Each helper turns a bad input into one `keras_quant.errors.ConfigError` (or an argparse error),
which `keras_quant.cli.main` prints as one line.
"""

import argparse
import os

from keras_quant.errors import ConfigError

__all__ = ["positive_int", "load_model", "load_eval_data"]


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


def load_model(path):
    """`keras.models.load_model(path, safe_mode=True, compile=False)`, with one-line errors.

    Safe mode holds even after `keras.config.enable_unsafe_deserialization()`
    (`keras_quant.runtime.keras_runner.load_keras_model`).

    Raises:
        ConfigError: If `path` is missing, not a `.keras` file, or does not load.
            Also for a file holding a `Lambda` layer (its code is not loaded).
    """
    from keras_quant.runtime.keras_runner import load_keras_model

    if not os.path.exists(path):
        raise ConfigError("model", path, "no such model file")
    if os.path.isdir(path) or not path.lower().endswith(".keras"):
        raise ConfigError("model", path, "the model must be a .keras file (Keras 3's native format)")
    return load_keras_model(path, compile=False)  # safe mode held on, whatever keras.config says


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
            if len(labels) != n:
                raise ConfigError("data", path, f"the array 'y' holds {len(labels)} labels for {n} samples")
    if samples is not None:
        x = {k: v[:samples] for k, v in x.items()} if isinstance(x, dict) else x[:samples]
        labels = None if labels is None else labels[:samples]
    return x, labels
