"""keras_quant: quantization for Keras 3 models.

Import it as `kq`. The public names are those of `__all__`.
"""

__version__ = "0.1.0"

from keras_quant import analysis, datasets, errors, observers, ops
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec

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
]
