"""Observers: layers that watch tensors and recommend a quantization range.

Each observer is a pass-through `keras.layers.Layer` with fixed-size,
non-trainable state, updated in `call` with `keras.ops`, so it also runs
inside a compiled `predict` / `fit` step (TensorFlow, XLA, JAX):

- `MinMaxObserver`, `MovingAverageMinMaxObserver`: extremes (also per group).
- `MeanStdObserver`: `mean +- num_std * std`, merged exactly across batches.
- `HistogramObserver`: a histogram with an MSE, KL, percentile or min-max
  range search (`range_search`), or `"auto"`, the one of those with the
  least expected MSE; and `PercentileObserver` on the same state.

`get(name_or_spec)` builds one from a name or a `kq.QuantSpec`; `REGISTRY`
(`keras_quant.observers.registry`) is the one table of observer names, what
each needs and its pure range function.

Example:

>>> import keras, numpy as np, keras_quant as kq
>>> spec = kq.QuantSpec(bits=4, symmetric=True, observer="mse")
>>> obs = kq.observers.get(spec)                 # HistogramObserver(method="mse")
>>> model = keras.Sequential([keras.Input((16,)), obs])
>>> _ = model.predict(np.random.default_rng(0).normal(size=(256, 16)), verbose=0)
>>> scale, zero_point = obs.compute_qparams(spec)
"""

from keras_quant.observers import registry
from keras_quant.ops import range_search  # `kq.observers.range_search`: the searches the observers run
from keras_quant.observers.base import Observer
from keras_quant.observers.histogram import HistogramObserver, PercentileObserver
from keras_quant.observers.mean_std import MeanStdObserver
from keras_quant.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from keras_quant.observers.registry import REGISTRY, ObserverRecord, get

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MeanStdObserver",
    "HistogramObserver",
    "get",
    "range_search",
    "registry",
    "REGISTRY",
    "ObserverRecord",
]
