"""The build-time numpy forms (`numpy_qparams`, `numpy_weight_qparams`, `fold_batch_norm`) give the same bits
as the `keras.ops` forms they stand in for on TensorFlow, whose files they must reproduce.

TensorFlow only: on JAX, XLA's CPU kernels round the last bit of some float32 results (reciprocals and
quotients of the scales) differently from numpy and TensorFlow, so the forms there agree to one ulp, not bit
for bit (seen in CI: 1071.4702 against 1071.4703).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_quant as kq
from keras_quant.layers.folding import fold_batch_norm, fold_factor_and_bias, scale_channels
from tests.conftest import to_np

pytestmark = pytest.mark.tensorflow

SPECS = [
    kq.QuantSpec(bits=8),
    kq.QuantSpec(bits=8, symmetric=True, narrow_range=True),
    kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel"),
    kq.QuantSpec(bits=3, granularity="per_channel", axis=0),
    kq.QuantSpec(bits=16, symmetric=True),
    kq.QuantSpec(bits=2),
    kq.QuantSpec(bits=4, granularity="per_group", group_size=4),
    kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=2, axis=0),
]


def same_bits(a, b):
    a, b = np.asarray(to_np(a)), np.asarray(to_np(b))
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _weights(rng, scale_exp):
    x = rng.normal(size=(4, 6, 8)).astype("float32") * np.float32(10.0 ** scale_exp)
    x[0, 0, :3] = [0.0, -0.0, 0.0]
    return x


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("scale_exp", [-8, -3, 0, 4])
def test_numpy_weight_qparams_is_bit_identical(spec, scale_exp, rng):
    x = _weights(rng, scale_exp)
    want = kq.ops.weight_qparams(x, spec)
    got = kq.ops.numpy_weight_qparams(x, spec)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int32
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


@pytest.mark.parametrize("x", [np.full((3, 4), 7.5, "float32"), np.zeros((3, 4), "float32"),
                               np.array([[np.nan, 1.0], [2.0, -np.inf]], "float32"), np.arange(12).reshape(3, 4)])
@pytest.mark.parametrize("spec", SPECS[:4] + [kq.QuantSpec(bits=4, symmetric=True, observer="mse")], ids=str)
def test_numpy_weight_qparams_edge_cases(x, spec):
    want = kq.ops.weight_qparams(x, spec)
    got = kq.ops.numpy_weight_qparams(x, spec)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
    if spec.observer == "mse" and not np.isfinite(x).all():
        # No candidate's error is a number: the search keeps the first ratio (1.0), min-max's range.
        minmax = kq.ops.weight_qparams(x, spec.replace(observer="minmax"))
        assert same_bits(want[0], minmax[0]) and same_bits(want[1], minmax[1])


big = float(np.float32(1e30))
finite = st.floats(-big, big, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(lo=hnp.arrays(np.float32, 5, elements=finite), hi=hnp.arrays(np.float32, 5, elements=finite),
       bits=st.integers(2, 16), symmetric=st.booleans(), narrow=st.booleans())
def test_numpy_qparams_is_bit_identical(lo, hi, bits, symmetric, narrow):
    spec = kq.QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow)
    want = kq.ops.compute_qparams(lo, hi, spec)
    got = kq.ops.numpy_qparams(lo, hi, spec)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (0.0, 0.0), (2.0, 5.0), (-np.inf, 1.0), (np.nan, 1.0), (-1e30, 1e30), (-3e38, 3e38)])
def test_numpy_qparams_scalars(lo, hi):
    spec = kq.QuantSpec(bits=8)
    want = kq.ops.compute_qparams(lo, hi, spec)
    got = kq.ops.numpy_qparams(lo, hi, spec)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


@pytest.mark.parametrize("axes, shape", [((-1,), (3, 3, 4, 6)), ((-2, -1), (3, 3, 3, 2)), ((-2,), (3, 3, 6, 5))])
@pytest.mark.parametrize("with_bias, gamma, beta", [(True, True, True), (False, False, False), (False, True, False)])
def test_fold_batch_norm_matches_keras_ops_fold(axes, shape, with_bias, gamma, beta, rng):
    kernel = rng.normal(size=shape).astype("float32")
    channels = int(np.prod([shape[a] for a in axes]))

    def vec(low=-2.0, high=2.0):
        return rng.uniform(low, high, channels).astype("float32")

    bias, g, b = vec() if with_bias else None, vec() if gamma else None, vec() if beta else None
    mean, var = vec(), vec(0.01, 3.0)
    factor, want_bias = fold_factor_and_bias(bias, g, b, mean, var, 1.001e-3)
    want_kernel = scale_channels(kernel, factor, axes)
    got_kernel, got_bias = fold_batch_norm(kernel, bias, g, b, mean, var, 1.001e-3, axes)
    assert same_bits(got_kernel, want_kernel) and same_bits(got_bias, want_bias)
