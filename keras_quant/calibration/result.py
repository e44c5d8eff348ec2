"""Calibration results: per-layer statistics, and their safe, atomic persistence (via `keras_quant.io`).

`LayerStatistics` holds what a `LayerCollector` saw of one tensor (moments,
extremes, a histogram, the spec's range and qparams) as plain numpy / Python
values; `CalibrationResult` is a read-only mapping of layer name to
`LayerStatistics` plus metadata. Both are pure data: every derived number
(percentiles, outlier counts, the range for another spec) is a numpy function
of the stored state, computed outside any compiled step.

`CalibrationResult.save` / `load` write and read the checksummed container of
`keras_quant.io` (JSON or msgpack, optionally gzip / zstd; atomic writes,
verified and size-bounded reads): a truncated, tampered or unknown file
raises `kq.errors.IntegrityError` and nothing is half-loaded.

Example:

>>> result = CalibrationResult({"dense": stats})          # doctest: +SKIP
>>> result.save("calib.msgpack.zst")                       # doctest: +SKIP
>>> scale, zero_point = CalibrationResult.load("calib.msgpack.zst").qparams("dense", kq.QuantSpec(bits=8))
"""

import collections.abc
import dataclasses
import datetime
import json
from typing import Any, Optional

import numpy as np

import keras_quant.io as kq_io
from keras_quant.calibration import decode
import keras_quant.ops as kq_ops
from keras_quant.config import QuantSpec
from keras_quant.errors import ConfigError, IntegrityError, NoDataError, NonFiniteError
from keras_quant.formatting import text_table, to_jsonable
import keras_quant.ops.range_search as range_search
from keras_quant.ops.core import check_spec
from keras_quant.observers.registry import REGISTRY
from keras_quant.ops.histogram import histogram_outliers, quantile

__all__ = [
    "LayerStatistics",
    "CalibrationResult",
    "histogram_outliers",
]

_NO_SAMPLE = "no calibration sample reached this layer (count is 0)"


# --------------------------------------------------------------------------
# LayerStatistics.


def _spec_matches(a, b):
    """Whether specs `a` and `b` choose the same range from the same state."""
    same = (a.observer, a.granularity, a.axis, a.group_size, a.options) == (
        b.observer, b.granularity, b.axis, b.group_size, b.options,
    )
    if same and a.observer in REGISTRY and REGISTRY[a.observer].grid:
        same = (a.bits, a.symmetric, a.narrow_range) == (b.bits, b.symmetric, b.narrow_range)
    return same


@dataclasses.dataclass(frozen=True, eq=False)
class LayerStatistics:
    """Statistics of one tensor (a layer's output) over a calibration, as numpy data.

    Moments are exact (merged across batches); percentiles and outlier counts
    are read from a histogram of `num_bins` bins over `[min, max]` and are
    accurate to about one bin. `skewness` is the biased (population) sample
    skewness and `kurtosis` the biased *excess* (Fisher) kurtosis, the values
    `scipy.stats.skew(x)` and `scipy.stats.kurtosis(x, fisher=True)` give;
    both are None for constant data. With `count == 0` every statistic is
    None and the methods raise `NoDataError`.

    Attributes:
        name: The layer (tensor) name.
        count: Number of finite elements seen.
        num_samples: Number of samples (batch entries) seen, or None.
        shape: Per-sample shape with a None batch axis, e.g. `(None, 8, 8, 16)`.
        dtype: The tensor's dtype name.
        min, max, mean, std, skewness, kurtosis: Floats (None without data).
        sparsity: Fraction of exact zeros among the finite elements.
        channel_min, channel_max: float32 arrays along `channel_axis`, or None.
        channel_axis: The axis of `channel_min` / `channel_max`.
        histogram: float64 counts, `(num_bins,)`; `bin_edges`: `(num_bins + 1,)`.
        non_finite_count: NaN/Inf elements seen (left out of every statistic).
        outliers: `{"zscore": n, "iqr": n, "mad": n}` (see `histogram_outliers`).
        spec: The `kq.QuantSpec` of this activation; `observer` its observer name.
        range_min, range_max: The range the spec's observer chose (floats, or
            arrays for a per-channel spec).
        scale, zero_point: `kq.ops.compute_qparams(range_min, range_max, spec)`.

    Example:

    >>> stats = collector.to_statistics()                     # doctest: +SKIP
    >>> stats.percentile(99.9), stats.qparams(kq.QuantSpec(bits=4, observer="mse"))
    """

    name: str
    count: int = 0
    num_samples: Optional[int] = None
    shape: Optional[tuple] = None
    dtype: Optional[str] = None
    min: Optional[float] = None
    max: Optional[float] = None
    mean: Optional[float] = None
    std: Optional[float] = None
    skewness: Optional[float] = None
    kurtosis: Optional[float] = None
    sparsity: Optional[float] = None
    channel_min: Optional[np.ndarray] = None
    channel_max: Optional[np.ndarray] = None
    channel_axis: int = -1
    histogram: Optional[np.ndarray] = None
    bin_edges: Optional[np.ndarray] = None
    non_finite_count: int = 0
    outliers: Optional[dict] = None
    spec: QuantSpec = dataclasses.field(default_factory=QuantSpec)
    observer: Optional[str] = None
    range_min: Any = None
    range_max: Any = None
    scale: Any = None
    zero_point: Any = None

    def __post_init__(self):
        if self.observer is None:
            object.__setattr__(self, "observer", self.spec.observer)

    __hash__ = None

    def __eq__(self, other):
        if not isinstance(other, LayerStatistics):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # Checks -----------------------------------------------------------------
    def require_data(self):
        """Raise `NoDataError` unless some finite value was seen (`count > 0`)."""
        if self.count <= 0:
            reason = _NO_SAMPLE
            if self.non_finite_count:
                reason = f"only non-finite values reached this layer ({self.non_finite_count} NaN/Inf)"
            raise NoDataError(self.name, reason=reason, layer=self.name)

    def _require(self, field, value, why):
        """Raise if `field` was not gathered (a calibration with `statistics="range"`)."""
        if value is None:
            raise ConfigError(
                field, None, f"{why} needs the {field}, which this calibration did not gather "
                "(calibrate with statistics='full' or an observer that uses it)", layer=self.name,
            )

    # Reading ----------------------------------------------------------------
    def percentile(self, q):
        """The `q`-th percentile, from the histogram's CDF (linear within a bin).

        Args:
            q: Percentile in `[0, 100]`; 0 and 100 give the exact min and max.

        Returns:
            A float, accurate to about one bin width.

        Raises:
            ConfigError: If `q` is not a number in `[0, 100]`.
            NoDataError: If no finite value was seen.

        Example:

        >>> stats.percentile(50.0)   # the median, within one bin  # doctest: +SKIP
        """
        if isinstance(q, bool) or not isinstance(q, (int, float, np.number)) or not 0 <= q <= 100:
            raise ConfigError("q", q, "q must be a percentile in [0, 100]", layer=self.name)
        self.require_data()
        if q == 0:
            return float(self.min)
        if q == 100:
            return float(self.max)
        self._require("histogram", self.histogram, "percentile()")
        value = quantile(self.histogram, self.bin_edges, float(q) / 100.0)
        return float(min(max(value, self.min), self.max))

    def compute_range(self, spec):
        """The range `spec`'s observer would choose, recomputed from the stored state.

        Per tensor, the pure range function of the observer's record in
        `keras_quant.observers.REGISTRY` on this state, with `spec.options`:
        `minmax` gives `(min, max)`; `percentile` the histogram's
        percentiles (`spec.options` `percentile`, default 99.99, or
        `low`/`high`); `mse` and `kl` the range search of
        `keras_quant.ops.range_search` for the spec's grid; `auto` the
        range of `choose_method(spec)`; `mean_std`
        `mean +- num_std * std` (option `num_std`, default 3) clipped to
        `[min, max]`; `moving_average` the stored range if the calibration
        used that observer, else `(min, max)`. Per channel: `minmax` along the
        stored `channel_axis` gives `(channel_min, channel_max)`; another
        per-channel spec only if it is the calibration's own (stored range).

        Args:
            spec: The `kq.QuantSpec`.

        Returns:
            `(min, max)`: floats, or float32 arrays per channel.

        Raises:
            NoDataError: If no finite value was seen.
            ConfigError: For a per-channel / per-group range the state cannot give.
        """
        check_spec(spec, layer=self.name)
        self.require_data()
        if spec.granularity != "per_tensor":
            if spec.granularity == "per_channel" and REGISTRY[spec.observer].needs == "minmax" \
                    and self.channel_min is not None:
                ndim = len(self.shape) if self.shape else None
                if ndim is None or spec.axis % ndim == self.channel_axis % ndim:
                    return self.channel_min.copy(), self.channel_max.copy()
            if self.range_min is not None and np.ndim(self.range_min) > 0 and _spec_matches(spec, self.spec):
                return np.array(self.range_min, copy=True), np.array(self.range_max, copy=True)
            raise ConfigError(
                "spec", spec,
                f"a {spec.granularity} '{spec.observer}' range needs a calibration with that spec; "
                f"this one observed {self.spec.granularity} '{self.observer}' and per-channel min/max along axis "
                f"{self.channel_axis}",
                layer=self.name,
            )
        lo, hi = float(self.min), float(self.max)
        record = REGISTRY[spec.observer]
        if hi <= lo:
            return lo, hi
        if record.needs == "histogram":
            self._require("histogram", self.histogram, f"a '{spec.observer}' range")
        elif record.needs == "moments":
            self._require("mean", self.mean, f"a '{spec.observer}' range")
        elif record.needs == "observer" and self.observer == spec.observer and self.range_min is not None \
                and np.ndim(self.range_min) == 0:  # the range the calibration's own observer found
            return float(self.range_min), float(self.range_max)
        return record.range(self, spec, spec.options)

    def _auto(self, spec, candidates=None):
        options = spec.options
        return range_search.auto_range(
            self.histogram, self.bin_edges, spec,
            candidates=options.get("candidates") if candidates is None else candidates,
            tolerance=options.get("tolerance"), percentile=options.get("percentile", 99.99),
        )

    def choose_method(self, spec, candidates=None):
        """Which range method `observer="auto"` picks for this tensor, and each candidate's error.

        Every candidate's range is recomputed from the stored histogram and
        judged by the expected quantization MSE of this tensor on `spec`'s
        grid (`keras_quant.ops.range_search.auto_range`); `spec`'s
        options `candidates`, `tolerance` and `percentile` apply, whatever
        its `observer`. Per tensor only.

        Args:
            spec: The `kq.QuantSpec` whose grid the ranges are judged on.
            candidates: Methods to compare (overrides the spec's option).

        Returns:
            A `range_search.AutoRange`: `method`, `min`, `max`, `errors`
            (`{method: MSE}`), `ranges` and `candidates`.

        Raises:
            NoDataError: If no finite value was seen.
            ConfigError: For a per-channel / per-group spec, a calibration
                without a histogram, or bad candidates / tolerance.

        Example:

        >>> choice = result["dense"].choose_method(kq.QuantSpec(bits=4))   # doctest: +SKIP
        >>> choice.method, choice.errors["minmax"] / choice.errors[choice.method]   # doctest: +SKIP
        """
        check_spec(spec, layer=self.name)
        if spec.granularity != "per_tensor":
            raise ConfigError(
                "granularity", spec.granularity,
                "choose_method compares per-tensor ranges; the calibration stores one histogram per tensor",
                layer=self.name,
            )
        self.require_data()
        self._require("histogram", self.histogram, "choose_method()")
        return self._auto(spec, candidates)

    def qparams(self, spec):
        """Scale and zero point for `spec` from `compute_range(spec)`.

        Args:
            spec: The `kq.QuantSpec`.

        Returns:
            `(scale, zero_point)`: float32 and int32 numpy arrays (0-d per tensor).

        Raises:
            NoDataError: If no finite value was seen.
            ConfigError: As `compute_range`.
        """
        lo, hi = self.compute_range(spec)
        return kq_ops.numpy_qparams(np.asarray(lo, np.float32), np.asarray(hi, np.float32), spec)

    # Serialization ------------------------------------------------------------
    def with_spec_range(self):
        """A copy holding `range_min` / `range_max`, `scale` and `zero_point` of its own spec
        (`compute_range(self.spec)`; Python floats / int per tensor, arrays per channel)."""
        rmin, rmax = self.compute_range(self.spec)
        scale, zero_point = kq_ops.numpy_qparams(np.asarray(rmin, np.float32), np.asarray(rmax, np.float32), self.spec)
        if np.ndim(rmin) == 0:
            rmin, rmax, scale, zero_point = float(rmin), float(rmax), float(scale), int(zero_point)
        return dataclasses.replace(self, range_min=rmin, range_max=rmax, scale=scale, zero_point=zero_point)

    def to_tree(self):
        """The fields as plain Python / numpy values (the spec as its config, the shape as a list)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["shape"] = None if self.shape is None else list(self.shape)
        d["spec"] = self.spec.get_config()
        return d

    def to_dict(self):
        """Plain JSON-able data (arrays tagged with dtype/shape, non-finite floats as strings).

        Returns:
            A dict that `json.dumps` takes and `from_dict` reads back exactly.
        """
        return kq_io.encode_tree(self.to_tree(), binary=False)

    @classmethod
    def from_dict(cls, d):
        """A `LayerStatistics` from `to_dict()` data (or its msgpack form).

        Args:
            d: The dict.

        Returns:
            A new `LayerStatistics`.

        Raises:
            ConfigError: For unknown fields, or a value of the wrong type,
                range or size (see `keras_quant.calibration.decode`).
            NonFiniteError: For NaN / Inf where a finite value is required.
        """
        if not isinstance(d, collections.abc.Mapping):
            raise ConfigError("statistics", type(d).__name__, "LayerStatistics.from_dict needs a dict")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"unknown LayerStatistics field; known fields are {sorted(names)}")
        return cls(**decode.layer_fields(d))


# --------------------------------------------------------------------------
# CalibrationResult.


def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class CalibrationResult(collections.abc.Mapping):
    """Read-only mapping of layer name to `LayerStatistics`, with metadata.

    Args:
        layers: A mapping of name to `LayerStatistics`, or an iterable of
            `LayerStatistics` (keyed by their `name`); the order is kept.
        metadata: Optional dict: `samples_seen`, `sampling`, `model`,
            `config`, ...; `keras_quant_version` and `created` (UTC ISO time)
            are filled in when absent.

    Raises:
        ConfigError: For a value that is not a `LayerStatistics`.

    Example:

    >>> result = CalibrationResult([stats_a, stats_b], metadata={"model": "cnn"})  # doctest: +SKIP
    >>> result["conv2d"].max, result.qparams("conv2d", kq.QuantSpec(bits=8))        # doctest: +SKIP
    """

    def __init__(self, layers=(), metadata=None):
        items = layers.items() if isinstance(layers, collections.abc.Mapping) else ((s.name, s) for s in layers)
        self._layers = {}
        for name, stats in items:
            if not isinstance(stats, LayerStatistics):
                raise ConfigError("layers", type(stats).__name__, "values must be LayerStatistics", layer=name)
            self._layers[str(name)] = stats
        from keras_quant.version import __version__

        meta = dict(metadata or {})
        meta.setdefault("keras_quant_version", __version__)
        meta.setdefault("created", _now_iso())
        self._metadata = meta

    # Mapping ----------------------------------------------------------------
    def __getitem__(self, name):
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r} in the calibration; known layers: {list(self._layers)}") from None

    def __iter__(self):
        return iter(self._layers)

    def __len__(self):
        return len(self._layers)

    def __repr__(self):
        return f"CalibrationResult({len(self)} layers: {list(self._layers)[:8]}{'...' if len(self) > 8 else ''})"

    def __eq__(self, other):
        if not isinstance(other, CalibrationResult):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    @property
    def layer_names(self):
        """Layer names in recording order (a new list)."""
        return list(self._layers)

    @property
    def metadata(self):
        """A copy of the metadata dict."""
        return json.loads(json.dumps(to_jsonable(self._metadata)))

    # Queries ----------------------------------------------------------------
    def qparams(self, name, spec):
        """Scale and zero point of layer `name` for `spec`.

        Args:
            name: The layer name.
            spec: The `kq.QuantSpec`.

        Returns:
            `(scale, zero_point)` numpy arrays.

        Raises:
            NoDataError: If the layer is absent from the calibration, or no
                sample reached it.
        """
        if name not in self._layers:
            raise NoDataError(
                name, reason=f"the layer is absent from the calibration (known layers: {list(self._layers)})", layer=name
            )
        return self._layers[name].qparams(spec)

    def summary(self, print_fn=print):
        """Print one row per layer: count, min, max, mean, std, sparsity, scale, zero_point.

        Args:
            print_fn: Called with the table text.

        Returns:
            The table text.
        """
        rows = []
        for name, s in self._layers.items():
            per_tensor = s.scale is not None and np.ndim(s.scale) == 0
            rows.append({
                "name": name, "count": s.count, "min": s.min, "max": s.max, "mean": s.mean, "std": s.std,
                "sparsity": s.sparsity, "scale": float(s.scale) if per_tensor else ("per-channel" if s.scale is not None else None),
                "zero_point": int(s.zero_point) if per_tensor else None,
            })
        title = f"Calibration: {len(self)} layers, {self._metadata.get('samples_seen', '?')} samples"
        text = text_table(rows, ["name", "count", "min", "max", "mean", "std", "sparsity", "scale", "zero_point"], title)
        print_fn(text)
        return text

    @classmethod
    def merge(cls, results, *more):
        """The result one pass over the disjoint shards' data gives (see `keras_quant.calibration.merge`).

        Args:
            results: An iterable of `CalibrationResult`, or the first one (more follow as arguments).
            *more: More `CalibrationResult`.

        Raises:
            ConfigError: For no result, or shards that disagree on a layer (naming layer, field, values).

        Example:

        >>> kq.CalibrationResult.merge(kq.CalibrationResult.load(p) for p in paths).save("all.json")  # doctest: +SKIP
        """
        from keras_quant.calibration.merge import merge_results

        return merge_results(cls, results, more)

    # Serialization ------------------------------------------------------------
    def _tree(self):
        return {"metadata": to_jsonable(self._metadata), "layers": [s.to_tree() for s in self._layers.values()]}

    def to_dict(self):
        """Plain JSON-able data: `{"metadata": {...}, "layers": [LayerStatistics.to_dict(), ...]}`."""
        return kq_io.encode_tree(self._tree(), binary=False)

    @classmethod
    def from_dict(cls, d):
        """A new `CalibrationResult` from `to_dict()` data.

        Raises:
            ConfigError: For malformed data (see `LayerStatistics.from_dict`),
                or two layers of one name.
            NonFiniteError: For NaN / Inf where a finite value is required.
        """
        if not isinstance(d, collections.abc.Mapping) or not isinstance(d.get("layers"), list):
            raise ConfigError("result", type(d).__name__, "CalibrationResult.from_dict needs {'metadata': ..., 'layers': [...]}")
        metadata = d.get("metadata")
        if metadata is not None and not isinstance(metadata, collections.abc.Mapping):
            raise ConfigError("metadata", type(metadata).__name__, "metadata must be a dict")
        layers = [LayerStatistics.from_dict(x) for x in d["layers"]]
        names = [s.name for s in layers]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError("layers", twice, "the layers' names must differ", layer=twice[0])
        return cls(layers, metadata=dict(metadata or {}))

    def save(self, path, format=None, compression=None):  # noqa: A002 (Keras-style argument name)
        """Write the result to `path` atomically.

        Args:
            path: Target file; the format (`.json`, `.msgpack` / `.mpk`) and
                compression (`.gz`, `.zst` after it) are inferred from the suffix.
            format: `"json"` or `"msgpack"`; overrides the suffix.
            compression: None, `"gzip"` or `"zstd"`; overrides the suffix.

        Returns:
            The path written.

        Raises:
            ConfigError: For an unknown format/compression or a suffix that names none.
        """
        return kq_io.save_tree(path, self._tree(), format, compression)

    @classmethod
    def load(cls, path):
        """Read a result written by `save` (any format / compression), verified.

        Args:
            path: The file.

        Returns:
            A new `CalibrationResult`.

        Raises:
            IntegrityError: For a truncated, tampered or garbled file, an
                unknown schema version or format, or a value that is not a
                valid calibration value (the message names the layer, the
                field and the value; the `ConfigError` is its `__cause__`).
                Nothing is half-loaded.
            NonFiniteError: For NaN / Inf where a finite value is required
                (`min`, `scale`, a histogram count, ...), the file named.
            FileNotFoundError: If `path` does not exist.
        """
        tree = kq_io.load_tree(path)
        try:
            return cls.from_dict(tree)
        except NonFiniteError as e:
            err = NonFiniteError(e.count, field=f"{e.field} (in {path})", layer=e.layer, nan_policy=None)
            err.field = e.field
            raise err from None
        except Exception as e:
            raise IntegrityError(path, f"the payload is not a calibration result ({type(e).__name__}: {e})") from e
