"""`kq.ops.weight_range`: the weights' clipping-range search, against a brute-force numpy reference."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.ops import core
from tests.conftest import to_np
from tests.ops.test_core import ref_fake_quant, ref_qparams


def ref_weight_range(w, spec, ratios=core.WEIGHT_SEARCH_RATIOS):
    """Per channel (last axis) or per tensor, float64: the shrunk min-max range of least MSE."""
    w = np.asarray(w, np.float64)
    if spec.granularity == "per_tensor":
        cols = w.reshape(-1, 1)
    else:
        cols = np.moveaxis(w, spec.axis, -1).reshape(-1, w.shape[spec.axis])
    lo, hi = cols.min(axis=0), cols.max(axis=0)
    best_r, best_err = np.ones_like(lo), None
    for r in ratios:
        scale, zp = ref_qparams(lo * r, hi * r, spec)
        err = np.mean((ref_fake_quant(cols, scale, zp, spec) - cols) ** 2, axis=0)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_r, best_err = np.where(better, r, best_r), np.where(better, err, best_err)
    lo, hi = lo * best_r, hi * best_r
    return (lo[0], hi[0]) if spec.granularity == "per_tensor" else (lo, hi)


def mse(w, spec, lo, hi):
    w = np.asarray(w, np.float64)
    scale, zp = ref_qparams(lo, hi, spec)
    return float(np.mean((ref_fake_quant(w, scale, zp, spec) - w) ** 2))


def spec(bits, observer="mse", granularity="per_channel", symmetric=True):
    return kq.QuantSpec(bits=bits, symmetric=symmetric, narrow_range=symmetric, granularity=granularity,
                        observer=observer)


WEIGHTS = hnp.arrays(np.float32, (24, 6), elements=st.floats(-4, 4, width=32))


@settings(max_examples=40, deadline=None)
@given(w=WEIGHTS, bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans())
def test_search_never_does_worse_than_minmax_in_any_channel(w, bits, symmetric):
    s = spec(bits, symmetric=symmetric)
    lo, hi = (to_np(v) for v in kq.ops.weight_range(w, s))
    mlo, mhi = (to_np(v) for v in kq.ops.tensor_range(w, s))
    assert np.all(np.abs(lo) <= np.abs(mlo) + 1e-6) and np.all(np.abs(hi) <= np.abs(mhi) + 1e-6)  # shrunk to 0
    for c in range(w.shape[1]):
        col = w[:, c]
        assert mse(col, s, lo[c], hi[c]) <= mse(col, s, mlo[c], mhi[c]) * (1 + 1e-4) + 1e-12


@settings(max_examples=30, deadline=None)
@given(w=hnp.arrays(np.float32, (40, 5), elements=st.floats(-2, 2, width=32)),
       bits=st.sampled_from([3, 4]), granularity=st.sampled_from(["per_channel", "per_tensor"]))
def test_matches_the_brute_force_reference(w, bits, granularity):
    s = spec(bits, granularity=granularity)
    lo, hi = (to_np(v) for v in kq.ops.weight_range(w, s))
    rlo, rhi = ref_weight_range(w, s)
    # float32 against float64: a near-tie between two candidates may go either way; then both errors agree.
    for c in range(1 if granularity == "per_tensor" else w.shape[1]):
        col = w.reshape(-1) if granularity == "per_tensor" else w[:, c]
        got = (np.ravel(lo)[c], np.ravel(hi)[c])
        want = (np.ravel(rlo)[c], np.ravel(rhi)[c])
        if not np.allclose(got, want, rtol=1e-5, atol=1e-7):
            assert mse(col, s, *got) == pytest.approx(mse(col, s, *want), rel=1e-3, abs=1e-12)


def test_an_outlier_is_clipped_at_4_bits_and_error_falls():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 4)).astype("float32")
    w[0] = 12.0  # one large weight per channel
    s = spec(4)
    lo, hi = (to_np(v) for v in kq.ops.weight_range(w, s))
    assert np.all(hi < 12.0 * 0.9)
    scale, zp = (to_np(v) for v in kq.ops.weight_qparams(w, s))
    mscale, _ = (to_np(v) for v in kq.ops.tensor_qparams(w, s))
    assert np.all(scale < mscale)
    assert mse(w, s, lo, hi) < 0.7 * mse(w, s, *(to_np(v) for v in kq.ops.tensor_range(w, s)))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "kl", "mean_std", "moving_average"])
def test_other_observers_take_minmax(observer):
    w = np.random.default_rng(1).standard_normal((16, 3)).astype("float32")
    s = spec(4, observer=observer)
    for a, b in zip(kq.ops.weight_range(w, s), kq.ops.tensor_range(w, s)):
        np.testing.assert_array_equal(to_np(a), to_np(b))


def test_auto_searches_like_mse_and_per_group_has_one_range_per_group():
    w = np.random.default_rng(2).standard_normal((64, 3)).astype("float32")
    for a, b in zip(kq.ops.weight_range(w, spec(4, "auto")), kq.ops.weight_range(w, spec(4, "mse"))):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    g = kq.QuantSpec(bits=4, granularity="per_group", group_size=16, observer="mse")
    lo, hi = kq.ops.weight_range(w, g)
    assert to_np(lo).shape == (3, 4) and np.all(to_np(lo) <= 0) and np.all(to_np(hi) >= 0)


def test_bad_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="ratios"):
        kq.ops.weight_range(np.ones((4, 2), "float32"), spec(4), ratios=(1.0, 1.5))


def test_ptq_and_qat_wrappers_use_the_search():
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(8)
    model = keras.Sequential([keras.Input((32,)), layer])
    w = np.random.default_rng(3).standard_normal((32, 8)).astype("float32")
    w[0] = 10.0
    layer.kernel.assign(w)
    weights = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True, observer="mse")
    config = kq.QuantConfig(weights=weights, activations=None)
    want = to_np(kq.ops.weight_qparams(w, weights)[0])
    minmax = to_np(kq.ops.tensor_qparams(w, weights)[0])
    assert np.all(want <= minmax) and np.any(want < minmax)
    for mode in ("ptq", "qat"):
        q = kq.quantize_model(model, config, mode=mode)
        wrapper = next(lay for lay in q.layers if isinstance(lay, kq.QuantizeWrapper))
        np.testing.assert_allclose(to_np(wrapper.weight_qparams["kernel"][0]), want, rtol=1e-6)


def test_stochastic_rounding_spec_searches_the_deterministic_grid():
    w = np.random.default_rng(4).standard_normal((32, 4)).astype("float32")
    s = spec(4)
    for a, b in zip(kq.ops.weight_range(w, s.replace(stochastic_rounding=True)), kq.ops.weight_range(w, s)):
        np.testing.assert_array_equal(to_np(a), to_np(b))
