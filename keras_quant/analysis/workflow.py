"""`analyze_model`: the whole analysis of one float model, and its HTML report.

One call calibrates (or takes a calibration), builds the PTQ model (or takes a
quantized model), and gathers what shows where accuracy goes:

1. `compare_models`: the float model against the quantized Keras model and
   each exported file, in its runtime (accuracy, agreement, size, latency);
2. `layer_errors`: per-layer SQNR / MSE / cosine of the Keras quantized model
   and of each exported TFLite file against the float model;
3. `compare_methods`: each range method's error per layer, and `auto`'s choice;
4. `sensitivity`: layers ranked by the metric change when only they are
   quantized (labels give accuracy, else the output MSE);
5. `mixed_precision` (with a `budget`): the layers kept in float to meet it,
   and the size that costs;

then writes them, with activation histograms, a per-layer error heatmap and
an accuracy-vs-size chart, into one self-contained HTML file (`report=`).
`keras-quant analyze` and `keras-quant demo` call it.

Example:

>>> out = analyze_model(model, x_val, labels=y_val, report="report.html")  # doctest: +SKIP
>>> out["sensitivity"]["ranking"][0]                                         # doctest: +SKIP
"""

import os

from keras_quant.analysis.common import num_samples
from keras_quant.analysis.compare import compare_models
from keras_quant.analysis.layers import layer_errors
from keras_quant.analysis.methods import compare_methods
from keras_quant.analysis.sensitivity import check_budget, mixed_precision
from keras_quant.analysis.sensitivity import sensitivity as rank_layers
from keras_quant.config import QuantConfig
from keras_quant.formatting import to_jsonable
from keras_quant.progress import ProgressBar, progress_callback, steps

__all__ = ["analyze_model"]


def _is_tflite(artifact):
    return isinstance(artifact, (bytes, bytearray)) or str(artifact).lower().endswith(".tflite")


def _label(artifact):
    return "bytes" if isinstance(artifact, (bytes, bytearray)) else os.path.basename(str(artifact))


def analyze_model(model, data, labels=None, config=None, calibration=None, calibration_data=None, quantized=None,
                  artifacts=(), methods=True, sensitivity=True, budget=None, search_config=None, report=None,
                  title=None, batch_size=64, max_layers=16, verbose=1):
    """Analyse how quantization changes `model`, and optionally write the HTML report.

    Args:
        model: The float Keras model.
        data: Evaluation inputs (float32 array, batch on axis 0; a list or dict for several inputs).
        labels: Class labels of `data` (accuracy and sensitivity by accuracy), or None.
        config: The `kq.QuantConfig` (default `kq.QuantConfig.int8()`).
        calibration: A `kq.CalibrationResult`; default: calibrate on `calibration_data`.
        calibration_data: Inputs to calibrate on (default: `data`).
        quantized: The quantized Keras model; default: `kq.quantize_model(model, config, calibration)`.
        artifacts: Exported files (`.tflite`, `.onnx`) of the quantized model to compare too.
        methods: Compare the range methods per layer (`compare_methods`).
        sensitivity: Rank the layers (`sensitivity`, one layer quantized at a time).
        budget: Accuracy (or MSE) budget of a mixed-precision search, or None for none.
        search_config: The config the sensitivity ranking and the mixed-precision search
            quantize with (default `config`): e.g. W4A4, to see which layers need more bits.
        report: Path of the HTML report to write, or None.
        title: The report's title.
        batch_size: Batch size of the calibration and evaluation passes.
        max_layers: Activation histograms drawn in the report at most.
        verbose: 1 draws progress bars on stderr, 0 nothing.

    Returns:
        A JSON-able dict: `"comparisons"`, `"layer_errors"` (`{source: rows}`),
        `"methods"`, `"sensitivity"`, `"mixed_precision"`, `"report"` (path or None).

    Raises:
        ConfigError: A `budget` without a way to measure it, or bad arguments
            (from the functions it calls, naming the field).
    """
    from keras_quant.quantize import quantize_model

    config = QuantConfig.int8() if config is None else config
    if budget is not None:
        check_budget(budget)
    x_cal = data if calibration_data is None else calibration_data

    def calibrate(cfg, label):
        return _calibrate(model, x_cal, cfg, label, batch_size, verbose)

    if calibration is None:
        calibration = calibrate(config, "calibrating")
    if quantized is None:
        quantized = quantize_model(model, config, calibration=calibration)

    out = {"comparisons": [], "layer_errors": {}, "methods": None, "sensitivity": None, "mixed_precision": None,
           "report": None}
    errors = _compare_all(model, quantized, tuple(artifacts or ()), data, labels, batch_size, verbose, out)
    method_comparison = None
    if methods:
        method_comparison = compare_methods(calibration, spec=config.activations)
        out["methods"] = method_comparison.to_dict()
    search_config = config if search_config is None else search_config
    search_calibration = None
    if sensitivity or budget is not None:  # one calibration serves the ranking and the search
        search_calibration = calibration if search_config is config else calibrate(search_config, "calibrating (search)")
    metric = "accuracy" if labels is not None else "mse"
    eval_data = (data, labels) if labels is not None else data
    search = dict(config=search_config, metric=metric, calibration=search_calibration, batch_size=batch_size,
                  verbose=verbose)
    if sensitivity:
        out["sensitivity"] = rank_layers(model, None, eval_data, **search).to_dict()
    mixed = None
    if budget is not None:
        mixed = mixed_precision(model, None, eval_data, budget=budget, **search)
        out["mixed_precision"] = mixed.to_dict()
    if report is not None:
        out["report"] = _write_report(report, title or f"keras_quant analysis of {model.name}", calibration, config,
                                      out, errors, method_comparison, mixed, max_layers)
    return to_jsonable(out)


def _calibrate(model, x, config, label, batch_size, verbose):
    """A `CalibrationResult` of `model` on `x` under `config`, with a progress bar named `label`."""
    from keras_quant.calibration import CalibrationCallback

    bar = ProgressBar(steps(num_samples(x), batch_size), label, enabled=bool(verbose))
    callback = CalibrationCallback(config=config)
    model.predict(x, batch_size=batch_size, callbacks=[callback, progress_callback(bar)], verbose=0)
    bar.close()
    return callback.result


def _compare_all(model, quantized, artifacts, data, labels, batch_size, verbose, out):
    """Compare the quantized model and each artifact with `model`, into `out`; their `LayerErrors` by source."""
    candidates = [("keras quantized", quantized)] + [(_label(a), a) for a in artifacts]
    bar = ProgressBar(len(candidates), "comparing", enabled=bool(verbose))
    errors = {}
    for name, candidate in candidates:
        comparison = compare_models(model, candidate, data, labels=labels, batch_size=batch_size,
                                    latency_runs=0 if candidate is quantized else 20)
        out["comparisons"].append(dict(comparison.to_dict(), source=name))
        if candidate is quantized or _is_tflite(candidate):
            errors[name] = layer_errors(model, candidate, data, batch_size=batch_size)
            out["layer_errors"][name] = errors[name].to_dict()["layers"]
        bar.update()
    bar.close()
    return errors


def _write_report(path, title, calibration, config, out, errors, method_comparison, mixed, max_layers):
    from keras_quant.analysis import plots
    from keras_quant.analysis.report import Report

    report = Report(title)
    report.add_heading("Models compared with the float model")
    report.add_table([{k: row.get(k) for k in ("source", "candidate_accuracy", "accuracy_drop", "argmax_agreement",
                                                 "max_diff_steps", "candidate_size_bytes", "compression",
                                                 "candidate_latency_s")} for row in out["comparisons"]])
    if errors:
        report.add_heading("Per-layer error (quantized against float activations)")
        table = {source: {row["name"]: row["sqnr_db"] for row in rows} for source, rows in out["layer_errors"].items()}
        report.add_image(plots.error_heatmap(table, title="SQNR per layer (dB)"), "Per-layer SQNR of each model",
                         name="layer_sqnr")
        for source, rows in out["layer_errors"].items():
            report.add_text(source)
            report.add_table(rows)
    if method_comparison is not None:
        report.add_heading(f"Range methods per layer at {config.activations.bits} bits (auto picks the lowest error)")
        table = {m: {layer: method_comparison.sqnr(layer, m) for layer in method_comparison.layers}
                 for m in method_comparison.methods}
        report.add_image(plots.error_heatmap(table, title="Expected SQNR of each layer's output (dB)"),
                         "Each range method's SQNR per layer, from the calibration histograms", name="methods_sqnr")
        report.add_table([{"layer": d["name"], **{f"{m}_sqnr_db": d[f"{m}_sqnr_db"] for m in method_comparison.methods},
                           "choice": d["choice"]} for d in out["methods"]["layers"]])
    if out["sensitivity"] is not None:
        report.add_heading("Sensitivity: metric change with only that layer quantized")
        report.add_table(out["sensitivity"]["ranking"])
    if mixed is not None:
        report.add_heading(f"Mixed precision within a budget of {mixed.budget:g}")
        points = [{"label": ", ".join(step["high_precision"]) or "all quantized", "size_bytes": step["size_bytes"],
                   "accuracy": -step["metric_change"]} for step in out["mixed_precision"]["steps"]]
        points.append({"label": "float", "size_bytes": out["mixed_precision"]["float_size_bytes"], "accuracy": 0.0,
                       "reference": True})
        report.add_image(plots.accuracy_size_chart(points, y_label="metric change from float (higher is better)"),
                         "Metric against size as layers are kept at high precision", name="mixed_precision")
        report.add_table([dict(step, high_precision=", ".join(step["high_precision"]) or "(none)")
                          for step in out["mixed_precision"]["steps"]])
    report.add_heading("Calibration")
    report.add_calibration(calibration, spec=config.activations, max_layers=max_layers)
    return report.save(path)
