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
    "datasets",
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


def __getattr__(name):
    # `kq.datasets`: the offline example datasets live with the command line, apart from the
    # library core (keras_quant.cli.datasets); imported on first use, not with keras_quant.
    if name == "datasets":
        import keras_quant.cli.datasets

        return keras_quant.cli.datasets
    raise AttributeError(f"module 'keras_quant' has no attribute {name!r}")
