"""The observer registry: every range method named once, with what it needs and its pure range function.

One `ObserverRecord` per name of `keras_quant.config.OBSERVERS` (plus the
`"histogram"` alias of `get`) says

- which observer class, with which fixed options, `get` builds for it;
- what a calibration collector must keep to compute the range without the
  observer (`needs`): the extremes (`"minmax"`), a histogram over them
  (`"histogram"`), the moments (`"moments"`), or nothing it can keep: the
  observer itself (`"observer"`, the moving average);
- its range as a pure function of that state, `range(state, spec, options)`,
  `state` anything with `min`, `max`, `histogram`, `bin_edges`, `mean` and
  `std` attributes (a `RangeState`, or a
  `keras_quant.calibration.result.LayerStatistics`);
- whether the range depends on the spec's grid (`grid`: bits, symmetric,
  narrow range) and whether `keras_quant.ops.weight_range` searches weights
  with it (`weight_search`).

The config's validation, `keras_quant.observers.get`, the calibration's
`LayerCollector` and `LayerStatistics.compute_range` all read this table.
The lower layers hold the plain facts they need (the name tuple
`keras_quant.config.OBSERVERS`, `keras_quant.ops.core.WEIGHT_SEARCH_OBSERVERS`);
this module checks at import that they match the records, so a new range
method is one record here plus its name there.

Example:

>>> import numpy as np, keras_quant as kq
>>> from keras_quant.observers.registry import REGISTRY, RangeState
>>> h, e = np.histogram(np.random.default_rng(0).normal(size=10_000), bins=512)
>>> state = RangeState(min=float(e[0]), max=float(e[-1]), histogram=h, bin_edges=e)
>>> lo, hi = REGISTRY["percentile"].range(state, kq.QuantSpec(), {"percentile": 99.0})
"""

import dataclasses
import types
from typing import Any, Callable, Optional

import numpy as np

from keras_quant.config import OBSERVERS, QuantSpec
from keras_quant.errors import ConfigError
import keras_quant.ops.range_search as range_search
from keras_quant.observers.base import Observer
from keras_quant.observers.histogram import HistogramObserver, PercentileObserver
from keras_quant.observers.mean_std import MeanStdObserver, mean_std_range
from keras_quant.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from keras_quant.ops.core import WEIGHT_SEARCH_OBSERVERS

__all__ = ["ObserverRecord", "RangeState", "REGISTRY", "NEEDS", "get"]

NEEDS = ("minmax", "histogram", "moments", "observer")


@dataclasses.dataclass(frozen=True)
class RangeState:
    """The state a range function reads: extremes, and a histogram or moments where gathered.

    Attributes:
        min, max: The finite extremes seen.
        histogram, bin_edges: Counts `(n,)` and edges `(n + 1,)` over `[min, max]`, or None.
        mean, std: The mean and population standard deviation, or None.
    """

    min: float
    max: float
    histogram: Optional[np.ndarray] = None
    bin_edges: Optional[np.ndarray] = None
    mean: Optional[float] = None
    std: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class ObserverRecord:
    """One range method: its observer, what a collector keeps for it, and its range function.

    Attributes:
        name: The name (`QuantSpec.observer`).
        cls: The `Observer` class `get` builds.
        options: Fixed constructor arguments (a read-only mapping).
        needs: One of `NEEDS`: what a collector keeps to compute the range.
        range: `range(state, spec, options) -> (min, max)` (floats), pure, or
            None for a `get`-only alias; `options` are the method's settings
            (a spec's `options`).
        grid: Whether the range depends on the spec's grid (`get` gives the
            observer the spec, and statistics gathered for one grid do not
            serve another).
        weight_search: Whether `keras_quant.ops.weight_range` searches a
            weight's clipping range for this name (else min-max).
    """

    name: str
    cls: type
    options: Any = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    needs: str = "minmax"
    range: Optional[Callable] = None
    grid: bool = False
    weight_search: bool = False


def _minmax(state, spec, options):
    return float(state.min), float(state.max)


def _search(method):
    """The range function of a histogram search (`range_search.SEARCHES[method]`)."""

    def search(state, spec, options):
        lo, hi = range_search.SEARCHES[method](state.histogram, state.bin_edges, spec, options)
        return float(lo), float(hi)

    search.__name__ = f"{method}_search"
    return search


def _mean_std(state, spec, options):
    lo, hi = mean_std_range(state.mean, state.std, state.min, state.max, float(options.get("num_std", 3.0)))
    return float(lo), float(hi)


def _record(name, cls, needs, range_fn, options=None, grid=False, weight_search=False):
    return ObserverRecord(name, cls, types.MappingProxyType(dict(options or {})), needs, range_fn, grid,
                          weight_search)


# `QuantSpec.observer` names these; "histogram" is a `get`-only alias (a HistogramObserver with its defaults).
# For "moving_average" the range is the observer's own (a collector runs one); `_minmax` is what the
# statistics give without it.
REGISTRY = {
    "minmax": _record("minmax", MinMaxObserver, "minmax", _minmax),
    "moving_average": _record("moving_average", MovingAverageMinMaxObserver, "observer", _minmax),
    "percentile": _record("percentile", PercentileObserver, "histogram", _search("percentile")),
    "mean_std": _record("mean_std", MeanStdObserver, "moments", _mean_std),
    "mse": _record("mse", HistogramObserver, "histogram", _search("mse"), {"method": "mse"}, grid=True,
                   weight_search=True),
    "kl": _record("kl", HistogramObserver, "histogram", _search("kl"), {"method": "kl"}, grid=True),
    "histogram": _record("histogram", HistogramObserver, "histogram", None),
    "auto": _record("auto", HistogramObserver, "histogram", _search("auto"), {"method": "auto"}, grid=True,
                    weight_search=True),
}


def _check_registry():
    """The plain facts the lower layers hold match the records (run at import)."""
    named = tuple(name for name, record in REGISTRY.items() if record.range is not None)
    if set(named) != set(OBSERVERS):
        raise ImportError(f"observers.REGISTRY names {named}, config.OBSERVERS {OBSERVERS}")
    searched = {name for name, record in REGISTRY.items() if record.weight_search}
    if searched != set(WEIGHT_SEARCH_OBSERVERS):
        raise ImportError(f"weight-search records {sorted(searched)} != {WEIGHT_SEARCH_OBSERVERS}")
    if any(record.needs not in NEEDS for record in REGISTRY.values()):
        raise ImportError(f"a record's needs is not one of {NEEDS}")


_check_registry()


def _percentile_option(options):
    """`{"percentile": p}` for a PercentileObserver means `low=100 - p, high=p`."""
    if "percentile" in options:
        options["low"], options["high"] = range_search.percentile_bounds(options)
        del options["percentile"]
    return options


def get(name_or_spec, **kwargs):
    """An observer from a name, a `kq.QuantSpec` or an observer.

    From a name, a default instance (keyword arguments go to the
    constructor). From a spec, the observer its `observer` field names, with
    its granularity, axis and group size and `spec.options` as constructor
    arguments; `"mse"`, `"kl"` and `"auto"` (the records with `grid`) give a
    `HistogramObserver` with that method whose `spec` is this spec, so the
    search targets its bit width (`"auto"` also takes `candidates` and
    `tolerance` options). An observer instance is returned as is.

    Args:
        name_or_spec: A name of `REGISTRY` (`"minmax"`, `"moving_average"`,
            `"percentile"`, `"mean_std"`, `"mse"`, `"kl"`, `"auto"`,
            `"histogram"`), a `kq.QuantSpec` or an `Observer`.
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
        if name in REGISTRY and REGISTRY[name].grid:
            options["spec"] = spec
    elif isinstance(name_or_spec, str):
        name, options = name_or_spec, {}
    else:
        raise ConfigError("name_or_spec", name_or_spec, "expected an observer name, a kq.QuantSpec or an Observer")
    if name not in REGISTRY:
        raise ConfigError("observer", name, f"unknown observer; known observers are {tuple(REGISTRY)}")
    record = REGISTRY[name]
    cls = record.cls
    options.update(kwargs)
    if cls is PercentileObserver:
        options = _percentile_option(options)
    try:
        return cls(**record.options, **options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # an argument the class (or keras.layers.Layer) does not take
        raise ConfigError("observer_options", options, f"invalid arguments for {cls.__name__} ({e})") from None
