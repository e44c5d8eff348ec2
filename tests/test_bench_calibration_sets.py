"""The calibration-sets benchmark's parts: the sets it draws and the ranges it widens."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from tests.benchmarks import load_benchmark

L = keras.layers


@pytest.fixture(scope="module")
def bcs():
    return load_benchmark("bench_calibration_sets")


def test_calibration_sets_start_with_the_zoos_and_draw_distinct_samples(bcs):
    x = np.arange(50)
    sets = bcs.calibration_sets(x, 3, 10)
    assert len(sets) == 3 and all(len(s) == 10 for s in sets)
    np.testing.assert_array_equal(sets[0], x[-10:])  # the zoo benchmark's own samples come first
    assert all(len(np.unique(s)) == 10 and np.all(np.diff(s) > 0) for s in sets[1:])
    assert not np.array_equal(sets[1], sets[2])
    np.testing.assert_array_equal(bcs.calibration_sets(x, 3, 10)[2], sets[2])  # seeded


@pytest.mark.tensorflow  # the calibration callback
def test_widen_ranges_scales_both_ends_of_every_frozen_output(bcs):
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", name="stem")(inp)
    h = L.Conv2D(4, 1, activation="relu", name="mid")(h)
    model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(L.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32")
    cb = kq.CalibrationCallback(statistics="range")
    model.predict(x, verbose=0, callbacks=[cb])
    qmodel = kq.quantize_model(model, calibration=cb.result)
    before = {name: bcs._range(w) for name, w in bcs._frozen_outputs(qmodel).items()}
    assert {"stem", "mid"} <= set(before) and "head" not in before  # the softmax keeps its fixed grid
    assert bcs.widen_ranges(qmodel, 1.1) == len(before)
    for name, (spec, lo, hi) in before.items():
        _, lo2, hi2 = bcs._range(qmodel.get_layer(name))
        step = (hi2 - lo2) / (spec.qmax - spec.qmin)
        assert abs(hi2 - 1.1 * hi) <= step and abs(lo2 - 1.1 * lo) <= step, name
