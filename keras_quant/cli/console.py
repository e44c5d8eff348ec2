"""What the `keras-quant` command shows on stderr: its own lines, not TensorFlow's (unless `--verbose`).

TensorFlow, its TFLite converter and LiteRT write log lines from C++ straight to file descriptor 2
("I0000 ... oneDNN custom operations are on", "cpu_feature_guard", "INFO: Created TensorFlow Lite
XNNPACK delegate for CPU", ...), which neither `TF_CPP_MIN_LOG_LEVEL` (absl writes what comes before
its initialisation regardless) nor Python can filter. `quiet()` points descriptor 2 at a scratch file
while a command runs and gives Python's `sys.stderr` a duplicate of the real one, so the command's
progress bars and its one-line errors still reach the terminal; it also silences TensorFlow's and
absl's Python loggers and third-party Python warnings (keras_quant's own warnings stay, one line each).

Example:

>>> with quiet(verbose=False):     # doctest: +SKIP
...     run_the_command()
"""

import contextlib
import logging
import os
import sys
import tempfile
import warnings

__all__ = ["QUIET_ENV", "quiet", "one_line"]

# Environment read by native libraries that load (or log for the first time) later in the process.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "3", "ABSL_MIN_LOG_LEVEL": "3"}
_NOISY_LOGGERS = ("tensorflow", "absl", "tf2onnx", "h5py", "jax._src.xla_bridge")


def one_line(text):
    """`text` with its whitespace runs (newlines included) folded to single spaces."""
    return " ".join(str(text).split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"keras-quant: warning: {one_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def _native_stderr_hidden():
    """Descriptor 2 to a scratch file, `sys.stderr` to a duplicate of the real descriptor 2."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd != 2:  # stderr is captured (tests) or redirected in Python: native lines already go elsewhere
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    old_stderr = sys.stderr
    # The stream owns the duplicate and closes it at the end: a handler that kept it fails loudly
    # instead of writing into whatever file would reuse the descriptor's number.
    stream = open(saved, "w", buffering=1, encoding=old_stderr.encoding, errors="backslashreplace")
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        sys.stderr = stream
        try:
            yield
        finally:
            stream.flush()
            sys.stderr = old_stderr
            os.dup2(saved, 2)
            stream.close()


@contextlib.contextmanager
def quiet(verbose=False):
    """Run the block with third-party log lines hidden from stderr, unless `verbose`.

    Args:
        verbose: True changes nothing (TensorFlow's lines and every warning show).
    """
    if verbose:
        yield
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _native_stderr_hidden():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"keras_quant(\.|$)")
            warnings.showwarning = _show_warning
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
