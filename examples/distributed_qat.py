"""Data-parallel quantization-aware training across processes (JAX) or replicas (TensorFlow).

Trains a small QAT model (Conv+BN+ReLU, Dense) on scikit-learn's digits (no
download) with data parallelism and shows that every process ends with the
same quantizer state: the moving-average activation ranges, the learned LSQ
step sizes and offsets of the head, the step counters and range-mode
schedule (`kq.QATScheduler`), and the weights. It also trains the same model
in one process on the same global batches and prints the largest difference
from it (float rounding only: the ranges are reduced over the *global*
batch, not each process's shard).

JAX (`keras.distribution`): the launcher starts two local CPU processes,
which meet at a coordinator on localhost, each feeding its own half of every
global batch (Keras' `DataParallel` builds the global batch from the
processes' shards, and the training step, compiled once for the global
batch, reduces over all of it):

    python examples/distributed_qat.py

Or start each process yourself, on one machine or several (each prints its
checksums; JAX runs on the CPU unless `JAX_PLATFORMS` says otherwise):

    python examples/distributed_qat.py --process-id 0 --num-processes 2 --coordinator host0:12345
    python examples/distributed_qat.py --process-id 1 --num-processes 2 --coordinator host0:12345

TensorFlow (`tf.distribute.MirroredStrategy` over two logical CPU devices
of one process; each replica gets half of every global batch and the
quantizers gather the replicas' ranges):

    python examples/distributed_qat.py --backend tensorflow

`--out DIR` writes every process's (replica's) state and the single-process
reference as `.npz` files. The exit status is 1 when the states differ.
"""

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile

GLOBAL_BATCH, STEPS = 64, 6
# The schedule: ranges observed for 2 steps, then the head's LSQ step sizes learn; BatchNorm
# statistics freeze at step 4 and every range at step 5.
OBSERVE_STEPS, FREEZE_BN_STEP, FREEZE_STEP = 2, 4, 5
TOLERANCE = 1e-4  # largest |difference| from the single-process run that counts as equal


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    parser.add_argument("--process-id", type=int, default=None, help="run as this process (JAX) instead of launching")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (default: a free local port)")
    parser.add_argument("--out", default=None, help="directory for the states as .npz files")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the launcher gives up")
    return parser.parse_args(argv)


def _split_cpu(n):
    """Make TensorFlow see `n` logical CPU devices (before it starts)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


if __name__ == "__main__":
    _BACKEND = parse_args().backend
    os.environ["KERAS_BACKEND"] = _BACKEND
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _BACKEND == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        _split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_quant as kq  # noqa: E402
from keras_quant.cli import datasets  # noqa: E402  (the offline example data)

L = keras.layers


def build_model():
    keras.utils.set_random_seed(0)  # every process builds the same initial weights
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inp)
    # TensorFlow: replicas normalise with the global batch's statistics, as one device does
    # (under JAX the compiled step already sees the global batch).
    x = L.BatchNormalization(momentum=0.9, synchronized=keras.backend.backend() == "tensorflow", name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Flatten(name="flatten")(L.MaxPooling2D(2, name="pool")(x))
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="digits_cnn")


def qat_config():
    """W8A8 with moving-average activation ranges; the head learns its step sizes (LSQ, 4-bit weights)."""
    config = kq.QuantConfig.int8()
    config.set_layer_name(
        "logits",
        weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", learnable=True),
        activations=kq.QuantSpec(bits=8, learnable=True),  # asymmetric: a learned offset too
    )
    return config


def global_batches():
    """`(x, y)`: STEPS global batches of GLOBAL_BATCH digits, in order."""
    (x, y), _ = datasets.load_digits()
    n = GLOBAL_BATCH * STEPS
    return x[:n], y[:n]


def local_shard(a, process_id, num_processes):
    """The rows of every global batch that `process_id` feeds: its contiguous part, in process order."""
    per = GLOBAL_BATCH // num_processes
    batches = a.reshape((STEPS, GLOBAL_BATCH) + a.shape[1:])
    return batches[:, process_id * per:(process_id + 1) * per].reshape((STEPS * per,) + a.shape[1:])


def train(x, y, batch_size):
    """The QAT model trained for one pass over `(x, y)` with the schedule."""
    qat = kq.quantize_model(build_model(), qat_config(), mode="qat")
    # SGD keeps the comparison with one process at float rounding. Any run whose sums add up in
    # another order (more devices, more processes, or one process with each batch's samples
    # permuted) differs in the last bits, and Adam, which divides each gradient by its running RMS,
    # enlarges the differences of near-zero gradients: with Adam(0.01) and 10 steps here, about 2e-6
    # in an LSQ step size, across processes as between two single-process runs.
    qat.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    schedule = kq.QATScheduler(observe_steps=OBSERVE_STEPS, freeze_bn_step=FREEZE_BN_STEP, freeze_step=FREEZE_STEP)
    qat.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[schedule])
    return qat


def _value(variable, replica):
    value = variable.value
    if replica is not None and hasattr(value, "values"):  # a tf.distribute variable: one copy per replica
        value = value.values[replica]
    return np.asarray(keras.ops.convert_to_numpy(value))


def state_of(qat, replica=None):
    """`{"quantizer/<path>": array, "weights/<path>": array}`: quantizer state, then every other variable.

    The quantizer state is every variable a QAT quantizer layer owns itself
    (ranges, scales, zero points, LSQ deltas, step counter and schedule),
    not those of the layer it wraps or a folded BatchNormalization.
    """
    quantizer = set()
    for layer in kq.qat.quantizer_layers(qat):
        inner = {id(v) for sub in (getattr(layer, "layer", None), getattr(layer, "batch_norm", None))
                 if sub is not None for v in sub.variables}
        quantizer |= {id(v) for v in layer.variables if id(v) not in inner}
    return {("quantizer/" if id(v) in quantizer else "weights/") + v.path: _value(v, replica) for v in qat.variables}


def checksum(state, group):
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(group + "/")):
        digest.update(key.encode() + np.ascontiguousarray(state[key], "float32").tobytes())
    return digest.hexdigest()[:16]


def describe(label, qat, state):
    steps = sorted({float(keras.ops.convert_to_numpy(q.schedule.step)) for q in kq.qat.quantizer_layers(qat)})
    print(f"{label}: quantizer state {checksum(state, 'quantizer')}  weights {checksum(state, 'weights')}  "
          f"steps {steps}  modes {sorted(set(kq.qat.modes(qat).values()))}", flush=True)


def max_differences(state, reference):
    """`{group: max |difference|}` over the quantizer state and the weights (infinite thresholds equal)."""
    out = {}
    for group in ("quantizer", "weights"):
        diffs = [0.0]
        for key in (k for k in reference if k.startswith(group + "/")):
            a, b = np.asarray(state[key], "float64"), np.asarray(reference[key], "float64")
            same = a == b  # also where both are inf (a threshold not set)
            diffs.append(float(np.max(np.where(same, 0.0, np.abs(a - b)), initial=0.0)))
        out[group] = max(diffs)
    return out


def save(out, name, state):
    if out:
        np.savez(os.path.join(out, f"{name}.npz"), **state)


def run_process(args):
    """One JAX process of a multi-process data-parallel run."""
    keras.distribution.initialize(args.coordinator, args.num_processes, args.process_id)
    # The processes feed their own shards (numpy arrays); Keras assembles the global batch.
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices(), auto_shard_dataset=False))
    if GLOBAL_BATCH % len(keras.distribution.list_devices()):
        raise SystemExit(f"the global batch {GLOBAL_BATCH} does not split over {keras.distribution.list_devices()}")
    x, y = global_batches()
    n = args.num_processes
    qat = train(local_shard(x, args.process_id, n), local_shard(y, args.process_id, n), GLOBAL_BATCH // n)
    state = state_of(qat)
    describe(f"process {args.process_id}/{n}", qat, state)
    save(args.out, f"process{args.process_id}", state)


def reference_run(out):
    """The same training in this process alone, on the same global batches."""
    x, y = global_batches()
    qat = train(x, y, GLOBAL_BATCH)
    state = state_of(qat)
    describe("single process", qat, state)
    save(out, "reference", state)
    return state


def report(states, reference):
    """Print the comparison; True when every copy matches the others bit for bit and the reference closely."""
    names = sorted(states)
    first = states[names[0]]
    identical = all(max(max_differences(states[n], first).values()) == 0.0 for n in names)
    print(f"{len(names)} copies identical: {identical}")
    worst = 0.0
    for name in names:
        diff = max_differences(states[name], reference)
        worst = max(worst, *diff.values())
        print(f"{name} vs single process: max |diff| quantizer state {diff['quantizer']:.3g}, "
              f"weights {diff['weights']:.3g}")
    return identical and worst <= TOLERANCE


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args, out):
    """Start `num_processes` local JAX processes, train the reference meanwhile, and compare."""
    coordinator = args.coordinator or f"localhost:{_free_port()}"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--process-id", str(i),
                               "--num-processes", str(args.num_processes), "--coordinator", coordinator,
                               "--out", out], env=env)
             for i in range(args.num_processes)]
    try:
        reference = reference_run(out)
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        print(f"a process failed: exit codes {codes}")
        return False
    states = {f"process {i}": dict(np.load(os.path.join(out, f"process{i}.npz"))) for i in range(args.num_processes)}
    return report(states, reference)


def run_mirrored(out):
    """TensorFlow: MirroredStrategy over two logical CPU devices, against one device."""
    import tensorflow as tf

    x, y = global_batches()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        qat = train(x, y, GLOBAL_BATCH)
    states = {}
    for replica in range(strategy.num_replicas_in_sync):
        states[f"replica {replica}"] = state = state_of(qat, replica)
        describe(f"replica {replica}/{strategy.num_replicas_in_sync}", qat, state)
        save(out, f"replica{replica}", state)
    return report(states, reference_run(out))


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        if args.out:
            os.makedirs(out, exist_ok=True)
        if keras.backend.backend() == "tensorflow":
            ok = run_mirrored(out)
        elif args.process_id is not None:
            run_process(args)
            return 0
        else:
            ok = launch(args, out)
    print("states match" if ok else "STATES DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
