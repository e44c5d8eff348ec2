"""What the deployment recipes share: arguments, data, the report, one-line errors.

Each recipe (`to_tflite_int8.py`, `to_tflite_16x8.py`, `to_onnx_qdq.py`) is one call of
`main(doc, target, suffix, export)`: it loads a saved quantized `.keras` model
(`keras.models.load_model(path, safe_mode=True)`), writes
`<out>/<model stem>_<target><suffix>` with `export(model, path)`, runs the file in its runtime
against the Keras model (`kq.analysis.compare_models`) and prints the `ExportReport` and the
comparison. A bad model file, bad data or a keras_quant error ends the script with one line on
stderr and exit status 1.

This is a helper of stand-alone scripts, not a package module: the recipes import it as
`_common` from their own folder (a script's folder is on `sys.path`); `export/` has no
`__init__.py` and is not `keras_quant.export`. The offline data comes from
`keras_quant.cli.datasets`.
"""

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"  # git-ignored
DEFAULT_SAMPLES = 1000
# The model's input shape (without batch) -> the built-in dataset it is checked on by default.
DEFAULT_DATA = {(8, 8, 1): "digits", (28, 28, 1): "fashion"}

# Run this checkout's keras_quant, whatever an editable install points at.
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))


class RecipeError(Exception):
    """A problem with the command line, the model file or the data (one line, no traceback)."""


def parse_args(doc, argv=None):
    """The recipes' command line (see any recipe's `--help`)."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(doc.strip().split("\n")[1:]))
    parser.add_argument("model", help="a quantized model saved with model.save('NAME.keras')")
    parser.add_argument("--data", default=None,
                        help="'fashion', 'digits' or PATH.npz (array 'x', optional labels 'y'); default: digits for "
                             "8x8x1 inputs, fashion for 28x28x1")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"test samples to compare on (default {DEFAULT_SAMPLES})")
    parser.add_argument("--out", default=None, help=f"folder for the artifact (default {ARTIFACTS})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the runtime (default: its own)")
    parser.add_argument("--min-agreement", type=float, default=None,
                        help="fail (exit 1) when the argmax agreement with the Keras model is below this fraction")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def load_model(path):
    """The saved quantized Keras model at `path` (safe mode: no code is deserialized)."""
    import keras

    import keras_quant as kq

    model = keras.models.load_model(path, safe_mode=True)
    quantized = (kq.QuantizeWrapper, kq.ActivationQuantizer)
    if not any(isinstance(layer, quantized) for layer in model.layers):
        raise RecipeError(f"{path} holds no quantized layer; make the model with kq.quantize_model and save that")
    return model


def load_data(spec, input_shape, samples):
    """`(x, y or None, name)`: test data of `input_shape` (no batch axis), at most `samples` of it.

    Args:
        spec: `"fashion"`, `"digits"`, a path to an `.npz` file (`x`, optional `y`), or None to
            pick the built-in dataset from the input shape.
        input_shape: The model's input shape without the batch axis.
        samples: The most samples to keep.
    """
    import numpy as np

    from keras_quant.cli import datasets

    shape = tuple(input_shape)
    if spec is None:
        spec = DEFAULT_DATA.get(shape)
        if spec is None:
            raise RecipeError(f"the model takes inputs of shape {shape}; pass --data PATH.npz holding an array 'x' "
                              "of that shape (and optional labels 'y')")
    if spec == "digits":
        _, (x, y) = datasets.load_digits()
    elif spec == "fashion":
        if not datasets.fashion_mnist_available():
            raise RecipeError(f"Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist puts it in "
                              f"{datasets.fashion_mnist_dir()}); pass --data digits or --data PATH.npz")
        _, (x, y) = datasets.load_fashion_mnist(limit_test=samples)
    elif spec.endswith(".npz"):
        if not os.path.isfile(spec):
            raise RecipeError(f"no such data file: {spec}")
        with np.load(spec, allow_pickle=False) as npz:
            if "x" not in npz:
                raise RecipeError(f"{spec} has no array 'x' (it holds {sorted(npz.files)})")
            x, y = npz["x"], npz["y"] if "y" in npz else None
    else:
        raise RecipeError(f"--data must be 'fashion', 'digits' or a path ending in .npz, got {spec!r}")
    if tuple(x.shape[1:]) != shape:
        raise RecipeError(f"--data {spec} holds samples of shape {tuple(x.shape[1:])}, but the model takes {shape}")
    if y is not None and len(y) != len(x):
        raise RecipeError(f"--data {spec} has {len(x)} samples but {len(y)} labels")
    x = x[:samples].astype("float32")
    return x, None if y is None else y[:samples], Path(spec).name


def _one_line(error):
    """The error's first line (an ExportError lists one problem per line), its type named."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [repr(error)]
    text = lines[0] if isinstance(error, RecipeError) else f"{type(error).__name__}: {lines[0]}"
    return text + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


def _expected_errors():
    """Errors that end a recipe with one line: ours, keras_quant's, and bad files or values."""
    expected = (RecipeError, OSError, ValueError, ImportError)
    errors = sys.modules.get("keras_quant.errors")
    return expected + ((errors.KerasQuantError,) if errors else ())


def run_recipe(args, target, suffix, export):
    """Load, export, verify and print; returns the `ModelComparison`."""
    model_path = Path(args.model)
    if not model_path.is_file():  # before TensorFlow is imported: a typo fails in a blink
        raise RecipeError(f"no such model file: {model_path}")
    if model_path.suffix != ".keras":
        raise RecipeError(f"the model must be a .keras file, got {model_path.name}")
    import keras_quant as kq

    model = load_model(model_path)
    x, y, data_name = load_data(args.data, model.inputs[0].shape[1:], args.samples)
    out_dir = Path(args.out) if args.out else ARTIFACTS
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"{model_path.stem}_{target}{suffix}"

    report = export(model, artifact)
    print(report)
    print()
    comparison = kq.analysis.compare_models(model, artifact, x, labels=y, num_threads=args.threads)
    print(comparison)
    print()
    print(f"{artifact}: {report.size_bytes} bytes, argmax agreement {comparison.argmax_agreement:.4f} with "
          f"{model_path.name} on {comparison.num_samples} samples of {data_name}")
    if args.min_agreement is not None and comparison.argmax_agreement < args.min_agreement:
        raise RecipeError(f"argmax agreement {comparison.argmax_agreement:.4f} is below --min-agreement "
                          f"{args.min_agreement}")
    return comparison


def main(doc, target, suffix, export, argv=None):
    """A recipe's entry point; returns the exit status (0, or 1 with a one-line error on stderr).

    Args:
        doc: The recipe's docstring (its first line is the `--help` description).
        target: Names the artifact: `<model stem>_<target><suffix>`.
        suffix: `".tflite"` or `".onnx"`.
        export: `export(model, path) -> ExportReport`.
        argv: Arguments (default `sys.argv[1:]`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a script, not the library: quiet TF's C++ logs
    args = parse_args(doc, argv)
    try:
        run_recipe(args, target, suffix, export)
    except Exception as e:  # noqa: BLE001 - the expected ones become one line, the rest a traceback
        if not isinstance(e, _expected_errors()):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0
