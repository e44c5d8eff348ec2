"""Post-training algorithms that refine a quantized model after calibration.

- `correct_bias(float_model, qmodel, data)`: empirical bias correction
  (`keras_quant.ptq.bias`).
- `gptq(qmodel, data)`: GPTQ rounding of the kernels onto their fixed grids
  (`keras_quant.ptq.gptq`).
- `narrow_softmax_inputs(float_model, qmodel, data)`: a tighter grid for the
  tensor a softmax reads (`keras_quant.ptq.softmax`).

Example:

>>> qmodel = kq.quantize_model(model, calibration=result)                # doctest: +SKIP
>>> report = kq.ptq.correct_bias(model, qmodel, x_calib[:512])           # doctest: +SKIP
>>> print(report)                                                        # doctest: +SKIP
"""

from keras_quant.ptq.bias import BiasCorrection, correct_bias
from keras_quant.ptq.gptq import GPTQLayer, GPTQReport, gptq
from keras_quant.ptq.softmax import SoftmaxRanges, narrow_softmax_inputs

__all__ = ["BiasCorrection", "GPTQLayer", "GPTQReport", "SoftmaxRanges", "correct_bias", "gptq",
           "narrow_softmax_inputs"]
