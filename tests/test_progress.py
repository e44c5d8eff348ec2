"""Progress bars on stderr: redrawn on a terminal, one line per step elsewhere, advanced by Keras callbacks."""

import io

import keras
import numpy as np

from keras_quant.progress import ProgressBar, progress_callback, steps


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_non_terminal_prints_one_line_when_the_step_ends():
    out = io.StringIO()
    bar = ProgressBar(4, "sensitivity", stream=out)
    for _ in range(4):
        bar.update()
    assert out.getvalue() == ""
    bar.close("done")
    bar.close()  # twice is once
    line = out.getvalue()
    assert line.count("\n") == 1 and line.startswith("sensitivity [" + "=" * 24 + "] 4/4 ") and line.endswith("s done\n")


def test_terminal_redraws_in_place_and_shows_the_fraction():
    out = Terminal()
    with ProgressBar(2, "export", stream=out) as bar:
        bar.update()
        assert out.getvalue().startswith("\rexport [" + "=" * 12 + ">" + " " * 11 + "] 1/2")
        bar.update(label="export + check")
    assert out.getvalue().endswith("\n") and "\rexport + check [" + "=" * 24 + "] 2/2" in out.getvalue()


def test_unknown_total_counts_and_disabled_prints_nothing():
    out = io.StringIO()
    bar = ProgressBar(None, "batches", stream=out)
    bar.update(3)
    bar.close()
    assert out.getvalue().startswith("batches 3 ")
    quiet = io.StringIO()
    bar = ProgressBar(5, "quiet", stream=quiet, enabled=False)
    bar.update()
    bar.close()
    assert quiet.getvalue() == ""


def test_steps_is_the_number_of_batches_keras_runs():
    assert steps(100, 32) == 4 and steps(96, 32, epochs=3) == 9 and steps(1, 64) == 1


def test_callback_advances_once_per_batch_of_fit_and_predict():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((10, 3), "float32"), np.zeros((10, 2), "float32")
    bar = ProgressBar(None, "fit", stream=io.StringIO())
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[progress_callback(bar)])
    assert bar.count == steps(10, 4, 2)
    model.predict(x, batch_size=5, verbose=0, callbacks=[progress_callback(bar)])
    assert bar.count == steps(10, 4, 2) + 2
