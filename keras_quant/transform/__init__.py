"""Model transforms: a Keras model's graph read once, planned, and rebuilt with quantizers.

- `graph`: `FlatGraph`, the model as one flat graph of fresh copies (nested
  models inlined, `keras.ops` operations included).
- `plan`: `plan_model` / `QuantizationPlan`: where each quantizer goes, from the
  layer rules; calibration, sensitivity and analysis read it.
- `build`: `quantize_model`, which carries the plan out (PTQ or QAT).
- `subclassed`: QAT for subclassed models (layers wrapped in place).
- `report`: `QuantizationReport`.

Only `keras_quant.graph` reads Keras' graph internals.
"""

from keras_quant.transform.build import MODES, quantize_model
from keras_quant.transform.plan import QuantizationPlan, activation_points, plan_model
from keras_quant.transform.report import QuantizationReport

__all__ = ["quantize_model", "MODES", "QuantizationPlan", "QuantizationReport", "activation_points", "plan_model"]
