"""`kq.quantize_model` and its report (the implementation lives in `keras_quant.transform`)."""

from keras_quant.transform import MODES, QuantizationPlan, QuantizationReport, activation_points, plan_model, quantize_model

__all__ = ["quantize_model", "QuantizationReport", "MODES", "activation_points", "plan_model", "QuantizationPlan"]
