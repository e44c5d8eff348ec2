"""Observers: layers that watch tensors and recommend a quantization range.

Each observer is a pass-through `keras.layers.Layer` with fixed-size,
non-trainable state, updated in `call` with `keras.ops`, so it also runs
inside a compiled `predict` / `fit` step (TensorFlow, XLA, JAX):

- `MinMaxObserver`, `MovingAverageMinMaxObserver`: extremes (also per group).
- `MeanStdObserver`: `mean +- num_std * std`, merged exactly across batches.
- `HistogramObserver`: a histogram with an MSE, KL, percentile or min-max
  range search (`range_search`), or `"auto"`, the one of those with the
  least expected MSE; and `PercentileObserver` on the same state.

`get(name_or_spec)` builds one from a name or a `kq.QuantSpec`.

Example:

>>> import keras, numpy as np, keras_quant as kq
>>> spec = kq.QuantSpec(bits=4, symmetric=True, observer="mse")
>>> obs = kq.observers.get(spec)                 # HistogramObserver(method="mse")
>>> model = keras.Sequential([keras.Input((16,)), obs])
>>> _ = model.predict(np.random.default_rng(0).normal(size=(256, 16)), verbose=0)
>>> scale, zero_point = obs.compute_qparams(spec)
"""

from keras_quant.config import QuantSpec
from keras_quant.errors import ConfigError
from keras_quant.observers import range_search
from keras_quant.observers.base import Observer
from keras_quant.observers.histogram import HistogramObserver, PercentileObserver
from keras_quant.observers.mean_std import MeanStdObserver
from keras_quant.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MeanStdObserver",
    "HistogramObserver",
    "get",
    "range_search",
    "REGISTRY",
]

# Name -> (class, fixed constructor arguments). `QuantSpec.observer` names these.
REGISTRY = {
    "minmax": (MinMaxObserver, {}),
    "moving_average": (MovingAverageMinMaxObserver, {}),
    "percentile": (PercentileObserver, {}),
    "mean_std": (MeanStdObserver, {}),
    "mse": (HistogramObserver, {"method": "mse"}),
    "kl": (HistogramObserver, {"method": "kl"}),
    "histogram": (HistogramObserver, {}),
    "auto": (HistogramObserver, {"method": "auto"}),
}


def _percentile_option(options):
    """`{"percentile": p}` for a PercentileObserver means `low=100 - p, high=p`."""
    if "percentile" in options:
        p = options.pop("percentile")
        options.setdefault("high", p)
        options.setdefault("low", 100.0 - p)
    return options


def get(name_or_spec, **kwargs):
    """An observer from a name, a `kq.QuantSpec` or an observer.

    From a name, a default instance (keyword arguments go to the
    constructor). From a spec, the observer its `observer` field names, with
    its granularity, axis and group size and `spec.options` as constructor
    arguments; `"mse"`, `"kl"` and `"auto"` give a `HistogramObserver` with
    that method whose `spec` is this spec, so the search targets its bit
    width (`"auto"` also takes `candidates` and `tolerance` options). An
    observer instance is returned as is.

    Args:
        name_or_spec: `"minmax"`, `"moving_average"`, `"percentile"`,
            `"mean_std"`, `"mse"`, `"kl"`, `"auto"`, `"histogram"`, a `kq.QuantSpec` or
            an `Observer`.
        **kwargs: More constructor arguments (e.g. `name=`), which override
            the spec's.

    Returns:
        A new, unbuilt `Observer` (or the one given).

    Raises:
        ConfigError: For an unknown name, or options/granularity that the
            observer does not accept.

    Example:

    >>> get("kl").method
    'kl'
    >>> get(QuantSpec(granularity="per_channel", observer="mean_std")).granularity
    'per_channel'
    """
    if isinstance(name_or_spec, Observer):
        return name_or_spec
    if isinstance(name_or_spec, QuantSpec):
        spec = name_or_spec
        name = spec.observer
        options = {"granularity": spec.granularity, "axis": spec.axis}
        if spec.granularity == "per_group":
            options["group_size"] = spec.group_size
        options.update(spec.options)
        if name in ("mse", "kl", "auto"):
            options["spec"] = spec
    elif isinstance(name_or_spec, str):
        name, options = name_or_spec, {}
    else:
        raise ConfigError("name_or_spec", name_or_spec, "expected an observer name, a kq.QuantSpec or an Observer")
    if name not in REGISTRY:
        raise ConfigError("observer", name, f"unknown observer; known observers are {tuple(REGISTRY)}")
    cls, fixed = REGISTRY[name]
    options.update(kwargs)
    if cls is PercentileObserver:
        options = _percentile_option(options)
    try:
        return cls(**fixed, **options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # an argument the class (or keras.layers.Layer) does not take
        raise ConfigError("observer_options", options, f"invalid arguments for {cls.__name__} ({e})") from None
