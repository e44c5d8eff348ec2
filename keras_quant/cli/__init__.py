"""The `keras-quant` command line (the `keras-quant` console script, or `python -m keras_quant.cli`).

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

Errors are one line on stderr and a non-zero exit code (1 for a bad input, 2 for bad usage), never a
traceback, and leave no output file behind. TensorFlow's own log lines (C++ start-up and converter lines,
LiteRT's delegate line, Python warnings) are hidden unless `--verbose` (before or after the command),
which also prints the traceback of an unexpected error (`keras_quant.cli.console`).

The package sits apart from the library core: one module per command
(`keras_quant.cli.demo`, `.calibrate`, `.export`, `.analyze`), each with
`add_parser(subparsers)` and `command(args)`; `keras_quant.cli.common` holds what
they share, and `keras_quant.cli.datasets` the demo's offline datasets.
"""

import argparse
import sys
import traceback

import keras_quant.cli.analyze as analyze_command
import keras_quant.cli.calibrate as calibrate_command
import keras_quant.cli.demo as demo_command
import keras_quant.cli.export as export_command
from keras_quant.version import __version__
from keras_quant.cli.calibrate import calibration_config
from keras_quant.cli.console import one_line, quiet
from keras_quant.errors import KerasQuantError

__all__ = ["main", "build_parser", "calibration_config"]

# The subcommands, in the order `keras-quant --help` lists them.
COMMANDS = (demo_command, calibrate_command, export_command, analyze_command)


def build_parser():
    """The `keras-quant` argument parser: one subparser per module of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="keras-quant", description="Quantization for Keras 3 models: calibrate, quantize, analyse."
    )
    parser.add_argument("--version", action="version", version=f"keras-quant {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's log lines and warnings, and the traceback of an unexpected error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = command.add_parser(subparsers)
        # Also after the command; SUPPRESS keeps a --verbose given before it.
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show TensorFlow's log lines and warnings, and the traceback of an unexpected error")
    return parser


def main(argv=None):
    """Run `keras-quant` on `argv` (default: `sys.argv[1:]`); returns the exit status.

    0 on success, 1 for a bad input (one line on stderr), 2 for bad usage, 130 when interrupted.
    An unexpected exception is one line too (with its type), its traceback shown with `--verbose`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    with quiet(args.verbose):
        try:
            return args.func(args)
        except (KerasQuantError, OSError) as e:
            # Keras and the OS may put newlines in a message: the error stays one line.
            print(f"keras-quant: error: {one_line(e)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("keras-quant: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - a library or converter failure still ends in one line
            if args.verbose:
                traceback.print_exc(file=sys.stderr)
            hint = "" if args.verbose else " (--verbose shows the traceback)"
            print(f"keras-quant: error: {type(e).__name__}: {one_line(e) or 'no message'}{hint}", file=sys.stderr)
            return 1
