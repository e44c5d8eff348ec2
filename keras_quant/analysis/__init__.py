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

from keras_quant.analysis import compare, error, layers, methods
from keras_quant.analysis import plots, report, tensorboard
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
from keras_quant.analysis.layers import LayerError, LayerErrors, activation_error, layer_errors
from keras_quant.analysis.methods import MethodComparison, MethodRow, compare_methods
from keras_quant.analysis.report import Report
from keras_quant.analysis.sensitivity import (
    MixedPrecisionResult,
    SensitivityRanking,
    mixed_precision,
    model_size_bytes,
    sensitivity,
)
from keras_quant.analysis.tensorboard import QuantizationTensorBoard
from keras_quant.analysis.workflow import analyze_model

__all__ = list(error.__all__) + list(compare.__all__) + list(layers.__all__) + list(methods.__all__)
__all__ += ["plots", "report", "tensorboard", "Report", "QuantizationTensorBoard", "analyze_model"]
__all__ += ["sensitivity", "mixed_precision", "SensitivityRanking", "MixedPrecisionResult", "model_size_bytes"]
