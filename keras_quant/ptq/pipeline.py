"""Post-training quantization with an algorithm stack: `kq.ptq.quantize(model, data, config, algorithms)`.

The steps run in a fixed order, each on what the one before produced:

1. `"equalize"`: cross-layer equalization and high-bias absorption of the
   float model (`kq.ptq.equalize`); the activation ranges change, so the
   calibration below always runs on the equalized model.
2. Calibration: one `kq.CalibrationCallback` pass of `model.predict` over
   `data` (skipped when `calibration` is given and nothing was equalized).
3. `kq.quantize_model(model, config, calibration=...)`: the frozen PTQ model.
4. Weight rounding, at most one of `"adaround"` (`kq.ptq.adaround`) and
   `"gptq"` (`kq.ptq.gptq`): other integers on the same weight grids.
5. `"bias_correction"` (`kq.ptq.correct_bias`): the mean output shift per
   channel, measured against the (equalized) float model, folded into the biases.
6. `"softmax_ranges"` (`kq.ptq.narrow_softmax_inputs`).

Everything the algorithms change is ordinary weights and ranges of the frozen
model: `kq.export_tflite` and `kq.export_onnx` write them as they write any
PTQ model. The returned model carries `ptq_report` (a `PTQReport`).

Example:

>>> config = kq.QuantConfig.w4a8()                                           # doctest: +SKIP
>>> qmodel = kq.ptq.quantize(model, x_calib[:512], config,                   # doctest: +SKIP
...                          algorithms=("equalize", "gptq", "bias_correction"))
>>> print(qmodel.ptq_report)                                                 # doctest: +SKIP
"""

import dataclasses
import inspect
import time
from typing import Tuple

from keras_quant.calibration import CalibrationCallback
from keras_quant.errors import ConfigError, check_int
from keras_quant.ptq.adaround import adaround
from keras_quant.ptq.bias import correct_bias
from keras_quant.ptq.equalize import equalize
from keras_quant.ptq.gptq import gptq
from keras_quant.ptq.softmax import narrow_softmax_inputs
from keras_quant.quantize import quantize_model

__all__ = ["ALGORITHMS", "PTQReport", "quantize", "check_algorithms"]

# The algorithms in the order they run.
ALGORITHMS = ("equalize", "adaround", "gptq", "bias_correction", "softmax_ranges")
ROUNDING = ("adaround", "gptq")


@dataclasses.dataclass(frozen=True)
class PTQReport:
    """What `kq.ptq.quantize` ran.

    Attributes:
        steps: `(name, report, seconds)` per step in the order run; the report
            is the step's own (`Equalization`, `GPTQReport`, `AdaRoundReport`,
            `BiasCorrection`, `SoftmaxRanges`), None for calibration and quantization.
        num_samples: Samples of `data` the calibration and algorithms saw.
    """

    steps: Tuple[tuple, ...]
    num_samples: int

    def seconds(self, name):
        """Seconds the step `name` took (0.0 if it did not run)."""
        return sum(s for n, _, s in self.steps if n == name)

    def __str__(self):
        lines = [f"post-training quantization on {self.num_samples} samples: "
                 + ", ".join(f"{n} {s:.1f} s" for n, _, s in self.steps)]
        for name, report, _ in self.steps:
            if report is not None:
                lines += ["", f"[{name}]", str(report)]
        return "\n".join(lines)


def check_algorithms(algorithms):
    """The algorithm names as a tuple in run order.

    Raises:
        ConfigError: An unknown name, a repeated one, or both rounding algorithms.
    """
    if isinstance(algorithms, str):
        algorithms = (algorithms,)
    names = tuple(algorithms or ())
    for name in names:
        if name not in ALGORITHMS:
            raise ConfigError("algorithms", name, f"unknown algorithm; expected some of {ALGORITHMS}")
    if len(set(names)) != len(names):
        raise ConfigError("algorithms", list(names), "an algorithm is named twice")
    if all(r in names for r in ROUNDING):
        raise ConfigError("algorithms", list(names), "adaround and gptq both choose the weights' rounding: pick one")
    return tuple(a for a in ALGORITHMS if a in names)


def _first(data, n):
    return [d[:n] for d in data] if isinstance(data, (list, tuple)) else data[:n]


def _calibrate(model, data, config, batch_size):
    callback = CalibrationCallback(config=config, verbose=0)
    model.predict(data, batch_size=batch_size, callbacks=[callback], verbose=0)
    return callback.result


def quantize(model, data, config=None, algorithms=("bias_correction",), calibration=None, max_samples=512,
             batch_size=64, options=None, progress=True):
    """A frozen PTQ model of `model`, refined by post-training algorithms.

    Args:
        model: The float Functional or Sequential Keras model (not changed).
        data: Calibration inputs as `model` takes them (an array with the
            batch on axis 0, or a list of arrays for several inputs).
        config: The `kq.QuantConfig` (None: `kq.QuantConfig()`, int8).
            Per-layer specs, per-channel and per-group weights and mixed
            precision are honoured by every algorithm.
        algorithms: Names from `ALGORITHMS`, run in that order whatever the
            order given: `"equalize"`, one of `"adaround"` / `"gptq"`,
            `"bias_correction"`, `"softmax_ranges"`. Empty: plain PTQ.
        calibration: A `kq.CalibrationResult` of `model` to use instead of
            calibrating on `data` (ignored with `"equalize"`, which changes
            the ranges).
        max_samples: The first this many samples of `data` are used, by the
            calibration and by every algorithm (an algorithm's own `max_samples`
            in `options` can lower it).
        batch_size: Batch size of the calibration and float passes.
        options: `{algorithm: {keyword: value}}` passed to each algorithm's
            function (e.g. `{"adaround": {"time_budget": 120}}`).
        progress: Progress bars of the algorithms that have them.

    Returns:
        The frozen PTQ model, with `ptq_report` (a `PTQReport`).

    Raises:
        ConfigError: An unknown algorithm or option, bad `max_samples`.
    """
    names = check_algorithms(algorithms)
    max_samples = check_int("max_samples", max_samples, allow_none=True)
    options = dict(options or {})
    for name in options:
        if name not in names:
            raise ConfigError("options", name, f"options for an algorithm not run; running {names}")
    data = _first(data, max_samples)
    steps, float_model = [], model
    functions = {"equalize": equalize, "adaround": adaround, "gptq": gptq, "bias_correction": correct_bias,
                 "softmax_ranges": narrow_softmax_inputs}
    for name, kwargs in options.items():
        _check_options(name, functions[name], kwargs)

    def run(name, fn, *args, report=lambda out: out, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        steps.append((name, report(out), time.perf_counter() - start))
        return out

    def own(name):  # an algorithm's keywords: all the samples given, then the user's options
        return {"max_samples": None, **options.get(name, {})}

    if "equalize" in names:
        float_model = run("equalize", equalize, model, data, report=lambda m: m.equalization_report,
                          **own("equalize"))
        calibration = None
    if calibration is None:
        calibration = run("calibrate", _calibrate, float_model, data, config, batch_size, report=lambda _: None)
    qmodel = run("quantize", quantize_model, float_model, config, calibration=calibration, report=lambda _: None)
    for name in (n for n in ROUNDING if n in names):
        run(name, functions[name], qmodel, data, progress=progress, **own(name))
    for name in (n for n in ("bias_correction", "softmax_ranges") if n in names):
        run(name, functions[name], float_model, qmodel, data, **{"batch_size": batch_size, **own(name)})
    first = data[0] if isinstance(data, (list, tuple)) else data
    qmodel.ptq_report = PTQReport(steps=tuple(steps), num_samples=int(len(first)))
    return qmodel


def _check_options(name, fn, kwargs):
    """Raise ConfigError for an option `fn` does not take (or one the pipeline passes itself)."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"options.{name}", kwargs, "a dict of keyword arguments")
    taken = set(inspect.signature(fn).parameters) - {"model", "float_model", "qmodel", "data", "progress"}
    for key in kwargs:
        if key not in taken:
            raise ConfigError(f"options.{name}", key,
                              f"not an option of kq.ptq.{fn.__name__}; it takes {sorted(taken)}")
