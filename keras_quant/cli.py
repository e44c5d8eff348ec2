"""The `keras-quant` command line.

    keras-quant demo [--epochs N] [--seed S] [--json]

Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import json
import sys

from keras_quant import __version__
from keras_quant.errors import KerasQuantError
from keras_quant.formatting import to_jsonable

__all__ = ["main", "build_parser"]


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

    tables = demo.run(epochs=args.epochs, seed=args.seed, verbose=not args.json)
    if args.json:
        print(json.dumps(to_jsonable(tables), indent=2))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-quant", description="Quantization for Keras 3 models: calibrate, quantize, analyse."
    )
    parser.add_argument("--version", action="version", version=f"keras-quant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on the digits data and print its quantization error tables",
        description="Train a small CNN on scikit-learn's digits, quantize its weights and activations "
        "tensor by tensor with each observer, and print the error and accuracy tables.",
    )
    demo.add_argument("--epochs", type=_positive_int, default=12, help="training epochs (default: 12)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--json", action="store_true", help="print the tables as JSON instead of text")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KerasQuantError as e:
        print(f"keras-quant: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError) as e:
        print(f"keras-quant: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("keras-quant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
