"""`correct_bias(float_model, qmodel, data)`: empirical bias correction. Rounding
weights and activations shifts the mean of each layer's output a little (a
rounding that is biased, such as TFLite's int8 swish, or weights whose
rounding errors do not cancel over the channel's inputs); through a deep
network these shifts add up. Bias correction measures, on calibration data,
the mean per output channel of each quantized layer's linear output (before
its activation and requantization) and of the float layer's, on the inputs
each model really sees, and adds the difference to the layer's bias (Nagel et
al. 2019, "Data-Free Quantization", section 4.2, empirical variant; AIMET's
`correct_bias`). Layers are corrected in graph order, each one seeing its
inputs from the already corrected layers before it, in one pass over the data.

The corrected biases are ordinary weights of the quantized model: the TFLite
and ONNX exports write them (as int32 biases) like any other.

Example:

>>> qmodel = kq.quantize_model(model, calibration=result)                # doctest: +SKIP
>>> report = kq.ptq.correct_bias(model, qmodel, x_calib[:512])           # doctest: +SKIP
>>> print(report)                                                        # doctest: +SKIP
"""

import dataclasses
from typing import Tuple

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant.formatting import text_table
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.ptq import common
from keras_quant.ptq.common import float_pass, float_references, report_text

__all__ = ["BiasCorrection", "correct_bias"]


@dataclasses.dataclass(frozen=True)
class BiasCorrection:
    """What `correct_bias` changed.

    Attributes:
        corrected: `(layer, mean_abs_shift, max_abs_shift)` per corrected
            layer, in graph order: the shift added to its bias, in the
            layer's output units.
        skipped: `(layer, reason)` for wrapped layers left as they were.
        num_samples: Samples the means were measured on.
    """

    corrected: Tuple[Tuple[str, float, float], ...]
    skipped: Tuple[Tuple[str, str], ...]
    num_samples: int

    def table(self) -> str:
        """The report as a plain-text table, one row per layer."""
        rows = [{"layer": name, "mean |shift|": mean, "max |shift|": peak} for name, mean, peak in self.corrected]
        return text_table(rows, ["layer", "mean |shift|", "max |shift|"])

    def __str__(self):
        return report_text(f"bias correction on {self.num_samples} samples: {len(self.corrected)} layers "
                           f"corrected, {len(self.skipped)} skipped", self.corrected and self.table(), self.skipped)


def _channel_sum(y):
    y = keras.ops.cast(y, "float32")
    return keras.ops.sum(keras.ops.reshape(y, (-1, y.shape[-1])), axis=0)


def _correctable_wrappers(fgraph, qgraph, qmodel):
    wrappers, skipped = [], []
    for layer in graph_lib.operations(qgraph):
        if isinstance(layer, QuantizeWrapper):
            reason = _correctable(layer)
            if reason:
                skipped.append((layer.name, reason))
            else:
                wrappers.append(layer)
    references, not_found = float_references(fgraph, qmodel, wrappers)
    return wrappers, references, skipped + not_found


def _correctable(layer):
    """Why a wrapper's bias cannot be corrected, or None."""
    if layer.stage != "frozen":
        return "a QAT wrapper (bias correction is for post-training models)"
    inner = layer.layer
    if len(graph_lib.calls(layer)) != 1:
        return "called more than once"
    if layer.batch_norm is None and not getattr(inner, "use_bias", False):
        return "the layer has no bias"
    if layer.batch_norm is not None and not layer.batch_norm.center:
        return "its folded BatchNormalization has no beta"
    if getattr(inner, "data_format", "channels_last") == "channels_first":
        return "channels_first"
    if layer.batch_norm is None and len(inner.bias.shape) != 1:
        return f"a bias of shape {tuple(inner.bias.shape)} (one value per output channel is corrected)"
    return None


def correct_bias(float_model, qmodel, data, max_samples=512, batch_size=64):
    """Empirical bias correction of a post-training quantized model, in place.

    For each frozen `kq.QuantizeWrapper` with a bias (a folded
    BatchNormalization gives one), in graph order: the mean per output
    channel of its linear output in `qmodel` (inputs from the corrected layers
    before it, integer arithmetic where the model uses it) is made equal to
    the float layer's mean on the float model's inputs, by adding the
    difference to the bias. One pass of the float model in batches, one pass
    of `qmodel` over all samples at once (memory: the tensors alive at one
    point of the graph, for `max_samples` samples).

    Args:
        float_model: The float Functional or Sequential model `qmodel` was made from.
        qmodel: A PTQ model from `kq.quantize_model(..., mode="ptq")`; its
            biases are changed.
        data: Calibration inputs as the float model takes them (an array with
            the batch on axis 0, or a list of arrays for several inputs).
        max_samples: The first this many samples are used (None: all).
        batch_size: Samples per batch of the float pass.

    Returns:
        A `BiasCorrection` naming the corrected layers with the shift each
        received, and the wrapped layers skipped and why.

    Raises:
        ConfigError: A model that is not Functional / Sequential, a bad
            `max_samples` / `batch_size`.
        ShapeMismatchError: `data` does not fit the model's inputs.
        NoDataError: `data` holds no sample.
    """
    setup, batch_size = common.setup(float_model, qmodel, data, max_samples, batch_size, "correct_bias",
                               _correctable_wrappers)
    wrappers, skipped, n = setup.items, setup.skipped, setup.num_samples
    if not wrappers:
        return BiasCorrection(corrected=(), skipped=tuple(skipped), num_samples=n)
    # The float means, from the float model alone.
    float_sums = float_pass(setup, batch_size,
                             lambda total, y: _channel_sum(y) if total is None else total + _channel_sum(y))

    # The quantized pass: all samples at once, each layer corrected before its output feeds the next.
    targets = {id(w): w for w in wrappers}
    corrected = []

    def call_fn(op, *args, **kwargs):
        w = targets.get(id(op))
        if w is not None:
            y = w.linear_output(args[0])
            count = float(np.prod(y.shape[:-1]))
            shift = (float_sums[w.name] - _channel_sum(y)) / count
            bias = w.layer.bias if w.batch_norm is None else w.batch_norm.beta  # beta enters the folded bias as is
            bias.assign(keras.ops.cast(keras.ops.add(bias, keras.ops.cast(shift, bias.dtype)), bias.dtype))
            shift = np.abs(keras.ops.convert_to_numpy(shift))
            corrected.append((w.name, float(shift.mean()), float(shift.max())))
        return op(*args, **kwargs)

    with keras.name_scope("correct_bias"):
        graph_lib.run_releasing(setup.qgraph, [keras.ops.convert_to_tensor(x) for x in setup.xs], call_fn)
    return BiasCorrection(corrected=tuple(corrected), skipped=tuple(skipped), num_samples=n)
