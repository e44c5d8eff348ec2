"""`CalibrationCallback` on a small CNN: predict overhead, time against TFLite's calibration, memory.

A CNN (Conv2D+BatchNorm+ReLU+MaxPool twice, GlobalAveragePooling, Dense) is trained for one epoch
on a subset of Fashion-MNIST (`keras_quant.cli.datasets`; the scikit-learn digits when Fashion-MNIST is
not installed, said in the notes), with a fixed seed. Then, all in the same run:

1. overhead: `model.predict(x, batch_size=B)` with a fresh `CalibrationCallback` (activation
   observer "minmax", "mse", "percentile") over the same call without it. Attaching the callback
   rebuilds (retraces) the predict function, a one-off cost per call, so two figures: the
   end-to-end ratio on the 1000-sample calibration set, and the steady-state per-batch ratio (the
   marginal cost of one more batch: `(T(long) - T(calib)) / (batches(long) - batches(calib))` on
   each side, which cancels every fixed cost). The fixed cost the callback adds (state creation,
   hooks, retrace) is reported beside it, and `cb.result` (where the range searches run) on its own.
2. against TFLite: `model.predict(samples, callbacks=[cb])` + `cb.result` over the TFLite
   converter's int8 conversion with a `representative_dataset` of the same samples (batch 1),
   from a SavedModel written by `model.export`; calibration alone is taken as the int8 conversion
   minus a float conversion of the same SavedModel.
3. memory: peak RSS growth (a background thread samples psutil's RSS) and `cb.state_bytes` when
   calibrating on n small vs n large samples streamed from `tf.data` (1000 source images repeated),
   so the data is never all in memory; the state must be the same size.
4. issue 17 (`speed_rows`, batch 200): marginal cost per sample (full / range statistics) and a first
   calibrating call over plain predict, float model to int8 file over the TFLite converter, RSS per call.
"""

import gc
import os
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np

SEED = 0
BATCH = 32
CALIB = 1000
# (observer, statistics): the full statistics, and statistics="range" (only what the observer needs).
OBSERVERS = (("minmax", "full"), ("minmax", "range"), ("mse", "full"), ("mse", "range"), ("percentile", "full"))
TARGETS = {"minmax": 1.3, "mse": 2.0, "percentile": 2.0}  # issue: <= 1.3x min-max, <= 2x histogram
QUICK = {"train": 2000, "warmup": 1, "repeats": 1, "tflite_samples": 200, "tflite_repeats": 1,
         "memory": (1000, 20000)}
FULL = {"train": 10000, "warmup": 1, "repeats": 5, "tflite_samples": 1000, "tflite_repeats": 3, "tflite_large": 5000,
        "memory": (1000, 100000)}


# Data and model ------------------------------------------------------------------------
def load_data(n_train):
    """`(x_train, y_train, x_test, dataset_name)`; digits when Fashion-MNIST is missing."""
    from keras_quant.cli import datasets

    if datasets.fashion_mnist_available():
        (x, y), (xt, _) = datasets.load_fashion_mnist(limit_train=n_train)
        return x, y, xt, "fashion_mnist"
    (x, y), (xt, _) = datasets.load_digits()
    xt = np.concatenate([xt, x])  # digits has 1797 images in all: calibrate on what there is
    return x[:n_train], y[:n_train], xt, "digits"


def build_model(input_shape):
    import keras
    from keras import layers

    keras.utils.set_random_seed(SEED)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(16, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ],
        name="fmnist_cnn",
    )


def trained_model(x, y):
    import keras

    model = build_model(x.shape[1:])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    hist = model.fit(x, y, batch_size=64, epochs=1, shuffle=True, verbose=0)
    return model, float(hist.history["accuracy"][-1])


def make_callback(observer, **kwargs):
    """A fresh callback; `observer` is a name or an `(observer, statistics)` pair."""
    import keras_quant as kq

    if isinstance(observer, tuple):
        observer, mode = observer
        kwargs.setdefault("statistics", mode)
    config = kq.QuantConfig(activations=kq.QuantSpec(bits=8, observer=observer))
    return kq.CalibrationCallback(config=config, **kwargs)


# Timing --------------------------------------------------------------------------------
def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    return statistics.median(_time(fn) for _ in range(repeats))


def _batches(n):
    return -(-n // BATCH)


class BatchTimer:
    """A Keras callback recording `perf_counter()` at the end of every predict batch."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def on_predict_begin(self, logs=None):
                self.ends = []

            def on_predict_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

        return _Timer()


def steady_batch_seconds(ends):
    """Median interval between consecutive batch ends, leaving out the first batch (it holds the
    trace) and the partial last one."""
    gaps = np.diff(ends[:-1])
    return float(np.median(gaps)) if len(gaps) else float("nan")


def overhead_rows(model, x_calib, warmup, repeats):
    """Rows: end-to-end and steady-state ratio of predict with / without the callback."""

    def timed(observer=None):
        timer = BatchTimer()
        cbs = ([make_callback(observer)] if observer else []) + [timer]
        start = time.perf_counter()
        model.predict(x_calib, batch_size=BATCH, verbose=0, callbacks=cbs)
        return time.perf_counter() - start, steady_batch_seconds(timer.ends), cbs[0]

    def measure(observer, n):
        runs = [timed(observer) for _ in range(n)]
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2]

    def baseline():
        # Re-measured beside each observer; the faster of before / after is kept. Cheap: more repeats.
        for _ in range(warmup):
            timed()
        return measure(None, max(repeats, 3))[:2]

    def cold():
        # A predict whose step is traced in the call, as the first predict after loading or
        # training a model is: the fair peer of a calibrating predict, which traces its step.
        model.predict_function = None
        return timed()[0]

    b_total, b_batch = baseline()
    cold_total = statistics.median(cold() for _ in range(max(repeats, 3)))
    for _ in range(warmup):  # first callback-ful call: one-time imports and TF set-up, shared by all observers
        timed(OBSERVERS[0])
    n_batches = _batches(len(x_calib))
    rows, extra = [], []
    for obs_case in OBSERVERS:
        obs, stats_mode = obs_case
        # Each call with a fresh callback retraces, so it is its own warm-up: none per observer.
        c_total, c_batch, cb = measure(obs_case, repeats)
        result_s = median_seconds(lambda: cb.result, 0, max(repeats, 3))
        a_total, a_batch = baseline()
        b_total, b_batch = min(b_total, a_total), min(b_batch, a_batch)
        steady, e2e = c_batch / b_batch, c_total / b_total
        fixed_c, fixed_b = c_total - n_batches * c_batch, b_total - n_batches * b_batch
        target = TARGETS[obs]
        rows.append({"case": f"overhead end-to-end ({len(x_calib)} samples)", "observer": obs, "statistics": stats_mode, "ratio": e2e,
                     "with_ms": c_total * 1e3, "without_ms": b_total * 1e3, "target": f"<= {target}x",
                     "met": e2e <= target})
        rows.append({"case": f"overhead end-to-end vs a first predict ({len(x_calib)} samples)", "observer": obs,
                     "statistics": stats_mode, "ratio": c_total / cold_total, "with_ms": c_total * 1e3,
                     "without_ms": cold_total * 1e3, "target": f"<= {target}x", "met": c_total / cold_total <= target})
        rows.append({"case": "overhead steady state (per batch)", "observer": obs, "statistics": stats_mode, "ratio": steady,
                     "with_ms": c_batch * 1e3, "without_ms": b_batch * 1e3, "target": f"<= {target}x",
                     "met": steady <= target})
        extra.append({"observer": obs, "statistics": stats_mode, "fixed_cost_added_ms": (fixed_c - fixed_b) * 1e3,
                      "fixed_with_ms": fixed_c * 1e3, "fixed_without_ms": fixed_b * 1e3,
                      "share_of_e2e_overhead": (fixed_c - fixed_b) / max(c_total - b_total, 1e-9),
                      "result_ms": result_s * 1e3})
    return rows, extra


# Profile of the compiled collector ------------------------------------------------------
def collector_profile(model, x, warmup, repeats):
    """Compiled per-batch time of the collector's parts on the first conv's output, over the conv itself."""
    import keras
    import tensorflow as tf
    from keras_quant.calibration.stats import LayerCollector
    from keras_quant.config import QuantSpec
    from keras_quant.observers import HistogramObserver, MinMaxObserver

    conv = model.layers[0]
    t = tf.constant(x[:BATCH])
    act = conv(t)
    shape = tuple(act.shape)
    parts = {
        "LayerCollector (all of it)": lambda: LayerCollector(QuantSpec(bits=8)),
        "HistogramObserver(minmax) alone": lambda: HistogramObserver(num_bins=2048, method="minmax"),
        "per-channel MinMaxObserver alone": lambda: MinMaxObserver(granularity="per_channel", axis=-1),
        "per-tensor MinMaxObserver alone": lambda: MinMaxObserver(),
    }

    @tf.function(jit_compile=False)
    def ref(v):
        return conv(v)

    rows = []
    ref_s = median_seconds(lambda: ref(t), warmup + 1, repeats * 3)
    for label, factory in parts.items():
        obs = factory()
        obs.build(shape)

        @tf.function(jit_compile=False)
        def step(v, obs=obs):
            obs(v) if isinstance(obs, LayerCollector) else obs.update(v)
            return keras.ops.sum(v)

        s = median_seconds(lambda: step(act), warmup + 1, repeats * 3)
        rows.append({"part": label, "tensor": "x".join(map(str, shape)), "ms": s * 1e3, "conv_ms": ref_s * 1e3,
                     "ratio_to_conv": s / ref_s})
    return rows


# TFLite --------------------------------------------------------------------------------
def tflite_rows(model, x_calib, n, repeats):
    import tensorflow as tf

    samples = x_calib[:n]
    tmp = tempfile.mkdtemp(prefix="kq_bench_calib_")
    try:
        saved = os.path.join(tmp, "saved_model")
        export_s = _time(lambda: model.export(saved, format="tf_saved_model", verbose=False))

        def rep():
            for i in range(len(samples)):
                yield [samples[i : i + 1]]

        def convert(int8):
            converter = tf.lite.TFLiteConverter.from_saved_model(saved)
            if int8:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = rep
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            return converter.convert()

        convert(False)  # warm-up: loads the converter
        float_s = median_seconds(lambda: convert(False), 0, repeats)
        int8_s = median_seconds(lambda: convert(True), 0, repeats)
        float_s = min(float_s, median_seconds(lambda: convert(False), 0, repeats))
        tfl_calib = max(int8_s - float_s, 1e-9)

        def ours(mode):
            cb = make_callback(("minmax", mode))
            model.predict(samples, batch_size=BATCH, verbose=0, callbacks=[cb])
            _ = cb.result
            return cb

        kq_s = median_seconds(lambda: ours("full"), 0, repeats)
        kq_range_s = median_seconds(lambda: ours("range"), 0, repeats)
        kq_mse_s = median_seconds(lambda: (lambda cb: cb.result)(_predict_cb(model, samples, "mse")), 0, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {"case": f"kq calibration / TFLite calibration ({n} samples)", "observer": "minmax", "statistics": "full",
         "ratio": kq_s / tfl_calib, "with_ms": kq_s * 1e3, "without_ms": tfl_calib * 1e3, "target": "< 1x",
         "met": kq_s / tfl_calib < 1.0},
        {"case": f"kq calibration / TFLite calibration ({n} samples)", "observer": "minmax", "statistics": "range",
         "ratio": kq_range_s / tfl_calib, "with_ms": kq_range_s * 1e3, "without_ms": tfl_calib * 1e3,
         "target": "< 1x", "met": kq_range_s / tfl_calib < 1.0},
        {"case": f"kq calibration / TFLite calibration ({n} samples)", "observer": "mse",
         "ratio": kq_mse_s / tfl_calib, "with_ms": kq_mse_s * 1e3, "without_ms": tfl_calib * 1e3, "target": "< 1x",
         "met": kq_mse_s / tfl_calib < 1.0},
        {"case": f"kq calibration / TFLite whole int8 conversion ({n} samples)", "observer": "minmax",
         "ratio": kq_s / int8_s, "with_ms": kq_s * 1e3, "without_ms": int8_s * 1e3},
    ]
    detail = {"export_ms": export_s * 1e3, "tflite_float_convert_ms": float_s * 1e3,
              "tflite_int8_convert_ms": int8_s * 1e3, "tflite_calibration_ms": tfl_calib * 1e3,
              "kq_minmax_ms": kq_s * 1e3, "kq_minmax_range_ms": kq_range_s * 1e3, "kq_mse_ms": kq_mse_s * 1e3, "samples": n}
    return rows, detail


def _predict_cb(model, x, observer):
    cb = make_callback(observer)
    model.predict(x, batch_size=BATCH, verbose=0, callbacks=[cb])
    return cb


# Memory --------------------------------------------------------------------------------
class PeakRSS:
    """Samples the process RSS in a background thread; `peak - start` is the growth.

    `collect=False` skips the `gc.collect()` on entry (it takes about a second in a process that
    holds many TensorFlow graphs; bench_peers measures dozens of files).
    """

    def __init__(self, interval=0.005, collect=True):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.collect = collect

    def __enter__(self):
        if self.collect:
            gc.collect()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.end = self._proc.memory_info().rss
        return False


def memory_rows(model, x_source, sizes):
    import tensorflow as tf

    def dataset(n):
        return tf.data.Dataset.from_tensor_slices(x_source).repeat().take(n).batch(BATCH)

    # Warm-up of the dataset path (the callback side was warmed up by the sections before).
    model.predict(dataset(4 * BATCH), verbose=0)
    rows = []
    for n in sizes:
        with PeakRSS() as plain:
            model.predict(dataset(n), verbose=0)
        cb = make_callback("mse")
        with PeakRSS() as m:
            model.predict(dataset(n), verbose=0, callbacks=[cb])
        rows.append({"samples": n, "samples_seen": cb.samples_seen, "state_bytes": cb.state_bytes,
                     "peak_rss_growth_mb": (m.peak - m.start) / 2**20,
                     "peak_rss_growth_no_callback_mb": (plain.peak - plain.start) / 2**20,
                     "rss_after_minus_before_mb": (m.end - m.start) / 2**20})
    return rows


# Issue 17: calibration at the cost of predict ------------------------------------------
SPEED_BATCH = 200
SPEED_TARGETS = {"marginal full": 2.0, "marginal range": 1.2, "first call": 1.5, "float to int8 file": 1.5}
QUICK_SPEED = {"small": 800, "large": 4000, "repeats": 1, "first": 1200, "tflite": 300, "rss_calls": 8}
FULL_SPEED = {"small": 4000, "large": 24000, "repeats": 3, "first": 4000, "tflite": 1000, "rss_calls": 20}


def _calibrate(model, x, statistics="full", cb=None):
    import keras_quant as kq

    cb = cb or kq.CalibrationCallback(statistics=statistics)
    model.predict(x, batch_size=SPEED_BATCH, verbose=0, callbacks=[cb])
    _ = cb.result
    return cb


def marginal_rows(model, pool, small, large, repeats):
    """Marginal cost of one more sample: the median interval between batch ends of a long calibrating
    `predict` (`large` samples; one warmed-up callback per kind, whose compiled step is reused) over the
    same for plain `predict`, per sample, interleaved; medians over `repeats`. (The difference of two
    calls' wall times, `T(large) - T(small)`, measures the same but swings by tens of percent from run
    to run: it carries the data adapter's copy and the calls' fixed costs.)"""
    del small  # the per-batch intervals of the long call need no second call to cancel fixed costs

    def call(cb=None):
        timer = BatchTimer()
        model.predict(pool[:large], batch_size=SPEED_BATCH, verbose=0, callbacks=[timer] + ([cb] if cb else []))
        return float(np.median(np.diff(timer.ends[5:]))) / SPEED_BATCH

    callbacks = {k: _calibrate(model, pool[:large], k) for k in ("full", "range")}  # traced and optimised
    per = {k: [] for k in ("plain", "full", "range")}
    for _ in range(repeats):
        for k in per:
            per[k].append(call(callbacks.get(k)))
    med = {k: statistics.median(v) for k, v in per.items()}
    rows = []
    for k in ("full", "range"):
        ratio, target = med[k] / med["plain"], SPEED_TARGETS[f"marginal {k}"]
        rows.append({"case": f"marginal cost per sample, statistics={k!r} / plain predict", "ratio": ratio,
                     "with_ms": med[k] * 1e3, "without_ms": med["plain"] * 1e3, "target": f"<= {target}x",
                     "met": ratio <= target})
    return rows


def first_call_rows(model, x, repeats):
    """A first calibrating call (fresh callback: hooks, trace, compile, run, `cb.result`) over a first
    plain predict (a fresh predict function: Keras traces and compiles it in the call), interleaved."""
    plain, calib = [], {"full": [], "range": []}
    for _ in range(repeats):
        model.predict_function = None
        plain.append(_time(lambda: model.predict(x, batch_size=SPEED_BATCH, verbose=0)))
        for k in calib:
            calib[k].append(_time(lambda k=k: _calibrate(model, x, k)))
    p = statistics.median(plain)
    rows = []
    for k, times in calib.items():
        c = statistics.median(times)
        target = SPEED_TARGETS["first call"]
        rows.append({"case": f"first calibrating call incl. cb.result ({len(x)} samples), statistics={k!r} / "
                             "first plain predict", "ratio": c / p, "with_ms": c * 1e3, "without_ms": p * 1e3,
                     "target": f"<= {target}x", "met": c / p <= target})
    return rows


def float_to_file_rows(model, x, repeats):
    """Float model to int8 .tflite file: ours (predict with the callback, `kq.quantize_model`,
    `kq.export_tflite(mode="int8")`) over the TFLite converter's own (representative dataset of the same
    samples at batch 1, Optimize.DEFAULT, int8 builtins), the faster of from_keras_model and
    model.export + from_saved_model (each writing its file)."""
    import tensorflow as tf
    import keras_quant as kq

    tmp = tempfile.mkdtemp(prefix="kq_bench_f2f_")
    parts = {"calibrate": [], "quantize": [], "export": []}

    def rep():
        for i in range(len(x)):
            yield [x[i : i + 1]]

    def converter(c):
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = rep
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        with open(os.path.join(tmp, "peer.tflite"), "wb") as f:
            f.write(c.convert())

    def from_keras():
        converter(tf.lite.TFLiteConverter.from_keras_model(model))

    def from_saved():
        path = os.path.join(tmp, f"saved_{time.perf_counter_ns()}")
        model.export(path, format="tf_saved_model", verbose=False)
        converter(tf.lite.TFLiteConverter.from_saved_model(path))

    def ours():
        t0 = time.perf_counter()
        result = _calibrate(model, x).result
        t1 = time.perf_counter()
        q = kq.quantize_model(model, calibration=result)
        t2 = time.perf_counter()
        kq.export_tflite(q, os.path.join(tmp, "ours.tflite"), mode="int8")
        for name, dt in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            parts[name].append(dt)

    try:
        from_keras()  # warm-up of both sides: converter and export code loaded once
        ours()
        for v in parts.values():
            v.clear()
        times = {"from_keras_model": [], "saved_model": [], "ours": []}
        for _ in range(repeats):
            for name, fn in zip(times, (from_keras, from_saved, ours)):
                times[name].append(_time(fn))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    peer = min(med["from_keras_model"], med["saved_model"])
    target = SPEED_TARGETS["float to int8 file"]
    row = {"case": f"float model to int8 .tflite ({len(x)} samples) / TFLite converter", "ratio": med["ours"] / peer,
           "with_ms": med["ours"] * 1e3, "without_ms": peer * 1e3, "target": f"<= {target}x",
           "met": med["ours"] / peer <= target}
    detail = {f"{k}_ms": v * 1e3 for k, v in med.items()} | {
        f"ours_{k}_ms": statistics.median(v) * 1e3 for k, v in parts.items()}
    return [row], detail


def rss_per_call(model, x, calls):
    """MiB of resident memory per calibrating call (slope over `calls` calls, after a full collection
    each time), with one callback reused and with a fresh callback per call."""
    import psutil

    proc = psutil.Process()
    out = {}
    for label, reuse in (("same callback", True), ("fresh callback", False)):
        cb = [_calibrate(model, x, cb=cb if reuse else None) for cb in [_calibrate(model, x)] * 3][-1]  # warm-up
        rss = []
        for _ in range(calls):
            _calibrate(model, x, cb=cb if reuse else None)
            gc.collect()
            rss.append(proc.memory_info().rss / 2**20)
        out[label] = float(np.polyfit(np.arange(calls), rss, 1)[0])
    return [{"case": f"RSS growth per calibrating call ({calls} calls, {len(x)} samples, {label})", "mib_per_call": v,
             "target": "< 0.1 MiB", "met": v < 0.1} for label, v in out.items()]


def speed_rows(model, pool, quick):
    cfg = QUICK_SPEED if quick else FULL_SPEED
    large = min(cfg["large"], len(pool) // SPEED_BATCH * SPEED_BATCH)
    _calibrate(model, pool[:400])  # one-time process set-up (first traces of the shared update functions)
    rows = marginal_rows(model, pool, cfg["small"], large, cfg["repeats"])
    rows += first_call_rows(model, pool[: cfg["first"]], cfg["repeats"])
    f2f, detail = float_to_file_rows(model, pool[: cfg["tflite"]], cfg["repeats"])
    return rows + f2f, detail, rss_per_call(model, pool[:400], cfg["rss_calls"])


# Entry point ---------------------------------------------------------------------------
def run(quick: bool) -> dict:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("bench_calibration needs KERAS_BACKEND=tensorflow (CalibrationCallback hooks TF's trainer)")
    cfg = QUICK if quick else FULL
    x, y, x_test, data_name = load_data(cfg["train"])
    model, acc = trained_model(x, y)
    x_calib = x_test[:CALIB]
    speed, speed_detail, rss = speed_rows(model, np.concatenate([x_test, x]), quick)
    rows, fixed = overhead_rows(model, x_calib, cfg["warmup"], cfg["repeats"])
    rows = speed + rows
    tfl_rows, tfl_detail = tflite_rows(model, x_calib, min(cfg["tflite_samples"], len(x_calib)),
                                       cfg["tflite_repeats"])
    rows += tfl_rows
    if cfg.get("tflite_large"):  # the callback's cost is mostly fixed: the ratio falls as samples grow
        large_rows, _ = tflite_rows(model, x_test, min(cfg["tflite_large"], len(x_test)), 1)
        rows += large_rows
    try:
        profile = collector_profile(model, x_calib, cfg["warmup"], cfg["repeats"])
    except Exception as e:  # noqa: BLE001 - a diagnostic; keep the rest
        profile = [{"error": f"{type(e).__name__}: {e}"[:300]}]
    memory = memory_rows(model, x_test[:1000], cfg["memory"])
    equal = len({r["state_bytes"] for r in memory}) == 1

    notes = []
    if data_name != "fashion_mnist":
        notes.append("WARNING: Fashion-MNIST not installed (Debian's dataset-fashion-mnist); used scikit-learn's "
                     "8x8 digits instead.")
    notes += [
        "issue 17 rows (first four; batch 200): marginal = (T(large) - T(small)) / (large - small) per sample, "
        "each calibrating call with a fresh CalibrationCallback (its fixed cost cancels), plain predict with "
        "the model's compiled step, interleaved, medians; first call = fresh callback (hooks, trace, compile, "
        "run, cb.result) over a plain predict whose predict_function was reset (Keras traces it in the call); "
        "float to int8 file = predict+callback, kq.quantize_model, kq.export_tflite(mode='int8') over the "
        "TFLiteConverter int8 conversion with a representative_dataset of the same samples at batch 1, the "
        "faster of from_keras_model and model.export + from_saved_model, each writing its file.",
        f"model: Conv2D(16)+BN+ReLU+MaxPool, Conv2D(32)+BN+ReLU+MaxPool, GlobalAveragePooling, Dense(10), trained "
        f"1 epoch on {len(x)} {data_name} images (seed {SEED}; train accuracy {acc:.3f}). "
        f"Batch size {BATCH}; CPU, jit_compile='auto' (no XLA on CPU).",
        f"overhead rows: ratio = median time of model.predict(x) with a fresh CalibrationCallback(QuantConfig("
        f"activations=QuantSpec(observer=...))) / without, same data and batch size (callback side: median of "
        f"{cfg['repeats']} call(s), each with a fresh callback, hence its own retrace, after {cfg['warmup']} shared "
        f"warm-up call; reference: median of {max(cfg['repeats'], 3)} after warm-up, measured before and after each "
        f"observer, faster kept). end-to-end: on the {CALIB}-sample calibration set, including the callback's "
        f"state creation and the retrace of the predict function (one trace per distinct batch shape: {CALIB} = "
        f"{CALIB // BATCH} x {BATCH} + {CALIB % BATCH}, so two traces). steady state: median interval between "
        f"consecutive on_predict_batch_end calls inside those same calls, leaving out the first batch (which "
        f"holds the trace) and the partial last one; *_ms are then per batch. Fixed cost (second table) = "
        f"total - batches x steady per-batch time, with minus without.",
        "statistics='full' keeps, per tensor, exact moments, zero count, a 2048-bin histogram and per-channel "
        "min/max whatever the observer; statistics='range' keeps only what the observer needs (min/max for "
        "minmax, plus the histogram for mse/percentile). 'mse' and 'percentile' search the histogram only when "
        "cb.result is read (result_ms, not in the predict times).",
        "TFLite rows: TFLite side = TFLiteConverter.from_saved_model(model.export(...)) with "
        "optimizations=[Optimize.DEFAULT], representative_dataset yielding the same samples one at a time "
        "(batch 1), supported_ops=[TFLITE_BUILTINS_INT8], minus a float conversion (no optimizations) of the same "
        "SavedModel: so it is calibration plus the quantization rewrite (weights, qparams), not calibration alone; "
        "the export itself is in neither side. The last TFLite row compares with the whole int8 conversion. "
        "kq side = model.predict(samples, batch_size=32, callbacks=[fresh CalibrationCallback]) + cb.result "
        "(including the retrace; not the quantized model's construction).",
        f"memory: predict on tf.data.Dataset.from_tensor_slices(1000 images).repeat().take(n).batch({BATCH}) with "
        "CalibrationCallback(observer='mse'); peak RSS growth sampled every 5 ms by a psutil thread from the start "
        "of the call, and the same predict without the callback for reference (predict keeps all outputs: n x 10 "
        f"float32). state_bytes equal for both sizes: {equal}.",
        "collector profile: per-batch compiled (tf.function) time of the collector and its parts on the first "
        "conv's output, over that conv's own compiled time on the same batch (a diagnostic of where the in-graph "
        "time goes).",
    ]
    if not equal:
        notes.append("WARNING: cb.state_bytes differ between the two sizes (state should be fixed-size)")
    return {
        "rows": rows,
        "tables": {
            "Issue 17: RSS per calibrating call": rss,
            "Issue 17: float model to int8 file, parts (ms, medians)": [speed_detail],
            "Fixed cost of the callback per predict call, and cb.result": fixed,
            "TFLite converter detail": [tfl_detail],
            "Collector profile (compiled, one batch)": profile,
            "Memory (streamed from tf.data)": memory,
        },
        "notes": notes,
        "dataset": data_name,
        "backend": keras.backend.backend(),
    }
