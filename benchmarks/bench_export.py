"""Export: keras_quant's TFLite / ONNX files against the TFLite converter's own, in their runtimes.

    python benchmarks/run.py --only export [--quick]     # as part of the benchmark report
    python benchmarks/bench_export.py [--quick]           # on its own

One float CNN on Fashion-MNIST (`keras_quant.cli.datasets`; scikit-learn's digits when it is not
installed, said in the notes), over 100k parameters: Conv2D(32)+BN+ReLU, Conv2D(64)+BN+ReLU,
MaxPool, a depthwise-separable block (DepthwiseConv2D+BN+ReLU, 1x1 Conv2D(64)+BN+ReLU), MaxPool,
Flatten, Dense(128)+ReLU, Dense(10). BatchNorm momentum 0.9, seed 0, Adam, batch 64, trained 2
epochs (`--quick`: on 10,000 training images, tested on 2,000).

Six batch-1 artifacts of that one model:

- `float32`: the TFLite converter on a `tf.function` concrete function of the float model;
- `converter_int8`: the converter's own full-integer PTQ of the same function
  (`Optimize.DEFAULT`, `representative_dataset` yielding the calibration images one at a time,
  `supported_ops=[TFLITE_BUILTINS_INT8]`, int8 input and output);
- `kq_int8`: `kq.export_tflite(kq.quantize_model(model, QuantConfig.int8(), calibration=...),
  mode="int8")`, calibrated (`kq.CalibrationCallback`) on the same images, int8 input and output;
- `kq_int16x8`: the same with `QuantConfig.int16x8()` and `mode="int16x8"` (int16 I/O);
- `kq_dynamic`: `mode="dynamic"` of the int8 model (int8 weights, float activations);
- `kq_onnx_qdq`: `kq.export_onnx` of the int8 model (uint8 weights, zero point 128: onnxruntime's U8U8 kernels), run in onnxruntime.
- `kq_onnx_qdq_s8w`: the same with `weight_type="int8"` (U8S8 kernels: faster, but they saturate on x86 CPUs without VNNI).

Measured, each artifact in its own runtime (`keras_quant.runtime`: the LiteRT interpreter with
its default XNNPACK delegate, onnxruntime's CPU provider), all with the same `num_threads` (1, and
2 in the full run):

- latency: one batch-1 inference (`Runner.latency`: set input, invoke, read output), the
  artifacts taking turns: in each round every artifact times `runs` calls after a short warm-up
  (the order reversed every other round) and keeps its median; a ratio is the median over rounds
  of (numerator / denominator of the same round), so a machine that drifts slows both sides alike;
- file size; test accuracy of each artifact in its runtime (of the Keras float and quantized
  models too), and `kq.analysis.compare_models` of the kq int8 file against the Keras quantized
  model it came from (argmax agreement, max difference in output steps).

Targets from the issue: kq_int8 / converter_int8 latency at most 1.05; int8 size at most 0.27 of
float32 (models over 100k parameters). int8 / float32 latency is reported (the issue saw the
converter's int8 about 3.5x faster than float32 on a small CNN on this machine's CPU).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

SEED = 0
BATCH = 64
BN_MOMENTUM = 0.9
LR = 1e-3
# round_s: the time each artifact is timed for in one latency round (the runs are sized to it).
QUICK = {"train": 10000, "test": 2000, "epochs": 2, "calib": 500, "threads": (1,), "rounds": 15, "round_s": 0.06,
         "warmup": 10}
FULL = {"train": None, "test": None, "epochs": 2, "calib": 1000, "threads": (1, 2), "rounds": 21, "round_s": 0.15,
        "warmup": 20}
LATENCY_TARGET = 1.05  # kq_int8 / converter_int8
SIZE_TARGET = 0.27  # int8 / float32 file size
TFLITE_ARTIFACTS = ("float32", "converter_int8", "kq_int8", "kq_int16x8", "kq_dynamic")
ONNX_ARTIFACTS = ("kq_onnx_qdq", "kq_onnx_qdq_s8w")
ARTIFACTS = TFLITE_ARTIFACTS + ONNX_ARTIFACTS


# Data and model ------------------------------------------------------------------------
def load_data(n_train=None, n_test=None):
    """`(x_train, y_train, x_test, y_test, dataset_name)`; digits when Fashion-MNIST is missing."""
    from keras_quant.cli import datasets

    return datasets.load_fashion_or_digits(n_train, n_test)


def build_model(input_shape):
    """The benchmark CNN (over 100k parameters on 28x28 inputs), seeded, compiled."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(SEED)
    inp = keras.Input(tuple(input_shape), name="image")
    x = inp
    for i, filters in enumerate((32, 64)):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i + 1}")(x)
        x = L.ReLU(name=f"relu{i + 1}")(x)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name="bn_dw")(x)
    x = L.ReLU(name="relu_dw")(x)
    x = L.Conv2D(64, 1, use_bias=False, name="pw")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name="bn_pw")(x)
    x = L.ReLU(name="relu_pw")(x)
    x = L.MaxPooling2D(2, name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(128, activation="relu", name="fc")(x)
    x = L.Dense(10, name="logits")(x)
    model = keras.Model(inp, x, name="export_bench_cnn")
    model.compile(optimizer=keras.optimizers.Adam(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


# Artifacts -----------------------------------------------------------------------------
def _concrete_function(model):
    """The float model's batch-1 inference as a concrete function, in its input's dtype (the zoo's token
    models take int32). Not frozen first: the converter freezes the variables itself, and freezing
    twice made the peer about 0.15 s slower per model."""
    import tensorflow as tf

    inp = model.inputs[0]
    spec = tf.TensorSpec((1,) + tuple(inp.shape[1:]), tf.as_dtype(inp.dtype), name="image")
    return tf.function(lambda x: model(x, training=False), autograph=False).get_concrete_function(spec)


def converter_files(model, x_calib):
    """`(float32 bytes, converter int8 bytes)`: the plain TFLite converter on one concrete function."""
    import tensorflow as tf

    cf = _concrete_function(model)
    float_bytes = tf.lite.TFLiteConverter.from_concrete_functions([cf]).convert()
    return float_bytes, converter_int8_bytes(cf, x_calib)


def converter_int8_bytes(cf, x_calib):
    """The converter's full-integer PTQ of a frozen concrete function: `representative_dataset` of
    `x_calib` one image at a time, `TFLITE_BUILTINS_INT8`, int8 input and output."""
    import tensorflow as tf

    def representative():
        for i in range(len(x_calib)):
            yield [x_calib[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_concrete_functions([cf])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    with warnings.catch_warnings():  # the converter's note that a float graph has no input statistics
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return conv.convert()


def calibrate(model, config, x_calib):
    import keras_quant as kq

    cb = kq.CalibrationCallback(config)
    model.predict(x_calib, batch_size=BATCH, verbose=0, callbacks=[cb])
    return cb.result


def make_artifacts(model, x_calib, folder):
    """Write the six artifacts to `folder`; `({name: path}, {name: seconds}, int8 qmodel, {name: ExportReport})`."""
    import keras_quant as kq
    from keras_quant.io import write_atomic

    paths, seconds, reports = {}, {}, {}
    start = time.perf_counter()
    float_bytes, conv_bytes = converter_files(model, x_calib)
    seconds["converter float32 + int8"] = time.perf_counter() - start
    for name, data in (("float32", float_bytes), ("converter_int8", conv_bytes)):
        paths[name] = os.path.join(folder, f"{name}.tflite")
        write_atomic(paths[name], data)

    start = time.perf_counter()
    q8 = kq.quantize_model(model, kq.QuantConfig.int8(), calibration=calibrate(model, kq.QuantConfig.int8(), x_calib))
    q16_config = kq.QuantConfig.int16x8()
    q16 = kq.quantize_model(model, q16_config, calibration=calibrate(model, q16_config, x_calib))
    seconds["kq calibrate + quantize (int8, int16x8)"] = time.perf_counter() - start
    jobs = (("kq_int8", lambda p: kq.export_tflite(q8, p, mode="int8")),
            ("kq_int16x8", lambda p: kq.export_tflite(q16, p, mode="int16x8")),
            ("kq_dynamic", lambda p: kq.export_tflite(q8, p, mode="dynamic")),
            ("kq_onnx_qdq", lambda p: kq.export_onnx(q8, p)),
            ("kq_onnx_qdq_s8w", lambda p: kq.export_onnx(q8, p, weight_type="int8")))
    for name, export in jobs:
        paths[name] = os.path.join(folder, f"{name}{'.onnx' if 'onnx' in name else '.tflite'}")
        start = time.perf_counter()
        reports[name] = export(paths[name])
        seconds[f"export {name}"] = time.perf_counter() - start
    return paths, seconds, q8, reports


# Measurements --------------------------------------------------------------------------
def round_robin_latency(runners, x, rounds, budget_s, warmup, min_runs=10, max_runs=2000):
    """`({name: [median seconds per round]}, {name: runs per round})`, the runners taking turns.

    Every runner gets about the same time per round: its runs are `budget_s` over a first
    estimate of its latency (within `[min_runs, max_runs]`), so a fast file is timed over many
    calls and a slow one (16x8 on reference kernels) does not stretch the rounds. The order is
    reversed every other round.
    """
    names = list(runners)
    sample = x[:1]
    runs = {}
    for n in names:  # untimed first calls (interpreter / session set-up, caches), then the estimate
        estimate = runners[n].latency(sample, runs=5, warmup=warmup)
        runs[n] = int(min(max_runs, max(min_runs, budget_s / max(estimate, 1e-6))))
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(runners[n].latency(sample, runs=runs[n], warmup=warmup))
    return out, runs


def paired_ratio(times, num, den):
    """Median over rounds of `times[num][i] / times[den][i]`."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def paired_quartiles(times, num, den):
    """`"q1 / q3"` of the per-round ratios (their spread)."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    return f"{np.percentile(ratios, 25):.3f} / {np.percentile(ratios, 75):.3f}"


def op_list(path):
    """`{op_name: count}` of a TFLite file, read by the LiteRT interpreter."""
    import collections

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return dict(collections.Counter(op["op_name"] for op in interpreter._get_ops_details()))


def onnxruntime_op_list(path, folder):
    """`{op_type: count}` of the graph onnxruntime runs (after its optimizations, QDQ fusion included)."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = os.path.join(folder, "onnxruntime_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return dict(collections.Counter(node.op_type for node in graph.node))


def _fmt_ops(ops):
    return ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))


def _met(value, target):
    return None if value is None else bool(value <= target)


def run(quick: bool) -> dict:
    """Run the benchmark.

    Args:
        quick: Small sizes (about 2-3 minutes on 2 cores) instead of the full run.

    Returns:
        The runner's dict: `rows` (the ratios against their targets), `tables`, `notes`.
    """
    import keras

    import keras_quant as kq
    from keras_quant import runtime

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("bench_export needs KERAS_BACKEND=tensorflow (export traces the model with TensorFlow)")
    cfg = QUICK if quick else FULL
    seconds = {}
    start = time.perf_counter()
    x, y, x_test, y_test, data_name = load_data(cfg["train"], cfg["test"])
    model = build_model(x.shape[1:])
    model.fit(x, y, batch_size=BATCH, epochs=cfg["epochs"], shuffle=True, verbose=0)
    seconds["train"] = time.perf_counter() - start
    x_calib = x[-cfg["calib"]:]
    notes = []
    if data_name != "fashion_mnist":
        notes.append("WARNING: Fashion-MNIST not installed (Debian's dataset-fashion-mnist); used scikit-learn's "
                     "8x8 digits instead (below 100k parameters: the size target does not apply).")

    with tempfile.TemporaryDirectory(prefix="kq_bench_export_") as folder:
        paths, export_s, q8, reports = make_artifacts(model, x_calib, folder)
        seconds.update(export_s)
        sizes = {name: os.path.getsize(p) for name, p in paths.items()}

        # Accuracy of each artifact in its runtime, and kq int8 file vs the Keras model it came from.
        start = time.perf_counter()
        acc = {"keras float": model, "keras kq int8 (fake-quant)": q8}
        accuracy = {}
        for name, artifact in list(acc.items()) + list(paths.items()):
            pred = runtime.load(artifact).predict(x_test)
            accuracy[name] = float(np.mean(np.argmax(pred, -1) == y_test))
        fidelity = {name: kq.analysis.compare_models(q8, paths[name], x_test, labels=y_test, latency_runs=0)
                    for name in ("kq_int8",) + ONNX_ARTIFACTS}
        seconds["accuracy + fidelity"] = time.perf_counter() - start

        start = time.perf_counter()
        latency, runs = {}, {}
        for threads in cfg["threads"]:
            runners = {name: runtime.load(p, num_threads=threads) for name, p in paths.items()}
            latency[threads], runs[threads] = round_robin_latency(runners, x_test, cfg["rounds"], cfg["round_s"],
                                                                  cfg["warmup"])
        seconds["latency"] = time.perf_counter() - start
        ops = {name: op_list(paths[name]) for name in TFLITE_ARTIFACTS}
        for name in ONNX_ARTIFACTS:
            ops[name] = onnxruntime_op_list(paths[name], folder)

    n_params = model.count_params()
    rows = []
    for threads, times in latency.items():
        for num, den, target in (("kq_int8", "converter_int8", LATENCY_TARGET), ("converter_int8", "float32", None),
                                 ("kq_int8", "float32", None), ("kq_int16x8", "float32", None),
                                 ("kq_dynamic", "float32", None), ("kq_onnx_qdq", "float32", None),
                                 ("kq_onnx_qdq_s8w", "float32", None)):
            r = paired_ratio(times, num, den)
            rows.append({"case": f"latency {num} / {den}", "threads": threads, "ratio": r,
                         "ratio_q1_q3": paired_quartiles(times, num, den),
                         "num_ms": statistics.median(times[num]) * 1e3, "den_ms": statistics.median(times[den]) * 1e3,
                         "target": f"<= {target}" if target else "report", "met": _met(r, target) if target else None})
    big = n_params > 100_000
    for num in ("kq_int8", "converter_int8", "kq_int16x8", "kq_dynamic", "kq_onnx_qdq"):
        r = sizes[num] / sizes["float32"]
        target = SIZE_TARGET if num in ("kq_int8", "converter_int8") and big else None
        rows.append({"case": f"size {num} / float32", "threads": None, "ratio": r, "ratio_q1_q3": None,
                     "num_ms": None, "den_ms": None,
                     "target": f"<= {target}" if target else "report", "met": _met(r, target) if target else None})

    artifact_rows = []
    for name in ("keras float", "keras kq int8 (fake-quant)") + ARTIFACTS:
        row = {"artifact": name, "accuracy": accuracy[name], "drop_vs_float": accuracy["keras float"] - accuracy[name],
               "size_bytes": sizes.get(name)}
        for threads, times in latency.items():
            row[f"latency_ms_{threads}t"] = statistics.median(times[name]) * 1e3 if name in times else None
            row[f"runs_per_round_{threads}t"] = runs[threads].get(name)
        artifact_rows.append(row)
    fidelity_rows = []
    for name, runtime_name in (("kq_int8", "kq_int8.tflite (LiteRT)"), ("kq_onnx_qdq", "kq_onnx_qdq.onnx (onnxruntime)"),
                               ("kq_onnx_qdq_s8w", "kq_onnx_qdq_s8w.onnx (onnxruntime)")):
        fid = fidelity[name].to_dict()
        fidelity_rows.append({"reference": "Keras kq int8 model", "candidate": runtime_name,
                              "samples": fid["num_samples"], "argmax_agreement": fid["argmax_agreement"],
                              "max_abs_diff": fid["max_abs_diff"], "max_diff_steps": fid["max_diff_steps"],
                              "keras_accuracy": fid["reference_accuracy"], "file_accuracy": fid["candidate_accuracy"]})
    ops_rows = [{"artifact": name, "ops": _fmt_ops(ops[name])} for name in TFLITE_ARTIFACTS]
    ops_rows += [{"artifact": f"{name} (as onnxruntime runs it)", "ops": _fmt_ops(ops[name])} for name in ONNX_ARTIFACTS]
    same_ops = ops["kq_int8"] == ops["converter_int8"]

    headline = {t: paired_ratio(times, "kq_int8", "converter_int8") for t, times in latency.items()}
    size_kq = sizes["kq_int8"] / sizes["float32"]
    size_conv = sizes["converter_int8"] / sizes["float32"]
    notes += [
        f"model: {n_params} parameters, trained {cfg['epochs']} epochs on {len(x)} {data_name} images "
        f"(Adam {LR}, batch {BATCH}, seed {SEED}); accuracy on {len(x_test)} test images, each artifact in its "
        f"runtime (LiteRT interpreter from ai_edge_litert with its default XNNPACK delegate; onnxruntime CPU). "
        f"Calibration: the same {len(x_calib)} training images for the converter's representative_dataset "
        "(batch 1) and kq.CalibrationCallback (min-max).",
        f"latency: batch-1 inference (Runner.latency: set input, invoke, read output; int I/O files take int "
        f"input), {cfg['rounds']} rounds in which every artifact times about {cfg['round_s'] * 1e3:.0f} ms of calls "
        f"(runs_per_round: that time over a first estimate of its latency, at least 10) after {cfg['warmup']} "
        "warm-up calls, order reversed every other round; ratio = median over rounds of (num / den of the same "
        "round), ratio_q1_q3 = quartiles of those per-round ratios; num_ms / den_ms = median of the per-round "
        "medians. Same num_threads for every artifact.",
        "targets (issue): latency kq_int8 / converter_int8 <= "
        f"{LATENCY_TARGET}: " + ", ".join(f"{t} thread(s) {r:.3f} ({'met' if r <= LATENCY_TARGET else 'NOT met'})"
                                          for t, r in headline.items())
        + f"; size int8 / float32 <= {SIZE_TARGET} (models over 100k parameters): kq_int8 {size_kq:.3f} "
        f"({'met' if size_kq <= SIZE_TARGET else 'NOT met'}), converter_int8 {size_conv:.3f} "
        f"({'met' if size_conv <= SIZE_TARGET else 'NOT met'}).",
        f"op lists of kq_int8 and converter_int8 are {'identical' if same_ops else 'DIFFERENT (see the op table)'}. "
        "The onnxruntime row is the graph it runs after its QDQ fusion: a Conv or Gemm left there (not "
        "QLinearConv / QGemm) runs in float and dequantizes its int8 weights on every inference.",
        "int8 / float32 latency is reported, not a target (the issue saw the converter's int8 about 3.5x faster "
        "than float32 on a small CNN on this machine's CPU).",
        "kq_dynamic: mode='dynamic' of the int8 PTQ model (int8 weights, float activations quantized at run time); "
        "kq_int16x8: QuantConfig.int16x8() (int16 activations, int16 I/O); kq_onnx_qdq: kq.export_onnx(opset=21), "
        "QDQ with float I/O and uint8 weights (U8U8), in onnxruntime; kq_onnx_qdq_s8w: weight_type='int8' (U8S8: "
        "faster, but onnxruntime's U8S8 kernels saturate int16 on x86 CPUs without VNNI; see the fidelity table).",
        "parts took " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
    ]
    return {"rows": rows,
            "tables": {"Artifacts: accuracy in their runtime, size, latency": artifact_rows,
                       "kq int8 file vs the Keras quantized model (compare_models)": fidelity_rows,
                       "Op lists (TFLite: LiteRT _get_ops_details; ONNX: onnxruntime's optimized graph)": ops_rows},
            "notes": notes, "dataset": data_name}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 2-3 minutes)")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(here) not in sys.path:  # measure this checkout's keras_quant
        sys.path.insert(0, os.path.dirname(here))
    from keras_quant.formatting import result_text

    result = run(args.quick)
    print(result_text(result, "Export: ratios"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
