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

import dataclasses
import math
import numbers
from typing import Optional, Tuple

from keras_quant.analysis.scoring import (
    METRICS,
    SQNR_CAP_DB,
    CandidateScorer,
    metric_name,
    model_size_bytes,
    only_config,
    with_high,
)
from keras_quant.config import LayerQuantConfig, QuantConfig
from keras_quant.errors import ConfigError
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

METHODS = ("quantize_one", "float_one")


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
    runner = CandidateScorer(model, calibration_data, eval_data, config, metric, calibration, batch_size, verbose)
    return _rank(runner, method)


def _rank(runner, method):
    """The ranking of `runner`'s candidates (one model each, plus the all-quantized one if not yet scored)."""
    ev = runner.evaluator
    bar = runner.progbar(len(runner.candidates) + (runner.quantized is None), f"sensitivity ({method})")
    full_degradation = ev.degradation(runner.all_quantized(bar))
    values, changes = {}, []
    for i, candidate in enumerate(runner.candidates):
        if method == "quantize_one":
            cfg = only_config(runner.config, candidate)
        else:
            cfg = with_high(runner.config, [candidate], None)
        value, _ = runner.value(cfg, bar)
        values[candidate.key] = value
        change = ev.degradation(value) if method == "quantize_one" else full_degradation - ev.degradation(value)
        changes.append((i, candidate.key, float(change)))
    if bar is not None:
        bar.close()
    changes.sort(key=lambda t: (-t[2], t[0]))
    return SensitivityRanking(
        [(name, change) for _, name, change in changes], method=method, metric=metric_name(runner.metric),
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


def check_budget(budget):
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
    budget = check_budget(budget)
    high, high_name = _check_high(high)
    runner = CandidateScorer(model, calibration_data, eval_data, config, metric, calibration, batch_size, verbose)
    if ranking is None:
        ranking = _rank(runner, "float_one")
    order = _ranking_order(ranking, runner.candidates)
    ev = runner.evaluator
    bar = runner.progbar(len(order) + (runner.quantized is None), "mixed-precision search")
    change = ev.degradation(runner.all_quantized(bar))
    steps = [((), float(change), runner.quantized[1])]
    chosen, cfg = [], runner.config.copy()
    for candidate in order:
        if change <= budget:
            break
        chosen.append(candidate)
        cfg = with_high(runner.config, chosen, high)
        value, size = runner.value(cfg, bar)
        change = ev.degradation(value)
        steps.append((tuple(c.key for c in chosen), float(change), size))
    if bar is not None:
        bar.close()
    return MixedPrecisionResult(
        config=cfg, high_precision=tuple(c.key for c in chosen), metric_change=float(change), budget=budget,
        met=bool(change <= budget), size_bytes=steps[-1][2], float_size_bytes=model_size_bytes(model),
        steps=tuple(steps), metric=metric_name(metric), baseline=ev.baseline, high=high_name,
    )
