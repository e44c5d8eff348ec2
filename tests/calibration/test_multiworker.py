"""CalibrationCallback under MultiWorkerMirroredStrategy: two worker processes on localhost.

`model.predict(dataset, callbacks=[cb])` on each worker of a two-worker
cluster must give both workers the same result, equal to one process
calibrating the same full dataset.

What "all the data" is: every worker builds the same `tf.data` pipeline of
the full dataset, batched by the global batch size; `predict` distributes it
with the default auto-shard policy, which for in-memory data is `DATA`: each
global batch is split into per-replica batches and each worker reads its own
share (a short last batch leaves one worker an empty share). The callback
all-gathers every replica's share in the step, so each worker folds in the
whole global batch, the batches one process reads.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import keras_quant as kq

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

SAMPLES, BATCH = 65, 8  # the last global batch holds one sample: one worker gets none of it

WORKER = textwrap.dedent('''
    import json, os, sys
    index, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
    import tensorflow as tf
    import keras_quant as kq
    from test_multiworker import OPTIONS, build_model, dataset

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
    for suffix, options in OPTIONS.items():
        cb = kq.CalibrationCallback(num_bins=128, **options)
        model.predict(dataset(), callbacks=[cb], verbose=0)
        cb.result.save(out + suffix + ".json")
''')

# Every sample, and a seeded random subset capped at 40 (the sampler and the budget see the gathered batch).
OPTIONS = {"all": {}, "sampled": {"max_samples": 40, "sampling": "random", "seed": 3}}


def build_model():
    """A small CNN with fixed weights (every process builds the same one)."""
    import keras

    inputs = keras.Input((5, 5, 2), name="image")
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="dense")(h))
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def dataset():
    """The full calibration data as `tf.data`, batched by the global batch, auto-shard policy DATA."""
    import tensorflow as tf

    x = np.random.default_rng(1).standard_t(4, size=(SAMPLES, 5, 5, 2)).astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices(x).batch(BATCH).with_options(options)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiworker")
    (root / "worker.py").write_text(WORKER)
    ports = f"{_free_port()},{_free_port()}"
    repo = str(Path(kq.__file__).resolve().parents[1])
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([repo, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen([sys.executable, str(root / "worker.py"), str(i), ports, str(root / f"w{i}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return {suffix: [kq.CalibrationResult.load(root / f"w{i}{suffix}.json") for i in range(2)] for suffix in OPTIONS}


@pytest.mark.parametrize("suffix, samples", [("all", SAMPLES), ("sampled", 40)])
def test_every_worker_gets_the_one_process_result(worker_results, suffix, samples):
    first, second = worker_results[suffix]
    assert json.dumps(first.to_dict()["layers"]) == json.dumps(second.to_dict()["layers"])
    assert first.metadata["samples_seen"] == second.metadata["samples_seen"] == samples

    cb = kq.CalibrationCallback(num_bins=128, **OPTIONS[suffix])
    build_model().predict(dataset(), callbacks=[cb], verbose=0)
    single = cb.result
    assert cb.samples_seen == samples
    assert first.layer_names == single.layer_names
    for name in single:
        a, b = first[name], single[name]
        assert (a.count, a.num_samples, a.non_finite_count) == (b.count, b.num_samples, b.non_finite_count), name
        assert (a.min, a.max, a.sparsity) == (b.min, b.max, b.sparsity), name
        np.testing.assert_array_equal(a.channel_min, b.channel_min)
        np.testing.assert_array_equal(a.channel_max, b.channel_max)
        for field in ("mean", "std", "skewness", "kurtosis"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5, abs=1e-6), (name, field)
        np.testing.assert_allclose(a.histogram, b.histogram, atol=1e-3)
        assert a.zero_point == b.zero_point and a.scale == pytest.approx(b.scale, rel=1e-6)
