"""How `kq.CalibrationCallback`'s step runs compiled: one trace for every batch size, replicas.

- `trace_once(function)`: Keras' compiled predict step traced once for any
  batch size, run unoptimised for its first `UNOPTIMIZED_STEPS` calls;
- `replica_context()` / `gather(x)`: under a `tf.distribute` strategy with
  several replicas in sync (MirroredStrategy, MultiWorkerMirroredStrategy),
  the step's tensors concatenated over the replicas, so every replica folds
  in the whole global batch.

TensorFlow only (the callback hooks TensorFlow's trainer); on another
backend `replica_context()` is None and `gather` returns its input.

Example:

>>> model.predict_function = trace_once(model.predict_function)   # doctest: +SKIP
"""

import contextlib

import keras

import keras_quant.graph as graph_lib

__all__ = ["replica_context", "gather", "trace_once", "UNOPTIMIZED_STEPS"]


def replica_context():
    """The TF replica context when several replicas run in sync, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def gather(x):
    """`x` (a tensor or a structure) concatenated over replicas along the batch axis."""
    ctx = replica_context()
    if ctx is None or x is None:
        return x
    import tensorflow as tf

    def gather(t):
        # Multi-worker: the inputs carry no device, a collective needs one (a copy here gets the replica's).
        if isinstance(t, tf.Tensor) and not t.device:
            t = tf.identity(t)
        return ctx.all_gather(t, axis=0)

    return keras.tree.map_structure(gather, x)


# Steps of a calibrating predict run unoptimised before the graph is optimised (see `trace_once`). The switch
# instantiates the graph again through Grappler, about 0.3 s for full statistics on benchmarks/bench_calibration.py's
# CNN, and saves about 4-5 ms a step (batch 200) after it: it pays after about 60 steps, so a calibration of up
# to 64 batches (2048 samples at batch 32, the common case) never pays it, and a longer one soon recovers it.
UNOPTIMIZED_STEPS = 64


def trace_once(function):
    """`function` (Keras' compiled predict step) traced once, for any batch size.

    Keras traces its step for the first batch's shape, then again, relaxed,
    for a different (the last, partial) batch. With the observers in the step
    each trace and first run of a graph is costly, so the first call traces
    straight away for inputs whose batch dimension is None; later calls of
    any batch size use that trace.

    The first `UNOPTIMIZED_STEPS` calls run the graph as traced, without
    Grappler (`graph.unoptimized_functions`): optimising it costs more than
    the steps of a calibration on a few hundred samples take. A longer one
    then switches to the optimised graph, instantiated once more.
    """
    import tensorflow as tf

    state = {"calls": 0}

    def relaxed(t):
        if isinstance(t, tf.Tensor) and t.shape.rank:
            return tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype)
        return t

    def call(data):
        state["calls"] += 1
        if state["calls"] > UNOPTIMIZED_STEPS:
            return function(data)
        first = state["calls"] == 1
        with graph_lib.unoptimized_functions(), graph_lib.gc_paused() if first else contextlib.nullcontext():
            if first:  # the trace and the first run of the graph, with no garbage collection in the middle
                try:
                    function.get_concrete_function(tf.nest.map_structure(relaxed, data))
                except (TypeError, ValueError):  # a structure the spec cannot describe: trace as Keras does
                    pass
            return function(data)

    return call
