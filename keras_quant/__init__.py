"""keras_quant: quantization for Keras 3 models.

Import it as `kq`. The public names are those of `__all__`.
"""

import os as _os
import sys as _sys

# The `keras-quant` command (console script or `python -m keras_quant.cli`) without --verbose: the C++ log
# lines TensorFlow writes to descriptor 2 while the imports below load it go to /dev/null, while Python's
# stderr keeps the terminal (TF_CPP_MIN_LOG_LEVEL cannot hide them); keras_quant.cli.console does the same
# while a command runs.
_cli_stderr = None
if _sys.stderr is not None and "--verbose" not in _sys.argv and (
        _os.path.basename(_sys.argv[0] if _sys.argv else "").startswith("keras-quant")
        or "keras_quant.cli" in getattr(_sys, "orig_argv", ())):
    _sys.stderr.flush()
    _cli_stderr = _os.dup(2)
    _sys.stderr = open(_cli_stderr, "w", buffering=1, closefd=False)
    _devnull = _os.open(_os.devnull, _os.O_WRONLY)
    _os.dup2(_devnull, 2)
    _os.close(_devnull)

from keras_quant.version import __version__

from keras_quant import analysis, calibration, errors, export, layers, observers, ops, ptq, qat, runtime
from keras_quant.analysis import QuantizationTensorBoard
from keras_quant.calibration import CalibrationCache, CalibrationCallback, CalibrationResult, LayerStatistics
from keras_quant.export import ExportReport, export_onnx, export_tflite
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec
from keras_quant.layers import ActivationQuantizer, QuantizeWrapper, register_rule
from keras_quant.qat import QATScheduler
from keras_quant.quantize import quantize_model

if _cli_stderr is not None:
    _sys.stderr.flush()
    _sys.stderr = _sys.__stderr__
    _os.dup2(_cli_stderr, 2)
    _os.close(_cli_stderr)

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

