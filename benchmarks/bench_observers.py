"""Observer `update` throughput, and the histogram observer's memory over many updates.

Each observer's `update(x)` on a 1M-element float32 tensor is timed against a
plain `keras.ops.max(x)` of the same tensor in the same run: the figure is the
ratio of medians (after warm-up), so it says how many full-tensor reductions
an update costs, whatever the machine's speed.

- eager: `observer.update(x)` and `keras.ops.max(x)` called directly.
- compiled (TensorFlow backend only): both wrapped in
  `tf.function(jit_compile=False)`, traced during warm-up.

Memory: the histogram observer's state (`Observer.state_bytes`, its variables' bytes) after
1 update and after 1000 must be equal; the process RSS delta is reported too
(psutil if installed, else `resource`'s peak RSS).
"""

import gc
import statistics
import sys
import time

import keras
import numpy as np

SHAPE = (1000, 1000)  # 1M elements; per-channel: 1000 channels on axis -1
QUICK = {"warmup": 2, "repeats": 5, "memory_updates": 1000, "memory_shape": (64, 1024)}
FULL = {"warmup": 3, "repeats": 15, "memory_updates": 1000, "memory_shape": SHAPE}


def observer_factories():
    """`(label, factory)` for every observer measured."""
    from keras_quant import observers as obs

    return [
        ("MinMaxObserver", lambda: obs.MinMaxObserver()),
        ("MovingAverageMinMaxObserver", lambda: obs.MovingAverageMinMaxObserver()),
        ("MeanStdObserver", lambda: obs.MeanStdObserver()),
        ("PercentileObserver", lambda: obs.PercentileObserver()),
        ("HistogramObserver(mse)", lambda: obs.HistogramObserver(method="mse")),
        ("HistogramObserver(kl)", lambda: obs.HistogramObserver(method="kl")),
        ("MinMaxObserver(per_channel)", lambda: obs.MinMaxObserver(granularity="per_channel", axis=-1)),
    ]


# Timing -------------------------------------------------------------------------------
def _sync(value):
    """Wait for asynchronous backends (JAX dispatch) so the time covers the work."""
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(value)
    return value


def _state(observer):
    return [v.value for v in observer.variables]


def median_seconds(fn, warmup, repeats):
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _eager_fns(observer, x):
    def update():
        observer.update(x)
        _sync(_state(observer))

    def reference():
        _sync(keras.ops.max(x))

    return update, reference


def _compiled_fns(observer, x):
    import tensorflow as tf

    @tf.function(jit_compile=False)
    def update_fn(t):
        observer.update(t)

    @tf.function(jit_compile=False)
    def max_fn(t):
        return keras.ops.max(t)

    return (lambda: update_fn(x)), (lambda: max_fn(x))


def time_observers(x, warmup, repeats, log=None):
    """Rows of eager (and on TF, compiled) update time as a ratio to `keras.ops.max`."""
    compiled = keras.backend.backend() == "tensorflow"
    # One reference per mode, re-measured beside each observer (interleaved) so drift
    # in the machine's speed during the run cancels in the ratio.
    rows = []
    for label, factory in observer_factories():
        row = {"observer": label}
        modes = [("eager", _eager_fns)] + ([("compiled", _compiled_fns)] if compiled else [])
        for mode, make in modes:
            try:
                observer = factory()
                update, reference = make(observer, x)
                ref = median_seconds(reference, warmup, repeats)
                t = median_seconds(update, warmup, repeats)
                ref = min(ref, median_seconds(reference, 1, repeats))  # after, too: take the faster
                row[f"{mode}_ratio"] = t / ref
                row[f"{mode}_ms"] = t * 1e3
                row[f"{mode}_max_ms"] = ref * 1e3
            except Exception as e:  # noqa: BLE001 - one observer failing should not hide the rest
                row[f"{mode}_ratio"] = None
                row[f"{mode}_error"] = f"{type(e).__name__}: {e}"[:200]
        if not compiled:
            row["compiled_ratio"] = None  # not measured on this backend
        rows.append(row)
        if log:
            log(row)
    return rows


# Memory ----------------------------------------------------------------------------------
def _rss_bytes():
    """(current RSS in bytes, how it was measured)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss, "psutil rss"
    except ImportError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024), "resource peak rss"


def histogram_memory(shape, updates, seed=0):
    """State bytes and RSS of a HistogramObserver after 1 and after `updates` updates."""
    from keras_quant.observers import HistogramObserver

    rng = np.random.default_rng(seed)
    # A few tensors of different spreads, so the histogram's range keeps growing.
    batches = [
        keras.ops.convert_to_tensor((rng.standard_normal(shape) * s).astype("float32")) for s in (0.5, 1.0, 2.0, 4.0)
    ]
    observer = HistogramObserver(method="mse")
    def update(t):
        observer.update(t)  # (update may return the observer, which tf.function cannot return)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        update = tf.function(update, jit_compile=False)  # 1000 eager updates would dominate the run
    gc.collect()
    rss0, how = _rss_bytes()
    update(batches[0])
    _sync(_state(observer))
    state1 = observer.state_bytes
    gc.collect()
    rss1, _ = _rss_bytes()
    for i in range(1, updates):
        update(batches[i % len(batches)])
    _sync(_state(observer))
    stateN = observer.state_bytes
    gc.collect()
    rssN, _ = _rss_bytes()
    return {
        "tensor_shape": "x".join(map(str, shape)),
        "state_bytes_after_1": state1,
        f"state_bytes_after_{updates}": stateN,
        "state_equal": state1 == stateN,
        "rss_delta_mb_after_1": (rss1 - rss0) / 2**20,
        f"rss_delta_mb_1_to_{updates}": (rssN - rss1) / 2**20,
        "rss_method": how,
    }


def run(quick: bool) -> dict:
    cfg = QUICK if quick else FULL
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).standard_normal(SHAPE).astype("float32"))
    rows = time_observers(x, cfg["warmup"], cfg["repeats"])
    try:
        memory = histogram_memory(cfg["memory_shape"], cfg["memory_updates"])
    except Exception as e:  # noqa: BLE001 - keep the timing table
        memory = {"error": f"{type(e).__name__}: {e}"[:300], "state_equal": None, "rss_method": None}
    notes = [
        f"update(x) on a float32 tensor of shape {SHAPE}; *_ratio = median update time / median "
        f"keras.ops.max(x) time in the same run ({cfg['repeats']} repeats after {cfg['warmup']} warm-up).",
        "compiled: tf.function(jit_compile=False) around both calls (TensorFlow backend only; blank on JAX).",
        "*_ms: median seconds x 1000 of the update and of the reference max (noisy; compare ratios).",
        f"memory: HistogramObserver(method='mse') state = Observer.state_bytes; RSS delta "
        f"by {memory['rss_method']} ({'compiled' if keras.backend.backend() == 'tensorflow' else 'eager'} updates).",
    ]
    if memory["state_equal"] is False:
        notes.append("WARNING: histogram state grew between 1 and 1000 updates")
    return {
        "rows": rows,
        "tables": {"HistogramObserver memory": [memory]},
        "notes": notes,
        "backend": keras.backend.backend(),
    }
