"""Quantization-aware training past one process: every copy of the model ends with the same quantizer state.

`examples/distributed_qat.py` trains a small QAT model (moving-average
activation ranges, an LSQ head with a learned step size and offset, a folded
BatchNormalization, `kq.QATScheduler` moving every quantizer through
observe -> learn -> frozen) on the same global batches

- in two JAX processes on localhost with `keras.distribution.DataParallel`,
  each feeding its half of every global batch (JAX CI pass only: the
  processes are started with `KERAS_BACKEND=jax` whatever the parent's backend),
- under `tf.distribute.MirroredStrategy` on two logical CPU devices (TensorFlow),

and in one process on the whole global batches. The tests read the states
the example saves and check that the copies agree bit for bit (the
processes' shards differ, so a range or a counter reduced over one shard
only would differ between them) and agree with the single-process run to
float rounding. A test of the weight quantizer's straight-through gradient
at its own range bound, the float-rounding switch that made runs with
different reduction orders drift apart, comes first.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.layers.qat_quantizer import QATQuantizer
from tests.layers.test_qat_quantizer import Host, train_grads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "distributed_qat.py")
# The example's schedule (examples/distributed_qat.py): 6 steps, observe 2, BatchNorm frozen at 4, ranges at 5.
STEPS, OBSERVE_STEPS, FREEZE_BN_STEP, FREEZE_STEP = 6, 2, 4, 5


# 1. The weight range's own bound ------------------------------------------------------------
@pytest.mark.parametrize("learnable", [False, True])
def test_observed_weight_range_passes_the_gradient_of_its_largest_weight(learnable):
    """While a weight range is observed from the weights, every weight gets the straight-through gradient 1.

    Each channel's largest |w| lies on its range's bound; whether the
    closed-range mask counted it inside was decided by float rounding of
    `(m / qmax) * qmax` (for a fraction of a percent to a few percent of the
    values m, depending on the arithmetic), so a last-bit change of the
    weights (another reduction order: another device or process count)
    switched its gradient between 1 and 0. 4096 channels, each with its own m.
    """
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel", axis=-1, learnable=learnable)
    m = np.random.default_rng(0).uniform(0.05, 2.0, 4096).astype("float32")
    w = np.stack([m, -0.5 * m, 0.25 * m])
    host = Host(QATQuantizer(spec, role="weight"), w.shape, observing=True, frozen=False)
    y, dx, _ = train_grads(host, w)
    np.testing.assert_array_equal(dx, np.ones_like(w))
    np.testing.assert_allclose(y[0], m, rtol=1e-6)  # the largest weight is on the grid: 127 steps


def test_frozen_weight_range_still_clips_the_gradient():
    """Frozen, the range is fixed and a weight outside it gets gradient 0 as before."""
    spec = kq.QuantSpec(bits=4, symmetric=True)  # [-8, 7] steps
    host = Host(QATQuantizer(spec, role="weight"), (1, 3), observing=False, frozen=True)
    host.quantizer.set_range(host.state, 0.1, 0.0)
    _, dx, _ = train_grads(host, np.array([[0.3, 0.9, -0.2]], "float32"))
    np.testing.assert_array_equal(dx, [[1.0, 0.0, 1.0]])


# 2. Copies of a distributed run ------------------------------------------------------------------
def run_example(tmp_path, backend):
    """Run the example with this checkout's keras_quant; `(stdout, {copy name: state}, reference state)`."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    if backend == "jax":
        env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / backend
    proc = subprocess.run([sys.executable, EXAMPLE, "--backend", backend, "--out", str(out), "--timeout", "240"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = {f.stem: dict(np.load(f)) for f in sorted(out.glob("*.npz"))}
    reference = states.pop("reference")
    return proc.stdout, states, reference


@pytest.fixture(scope="module")
def jax_processes(tmp_path_factory):
    return run_example(tmp_path_factory.mktemp("dqat"), "jax")


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    return run_example(tmp_path_factory.mktemp("dqat"), "tensorflow")


def check_copies(stdout, states, reference, names):
    assert sorted(states) == names
    assert "states match" in stdout and "2 copies identical: True" in stdout, stdout
    first = states[names[0]]
    for name in names:
        assert sorted(states[name]) == sorted(reference)
        for key, value in reference.items():
            # Bit for bit between the copies (the shards differ: a per-shard range would not).
            np.testing.assert_array_equal(states[name][key], first[key], err_msg=f"{name} {key}")
            # And the single-process run on the global batches, to float rounding.
            atol = 1e-6 if key.startswith("quantizer/") else 1e-5
            np.testing.assert_allclose(states[name][key], value, rtol=1e-5, atol=atol, err_msg=f"{name} {key}")


def check_schedule(state):
    """Every quantizer layer counted every step and went observe -> learn -> frozen at the given steps."""
    def field(suffix):
        found = {k: v for k, v in state.items() if k.startswith("quantizer/") and k.endswith("/" + suffix)}
        assert found, suffix
        return found

    assert {float(v) for v in field("qat_step").values()} == {float(STEPS)}
    assert {float(v) for v in field("observe_until").values()} == {float(OBSERVE_STEPS)}
    assert {float(v) for v in field("freeze_at").values()} == {float(FREEZE_STEP)}
    assert {float(v) for v in field("bn_freeze_at").values()} == {float(FREEZE_BN_STEP)}
    # Moving ranges counted the observed batches only.
    assert {float(v) for v in field("seen").values()} == {float(OBSERVE_STEPS)}
    ranges = {k: v for k, v in state.items() if k.endswith("/max")}
    assert all(np.all(np.isfinite(v)) and np.all(v > 0) for v in ranges.values()), ranges
    # The head's LSQ step sizes learned (moved from 0) in the learn steps; its output offset exists.
    assert np.any(field("kernel_scale_delta")["quantizer/logits/kernel_scale_delta"] != 0)
    assert "quantizer/logits/output_offset_delta" in state


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the two-process run is the JAX CI pass's")
def test_jax_processes_agree_with_each_other_and_with_one_process(jax_processes):
    stdout, states, reference = jax_processes
    check_copies(stdout, states, reference, ["process0", "process1"])
    check_schedule(states["process0"])
    assert stdout.count("steps [6.0]  modes ['frozen']") == 3, stdout


@pytest.mark.tensorflow
@pytest.mark.slow
def test_mirrored_replicas_agree_with_each_other_and_with_one_device(mirrored):
    stdout, states, reference = mirrored
    check_copies(stdout, states, reference, ["replica0", "replica1"])
    check_schedule(states["replica0"])
