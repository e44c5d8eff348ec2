"""Building and scoring the candidate models behind `keras_quant.analysis.sensitivity`.

`CandidateScorer` calibrates a float model once (or reuses a calibration),
runs the float model once on the evaluation data, and then scores any
`QuantConfig` by building `kq.quantize_model(model, config, calibration=...)`
and running it: the metric value (`Evaluator`) and the weight bytes
(`model_size_bytes`). `find_candidates` lists the layers whose precision can
be switched, each with the BatchNormalization folded into it and the ReLU
fused after it; `only_config` and `with_high` derive the config of one trial.
`keras_quant.analysis.sensitivity` ranks layers and searches mixed precision
with them; its module docstring defines the metrics.

Example:

>>> from keras_quant.analysis.scoring import model_size_bytes
>>> model_size_bytes(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))   # doctest: +SKIP
60
"""

import dataclasses
import math
import re

import keras
import numpy as np

import keras_quant.runtime as runtime
from keras_quant.analysis.common import label_classes, num_samples
from keras_quant.analysis.compare import predicted_classes
from keras_quant.analysis.error import error_stats
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError, check_int

__all__ = [
    "CandidateScorer",
    "Candidate",
    "Evaluator",
    "find_candidates",
    "metric_name",
    "model_size_bytes",
    "only_config",
    "with_high",
    "METRICS",
    "SQNR_CAP_DB",
]

METRICS = ("accuracy", "loss", "sqnr", "mse")
# The SQNR (dB) the float model scores against itself, and the most any candidate scores.
SQNR_CAP_DB = 100.0
# `high="int16"`: 8-bit weights (the config's) with 16-bit symmetric activations, TFLite's 16x8 scheme.
INT16_ACTIVATIONS = QuantSpec(bits=16, symmetric=True)
FLOAT_BYTES = 4


# Model size ----------------------------------------------------------------------
def model_size_bytes(model) -> int:
    """Bytes of a model's weights at the precisions it runs them in.

    A kernel a `QuantizeWrapper` quantizes counts `bits / 8` bytes per element
    (rounded up per tensor); every other parameter counts 4 bytes (float32,
    and biases as int32 as integer runtimes store them). Quantization
    parameters (scales, zero points) and `ActivationQuantizer` layers count
    nothing; a QAT wrapper's BatchNormalization counts nothing either (it is
    folded into the kernel when exported).

    Args:
        model: A Keras model, float or from `kq.quantize_model`.

    Returns:
        The size in bytes (an int).

    Example:

    >>> float_model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model_size_bytes(float_model)          # (12 + 3) * 4
    60
    """
    from keras_quant.layers import walk
    from keras_quant.layers.fake_quant import ActivationQuantizer
    from keras_quant.layers.wrapper import QuantizeWrapper

    layers = [layer for _, layer in walk.leaf_layers(model)] or [model]
    total = 0
    for layer in layers:
        if isinstance(layer, ActivationQuantizer):
            continue
        if isinstance(layer, QuantizeWrapper):
            bits = {id(getattr(layer.layer, name)): spec.bits for name, spec in layer.weight_specs.items()}
            for w in layer.layer.weights:
                n = int(np.prod(w.shape))
                total += math.ceil(n * bits[id(w)] / 8) if id(w) in bits else FLOAT_BYTES * n
        else:
            # A bare `keras.ops` operation of a Functional model (`x * 2` between layers) holds no weights.
            total += sum(FLOAT_BYTES * int(np.prod(w.shape)) for w in getattr(layer, "weights", ()))
    return total


# Candidates ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    """A wrapped layer and the layers that switch precision with it: `(pattern, layer, path)` each."""

    key: str
    members: tuple


def _pattern(key):
    """A `set_layer_name` pattern matching exactly this key."""
    escaped = re.escape(key)
    return key if escaped == key else escaped


def find_candidates(model, config):
    """The layers `quantize_model` wraps under `config`, in graph order, each with its fused chain."""
    from keras_quant.transform.plan import plan_model

    plan = plan_model(model, config, weights=False)  # read only: the chains, not a model to build
    if plan is None:
        raise ConfigError("model", getattr(model, "name", model), "sensitivity needs a built Functional or "
                          "Sequential model (kq.quantize_model rewrites their graph only)")
    flat = plan.flat
    out, seen = [], set()
    for node in flat.nodes:
        layer = node.operation
        step = plan.steps.get(id(layer))
        if id(layer) in seen or step is None or step.kind != "wrap":
            continue
        seen.add(id(layer))
        chain = step.chain
        members = tuple((_pattern(flat.key(x)), flat.origin[id(x)], flat.path(x)) for x in chain)
        out.append(Candidate(flat.key(layer), members))
    return out


def only_config(config, candidate):
    """`config` restricted to one candidate: every other layer float."""
    out = QuantConfig(weights=None, activations=None)
    for pattern, layer, path in candidate.members:
        lc = config.for_layer(layer, path)
        if lc is not None:
            out.set_layer_name(pattern, lc)
    return out


def _high_config(high, config, layer, path):
    """The `LayerQuantConfig` (or None: float) a high-precision layer gets."""
    if high is None:
        return None
    if isinstance(high, LayerQuantConfig):
        return high
    lc = config.for_layer(layer, path)
    if lc is None:
        return None
    return LayerQuantConfig(weights=lc.weights, activations=None if lc.activations is None else INT16_ACTIVATIONS)


def with_high(config, candidates, high):
    """A copy of `config` with every member of `candidates` at high precision.

    `high`: None keeps them float, `"int16"` gives them the config's weights with
    16-bit symmetric activations, a `LayerQuantConfig` is used as it is.
    """
    out = config.copy()
    for candidate in candidates:
        for pattern, layer, path in candidate.members:
            out.set_layer_name(pattern, _high_config(high, config, layer, path))
    return out


# Data and metrics ------------------------------------------------------------------
def _check_data(model, x, field):
    """The number of samples in `x`, once `x` is checked against the model's inputs (count and per-sample shapes)."""
    n = num_samples(x, field)
    inputs = getattr(model, "inputs", None) or []
    if inputs:
        runtime.check_inputs(x, [tuple(t.shape) for t in inputs], field=field)
    return n


def _split_eval(model, eval_data):
    """`(x, y)` from `(x, y)` or `x` alone (y None)."""
    if eval_data is None:
        raise NoDataError("eval_data", "sensitivity needs data to evaluate on")
    if isinstance(eval_data, tuple) and len(eval_data) == 2:
        x, y = eval_data
    else:
        x, y = eval_data, None
    if isinstance(x, list):
        x = [np.asarray(a) for a in x]
    elif isinstance(x, tuple):
        x = [np.asarray(a) for a in x]
    else:
        x = np.asarray(x)
    n = _check_data(model, x, "eval_data")
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != n:
            raise ShapeMismatchError("eval_data labels", f"({n}, ...): one label per sample", y.shape)
    return x, y


def _first(outputs):
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def _loss_fn(model):
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        raise ConfigError("metric", "loss", "metric='loss' uses the model's compiled loss, and the model is not "
                          "compiled; compile it, or use 'accuracy', 'sqnr', 'mse' or a callable")
    loss = model.loss
    if isinstance(loss, (dict, list, tuple)):
        raise ConfigError("metric", "loss", "metric='loss' takes a model with one compiled loss; pass a callable "
                          f"metric for several (the model's loss is {loss!r})")
    return keras.losses.get(loss) if isinstance(loss, str) else loss


class Evaluator:
    """The metric of any candidate model on the evaluation data, against the float model's outputs (run once)."""

    def __init__(self, model, x, y, metric, batch_size):
        if isinstance(metric, str) and metric not in METRICS:
            raise ConfigError("metric", metric, f"metric must be one of {METRICS} or a callable "
                              "metric(y_true, y_pred) -> float (higher is better)")
        if not isinstance(metric, str) and not callable(metric):
            raise ConfigError("metric", metric, f"metric must be one of {METRICS} or a callable")
        if metric in ("accuracy", "loss") and y is None:
            raise NoDataError("eval_data", f"metric={metric!r} needs labels: pass eval_data=(x, y), or use "
                              "'sqnr', 'mse' or a callable metric, which compare with the float model's outputs")
        self.metric, self.x, self.y, self.batch_size = metric, x, y, batch_size
        self.loss = _loss_fn(model) if metric == "loss" else None
        self.higher_is_better = metric not in ("loss", "mse")
        self.reference = self._predict(model)
        self.baseline = self.value_of(self.reference)

    def _predict(self, model):
        return np.asarray(keras.ops.convert_to_numpy(_first(model.predict(self.x, batch_size=self.batch_size,
                                                                          verbose=0))))

    def value_of(self, out):
        if self.metric == "accuracy":
            classes = predicted_classes(out)
            return float(np.mean(classes == label_classes(self.y, out, classes)))
        if self.metric == "loss":
            return float(np.mean(keras.ops.convert_to_numpy(self.loss(self.y, out))))
        if self.metric in ("mse", "sqnr"):
            stats = error_stats(self.reference.astype("float64"), out.astype("float64"))
            return stats.mse if self.metric == "mse" else float(min(stats.sqnr_db, SQNR_CAP_DB))
        y_true = self.reference if self.y is None else self.y
        value = self.metric(y_true, out)
        value = float(np.asarray(keras.ops.convert_to_numpy(value)))
        if not math.isfinite(value):
            raise ConfigError("metric", self.metric, f"the callable metric returned {value}; it must return a "
                              "finite float")
        return value

    def value(self, model):
        return self.value_of(self._predict(model))

    def degradation(self, value):
        return self.baseline - value if self.higher_is_better else value - self.baseline


def metric_name(metric):
    """The metric's name in results: the string itself, or a callable's `__name__`."""
    return metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)


def _calibrate(model, calibration_data, config, calibration, batch_size):
    if calibration is not None:
        if not (hasattr(calibration, "qparams") and hasattr(calibration, "__contains__")):
            raise ConfigError("calibration", calibration, "expected a kq.CalibrationResult or None")
        return calibration
    if calibration_data is None:
        raise NoDataError("calibration_data", "pass calibration inputs, or a kq.CalibrationResult as calibration=")
    from keras_quant.calibration import CalibrationCallback

    x = [np.asarray(a) for a in calibration_data] if isinstance(calibration_data, (list, tuple)) else (
        np.asarray(calibration_data))
    _check_data(model, x, "calibration_data")
    cb = CalibrationCallback(config=config)
    model.predict(x, batch_size=batch_size, callbacks=[cb], verbose=0)
    return cb.result


def _check_common(model, config, verbose, batch_size):
    if config is None:
        config = QuantConfig.int8()
    if not isinstance(config, QuantConfig):
        raise ConfigError("config", config, "expected a kq.QuantConfig or None")
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ConfigError("verbose", verbose, "verbose must be 0 (silent) or 1 (a progress bar)")
    check_int("batch_size", batch_size, allow_none=True)
    if not isinstance(model, keras.Model):
        raise ConfigError("model", model, "expected a keras.Model")
    return config


class CandidateScorer:
    """Builds and scores candidate models: one calibration, one float pass, one pass per candidate."""

    def __init__(self, model, calibration_data, eval_data, config, metric, calibration, batch_size, verbose):
        self.config = _check_common(model, config, verbose, batch_size)
        self.model = model
        self.candidates = find_candidates(model, self.config)
        if not self.candidates:
            raise ConfigError("model", model.name, "no layer to quantize: kq.quantize_model wraps none of its layers "
                              "under this config (no Dense / Conv / ... layer with a quantization rule, or the "
                              "config keeps them all float)")
        x, y = _split_eval(model, eval_data)
        self.evaluator = Evaluator(model, x, y, metric, batch_size)
        self.calibration = _calibrate(model, calibration_data, self.config, calibration, batch_size)
        self.metric = metric
        self.verbose = verbose
        self.models_built = 0
        self.quantized = None  # (metric value, size_bytes) of the all-quantized model, once scored

    def value(self, config, bar=None):
        """`(metric value, size_bytes)` of the PTQ model `config` gives."""
        from keras_quant.quantize import quantize_model

        qmodel = quantize_model(self.model, config, calibration=self.calibration)
        self.models_built += 1
        out = self.evaluator.value(qmodel), model_size_bytes(qmodel)
        if bar is not None:
            bar.update()
        return out

    def all_quantized(self, bar=None):
        """The all-quantized model's metric value (scored once)."""
        if self.quantized is None:
            self.quantized = self.value(self.config, bar)
        return self.quantized[0]

    def progbar(self, total, label):
        from keras_quant.progress import ProgressBar

        return ProgressBar(total, label) if self.verbose else None
