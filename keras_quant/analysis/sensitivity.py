"""Which layers quantization hurts most, and a mixed-precision config that meets a budget.

`sensitivity(model, calibration_data, eval_data)` builds one post-training
quantized model per candidate layer and ranks the layers by how much the
metric degrades. The candidates are the layers `kq.quantize_model` wraps in a
`QuantizeWrapper` (its `quantization_report.wrapped`: Dense, Conv, ...), each
together with the BatchNormalization folded into it and the ReLU / ReLU6
fused after it (TFLite runs them as one op, so they switch precision as one).
Activation quantizers of merge, pool and input layers are not candidates:
they stay as the config sets them. A candidate is named by its calibration
key (its layer name, or `outer/inner` for a name that collides across nested
models).

Two methods:

- `"quantize_one"`: only that layer is quantized (its weights and its
  output quantizer; every other layer, and its input, stays float);
  `metric_change` is the degradation against the float model.
- `"float_one"`: everything is quantized except that layer;
  `metric_change` is how much degradation keeping it float removes:
  `degradation(all quantized) - degradation(all but this one)`.

`metric_change` is always a degradation (positive: worse), in the metric's
units: `"accuracy"` float accuracy minus quantized accuracy (a fraction),
`"loss"` quantized loss minus float loss, `"mse"` the mean squared error of
the first output against the float model's (the float model's is 0),
`"sqnr"` `SQNR_CAP_DB` minus the SQNR in dB of the first output against the
float model's, capped at `SQNR_CAP_DB` (the float model's own SQNR is
infinite; the cap keeps every number finite), and for a callable
`metric(y_true, y_pred) -> float` (higher is better) the float value minus
the quantized one.

`mixed_precision` starts from the all-quantized model and moves the most
sensitive layers to high precision until the degradation is within `budget`.

The model is calibrated once (or a `kq.CalibrationResult` is reused), the
float model's outputs are computed once, and each candidate model is built
with `kq.quantize_model(model, config, calibration=result)` and run once.

Example:

>>> ranking = kq.analysis.sensitivity(model, x_calib, (x_test, y_test))
>>> ranking[0]
('fragile', 0.81)
>>> result = kq.analysis.mixed_precision(model, x_calib, (x_test, y_test), budget=0.01)
>>> qmodel = kq.quantize_model(model, result.config, calibration=calibration)
"""

import copy
import dataclasses
import math
import numbers
import re
from typing import Optional, Tuple

import keras
import numpy as np

from keras_quant.analysis.compare import _label_classes, predicted_classes
from keras_quant.analysis.error import error_stats
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError
from keras_quant.formatting import format_number, text_table, to_jsonable

__all__ = [
    "sensitivity",
    "mixed_precision",
    "SensitivityRanking",
    "MixedPrecisionResult",
    "model_size_bytes",
    "METRICS",
    "METHODS",
    "SQNR_CAP_DB",
]

METRICS = ("accuracy", "loss", "sqnr", "mse")
METHODS = ("quantize_one", "float_one")
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
            total += sum(FLOAT_BYTES * int(np.prod(w.shape)) for w in layer.weights)
    return total


# Candidates ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A wrapped layer and the layers that switch precision with it: `(pattern, layer, path)` each."""

    key: str
    members: tuple


def _pattern(key):
    """A `set_layer_name` pattern matching exactly this key."""
    escaped = re.escape(key)
    return key if escaped == key else escaped


def _candidates(model, config):
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
        out.append(_Candidate(flat.key(layer), members))
    return out


def _copy_config(config):
    new = copy.copy(config)
    new._type_overrides = dict(config._type_overrides)
    new._name_overrides = list(config._name_overrides)
    return new


def _only_config(config, candidate):
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


def _with_high(config, candidates, high):
    """A copy of `config` with every member of `candidates` at high precision."""
    out = _copy_config(config)
    for candidate in candidates:
        for pattern, layer, path in candidate.members:
            out.set_layer_name(pattern, _high_config(high, config, layer, path))
    return out


# Data and metrics ------------------------------------------------------------------
def _num_samples(x, field):
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    if not arrays or any(a is None for a in arrays):
        raise NoDataError(field, "it needs at least one sample")
    shapes = [np.shape(a) for a in arrays]
    if any(len(s) == 0 for s in shapes):
        raise ShapeMismatchError(field, "arrays with the batch on axis 0", shapes if len(shapes) > 1 else shapes[0])
    sizes = {s[0] for s in shapes}
    if len(sizes) > 1:
        raise ShapeMismatchError(field, "the same number of samples in every input", shapes)
    n = sizes.pop()
    if n == 0:
        raise NoDataError(field, "it needs at least one sample")
    return n


def _check_inputs(model, x, field):
    """`x` matches the model's inputs (count and per-sample shapes)."""
    inputs = getattr(model, "inputs", None) or []
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    if inputs and len(arrays) != len(inputs):
        raise ShapeMismatchError(field, f"{len(inputs)} input array(s)", [np.shape(a) for a in arrays])
    for t, a in zip(inputs, arrays):
        want, got = tuple(t.shape), tuple(np.shape(a))
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want[1:], got[1:])):
            raise ShapeMismatchError(field, want, got)


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
    n = _num_samples(x, "eval_data")
    _check_inputs(model, x, "eval_data")
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


class _Evaluator:
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
            return float(np.mean(classes == _label_classes(self.y, out, classes)))
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


def _metric_name(metric):
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
    _num_samples(x, "calibration_data")
    _check_inputs(model, x, "calibration_data")
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
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError("batch_size", batch_size, "batch_size must be a positive integer or None")
    if not isinstance(model, keras.Model):
        raise ConfigError("model", model, "expected a keras.Model")
    return config


class _Runner:
    """Builds and scores candidate models: one calibration, one float pass, one pass per candidate."""

    def __init__(self, model, calibration_data, eval_data, config, metric, calibration, batch_size, verbose):
        self.config = _check_common(model, config, verbose, batch_size)
        self.model = model
        self.candidates = _candidates(model, self.config)
        if not self.candidates:
            raise ConfigError("model", model.name, "no layer to quantize: kq.quantize_model wraps none of its layers "
                              "under this config (no Dense / Conv / ... layer with a quantization rule, or the "
                              "config keeps them all float)")
        x, y = _split_eval(model, eval_data)
        self.evaluator = _Evaluator(model, x, y, metric, batch_size)
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


# Sensitivity -----------------------------------------------------------------------------
class SensitivityRanking(list):
    """`(layer_name, metric_change)` tuples, most sensitive layer first.

    Attributes:
        method: `"quantize_one"` or `"float_one"`.
        metric: The metric's name (a callable's `__name__`).
        baseline: The float model's metric value.
        quantized: The all-quantized model's metric value.
        values: `{layer_name: metric value}` of each candidate model
            (only that layer quantized, or all but that layer).
    """

    def __init__(self, items=(), method="quantize_one", metric="accuracy", baseline=None, quantized=None,
                 values=None):
        super().__init__(items)
        self.method, self.metric, self.baseline, self.quantized = method, metric, baseline, quantized
        self.values = dict(values or {})

    @property
    def layers(self):
        """The layer names, most sensitive first."""
        return [name for name, _ in self]

    def to_dict(self) -> dict:
        """The ranking as plain data (JSON-ready)."""
        return to_jsonable({
            "method": self.method,
            "metric": self.metric,
            "baseline": self.baseline,
            "quantized": self.quantized,
            "ranking": [{"layer": n, "metric_change": c, "value": self.values.get(n)} for n, c in self],
        })

    def table(self) -> str:
        """The ranking as a text table."""
        rows = [{"rank": i + 1, "layer": n, "metric_change": c, self.metric: self.values.get(n)}
                for i, (n, c) in enumerate(self)]
        title = (f"sensitivity ({self.method}, {self.metric}): float {format_number(self.baseline)}, "
                 f"all quantized {format_number(self.quantized)}")
        return text_table(rows, ["rank", "layer", "metric_change", self.metric], title=title)

    def __str__(self):
        return self.table()


def sensitivity(model, calibration_data, eval_data, config=None, metric="accuracy", method="quantize_one",
                calibration=None, batch_size=None, verbose=0) -> SensitivityRanking:
    """Rank the quantizable layers by how much quantizing them degrades a metric.

    Args:
        model: A float Functional or Sequential Keras model (not modified).
        calibration_data: Inputs to calibrate on (an array, or a list for
            several inputs), run once through a `kq.CalibrationCallback`
            with `config`. Ignored when `calibration` is given (may be None).
        eval_data: `(x, y)` (a tuple) or `x` alone; `x` is an array, or a list
            of arrays for several inputs.
        config: The `kq.QuantConfig` being analysed (default
            `kq.QuantConfig.int8()`). Each candidate layer is quantized as
            this config quantizes it.
        metric: `"accuracy"` (needs labels), `"loss"` (the model's compiled
            loss; needs labels), `"sqnr"`, `"mse"` (first output against the
            float model's), or a callable `metric(y_true, y_pred) -> float`,
            higher is better; `y_true` is the labels, or the float model's
            outputs when `eval_data` has none.
        method: `"quantize_one"` or `"float_one"` (see the module doc).
        calibration: A `kq.CalibrationResult` to reuse instead of calibrating.
        batch_size: Batch size of every `predict`.
        verbose: 1 shows a progress bar over the candidate models.

    Returns:
        A `SensitivityRanking`, sorted by `metric_change`, largest first (ties
        in graph order).

    Raises:
        ConfigError: For an unknown metric or method, a bad config, a model
            with no layer to quantize, or a model that is not compiled with
            `metric="loss"`.
        NoDataError: For missing data, or `"accuracy"` / `"loss"` without labels.
        ShapeMismatchError: When `eval_data` does not fit the model's inputs,
            or its labels are not one per sample.

    Example:

    >>> ranking = sensitivity(model, x_train[:256], (x_test, y_test), method="float_one")
    >>> ranking[0]
    ('fragile', 0.8)
    >>> print(ranking.table())
    """
    if method not in METHODS:
        raise ConfigError("method", method, f"method must be one of {METHODS}")
    runner = _Runner(model, calibration_data, eval_data, config, metric, calibration, batch_size, verbose)
    return _rank(runner, method)


def _rank(runner, method):
    """The ranking of `runner`'s candidates (one model each, plus the all-quantized one if not yet scored)."""
    ev = runner.evaluator
    bar = runner.progbar(len(runner.candidates) + (runner.quantized is None), f"sensitivity ({method})")
    full_degradation = ev.degradation(runner.all_quantized(bar))
    values, changes = {}, []
    for i, candidate in enumerate(runner.candidates):
        if method == "quantize_one":
            cfg = _only_config(runner.config, candidate)
        else:
            cfg = _with_high(runner.config, [candidate], None)
        value, _ = runner.value(cfg, bar)
        values[candidate.key] = value
        change = ev.degradation(value) if method == "quantize_one" else full_degradation - ev.degradation(value)
        changes.append((i, candidate.key, float(change)))
    if bar is not None:
        bar.close()
    changes.sort(key=lambda t: (-t[2], t[0]))
    return SensitivityRanking(
        [(name, change) for _, name, change in changes], method=method, metric=_metric_name(runner.metric),
        baseline=ev.baseline, quantized=runner.quantized[0], values=values,
    )


# Mixed precision ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MixedPrecisionResult:
    """A config that keeps the most sensitive layers at high precision, and the curve that led to it.

    Attributes:
        config: The `kq.QuantConfig` to pass to `kq.quantize_model`.
        high_precision: Names of the layers at high precision, in the order added.
        metric_change: Degradation of the chosen config (metric units).
        budget: The budget asked for.
        met: Whether `metric_change <= budget`.
        size_bytes: Weight bytes of the chosen model (`model_size_bytes`).
        float_size_bytes: Weight bytes of the float model.
        steps: `(high_precision_names, metric_change, size_bytes)` of each
            model tried, the all-quantized one first: the accuracy-vs-size curve.
        metric: The metric's name.
        baseline: The float model's metric value.
        high: What high precision means: `"float"`, `"int16"` or the
            `LayerQuantConfig` given.
    """

    config: QuantConfig
    high_precision: Tuple[str, ...]
    metric_change: float
    budget: float
    met: bool
    size_bytes: int
    float_size_bytes: int
    steps: Tuple[Tuple[Tuple[str, ...], float, int], ...]
    metric: str = "accuracy"
    baseline: Optional[float] = None
    high: object = "float"

    @property
    def compression(self) -> float:
        """`float_size_bytes / size_bytes`."""
        return self.float_size_bytes / self.size_bytes if self.size_bytes else float("inf")

    def to_dict(self) -> dict:
        """The result as plain data (JSON-ready); `config` as its `get_config()`."""
        return to_jsonable({
            "config": self.config.get_config(),
            "high_precision": list(self.high_precision),
            "metric_change": self.metric_change,
            "budget": self.budget,
            "met": self.met,
            "size_bytes": self.size_bytes,
            "float_size_bytes": self.float_size_bytes,
            "compression": self.compression,
            "metric": self.metric,
            "baseline": self.baseline,
            "high": self.high if isinstance(self.high, str) else repr(self.high),
            "steps": [{"high_precision": list(n), "metric_change": c, "size_bytes": s} for n, c, s in self.steps],
        })

    def table(self) -> str:
        """The steps as a text table."""
        rows = [
            {"step": i, "added": names[-1] if names else "(all quantized)", "num_high": len(names),
             "metric_change": change, "size_bytes": size, "compression": self.float_size_bytes / size if size else None}
            for i, (names, change, size) in enumerate(self.steps)
        ]
        high = self.high if isinstance(self.high, str) else "custom"
        return text_table(rows, ["step", "added", "num_high", "metric_change", "size_bytes", "compression"],
                          title=f"mixed precision ({self.metric}, high={high}, budget {format_number(self.budget)})")

    def __str__(self):
        verdict = "met" if self.met else "NOT met"
        head = (f"budget {self.budget:.4g} {verdict}: {self.metric} change {self.metric_change:.4g} with "
                f"{len(self.high_precision)} layer(s) at high precision {list(self.high_precision)}; "
                f"{self.size_bytes} bytes ({self.compression:.3g}x smaller than float's {self.float_size_bytes})")
        return head + "\n" + self.table()


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget < 0:
        raise ConfigError("budget", budget, "budget must be a finite number >= 0 (the largest degradation allowed, "
                          "in the metric's units: 0.01 is one accuracy point)")
    return float(budget)


def _check_high(high):
    if high is None or high == "float":
        return None, "float"
    if isinstance(high, str) and high == "int16":
        return "int16", "int16"
    if isinstance(high, LayerQuantConfig):
        return high, high
    raise ConfigError("high", high, "high must be None or 'float' (keep float), 'int16' (8-bit weights, 16-bit "
                      "activations) or a kq.LayerQuantConfig")


def _ranking_order(ranking, candidates):
    by_key = {c.key: c for c in candidates}
    names = []
    for item in ranking:
        name = item[0] if isinstance(item, (tuple, list)) else item
        if name not in by_key:
            raise ConfigError("ranking", name, f"not a quantizable layer of this model; the candidates are "
                              f"{sorted(by_key)}")
        if name not in names:
            names.append(name)
    return [by_key[n] for n in names]


def mixed_precision(model, calibration_data, eval_data, config=None, budget=0.01, metric="accuracy", high=None,
                    ranking=None, calibration=None, batch_size=None, verbose=0) -> MixedPrecisionResult:
    """Keep the most sensitive layers at high precision until the degradation is within `budget`.

    Starts from the all-quantized model; while its degradation exceeds
    `budget`, the next layer of `ranking` (with its folded BatchNormalization
    and fused ReLU) moves to high precision, and the model is rebuilt and
    scored. Stops when the budget holds or every ranked layer is high.

    Args:
        model, calibration_data, eval_data, config, metric, calibration,
            batch_size: As in `sensitivity`.
        budget: The largest degradation allowed, in the metric's units
            (`0.01` is one accuracy point).
        high: What a sensitive layer gets: None or `"float"` keeps it float;
            `"int16"` keeps the config's (8-bit) weights with 16-bit
            symmetric activations (`QuantSpec(bits=16, symmetric=True)`, as
            TFLite's 16x8; the weight size does not change); or a
            `kq.LayerQuantConfig`.
        ranking: The order to move layers in: a `SensitivityRanking`, a list
            of `(name, change)` or of names. Default:
            `sensitivity(..., method="float_one")` with the same metric
            (sharing this call's calibration).
        verbose: 1 shows a progress bar.

    Returns:
        A `MixedPrecisionResult`.

    Raises:
        ConfigError: For a bad budget, high, ranking (a name that is not a
            candidate layer), metric or config, or a model with no layer to
            quantize.
        NoDataError, ShapeMismatchError: As in `sensitivity`.

    Example:

    >>> result = mixed_precision(model, x_train[:256], (x_test, y_test), budget=0.01)
    >>> result.high_precision, result.met
    (('fragile',), True)
    >>> qmodel = kq.quantize_model(model, result.config, calibration=calibration)
    """
    budget = _check_budget(budget)
    high, high_name = _check_high(high)
    runner = _Runner(model, calibration_data, eval_data, config, metric, calibration, batch_size, verbose)
    if ranking is None:
        ranking = _rank(runner, "float_one")
    order = _ranking_order(ranking, runner.candidates)
    ev = runner.evaluator
    bar = runner.progbar(len(order) + (runner.quantized is None), "mixed-precision search")
    change = ev.degradation(runner.all_quantized(bar))
    steps = [((), float(change), runner.quantized[1])]
    chosen, cfg = [], _copy_config(runner.config)
    for candidate in order:
        if change <= budget:
            break
        chosen.append(candidate)
        cfg = _with_high(runner.config, chosen, high)
        value, size = runner.value(cfg, bar)
        change = ev.degradation(value)
        steps.append((tuple(c.key for c in chosen), float(change), size))
    if bar is not None:
        bar.close()
    return MixedPrecisionResult(
        config=cfg, high_precision=tuple(c.key for c in chosen), metric_change=float(change), budget=budget,
        met=bool(change <= budget), size_bytes=steps[-1][2], float_size_bytes=model_size_bytes(model),
        steps=tuple(steps), metric=_metric_name(metric), baseline=ev.baseline, high=high_name,
    )
