"""`keras-quant calibrate`: activation statistics of a saved model, written to a calibration file.

`keras-quant calibrate --merge A B ... -o OUT` instead combines calibration files of disjoint shards of
the data (`kq.CalibrationResult.merge`); it needs no model.

`calibration_config` is the `kq.QuantConfig` its options describe (`keras-quant analyze` uses it too).
"""

import json
import os

from keras_quant.cli.common import load_model, positive_int
from keras_quant.errors import ConfigError, KerasQuantError
from keras_quant.formatting import to_jsonable
from keras_quant.io import infer_format

__all__ = ["calibration_config", "check_output", "add_parser", "command", "merge_command"]


def calibration_config(bits=8, method="minmax", symmetric=False, per_channel=False, weight_bits=8, group_size=None):
    """The `kq.QuantConfig` of `keras-quant calibrate`'s options.

    Activations: `bits`-bit, per tensor (as TFLite quantizes activations),
    asymmetric unless `symmetric`, range from the `method` observer. Weights:
    `weight_bits`-bit symmetric narrow-range, per group of `group_size` input
    elements when given, else per channel with `per_channel`, else per tensor.
    """
    from keras_quant.config import QuantConfig, QuantSpec

    granularity = "per_group" if group_size else ("per_channel" if per_channel else "per_tensor")
    weights = QuantSpec(bits=weight_bits, symmetric=True, narrow_range=True, granularity=granularity,
                        group_size=group_size)
    activations = QuantSpec(bits=bits, symmetric=symmetric, observer=method)
    return QuantConfig(weights=weights, activations=activations)


def check_output(path):
    """Fail before calibrating when `path` cannot be written: format suffix, folder, not a directory.

    Raises:
        ConfigError: Naming what is wrong with `path`.
    """
    try:
        infer_format(path)
    except ConfigError:
        raise ConfigError(
            "output", path, "the output name must end in .json, .msgpack or .mpk (optionally + .gz or .zst)"
        ) from None
    if os.path.isdir(path):
        raise ConfigError("output", path, "the output path is a directory; name a file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError("output", path, f"the output directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("output", path, f"the output directory {directory} is not writable")


def _float_or_list(v):
    if v is None:
        return None
    import numpy as np

    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()


def add_parser(subparsers):
    """Add the `calibrate` subcommand to `subparsers` (of `keras_quant.cli.build_parser`)."""
    from keras_quant.calibration.sampling import SAMPLINGS
    from keras_quant.config import OBSERVERS
    from keras_quant.data import IMAGE_EXTENSIONS, NORMALIZATIONS
    from keras_quant.ptq.pipeline import ALGORITHMS

    cal = subparsers.add_parser(
        "calibrate",
        help="gather activation statistics of a .keras model on calibration data and save them",
        description="Run MODEL on the calibration data with a CalibrationCallback, print the per-layer "
        "statistics and write them (a kq.CalibrationResult) to OUT. Weights are not changed. With --merge "
        "RESULT ... (and no MODEL), combine calibration files of disjoint shards of the data into OUT instead.",
        epilog="DATA is a .npy array, a .npz (the array 'x', else the array named after the model input, else "
        "the only array; a multi-input model takes one array per input, named after it) or a folder of images ("
        f"{', '.join(IMAGE_EXTENSIONS)}, recursively, sorted) resized to the model input's (H, W), grayscale for "
        "a 1-channel input, RGB for 3. Folder images and uint8 arrays are pixel data and get --normalize; float "
        "and other integer arrays are used as they are (cast to float32). (N, H, W) data for a (None, H, W, 1) "
        "input gets its channel axis added. Exit status: 0 on success, 1 for a bad input, 2 for bad usage.",
    )
    _add_inputs(cal)
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
    cal.add_argument("--weight-bits", type=int, default=8, metavar="N",
                     help="weight bit width, 2-8 (default: 8); used by --save-model and the algorithms")
    cal.add_argument("--group-size", type=positive_int, default=None, metavar="G",
                     help="weight scales per group of G input elements of each output channel (default: per channel "
                     "with --per-channel, else per tensor)")
    cal.add_argument(
        "--algorithm", action="append", choices=ALGORITHMS, default=None, dest="algorithms",
        help="post-training algorithm to run before writing --save-model (repeatable; they run in the order "
        f"{', '.join(ALGORITHMS)}): equalize = cross-layer equalization of the float model, adaround / gptq = "
        "learned / Hessian-guided weight rounding (one of them), bias_correction = mean output shift folded into "
        "the biases, softmax_ranges = finer grid for softmax inputs",
    )
    cal.add_argument("--time-budget", type=float, default=None, metavar="S",
                     help="seconds AdaRound may take for the whole model (with --algorithm adaround; default: "
                     "no limit)")
    cal.add_argument(
        "--save-model", default=None, metavar="Q.keras",
        help="also write the quantized model (kq.ptq.quantize with these options) as a .keras file, ready for "
        "`keras-quant export` (written atomically)",
    )
    cal.add_argument("--symmetric", action="store_true", help="symmetric activation grid (zero point 0; default: asymmetric)")
    cal.add_argument(
        "--max-samples", type=positive_int, default=None, metavar="N",
        help="stop observing after N samples (default: all)",
    )
    cal.add_argument(
        "--sampling", choices=tuple(SAMPLINGS), default="all",
        help="which samples to observe (default: all): random keeps each with probability 0.5 (seeded by --seed), "
        "systematic every 2nd, stratified and importance as kq.CalibrationCallback (stratified needs --max-samples)",
    )
    cal.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the random samplers (default: none)")
    cal.add_argument("--batch-size", type=positive_int, default=32, metavar="B", help="predict batch size (default: 32)")
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
    cal.set_defaults(func=command, calibrate_parser=cal)
    return cal


def _add_inputs(cal):
    """MODEL and --data, or --merge RESULT ... (checked by `_check_usage`)."""
    cal.add_argument("model", metavar="MODEL", nargs="?", default=None,
                     help="the model, a .keras file (loaded with safe_mode=True); not with --merge")
    cal.add_argument("--data", metavar="DATA", default=None,
                     help="calibration data: .npy, .npz or a folder of images (required with MODEL)")
    cal.add_argument(
        "--merge", nargs="+", default=None, metavar="RESULT",
        help="instead of calibrating MODEL, combine calibration files of disjoint shards of the data (written by "
        "this command or kq.CalibrationResult.save, in any process) into OUT: the result one pass over all "
        "their data gives (kq.CalibrationResult.merge)",
    )


# Options that only apply when a model is calibrated (their defaults, to tell them apart from a given value).
_MODEL_OPTIONS = {"data": None, "save_model": None, "algorithms": None, "time_budget": None, "max_samples": None}


def _check_usage(args):
    """Usage errors (exit 2) argparse cannot express: MODEL and --data, or --merge and neither."""
    parser = getattr(args, "calibrate_parser", None)
    error = parser.error if parser is not None else _raise_usage
    if args.merge is not None:
        given = [name for name, default in _MODEL_OPTIONS.items() if getattr(args, name, default) != default]
        if args.model is not None or given:
            what = "MODEL" if args.model is not None else "--" + given[0].replace("_", "-")
            error(f"argument --merge: combines saved results; it takes no {what}")
        return
    if args.model is None:
        error("the following arguments are required: MODEL (or --merge RESULT ...)")
    if args.data is None:
        error("the following arguments are required: --data")


def _raise_usage(message):
    import sys

    print(f"keras-quant calibrate: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge_command(args):
    """`keras-quant calibrate --merge A B ... -o OUT`: `kq.CalibrationResult.merge` of the files, written to OUT.

    A file that does not load raises `IntegrityError` / `FileNotFoundError`, shards that disagree
    `ConfigError` / `ShapeMismatchError` (their message also lists which file is which shard).
    """
    from keras_quant.calibration import CalibrationResult

    check_output(args.output)
    results = [CalibrationResult.load(path) for path in args.merge]
    try:
        result = CalibrationResult.merge(results)
    except KerasQuantError as e:
        shards = ", ".join(f"{i} = {path}" for i, path in enumerate(args.merge))
        e.args = (f"{e} (shards: {shards})",)
        raise
    result.save(args.output)
    samples = result.metadata.get("samples_seen")
    _print_result(result, result.metadata.get("config"), args, samples=samples if samples is not None else "?")
    return 0


def command(args):
    """Run `keras-quant calibrate` with the parsed `args`; returns the exit status."""
    from keras_quant.calibration import CalibrationCallback, CalibrationResult
    from keras_quant.data import load_calibration_data

    _check_usage(args)
    if args.merge is not None:
        return merge_command(args)
    check_output(args.output)
    _check_model_output(args)
    model = load_model(args.model)
    data = load_calibration_data(args.data, model, normalize=args.normalize)
    config = calibration_config(args.bits, args.method, args.symmetric, args.per_channel, args.weight_bits,
                                args.group_size)
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
    _print_result(result, config, args, samples=int(metadata.get("samples_seen", 0)))
    if args.save_model:
        _save_quantized(model, data, config, result, args)
    return 0


def _check_model_output(args):
    """Fail before calibrating on a bad `--save-model` / `--algorithm` combination."""
    from keras_quant.ptq.pipeline import check_algorithms

    check_algorithms(args.algorithms or ())
    if args.time_budget is not None and "adaround" not in (args.algorithms or ()):
        raise ConfigError("time_budget", args.time_budget, "--time-budget limits AdaRound: add --algorithm adaround")
    if args.algorithms and not args.save_model:
        raise ConfigError("algorithm", args.algorithms[0], "the algorithms change the quantized model's weights: "
                          "name where to write it with --save-model Q.keras")
    if args.save_model is None:
        return
    if not args.save_model.endswith(".keras"):
        raise ConfigError("save_model", args.save_model, "the quantized model is written as a .keras file")
    directory = os.path.dirname(os.path.abspath(args.save_model))
    if not os.path.isdir(directory):
        raise ConfigError("save_model", args.save_model, f"the output directory {directory} does not exist")


def _save_quantized(model, data, config, result, args):
    """`kq.ptq.quantize` with the options and the calibration just made; the model written atomically."""
    from keras_quant.io.atomic import atomic_target
    from keras_quant.ptq.pipeline import quantize

    options = {"adaround": {"time_budget": args.time_budget}} if args.time_budget is not None else None
    qmodel = quantize(model, data, config, algorithms=args.algorithms or (), calibration=result,
                      max_samples=args.max_samples or 512, batch_size=args.batch_size, options=options,
                      progress=not args.json)
    with atomic_target(args.save_model, suffix=".keras") as tmp:  # a killed save leaves a temp the next write removes
        qmodel.save(tmp)
    if not args.json:
        if args.algorithms:
            print(qmodel.ptq_report)
        print(f"wrote {args.save_model} (quantized model)")


def _print_result(result, config, args, samples):
    """The saved result: one JSON object with `--json`, else its summary table."""
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
            "config": config if config is None or isinstance(config, dict) else config.get_config(),
        }
        if "merged" in result.metadata:
            report["shards"] = result.metadata["merged"]["shards"]
        print(json.dumps(to_jsonable(report), indent=2))
    else:
        result.summary()
        print(f"wrote {args.output} ({len(result)} layers, {samples} samples)")
