"""Core quantization operations, written with `keras.ops` (TensorFlow and JAX).

`compute_qparams`, `quantize`, `dequantize`, `fake_quant` (straight-through
gradient) and `lsq_fake_quant` (learned step size) for symmetric and
asymmetric grids of 2 to 16 bits, per tensor, per channel and per group;
`histogram`: the histogram kernels shared by the observers and the
calibration statistics; `range_search`: the range searches (min-max,
percentile, MSE, KL, auto) as pure functions of a histogram.
"""

from keras_quant.ops.core import (
    EPS,
    channel_axis,
    compute_qparams,
    dequantize,
    fake_quant,
    moving_average,
    numpy_qparams,
    numpy_weight_qparams,
    param_shape,
    quantize,
    round_half_up,
    tensor_qparams,
    tensor_range,
    to_groups,
    weight_qparams,
    weight_range,
)
from keras_quant.ops import checks, histogram, range_search
from keras_quant.ops.lsq import (
    LOG_STEP_GAIN, OFFSET_GAIN, log_step, lsq_fake_quant, lsq_grad_scale, scale_gradient, scaled_offset,
)

__all__ = [
    "EPS",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "lsq_fake_quant",
    "log_step",
    "scaled_offset",
    "LOG_STEP_GAIN",
    "OFFSET_GAIN",
    "lsq_grad_scale",
    "scale_gradient",
    "tensor_range",
    "tensor_qparams",
    "weight_range",
    "weight_qparams",
    "numpy_qparams",
    "numpy_weight_qparams",
    "param_shape",
    "channel_axis",
    "to_groups",
    "round_half_up",
    "moving_average",
    "histogram",
    "range_search",
    "checks",
]
