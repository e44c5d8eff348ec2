"""`keras-quant analyze`: where a model loses accuracy when quantized, with the HTML report.

The command-line face of `keras_quant.analysis.workflow.analyze_model`.
"""

import json
import math

from keras_quant.cli.calibrate import calibration_config
from keras_quant.cli.common import check_input_file, check_output_file, load_artifact, load_eval_data, load_model, positive_int
from keras_quant.errors import ConfigError

__all__ = ["add_parser", "command"]


def add_parser(subparsers):
    """Add the `analyze` subcommand to `subparsers` (of `keras_quant.cli.build_parser`)."""
    from keras_quant.config import OBSERVERS

    ana = subparsers.add_parser(
        "analyze",
        help="find where a model loses accuracy when quantized, and write the HTML report",
        description="Calibrate MODEL (a float .keras model) on DATA, build its PTQ model, and report: accuracy "
        "against the float model (and of exported files), per-layer SQNR / MSE / cosine, the range methods per "
        "layer, the layers' sensitivity and, with --budget, a mixed-precision search; written to REPORT.html with "
        "activation histograms, a per-layer error heatmap and an accuracy-vs-size chart.",
        epilog="DATA is as for `calibrate`; an .npz array 'y' gives labels (accuracy; without them the metric is "
        "the output MSE). Exit status: 0 on success, 1 for a bad input, 2 for bad usage.",
    )
    ana.add_argument("model", metavar="MODEL", help="the float model, a .keras file (loaded with safe_mode=True)")
    ana.add_argument("--data", required=True, metavar="DATA", help="evaluation (and calibration) data")
    ana.add_argument("-o", "--output", default=None, metavar="REPORT", help="the HTML report to write")
    ana.add_argument("--calibration", default=None, metavar="CAL", help="a saved kq.CalibrationResult to use")
    ana.add_argument("--quantized", default=None, metavar="QMODEL", help="the quantized .keras model to analyse")
    ana.add_argument("--artifact", action="append", default=[], metavar="FILE",
                     help="an exported .tflite / .onnx file of the quantized model (repeatable)")
    ana.add_argument("--bits", type=int, default=8, metavar="N", help="activation bit width (default: 8)")
    ana.add_argument("--method", choices=OBSERVERS, default="minmax", help="activation range method (default: minmax)")
    ana.add_argument("--symmetric", action="store_true", help="symmetric activation grid")
    ana.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default: per channel)")
    ana.add_argument("--budget", type=float, default=None, metavar="F",
                     help="mixed-precision search: the metric change allowed (0.01 = one accuracy point)")
    ana.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity ranking")
    ana.add_argument("--samples", type=positive_int, default=1000, metavar="N", help="samples of DATA (default: 1000)")
    ana.add_argument("--batch-size", type=positive_int, default=64, metavar="B", help="batch size (default: 64)")
    ana.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ana.set_defaults(func=command)
    return ana


def command(args):
    """Run `keras-quant analyze` with the parsed `args`; returns the exit status."""
    from keras_quant.analysis.workflow import analyze_model
    from keras_quant.calibration import CalibrationResult

    # Every input is checked before the first progress bar: a bad one is the only line on stderr.
    if args.output is not None:
        check_output_file(args.output, "output", (".html", ".htm"), what="report")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget >= 0):
        raise ConfigError("budget", args.budget, "--budget must be a finite number >= 0 (a metric change)")
    config = calibration_config(args.bits, args.method, args.symmetric, per_channel=not args.per_tensor)
    for artifact in args.artifact:
        load_artifact(artifact)
    if args.calibration:
        check_input_file(args.calibration, "calibration", "calibration file")
    model = load_model(args.model)
    data, labels = load_eval_data(args.data, model, args.samples)
    calibration = CalibrationResult.load(args.calibration) if args.calibration else None
    quantized = load_model(args.quantized, "quantized") if args.quantized else None
    out = analyze_model(model, data, labels=labels, config=config, calibration=calibration, quantized=quantized,
                        artifacts=args.artifact, sensitivity=not args.no_sensitivity, budget=args.budget,
                        report=args.output, batch_size=args.batch_size, verbose=0 if args.json else 1)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_tables(out)
    return 0


def _print_tables(out):
    """`analyze_model`'s result as text tables."""
    from keras_quant.formatting import text_table

    print(text_table(out["comparisons"], ["source", "candidate_accuracy", "accuracy_drop", "argmax_agreement",
                                          "max_diff_steps", "candidate_size_bytes"], "Against the float model"))
    for source, rows in out["layer_errors"].items():
        print()
        print(text_table(rows, ["name", "sqnr_db", "mse", "max_error", "mean_error", "cosine_similarity"],
                         f"Per-layer error: {source}"))
    if out["sensitivity"] is not None:
        print()
        print(text_table(out["sensitivity"]["ranking"], None, "Sensitivity (most sensitive first)"))
    if out["mixed_precision"] is not None:
        print()
        steps = [dict(step, high_precision=", ".join(step["high_precision"]) or "(none)")
                 for step in out["mixed_precision"]["steps"]]
        print(text_table(steps, None, "Mixed-precision search (layers kept float, metric change, size)"))
    if out["report"]:
        print(f"wrote {out['report']}")
