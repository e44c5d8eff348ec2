"""MinMaxObserver and MovingAverageMinMaxObserver against numpy references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.observers import MinMaxObserver, MovingAverageMinMaxObserver
from tests.conftest import to_np


def ref_moving_average(batches, c, reduce_axes):
    lo = hi = None
    for b in batches:
        b_lo, b_hi = b.min(axis=reduce_axes), b.max(axis=reduce_axes)
        if lo is None:
            lo, hi = b_lo, b_hi
        else:
            lo, hi = lo + c * (b_lo - lo), hi + c * (b_hi - hi)
    return lo, hi


@pytest.mark.parametrize(
    "shape, granularity, axis, reduce_axes",
    [
        ((6, 5), "per_tensor", -1, None),
        ((6, 5), "per_channel", -1, (0,)),
        ((4, 3, 2, 5), "per_channel", 1, (0, 2, 3)),
        ((4, 3, 2, 5), "per_channel", -1, (0, 1, 2)),
    ],
)
def test_minmax_matches_numpy(shape, granularity, axis, reduce_axes, rng):
    batches = [rng.normal(size=shape).astype("float32") * (i + 1) for i in range(4)]
    obs = MinMaxObserver(granularity=granularity, axis=axis)
    for b in batches:
        obs.update(b)
    lo, hi = obs.compute_range()
    allx = np.concatenate(batches)
    np.testing.assert_array_equal(lo, allx.min(axis=reduce_axes))
    np.testing.assert_array_equal(hi, allx.max(axis=reduce_axes))


@pytest.mark.parametrize("axis", [0, -1])
def test_per_group_matches_tensor_range(axis, rng):
    w = rng.normal(size=(16, 8)).astype("float32")
    spec = kq.QuantSpec(granularity="per_group", axis=axis, group_size=4)
    obs = MinMaxObserver(granularity="per_group", axis=axis, group_size=4).update(w)
    lo, hi = obs.compute_range()
    ref_lo, ref_hi = kq.ops.tensor_range(w, spec)
    np.testing.assert_array_equal(lo, to_np(ref_lo))
    np.testing.assert_array_equal(hi, to_np(ref_hi))
    assert obs.get_config()["group_size"] == 4
    scale, zp = obs.compute_qparams(spec)
    ref_scale, ref_zp = kq.ops.tensor_qparams(w, spec)
    np.testing.assert_array_equal(scale, to_np(ref_scale))
    np.testing.assert_array_equal(zp, to_np(ref_zp))


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 3, 6]), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_minmax_is_split_invariant(sizes, seed, scale):
    x = (np.random.default_rng(seed).normal(size=(sum(sizes), 3)) * scale).astype("float32")
    obs = MinMaxObserver(granularity="per_channel")
    start = 0
    for n in sizes:
        obs.update(x[start : start + n])
        start += n
    lo, hi = obs.compute_range()
    np.testing.assert_array_equal(lo, x.min(axis=0))
    np.testing.assert_array_equal(hi, x.max(axis=0))


def test_minmax_spelled_out():
    obs = MinMaxObserver()
    obs.update([[-1.0, 2.0], [0.5, 0.25]]).update([3.0, np.nan]).update([[-0.5]])
    assert obs.compute_range() == (-1.0, 3.0)
    assert int(to_np(obs.non_finite_count)) == 1


@pytest.mark.parametrize("granularity, reduce_axes", [("per_tensor", None), ("per_channel", (0,))])
def test_moving_average_by_hand(granularity, reduce_axes, rng):
    batches = [(rng.normal(size=(8, 4)) * (1 + i % 3) + i).astype("float32") for i in range(6)]
    obs = MovingAverageMinMaxObserver(averaging_constant=0.3, granularity=granularity)
    for b in batches:
        obs.update(b)
    ref_lo, ref_hi = ref_moving_average(batches, 0.3, reduce_axes)
    lo, hi = obs.compute_range()
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-5, atol=1e-5)


def test_moving_average_spelled_out():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    assert obs.update([0.0, 2.0]).compute_range() == (0.0, 2.0)  # the first batch sets it
    assert obs.update([-4.0, 4.0]).compute_range() == (-2.0, 3.0)
    assert obs.update([np.nan]).compute_range() == (-2.0, 3.0)  # no finite data: unchanged


def test_moving_average_first_batch_per_channel():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5, granularity="per_channel")
    obs.update([[1.0, np.nan], [3.0, np.nan]])  # channel 1 sees nothing yet
    obs.update([[5.0, -2.0], [5.0, 2.0]])
    lo, hi = obs.compute_range()
    np.testing.assert_array_equal(lo, [3.0, -2.0])  # channel 0 averaged, channel 1 set directly
    np.testing.assert_array_equal(hi, [4.0, 2.0])


def test_moving_average_constant_one_keeps_last_batch(rng):
    obs = MovingAverageMinMaxObserver(averaging_constant=1.0)
    obs.update(rng.normal(size=100) * 10)
    last = rng.normal(size=100).astype("float32")
    lo, hi = obs.update(last).compute_range()
    assert (lo, hi) == (float(last.min()), float(last.max()))


def test_moving_average_per_group(rng):
    w1, w2 = rng.normal(size=(8, 2)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    spec = kq.QuantSpec(granularity="per_group", group_size=4)
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5, granularity="per_group", group_size=4)
    lo, hi = obs.update(w1).update(w2).compute_range()
    (l1, h1), (l2, h2) = [tuple(to_np(t) for t in kq.ops.tensor_range(w, spec)) for w in (w1, w2)]
    np.testing.assert_allclose(lo, (l1 + l2) / 2, rtol=1e-6)
    np.testing.assert_allclose(hi, (h1 + h2) / 2, rtol=1e-6)


@pytest.mark.parametrize("c", [0.0, -0.1, 1.5, "0.1", True, None])
def test_invalid_averaging_constant(c):
    with pytest.raises(ConfigError) as info:
        MovingAverageMinMaxObserver(averaging_constant=c)
    assert info.value.field == "averaging_constant"


def test_moving_average_config():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.2, granularity="per_group", group_size=8, axis=0)
    config = obs.get_config()
    # Written as Keras' momentum; the older key still loads (configs saved before carry it).
    assert config["momentum"] == pytest.approx(0.8) and config["group_size"] == 8 and "averaging_constant" not in config
    assert MovingAverageMinMaxObserver.from_config(config).get_config() == config
    old = {k: v for k, v in config.items() if k != "momentum"} | {"averaging_constant": 0.2}
    assert MovingAverageMinMaxObserver.from_config(old).get_config() == config


def test_moving_average_momentum_matches_averaging_constant():
    x1, x2 = np.array([-1.0, 3.0], "float32"), np.array([-5.0, 1.0], "float32")
    a = MovingAverageMinMaxObserver(momentum=0.75).update(x1).update(x2).compute_range()
    b = MovingAverageMinMaxObserver(averaging_constant=0.25).update(x1).update(x2).compute_range()
    assert a == b == (-2.0, 2.5)
    assert MovingAverageMinMaxObserver().momentum == 0.99
    with pytest.raises(ConfigError) as info:
        MovingAverageMinMaxObserver(momentum=1.0)
    assert info.value.field == "momentum"
    with pytest.raises(ConfigError):
        MovingAverageMinMaxObserver(momentum=0.5, averaging_constant=0.5)


def test_moving_average_arguments_are_keyword_only():
    # The first positional argument used to be averaging_constant: a positional call must not
    # silently read it as momentum.
    with pytest.raises(TypeError):
        MovingAverageMinMaxObserver(0.1)
