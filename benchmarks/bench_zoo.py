"""Model zoo: does keras_quant take real architectures from float model to int8 file, stage by stage?

    python benchmarks/run.py --only zoo [--quick]     # as part of the benchmark report
    python benchmarks/bench_zoo.py [--quick] [--models NAME ...]   # on its own (prints the tables)

Models (`zoo_models.py`, seed 0, small inputs): 13 `keras.applications` families built offline
with `weights=None` (MobileNet alpha 0.25, MobileNetV2 alpha 0.35, MobileNetV3Small / Large alpha
0.75, EfficientNetB0, EfficientNetV2B0, ResNet50, ResNet50V2, DenseNet121, ConvNeXtTiny,
NASNetMobile at 32x32; Xception at 71x71 and InceptionV3 at 75x75, their minimums;
`include_preprocessing` left at its default), a transformer encoder, an LSTM/GRU/Bidirectional
model, a U-Net and a Conv1D model with `keras.ops` nodes. Each trains briefly on real data
(`zoo_models.py` says which task), then goes through the stages, each recorded as `ok` or the
exception's type and message, a failed stage skipping those that need it:

1. `calibrate`: `kq.CalibrationCallback(statistics="range")` during `model.predict` on the
   calibration samples (only what `quantize_model` reads: the quickest way to a file);
2. `ptq`: `kq.quantize_model(model, calibration=cb.result)`;
3. `tflite`: `kq.export_tflite(qmodel, path)` (int8, strict). When the strict export refuses a
   float layer, the file is written again with `strict=False` for the figures (`figures_from`);
4. `onnx`: `kq.export_onnx(qmodel, path)`, and the file opened in onnxruntime;
5. `qat`: `kq.quantize_model(model, mode="qat", calibration=full)`, from the default callback's
   full statistics (`calibrate_full`, timed as `calibrate_full_s`), compiled (Adam 1e-4),
   fitted a few epochs on a few batches; the loss must be finite and fall (last epoch < first);
6. `qat_export`: `kq.export_tflite` of the QAT model (int8).

Every model runs in a worker subprocess, so a crash (a segfault in a converter or interpreter)
or a timeout is recorded in its row and the other models still run. Figures per model:

- `int_mac_share`: share of the file's MACs in integer ops (read from the flatbuffer, every
  subgraph: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL, TRANSPOSE_CONV, CONV_3D and
  the fused sequence LSTM / RNN ops, from their shapes; integer = the op's activation input is
  INT8 / INT16). Ops inside WHILE bodies (Keras' recurrent loops) count once, not per step;
- `float_ops`: compute ops with a float32 activation tensor (QUANTIZE / DEQUANTIZE excluded);
- `fid_p99_steps` / `fid_max_steps`: |file output - Keras PTQ output| / the file's output scale,
  p99 and max over the fidelity samples and outputs;
- accuracy of the Keras float model, kq's int8 file and the TFLite converter's own full-integer
  PTQ of the same float model (`representative_dataset` of the same calibration samples,
  `TFLITE_BUILTINS_INT8`, int8 I/O; `converter` records whether it converts at all), and the
  paired counts behind their difference (`kq_only_right`: test samples kq's file gets right and
  the converter's wrong; `converter_only_right`: the reverse; `acc_p_value`: the exact two-sided
  sign test of those counts, how often chance alone splits the disagreements so unevenly); size and
  batch-1 latency of kq's file over the converter's (LiteRT interpreter, 1 thread, the two files
  taking turns in rounds: `bench_export.round_robin_latency`); time from the float model to the
  file (kq: calibrate with `statistics="range"` + quantize + export; converter: concrete function +
  convert) over the converter's. `calibrate_full_s` is the default callback's full statistics
  (moments, histograms, per-channel extremes of every layer) on the same samples, for the record.

Targets (judged per model, reported, not asserted): every model passes every stage; at least 13
files fully integer; every file within 2 output steps of its Keras model at p99 and 6 at most;
where the converter converts, kq's int8 file at least as accurate as the converter's, within
1.05x its latency and size, and the time to file within 2x the converter's.

`--quick`: the cheap models (MobileNet, MobileNetV3Small, Transformer, UNet,
Conv1D_audio), fewer samples, epochs and latency rounds.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # zoo_models and the sibling benchmarks' helpers
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:  # this checkout's keras_quant
    sys.path.insert(0, os.path.dirname(HERE))

import zoo_models  # noqa: E402

SEED = 0
BATCH = 64
QAT_LR = 1e-4
STAGES = ("calibrate", "ptq", "tflite", "onnx", "qat", "qat_export")
NEEDS = {"ptq": "calibrate", "tflite": "ptq", "onnx": "ptq", "qat": "calibrate", "qat_export": "qat"}
NOT_RUN = "not run"
# Per task: (training samples, epochs); tokens are the 1,348 digits, the others Fashion-MNIST.
QUICK = {"models": zoo_models.QUICK_MODELS, "train": {"image": (1000, 1), "mask": (1000, 1), "tokens": (None, 6),
                                                       "signal": (2000, 2)},
         "test": 200, "calib": 64, "fid": 64, "qat_samples": 96, "qat_epochs": 3, "rounds": 3, "round_s": 0.03,
         "warmup": 3, "timeout": 900}
# The full run goes from the cheapest models to the dearest (a run cut short has the most rows).
FULL_ORDER = ("Conv1D_audio", "UNet", "Transformer", "LSTM_GRU", "MobileNet", "MobileNetV2", "MobileNetV3Small",
              "MobileNetV3Large", "EfficientNetB0", "EfficientNetV2B0", "NASNetMobile", "DenseNet121", "ResNet50",
              "ResNet50V2", "ConvNeXtTiny", "InceptionV3", "Xception")
FULL = {"models": FULL_ORDER, "train": {"image": (2000, 3), "mask": (3000, 1), "tokens": (None, 15),
                                        "signal": (4000, 3)},
        "test": 1000, "calib": 100, "fid": 100, "qat_samples": 128, "qat_epochs": 3, "rounds": 5, "round_s": 0.1,
        "warmup": 5, "timeout": 1800}
TARGETS = {"all_stages": 17, "fully_integer": 13, "fid_p99": 2.0, "fid_max": 6.0, "latency": 1.05, "size": 1.05,
           "time": 2.0}
LOG_PREFIX = "[zoo]"
ROW_PREFIX = "[zoo-row] "  # each finished row, as JSON, in the log (a run cut short can still be read)


def _error_text(exc, limit=300):
    return f"{type(exc).__name__}: {exc}"[:limit].replace("\n", " ")


# Flatbuffer figures -----------------------------------------------------------------------
_LOOPED = {"UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN",
           "BIDIRECTIONAL_SEQUENCE_RNN"}
_BOUNDARY = {"QUANTIZE", "DEQUANTIZE"}
_INT_TYPES = {"INT8", "INT16", "UINT8"}


def _prod(shape):
    return int(np.prod([max(int(d), 1) for d in shape])) if len(shape) else 1


def op_macs(name, tensors, inputs, outputs, options=None):
    """`(MACs, index of the activation input)` of one op from its tensors' shapes (0 MACs for an op
    that multiplies nothing). `tensors`: index -> TensorInfo; `options`: the op's builtin options."""
    def shape(i):
        return tensors[i].shape if i is not None and i >= 0 else ()

    out = shape(outputs[0]) if outputs else ()
    if name == "CONV_2D":  # weights (Cout, kh, kw, Cin)
        w = shape(inputs[1])
        return _prod(out) * _prod(w[1:]), inputs[0]
    if name == "CONV_3D":  # weights (kd, kh, kw, Cin, Cout)
        w = shape(inputs[1])
        return _prod(out) * _prod(w[:-1]), inputs[0]
    if name == "DEPTHWISE_CONV_2D":  # weights (1, kh, kw, Cout)
        w = shape(inputs[1])
        return _prod(out) * _prod(w[1:3]), inputs[0]
    if name == "FULLY_CONNECTED":  # weights (units, in)
        w = shape(inputs[1])
        return _prod(out) * (w[-1] if w else 1), inputs[0]
    if name == "TRANSPOSE_CONV":  # inputs: output shape, weights (Cout, kh, kw, Cin), activation
        w, x = shape(inputs[1]), shape(inputs[2])
        return _prod(x) * _prod(w[:3]), inputs[2]
    if name in ("BATCH_MATMUL",):
        a = shape(inputs[0])
        adj_x = bool(getattr(options, "adjX", False)) if options is not None else False
        k = (a[-2] if adj_x else a[-1]) if len(a) >= 2 else 1
        return _prod(out) * k, inputs[0]
    if name in _LOOPED:  # every 2-D constant weight is used once per time step and sample
        x = shape(inputs[0])
        steps = _prod(x[:-1])
        weights = sum(_prod(tensors[i].shape) for i in inputs[1:] if i >= 0 and tensors[i].constant
                      and len(tensors[i].shape) == 2)
        return steps * weights, inputs[0]
    return 0, None


def mac_figures(data):
    """Integer-MAC share and float ops of a TFLite file's bytes, over all its subgraphs.

    Returns:
        `{"macs", "int_macs", "int_mac_share", "float_ops", "float_op_names"}`; `float_ops` counts
        compute ops reading or writing a non-constant float32 tensor, QUANTIZE / DEQUANTIZE aside.
    """
    import collections

    from keras_quant.export.flatbuffer import FlatModel

    flat = FlatModel(data)
    macs = int_macs = 0
    float_ops = collections.Counter()
    for index, sub in enumerate(flat.model.subgraphs):
        tensors = {i: flat.tensor(i, index) for i in range(len(sub.tensors))}
        for i, op in enumerate(flat.ops(index)):
            options = getattr(sub.operators[i], "builtinOptions", None)
            m, act = op_macs(op.name, tensors, op.inputs, op.outputs, options)
            macs += m
            if m and act is not None and tensors[act].type in _INT_TYPES:
                int_macs += m
            if op.name in _BOUNDARY or op.name in ("WHILE", "CALL_ONCE", "IF"):
                continue
            touched = [tensors[j] for j in op.inputs + op.outputs if j >= 0]
            if any(t.type == "FLOAT32" and not t.constant for t in touched):
                float_ops[op.name] += 1
    return {"macs": macs, "int_macs": int_macs, "int_mac_share": (int_macs / macs) if macs else None,
            "float_ops": sum(float_ops.values()),
            "float_op_names": ", ".join(f"{k} x{v}" for k, v in sorted(float_ops.items()))}


def fidelity_steps(file_out, keras_out, scale):
    """`(p99, max)` of |file output - Keras output| / `scale` (output quantization steps)."""
    a = np.asarray(file_out, "float64").reshape(-1)
    b = np.asarray(keras_out, "float64").reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"output sizes differ: file {a.size}, Keras {b.size}")
    if not scale or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"no usable output scale ({scale})")
    steps = np.abs(a - b) / float(scale)
    return float(np.percentile(steps, 99)), float(np.max(steps))


# Targets ----------------------------------------------------------------------------------
def _met(ok):
    return None if ok is None else ("met" if ok else "missed")


def judge_row(row, targets=TARGETS):
    """Per-model verdicts: `{target: "met" / "missed" / None (not measurable)}` plus the model name."""
    t = targets
    stages_ok = all(row.get(s) == "ok" for s in STAGES)
    share, nfloat = row.get("int_mac_share"), row.get("float_ops")
    has_file = share is not None or nfloat is not None
    fully = (has_file and nfloat == 0 and (share is None or share >= 1 - 1e-9)) if has_file else False
    p99, mx = row.get("fid_p99_steps"), row.get("fid_max_steps")
    eps = 1e-3  # outputs on one grid differ by whole steps, up to float rounding
    fid = (p99 is not None and mx is not None and p99 <= t["fid_p99"] + eps and mx <= t["fid_max"] + eps)
    out = {"model": row.get("model"), "all_stages": _met(stages_ok), "fully_integer": _met(fully),
           "fidelity": _met(fid)}
    converts = row.get("converter") == "ok"
    for key, value, ok in (
        ("accuracy_vs_converter", row.get("acc_kq_minus_converter"), lambda v: v >= -1e-12),
        ("latency_vs_converter", row.get("latency_vs_converter"), lambda v: v <= t["latency"]),
        ("size_vs_converter", row.get("size_vs_converter"), lambda v: v <= t["size"]),
        ("time_vs_converter", row.get("time_vs_converter"), lambda v: v <= t["time"]),
    ):
        if not converts:
            out[key] = None  # nothing to compare with
        else:
            out[key] = _met(value is not None and ok(value))  # no kq file: missed
    return out


def judge(rows, targets=TARGETS):
    """`(per-model verdict rows, summary rows)` for the issue's targets."""
    per_model = [judge_row(r, targets) for r in rows]
    n = len(rows)

    def count(key):
        return sum(v[key] == "met" for v in per_model)

    def judged(key):
        return sum(v[key] is not None for v in per_model)

    summary = []
    all_ok = count("all_stages")
    summary.append({"target": f"all {targets['all_stages']} models pass every stage", "value": f"{all_ok}/{n}",
                    "status": _met(all_ok >= targets["all_stages"] and all_ok == n)})
    fully = count("fully_integer")
    summary.append({"target": f">= {targets['fully_integer']} fully integer in TFLite", "value": f"{fully}/{n}",
                    "status": _met(fully >= targets["fully_integer"])})
    fid = count("fidelity")
    summary.append({"target": f"every file within {targets['fid_p99']:g} steps at p99, {targets['fid_max']:g} max",
                    "value": f"{fid}/{n}", "status": _met(fid == n and n > 0)})
    for key, what in (("accuracy_vs_converter", "kq int8 accuracy >= converter's"),
                      ("latency_vs_converter", f"latency <= {targets['latency']}x converter's"),
                      ("size_vs_converter", f"size <= {targets['size']}x converter's"),
                      ("time_vs_converter", f"time to file <= {targets['time']}x converter's")):
        j, c = judged(key), count(key)
        summary.append({"target": f"{what} (models the converter converts)", "value": f"{c}/{j}",
                        "status": _met(c == j) if j else None})
    return per_model, summary


# Stages -------------------------------------------------------------------------------------
class LossNotFalling(RuntimeError):
    """QAT fine-tuning whose loss is not finite or does not fall."""


def converter_file(model, x_calib, path):
    """The TFLite converter's own full-integer PTQ (bench_export's recipe) written to `path`."""
    import bench_export

    from keras_quant.io import write_atomic

    data = bench_export.converter_int8_bytes(bench_export._concrete_function(model), x_calib)
    write_atomic(path, data)
    return data


class ConverterCrashed(RuntimeError):
    """The TFLite converter's process died (it segfaults on some graphs)."""


def converter_file_isolated(zm, size, model, x_calib, path, timeout=1200):
    """`converter_file` in a process of its own: the converter segfaults on some graphs (the
    recurrent model), which would take the kq stages down with it. The child rebuilds the model
    (`zm.build(size)`, the same seeded builder) and loads the float weights; returns
    `(file bytes, seconds of concrete function + conversion, as timed in the child)`."""
    stem = path + ".job"
    model.save_weights(stem + ".weights.h5")
    np.save(stem + ".calib.npy", x_calib)
    cmd = [sys.executable, os.path.abspath(__file__), "--converter-worker", zm.name, "--worker-out", stem + ".json",
           "--converter-path", path] + (["--size", str(size)] if size else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.path.dirname(HERE) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConverterCrashed(f"converter timed out after {timeout} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "Error" in ln or "error" in ln]
        tail = "" if proc.returncode < 0 else ": " + " | ".join(lines[-2:])[-300:]  # a signal has no message
        sig = f", signal {-proc.returncode}" if proc.returncode < 0 else ""
        try:
            with open(stem + ".json") as f:
                err = json.load(f).get("error")
        except (OSError, ValueError):
            err = None
        raise ConverterCrashed(err or f"converter process died (exit {proc.returncode}{sig}){tail}")
    with open(stem + ".json") as f:
        info = json.load(f)
    with open(path, "rb") as f:
        return f.read(), info["seconds"]


def converter_worker(name, size, path, out_path):
    """The child of `converter_file_isolated`: rebuild, load the weights, convert, time it."""
    stem = path + ".job"
    zm = zoo_models.MODELS[name]
    model = zm.build(size)
    model.load_weights(stem + ".weights.h5")
    x_calib = np.load(stem + ".calib.npy")
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converter_file(model, x_calib, path)
        _write_json(out_path, {"seconds": time.perf_counter() - start})
    except Exception as e:  # noqa: BLE001 - the parent reports it
        _write_json(out_path, {"error": _error_text(e)})
        return 1
    return 0


def _load_runner(path):
    from keras_quant import runtime

    return runtime.load(path, num_threads=1)


def _predict(runner, x):
    out = runner.predict(x, batch_size=64)
    return out[0] if isinstance(out, list) else out


def new_row(zm, size=None):
    row = {"model": zm.name, "family": zm.family, "task": zm.task, "input": "x".join(map(str, zm.input_shape(size)))}
    for s in STAGES:
        row[s] = NOT_RUN
    row["converter"] = NOT_RUN
    return row


def run_model(zm, cfg, folder, log=print, size=None, data=None, progress=None):
    """Train `zm`, run every stage and measure the files; returns the row (never raises).

    `data`: `(x, y, xt, yt, description)` to use instead of the task's data (tests);
    `progress(row)`: called after every step (the worker writes the row to disk with it).
    """
    row = new_row(zm, size)
    progress = progress or (lambda r: None)
    t = {}  # stage seconds

    def stage(name, fn):
        need = NEEDS.get(name)
        if need and row.get(need) != "ok":
            row[name] = f"skipped ({need} failed)"
            progress(row)
            return None
        row[name] = "running"
        progress(row)
        start = time.perf_counter()
        try:
            value = fn()
            row[name] = "ok"
            return value
        except Exception as e:  # noqa: BLE001 - the row records it; the next stages go on
            row[name] = _error_text(e)
            row.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=6)[-1500:]
            return None
        finally:
            t[name] = time.perf_counter() - start
            row[f"{name}_s"] = t[name]
            progress(row)

    try:
        _run_model(zm, cfg, folder, log, size, data, row, stage, t, progress)
    except Exception as e:  # noqa: BLE001 - training / data failures: the row says so
        row["error"] = _error_text(e)
        row.setdefault("tracebacks", {})["model"] = traceback.format_exc(limit=6)[-1500:]
    progress(row)
    return row


def _run_model(zm, cfg, folder, log, size, data, row, stage, t, progress):
    import keras

    import keras_quant as kq

    n_train, epochs = cfg["train"][zm.task]
    x, y, xt, yt, desc = data if data is not None else zoo_models.load_task(zm, n_train, cfg["test"], size)
    row["data"] = desc
    model = zm.build(size)
    row["params"] = model.count_params()
    keras.utils.set_random_seed(SEED)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0)
    row["train_s"] = time.perf_counter() - start
    float_pred = model.predict(xt, batch_size=BATCH, verbose=0)
    row["acc_float"] = zoo_models.accuracy(zm, float_pred, yt)
    log(f"{LOG_PREFIX} {zm.name}: float accuracy {row['acc_float']:.4f} ({row['train_s']:.0f} s training)")
    progress(row)
    x_calib = x[-cfg["calib"]:]
    x_fid = xt[: cfg["fid"]]

    # The converter's own PTQ of the float model (the reference).
    conv_path = os.path.join(folder, f"{zm.name}_converter.tflite")
    row["converter"] = "running"
    progress(row)
    try:
        conv_bytes, t["converter"] = converter_file_isolated(zm, size, model, x_calib, conv_path)
        row["converter"] = "ok"
        row["time_converter_s"] = t["converter"]
        conv_runner = _load_runner(conv_path)
        conv_pred = _predict(conv_runner, xt)
        row["acc_converter"] = zoo_models.accuracy(zm, conv_pred, yt)
        row["agree_converter"], row["sqnr_converter_db"] = float_fidelity(zm, conv_pred, float_pred)
        row["size_converter_kb"] = len(conv_bytes) / 1024
        conv_figs = mac_figures(conv_bytes)
        row["converter_int_mac_share"] = conv_figs["int_mac_share"]
        row["converter_float_ops"] = conv_figs["float_ops"]
    except Exception as e:  # noqa: BLE001
        row["converter"] = _error_text(e)
        conv_runner = conv_pred = None
    progress(row)

    # kq: calibrate, PTQ, TFLite, ONNX.
    def calibrate(statistics="range"):
        cb = kq.CalibrationCallback(statistics=statistics)
        model.predict(x_calib, batch_size=32, verbose=0, callbacks=[cb])
        return cb.result

    result = stage("calibrate", calibrate)
    qmodel = stage("ptq", lambda: kq.quantize_model(model, calibration=result))
    kq_path = os.path.join(folder, f"{zm.name}_kq.tflite")
    stage("tflite", lambda: kq.export_tflite(qmodel, kq_path))
    if row["tflite"] == "ok":
        row["figures_from"] = "strict export"
        row["time_kq_s"] = t["calibrate"] + t["ptq"] + t["tflite"]
    elif qmodel is not None:
        try:  # the file the strict export refused, for its figures
            start = time.perf_counter()
            kq.export_tflite(qmodel, kq_path, strict=False)
            row["figures_from"] = "strict=False export"
            row["time_kq_s"] = t["calibrate"] + t["ptq"] + time.perf_counter() - start
        except Exception as e:  # noqa: BLE001
            row["figures_from"] = f"none (strict=False: {_error_text(e, 150)})"
    if row.get("time_kq_s") is not None and t.get("converter"):
        row["time_vs_converter"] = row["time_kq_s"] / t["converter"]
    if row.get("figures_from", "").endswith("export"):
        _measure_kq_file(zm, cfg, row, kq_path, qmodel, conv_runner, conv_pred, x_fid, xt, yt, float_pred, log)
    progress(row)

    def onnx():
        import onnxruntime as ort

        path = os.path.join(folder, f"{zm.name}_kq.onnx")
        kq.export_onnx(qmodel, path)
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        try:
            row["acc_kq_onnx"] = zoo_models.accuracy(zm, _predict(_load_runner(path), xt), yt)
        except Exception as e:  # noqa: BLE001 - the export stands; its evaluation failed
            row["acc_kq_onnx"] = f"evaluation: {_error_text(e, 150)}"

    stage("onnx", onnx)

    # The default callback's full statistics on the same samples (QAT starts from them).
    start = time.perf_counter()
    try:
        full = calibrate("full")
        row["calibrate_full"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded; QAT falls back to the range statistics
        full = result
        row["calibrate_full"] = _error_text(e)
    row["calibrate_full_s"] = time.perf_counter() - start
    progress(row)

    # QAT from the same calibration, then its export.
    def qat():
        qat_model = kq.quantize_model(model, mode="qat", calibration=full)
        loss = "binary_crossentropy" if zm.segmentation else "sparse_categorical_crossentropy"
        qat_model.compile(optimizer=keras.optimizers.Adam(QAT_LR), loss=loss)
        n = cfg["qat_samples"]
        keras.utils.set_random_seed(SEED)
        hist = qat_model.fit(x[:n], y[:n], batch_size=32, epochs=cfg["qat_epochs"], shuffle=False, verbose=0)
        losses = [float(v) for v in hist.history["loss"]]
        row["qat_losses"] = " > ".join(f"{v:.4g}" for v in losses)
        if not all(math.isfinite(v) for v in losses):
            raise LossNotFalling(f"loss not finite: {row['qat_losses']}")
        if not losses[-1] < losses[0]:
            raise LossNotFalling(f"loss not falling: {row['qat_losses']}")
        return qat_model

    qat_model = stage("qat", qat)
    qat_path = os.path.join(folder, f"{zm.name}_kq_qat.tflite")

    def qat_export():
        kq.export_tflite(qat_model, qat_path)
        row["acc_kq_qat_file"] = zoo_models.accuracy(zm, _predict(_load_runner(qat_path), xt), yt)

    stage("qat_export", qat_export)
    row["stages_ok"] = sum(row[s] == "ok" for s in STAGES)
    log(f"{LOG_PREFIX} {zm.name}: {row['stages_ok']}/{len(STAGES)} stages ok")


def paired_counts(zm, pred_a, pred_b, y):
    """`(a right where b is wrong, b right where a is wrong)` over the test samples (classifiers only).

    The accuracy difference of two files is the difference of these counts over the sample count;
    when both are a handful, the files differ on a handful of borderline samples (an exact binomial
    test on the disagreements, McNemar's, would call it chance)."""
    if zm.segmentation:
        return None
    y = np.asarray(y)
    right_a = np.argmax(np.asarray(pred_a), axis=-1) == y
    right_b = np.argmax(np.asarray(pred_b), axis=-1) == y
    return int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))


def sign_test_p(a, b):
    """Two-sided exact binomial (McNemar) p-value of paired counts `a`, `b`: the chance of a split at least this
    uneven if each disagreement went either way with probability 1/2 (1.0 for no disagreement)."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a, b) + 1))
    return min(1.0, float(2 * tail / 2**n))


def float_fidelity(zm, pred, float_pred):
    """`(agreement, SQNR dB)` of a file's outputs with the float model's on the same test samples.

    Agreement: the share of samples whose top-1 class (segmentation: thresholded pixel) is the float
    model's. SQNR: `kq.analysis.error_stats` of the outputs. Unlike accuracy, both measure how
    closely the file follows the model it was made from, which is all quantization can do; two
    files' accuracies can differ by chance where each moves a different set of borderline samples."""
    from keras_quant.analysis import error_stats

    pred, float_pred = np.asarray(pred, np.float64), np.asarray(float_pred, np.float64)
    if zm.segmentation:
        agree = float(np.mean((pred > 0.5) == (float_pred > 0.5)))
    else:
        agree = float(np.mean(np.argmax(pred, axis=-1) == np.argmax(float_pred, axis=-1)))
    return agree, float(error_stats(float_pred, pred.reshape(float_pred.shape)).sqnr_db)


def _measure_kq_file(zm, cfg, row, kq_path, qmodel, conv_runner, conv_pred, x_fid, xt, yt, float_pred, log):
    """Figures of kq's int8 file: MACs, float ops, fidelity, accuracy, size and latency vs the converter's."""
    import bench_export

    try:
        with open(kq_path, "rb") as f:
            data = f.read()
        figs = mac_figures(data)
        row["macs"] = figs["macs"]
        row["int_mac_share"] = figs["int_mac_share"]
        row["float_ops"] = figs["float_ops"]
        row["float_op_names"] = figs["float_op_names"]
        row["size_kq_kb"] = len(data) / 1024
        runner = _load_runner(kq_path)
        kq_pred = _predict(runner, xt)
        row["acc_kq"] = zoo_models.accuracy(zm, kq_pred, yt)
        row["agree_kq"], row["sqnr_kq_db"] = float_fidelity(zm, kq_pred, float_pred)
        if row.get("acc_converter") is not None:
            row["acc_kq_minus_converter"] = row["acc_kq"] - row["acc_converter"]
            counts = paired_counts(zm, kq_pred, conv_pred, yt) if conv_pred is not None else None
            if counts is not None:
                row["kq_only_right"], row["converter_only_right"] = counts
                row["acc_p_value"] = sign_test_p(*counts)
        if row.get("size_converter_kb"):
            row["size_vs_converter"] = row["size_kq_kb"] / row["size_converter_kb"]
    except Exception as e:  # noqa: BLE001
        row["measure_error"] = _error_text(e)
        return
    try:
        q = runner.output_quantization
        keras_out = qmodel.predict(x_fid, batch_size=BATCH, verbose=0)
        keras_out = keras_out[0] if isinstance(keras_out, list) else keras_out
        row["fid_p99_steps"], row["fid_max_steps"] = fidelity_steps(_predict(runner, x_fid), keras_out,
                                                                    None if q is None else q[0])
    except Exception as e:  # noqa: BLE001
        row["fidelity_error"] = _error_text(e)
    try:
        runners = {"kq": runner}
        if conv_runner is not None:
            runners["converter"] = conv_runner
        times, _ = bench_export.round_robin_latency(runners, xt, cfg["rounds"], cfg["round_s"], cfg["warmup"],
                                                    min_runs=3, max_runs=1000)
        row["latency_kq_ms"] = 1000 * float(np.median(times["kq"]))
        if "converter" in times:
            row["latency_converter_ms"] = 1000 * float(np.median(times["converter"]))
            row["latency_vs_converter"] = bench_export.paired_ratio(times, "kq", "converter")
    except Exception as e:  # noqa: BLE001
        row["latency_error"] = _error_text(e)


# Worker processes ---------------------------------------------------------------------------
def _write_json(path, obj):
    from keras_quant.formatting import to_jsonable
    from keras_quant.io import write_atomic

    write_atomic(path, json.dumps(to_jsonable(obj)))


def worker(name, quick, out_path, folder):
    """Run one model (in its own process), writing its row to `out_path` after every step."""
    cfg = QUICK if quick else FULL
    zm = zoo_models.MODELS[name]
    progress = lambda row: _write_json(out_path, row)  # noqa: E731
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    run_model(zm, cfg, folder, log=log, progress=progress)


def run_in_subprocess(name, quick, folder, timeout, log):
    """The row of model `name` from a worker process; a crash or timeout is written into it."""
    out_path = os.path.join(folder, f"{name}.json")
    log_path = os.path.join(folder, f"{name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", out_path,
           "--worker-dir", folder] + (["--quick"] if quick else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.path.dirname(HERE) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    status = None
    with open(log_path, "w") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc, status = None, f"timed out after {timeout} s"
    try:
        with open(out_path) as f:
            row = json.load(f)
    except (OSError, ValueError):
        row = new_row(zoo_models.MODELS[name])
    if rc not in (0, None):
        status = f"worker died (exit {rc}{', signal ' + str(-rc) if rc < 0 else ''})"
    if status:
        for key in STAGES + ("converter",):
            if row.get(key) == "running":
                row[key] = status if rc is None else f"crashed: {status}"
        row["error"] = row.get("error") or status
        try:
            with open(log_path) as f:
                row["worker_log_tail"] = "".join(f.readlines()[-8:])[-1500:]
        except OSError:
            pass
    row["worker_s"] = time.perf_counter() - start
    row["stages_ok"] = sum(row.get(s) == "ok" for s in STAGES)
    for line in open(log_path, errors="replace"):
        if line.startswith(LOG_PREFIX):
            log("  " + line.rstrip())
    return row


# Tables --------------------------------------------------------------------------------------
STAGE_COLUMNS = ("model", "input", "params") + STAGES + ("converter",)
FIGURE_COLUMNS = ("model", "int_mac_share", "float_ops", "fid_p99_steps", "fid_max_steps", "acc_float", "acc_kq",
                  "acc_converter", "kq_only_right", "converter_only_right", "acc_p_value", "agree_kq", "agree_converter",
                  "sqnr_kq_db", "sqnr_converter_db", "acc_kq_onnx", "acc_kq_qat_file",
                  "size_kq_kb", "size_vs_converter",
                  "latency_kq_ms", "latency_vs_converter", "time_kq_s", "time_converter_s", "time_vs_converter",
                  "converter_int_mac_share", "figures_from", "float_op_names")


def _short(v, limit=90):
    return v if not isinstance(v, str) or len(v) <= limit else v[: limit - 3] + "..."


TIMING_COLUMNS = (("model", "train_s") + tuple(f"{s}_s" for s in STAGES)
                  + ("calibrate_full_s", "time_converter_s", "worker_s"))


def timing_rows(rows):
    return [{c: r.get(c) for c in TIMING_COLUMNS} for r in rows]


def stage_rows(rows):
    return [{c: _short(r.get(c)) for c in STAGE_COLUMNS} for r in rows]


def figure_rows(rows):
    return [{c: r.get(c) for c in FIGURE_COLUMNS} for r in rows]


def error_rows(rows):
    """Every failed stage with its full message (the stage table cuts them)."""
    out = []
    for r in rows:
        for s in STAGES + ("converter",):
            v = r.get(s)
            if isinstance(v, str) and v not in ("ok", NOT_RUN) and not v.startswith("skipped"):
                out.append({"model": r["model"], "stage": s, "error": v})
        for k in ("error", "measure_error", "fidelity_error", "latency_error"):
            if r.get(k):
                out.append({"model": r["model"], "stage": k, "error": r[k]})
    return out


def rows_from_log(text):
    """The finished rows a run logged (`ROW_PREFIX` lines): a run cut short can still be tabulated.
    A model logged twice (a rerun appended) keeps its place and its last row."""
    rows = {}
    for line in text.splitlines():
        i = line.find(ROW_PREFIX)
        if i >= 0:
            row = json.loads(line[i + len(ROW_PREFIX):])
            rows[row["model"]] = row
    return list(rows.values())


def tables_for(rows):
    """`(stage rows, {title: rows})`: the stage table, then targets, figures, failures and seconds."""
    per_model, summary = judge(rows)
    return stage_rows(rows), {
        "Targets per model": per_model,
        "Targets": summary,
        "Figures per model": figure_rows(rows),
        "Failures": error_rows(rows),
        "Seconds per stage": timing_rows(rows),
    }


def run(quick: bool, log=None, models=None) -> dict:
    """Every zoo model through every stage, each in a worker process.

    Returns:
        The runner's dict: `rows` (stage by stage), `tables` (targets per model and summary,
        figures per model, failures in full) and `notes`.
    """
    import keras

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if keras.backend.backend() != "tensorflow":
        return {"rows": [], "notes": [f"zoo needs the TensorFlow backend; skipped on {keras.backend.backend()}"]}
    cfg = QUICK if quick else FULL
    names = list(models or cfg["models"])
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kq_bench_zoo_") as folder:
        for name in names:
            log(f"  [zoo] {name} ...")
            row = run_in_subprocess(name, quick, folder, cfg["timeout"], log)
            rows.append(row)
            log(f"  [zoo] {name}: {row['stages_ok']}/{len(STAGES)} stages ok in {row['worker_s']:.0f} s: "
                + ", ".join(f"{s}={row.get(s)}" for s in STAGES + ("converter",)))
            log(ROW_PREFIX + json.dumps({k: v for k, v in row.items() if k != "tracebacks"}, default=str))
    stage_table, tables = tables_for(rows)
    notes = [
        f"{len(names)} models, {time.perf_counter() - start:.0f} s in all; each in its own worker process.",
        "Stage cells: `ok`, the exception (type: message, cut; see 'Failures'), `skipped (<stage> failed)` or "
        "`crashed: ...` / `timed out ...` when the worker died or ran out of time in that stage.",
        "int_mac_share: MACs of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / BATCH_MATMUL / TRANSPOSE_CONV / "
        "fused sequence ops whose activation input is int8 / int16, over all of them, every subgraph (WHILE "
        "bodies counted once); float_ops: compute ops touching a float32 activation. From kq's strict int8 file, "
        "or the strict=False file when the strict export refused (`figures_from`).",
        "fid_*_steps: |kq file output - Keras PTQ model output| / the file's output scale over the fidelity samples.",
        "acc_*: test accuracy (U-Net: pixel accuracy of the 0.5-thresholded mask) of the Keras float model, kq's "
        "int8 file, the converter's full-integer file of the same float model, kq's ONNX file and kq's QAT file. "
        "The models train briefly from scratch, so accuracies are modest; the comparisons are what count.",
        "latency_vs_converter: median over rounds of per-round kq / converter batch-1 latency, LiteRT, 1 thread; "
        "time_vs_converter: (calibrate + quantize + export) / (concrete function + converter PTQ).",
        f"Config: {json.dumps({k: v for k, v in cfg.items() if k != 'models'})}",
    ]
    return {"rows": stage_table, "tables": tables, "notes": notes, "models": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", help="run only these zoo models")
    parser.add_argument("--from-log", nargs="+", metavar="LOG",
                        help="only tabulate the rows (cut short) runs logged; a later log's row of a model wins")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    parser.add_argument("--converter-worker", help=argparse.SUPPRESS)
    parser.add_argument("--converter-path", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.converter_worker:
        return converter_worker(args.converter_worker, args.size, args.converter_path, args.worker_out)
    if args.worker:
        worker(args.worker, args.quick, args.worker_out, args.worker_dir)
        return 0

    if args.from_log:
        text = ""
        for path in args.from_log:
            with open(path, errors="replace") as f:
                text += f.read() + "\n"
        rows = rows_from_log(text)
        stage_table, tables = tables_for(rows)
        result = {"rows": stage_table, "tables": tables,
                  "notes": [f"{len(rows)} models read from {', '.join(args.from_log)}"]}
    else:
        result = run(args.quick, models=args.models)
    from common import print_result

    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
