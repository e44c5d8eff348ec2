"""Shared test set-up.

Tests marked `tensorflow` need the TensorFlow backend; every other test is
backend-agnostic and also runs under `KERAS_BACKEND=jax` in CI.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("KERAS_BACKEND") == "jax":
    # Under pytest-xdist (`-n 2`) every worker is one process per core: under JAX each runs an op
    # on one thread instead of a pool per core, so that two workers do not oversubscribe two cores.
    # Set before JAX starts (it reads them once). Not under TensorFlow: one intra-op thread changes
    # the float reduction order in training, and with it the trained export CNN, enough to fail
    # tests/export/test_onnx.py's exact uint8-vs-int8 onnxruntime comparison.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import keras
import numpy as np
import pytest
from hypothesis import settings

if keras.backend.backend() == "jax":
    import atexit
    import shutil
    import tempfile

    import jax

    # Reference comparisons want float32 arithmetic; on NVIDIA GPUs JAX's default
    # convolution / matmul precision is TF32 (about 1e-3 relative error).
    jax.config.update("jax_default_matmul_precision", "highest")

    # Eager JAX compiles the same programs again and again: every eager `ops.cond` (the observers'
    # and collectors' finite / non-finite paths) traces fresh lambdas, so JAX's in-memory cache
    # misses and XLA compiles both branches on every call (about a second each on a CI core), and
    # every new model recompiles its `fit` / `predict` step. A compilation cache keyed by the
    # program (this process's own directory: no worker reads another's half-written entry) makes
    # each repeat a lookup; the programs, and what the tests check, are unchanged.
    _jax_cache = tempfile.mkdtemp(prefix="kq-tests-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == "tensorflow":
        return
    needs_tf = pytest.mark.skipif(True, reason=f"needs the TensorFlow backend, running {keras.backend.backend()}")
    for item in items:
        if "tensorflow" in item.keywords:
            item.add_marker(needs_tf)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def to_np(x):
    """A backend tensor (or anything array-like) as a numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))
