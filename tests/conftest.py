"""Shared test set-up.

Tests marked `tensorflow` need the TensorFlow backend; every other test is
backend-agnostic and also runs under `KERAS_BACKEND=jax` in CI.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
from hypothesis import settings

if keras.backend.backend() == "jax":
    import jax

    # Reference comparisons want float32 arithmetic; on NVIDIA GPUs JAX's default
    # convolution / matmul precision is TF32 (about 1e-3 relative error).
    jax.config.update("jax_default_matmul_precision", "highest")

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
