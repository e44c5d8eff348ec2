"""Post-training calibration: statistics gathered during `fit` / `evaluate` / `predict`.

- `CalibrationCallback`: hooks every quantized layer's output into Keras' own
  compiled step and gathers fixed-size statistics (`stats.LayerCollector`).
- `CalibrationResult` / `LayerStatistics`: the statistics per layer, with
  safe, atomic, checksummed persistence (JSON or MessagePack, gzip/zstd).
- `CalibrationCache`: named results on disk with an in-memory LRU.
- `sampling`: which samples are observed (all, random, systematic,
  stratified, importance, or a sampler object).
"""

from keras_quant.calibration import sampling
from keras_quant.calibration.cache import CalibrationCache
from keras_quant.calibration.callback import CalibrationCallback
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.calibration.sampling import (
    AllSampler,
    ImportanceSampler,
    RandomSampler,
    Sampler,
    StratifiedSampler,
    SystematicSampler,
)
from keras_quant.calibration.stats import LayerCollector

__all__ = [
    "CalibrationCallback",
    "CalibrationResult",
    "LayerStatistics",
    "CalibrationCache",
    "LayerCollector",
    "sampling",
    "Sampler",
    "AllSampler",
    "RandomSampler",
    "SystematicSampler",
    "StratifiedSampler",
    "ImportanceSampler",
]
