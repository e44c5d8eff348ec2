"""Post-training algorithms that refine a quantized model after calibration.

- `correct_bias(float_model, qmodel, data)`: empirical bias correction
  (`keras_quant.ptq.bias`).
- `equalize(model, data)`: cross-layer equalization and high-bias absorption of a
  float model, before calibration (`keras_quant.ptq.equalize`).
- `narrow_softmax_inputs(float_model, qmodel, data)`: a tighter grid for the
  tensor a softmax reads (`keras_quant.ptq.softmax`).

Example:

>>> qmodel = kq.quantize_model(model, calibration=result)                # doctest: +SKIP
>>> report = kq.ptq.correct_bias(model, qmodel, x_calib[:512])           # doctest: +SKIP
>>> print(report)                                                        # doctest: +SKIP
"""

from keras_quant.ptq.bias import BiasCorrection, correct_bias
from keras_quant.ptq.equalize import EqualizedPair, Equalization, equalize
from keras_quant.ptq.softmax import SoftmaxRanges, narrow_softmax_inputs

__all__ = ["BiasCorrection", "EqualizedPair", "Equalization", "SoftmaxRanges", "correct_bias", "equalize",
           "narrow_softmax_inputs"]
