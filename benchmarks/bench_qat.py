"""Quantization-aware training: step-time overhead against TF-MOT, and accuracy against PTQ.

    python benchmarks/run.py --only qat [--quick]         # as part of the benchmark report
    python benchmarks/bench_qat.py [--quick] [--part P]   # on its own, P in all/timing/tfmot/accuracy

Data: Fashion-MNIST (`keras_quant.cli.datasets`, Debian's `/usr/share/datasets/fashion-mnist`; the
scikit-learn digits when it is not installed, said in the notes). Model: a CNN in the style of
`bench_calibration.py` (Conv2D(16)+BatchNorm+ReLU+MaxPool, Conv2D(32)+BatchNorm+ReLU+MaxPool,
Flatten, Dense(10); Flatten rather than global pooling and BatchNorm momentum 0.9 so that a
short training reaches a usable test accuracy with inference-mode statistics), built by one
function from either Keras 3 or `tf_keras`, so both frameworks train the identical architecture.
Batch size 64, CPU, fixed seed.

1. Step time, as ratios measured in one process (the headline; absolute times are noisy):

   - keras_quant: `kq.quantize_model(model, config, mode="qat", calibration=...)` step time
     over the Keras 3 float model's, for W8A8 (`kq.QuantConfig.int8()`) and W8A8 with LSQ (the
     same specs with `learnable=True`).
   - TF-MOT: `tfmot.quantization.keras.quantize_model` (default 8-bit scheme) step time over the
     `tf_keras` float model's. TF-MOT only takes `tf_keras` models, and `tf_keras` and Keras 3 in
     one process interfere, so this side runs in a subprocess (this file with `--worker tfmot`,
     `TF_USE_LEGACY_KERAS=1`) on the same images (passed in an .npz file) and returns JSON.

   Step time, three ways, all with the models taking turns so that a machine whose speed
   drifts (other jobs on the cores) slows both sides of a ratio alike; each ratio is the median
   over turns of (QAT time / float time in the same turn):

   - train step (the headline): the compiled step that `fit` runs, `model.train_function` on a
     `tf.data` iterator of the same images, the models alternating step by step;
   - `train_on_batch`: the public one-batch call, alternating call by call (adds Keras' per-call
     Python overhead, which differs between Keras 3 and `tf_keras`);
   - fit step: intervals between `on_train_batch_end` calls inside short `fit` calls, the models
     alternating fit by fit (per-round medians; the first step of each call left out).

   All after a warm-up `fit` and `train_on_batch` calls (which trace). Target from the issue:
   the keras_quant ratio is at most TF-MOT's.

2. Accuracy on the test set: a float model trained a few epochs, then for W8A8, W4A8 and W4A4
   (4-bit per-channel symmetric weights, 4-bit per-tensor asymmetric activations):
   PTQ (`CalibrationCallback` on training images + `quantize_model`), QAT (`mode="qat"`, same
   calibration as the start point, fine-tuned with Adam at a small learning rate) and QAT+LSQ (the
   same specs with `learnable=True`). A float model fine-tuned with the same optimizer and steps is
   the control that separates what QAT recovers from what extra training adds.

TF-MOT needs `pip install --no-deps tf-keras==2.21.0 tensorflow-model-optimization==0.8.1
dm-tree==0.1.10` (the `bench` extra; `--no-deps` keeps TF-MOT's `absl-py~=1.2` pin from
downgrading absl-py). Without it the TF-MOT rows hold the import error and no ratio.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

SEED = 0
BATCH = 64
EVAL_BATCH = 256
# Keras' default 0.99 leaves the moving statistics far behind after a few hundred steps (test
# accuracy near chance in quick mode while training accuracy is 65%).
BN_MOMENTUM = 0.9
TRAIN_LR = 1e-3  # float training, and the optimizer of the step-time models
QAT_LR = 1e-4  # QAT / QAT+LSQ / float fine-tuning
TIMING_CALIB = 256  # images calibrating the step-time QAT models (their accuracy does not matter)
DATA_BATCHES = 16  # batches of images the train-step timing cycles through (the same on both sides)
QUICK = {"train": 10000, "test": 2000, "epochs": 2, "calib": 500, "finetune_steps": 100, "step_cycles": 80,
         "tob_calls": 24, "time_steps": 12, "rounds": 3, "time_warmup": 5, "tfmot_timeout": 400}
FULL = {"train": None, "test": None, "epochs": 2, "calib": 1000, "finetune_steps": None, "step_cycles": 400,
        "tob_calls": 150, "time_steps": 40, "rounds": 8, "time_warmup": 10, "tfmot_timeout": 1500}
TFMOT_INSTALL = "pip install --no-deps tf-keras==2.21.0 tensorflow-model-optimization==0.8.1 dm-tree==0.1.10"
JSON_MARK = "KQ_BENCH_JSON:"  # prefix of the worker's result line on stdout
# TensorFlow / absl chatter that is not an error (left out of error messages and printed logs).
NOISE = ("WARNING: All log messages before absl", "oneDNN custom operations", "cuda", "CUDA",
         "cpu_feature_guard", "To enable the following instructions", "rebuild TensorFlow",
         "TF-TRT", "Unable to register", "computation placer", "absl::InitializeLog")
ABSL_INFO = re.compile(r"^[IW]\d{4} ")  # absl-formatted info / warning lines (errors, E..., are kept)


# Data and model ------------------------------------------------------------------------
def load_data(n_train=None, n_test=None):
    """`(x_train, y_train, x_test, y_test, dataset_name)`; digits when Fashion-MNIST is missing."""
    from keras_quant.cli import datasets

    return datasets.load_fashion_or_digits(n_train, n_test)


def build_model(keras_module, input_shape):
    """The benchmark CNN, from Keras 3 (`keras`) or `tf_keras`, seeded.

    Args:
        keras_module: The `keras` or `tf_keras` module.
        input_shape: Image shape, e.g. `(28, 28, 1)`.

    Returns:
        An uncompiled `Sequential` model.
    """
    layers = keras_module.layers
    keras_module.utils.set_random_seed(SEED)
    return keras_module.Sequential(
        [
            keras_module.Input(tuple(input_shape)),
            layers.Conv2D(16, 3, padding="same", use_bias=False),
            layers.BatchNormalization(momentum=BN_MOMENTUM),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", use_bias=False),
            layers.BatchNormalization(momentum=BN_MOMENTUM),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(10),
        ],
        name="fmnist_cnn",
    )


def compile_model(keras_module, model, lr):
    """Adam at `lr`, sparse categorical cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras_module.optimizers.Adam(learning_rate=lr),
        loss=keras_module.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _error_text(exc, limit=400):
    return f"{type(exc).__name__}: {exc}"[:limit]


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Configs -------------------------------------------------------------------------------
def schemes():
    """`{name: QuantConfig}`: W8A8, W4A8 and W4A4 (W4A4 shares W4A8's weight spec)."""
    import keras_quant as kq

    w4a8 = kq.QuantConfig.w4a8()
    return {
        "W8A8": kq.QuantConfig.int8(),
        "W4A8": w4a8,
        "W4A4": kq.QuantConfig(weights=w4a8.weights, activations=kq.QuantSpec(bits=4)),
    }


def learnable(config):
    """The same default specs as `config` with `learnable=True` (LSQ step sizes)."""
    import keras_quant as kq

    def lsq(spec):
        return None if spec is None else dataclasses.replace(spec, learnable=True)

    return kq.QuantConfig(weights=lsq(config.weights), activations=lsq(config.activations))


def qat_available():
    """Whether this checkout's `quantize_model` has `mode="qat"`."""
    from keras_quant import quantize

    return "qat" in quantize.MODES


def calibrate(model, config, x_calib):
    """`CalibrationCallback(config)` over `model.predict(x_calib)`; returns its result."""
    import keras_quant as kq

    cb = kq.CalibrationCallback(config)
    model.predict(x_calib, batch_size=BATCH, verbose=0, callbacks=[cb])
    return cb.result


# Step timing (shared by the Keras 3 side and the tf_keras worker) ------------------------
def _step_timer(keras_module):
    """A callback recording `perf_counter()` at the start of `fit` and at every batch end."""

    class StepTimer(keras_module.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    return StepTimer()


def fit_step_seconds(keras_module, model, x, y, steps):
    """Per-step seconds of one `model.fit` over `steps` batches, its first step left out."""
    timer = _step_timer(keras_module)
    n = steps * BATCH
    model.fit(x[:n], y[:n], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    return list(np.diff(timer.ends)[1:])


def train_on_batch_seconds(model, x, y, calls, warmup):
    """Seconds of each of `calls` `train_on_batch` calls on one batch, after `warmup` calls."""
    xb, yb = x[:BATCH], y[:BATCH]
    for _ in range(warmup):
        model.train_on_batch(xb, yb)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        model.train_on_batch(xb, yb)
        out.append(time.perf_counter() - start)
    return out


def _sync(logs):
    """Wait for a train step's outputs (a dict of tensors) by reading the loss."""
    if isinstance(logs, dict) and "loss" in logs:
        float(np.asarray(logs["loss"]))
    return logs


def interleaved_seconds(calls, cycles, warmup):
    """Times of `calls[label]()` for every label in turn, `cycles` times after `warmup` cycles.

    The order is reversed every other cycle, so the models alternate call by call and the
    i-th times of two models were taken a few milliseconds apart (`paired_ratio`).

    Args:
        calls: `{label: zero-argument callable}`.
        cycles: Timed cycles.
        warmup: Untimed cycles first.

    Returns:
        `{label: [seconds per cycle]}`.
    """
    labels = list(calls)
    out = {label: [] for label in labels}
    for i in range(warmup + cycles):
        for label in labels if i % 2 == 0 else labels[::-1]:
            start = time.perf_counter()
            calls[label]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                out[label].append(elapsed)
    return out


def measure_step_times(keras_module, models, x, y, cfg):
    """Per-step seconds of compiled models, three ways, the models alternating.

    - `step`: the compiled train step that `fit` runs (`model.train_function` on a
      `tf.data` iterator of the same images), the models taking turns step by step;
    - `train_on_batch`: the public one-batch call, taking turns call by call (adds Keras'
      per-call Python overhead: input conversion, reading the logs);
    - `fit`: intervals between `on_train_batch_end` calls in short `fit` calls, the models
      taking turns fit by fit (rounds), order reversed every other round.

    Args:
        keras_module: `keras` or `tf_keras`.
        models: `{label: compiled model}`; the same data and batch size for all.
        x, y: Training arrays with at least `(time_steps + 1) * BATCH` samples.
        cfg: `QUICK` or `FULL` (`step_cycles`, `tob_calls`, `time_steps`, `rounds`, `time_warmup`).

    Returns:
        `{label: {...}}` with, per way, the median seconds (`step_s`, `train_on_batch_s`,
        `fit_step_s`), the paired series (`step_cycle_s`, `tob_cycle_s`, `fit_round_s`: per
        cycle, per call, per-round median), the counts and `jit_compile`; or
        `{"error": ...}` for a model whose training raised.
    """
    import tensorflow as tf

    out, live = {}, {}
    for label, model in models.items():  # warm-up: traces each model's train step
        try:
            fit_step_seconds(keras_module, model, x, y, cfg["time_warmup"] + 1)
            train_on_batch_seconds(model, x, y, 0, cfg["time_warmup"])
            live[label] = model
        except Exception as e:  # noqa: BLE001 - record and time the others
            out[label] = {"error": _error_text(e)}
    n = min(len(x), DATA_BATCHES * BATCH)
    dataset = tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).batch(BATCH, drop_remainder=True).cache().repeat()

    def step_call(model):
        model.make_train_function()
        fn, iterator = model.train_function, iter(dataset)
        return lambda: _sync(fn(iterator))

    xb, yb = x[:BATCH], y[:BATCH]
    steps = interleaved_seconds({k: step_call(m) for k, m in live.items()}, cfg["step_cycles"], cfg["time_warmup"])
    tob = interleaved_seconds({k: (lambda m=m: m.train_on_batch(xb, yb)) for k, m in live.items()},
                              cfg["tob_calls"], 1)
    fit = {label: [] for label in live}
    for r in range(cfg["rounds"]):
        for label in list(live) if r % 2 == 0 else list(live)[::-1]:
            fit[label].append(fit_step_seconds(keras_module, live[label], x, y, cfg["time_steps"] + 1))
    for label, model in live.items():
        out[label] = {
            "step_s": statistics.median(steps[label]),
            "step_cycle_s": steps[label],
            "train_on_batch_s": statistics.median(tob[label]),
            "tob_cycle_s": tob[label],
            "fit_step_s": statistics.median(t for rnd in fit[label] for t in rnd),
            "fit_round_s": [statistics.median(rnd) for rnd in fit[label]],
            "fit_steps": sum(len(rnd) for rnd in fit[label]),
            "jit_compile": getattr(model, "jit_compile", None),
        }
    return out


def paired_ratio(times, label, key, reference="float"):
    """Median over cycles (or rounds) of `label`'s time / `reference`'s time in the same cycle.

    Args:
        times: A `measure_step_times` result.
        label: The model measured.
        key: `"step_cycle_s"`, `"tob_cycle_s"` or `"fit_round_s"`.
        reference: The model it is compared with.

    Returns:
        The ratio, or None when either side was not measured.
    """
    num, den = times.get(label, {}).get(key), times.get(reference, {}).get(key)
    if not num or not den:
        return None
    return statistics.median(a / b for a, b in zip(num, den))


# keras_quant side ------------------------------------------------------------------------
def kq_step_times(x, y, cfg):
    """Step times of the Keras 3 float CNN and its keras_quant QAT versions (W8A8, W8A8+LSQ).

    Returns:
        `{label: timing dict or {"error": ...}}` for `float`, `W8A8`, `W8A8+LSQ`.
    """
    import keras
    import keras_quant as kq

    float_model = compile_model(keras, build_model(keras, x.shape[1:]), TRAIN_LR)
    models, errors = {"float": float_model}, {}
    base = kq.QuantConfig.int8()
    for label, config in (("W8A8", base), ("W8A8+LSQ", learnable(base))):
        if not qat_available():
            errors[label] = {"error": f"keras_quant has no mode='qat' yet (quantize.MODES = {kq.quantize.MODES})"}
            continue
        try:
            result = calibrate(float_model, config, x[:TIMING_CALIB])
            qat = kq.quantize_model(float_model, config, mode="qat", calibration=result)
            models[label] = compile_model(keras, qat, TRAIN_LR)
        except Exception as e:  # noqa: BLE001 - record; the float side is still measured
            errors[label] = {"error": _error_text(e), "traceback": traceback.format_exc(limit=6)}
    times = measure_step_times(keras, models, x, y, cfg)
    times.update(errors)
    return times


# TF-MOT side (subprocess) -----------------------------------------------------------------
def tfmot_worker(data_path, cfg):
    """Runs in the subprocess: `tf_keras` float vs TF-MOT QAT step times on the given images.

    Args:
        data_path: An .npz file with `x` and `y`.
        cfg: `QUICK` or `FULL`.

    Returns:
        A JSON-able dict: `times` (as `measure_step_times`), `versions`, and
        `error` instead when `tf_keras` or TF-MOT cannot be imported or applied.
    """
    versions = {d: _version(d) for d in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "dm-tree")}
    try:
        import tf_keras
        import tensorflow_model_optimization as tfmot
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return {"error": _error_text(e, 1000), "stage": "import", "versions": versions}
    data = np.load(data_path)
    x, y = data["x"], data["y"]
    models = {"float": compile_model(tf_keras, build_model(tf_keras, x.shape[1:]), TRAIN_LR)}
    try:
        qat = tfmot.quantization.keras.quantize_model(build_model(tf_keras, x.shape[1:]))
        models["tfmot_qat"] = compile_model(tf_keras, qat, TRAIN_LR)
    except Exception as e:  # noqa: BLE001
        return {"error": _error_text(e, 1000), "stage": "quantize_model", "versions": versions,
                "traceback": traceback.format_exc(limit=8)}
    layers = [type(layer).__name__ for layer in qat.layers]
    return {"times": measure_step_times(tf_keras, models, x, y, cfg), "versions": versions,
            "qat_layers": layers, "keras_version": tf_keras.__version__}


def _clean_log(text, keep=25):
    """The last `keep` lines of a TensorFlow process's stderr, without its informational chatter."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not any(n in ln for n in NOISE)]
    lines = [ln for ln in lines if not ABSL_INFO.match(ln)]
    return "\n".join(lines[-keep:])


def tfmot_step_times(x, y, cfg, quick):
    """Run `tfmot_worker` in a subprocess with `TF_USE_LEGACY_KERAS=1`; its result dict."""
    with tempfile.TemporaryDirectory(prefix="kq_bench_qat_") as tmp:
        data_path = os.path.join(tmp, "data.npz")
        n = (max(cfg["time_steps"], cfg["time_warmup"], DATA_BATCHES) + 1) * BATCH
        np.savez(data_path, x=x[:n], y=y[:n])
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "tfmot", "--data", data_path]
        if quick:
            cmd.append("--quick")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg["tfmot_timeout"])
        except subprocess.TimeoutExpired as e:
            return {"error": f"TF-MOT subprocess timed out after {e.timeout} s", "stage": "subprocess"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_MARK)]
    if proc.returncode != 0 or not lines:
        return {"error": f"TF-MOT subprocess exited with {proc.returncode}:\n{_clean_log(proc.stderr)}",
                "stage": "subprocess"}
    return json.loads(lines[-1][len(JSON_MARK):])


# Step-time rows ------------------------------------------------------------------------
def step_rows(kq_times, tfmot):
    """Headline rows (ratios) and a detail table from both sides' timings."""
    tf_times = tfmot.get("times", {})
    tf_err = tfmot.get("error")

    rows = []
    for key, series, measure in (("step_s", "step_cycle_s", "train step (interleaved)"),
                                 ("train_on_batch_s", "tob_cycle_s", "train_on_batch (interleaved)"),
                                 ("fit_step_s", "fit_round_s", "fit step (rounds)")):
        tf_ratio = paired_ratio(tf_times, "tfmot_qat", series)
        tf_side = tf_times.get("tfmot_qat", {})
        rows.append({
            "case": "TF-MOT QAT (default 8-bit) / tf_keras float", "measure": measure, "ratio": tf_ratio,
            "qat_ms": tf_side[key] * 1e3 if key in tf_side else None,
            "float_ms": tf_times["float"][key] * 1e3 if key in tf_times.get("float", {}) else None,
            "target": None, "met": None, "error": tf_err or tf_side.get("error"),
        })
        for label in ("W8A8", "W8A8+LSQ"):
            side = kq_times.get(label, {})
            r = paired_ratio(kq_times, label, series)
            rows.append({
                "case": f"keras_quant QAT {label} / Keras 3 float", "measure": measure, "ratio": r,
                "qat_ms": side[key] * 1e3 if key in side else None,
                "float_ms": kq_times["float"][key] * 1e3 if key in kq_times.get("float", {}) else None,
                "target": "<= TF-MOT ratio",
                "met": (r <= tf_ratio) if r is not None and tf_ratio is not None else None,
                "error": side.get("error"),
            })
    detail = []
    for side, times in (("keras_quant / Keras 3", kq_times), ("TF-MOT / tf_keras", tf_times)):
        ref = times.get("float", {})
        for label, t in times.items():
            rounds = [a / b for a, b in zip(t.get("fit_round_s") or [], ref.get("fit_round_s") or [])]
            paired = [a / b for a, b in zip(t.get("step_cycle_s") or [], ref.get("step_cycle_s") or [])]
            spread = (f"{np.percentile(paired, 25):.2f} / {np.percentile(paired, 75):.2f}"
                      if paired and label != "float" else None)
            detail.append({"side": side, "model": label, "step_ms": _ms(t.get("step_s")),
                           "steps_timed": len(t.get("step_cycle_s") or []) or None, "step_ratio_q1_q3": spread,
                           "train_on_batch_ms": _ms(t.get("train_on_batch_s")), "fit_step_ms": _ms(t.get("fit_step_s")),
                           "fit_ratio_per_round": " ".join(f"{r:.2f}" for r in rounds) if label != "float" else None,
                           "jit_compile": t.get("jit_compile"), "error": t.get("error")})
    k_float, t_float = kq_times.get("float", {}).get("step_s"), tf_times.get("float", {}).get("step_s")
    if k_float and t_float:
        detail.append({"side": "cross-process", "model": "Keras 3 float / tf_keras float (train step ratio)",
                       "error": None, "ratio": k_float / t_float})
    return rows, detail


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


# Accuracy ------------------------------------------------------------------------------
def evaluate(model, x, y):
    """Test accuracy."""
    return float(model.evaluate(x, y, batch_size=EVAL_BATCH, verbose=0, return_dict=True)["accuracy"])


def finetune(keras_module, model, x, y):
    """One pass of Adam at `QAT_LR` over `(x, y)`, shuffled with the fixed seed; seconds taken."""
    keras_module.utils.set_random_seed(SEED)
    compile_model(keras_module, model, QAT_LR)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
    return time.perf_counter() - start


def accuracy_rows(x, y, x_test, y_test, cfg):
    """Train the float CNN, then PTQ / QAT / QAT+LSQ per scheme; rows and the float train accuracy."""
    import keras
    import keras_quant as kq

    model = compile_model(keras, build_model(keras, x.shape[1:]), TRAIN_LR)
    hist = model.fit(x, y, batch_size=BATCH, epochs=cfg["epochs"], shuffle=True, verbose=0)
    float_acc = evaluate(model, x_test, y_test)
    n_ft = len(x) if cfg["finetune_steps"] is None else min(len(x), cfg["finetune_steps"] * BATCH)
    x_ft, y_ft = x[:n_ft], y[:n_ft]
    x_calib = x[-cfg["calib"]:]

    control = keras.models.clone_model(model)
    control.set_weights(model.get_weights())
    ft_s = finetune(keras, control, x_ft, y_ft)
    rows = [
        {"scheme": "float", "method": "float", "accuracy": float_acc, "drop_vs_float": 0.0},
        {"scheme": "float", "method": "float fine-tuned (control)", "accuracy": evaluate(control, x_test, y_test),
         "finetune_s": ft_s},
    ]
    rows[1]["drop_vs_float"] = float_acc - rows[1]["accuracy"]
    has_qat = qat_available()
    for name, config in schemes().items():
        ptq_acc, result = None, None
        try:
            # One calibration per scheme serves PTQ, QAT and QAT+LSQ: same specs and observer.
            result = calibrate(model, config, x_calib)
            q = kq.quantize_model(model, config, calibration=result)
            ptq_acc = evaluate(q, x_test, y_test)
            rows.append({"scheme": name, "method": "PTQ", "accuracy": ptq_acc, "drop_vs_float": float_acc - ptq_acc})
        except Exception as e:  # noqa: BLE001 - record and go on
            rows.append({"scheme": name, "method": "PTQ", "error": _error_text(e)})
        for method, cfg_q in (("QAT", config), ("QAT+LSQ", learnable(config))):
            if not has_qat or result is None:
                reason = "keras_quant has no mode='qat' yet" if not has_qat else "calibration failed (see PTQ)"
                rows.append({"scheme": name, "method": method, "error": reason})
                continue
            try:
                qat = kq.quantize_model(model, cfg_q, mode="qat", calibration=result)
                seconds = finetune(keras, qat, x_ft, y_ft)
                acc = evaluate(qat, x_test, y_test)
                rows.append({"scheme": name, "method": method, "accuracy": acc, "drop_vs_float": float_acc - acc,
                             "gain_vs_ptq": None if ptq_acc is None else acc - ptq_acc, "finetune_s": seconds})
            except Exception as e:  # noqa: BLE001
                rows.append({"scheme": name, "method": method, "error": _error_text(e),
                             "traceback": traceback.format_exc(limit=6)})
    train_acc = float(hist.history["accuracy"][-1])
    return rows, {"float_train_accuracy": train_acc, "finetune_samples": n_ft, "calib_samples": len(x_calib)}


# Entry point ---------------------------------------------------------------------------
def _tracebacks(rows):
    """Pop the `traceback` entries of rows (kept for the notes, too long for a table)."""
    return [f"{r.get('scheme', r.get('model', ''))} {r.get('method', '')}: {r.pop('traceback')}"
            for r in rows if r.get("traceback")]


def run(quick: bool, parts=("timing", "tfmot", "accuracy")) -> dict:
    """Run the benchmark.

    Args:
        quick: Small sizes (well under 3 minutes) instead of the full run.
        parts: Which parts to run: `"timing"` (keras_quant vs Keras 3 float step
            time), `"tfmot"` (the TF-MOT subprocess), `"accuracy"`.

    Returns:
        The runner's dict: `rows` (step-time ratios), `tables`, `notes`.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("bench_qat needs KERAS_BACKEND=tensorflow (CalibrationCallback hooks TF's trainer)")
    cfg = QUICK if quick else FULL
    x, y, x_test, y_test, data_name = load_data(cfg["train"], cfg["test"])
    kq_times = {"float": {}}
    tfmot = {"error": "not run", "stage": "skipped"}
    seconds = {}
    start = time.perf_counter()
    if "timing" in parts:
        kq_times = kq_step_times(x, y, cfg)
        seconds["keras_quant timing"] = time.perf_counter() - start
    start = time.perf_counter()
    if "tfmot" in parts:
        tfmot = tfmot_step_times(x, y, cfg, quick)
        seconds["TF-MOT subprocess"] = time.perf_counter() - start
    rows, detail = step_rows(kq_times, tfmot)
    notes, tables = [], {}
    if data_name != "fashion_mnist":
        notes.append("WARNING: Fashion-MNIST not installed (Debian's dataset-fashion-mnist); used scikit-learn's "
                     "8x8 digits instead.")
    tb = [f"{label}: {t.pop('traceback')}" for label, t in kq_times.items() if t.get("traceback")]
    if "accuracy" in parts:
        start = time.perf_counter()
        acc, info = accuracy_rows(x, y, x_test, y_test, cfg)
        seconds["accuracy"] = time.perf_counter() - start
        tb += _tracebacks(acc)
        tables["Accuracy: float, PTQ, QAT, QAT+LSQ"] = acc
        ft = "one epoch" if cfg["finetune_steps"] is None else f"{info['finetune_samples'] // BATCH} steps"
        notes.append(
            f"accuracy: float CNN trained {cfg['epochs']} epochs on {len(x)} {data_name} images (Adam {TRAIN_LR}, "
            f"batch {BATCH}, seed {SEED}; train accuracy {info['float_train_accuracy']:.3f}), test accuracy on "
            f"{len(x_test)} test images. PTQ: CalibrationCallback(config) (min-max) on {info['calib_samples']} "
            f"training images + quantize_model. QAT / QAT+LSQ: quantize_model(mode='qat') from the same "
            f"calibration result (the LSQ specs differ only in learnable=True), fine-tuned {ft} "
            f"({info['finetune_samples']} images) with Adam({QAT_LR}) (finetune_s: its wall time, trace included). "
            f"The control row fine-tunes the float model the same way. "
            f"drop_vs_float = float - method (fraction), gain_vs_ptq = method - PTQ.")
    tables["Step times (per side)"] = detail
    tf_versions = tfmot.get("versions", {})
    notes += [
        f"step time: batch {BATCH}, same images on both sides, Adam({TRAIN_LR}) everywhere, after a warm-up fit of "
        f"{cfg['time_warmup'] + 1} steps and {cfg['time_warmup']} train_on_batch calls per model. train step: "
        f"model.train_function on a tf.data iterator (what fit runs per step, without callbacks), the models "
        f"alternating step by step, {cfg['step_cycles']} timed steps each; train_on_batch: alternating call by call, "
        f"{cfg['tob_calls']} calls each, one fixed batch; fit step: intervals between on_train_batch_end calls in "
        f"{cfg['rounds']} rounds of one {cfg['time_steps'] + 1}-step fit per model (first step left out). Order "
        "reversed every other turn. ratio = median over turns of (QAT time / float time of the same turn); qat_ms / "
        "float_ms = plain medians. The train step is the headline: its turns are a step each, so many and close "
        "together; the fit-step figure rests on a few rounds and is the noisiest. Ratios are taken within one "
        "process; the cross-process row compares the two float baselines (different times, noisy). "
        "step_ratio_q1_q3: quartiles of the per-step ratios (the spread).",
        "keras_quant side: Keras 3 float CNN vs kq.quantize_model(float, config, mode='qat', calibration=...) with "
        f"W8A8 = QuantConfig.int8() and W8A8+LSQ = the same specs with learnable=True, calibrated on {TIMING_CALIB} "
        "images. TF-MOT side (subprocess, TF_USE_LEGACY_KERAS=1): the identical CNN built with tf_keras vs "
        "tfmot.quantization.keras.quantize_model of it (default 8-bit scheme). Target from the issue: keras_quant "
        "ratio <= TF-MOT ratio (column met).",
        f"TF-MOT versions: {tf_versions or 'unknown'}; install: {TFMOT_INSTALL}",
        "schemes: W8A8 = QuantConfig.int8(); W4A8 = QuantConfig.w4a8() (4-bit per-channel symmetric narrow-range "
        "weights); W4A4 = W4A8's weight spec with QuantSpec(bits=4) activations (per-tensor asymmetric); LSQ = "
        "the same specs with learnable=True.",
    ]
    if tfmot.get("error"):
        notes.append(f"TF-MOT not measured ({tfmot.get('stage')}): {tfmot['error']}")
    notes.append("parts took " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    notes += [f"traceback {t}" for t in tb]
    return {"rows": rows, "tables": tables, "notes": notes, "dataset": data_name,
            "backend": keras.backend.backend()}


def main(argv=None):
    """Command line: run parts of the benchmark and print tables, or act as the TF-MOT worker."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--part", nargs="+", default=["all"], choices=["all", "timing", "tfmot", "accuracy"])
    parser.add_argument("--worker", choices=["tfmot"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.worker == "tfmot":
        result = tfmot_worker(args.data, cfg)
        print(JSON_MARK + json.dumps(result), flush=True)
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(here) not in sys.path:  # measure this checkout's keras_quant
        sys.path.insert(0, os.path.dirname(here))
    from keras_quant.formatting import result_text

    parts = ("timing", "tfmot", "accuracy") if "all" in args.part else tuple(args.part)
    result = run(args.quick, parts=parts)
    print(result_text(result, "Step-time ratios"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
