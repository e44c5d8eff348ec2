"""Error analysis: how far a quantized tensor (or model) is from its float original.

`compare_models` runs two models (Keras, TFLite, ONNX) in their runtimes and
compares outputs, accuracy, size and latency.

Results are numpy arrays and Python floats, computed in float64.

Example:

>>> import numpy as np, keras_quant as kq
>>> x = np.random.default_rng(0).normal(size=1000).astype("float32")
>>> kq.analysis.compare_bit_widths(x, bits=(8,))[8].sqnr_db > 35
True
"""

from keras_quant.analysis import compare, error, methods
from keras_quant.analysis.compare import ModelComparison, compare_models, predicted_classes
from keras_quant.analysis.error import (
    ErrorStats,
    OutlierImpact,
    ScaleSensitivity,
    compare_bit_widths,
    error_stats,
    outlier_impact,
    scale_sensitivity,
    theoretical_max_error,
    theoretical_sqnr,
)
from keras_quant.analysis.methods import MethodComparison, MethodRow, compare_methods

__all__ = list(error.__all__) + list(compare.__all__) + list(methods.__all__)
