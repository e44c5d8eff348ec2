"""Progress bars for the command line, on stderr (stdout stays clean for `--json`).

`ProgressBar(total, label)` draws `label [=====>    ] 3/8 12.4s` and redraws it
in place on a terminal; elsewhere (a CI log, a pipe) it prints one line when
the step ends, so logs are not flooded. `progress_callback(bar)` is a Keras
callback that advances a bar by one per batch of `fit` / `predict` /
`evaluate`, so training shows the same bar as every other long step.

Example:

>>> bar = ProgressBar(3, "candidates", stream=io.StringIO())  # doctest: +SKIP
>>> for _ in range(3): bar.update()                            # doctest: +SKIP
>>> bar.close()                                                # doctest: +SKIP
"""

import sys
import time

import keras

__all__ = ["ProgressBar", "progress_callback", "steps"]

_WIDTH = 24


class ProgressBar:
    """A progress bar over `total` steps (None: unknown, shows a count).

    Args:
        total: Number of steps, or None.
        label: What is being done ("training", "sensitivity").
        stream: Where to draw (default stderr).
        enabled: False draws nothing (quiet or `--json` runs that also want no stderr).
        interactive: Redraw in place; default: whether `stream` is a terminal.
    """

    def __init__(self, total, label, stream=None, enabled=True, interactive=None):
        self.total = None if total is None else max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty()) if interactive is None else interactive
        self.count = 0
        self.start = time.perf_counter()
        self._closed = False
        self._last_draw = 0.0

    def _line(self):
        seconds = time.perf_counter() - self.start
        if self.total:
            done = min(self.count, self.total)
            filled = int(_WIDTH * done / self.total)
            bar = "=" * filled + (">" if filled < _WIDTH else "") + " " * max(_WIDTH - filled - 1, 0)
            return f"{self.label} [{bar}] {done}/{self.total} {seconds:.1f}s"
        return f"{self.label} {self.count} {seconds:.1f}s"

    def update(self, n=1, label=None):
        """Advance by `n` steps (and optionally rename the step being done)."""
        self.count += n
        if label is not None:
            self.label = label
        now = time.perf_counter()
        if self.enabled and self.interactive and (now - self._last_draw > 0.1 or self.count == self.total):
            self.stream.write("\r" + self._line())
            self.stream.flush()
            self._last_draw = now

    def close(self, message=None):
        """End the bar: the final line (with `message` after it) on its own line."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            line = self._line() + (f" {message}" if message else "")
            self.stream.write(("\r" if self.interactive else "") + line + "\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def steps(num_samples, batch_size, epochs=1):
    """The batches Keras runs for `num_samples` samples: `ceil(num_samples / batch_size) * epochs`."""
    return -(-int(num_samples) // int(batch_size)) * int(epochs)


def progress_callback(bar):
    """A Keras callback that advances `bar` once per train / predict / test batch."""

    class _Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            bar.update()

        def on_predict_batch_end(self, batch, logs=None):
            bar.update()

        def on_test_batch_end(self, batch, logs=None):
            bar.update()

    return _Progress()
