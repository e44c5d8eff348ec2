"""`keras-quant demo`: the main job, end to end on shipped data.

Trains a small CNN on Fashion-MNIST when Debian's `dataset-fashion-mnist` is
installed (10,000 training and 2,000 test images, 3 epochs), else on
scikit-learn's digits (shipped in its wheel), then quantizes it tensor by tensor:

1. every kernel with int8 and 4-bit schemes (per channel, per group);
2. every activation, with each observer (min-max, percentile, MSE and KL
   range search) fed by the calibration split;
3. the whole model simulated with fake-quantized weights and activations,
   for the accuracy each scheme keeps;
4. the PTQ model: `CalibrationCallback` in one `model.predict` on the
   calibration split, then `quantize_model` (W8A8 and W4A8, min-max and MSE
   activation ranges), evaluated in Keras;
5. quantization-aware training: `quantize_model(..., mode="qat")` fine-tuned
   with `fit` for `qat_epochs` (W8A8, and W4A4 with LSQ against W4A4 PTQ);
6. export (TensorFlow backend): the W8A8 PTQ model to TFLite int8 and ONNX
   QDQ, a 16x8 PTQ model to TFLite int16x8, the W8A8 QAT model to TFLite
   int8, each evaluated in its runtime (LiteRT, onnxruntime) against its
   Keras model: accuracy, argmax agreement, output difference in
   quantization steps, size and batch-1 latency;
7. analysis (TensorFlow backend): `kq.analysis.analyze_model` of the W8A8
   PTQ model and its two files (per-layer errors, range methods, sensitivity,
   a mixed-precision search), written to the HTML report;

and prints the tables (`keras-quant demo`, or
`python examples/quantize_tensors.py`), with a progress bar on stderr for
every long step. `run` does it all; each step is a function of its own
(`train_model`, `weight_error_rows`, `observe_activations`,
`simulated_accuracy_rows`, then PTQ, QAT, export and analysis), and
`print_tables` prints what `run` returns. The data comes from
`keras_quant.cli.datasets`; `add_parser` and `command` are the `demo`
subcommand of `keras_quant.cli`.
"""

import argparse
import json
import os
import time

import keras
import numpy as np

import keras_quant.cli.datasets as datasets
from keras_quant import analysis, observers
from keras_quant import ops as qops
from keras_quant.cli.common import check_output_file, positive_int
from keras_quant.config import AUTO_CANDIDATES, QuantSpec
from keras_quant.errors import ConfigError
from keras_quant.formatting import text_table, to_jsonable
from keras_quant.progress import ProgressBar, progress_callback, steps

__all__ = ["build_model", "run", "load_data", "print_tables", "add_parser", "command"]

OBSERVER_NAMES = AUTO_CANDIDATES  # the range methods the demo compares: those "auto" chooses among
ACT_SPEC = QuantSpec(bits=8)  # the activations' scheme of steps 2 and 3
DATASETS = ("auto", "fashion", "digits")
# Fashion-MNIST subset and epochs: the main job stays a few minutes on 2 CPU cores.
FASHION_TRAIN, FASHION_TEST, FASHION_EPOCHS = 10_000, 2_000, 3
DIGITS_EPOCHS = 12


def load_data(dataset="auto", seed=0):
    """`((x_train, y_train), (x_test, y_test), name)` of the demo's dataset.

    Args:
        dataset: `"fashion"` (Debian's Fashion-MNIST, a subset, read from
            `keras_quant.cli.datasets.fashion_mnist_dir()`), `"digits"`, or `"auto"`:
            Fashion-MNIST when it is installed, else the digits.
        seed: Split seed of the digits.

    Raises:
        ConfigError: For an unknown `dataset`, `"fashion"` when it is not installed, or
            the digits without scikit-learn.
    """
    from keras_quant.errors import ConfigError

    if dataset not in DATASETS:
        raise ConfigError("dataset", dataset, f"dataset must be one of {DATASETS}")
    if dataset == "auto":
        dataset = "fashion" if datasets.fashion_mnist_available() else "digits"
    if dataset == "fashion":
        if not datasets.fashion_mnist_available():
            raise ConfigError("dataset", dataset, f"Fashion-MNIST is not installed in {datasets.fashion_mnist_dir()} "
                              f"(apt-get install -y dataset-fashion-mnist, or set ${datasets.FASHION_MNIST_DIR_ENV}"
                              "); use --dataset digits")
        train, test = datasets.load_fashion_mnist(limit_train=FASHION_TRAIN, limit_test=FASHION_TEST)
        return train, test, "fashion_mnist"
    train, test = datasets.load_digits(seed=seed)
    return train, test, "digits"


def build_model(input_shape=(8, 8, 1), num_classes=10):
    """A small chain CNN: conv-conv-pool-dense-dense."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name="demo_cnn")


def _weight_schemes(kernel_shape):
    schemes = {
        "int8 per-channel": QuantSpec(bits=8, symmetric=True, granularity="per_channel", narrow_range=True),
        "int4 per-channel": QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True),
    }
    per_channel = int(np.prod(kernel_shape[:-1]))
    if per_channel % 16 == 0:
        schemes["int4 per-group(16)"] = QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=16)
    return schemes


def _fake_quant_tensor(x, spec):
    return qops.fake_quant(x, *qops.tensor_qparams(x, spec), spec)


def _forward(model, x, weight_spec=None, act_qparams=None, act_spec=None, batch_size=256):
    """Run the chain model layer by layer, fake-quantizing kernels and outputs.

    Quantized kernels are swapped in once for the whole run and the float
    ones put back afterwards, even if a layer fails; the model is left as it
    was found.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    originals = {}
    if weight_spec is not None:
        for layer in layers:
            if hasattr(layer, "kernel"):
                # A copy: on TensorFlow `kernel.value` is the live variable itself.
                originals[layer.name] = keras.ops.convert_to_numpy(layer.kernel).copy()
    try:
        for layer in layers:
            if layer.name in originals:
                layer.kernel.assign(_fake_quant_tensor(originals[layer.name], weight_spec))
        outputs = []
        for start in range(0, len(x), batch_size):
            h = keras.ops.convert_to_tensor(x[start : start + batch_size])
            if act_qparams is not None:
                h = qops.fake_quant(h, *act_qparams[model.layers[0].name], act_spec)
            for layer in layers:
                h = layer(h)
                if act_qparams is not None and layer.name in act_qparams:
                    h = qops.fake_quant(h, *act_qparams[layer.name], act_spec)
            outputs.append(keras.ops.convert_to_numpy(h))
    finally:
        for layer in layers:
            if layer.name in originals:
                layer.kernel.assign(originals[layer.name])
    return np.concatenate(outputs)


def _qat_rows(model, calib, train, test, epochs, float_acc, say, models, verbose=True):
    """W8A8 QAT, and W4A4 PTQ against W4A4 QAT with LSQ, fine-tuned from the float model."""
    from keras_quant.config import QuantConfig
    from keras_quant.quantize import quantize_model

    w4a4 = QuantConfig(weights=QuantSpec(bits=4, symmetric=True, granularity="per_channel"), activations=QuantSpec(bits=4))
    lsq = QuantConfig(
        weights=QuantSpec(bits=4, symmetric=True, granularity="per_channel", learnable=True),
        activations=QuantSpec(bits=4, learnable=True),
    )
    calibration = None
    rows = []
    if keras.backend.backend() == "tensorflow":
        from keras_quant.calibration import CalibrationCallback

        callback = CalibrationCallback(config=w4a4, statistics="range")
        model.predict(calib, batch_size=128, callbacks=[callback], verbose=0)
        calibration = callback.result
        acc = _accuracy(quantize_model(model, w4a4, calibration=calibration).predict(test[0], verbose=0), test[1])
        rows.append({"scheme": "W4A4 PTQ model (minmax)", "accuracy": acc, "drop": float_acc - acc})
    for label, config, lr in (("W8A8 QAT", QuantConfig.int8(), 1e-4), ("W4A4 QAT + LSQ", lsq, 1e-3)):
        qat = quantize_model(model, config, mode="qat", calibration=calibration)
        qat.compile(optimizer=keras.optimizers.Adam(lr),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        t0 = time.perf_counter()
        bar = ProgressBar(steps(len(train[0]), 64, epochs), f"QAT {label}", enabled=verbose)
        qat.fit(*train, epochs=epochs, batch_size=64, verbose=0, callbacks=[progress_callback(bar)])
        bar.close()
        seconds = time.perf_counter() - t0
        acc = _accuracy(qat.predict(test[0], verbose=0), test[1])
        rows.append({"scheme": f"{label} ({epochs} epochs, {seconds:.1f}s)", "accuracy": acc, "drop": float_acc - acc})
        say(f"{label}: fine-tuned {epochs} epochs in {seconds:.1f}s, accuracy {acc:.4f}")
        models[label] = qat
    return rows


def _deploy_rows(float_model, keras_models, x_test, y_test, float_acc, folder, say, verbose=True):
    """Export the quantized models into `folder` and run each file in its runtime against its Keras model.

    Returns:
        `(rows, paths)`: the table rows, and `{artifact label: path}`.
    """
    from keras_quant.analysis import compare_models
    from keras_quant.export import export_onnx, export_tflite

    targets = [
        ("float -> TFLite float32", float_model, "tflite", "float32", None),
        ("W8A8 PTQ -> TFLite int8", keras_models.get("W8A8 PTQ"), "tflite", "int8", None),
        ("W8A8 PTQ -> ONNX QDQ", keras_models.get("W8A8 PTQ"), "onnx", None, None),
        ("W4A8 PTQ -> TFLite int8", keras_models.get("W4A8 PTQ"), "tflite", "int8", None),
        ("W4A8 PTQ + GPTQ -> TFLite int8", keras_models.get("W4A8 PTQ + GPTQ"), "tflite", "int8", None),
        ("16x8 PTQ -> TFLite int16x8", keras_models.get("16x8 PTQ"), "tflite", "int16x8", None),
        ("W8A8 QAT -> TFLite int8", keras_models.get("W8A8 QAT"), "tflite", "int8", "frozen"),
    ]
    targets = [t for t in targets if t[1] is not None]
    rows, paths = [], {}
    bar = ProgressBar(len(targets), "export + runtime checks", enabled=verbose)
    for label, qmodel, fmt, mode, freeze in targets:
        if freeze:
            from keras_quant import qat

            qat.set_mode(qmodel, freeze)
        name = label.split(" -> ")[-1].lower().replace(" ", "_")
        path = folder / f"{label.split(' ->')[0].lower().replace(' ', '_')}_{name}.{fmt}"
        t0 = time.perf_counter()
        if fmt == "onnx":
            export_onnx(qmodel, path)
        else:
            export_tflite(qmodel, path, mode=mode, input_type="float32", output_type="float32")
        seconds = time.perf_counter() - t0
        c = compare_models(qmodel, path, x_test, labels=y_test, latency_runs=30)
        paths[label] = path
        rows.append({
            "artifact": label, "runtime": "onnxruntime" if fmt == "onnx" else "LiteRT",
            "accuracy": c.candidate_accuracy, "drop": float_acc - c.candidate_accuracy,
            "agreement": c.argmax_agreement, "max_diff_steps": c.max_diff_steps,
            "size_kib": c.candidate_size_bytes / 1024, "latency_ms": 1e3 * c.candidate_latency_s,
        })
        bar.update()
        say(f"{label}: exported in {seconds:.1f}s, accuracy {c.candidate_accuracy:.4f} in its runtime, "
            f"agreement {c.argmax_agreement:.4f} with the Keras model")
    bar.close()
    return rows, paths


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def run(epochs=None, seed=0, calibration_samples=512, verbose=True, qat_epochs=3, out_dir=None, dataset="auto",
        report=None, analysis_samples=500):
    """Train, quantize, export, analyse, and return the tables' rows.

    Args:
        epochs: Training epochs (default: 12 on the digits, 3 on Fashion-MNIST).
        qat_epochs: Fine-tuning epochs of the QAT models (0: no QAT rows).
        seed: Seed for data split, initialisation and training.
        calibration_samples: Training samples fed to the observers.
        verbose: Print progress and the tables.
        out_dir: Folder for the exported files (default: a temporary folder, removed).
        dataset: `"auto"` (Fashion-MNIST when installed, else the digits), `"fashion"` or `"digits"`.
        report: Path of the HTML analysis report (TensorFlow backend), or None for none.
        analysis_samples: Test samples the analysis (step 7) runs on.

    Returns:
        A dict with `"dataset"`, the `"weights"`, `"activations"`, `"accuracy"` and
        `"deployed"` row lists, and `"analysis"` (`analyze_model`'s result, or None).
    """
    say = print if verbose else (lambda *a, **k: None)
    keras.utils.set_random_seed(seed)
    train, test, data_name = load_data(dataset, seed=seed)
    model = train_model(train, data_name, epochs, say, verbose)
    calib = train[0][:calibration_samples]
    on_tensorflow = keras.backend.backend() == "tensorflow"

    weight_rows = weight_error_rows(model)  # 1.
    observed, act_rows = observe_activations(model, calib, test[0])  # 2.
    float_acc, acc_rows = simulated_accuracy_rows(model, test, observed)  # 3.
    keras_models = {}  # the quantized Keras models export writes
    if on_tensorflow:  # 4. (the calibration callback hooks TensorFlow's trainer)
        acc_rows.extend(_ptq_rows(model, calib, test, float_acc, keras_models))
    if qat_epochs:  # 5. (any backend; calibration initialises the ranges on TensorFlow)
        acc_rows.extend(_qat_rows(model, calib, train, test, qat_epochs, float_acc, say, keras_models, verbose))
    deploy_rows, analysis_out = [], None
    if on_tensorflow:  # 6. and 7.
        deploy_rows, analysis_out = _deploy_and_analyse(model, keras_models, calib, test, float_acc, out_dir,
                                                        report, analysis_samples, say, verbose)

    tables = {"dataset": data_name, "weights": weight_rows, "activations": act_rows, "accuracy": acc_rows,
              "deployed": deploy_rows, "analysis": analysis_out}
    print_tables(tables, len(calib), len(test[0]), say)
    return tables


def train_model(train, data_name, epochs, say, verbose=True):
    """The float model: `build_model` trained on `train` (`epochs` None: the dataset's default)."""
    x_train, y_train = train
    if epochs is None:
        epochs = FASHION_EPOCHS if data_name == "fashion_mnist" else DIGITS_EPOCHS
    model = build_model(x_train.shape[1:])
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    bar = ProgressBar(steps(len(x_train), 64, epochs), f"training on {data_name}", enabled=verbose)
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0, callbacks=[progress_callback(bar)])
    bar.close()
    say(f"trained {model.name} on {data_name} ({len(x_train)} samples, {epochs} epochs) in "
        f"{time.perf_counter() - t0:.1f}s")
    return model


def weight_error_rows(model):
    """Step 1: every kernel, tensor by tensor, under each of `_weight_schemes`."""
    rows = []
    for layer in model.layers:
        if not hasattr(layer, "kernel"):
            continue
        w = keras.ops.convert_to_numpy(layer.kernel.value)
        for scheme, spec in _weight_schemes(w.shape).items():
            stats = analysis.error_stats(w, _fake_quant_tensor(w, spec))
            rows.append(
                {"layer": layer.name, "shape": str(w.shape), "scheme": scheme, "mse": stats.mse,
                 "sqnr_db": stats.sqnr_db, "max_error": stats.max_error}
            )
    return rows


def observe_activations(model, calib, x_test):
    """Step 2: every activation's observers fed by `calib`, their ranges judged on `x_test`.

    Returns:
        `(observed, rows)`: `{observer name: {tensor name: observer}}` (the input first,
        then each layer's output), and the table rows.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.input, [model.input] + [layer.output for layer in layers])
    names = [model.layers[0].name] + [layer.name for layer in layers]  # the input layer first
    observed = {
        method: {name: observers.get(ACT_SPEC.replace(observer=method)) for name in names}
        for method in OBSERVER_NAMES
    }
    for start in range(0, len(calib), 128):  # one probe pass feeds every observer
        for name, value in zip(names, probe(calib[start : start + 128])):
            for method in OBSERVER_NAMES:
                observed[method][name].update(value)
    test_acts = dict(zip(names, (keras.ops.convert_to_numpy(t) for t in probe(x_test))))
    rows = []
    for name in names:
        for method in OBSERVER_NAMES:
            row = {"tensor": name, "observer": method}
            for bits in (8, 4):
                spec = ACT_SPEC.replace(bits=bits)
                scale, zp = observed[method][name].compute_qparams(spec)
                stats = analysis.error_stats(test_acts[name], qops.fake_quant(test_acts[name], scale, zp, spec))
                row[f"a{bits}_sqnr_db"] = stats.sqnr_db
                if bits == 8:
                    lo, hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
                    row["a8_range"] = f"[{float(lo):.3g}, {float(hi):.3g}]"
            rows.append(row)
    return observed, rows


def simulated_accuracy_rows(model, test, observed):
    """Step 3: the whole model simulated with fake-quantized weights and `observed` activation ranges.

    Returns:
        `(float_acc, rows)`: the float model's test accuracy, and the table rows.
    """
    x_test, y_test = test
    float_acc = _accuracy(_forward(model, x_test), y_test)
    rows = [{"scheme": "float32", "accuracy": float_acc, "drop": 0.0}]
    w8 = _weight_schemes((1, 1))["int8 per-channel"]
    w4 = _weight_schemes((1, 1))["int4 per-channel"]
    for label, wspec in (("W8 (weights only)", w8), ("W4 (weights only)", w4)):
        acc = _accuracy(_forward(model, x_test, weight_spec=wspec), y_test)
        rows.append({"scheme": label, "accuracy": acc, "drop": float_acc - acc})
    for wlabel, wspec in (("W8", w8), ("W4", w4)):
        for method in OBSERVER_NAMES:
            qparams = {name: obs.compute_qparams(ACT_SPEC) for name, obs in observed[method].items()}
            acc = _accuracy(_forward(model, x_test, wspec, qparams, ACT_SPEC), y_test)
            rows.append({"scheme": f"{wlabel}A8 ({method})", "accuracy": acc, "drop": float_acc - acc})
    return float_acc, rows


def _ptq_rows(model, calib, test, float_acc, keras_models):
    """Step 4: `CalibrationCallback` in a predict call, then `quantize_model` (TensorFlow's trainer).

    Adds the first W8A8 and W4A8 PTQ models and a 16x8 PTQ model to `keras_models`.
    """
    from keras_quant.calibration import CalibrationCallback
    from keras_quant.config import QuantConfig
    from keras_quant.quantize import quantize_model

    rows = []
    for wlabel, config in (("W8A8", QuantConfig.int8()), ("W4A8", QuantConfig.w4a8())):
        for method in ("minmax", "mse"):
            config.activations = QuantSpec(bits=8, observer=method)
            callback = CalibrationCallback(config=config, statistics="range")
            t0 = time.perf_counter()
            model.predict(calib, batch_size=128, callbacks=[callback], verbose=0)
            qmodel = quantize_model(model, config, calibration=callback.result)
            seconds = time.perf_counter() - t0
            acc = _accuracy(qmodel.predict(test[0], verbose=0), test[1])
            rows.append({"scheme": f"{wlabel} PTQ model ({method}, calibrated in {seconds:.1f}s)",
                         "accuracy": acc, "drop": float_acc - acc})
            keras_models.setdefault(f"{wlabel} PTQ", qmodel)
    callback = CalibrationCallback(config=QuantConfig.int16x8(), statistics="range")
    model.predict(calib, batch_size=128, callbacks=[callback], verbose=0)
    keras_models["16x8 PTQ"] = quantize_model(model, QuantConfig.int16x8(), calibration=callback.result)
    rows.append(_algorithm_row(model, calib, test, float_acc, keras_models))
    return rows


def _algorithm_row(model, calib, test, float_acc, keras_models):
    """W4A8 PTQ refined by GPTQ and bias correction (`kq.ptq.quantize`); adds it to `keras_models`."""
    from keras_quant.config import QuantConfig
    from keras_quant.ptq.pipeline import quantize

    t0 = time.perf_counter()
    qmodel = quantize(model, calib, QuantConfig.w4a8(), algorithms=("gptq", "bias_correction"), progress=False)
    seconds = time.perf_counter() - t0
    keras_models["W4A8 PTQ + GPTQ"] = qmodel
    acc = _accuracy(qmodel.predict(test[0], verbose=0), test[1])
    return {"scheme": f"W4A8 PTQ + GPTQ + bias correction ({seconds:.1f}s)", "accuracy": acc, "drop": float_acc - acc}


def _deploy_and_analyse(model, keras_models, calib, test, float_acc, out_dir, report, analysis_samples, say,
                        verbose):
    """Steps 6 and 7: export each model into `out_dir` (None: a temporary folder), run each file in
    its runtime, then analyse the W8A8 PTQ model and its two files.

    Returns:
        `(deploy_rows, analysis_out)`.
    """
    import tempfile
    from pathlib import Path

    x_test, y_test = test
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        deploy_rows, paths = _deploy_rows(model, keras_models, x_test, y_test, float_acc, folder, say, verbose)
        artifacts = [paths[k] for k in ("W8A8 PTQ -> TFLite int8", "W8A8 PTQ -> ONNX QDQ") if k in paths]
        analysis_out = _analysis(model, calib, x_test[:analysis_samples], y_test[:analysis_samples], artifacts,
                                 report, verbose)
    return deploy_rows, analysis_out


def print_tables(tables, calibration_samples, test_samples, say=print):
    """Print `run`'s tables (`tables` as it returns them) with `say`."""
    say()
    say(text_table(tables["weights"], ["layer", "shape", "scheme", "mse", "sqnr_db", "max_error"], "Weights"))
    say()
    say(text_table(tables["activations"], ["tensor", "observer", "a8_range", "a8_sqnr_db", "a4_sqnr_db"],
                   f"Activations (observers on {calibration_samples} calibration samples, errors on "
                   f"{test_samples} test samples)"))
    say()
    say(text_table(tables["accuracy"], ["scheme", "accuracy", "drop"],
                   "Model accuracy on the test split (simulated in Keras)"))
    if tables["deployed"]:
        say()
        say(text_table(tables["deployed"], ["artifact", "runtime", "accuracy", "drop", "agreement",
                                            "max_diff_steps", "size_kib", "latency_ms"],
                       "Deployed artifacts, each run in its runtime against its Keras model (batch 1)"))
    if tables["analysis"] is not None:
        _print_analysis(tables["analysis"], say)


def _print_analysis(analysis_out, say):
    """Step 7's summary: per-layer SQNR and W4A4 sensitivity, and the mixed-precision search."""
    rows = [{"layer": r["layer"], "w4a4_sensitivity": r["metric_change"]}
            for r in analysis_out["sensitivity"]["ranking"]]
    errors = analysis_out["layer_errors"]
    for source, label in (("keras quantized", "w8a8_keras_sqnr_db"), ("w8a8_ptq_tflite_int8.tflite",
                                                                      "w8a8_tflite_sqnr_db")):
        by_name = {e["name"]: e["sqnr_db"] for e in errors.get(source, [])}
        for row in rows:
            row[label] = by_name.get(row["layer"])
    mixed = analysis_out["mixed_precision"]
    say()
    say(text_table(rows, None, "Where accuracy goes: per-layer SQNR at W8A8 (Keras and the int8 file), "
                               "and the accuracy drop with only that layer at W4A4"))
    say(f"mixed precision at W4A4 within {mixed['budget']:g}: float layers {mixed['high_precision'] or 'none'}, "
        f"drop {mixed['metric_change']:.4f} ({'met' if mixed['met'] else 'NOT met'}), "
        f"{mixed['size_bytes'] / 1024:.1f} KiB of weights ({mixed['float_size_bytes'] / 1024:.1f} KiB float)")
    if analysis_out["report"]:
        say(f"wrote the analysis report {analysis_out['report']}")


def _analysis(model, calib, x, y, artifacts, report, verbose):
    """`analyze_model` of the W8A8 PTQ model (min-max ranges) and its files; the sensitivity ranking
    and a half-point mixed-precision search at W4A4, where accuracy does go."""
    from keras_quant.analysis.workflow import analyze_model
    from keras_quant.config import QuantConfig

    w4a4 = QuantConfig(weights=QuantSpec(bits=4, symmetric=True, granularity="per_channel"), activations=QuantSpec(bits=4))
    return analyze_model(model, x, labels=y, config=QuantConfig.int8(), calibration_data=calib, artifacts=artifacts,
                         budget=0.005, search_config=w4a4, report=report, title=f"keras_quant demo: {model.name}",
                         verbose=1 if verbose else 0)


def add_parser(subparsers):
    """Add the `demo` subcommand to `subparsers` (of `keras_quant.cli.build_parser`)."""
    parser = subparsers.add_parser(
        "demo",
        help="the main job: train a small CNN, calibrate, quantize (PTQ, QAT), export, evaluate, report",
        description="Train a small CNN on Fashion-MNIST (Debian's dataset-fashion-mnist) or scikit-learn's digits, "
        "calibrate it, build PTQ and QAT models, export TFLite and ONNX files, run each in its runtime, print the "
        "tables and write the HTML analysis report.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="auto",
                        help="auto: Fashion-MNIST when Debian's dataset-fashion-mnist is installed, else the digits")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs (default: 12 on the digits, 3 on Fashion-MNIST)")
    parser.add_argument("--qat-epochs", type=_count, default=3,
                        help="fine-tuning epochs of the QAT models, 0 for none (default: 3)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 2**32 - 1 (default: 0)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="keep the exported .tflite / .onnx files in DIR (default: a temporary folder)")
    parser.add_argument("--report", metavar="HTML", default="keras_quant_report.html",
                        help="where to write the HTML analysis report (default: keras_quant_report.html); '' for none")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON instead of text")
    parser.set_defaults(func=command)
    return parser


def _count(text):
    """argparse type: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {text!r}")
    return value


def _seed(text):
    """argparse type: a random seed, 0 to 2**32 - 1 (what NumPy accepts)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, received {text!r}")
    return value


def _check_outputs(args):
    """Refuse, before training, an --out or --report the demo could not write at its end."""
    if args.report:
        check_output_file(args.report, "report", (".html", ".htm"), what="report")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError("out", args.out, "--out names a folder for the exported files, and this is a file")
    if args.out is not None and os.path.isdir(args.out) and not os.access(args.out, os.W_OK | os.X_OK):
        raise ConfigError("out", args.out, "the folder is not writable")


def command(args):
    """Run `keras-quant demo` with the parsed `args`; returns the exit status."""
    _check_outputs(args)
    tables = run(epochs=args.epochs, seed=args.seed, verbose=not args.json, qat_epochs=args.qat_epochs,
                 out_dir=args.out, dataset=args.dataset, report=args.report or None)
    if args.json:
        print(json.dumps(to_jsonable(tables), indent=2))
    return 0
