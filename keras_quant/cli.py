"""The `keras-quant` command line.

    keras-quant demo [--epochs N] [--qat-epochs N] [--seed S] [--out DIR] [--json]
    keras-quant calibrate MODEL --data DATA -o OUT [--bits N] [--method M] [--per-channel]
                          [--symmetric] [--max-samples N] [--sampling S] [--seed S]
                          [--batch-size B] [--normalize {unit,imagenet,none}] [--json]

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
                      out_dir=args.out)
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
    demo.add_argument("--qat-epochs", type=int, default=3,
                      help="fine-tuning epochs of the QAT models, 0 for none (default: 3)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="keep the exported .tflite / .onnx files in DIR (default: a temporary folder)")
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
