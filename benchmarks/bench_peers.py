"""keras_quant against the peers: the same data, float models and runtimes, side by side.

    python benchmarks/run.py --only peers [--quick]     # as part of the benchmark report
    python benchmarks/bench_peers.py [--quick]           # on its own (prints the tables)

Data: Fashion-MNIST (Debian's `dataset-fashion-mnist`, 60k train / 10k test) and scikit-learn's
digits (1,348 / 449; `--quick`: digits only). Fashion-MNIST is left out, with a note, when it is not
installed. Models, each built by one function from Keras 3 or `tf_keras` (so TF-MOT gets the
identical architecture and the very same float weights):

- `cnn`: Conv2D(16)+BN+ReLU, MaxPool, Conv2D(32)+BN+ReLU, MaxPool, Flatten, Dense(10);
- `mobilenet`: a depthwise-separable, MobileNet-style net: Conv2D(16)+BN+ReLU6 (stride 2 on
  28x28 inputs), three blocks of DepthwiseConv2D(3)+BN+ReLU6, 1x1 Conv2D+BN+ReLU6 (32 / 64 / 64
  channels, strides 2 / 2 / 1), GlobalAveragePooling, Dense(10). Depthwise kernels differ by
  orders of magnitude between channels: hard to quantize per tensor;
- `mlp`: Flatten, Dense(256, relu), Dense(128, relu), Dense(10).

Float training: Adam 1e-3, batch 64, BatchNorm momentum 0.9, seed 0. The calibration images are
the last `calib` training images, the same for every contender. Contenders, each written as a
file and evaluated in its runtime (LiteRT's interpreter with XNNPACK, onnxruntime's CPU provider,
Keras for `.keras` files), batch 1, one thread:

- `float32`: the TFLite converter on the float model (the size / latency baseline);
- `tflite_converter`: the converter's own full-integer PTQ (`Optimize.DEFAULT`,
  `representative_dataset` of the calibration images, `TFLITE_BUILTINS_INT8`, int8 I/O). W8A8;
- `kq_ptq_<observer>` for minmax, percentile, mse, kl, auto: one `kq.CalibrationCallback` pass
  over the calibration images (`statistics="full"`: every observer's range comes from the same
  pass), `kq.quantize_model` with that activation observer, `kq.export_tflite(mode="int8")`.
  W8A8, W4A8, W4A4 (per-channel symmetric weights, per-tensor asymmetric activations; 4-bit
  values stored in int8 on their grid);
- `kq_ptq_algos`: `kq.ptq.quantize` with the post-training algorithm stack of each scheme
  (`ALGO_STACKS`: GPTQ and bias correction), observer `auto`, from the same calibration pass
  (recalibrated after equalization when a stack has it), exported as int8 TFLite. W4A8, W4A4;
- `keras_quantize`: Keras' own `model.quantize("int8")` (W8A8: int8 weights, activations
  quantized on the fly) and `"int4"` (W4A8), saved as `.keras`. It quantizes Dense layers only;
  convolutions stay float;
- `ort_<method>` for MinMax, Entropy, Percentile: `onnxruntime.quantization.quantize_static` (QDQ,
  per channel, uint8 activations) on the float ONNX export (tf2onnx of the float32 TFLite file,
  opset 21, `quant_pre_process`), with the same calibration images. W8A8 (uint8 weights: its int8
  weights saturate on x86 CPUs without VNNI, as this exporter's note says), W4A8 (int4 weights),
  W4A4 (uint4 activations: onnxruntime rejects uint4 tensors into MaxPool, recorded as an error);
- `kq_qat` and `kq_qat_lsq`: `kq.quantize_model(mode="qat")` from the minmax calibration
  (`learnable=True`: LSQ step sizes), fine-tuned with Adam 1e-4 on the same images and steps,
  exported as int8 TFLite. W8A8, W4A8, W4A4;
- `tfmot_qat`: TF-MOT's `quantize_model` (default 8-bit scheme) of the `tf_keras` twin holding the
  same float weights, fine-tuned the same way, converted by the TFLite converter (int8 I/O). W8A8.
  It runs in a subprocess (`TF_USE_LEGACY_KERAS=1`); install it with the `bench` extra
  (`pip install --no-deps tf-keras==2.21.0 tensorflow-model-optimization==0.8.1 dm-tree==0.1.10`).
  Without it its rows carry the import error.

Figures per file: test accuracy and its drop from the Keras float model (points), file size,
batch-1 latency (`Runner.latency`, the files of one model taking turns in rounds, each ratio the
median over rounds of the per-round ratio), the time from the float model to the file
(calibration included), peak RSS growth while producing it (psutil, sampled every 5 ms; the
allocator keeps memory, so later contenders in one process read low), and for QAT the fine-tuning
step time over the float fine-tuning's (the control that also shows what extra training gives).
The headline columns are ratios to the TFLite converter's own int8 file of the same model.

Targets (reported, not asserted): kq W8A8 PTQ drop at most the converter's on every model; kq W4A8
PTQ drop at most half of onnxruntime MinMax's (also for `kq_ptq_algos`, and within 1.0 point of float
on the Fashion MobileNet); `kq_ptq_algos` W4A4 within 3 points; kq QAT W8A8 within 0.3 points of
float; W4A4 QAT with LSQ within 2 points and at most plain QAT's drop; W4A4 files within 1.2x the
converter's int8 latency; latency and size of kq's int8 file within 5% of the converter's.

`--only GROUP ...` makes only some contender groups (`GROUPS`; the float file and the converter's
int8 file always), `--datasets` picks datasets: e.g. `--only kq_ptq_algos ort --datasets digits`.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the sibling benchmarks' helpers
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:  # this checkout's keras_quant
    sys.path.insert(0, os.path.dirname(HERE))

SEED = 0
BATCH = 64
BN_MOMENTUM = 0.9
TRAIN_LR = 1e-3
QAT_LR = 1e-4
MODELS = ("cnn", "mobilenet", "mlp")
OBSERVERS = ("minmax", "percentile", "mse", "kl", "auto")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
SCHEMES = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
KQ_HEADLINE = "kq_ptq_auto"  # the kq PTQ contender the targets judge (minmax is reported beside it)
# kq_ptq_algos: `kq.ptq.quantize` with the post-training algorithm stack of each scheme (observer "auto").
# GPTQ + bias correction: on the six models (2026-12-05) as accurate as AdaRound's stack or better at a tenth of
# its time; equalization changed no figure with per-channel weights (benchmarks/results/2026-12-05-4bit.md).
ALGO_STACKS = {"W4A8": ("gptq", "bias_correction"), "W4A4": ("gptq", "bias_correction")}
ALGO_OPTIONS = {"adaround": {"time_budget": 240}}
# Per dataset: float training epochs, fine-tuning samples and epochs (QAT and the float control).
QAT_VARIANTS = tuple((scheme, lsq) for scheme in SCHEMES for lsq in (False, True))
# --quick: digits only, the default and the automatic observer, the QAT variants the targets judge.
QUICK = {"datasets": ("digits",), "calib": 300, "epochs": {"digits": 20}, "observers": ("minmax", "auto"),
         "qat": (("W8A8", False), ("W4A4", True)),
         "finetune": {"digits": (None, 2)}, "rounds": 3, "round_s": 0.02, "warmup": 3,
         "tfmot_timeout": 600}
FULL = {"datasets": ("fashion_mnist", "digits"), "calib": 1000, "epochs": {"fashion_mnist": 4, "digits": 40},
        "observers": OBSERVERS, "qat": QAT_VARIANTS,
        "finetune": {"fashion_mnist": (32000, 1), "digits": (None, 5)}, "rounds": 11, "round_s": 0.08,
        "warmup": 5, "tfmot_timeout": 2400}
TARGETS = {"qat_w8a8_pts": 0.3, "lsq_w4a4_pts": 2.0, "latency": 1.05, "size": 1.05, "algo_w4a4_pts": 3.0,
           "algo_w4a8_fashion_mobilenet_pts": 1.0, "w4a4_latency": 1.2, "int4_size": 0.6}


# Data and models -----------------------------------------------------------------------
def load_dataset(name):
    """`(x_train, y_train, x_test, y_test)` as float32 images in [0, 1] with a channel axis."""
    from keras_quant.cli import datasets

    if name == "digits":
        (x, y), (xt, yt) = datasets.load_digits()
    else:
        (x, y), (xt, yt) = datasets.load_fashion_mnist()
    return x, y, xt, yt


def available_datasets(names):
    """`(names that can run, notes on those that cannot)`."""
    from keras_quant.cli import datasets

    keep, notes = [], []
    for name in names:
        if name == "fashion_mnist" and not datasets.fashion_mnist_available():
            notes.append("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist): left out")
            continue
        keep.append(name)
    return keep, notes


def build_model(keras_module, kind, input_shape):
    """One of `MODELS`, from Keras 3 (`keras`) or `tf_keras`, seeded and uncompiled."""
    L = keras_module.layers
    keras_module.utils.set_random_seed(SEED)

    def conv_bn(filters, kernel, strides=1, relu=None):
        return [L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False),
                L.BatchNormalization(momentum=BN_MOMENTUM), L.ReLU(relu)]

    if kind == "cnn":
        body = conv_bn(16, 3) + [L.MaxPooling2D()] + conv_bn(32, 3) + [L.MaxPooling2D(), L.Flatten(), L.Dense(10)]
    elif kind == "mobilenet":
        body = conv_bn(16, 3, strides=2 if input_shape[0] >= 16 else 1, relu=6.0)
        for filters, strides in ((32, 2), (64, 2), (64, 1)):
            body += [L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False),
                     L.BatchNormalization(momentum=BN_MOMENTUM), L.ReLU(6.0)]
            body += conv_bn(filters, 1, relu=6.0)
        body += [L.GlobalAveragePooling2D(), L.Dense(10)]
    elif kind == "mlp":
        body = [L.Flatten(), L.Dense(256, activation="relu"), L.Dense(128, activation="relu"), L.Dense(10)]
    else:
        raise ValueError(f"unknown model {kind!r}; expected one of {MODELS}")
    return keras_module.Sequential([keras_module.Input(tuple(input_shape))] + body, name=f"peers_{kind}")


def compile_model(keras_module, model, lr):
    model.compile(optimizer=keras_module.optimizers.Adam(learning_rate=lr),
                  loss=keras_module.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def finetune_data(x, y, setting):
    """The images every fine-tuning sees (QAT, TF-MOT, the float control) and its epochs."""
    n, epochs = setting
    n = len(x) if n is None else min(n, len(x))
    return x[:n], y[:n], epochs


def median_step(timer, skip=3):
    """Median step seconds of a `bench_qat` step timer, the first `skip` steps (the trace) left out."""
    steps = np.diff(timer.ends)[skip:]
    return float(np.median(steps)) if len(steps) else None


def finetune(keras_module, model, x, y, epochs):
    """Adam at `QAT_LR`, batch 64, seeded shuffle; `(seconds, median step seconds)`."""
    keras_module.utils.set_random_seed(SEED)
    compile_model(keras_module, model, QAT_LR)
    import bench_qat

    timer = bench_qat._step_timer(keras_module)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0, callbacks=[timer])
    return time.perf_counter() - start, median_step(timer)


def _error_text(exc, limit=300):
    return f"{type(exc).__name__}: {exc}"[:limit].replace("\n", " ")


def peak_rss():
    import bench_calibration

    return bench_calibration.PeakRSS(collect=False)


# Contenders ----------------------------------------------------------------------------
class Artifact(dict):
    """One contender's file and how it was made: contender, scheme, path, seconds, peak_mb, ..."""


def kq_config(observer, scheme, lsq=False):
    """keras_quant's specs for `scheme` and `observer`: per-channel symmetric narrow weights, per-tensor asymmetric activations."""
    import keras_quant as kq

    wbits, abits = SCHEMES[scheme]
    # The observer applies to the weights too: mse / auto search each channel's clipping range
    # (`kq.ops.weight_range`); minmax, percentile and kl take the weights' min-max.
    weights = kq.QuantSpec(bits=wbits, symmetric=True, granularity="per_channel", narrow_range=True,
                           observer=observer, learnable=lsq)
    return kq.QuantConfig(weights=weights, activations=kq.QuantSpec(bits=abits, observer=observer, learnable=lsq))


def converter_int8(model, x_calib, path):
    """The TFLite converter's own full-integer PTQ of the float model (as bench_export makes it)."""
    import bench_export

    from keras_quant.io import write_atomic

    data = bench_export.converter_int8_bytes(bench_export._concrete_function(model), x_calib)
    write_atomic(path, data)


def float_tflite(model, path):
    import tensorflow as tf

    import bench_export

    from keras_quant.io import write_atomic

    data = tf.lite.TFLiteConverter.from_concrete_functions([bench_export._concrete_function(model)]).convert()
    write_atomic(path, data)


def float_onnx(tflite_path, path):
    """tf2onnx of the float32 TFLite file (opset 18, raised to 21 for int4), then `quant_pre_process`."""
    import onnx
    import tf2onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=18)
    proto = version_converter.convert_version(proto, 21)
    raw = path + ".raw.onnx"
    onnx.save(proto, raw)
    quant_pre_process(raw, path)
    os.remove(raw)
    return proto.graph.input[0].name


def ort_quantize(onnx_path, input_name, x_calib, method, scheme, path):
    """onnxruntime's `quantize_static` (QDQ, per channel) with `method` calibration."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    wbits, abits = SCHEMES[scheme]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(x_calib):
                return None
            self.i += 1
            return {input_name: x_calib[self.i - 1 : self.i]}

    with contextlib.redirect_stdout(io.StringIO()):  # its calibrators print progress
        quantize_static(onnx_path, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QUInt8 if wbits == 8 else QuantType.QInt4,
                        activation_type=QuantType.QUInt8 if abits == 8 else QuantType.QUInt4,
                        calibrate_method=getattr(CalibrationMethod, method))
    import onnxruntime as ort

    ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # fails here for what it cannot run


def keras_quantize(model, mode, path):
    """Keras' own `model.quantize(mode)` of a copy of the float model, saved as `.keras`."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    with warnings.catch_warnings():  # "layer X does not support quantization" for every Conv
        warnings.simplefilter("ignore")
        clone.quantize(mode)
    clone.save(path)


def _timed(artifacts, fn, contender, scheme, path, runtime, extra_seconds=0.0, extra_peak=0.0, **info):
    """Run `fn(path)`, timing it and its peak RSS growth; append an `Artifact` (with the error on failure)."""
    art = Artifact(contender=contender, scheme=scheme, path=path, runtime=runtime, **info)
    try:
        with peak_rss() as mem:
            start = time.perf_counter()
            fn(path)
            art["seconds"] = time.perf_counter() - start + extra_seconds
        art["peak_mb"] = max((mem.peak - mem.start) / 2**20, extra_peak)
    except Exception as e:  # noqa: BLE001 - recorded in its row; the others go on
        art["error"] = _error_text(e)
    artifacts.append(art)
    return art


def kq_ptq_artifacts(model, x_calib, folder, artifacts, observers=None):
    """`kq_ptq_<observer>` for every observer and scheme, from one calibration pass; its result."""
    import keras_quant as kq

    with peak_rss() as mem:
        start = time.perf_counter()
        cb = kq.CalibrationCallback(kq.QuantConfig.int8())
        model.predict(x_calib, batch_size=BATCH, verbose=0, callbacks=[cb])
        result = cb.result
        calib_s = time.perf_counter() - start
    calib_mb = (mem.peak - mem.start) / 2**20
    for observer in OBSERVERS if observers is None else observers:
        for scheme in SCHEMES:
            config = kq_config(observer, scheme)

            def make(path, config=config):
                kq.export_tflite(kq.quantize_model(model, config, calibration=result), path, mode="int8")

            _timed(artifacts, make, f"kq_ptq_{observer}", scheme,
                   os.path.join(folder, f"kq_ptq_{observer}_{scheme}.tflite"), "litert",
                   extra_seconds=calib_s, extra_peak=calib_mb, calibration_s=calib_s)
    return result


def kq_algo_artifacts(model, x_calib, result, folder, artifacts, stacks=None):
    """`kq_ptq_algos`: `kq.ptq.quantize` with each scheme's algorithm stack (`ALGO_STACKS`), exported as int8."""
    import keras_quant as kq

    for scheme, algorithms in (stacks or ALGO_STACKS).items():
        config = kq_config("auto", scheme)
        info = {}

        def make(path, config=config, algorithms=algorithms, info=info):
            options = {k: v for k, v in ALGO_OPTIONS.items() if k in algorithms}
            qmodel = kq.ptq.quantize(model, x_calib, config, algorithms=algorithms, calibration=result,
                                     max_samples=len(x_calib), options=options, progress=False)
            kq.export_tflite(qmodel, path, mode="int8")
            info["algorithm_s"] = {n: round(s, 2) for n, _, s in qmodel.ptq_report.steps}

        art = _timed(artifacts, make, "kq_ptq_algos", scheme, os.path.join(folder, f"kq_ptq_algos_{scheme}.tflite"),
                     "litert", algorithms="+".join(algorithms))
        art.update(info)


def float_control(model, x_ft, y_ft, epochs, path):
    """The float model fine-tuned like the QAT models: what extra training alone gives, and the step-time reference."""
    import keras

    control = keras.models.clone_model(model)
    control.set_weights(model.get_weights())
    ft_s, step_s = finetune(keras, control, x_ft, y_ft, epochs)
    control.save(path)
    return Artifact(contender="float_finetuned", scheme="float", path=path, runtime="keras", step_s=step_s,
                    finetune_s=ft_s)


def kq_qat_artifacts(model, result, x_ft, y_ft, epochs, folder, artifacts, variants=QAT_VARIANTS):
    import keras
    import keras_quant as kq

    for scheme, lsq in variants:
        name = "kq_qat_lsq" if lsq else "kq_qat"
        steps = {}

        def make(path, scheme=scheme, lsq=lsq, steps=steps):
            qat = kq.quantize_model(model, kq_config("minmax", scheme, lsq), mode="qat", calibration=result)
            steps["finetune_s"], steps["step_s"] = finetune(keras, qat, x_ft, y_ft, epochs)
            kq.export_tflite(qat, path, mode="int8")

        art = _timed(artifacts, make, name, scheme, os.path.join(folder, f"{name}_{scheme}.tflite"), "litert")
        art.update(steps)


def ort_artifacts(float_path, x_calib, folder, artifacts):
    onnx_path = os.path.join(folder, "float.onnx")
    start = time.perf_counter()
    try:
        input_name = float_onnx(float_path, onnx_path)
    except Exception as e:  # noqa: BLE001
        for method in ORT_METHODS:
            for scheme in SCHEMES:
                artifacts.append(Artifact(contender=f"ort_{method.lower()}", scheme=scheme, runtime="onnxruntime",
                                          error=f"float ONNX export failed: {_error_text(e)}"))
        return
    export_s = time.perf_counter() - start
    for method in ORT_METHODS:
        for scheme in SCHEMES:
            _timed(artifacts, lambda p, m=method, s=scheme: ort_quantize(onnx_path, input_name, x_calib, m, s, p),
                   f"ort_{method.lower()}", scheme, os.path.join(folder, f"ort_{method.lower()}_{scheme}.onnx"),
                   "onnxruntime", extra_seconds=export_s)


# TF-MOT (subprocess) ------------------------------------------------------------------------
def tfmot_worker(job_path):
    """Runs with `TF_USE_LEGACY_KERAS=1`: TF-MOT QAT of each model's `tf_keras` twin; a JSON-able dict.

    The job (.npz) holds the fine-tuning images, the epochs, a check batch with the Keras 3 float
    model's logits, and each model's float weights (`<kind>/<i>`); files go to its `folder`.
    """
    import bench_qat

    versions = {d: bench_qat._version(d) for d in ("tf-keras", "tensorflow-model-optimization", "dm-tree")}
    try:
        import tensorflow as tf
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return {"error": _error_text(e, 600), "stage": "import", "versions": versions}
    job = np.load(job_path)
    folder = str(job["folder"])
    x_ft, y_ft, epochs = job["x_ft"], job["y_ft"], int(job["epochs"])
    out = {"versions": versions, "models": {}}
    for kind in [str(k) for k in job["models"]]:
        res = out["models"][kind] = {}
        try:
            weights = [job[f"{kind}/{i}"] for i in range(int(job[f"{kind}/n"]))]

            def twin():
                m = build_model(tf_keras, kind, x_ft.shape[1:])
                m.set_weights(weights)
                return m

            float_model = twin()
            res["float_max_abs_diff"] = float(np.max(np.abs(float_model.predict(job["x_check"], verbose=0)
                                                             - job[f"{kind}/logits"])))
            _, res["float_step_s"] = finetune(tf_keras, float_model, x_ft, y_ft, epochs)
            with peak_rss() as mem:
                start = time.perf_counter()
                qat = tfmot.quantization.keras.quantize_model(twin())
                res["finetune_s"], res["step_s"] = finetune(tf_keras, qat, x_ft, y_ft, epochs)
                conv = tf.lite.TFLiteConverter.from_keras_model(qat)
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
                conv.inference_input_type = tf.int8
                conv.inference_output_type = tf.int8
                data = conv.convert()
                res["path"] = os.path.join(folder, f"tfmot_qat_{kind}.tflite")
                with open(res["path"], "wb") as f:  # plain write: this tf_keras process must not import keras_quant
                    f.write(data)
                res["seconds"] = time.perf_counter() - start
            res["peak_mb"] = (mem.peak - mem.start) / 2**20
        except Exception as e:  # noqa: BLE001
            res["error"] = _error_text(e, 600)
            res["traceback"] = traceback.format_exc(limit=6)
    return out


def run_tfmot(models, x_ft, y_ft, epochs, x_check, folder, timeout):
    """`tfmot_worker` in a subprocess; its dict, or `{"error": ...}`."""
    import bench_qat

    job = {"folder": folder, "x_ft": x_ft, "y_ft": y_ft, "epochs": epochs, "x_check": x_check,
           "models": np.array(list(models))}
    for kind, model in models.items():
        w = model.get_weights()
        job[f"{kind}/n"] = len(w)
        job.update({f"{kind}/{i}": a for i, a in enumerate(w)})
        job[f"{kind}/logits"] = model.predict(x_check, verbose=0)
    job_path = os.path.join(folder, "tfmot_job.npz")
    np.savez(job_path, **job)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job_path]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"TF-MOT subprocess timed out after {e.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(bench_qat.JSON_MARK)]
    if proc.returncode != 0 or not lines:
        return {"error": f"TF-MOT subprocess exited with {proc.returncode}: {bench_qat._clean_log(proc.stderr, 8)}"}
    return json.loads(lines[-1][len(bench_qat.JSON_MARK):])


# Measurement ---------------------------------------------------------------------------
def load_runner(path):
    from keras_quant import runtime

    return runtime.load(path, num_threads=1)


def accuracy(runner, x, y):
    return float(np.mean(np.argmax(runner.predict(x, batch_size=256), axis=-1) == y))


def measure(artifacts, x_test, y_test, cfg):
    """Accuracy, size and round-robin batch-1 latency of every artifact that has a file."""
    import bench_export

    runners = {}
    for i, art in enumerate(artifacts):
        if art.get("error"):
            continue
        try:
            runner = load_runner(art["path"])
            art["accuracy"] = accuracy(runner, x_test, y_test)
            art["size_bytes"] = os.path.getsize(art["path"])
            runners[i] = runner
        except Exception as e:  # noqa: BLE001
            art["error"] = f"evaluation: {_error_text(e)}"
    times, _ = bench_export.round_robin_latency(runners, x_test, cfg["rounds"], cfg["round_s"], cfg["warmup"],
                                                 min_runs=5, max_runs=1000)
    for i, series in times.items():
        artifacts[i]["latency_series"] = series
        artifacts[i]["latency_ms"] = 1000 * statistics.median(series)


def _ratio_series(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def rows_for_model(dataset, kind, float_acc, artifacts):
    """One row per artifact: figures and their ratios to the converter's int8 file of this model."""
    ref = next((a for a in artifacts if a["contender"] == "tflite_converter" and not a.get("error")), None)
    control = next((a for a in artifacts if a["contender"] == "float_finetuned"), None)
    rows = []
    for art in artifacts:
        row = {"dataset": dataset, "model": kind, "contender": art["contender"], "scheme": art["scheme"],
               "runtime": art["runtime"]}
        if art.get("error"):
            row["error"] = art["error"]
            rows.append(row)
            continue
        if "accuracy" in art:
            row["accuracy"] = art["accuracy"]
            row["drop_pts"] = 100 * (float_acc - art["accuracy"])
        if ref is not None and "accuracy" in art and "accuracy" in ref:
            row["drop_minus_converter_pts"] = row["drop_pts"] - 100 * (float_acc - ref["accuracy"])
        if "size_bytes" in art:
            row["size_kb"] = art["size_bytes"] / 1024
            if ref is not None and ref.get("size_bytes"):
                row["size_vs_converter"] = art["size_bytes"] / ref["size_bytes"]
        if "latency_series" in art:
            row["latency_ms"] = art["latency_ms"]
            if ref is not None and "latency_series" in ref:
                row["latency_vs_converter"] = _ratio_series(art["latency_series"], ref["latency_series"])
        if art.get("seconds") is not None:
            row["time_s"] = art["seconds"]
            if ref is not None and ref.get("seconds"):
                row["time_vs_converter"] = art["seconds"] / ref["seconds"]
        if art.get("peak_mb") is not None:
            row["peak_mb"] = art["peak_mb"]
        if art.get("step_s") and control is not None and control.get("step_s"):
            row["qat_step_ratio"] = art["step_s"] / control["step_s"]
        if art.get("float_step_s") and art.get("step_s"):  # TF-MOT: over its own tf_keras float step
            row["qat_step_ratio"] = art["step_s"] / art["float_step_s"]
        rows.append(row)
    return rows


def wanted(cfg, group):
    """Whether this run makes the contender group `group` (`--only`: all when not given)."""
    only = cfg.get("only")
    return not only or group in only


def run_model(dataset, kind, data, cfg, folder, log):
    """Train one float model and make, measure and tabulate every contender but TF-MOT's."""
    import keras

    x, y, xt, yt = data
    model = compile_model(keras, build_model(keras, kind, x.shape[1:]), TRAIN_LR)
    keras.utils.set_random_seed(SEED)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=cfg["epochs"][dataset], shuffle=True, verbose=0)
    train_s = time.perf_counter() - start
    float_acc = float(np.mean(np.argmax(model.predict(xt, batch_size=256, verbose=0), axis=-1) == yt))
    log(f"  [{dataset}/{kind}] float {float_acc:.4f} ({train_s:.0f} s)")
    x_calib = x[-cfg["calib"]:]
    x_ft, y_ft, epochs = finetune_data(x, y, cfg["finetune"][dataset])
    arts = []
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    phase = time.perf_counter()
    _timed(arts, lambda p: float_tflite(model, p), "float32", "float", path("float32.tflite"), "litert")
    _timed(arts, lambda p: converter_int8(model, x_calib, p), "tflite_converter", "W8A8",
           path("converter_int8.tflite"), "litert")
    result = kq_ptq_artifacts(model, x_calib, folder, arts, cfg["observers"] if wanted(cfg, "kq_ptq") else ())
    if wanted(cfg, "kq_ptq_algos"):
        kq_algo_artifacts(model, x_calib, result, folder, arts)
    for mode, scheme in (("int8", "W8A8"), ("int4", "W4A8")) if wanted(cfg, "keras_quantize") else ():
        _timed(arts, lambda p, m=mode: keras_quantize(model, m, p), "keras_quantize", scheme,
               path(f"keras_{mode}.keras"), "keras")
    if not arts[0].get("error") and wanted(cfg, "ort"):
        ort_artifacts(arts[0]["path"], x_calib, folder, arts)
    ptq_s, phase = time.perf_counter() - phase, time.perf_counter()
    log(f"  [{dataset}/{kind}] {len(arts)} PTQ files in {ptq_s:.0f} s; QAT fine-tuning ({len(x_ft)} images x "
        f"{epochs} epochs)")
    if wanted(cfg, "qat"):
        arts.append(float_control(model, x_ft, y_ft, epochs, path("float_finetuned.keras")))
        kq_qat_artifacts(model, result, x_ft, y_ft, epochs, folder, arts, cfg["qat"])
    qat_s = time.perf_counter() - phase
    log(f"  [{dataset}/{kind}] QAT files in {qat_s:.0f} s")
    return model, float_acc, arts, {"dataset": dataset, "model": kind, "params": model.count_params(),
                                    "float_accuracy": float_acc, "train_s": train_s, "ptq_files_s": ptq_s,
                                    "qat_files_s": qat_s, "train_images": len(x),
                                    "test_images": len(xt), "calib_images": len(x_calib),
                                    "finetune_images": len(x_ft), "finetune_epochs": epochs}


def run_tfmot_phase(models, data, dataset, cfg, folder, log):
    """TF-MOT's QAT of every model of `dataset` in a subprocess; its result dict."""
    x_ft, y_ft, epochs = finetune_data(data[0], data[1], cfg["finetune"][dataset])
    log(f"  [{dataset}] TF-MOT QAT (subprocess)")
    tf_folder = os.path.join(folder, dataset, "tfmot")
    os.makedirs(tf_folder)
    start = time.perf_counter()
    tfmot = run_tfmot(models, x_ft, y_ft, epochs, data[2][:64], tf_folder, cfg["tfmot_timeout"])
    log(f"  [{dataset}] TF-MOT done in {time.perf_counter() - start:.0f} s")
    return tfmot


def tfmot_artifacts(tfmot, kind):
    if tfmot.get("error"):
        return [Artifact(contender="tfmot_qat", scheme="W8A8", runtime="litert", error=tfmot["error"])]
    res = dict(tfmot["models"].get(kind, {"error": "not run"}))
    res.pop("traceback", None)
    return [Artifact(contender="tfmot_qat", scheme="W8A8", runtime="litert", **res)]


# Tables, targets, chart -----------------------------------------------------------------
def _find(rows, dataset, model, contender, scheme):
    return next((r for r in rows if (r["dataset"], r["model"], r["contender"], r["scheme"])
                 == (dataset, model, contender, scheme) and "accuracy" in r), None)


def _met(ok):
    return None if ok is None else ("met" if ok else "missed")


def target_rows(rows, float_rows):
    """The issue's targets per dataset / model, with the figures they compare."""
    out = []
    for f in float_rows:
        d, m = f["dataset"], f["model"]

        def drop(contender, scheme):
            r = _find(rows, d, m, contender, scheme)
            return None if r is None else r["drop_pts"]

        def add(target, value, reference, ok):
            out.append({"dataset": d, "model": m, "target": target, "value": value, "reference": reference,
                        "status": _met(ok)})

        conv = drop("tflite_converter", "W8A8")
        for contender in (KQ_HEADLINE, "kq_ptq_minmax"):
            kq8 = drop(contender, "W8A8")
            add(f"{contender} W8A8 drop <= converter's (pts)", kq8, conv,
                None if None in (kq8, conv) else kq8 <= conv + 1e-9)
        ort4 = drop("ort_minmax", "W4A8")
        for contender in (KQ_HEADLINE, "kq_ptq_minmax"):
            kq4 = drop(contender, "W4A8")
            add(f"{contender} W4A8 drop <= half of ort_minmax's (pts)", kq4, None if ort4 is None else ort4 / 2,
                None if None in (kq4, ort4) else kq4 <= max(ort4, 0.0) / 2 + 1e-9)
        for contender in ("kq_qat", "kq_qat_lsq"):
            q = drop(contender, "W8A8")
            add(f"{contender} W8A8 within {TARGETS['qat_w8a8_pts']} pts of float", q, TARGETS["qat_w8a8_pts"],
                None if q is None else q <= TARGETS["qat_w8a8_pts"])
        q = drop("kq_qat_lsq", "W4A4")
        add(f"kq_qat_lsq W4A4 within {TARGETS['lsq_w4a4_pts']} pts of float", q, TARGETS["lsq_w4a4_pts"],
            None if q is None else q <= TARGETS["lsq_w4a4_pts"])
        plain = drop("kq_qat", "W4A4")
        add("kq_qat_lsq W4A4 drop <= kq_qat's (pts)", q, plain, None if None in (q, plain) else q <= plain + 1e-9)
        out.extend(_algo_targets(d, m, drop, ort4))
        for contender in ("kq_ptq_algos", "kq_qat_lsq"):
            r = _find(rows, d, m, contender, "W4A4")
            v = None if r is None else r.get("latency_vs_converter")
            add(f"{contender} W4A4 latency / converter's int8", v, TARGETS["w4a4_latency"],
                None if v is None else v <= TARGETS["w4a4_latency"])
        r = _find(rows, d, m, KQ_HEADLINE, "W8A8")
        for key, what in (("latency_vs_converter", "latency"), ("size_vs_converter", "size")):
            v = None if r is None else r.get(key)
            add(f"{KQ_HEADLINE} W8A8 {what} / converter's", v, TARGETS[what],
                None if v is None else v <= TARGETS[what])
    return out


def _algo_targets(d, m, drop, ort4):
    """The post-training algorithm targets of one model (`drop(contender, scheme)` reads its drops)."""
    rows = []

    def add(target, value, reference, ok):
        rows.append({"dataset": d, "model": m, "target": target, "value": value, "reference": reference,
                     "status": _met(ok)})

    a8 = drop("kq_ptq_algos", "W4A8")
    add("kq_ptq_algos W4A8 drop <= half of ort_minmax's (pts)", a8, None if ort4 is None else ort4 / 2,
        None if None in (a8, ort4) else a8 <= max(ort4, 0.0) / 2 + 1e-9)
    if (d, m) == ("fashion_mnist", "mobilenet"):
        limit = TARGETS["algo_w4a8_fashion_mobilenet_pts"]
        add(f"kq_ptq_algos W4A8 within {limit} pts of float", a8, limit, None if a8 is None else a8 <= limit)
    a4 = drop("kq_ptq_algos", "W4A4")
    limit = TARGETS["algo_w4a4_pts"]
    add(f"kq_ptq_algos W4A4 within {limit} pts of float", a4, limit, None if a4 is None else a4 <= limit)
    return rows


RATIO_KEYS = ("drop_minus_converter_pts", "size_vs_converter", "latency_vs_converter", "time_vs_converter",
              "qat_step_ratio")


def ratio_rows(rows):
    """The headline: per contender and scheme, each ratio to the converter's file (and the drop
    over the converter's) as its median / min / max over the models it ran on."""
    out = []
    for contender, scheme in contender_order(rows):
        mine = [r for r in rows if (r["contender"], r["scheme"]) == (contender, scheme) and "accuracy" in r]
        row = {"contender": contender, "scheme": scheme, "models": len(mine)}
        for key in RATIO_KEYS:
            vals = [r[key] for r in mine if r.get(key) is not None]
            if vals:
                row[key] = f"{statistics.median(vals):.3g} ({min(vals):.3g} .. {max(vals):.3g})"
        out.append(row)
    return out


def contender_order(rows):
    seen = []
    for r in rows:
        key = (r["contender"], r["scheme"])
        if key not in seen:
            seen.append(key)
    return seen


def summary_rows(rows, float_rows):
    """Accuracy drop (points) of every contender and scheme (rows) on every dataset / model (columns)."""
    cols = [(f["dataset"], f["model"]) for f in float_rows]
    label = {c: f"{'fashion' if c[0] == 'fashion_mnist' else c[0]}/{c[1]}" for c in cols}
    out = [dict({"contender": "float accuracy", "scheme": ""},
                **{label[(f["dataset"], f["model"])]: f["float_accuracy"] for f in float_rows})]
    for contender, scheme in contender_order(rows):
        if contender == "float32":
            continue
        row = {"contender": contender, "scheme": scheme}
        for c in cols:
            r = next((r for r in rows if (r["dataset"], r["model"], r["contender"], r["scheme"])
                      == (c[0], c[1], contender, scheme)), None)
            row[label[c]] = None if r is None else (r.get("drop_pts") if "accuracy" in r else "error")
        out.append(row)
    return out


def drop_chart(rows, float_rows):
    """PNG bytes: accuracy drop per contender (bars) and scheme (colour), one panel per dataset / model.

    Every bar is labelled with its value; an `x` on the axis marks a scheme the contender ran
    and failed (its error is in the tables); no mark: the contender does not offer the scheme.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f["dataset"], f["model"]) for f in float_rows]
    contenders = [c for c in dict.fromkeys(r["contender"] for r in rows) if c not in ("float32", "float_finetuned")]
    schemes = list(SCHEMES)
    colors = {"W8A8": "#4c72b0", "W4A8": "#dd8452", "W4A4": "#c44e52"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 2.8 * len(panels) + 0.8), squeeze=False)
    width = 0.8 / len(schemes)
    for ax, (d, m) in zip(axes[:, 0], panels):
        heights = []
        for j, scheme in enumerate(schemes):
            xs, hs = [], []
            for i, c in enumerate(contenders):
                x = i + (j - (len(schemes) - 1) / 2) * width
                r = next((r for r in rows if (r["dataset"], r["model"], r["contender"], r["scheme"])
                          == (d, m, c, scheme)), None)
                if r is None:
                    continue
                if "drop_pts" not in r:
                    ax.plot([x], [0], marker="x", color=colors[scheme], markersize=5)
                    continue
                xs.append(x)
                hs.append(r["drop_pts"])
                ax.annotate(f"{r['drop_pts']:.2g}", (x, r["drop_pts"]), ha="center", fontsize=5,
                            va="bottom" if r["drop_pts"] >= 0 else "top", xytext=(0, 1 if r["drop_pts"] >= 0 else -1),
                            textcoords="offset points")
            ax.bar(xs, hs, width, color=colors[scheme], label=scheme)
            heights += hs
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_yscale("symlog", linthresh=1.0)
        low, high = min(heights + [0.0]), max(heights + [0.0])
        ax.set_ylim(min(-1.0, low * 1.6), max(2.0, high * 1.6))
        ax.set_title(f"{d} / {m}", fontsize=9)
        ax.set_ylabel("drop (points)", fontsize=8)
        ax.set_xticks(range(len(contenders)))
        ax.set_xticklabels(contenders, fontsize=7, rotation=15)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper right")
    fig.suptitle("Accuracy drop from float, points (symlog axis; x: the scheme failed; no bar: not offered)",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def chart_from_results(json_path, png_path):
    """Redraw the chart from a results file's `peers` entry (`run.py` output) into `png_path`."""
    from keras_quant.io import write_atomic

    with open(json_path) as f:
        peers = json.load(f)["benchmarks"]["peers"]
    tables = peers["tables"]
    write_atomic(png_path, drop_chart(tables["Every file"], tables["Float models"]))


def _strip(artifact_rows):
    for r in artifact_rows:
        r.pop("latency_series", None)
    return artifact_rows


# Entry point ---------------------------------------------------------------------------
GROUPS = ("kq_ptq", "kq_ptq_algos", "keras_quantize", "ort", "qat", "tfmot")


def run(quick: bool, log=None, only=None, datasets=None, qat_schemes=None) -> dict:
    """Run every contender (or the groups in `only`, from `GROUPS`) on every dataset (or `datasets`) and model.

    Returns:
        The runner's dict: `rows` (accuracy drop per contender and scheme on each model),
        `tables` (targets, every file's figures, the float models), `notes` and
        `figures` (`{"accuracy_drop": PNG bytes}`).
    """
    import keras

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if keras.backend.backend() != "tensorflow":
        return {"rows": [], "notes": ["peers needs the TensorFlow backend (TFLite conversion, TF-MOT); "
                                      f"skipped on {keras.backend.backend()}"]}
    cfg = dict(QUICK if quick else FULL, only=tuple(only or ()))
    if qat_schemes:
        cfg["qat"] = tuple(v for v in cfg["qat"] if v[0] in qat_schemes)
    names, notes = available_datasets(datasets or cfg["datasets"])
    rows, float_rows, tfmot_info = [], [], {}
    with tempfile.TemporaryDirectory(prefix="kq_bench_peers_") as folder:
        for dataset in names:
            data = load_dataset(dataset)
            models, per_model = {}, {}
            for kind in MODELS:
                sub = os.path.join(folder, dataset, kind)
                os.makedirs(sub)
                model, float_acc, arts, info = run_model(dataset, kind, data, cfg, sub, log)
                models[kind], per_model[kind] = model, (float_acc, arts)
                float_rows.append(info)
            tfmot = run_tfmot_phase(models, data, dataset, cfg, folder, log) if wanted(cfg, "tfmot") else None
            if tfmot is not None:
                tfmot_info[dataset] = {k: v for k, v in tfmot.items() if k != "models"}
            for kind in MODELS:
                float_acc, arts = per_model[kind]
                arts.extend(tfmot_artifacts(tfmot, kind) if tfmot is not None else [])
                start = time.perf_counter()
                measure(arts, data[2], data[3], cfg)
                info = next(f for f in float_rows if (f["dataset"], f["model"]) == (dataset, kind))
                info["measure_s"] = time.perf_counter() - start
                log(f"  [{dataset}/{kind}] measured {sum(not a.get('error') for a in arts)} files in "
                    f"{info['measure_s']:.0f} s")
                rows.extend(rows_for_model(dataset, kind, float_acc, arts))
                for a in arts:
                    if a["contender"] == "tfmot_qat" and a.get("float_max_abs_diff") is not None:
                        info["tf_keras_twin_max_abs_diff"] = a["float_max_abs_diff"]
    figures = {}
    try:
        figures["accuracy_drop"] = drop_chart(rows, float_rows)
    except Exception as e:  # noqa: BLE001 - the tables still stand
        notes.append(f"chart not drawn: {_error_text(e)}")
    for dataset, info in tfmot_info.items():
        if info.get("error"):
            notes.append(f"TF-MOT on {dataset}: {info['error']}")
        elif info.get("versions"):
            notes.append(f"TF-MOT ({dataset}): " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    notes += [
        "Drops are in accuracy points from the Keras float model on the test split; `*_vs_converter` are ratios "
        "to the TFLite converter's own int8 file of the same model in the same run (latency: median over rounds "
        "of per-round ratios, batch 1, 1 thread).",
        f"Targets judge {KQ_HEADLINE} (observer='auto') and, beside it, kq's default minmax. The observer is "
        "the weights' too: mse and auto search each channel's clipping range for the least error "
        "(kq.ops.weight_range), minmax / percentile / kl take the weights' min-max. QAT starts from the minmax "
        "calibration with min-max weights.",
        "keras_quantize is Keras' model.quantize: Dense layers only (convolutions stay float), activations "
        "quantized at run time, run in Keras, so its latency is Keras' predict_on_batch, not an interpreter's.",
        "ORT W8A8 uses uint8 weights (U8U8): onnxruntime's int8-weight kernels saturate on x86 CPUs without "
        "VNNI. ORT W4A4 (uint4 activations) fails where a MaxPool reads them: onnxruntime has no uint4 MaxPool.",
        "qat_step_ratio: median fine-tuning step over the float model's fine-tuning step in the same framework "
        "(Keras 3 for kq, tf_keras for TF-MOT), not interleaved (bench_qat measures it interleaved).",
        "peak_mb: RSS growth while the file was made; the allocator keeps freed memory, so it reads low for "
        "contenders after the first in the process.",
    ]
    summary = summary_rows(rows, float_rows)
    return {
        "rows": summary,
        "tables": {
            "Ratios to the TFLite converter's int8 file (median, min .. max over the models)": ratio_rows(rows),
            "Targets": target_rows(rows, float_rows),
            "Every file": _strip(rows),
            "Float models": float_rows,
        },
        "notes": notes,
        "figures": figures,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=None,
                        help="make only these contender groups (the float file and the converter's always)")
    parser.add_argument("--datasets", nargs="+", choices=("fashion_mnist", "digits"), default=None)
    parser.add_argument("--qat-schemes", nargs="+", choices=tuple(SCHEMES), default=None,
                        help="QAT variants of these schemes only (with and without LSQ)")
    parser.add_argument("--chart", nargs=2, metavar=("RESULTS_JSON", "PNG"),
                        help="only redraw the chart of a results file (benchmarks/results/<date>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chart:
        chart_from_results(*args.chart)
        return 0
    if args.worker:
        import bench_qat

        result = tfmot_worker(args.worker)
        print(bench_qat.JSON_MARK + json.dumps(result))
        return 0

    result = run(args.quick, only=args.only, datasets=args.datasets, qat_schemes=args.qat_schemes)
    from common import print_result

    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
