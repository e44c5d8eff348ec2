"""Merging calibration results: shards calibrated anywhere, combined as one pass over all their data.

`merge_statistics(stats)` combines the `LayerStatistics` of one layer from
disjoint shards of the calibration data (separate processes, machines, Spark /
Ray / Beam tasks); `merge_metadata(metadatas)` their results' metadata.
`kq.CalibrationResult.merge` is the public entry point. What merges how:

- counts (`count`, `num_samples`, `non_finite_count`, the exact zeros behind
  `sparsity`) add; `min` / `max` and the per-channel `channel_min` /
  `channel_max` take the extremes: exact;
- the moments (`mean`, `std`, `skewness`, `kurtosis`) are turned back into
  `(n, mean, M2, M3, M4)` and merged by the exact pairwise formula
  `keras_quant.calibration.step.merge_moments` (Chan et al. 1979, Pébay
  2008), in float64: equal to one pass to float32 precision, in any order;
- histograms are moved onto `num_bins` bins over the union range (the mass
  of each bin spread uniformly over it, as the collector's own
  `keras_quant.ops.histogram.rebin_counts` does when its range widens) and
  added; percentiles, outliers and the `percentile` / `mse` / `kl` / `auto`
  ranges are then read from the merged histogram, as after one pass (to about
  one bin);
- the spec's range, scale and zero point are recomputed from the merged state.
  A range that only the spec's own observer state holds (`moving_average`, or
  a per-channel spec other than `minmax`) has no exact merge: it is the
  count-weighted mean of the shards' ranges (`minmax` ones take the extremes).

A shard in which no finite value reached a layer (`count == 0`) adds only
its sample and non-finite counts. Shards must agree on each layer's spec,
observer, per-sample shape, dtype, channel axis, histogram bins and kinds of
statistics gathered (`statistics="full"` or `"range"`); a disagreement raises
`kq.errors.ConfigError` (or `ShapeMismatchError` for shapes) naming the layer,
the field and both values.

Example:

>>> merged = merge_statistics([shard_a["dense"], shard_b["dense"]])   # doctest: +SKIP
>>> merged.count == shard_a["dense"].count + shard_b["dense"].count   # doctest: +SKIP
True
"""

import collections.abc
import dataclasses
import datetime

import numpy as np

from keras_quant.calibration.step import merge_moments
from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.observers.registry import REGISTRY
from keras_quant.ops.histogram import histogram_outliers

__all__ = ["merge_results", "merge_statistics", "merge_metadata", "rebin_histogram"]

# Statistics a collector keeps or not by its `statistics` / spec: present in every shard or in none.
_KINDS = (("mean", "moments"), ("sparsity", "zero counts"), ("histogram", "histogram"),
          ("channel_min", "per-channel extremes"))
# Metadata that belongs to one shard's run, never copied to the merged result as it is.
_PER_SHARD = ("created", "samples_seen", "source", "merged")


def rebin_histogram(hist, lo, hi, new_lo, new_hi, bins):
    """`hist` (counts over `len(hist)` equal bins on `[lo, hi]`) moved onto `bins` equal bins on `[new_lo, new_hi]`.

    The count of each old bin is spread uniformly over its width and split
    among the new bins it overlaps (the cumulative counts interpolated at the
    new edges); `[new_lo, new_hi]` must contain `[lo, hi]`. An empty-width
    old range (`lo == hi`: every value equal) puts its whole mass in the new
    bin holding `lo`, as `keras_quant.ops.histogram.rebin_counts` does.

    Args:
        hist: 1-D counts.
        lo, hi: The old range.
        new_lo, new_hi: The new range.
        bins: The number of new bins.

    Returns:
        float64 counts `(bins,)` with the same total.

    Example:

    >>> rebin_histogram(np.array([1.0, 1.0]), 0.0, 1.0, 0.0, 2.0, 2).tolist()
    [2.0, 0.0]
    """
    hist = np.asarray(hist, np.float64)
    if (lo, hi, len(hist)) == (new_lo, new_hi, bins):
        return hist.copy()
    out = np.zeros(bins, np.float64)
    width = new_hi - new_lo
    if width <= 0:
        out[0] = hist.sum()
        return out
    if hi <= lo:
        index = int(np.clip(np.floor((lo - new_lo) / width * bins), 0, bins - 1))
        out[index] = hist.sum()
        return out
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    edges = np.linspace(new_lo, new_hi, bins + 1)
    return np.diff(np.interp(edges, np.linspace(lo, hi, len(hist) + 1), cumulative))


def _raw_moments(s):
    """`(n, mean, M2, M3, M4)` of a shard from its stored mean / std / skewness / kurtosis (float64)."""
    n = float(s.count)
    m2 = n * float(s.std) ** 2
    if s.skewness is None or m2 <= 0:  # constant data: every central moment is 0
        return n, float(s.mean), m2, 0.0, 0.0
    m3 = float(s.skewness) * m2**1.5 / np.sqrt(n)
    m4 = (float(s.kurtosis) + 3.0) * m2 * m2 / n
    return n, float(s.mean), m2, m3, m4


def _moment_stats(n, mean, m2, m3, m4):
    """`(mean, std, skewness, kurtosis)` as `kq.calibration.stats.moments_to_stats` gives them."""
    m2 = max(m2, 0.0)
    std = float(np.sqrt(m2 / n))
    if m2 <= 0 or std <= 1e-30:
        return float(mean), std, None, None
    return float(mean), std, float(np.sqrt(n) * m3 / m2**1.5), float(n * m4 / (m2 * m2) - 3.0)


def _describe(value):
    return value.get_config() if hasattr(value, "get_config") else value


def _check_same(name, shards, field, read, error=ConfigError):
    """Raise unless `read(s)` (None: not known, skipped) agrees over `shards`."""
    seen = [(i, v) for i, s in enumerate(shards) if (v := read(s)) is not None]
    for i, value in seen[1:]:
        first, second = _describe(seen[0][1]), _describe(value)
        if first != second:
            if isinstance(first, dict) and isinstance(second, dict):  # a spec: only the keys that differ
                keys = [k for k in dict.fromkeys([*first, *second]) if first.get(k) != second.get(k)]
                first, second = ({k: d.get(k) for k in keys} for d in (first, second))
            reason = f"cannot merge the calibrations: shard {seen[0][0]} has {field}={first!r}, shard {i} has {field}={second!r}"
            if error is ShapeMismatchError:
                raise ShapeMismatchError(field, first, value, layer=name)
            raise ConfigError(field, second, reason, layer=name)


def _check_compatible(name, shards):
    _check_same(name, shards, "spec", lambda s: s.spec)
    _check_same(name, shards, "observer", lambda s: s.observer)
    _check_same(name, shards, "shape", lambda s: s.shape, ShapeMismatchError)
    _check_same(name, shards, "dtype", lambda s: s.dtype)
    _check_same(name, shards, "channel_axis", lambda s: s.channel_axis)
    with_data = [s for s in shards if s.count > 0]
    _check_same(name, with_data, "num_bins", lambda s: None if s.histogram is None else len(s.histogram))
    _check_same(name, with_data, "channels", lambda s: None if s.channel_min is None else len(s.channel_min),
                ShapeMismatchError)
    for field, kind in _KINDS:
        _check_same(name, with_data, "statistics",
                    lambda s, f=field, k=kind: f"{k} {'kept' if getattr(s, f) is not None else 'not kept'}")


def _observer_range(first):
    """Whether the spec's range lives only in its own observer's state (not recomputable from the statistics)."""
    spec, needs = first.spec, REGISTRY[first.spec.observer].needs
    if spec.granularity == "per_tensor":
        return needs == "observer"
    return not (spec.granularity == "per_channel" and needs == "minmax" and first.channel_min is not None)


def _merged_observer_range(shards):
    """Extremes of `minmax` ranges; otherwise the count-weighted mean of the shards' ranges."""
    ranges = [(s.count, np.asarray(s.range_min, np.float64), np.asarray(s.range_max, np.float64))
              for s in shards if s.range_min is not None]
    if shards[0].spec.observer == "minmax":
        lo = np.minimum.reduce([r[1] for r in ranges])
        hi = np.maximum.reduce([r[2] for r in ranges])
    else:
        weights = np.asarray([r[0] for r in ranges], np.float64)
        lo = np.tensordot(weights, np.stack([r[1] for r in ranges]), axes=1) / weights.sum()
        hi = np.tensordot(weights, np.stack([r[2] for r in ranges]), axes=1) / weights.sum()
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo.astype(np.float32), hi.astype(np.float32)


def _merged_data(shards):
    """The data fields (min ... outliers) merged over shards that all have data."""
    first = shards[0]
    count = sum(s.count for s in shards)
    lo, hi = min(float(s.min) for s in shards), max(float(s.max) for s in shards)
    fields = dict(count=count, min=lo, max=hi)
    if first.mean is not None:
        moments = _raw_moments(first)
        for s in shards[1:]:
            moments = merge_moments(moments, _raw_moments(s))
        fields.update(zip(("mean", "std", "skewness", "kurtosis"), _moment_stats(*moments)))
    if first.sparsity is not None:
        zeros = sum(round(float(s.sparsity) * s.count) for s in shards)
        fields["sparsity"] = zeros / count
    if first.channel_min is not None:
        fields["channel_min"] = np.minimum.reduce([s.channel_min for s in shards]).astype(np.float32)
        fields["channel_max"] = np.maximum.reduce([s.channel_max for s in shards]).astype(np.float32)
    if first.histogram is not None:
        bins = len(first.histogram)
        hist = sum(rebin_histogram(s.histogram, float(s.min), float(s.max), lo, hi, bins) for s in shards)
        fields["histogram"], fields["bin_edges"] = hist, np.linspace(lo, hi, bins + 1)
        if fields.get("mean") is not None:
            fields["outliers"] = histogram_outliers(hist, fields["bin_edges"], fields["mean"], fields["std"])
    return fields


def merge_statistics(stats):
    """One layer's `LayerStatistics` from disjoint shards, as one pass over all their data gives them.

    Args:
        stats: A non-empty sequence of `LayerStatistics` of the same layer
            (the first one's name is kept).

    Returns:
        A new `LayerStatistics` (a single one is returned as an equal copy).

    Raises:
        ConfigError: For shards that disagree on the spec, observer, dtype,
            channel axis, histogram bins or kinds of statistics.
        ShapeMismatchError: For shards that disagree on the per-sample shape
            or the number of channels.

    Example:

    >>> merge_statistics([a["dense"], b["dense"]]).percentile(99.0)   # doctest: +SKIP
    """
    stats = list(stats)
    if not stats:
        raise ConfigError("stats", stats, "merge needs at least one LayerStatistics")
    first = stats[0]
    _check_compatible(first.name, stats)
    if len(stats) == 1:
        return dataclasses.replace(first)
    known = [s for s in stats if s.shape is not None]
    base = known[0] if known else first
    num_samples = [s.num_samples for s in stats if s.num_samples is not None]
    counts = dict(num_samples=sum(num_samples) if num_samples else None,
                  non_finite_count=sum(s.non_finite_count for s in stats))
    empty = {f.name: None for f in dataclasses.fields(first)
             if f.name not in ("name", "count", "num_samples", "shape", "dtype", "channel_axis", "non_finite_count",
                               "spec", "observer")}
    with_data = [s for s in stats if s.count > 0]
    merged = dataclasses.replace(base, name=first.name, count=0, **empty, **counts)
    if not with_data:
        return merged
    merged = dataclasses.replace(merged, **_merged_data(with_data))
    if _observer_range(with_data[0]):
        rmin, rmax = _merged_observer_range(with_data)
        merged = dataclasses.replace(merged, range_min=rmin, range_max=rmax)
    return merged.with_spec_range()


def merge_metadata(metadatas):
    """The metadata of a merged result: what every shard agrees on, the summed samples, and each shard's own.

    Keys equal in every shard are kept; `samples_seen` is summed (when every
    shard has it); `statistics` must agree; `merged` records `shards` (how
    many) and `sources` (each shard's `created`, `samples_seen`, `source`
    and the keys that differ between shards). Merging merged results nests
    nothing: their own sources are flattened in.

    Raises:
        ConfigError: If the shards' `statistics` ("full" / "range") differ.
    """
    metadatas = [dict(m) for m in metadatas]
    kinds = {m.get("statistics") for m in metadatas} - {None}
    if len(kinds) > 1:
        raise ConfigError("statistics", sorted(kinds), "cannot merge calibrations that gathered different statistics "
                          "(calibrate every shard with the same statistics=)")
    keys = [k for k in dict.fromkeys(k for m in metadatas for k in m) if k not in _PER_SHARD]
    shared = {k: metadatas[0][k] for k in keys if all(k in m and m[k] == metadatas[0][k] for m in metadatas)}
    sources = []
    for m in metadatas:
        if "merged" in m:
            sources.extend(m["merged"].get("sources", []))
            continue
        own = {k: m[k] for k in ("created", "samples_seen", "source") if k in m}
        own.update({k: m[k] for k in keys if k in m and k not in shared})
        sources.append(own)
    samples = [m.get("samples_seen") for m in metadatas]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in samples):
        shared["samples_seen"] = sum(samples)
    shared["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    shared["merged"] = {"shards": len(sources), "sources": sources}
    return shared


def merge_results(cls, results, more=()):
    """`cls` (`kq.CalibrationResult`) of the merged results: the union of their layers, in first-seen order.

    Args:
        cls: The result class.
        results: An iterable of results, or one result.
        more: More results.

    Raises:
        ConfigError: For no result, or a value that is not a `cls`; as `merge_statistics`.
    """
    if isinstance(results, cls):
        results = [results]
    elif not isinstance(results, collections.abc.Iterable) or isinstance(results, (str, bytes, dict)):
        raise ConfigError("results", type(results).__name__, "CalibrationResult.merge takes CalibrationResult "
                          "objects, or an iterable of them")
    results = [*results, *more]
    if not results:
        raise ConfigError("results", [], "CalibrationResult.merge needs at least one result")
    for r in results:
        if not isinstance(r, cls):
            raise ConfigError("results", type(r).__name__, "CalibrationResult.merge takes CalibrationResult objects")
    names = dict.fromkeys(name for r in results for name in r)
    layers = {name: merge_statistics([r[name] for r in results if name in r]) for name in names}
    return cls(layers, metadata=merge_metadata([r.metadata for r in results]))
