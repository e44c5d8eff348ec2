"""`keras-quant export`: a saved quantized model to a TFLite or ONNX file, checked in its runtime.

The command-line face of `keras_quant.export` (`export_tflite`, `export_onnx`) and
`keras_quant.analysis.compare_models`.
"""

import dataclasses
import json
import os

from keras_quant.cli.common import check_output_file, load_eval_data, load_model, positive_int
from keras_quant.errors import ConfigError
from keras_quant.formatting import to_jsonable
from keras_quant.io.atomic import atomic_target

__all__ = ["add_parser", "command"]

_EXPORT_SUFFIXES = (".tflite", ".onnx")
_TFLITE_IO_TYPES = ("int8", "uint8", "int16", "float32")


def add_parser(subparsers):
    """Add the `export` subcommand to `subparsers` (of `keras_quant.cli.build_parser`)."""
    from keras_quant.export.tflite import IO_TYPES

    exp = subparsers.add_parser(
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
    exp.add_argument("--input-type", choices=_TFLITE_IO_TYPES, default=None,
                     help="TFLite input type (default: int8 for int8, int16 for int16x8, else float32)")
    exp.add_argument("--output-type", choices=_TFLITE_IO_TYPES, default=None,
                     help="TFLite output type (default as --input-type)")
    exp.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset, 13 or later (default: 21)")
    exp.add_argument("--data", default=None, metavar="DATA", help="check the file on this data (.npy, .npz, images)")
    exp.add_argument("--samples", type=positive_int, default=1000, metavar="N",
                     help="samples of DATA to check on (default: 1000)")
    exp.add_argument("--threads", type=positive_int, default=None, metavar="N", help="runtime CPU threads")
    exp.add_argument("--json", action="store_true", help="print the export report and comparison as JSON")
    exp.set_defaults(func=command)
    return exp


def _check_arguments(args):
    """`args.output`'s suffix, once the options are known to fit it.

    Raises:
        ConfigError: For an unknown suffix, an option of the other format, or a directory.
    """
    check_output_file(args.output, "output", _EXPORT_SUFFIXES)
    suffix = os.path.splitext(args.output)[1].lower()
    if suffix == ".onnx" and (args.mode is not None or args.input_type or args.output_type):
        raise ConfigError("mode", args.mode or args.input_type or args.output_type,
                          "--mode, --input-type and --output-type are for .tflite outputs; ONNX QDQ has float I/O")
    if suffix == ".tflite" and args.opset is not None:
        raise ConfigError("opset", args.opset, "--opset is for .onnx outputs")
    return suffix


def command(args):
    """Run `keras-quant export` with the parsed `args`; returns the exit status."""
    from keras_quant.analysis import compare_models
    from keras_quant.export import export_onnx, export_tflite

    suffix = _check_arguments(args)
    model = load_model(args.model)
    data = labels = None
    if args.data is not None:
        data, labels = load_eval_data(args.data, model, args.samples)
    # Written beside OUT under a temporary name and renamed once checked (`keras_quant.io.atomic.atomic_target`): a
    # failed export or check leaves no OUT (and an existing OUT as it was), a killed one a temp the next write removes.
    with atomic_target(args.output, suffix=suffix) as scratch:
        if suffix == ".onnx":
            report = export_onnx(model, scratch, **({} if args.opset is None else {"opset": args.opset}))
        else:
            report = export_tflite(model, scratch, mode=args.mode or "int8", input_type=args.input_type,
                                   output_type=args.output_type)
        comparison = None
        if data is not None:
            comparison = compare_models(model, scratch, data, labels=labels, num_threads=args.threads)
    report = dataclasses.replace(report, path=args.output)
    if comparison is not None:
        comparison = dataclasses.replace(comparison, candidate=os.path.basename(args.output))
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
