"""`keras_quant.ptq.weights`: the kernel a rounding algorithm reads and writes on a frozen wrapper's grid."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.ptq.weights import channel_qparams, grid_weight, set_grid_weight


def _wrapper(layer, shape, spec, batch_norm=None, seed=0):
    rng = np.random.default_rng(seed)
    wrapper = kq.QuantizeWrapper(layer, (spec, None), mode="frozen", batch_norm=batch_norm)
    wrapper(keras.ops.convert_to_tensor(rng.normal(size=(2,) + shape).astype("float32")))
    if batch_norm is not None:
        batch_norm.set_weights([rng.uniform(0.5, 2, w.shape).astype("float32") if i in (0, 3)
                                else rng.normal(size=w.shape).astype("float32")
                                for i, w in enumerate(batch_norm.get_weights())])
        wrapper.observe_weights()
    return wrapper


CASES = [
    (keras.layers.Dense, (16,), 8, dict(granularity="per_channel")),
    (keras.layers.Dense, (16,), 8, dict(granularity="per_group", group_size=4)),
    (keras.layers.Conv2D, (8, 8, 4), 6, dict(granularity="per_group", group_size=6)),
    (keras.layers.Conv2D, (8, 8, 4), 6, dict(granularity="per_channel")),
    (keras.layers.Conv2D, (8, 8, 4), 6, dict(granularity="per_tensor")),
]


@pytest.mark.parametrize("cls, shape, units, kw", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_nearest_matches_the_wrapper_and_chosen_integers_survive_a_write(cls, shape, units, kw, symmetric):
    layer = cls(units) if cls is keras.layers.Dense else cls(units, 3)
    spec = kq.QuantSpec(bits=4, symmetric=symmetric, **kw)
    wrapper = _wrapper(layer, shape, spec)
    g = grid_weight(wrapper)
    reference = keras.ops.convert_to_numpy(wrapper.quantized_weights()[g.name])
    np.testing.assert_allclose(g.dequantize(g.nearest()), reference, atol=1e-6)
    chosen = g.nearest().copy()
    chosen.flat[::3] = np.clip(chosen.flat[::3] + 1, spec.qmin, spec.qmax)  # other integers on the same grid
    set_grid_weight(wrapper, g, g.dequantize(chosen))
    again = grid_weight(wrapper)
    np.testing.assert_array_equal(again.nearest(), chosen)
    np.testing.assert_array_equal(again.scale, g.scale)  # the scales are kept


def test_a_folded_batch_norm_sees_the_written_values():
    bn = keras.layers.BatchNormalization()
    wrapper = _wrapper(keras.layers.Conv2D(5, 3), (7, 7, 3), kq.QuantSpec(bits=4, symmetric=True,
                                                                           granularity="per_channel"), batch_norm=bn)
    g = grid_weight(wrapper)
    folded = keras.ops.convert_to_numpy(wrapper.float_weights()[g.name])
    np.testing.assert_allclose(g.values, folded, rtol=1e-6)
    chosen = g.nearest().copy()
    chosen.flat[1::4] = np.clip(chosen.flat[1::4] - 1, g.spec.qmin, g.spec.qmax)
    set_grid_weight(wrapper, g, g.dequantize(chosen))
    np.testing.assert_array_equal(grid_weight(wrapper).nearest(), chosen)


def test_channel_qparams_layout_matches_to_groups():
    spec = kq.QuantSpec(bits=4, granularity="per_group", group_size=3, axis=-1)
    shape = (2, 2, 3, 5)  # 12 elements per output channel: 4 groups of 3
    scale = np.arange(20, dtype=np.float32).reshape(5, 4) + 1
    s, _ = channel_qparams(scale, np.zeros_like(scale), shape, spec)
    moved = np.moveaxis(s, -1, 0).reshape(5, 4, 3)
    np.testing.assert_array_equal(moved, np.repeat(scale[..., None], 3, axis=-1))


def test_a_qat_wrapper_is_refused():
    wrapper = kq.QuantizeWrapper(keras.layers.Dense(3), (kq.QuantSpec(bits=4), None))
    wrapper(keras.ops.ones((1, 4)))
    with pytest.raises(ConfigError, match="frozen"):
        grid_weight(wrapper)
