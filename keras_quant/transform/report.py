"""`QuantizationReport`: what `quantize_model` did to each layer of the float model."""

import dataclasses
from typing import Tuple

__all__ = ["QuantizationReport"]


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` did, attached to the new model as `quantization_report`.

    Attributes:
        wrapped: Names of the `QuantizeWrapper` layers.
        folded: `(layer, into)` name pairs: BatchNormalizations folded into the
            layer before them, and constants added to its output folded into
            its bias (the output of `into` stands for `layer`'s).
        input_folds: `(layer, into)` name pairs: per-channel affine layers
            (Rescaling, Normalization, a lone BatchNormalization) folded into
            the layer that reads them, or into the next such layer (`into`
            computes `into(layer(x))` from `x`).
        activation_quantizers: `(layer, stats_key)`: every activation quantizer
            (an `ActivationQuantizer` layer, or a wrapper's output quantizer)
            and the calibration key its range came from.
        float_layers: Keys of layers the config keeps in float (config None).
        unsupported: Keys of layers and `keras.ops` operations with no
            quantization rule, left in float.
        shared: QAT: groups of calibration keys whose tensors share one
            activation quantizer (the inputs of an Add or Concatenate).
        float_islands: `(key, type, reason)` of every layer or operation that
            computes in float in the quantized model (kept float by its rule,
            by the config, or for want of a rule); where its output enters the
            integer graph it is quantized there.
        rewritten: `(key, how)`: layers replaced by an equivalent integer form
            (a standalone BatchNormalization as a 1x1 depthwise convolution,
            a SeparableConv2D as depthwise + pointwise, ...).

    Example:

    >>> qmodel.quantization_report.float_islands
    (('lstm', 'LSTM', 'kept in float by default: ...'),)
    """

    wrapped: Tuple[str, ...] = ()
    folded: Tuple[Tuple[str, str], ...] = ()
    activation_quantizers: Tuple[Tuple[str, str], ...] = ()
    float_layers: Tuple[str, ...] = ()
    unsupported: Tuple[str, ...] = ()
    shared: Tuple[Tuple[str, ...], ...] = ()
    float_islands: Tuple[Tuple[str, str, str], ...] = ()
    rewritten: Tuple[Tuple[str, str], ...] = ()
    input_folds: Tuple[Tuple[str, str], ...] = ()

    def summary(self) -> str:
        """A few lines for a person: counts, and each float island with its reason."""
        lines = [
            f"{len(self.wrapped)} layers with quantized weights, {len(self.activation_quantizers)} activation "
            f"quantizers, {len(self.folded) + len(self.input_folds)} layers folded into others",
        ]
        lines += [f"rewritten: {key} ({how})" for key, how in self.rewritten]
        lines += [f"float: {key} ({kind}): {reason}" for key, kind, reason in self.float_islands]
        return "\n".join(lines)
