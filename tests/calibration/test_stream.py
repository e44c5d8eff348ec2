"""A million samples streamed from tf.data through the CalibrationCallback: flat memory, exact counts.

The data is generated inside the `tf.data` pipeline from the sample index
(never held in memory): feature `j` of sample `i` is
`((i * A[j]) mod 1000) / 1000 - 0.5`, so every value, the extremes and the
mean are known exactly. Resident memory (psutil RSS) is sampled after every
batch; after a warm-up it must grow by less than 64 MiB (the statistics are
fixed-size; `predict` itself keeps the model's 1-unit outputs, 4 MB).
"""

import numpy as np
import pytest

import keras_quant as kq

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

SAMPLES, BATCH, WARMUP = 1_000_000, 8192, 10
A = (1, 3, 7, 11)  # coprime to 1000: each feature runs through all 1000 residues every 1000 samples
LIMIT = 64 * 2**20


def stream(batch=BATCH):
    import tensorflow as tf

    def features(i):
        residues = tf.math.floormod(i[:, None] * tf.constant(A, tf.int64)[None, :], 1000)
        return tf.cast(residues, tf.float32) / 1000.0 - 0.5

    return tf.data.Dataset.range(SAMPLES).batch(batch).map(features).prefetch(2)


class RssSampler:
    """A Keras callback that records the process' resident memory after every predict batch."""

    def __init__(self):
        import keras
        import psutil

        process = psutil.Process()
        self.rss = []

        class Sampler(keras.callbacks.Callback):
            def on_predict_batch_end(_, batch, logs=None):
                self.rss.append(process.memory_info().rss)

        self.callback = Sampler()


def test_a_million_streamed_samples_keep_memory_flat_and_counts_exact():
    import keras

    model = keras.Sequential([keras.Input((len(A),), name="x"), keras.layers.Dense(4, activation="relu", name="h"),
                              keras.layers.Dense(1, name="out")])
    cb, sampler = kq.CalibrationCallback(), RssSampler()
    model.predict(stream(), callbacks=[cb, sampler.callback], verbose=0)

    assert cb.samples_seen == SAMPLES
    result = cb.result
    assert result.metadata["samples_seen"] == SAMPLES
    for name, units in (("x", len(A)), ("h", 4), ("out", 1)):
        stats = result[name]
        assert (stats.num_samples, stats.count, stats.non_finite_count) == (SAMPLES, SAMPLES * units, 0), name
        assert stats.histogram.sum() == pytest.approx(SAMPLES * units, rel=1e-6)
    x = result["x"]
    assert x.min == float(np.float32(0) / np.float32(1000) - np.float32(0.5))
    assert x.max == float(np.float32(999) / np.float32(1000) - np.float32(0.5))
    assert x.mean == pytest.approx(-0.0005, abs=2e-6)
    assert x.std == pytest.approx(np.sqrt((1000**2 - 1) / 12) / 1000, rel=1e-4)  # a uniform grid of 1000 steps
    np.testing.assert_array_equal(x.channel_min, np.full(len(A), x.min, np.float32))

    rss = np.asarray(sampler.rss)
    assert len(rss) == -(-SAMPLES // BATCH)
    growth = rss[WARMUP:].max() - rss[WARMUP]
    print(f"\nRSS after warm-up {rss[WARMUP] / 2**20:.1f} MiB, growth over {SAMPLES} samples {growth / 2**20:.1f} MiB")
    assert growth < LIMIT, f"resident memory grew {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("statistics", ["range", "full"])
def test_counts_past_two_to_the_24_elements_stay_exact(statistics):
    """37,000,000 values of one tensor (float32 holds every integer only to 2**24): counts in two parts."""
    import keras

    model = keras.Sequential([keras.Input((len(A),), name="x"), keras.layers.Dense(37, name="h")])
    cb = kq.CalibrationCallback(statistics=statistics)
    model.predict(stream(batch=999), callbacks=[cb], verbose=0)
    assert cb.result["h"].num_samples == SAMPLES
    assert cb.result["h"].count == 37 * SAMPLES
