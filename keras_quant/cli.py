"""The `keras-quant` command line.

    keras-quant demo [--dataset auto|fashion|digits] [--epochs N] [--qat-epochs N] [--seed S]
                     [--out DIR] [--report HTML] [--json]
    keras-quant calibrate MODEL --data DATA -o OUT [--bits N] [--method M] [--per-channel]
                          [--symmetric] [--max-samples N] [--sampling S] [--seed S]
                          [--batch-size B] [--normalize {unit,imagenet,none}] [--json]
    keras-quant export MODEL -o OUT.tflite|OUT.onnx [--mode M] [--opset N] [--input-type T]
                       [--output-type T] [--data DATA] [--samples N] [--threads N] [--json]
    keras-quant analyze MODEL --data DATA [-o REPORT.html] [--calibration CAL] [--quantized QMODEL]
                        [--artifact FILE ...] [--bits N] [--method M] [--per-tensor] [--budget F]
                        [--no-sensitivity] [--samples N] [--json]

Long steps draw progress bars on stderr (one line per step when stderr is not a terminal);
stdout holds the tables, or one JSON object with --json.

Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import json
import os
import sys
import zipfile

from keras_quant import __version__
from keras_quant.errors import ConfigError, KerasQuantError
from keras_quant.formatting import to_jsonable

__all__ = ["main", "build_parser", "calibration_config"]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _cmd_demo(args):
    from keras_quant import demo

    tables = demo.run(epochs=args.epochs, seed=args.seed, verbose=not args.json, qat_epochs=args.qat_epochs,
                      out_dir=args.out, dataset=args.dataset, report=args.report or None)
    if args.json:
        print(json.dumps(to_jsonable(tables), indent=2))
    return 0


_OUTPUT_SUFFIXES = (".json", ".msgpack", ".mpk")
_COMPRESSION_SUFFIXES = ("", ".gz", ".zst")


def _check_output(path):
    """Fail before calibrating when `path` cannot be written: format suffix, folder, not a directory."""
    name = os.path.basename(path).lower()
    if not any(name.endswith(s + c) for s in _OUTPUT_SUFFIXES for c in _COMPRESSION_SUFFIXES):
        raise ConfigError(
            "output", path, "the output name must end in .json, .msgpack or .mpk (optionally + .gz or .zst)"
        )
    if os.path.isdir(path):
        raise ConfigError("output", path, "the output path is a directory; name a file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError("output", path, f"the output directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("output", path, f"the output directory {directory} is not writable")


def _load_model(path):
    """`keras.models.load_model(path, safe_mode=True, compile=False)`, with one-line errors."""
    import keras

    import keras_quant  # noqa: F401  (registers the toolkit's layers for deserialization)

    if not os.path.exists(path):
        raise ConfigError("model", path, "no such model file")
    if os.path.isdir(path) or not path.lower().endswith(".keras"):
        raise ConfigError("model", path, "the model must be a .keras file (Keras 3's native format)")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError("model", path, f"cannot load a Keras model from the file ({type(e).__name__}: {reason})") from None


def calibration_config(bits=8, method="minmax", symmetric=False, per_channel=False):
    """The `kq.QuantConfig` of `keras-quant calibrate`'s options.

    Activations: `bits`-bit, per tensor (as TFLite quantizes activations),
    asymmetric unless `symmetric`, range from the `method` observer. Weights:
    int8 symmetric narrow-range, per channel with `per_channel`, else per tensor.
    """
    from keras_quant.config import QuantConfig, QuantSpec

    weights = QuantSpec(
        bits=8, symmetric=True, narrow_range=True, granularity="per_channel" if per_channel else "per_tensor"
    )
    activations = QuantSpec(bits=bits, symmetric=symmetric, observer=method)
    return QuantConfig(weights=weights, activations=activations)


def _float_or_list(v):
    if v is None:
        return None
    import numpy as np

    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()


def _cmd_calibrate(args):
    from keras_quant.calibration import CalibrationCallback, CalibrationResult
    from keras_quant.data import load_calibration_data

    _check_output(args.output)
    model = _load_model(args.model)
    data = load_calibration_data(args.data, model, normalize=args.normalize)
    config = calibration_config(args.bits, args.method, args.symmetric, args.per_channel)
    callback = CalibrationCallback(
        config=config, max_samples=args.max_samples, sampling=args.sampling, seed=args.seed,
        verbose=0 if args.json else 1,
    )
    try:
        model.predict(data, batch_size=args.batch_size, callbacks=[callback], verbose=0)
    except KerasQuantError:
        raise
    except ValueError as e:
        reason = " ".join(str(e).split())
        raise ConfigError("data", args.data, f"the model cannot run on the data ({reason})") from None
    result = callback.result
    metadata = result.metadata
    metadata["source"] = {
        "command": "keras-quant calibrate", "model_file": os.path.abspath(args.model),
        "data": os.path.abspath(args.data), "normalize": args.normalize, "batch_size": args.batch_size,
        "per_channel_weights": args.per_channel,
    }
    result = CalibrationResult({name: result[name] for name in result}, metadata=metadata)
    result.save(args.output)
    samples = int(metadata.get("samples_seen", 0))
    if args.json:
        layers = {
            name: {
                "count": s.count, "min": s.min, "max": s.max,
                "scale": _float_or_list(s.scale), "zero_point": _float_or_list(s.zero_point),
            }
            for name, s in result.items()
        }
        report = {
            "output": args.output, "samples": samples, "num_layers": len(result), "layers": layers,
            "config": config.get_config(),
        }
        print(json.dumps(to_jsonable(report), indent=2))
    else:
        result.summary()
        print(f"wrote {args.output} ({len(result)} layers, {samples} samples)")
    return 0


def _load_eval_data(path, model, samples, normalize="unit"):
    """`(x, labels or None)`: at most `samples` inputs from DATA, and the `.npz` array 'y' as labels."""
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


_EXPORT_SUFFIXES = (".tflite", ".onnx")


def _cmd_export(args):
    from keras_quant.analysis import compare_models
    from keras_quant.export import export_onnx, export_tflite

    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in _EXPORT_SUFFIXES:
        raise ConfigError("output", args.output, "the output name must end in .tflite or .onnx")
    if suffix == ".onnx" and (args.mode is not None or args.input_type or args.output_type):
        raise ConfigError("mode", args.mode or args.input_type or args.output_type,
                          "--mode, --input-type and --output-type are for .tflite outputs; ONNX QDQ has float I/O")
    if suffix == ".tflite" and args.opset is not None:
        raise ConfigError("opset", args.opset, "--opset is for .onnx outputs")
    if os.path.isdir(args.output):
        raise ConfigError("output", args.output, "the output path is a directory; name a file")
    model = _load_model(args.model)
    data = labels = None
    if args.data is not None:
        data, labels = _load_eval_data(args.data, model, args.samples)
    if suffix == ".onnx":
        report = export_onnx(model, args.output, **({} if args.opset is None else {"opset": args.opset}))
    else:
        report = export_tflite(model, args.output, mode=args.mode or "int8", input_type=args.input_type,
                               output_type=args.output_type)
    comparison = None
    if data is not None:
        comparison = compare_models(model, args.output, data, labels=labels, num_threads=args.threads)
    if args.json:
        print(json.dumps(to_jsonable({"export": report.to_dict(),
                                      "comparison": None if comparison is None else comparison.to_dict()}), indent=2))
    else:
        print(report)
        if comparison is not None:
            print()
            print(comparison)
        print(f"wrote {args.output} ({report.size_bytes} bytes)")
    return 0


def _cmd_analyze(args):
    from keras_quant.analysis.workflow import analyze_model
    from keras_quant.calibration import CalibrationResult
    from keras_quant.formatting import text_table

    if args.output is not None and not args.output.lower().endswith((".html", ".htm")):
        raise ConfigError("output", args.output, "the report name must end in .html")
    for artifact in args.artifact:
        if not os.path.isfile(artifact):
            raise ConfigError("artifact", artifact, "no such file")
    model = _load_model(args.model)
    data, labels = _load_eval_data(args.data, model, args.samples)
    calibration = CalibrationResult.load(args.calibration) if args.calibration else None
    quantized = _load_model(args.quantized) if args.quantized else None
    config = calibration_config(args.bits, args.method, args.symmetric, per_channel=not args.per_tensor)
    out = analyze_model(model, data, labels=labels, config=config, calibration=calibration, quantized=quantized,
                        artifacts=args.artifact, sensitivity=not args.no_sensitivity, budget=args.budget,
                        report=args.output, batch_size=args.batch_size, verbose=0 if args.json else 1)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
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
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-quant", description="Quantization for Keras 3 models: calibrate, quantize, analyse."
    )
    parser.add_argument("--version", action="version", version=f"keras-quant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the main job: train a small CNN, calibrate, quantize (PTQ, QAT), export, evaluate, report",
        description="Train a small CNN on Fashion-MNIST (Debian's dataset-fashion-mnist) or scikit-learn's digits, "
        "calibrate it, build PTQ and QAT models, export TFLite and ONNX files, run each in its runtime, print the "
        "tables and write the HTML analysis report.",
    )
    demo.add_argument("--dataset", choices=("auto", "fashion", "digits"), default="auto",
                      help="auto: Fashion-MNIST when Debian's dataset-fashion-mnist is installed, else the digits")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="training epochs (default: 12 on the digits, 3 on Fashion-MNIST)")
    demo.add_argument("--qat-epochs", type=int, default=3,
                      help="fine-tuning epochs of the QAT models, 0 for none (default: 3)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="keep the exported .tflite / .onnx files in DIR (default: a temporary folder)")
    demo.add_argument("--report", metavar="HTML", default="keras_quant_report.html",
                      help="where to write the HTML analysis report (default: keras_quant_report.html); '' for none")
    demo.add_argument("--json", action="store_true", help="print the tables as JSON instead of text")
    demo.set_defaults(func=_cmd_demo)

    from keras_quant.calibration.sampling import SAMPLINGS
    from keras_quant.config import OBSERVERS
    from keras_quant.data import IMAGE_EXTENSIONS, NORMALIZATIONS

    cal = sub.add_parser(
        "calibrate",
        help="gather activation statistics of a .keras model on calibration data and save them",
        description="Run MODEL on the calibration data with a CalibrationCallback, print the per-layer "
        "statistics and write them (a kq.CalibrationResult) to OUT. Weights are not changed.",
        epilog="DATA is a .npy array, a .npz (the array 'x', else the array named after the model input, else "
        "the only array; a multi-input model takes one array per input, named after it) or a folder of images ("
        f"{', '.join(IMAGE_EXTENSIONS)}, recursively, sorted) resized to the model input's (H, W), grayscale for "
        "a 1-channel input, RGB for 3. Folder images and uint8 arrays are pixel data and get --normalize; float "
        "and other integer arrays are used as they are (cast to float32). (N, H, W) data for a (None, H, W, 1) "
        "input gets its channel axis added. Exit status: 0 on success, 1 for a bad input, 2 for bad usage.",
    )
    cal.add_argument("model", metavar="MODEL", help="the model, a .keras file (loaded with safe_mode=True)")
    cal.add_argument("--data", required=True, metavar="DATA", help="calibration data: .npy, .npz or a folder of images")
    cal.add_argument(
        "-o", "--output", required=True, metavar="OUT",
        help="where to write the result: .json or .msgpack/.mpk, optionally + .gz or .zst (written atomically)",
    )
    cal.add_argument("--bits", type=int, default=8, metavar="N", help="activation bit width, 2-16 (default: 8)")
    cal.add_argument(
        "--method", choices=OBSERVERS, default="minmax",
        help="activation range observer (default: minmax)",
    )
    cal.add_argument(
        "--per-channel", action="store_true",
        help="quantize weights per output channel (default: per tensor); weights are int8 symmetric either way, "
        "and activations stay per tensor as TFLite quantizes them",
    )
    cal.add_argument("--symmetric", action="store_true", help="symmetric activation grid (zero point 0; default: asymmetric)")
    cal.add_argument(
        "--max-samples", type=_positive_int, default=None, metavar="N",
        help="stop observing after N samples (default: all)",
    )
    cal.add_argument(
        "--sampling", choices=tuple(SAMPLINGS), default="all",
        help="which samples to observe (default: all): random keeps each with probability 0.5 (seeded by --seed), "
        "systematic every 2nd, stratified and importance as kq.CalibrationCallback (stratified needs --max-samples)",
    )
    cal.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the random samplers (default: none)")
    cal.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="predict batch size (default: 32)")
    cal.add_argument(
        "--normalize", choices=NORMALIZATIONS, default="unit",
        help="pixel normalisation of folder images and uint8 arrays: unit = x/255 (default), imagenet = "
        "((x/255) - mean) / std with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), "
        "none = raw 0-255",
    )
    cal.add_argument(
        "--json", action="store_true",
        help="print one JSON object (output, samples, num_layers, per-layer count/min/max/scale/zero_point, "
        "config) instead of the progress line and table",
    )
    cal.set_defaults(func=_cmd_calibrate)

    from keras_quant.export.tflite import IO_TYPES

    exp = sub.add_parser(
        "export",
        help="write a quantized .keras model as a TFLite or ONNX file and check it in its runtime",
        description="Export MODEL (from kq.quantize_model, saved with model.save) with keras_quant's own scales: "
        "OUT.tflite (LiteRT: --mode int8, int16x8, dynamic, float16 or float32) or OUT.onnx (QDQ). With --data "
        "the file is run in its runtime against the Keras model (accuracy, agreement, steps, size, latency).",
        epilog="DATA is as for `calibrate`; an .npz array 'y' gives labels for accuracy. Exit status: 0 on "
        "success, 1 for a bad input or what the target cannot express (named by layer), 2 for bad usage.",
    )
    exp.add_argument("model", metavar="MODEL", help="the quantized model, a .keras file (loaded with safe_mode=True)")
    exp.add_argument("-o", "--output", required=True, metavar="OUT", help="OUT.tflite or OUT.onnx (written atomically)")
    exp.add_argument("--mode", choices=tuple(IO_TYPES), default=None, help="TFLite mode (default: int8)")
    exp.add_argument("--input-type", choices=("int8", "uint8", "int16", "float32"), default=None,
                     help="TFLite input type (default: int8 for int8, int16 for int16x8, else float32)")
    exp.add_argument("--output-type", choices=("int8", "uint8", "int16", "float32"), default=None,
                     help="TFLite output type (default as --input-type)")
    exp.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset, 13 or later (default: 21)")
    exp.add_argument("--data", default=None, metavar="DATA", help="check the file on this data (.npy, .npz, images)")
    exp.add_argument("--samples", type=_positive_int, default=1000, metavar="N",
                     help="samples of DATA to check on (default: 1000)")
    exp.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="runtime CPU threads")
    exp.add_argument("--json", action="store_true", help="print the export report and comparison as JSON")
    exp.set_defaults(func=_cmd_export)

    ana = sub.add_parser(
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
    ana.add_argument("--samples", type=_positive_int, default=1000, metavar="N", help="samples of DATA (default: 1000)")
    ana.add_argument("--batch-size", type=_positive_int, default=64, metavar="B", help="batch size (default: 64)")
    ana.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ana.set_defaults(func=_cmd_analyze)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except (KerasQuantError, OSError) as e:
        # Keras and the OS may put newlines in a message: the error stays one line.
        print(f"keras-quant: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("keras-quant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
