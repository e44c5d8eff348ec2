"""Behaviour every observer shares: pass-through, compiled updates, NaN policy, state size,
reset, config and saving. Each observer is run against a fresh one updated eagerly."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.errors import ConfigError, NoDataError, NonFiniteError, ShapeMismatchError
from keras_quant.observers import (
    HistogramObserver,
    MeanStdObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    PercentileObserver,
)
from tests.conftest import to_np

FACTORIES = {
    "minmax": lambda **kw: MinMaxObserver(**kw),
    "moving_average": lambda **kw: MovingAverageMinMaxObserver(averaging_constant=0.25, **kw),
    "mean_std": lambda **kw: MeanStdObserver(num_std=2.0, **kw),
    "histogram_mse": lambda **kw: HistogramObserver(num_bins=64, method="mse", **kw),
    "histogram_kl": lambda **kw: HistogramObserver(num_bins=64, method="kl", **kw),
    "percentile": lambda **kw: PercentileObserver(low=1.0, high=99.0, num_bins=64, **kw),
}
NAMES = list(FACTORIES)
GRANULARITIES = ["per_tensor", "per_channel"]


def make(kind, **kwargs):
    return FACTORIES[kind](**kwargs)


def state(obs):
    return {v.path.split("/")[-1]: to_np(v) for v in obs.weights}


def assert_same_state(a, b, rtol=1e-5, atol=1e-4):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_allclose(sa[key], sb[key], rtol=rtol, atol=atol, err_msg=key)


def batches(rng, n=48, c=5):
    x = (rng.normal(size=(n, c)) * np.linspace(0.5, 3.0, c) + np.linspace(-1, 1, c)).astype("float32")
    x[7, 2] = np.nan
    x[30, 0] = np.inf
    return x


def eager_copy(name, x, batch_size, **kwargs):
    obs = make(name, **kwargs)
    for i in range(0, len(x), batch_size):
        obs.update(x[i : i + batch_size])
    return obs


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", NAMES)
def test_compiled_predict_updates_like_eager(name, granularity, rng):
    x = batches(rng)
    obs = make(name, granularity=granularity)
    model = keras.Sequential([keras.Input((x.shape[1],)), obs])
    y = model.predict(x, batch_size=16, verbose=0)
    np.testing.assert_array_equal(y, x)  # pass-through (NaN positions compare equal)
    eager = eager_copy(name, x, 16, granularity=granularity)
    assert_same_state(obs, eager)
    assert int(to_np(obs.non_finite_count)) == 2
    lo, hi = obs.compute_range()
    elo, ehi = eager.compute_range()
    np.testing.assert_allclose(lo, elo, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hi, ehi, rtol=1e-4, atol=1e-4)


@pytest.mark.tensorflow
@pytest.mark.parametrize("name", NAMES)
def test_xla_predict_updates_like_eager(name, rng):
    x = batches(rng)
    obs = make(name, granularity="per_channel")
    model = keras.Sequential([keras.Input((x.shape[1],)), obs])
    model.compile(jit_compile=True)
    assert model.jit_compile
    model.predict(x, batch_size=16, verbose=0)
    assert_same_state(obs, eager_copy(name, x, 16, granularity="per_channel"))


@pytest.mark.tensorflow
def test_inside_tf_function(rng):
    import tensorflow as tf

    x = batches(rng)
    obs = MinMaxObserver(granularity="per_channel")
    step = tf.function(lambda t: obs(t), jit_compile=True)
    for i in range(0, 48, 16):
        step(tf.constant(x[i : i + 16]))
    assert_same_state(obs, eager_copy("minmax", x, 16, granularity="per_channel"), rtol=0, atol=0)


def test_updates_during_fit(rng):
    x = rng.normal(size=(64, 4)).astype("float32")
    obs = MinMaxObserver(granularity="per_channel")
    model = keras.Sequential([keras.Input((4,)), obs, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((64, 1)), batch_size=16, epochs=1, shuffle=False, verbose=0)
    lo, hi = obs.compute_range()
    np.testing.assert_array_equal(lo, x.min(axis=0))
    np.testing.assert_array_equal(hi, x.max(axis=0))
    assert not obs.trainable_weights


@pytest.mark.parametrize("name", NAMES)
def test_state_size_is_fixed(name, rng):
    x = rng.normal(size=(1000, 3)).astype("float32") * np.geomspace(1, 50, 1000)[:, None].astype("float32")
    obs = make(name, granularity="per_channel")
    obs.update(x[:1])
    shapes = {k: v.shape for k, v in state(obs).items()}
    size = obs.state_bytes
    model = keras.Sequential([keras.Input((3,)), obs])
    model.predict(x[1:], batch_size=1, verbose=0)  # 999 more updates, with a growing range
    assert obs.state_bytes == size
    assert {k: v.shape for k, v in state(obs).items()} == shapes
    if isinstance(obs, HistogramObserver):
        np.testing.assert_allclose(to_np(obs.hist).sum(axis=-1), 1000, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_nan_omitted_and_counted(name, rng):
    x = rng.normal(size=(40, 3)).astype("float32")
    dirty = x.copy()
    dirty[::7, 1] = np.nan
    dirty[3, 0] = -np.inf
    dirty[5, 2] = np.inf
    obs = make(name, granularity="per_channel").update(dirty)
    assert int(to_np(obs.non_finite_count)) == int((~np.isfinite(dirty)).sum())
    lo, hi = obs.compute_range()
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    finite_lo = np.array([dirty[np.isfinite(dirty[:, c]), c].min() for c in range(3)])
    finite_hi = np.array([dirty[np.isfinite(dirty[:, c]), c].max() for c in range(3)])
    width = (finite_hi - finite_lo) / 64  # one histogram bin
    assert np.all(lo >= finite_lo - width) and np.all(hi <= finite_hi + width)


@pytest.mark.parametrize("name", NAMES)
def test_raise_policy_eager_leaves_state_untouched(name, rng):
    obs = make(name, nan_policy="raise")
    obs.update(rng.normal(size=(8, 3)))
    before = state(obs)
    bad = rng.normal(size=(8, 3))
    bad[1, 1] = np.nan
    bad[2, 2] = np.inf
    with pytest.raises(NonFiniteError) as info:
        obs.update(bad)
    assert info.value.count == 2
    after = state(obs)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    obs.compute_range()  # still fine: nothing was recorded


@pytest.mark.parametrize("name", ["minmax", "histogram_mse"])
def test_raise_policy_in_graph_raises_at_compute_range(name, rng):
    x = rng.normal(size=(32, 3)).astype("float32")
    x[4, 0] = np.nan
    obs = make(name, nan_policy="raise")
    keras.Sequential([keras.Input((3,)), obs]).predict(x, batch_size=8, verbose=0)
    with pytest.raises(NonFiniteError) as info:
        obs.compute_range()
    assert info.value.count == 1
    with pytest.raises(NonFiniteError):
        obs.compute_qparams(kq.QuantSpec())


@pytest.mark.parametrize("name", NAMES)
def test_no_data(name):
    obs = make(name)
    with pytest.raises(NoDataError):
        obs.compute_range()  # never built
    obs.update(np.full((4, 2), np.nan, "float32"))
    with pytest.raises(NoDataError) as info:
        obs.compute_range()
    assert info.value.field == obs.name


@pytest.mark.parametrize("name", NAMES)
def test_no_data_in_one_channel(name, rng):
    x = rng.normal(size=(6, 3)).astype("float32")
    x[:, 1] = np.nan
    obs = make(name, granularity="per_channel").update(x)
    with pytest.raises(NoDataError, match="channel"):
        obs.compute_range()


@pytest.mark.parametrize("name", NAMES)
def test_reset(name, rng):
    obs = make(name, granularity="per_channel")
    fresh = make(name, granularity="per_channel")
    x1, x2 = rng.normal(size=(16, 4)) * 5, rng.normal(size=(16, 4))
    obs.update(x1).update(np.where(x1 > 6, np.nan, x1))
    obs.reset()
    with pytest.raises(NoDataError):
        obs.compute_range()
    assert int(to_np(obs.non_finite_count)) == 0
    obs.update(x2)
    fresh.update(x2)
    assert_same_state(obs, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    obs = make(name, granularity="per_channel", axis=1, nan_policy="raise", name="obs_a")
    config = obs.get_config()
    assert config["granularity"] == "per_channel" and config["axis"] == 1 and config["nan_policy"] == "raise"
    clone = type(obs).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obs))
    assert type(restored) is type(obs) and restored.get_config() == config


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_keeps_state(name, rng, tmp_path):
    x = rng.normal(size=(32, 4)).astype("float32")
    obs = make(name, granularity="per_channel")
    model = keras.Sequential([keras.Input((4,)), obs])
    model.predict(x, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    obs2 = loaded.layers[-1]
    assert type(obs2) is type(obs)
    assert_same_state(obs, obs2, rtol=0, atol=0)
    for a, b in zip(obs.compute_range(), obs2.compute_range()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_channel_axis_and_shapes(name, rng):
    x = rng.normal(size=(5, 3, 4)).astype("float32")
    obs = make(name, granularity="per_channel", axis=1).update(x)
    lo, hi = obs.compute_range()
    assert lo.shape == hi.shape == (3,)
    assert np.all(lo <= hi)
    scale, zero_point = obs.compute_qparams(kq.QuantSpec(bits=8))
    assert scale.shape == zero_point.shape == (3,)
    assert scale.dtype == np.float32 and zero_point.dtype == np.int32
    per_tensor = make(name).update(x)
    lo, hi = per_tensor.compute_range()
    assert isinstance(lo, float) and isinstance(hi, float)
    scale, zero_point = per_tensor.compute_qparams(kq.QuantSpec(bits=8))
    assert scale.shape == () and zero_point.shape == ()


def test_compute_qparams_uses_core_ops(rng):
    obs = MinMaxObserver(granularity="per_channel").update(rng.normal(size=(16, 3)))
    spec = kq.QuantSpec(bits=4, symmetric=True, narrow_range=True)
    lo, hi = obs.compute_range()
    scale, zp = kq.ops.compute_qparams(lo, hi, spec)
    got = obs.compute_qparams(spec)
    np.testing.assert_array_equal(got[0], to_np(scale))
    np.testing.assert_array_equal(got[1], to_np(zp))


def test_integer_input_is_accepted():
    obs = MinMaxObserver().update(np.array([[1, -3], [7, 2]], "int32"))
    assert obs.compute_range() == (-3.0, 7.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"granularity": "per_row"}, "granularity"),
        ({"axis": 1.5}, "axis"),
        ({"nan_policy": "ignore"}, "nan_policy"),
        ({"granularity": "per_group"}, "group_size"),
        ({"granularity": "per_group", "group_size": 0}, "group_size"),
        ({"group_size": 4}, "group_size"),
    ],
)
def test_invalid_arguments(kwargs, field):
    with pytest.raises(ConfigError) as info:
        MinMaxObserver(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("name", ["mean_std", "histogram_mse", "percentile"])
def test_per_group_unsupported(name):
    with pytest.raises(ConfigError) as info:
        make(name, granularity="per_group", group_size=4)
    assert info.value.field == "granularity"


def test_bad_input_shapes():
    with pytest.raises(ConfigError):
        MinMaxObserver(granularity="per_channel", axis=3).update(np.zeros((2, 3)))
    with pytest.raises(ShapeMismatchError):
        MinMaxObserver(granularity="per_group", group_size=4).update(np.zeros((3, 2)))


def test_is_a_layer():
    obs = MinMaxObserver()
    assert isinstance(obs, Observer) and isinstance(obs, keras.layers.Layer)
    assert obs.compute_output_shape((None, 3)) == (None, 3)


def test_the_base_class_is_abstract():
    import keras_quant as kq

    with pytest.raises(TypeError, match="abstract"):
        kq.observers.Observer()
