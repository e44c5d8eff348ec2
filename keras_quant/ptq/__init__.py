"""Post-training algorithms that refine a quantized model after calibration.

- `quantize(model, data, config, algorithms)`: the whole stack in its order
  (`keras_quant.ptq.pipeline`): equalization, calibration, quantization,
  weight rounding, bias correction, softmax input ranges.
- `equalize(model, data)`: cross-layer equalization and high-bias absorption
  of the float model (`keras_quant.ptq.equalize`).
- `adaround(qmodel, data)`: AdaRound, learned rounding of the kernels onto
  their fixed grids (`keras_quant.ptq.adaround`).
- `gptq(qmodel, data)`: GPTQ rounding of the kernels onto their fixed grids
  (`keras_quant.ptq.gptq`).
- `correct_bias(float_model, qmodel, data)`: empirical bias correction
  (`keras_quant.ptq.bias`).
- `narrow_softmax_inputs(float_model, qmodel, data)`: a tighter grid for the
  tensor a softmax reads (`keras_quant.ptq.softmax`).

Example:

>>> qmodel = kq.ptq.quantize(model, x_calib[:512], kq.QuantConfig.w4a8(),      # doctest: +SKIP
...                          algorithms=("equalize", "adaround", "bias_correction"))
>>> print(qmodel.ptq_report)                                                  # doctest: +SKIP
"""

from keras_quant.ptq.adaround import AdaRoundLayer, AdaRoundReport, adaround
from keras_quant.ptq.bias import BiasCorrection, correct_bias
from keras_quant.ptq.equalize import Equalization, equalize
from keras_quant.ptq.gptq import GPTQLayer, GPTQReport, gptq
from keras_quant.ptq.pipeline import ALGORITHMS, PTQReport, quantize
from keras_quant.ptq.softmax import SoftmaxRanges, narrow_softmax_inputs

__all__ = ["ALGORITHMS", "AdaRoundLayer", "AdaRoundReport", "BiasCorrection", "Equalization", "GPTQLayer",
           "GPTQReport", "PTQReport", "SoftmaxRanges", "adaround", "correct_bias", "equalize", "gptq",
           "narrow_softmax_inputs", "quantize"]
