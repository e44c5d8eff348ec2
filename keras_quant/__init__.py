"""keras_quant: quantization for Keras 3 models.

Import it as `kq`. The public names are those of `__all__`.
"""

from keras_quant.version import __version__

from keras_quant import analysis, calibration, errors, export, layers, observers, ops, ptq, qat, runtime
from keras_quant.analysis import QuantizationTensorBoard
from keras_quant.calibration import CalibrationCache, CalibrationCallback, CalibrationResult, LayerStatistics
from keras_quant.export import ExportReport, export_onnx, export_tflite
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec
from keras_quant.layers import ActivationQuantizer, QuantizeWrapper, register_rule
from keras_quant.qat import QATScheduler
from keras_quant.quantize import quantize_model

__all__ = [
    "__version__",
    "errors",
    "ops",
    "observers",
    "analysis",
    "QuantSpec",
    "QuantConfig",
    "LayerQuantConfig",
    "calibration",
    "layers",
    "CalibrationCallback",
    "CalibrationResult",
    "LayerStatistics",
    "CalibrationCache",
    "quantize_model",
    "QuantizeWrapper",
    "ActivationQuantizer",
    "register_rule",
    "qat",
    "ptq",
    "QATScheduler",
    "export",
    "runtime",
    "export_tflite",
    "export_onnx",
    "ExportReport",
    "QuantizationTensorBoard",
]

