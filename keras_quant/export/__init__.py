"""Export: TFLite / LiteRT and ONNX (QDQ) files with keras_quant's own ranges.

`kq.export_tflite(qmodel, path, mode="int8")` writes a full-integer
(`"int8"`, `"int16x8"`), dynamic-range or float16 TFLite file;
`kq.export_onnx(qmodel, path)` writes QuantizeLinear / DequantizeLinear
(QDQ) ONNX. Each returns an `ExportReport` read back from the file.
What a target cannot express is reported by layer name before conversion
(`kq.errors.ExportError`).

Modules: `plan` (what each mode can express, the export plan), `converter`
(the trace and the TFLite converter run), `flatbuffer` (edits of the TFLite
file), `clamps` (4-bit activation grids moved to the top of int8, their clamp
ops folded away), `int4` (4-bit weights as packed INT4 tensors), `tflite`
(`export_tflite`), `qdq` (edits of the ONNX graph), `onnx` (`export_onnx`,
through tf2onnx).
"""

from keras_quant.export.plan import MODES, check
from keras_quant.export.onnx import export_onnx, onnx_model
from keras_quant.export.tflite import ExportReport, export_tflite, tflite_bytes

__all__ = ["MODES", "check", "ExportReport", "export_tflite", "tflite_bytes", "export_onnx", "onnx_model"]
