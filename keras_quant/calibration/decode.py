"""The checks of a stored `LayerStatistics`: every field validated, nothing coerced.

`LayerStatistics.from_dict` (and so `CalibrationResult.load` and
`CalibrationCache.get`) builds its fields with `layer_fields(d)`: a value of
the wrong type, a float where an integer belongs (`channel_axis=1.5`), a
negative or absurd count or size (`count=10**400`, `shape=[-1]`), a
non-positive scale, a missing name, or arrays whose lengths disagree is a
`keras_quant.errors.ConfigError` naming the layer, the field and the value; NaN
or Inf where a finite value is required (`"min": NaN`, a histogram count,
a scale, a spec option) is a `keras_quant.errors.NonFiniteError` naming the
layer and the field. A file with a correct checksum is still data from
outside: what it says is checked before a model is built from it.

Where a non-finite value is legitimate it is kept: `channel_min` / `channel_max`
(and a per-channel `range_min` / `range_max`) hold `+inf` / `-inf` for a
channel that saw no finite value, as the collector leaves it.

Example:

>>> from keras_quant.calibration import decode
>>> decode.layer_fields({"name": "dense", "count": 3})["count"]
3
"""

import math
import numbers

import numpy as np

from keras_quant.config import MAX_AXIS, QuantSpec
from keras_quant.errors import ConfigError, NonFiniteError
from keras_quant.io import decode_array

__all__ = ["layer_fields", "MAX_COUNT", "MAX_AXIS", "MAX_NAME_LENGTH"]

MAX_COUNT = (1 << 63) - 1  # counts and sizes must fit an int64
# An axis lies in [-MAX_AXIS, MAX_AXIS), a shape has at most MAX_AXIS sizes: QuantSpec's own bound.
MAX_NAME_LENGTH = 4096
_INT32 = 1 << 31
_NON_FINITE = ("inf", "-inf", "nan")
_FLOATS = ("min", "max", "mean", "std", "skewness", "kurtosis", "sparsity")
_COUNTS = ("count", "num_samples", "non_finite_count")


def _bad(field, value, reason, layer):
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        value = f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"  # named, not printed whole
    return ConfigError(field, value, reason, layer=layer)


def _integer(d, field, layer, minimum=0, maximum=MAX_COUNT, default=None):
    """`d[field]` as an int in `[minimum, maximum]` (a bool, a float, a string: refused)."""
    value = d.get(field, default)
    if value is None and default is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or not minimum <= value <= maximum:
        raise _bad(field, value, f"{field} must be an integer in [{minimum}, {maximum}]", layer)
    return int(value)


def _finite_float(value, field, layer):
    """A stored scalar (number, or `"inf"`/`"nan"` as JSON writes them) as a finite float, or None."""
    if value is None:
        return None
    if isinstance(value, str) and value in _NON_FINITE:
        raise NonFiniteError(1, field=field, layer=layer, nan_policy=None)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise _bad(field, value, f"{field} must be a number or null", layer)
    try:
        out = float(value)
    except OverflowError:
        raise _bad(field, value, f"{field} is too large for a float", layer) from None
    if not math.isfinite(out):
        raise NonFiniteError(1, field=field, layer=layer, nan_policy=None)
    return out


def _array(value, field, layer, kinds="f"):
    """A stored array (decoded, or its tag) as a new numpy array of one of `kinds`."""
    if isinstance(value, dict):
        try:
            value = decode_array(value)
        except (ValueError, TypeError, KeyError) as e:
            raise _bad(field, "<array>", f"{field} is not a valid array ({e})", layer) from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        shown = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise _bad(field, str(shown), f"{field} must be an array of kind {kinds!r}", layer)
    return value.copy()


def _finite_array(value, field, layer, ndim=1, positive=False):
    arr = _array(value, field, layer)
    if ndim is not None and arr.ndim != ndim:
        raise _bad(f"{field}.shape", arr.shape, f"{field} must have {ndim} dimension(s)", layer)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise NonFiniteError(bad, field=field, layer=layer, nan_policy=None)
    if positive and not np.all(arr > 0):
        raise _bad(field, float(arr.min()), f"{field} must be > 0", layer)
    return arr


def _range_pair(lo, hi, field, layer, max_ndim=MAX_AXIS):
    """Per-channel lows and highs: no NaN; +inf/-inf only as an unseen channel's (+inf, -inf) pair."""
    lo, hi = _array(lo, f"{field}_min", layer), _array(hi, f"{field}_max", layer)
    if lo.shape != hi.shape or lo.ndim > max_ndim:
        raise _bad(f"{field}_max.shape", hi.shape, f"{field}_min and {field}_max must have one shape of at most "
                   f"{max_ndim} dimension(s) ({field}_min has shape {lo.shape})", layer)
    unseen = (lo == np.inf) & (hi == -np.inf)
    bad = int(np.count_nonzero(~unseen & ~(np.isfinite(lo) & np.isfinite(hi))))
    if bad:
        raise NonFiniteError(bad, field=f"{field}_min/{field}_max", layer=layer, nan_policy=None)
    if np.any(lo[~unseen] > hi[~unseen]):
        raise _bad(f"{field}_min", float(np.max(lo[~unseen] - hi[~unseen])), f"{field}_min exceeds {field}_max", layer)
    return lo, hi


def _shape(d, layer):
    shape = d.get("shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or len(shape) > MAX_AXIS:
        raise _bad("shape", shape, f"shape must be a list of at most {MAX_AXIS} sizes or null", layer)
    for s in shape:
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < _INT32):
            raise _bad("shape", shape, f"shape must hold sizes in [0, {_INT32}) or null", layer)
    return tuple(shape)


def _spec(config, layer):
    """`QuantSpec.from_config` of the stored spec (which checks every field, the axis's bounds included),
    after refusing non-finite observer options as a `NonFiniteError` (QuantSpec's is a `ConfigError`)."""
    if config is None:
        return QuantSpec()
    if not isinstance(config, dict):
        raise _bad("spec", type(config).__name__, "spec must be a QuantSpec config dict", layer)
    options = config.get("observer_options")
    for key, value in (options.items() if isinstance(options, dict) else ()):
        if (isinstance(value, float) and not math.isfinite(value)) or (isinstance(value, str) and value in _NON_FINITE):
            raise NonFiniteError(1, field=f"spec.observer_options.{key}", layer=layer, nan_policy=None)
    try:
        return QuantSpec.from_config(config)
    except ConfigError as e:
        raise _bad(f"spec.{e.field}", e.value, str(e).split(". Received:")[0], layer) from None


def _scalar_or_pair(d, layer, fields):
    lo, hi = (d.get(k) for k in fields)
    if isinstance(lo, (dict, np.ndarray)) or isinstance(hi, (dict, np.ndarray)):
        return _range_pair(lo, hi, fields[0][: -len("_min")], layer)
    lo, hi = _finite_float(lo, fields[0], layer), _finite_float(hi, fields[1], layer)
    if lo is not None and hi is not None and lo > hi:
        raise _bad(fields[0], lo, f"{fields[0]} exceeds {fields[1]} ({hi})", layer)
    return lo, hi


def _qparams(d, layer):
    scale, zp = d.get("scale"), d.get("zero_point")
    if isinstance(scale, (dict, np.ndarray)):
        scale = _finite_array(scale, "scale", layer, ndim=None, positive=True)
    elif scale is not None:
        scale = _finite_float(scale, "scale", layer)
        if not scale > 0:
            raise _bad("scale", scale, "scale must be > 0", layer)
    if isinstance(zp, (dict, np.ndarray)):
        zp = _array(zp, "zero_point", layer, kinds="iu")
        if zp.size and (zp.min() < -_INT32 or zp.max() >= _INT32):
            raise _bad("zero_point", int(zp.max()), "zero_point must fit an int32", layer)
    elif zp is not None:
        zp = _integer(d, "zero_point", layer, minimum=-_INT32, maximum=_INT32 - 1)
    return scale, zp


def _histogram(d, layer):
    hist, edges = d.get("histogram"), d.get("bin_edges")
    if hist is None and edges is None:
        return None, None
    if hist is None or edges is None:
        raise _bad("histogram" if hist is None else "bin_edges", None, "histogram and bin_edges come together", layer)
    hist, edges = _finite_array(hist, "histogram", layer), _finite_array(edges, "bin_edges", layer)
    if np.any(hist < 0):
        raise _bad("histogram", float(hist.min()), "histogram counts must be >= 0", layer)
    if edges.size != hist.size + 1 or np.any(np.diff(edges) < 0):
        raise _bad("bin_edges", f"<{edges.size} edges>", f"bin_edges must be {hist.size + 1} non-decreasing values", layer)
    return hist, edges


def _outliers(value, layer):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("outliers", type(value).__name__, "outliers must be a dict of method to count", layer)
    out = {}
    for key, count in value.items():
        out[str(key)] = _integer({f"outliers.{key}": count}, f"outliers.{key}", layer)
    return out


def _text(d, field, layer, required=False):
    value = d.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise _bad(field, value, f"{field} must be a non-empty string of at most {MAX_NAME_LENGTH} characters", layer)
    return value


def layer_fields(d):
    """The keyword arguments of `LayerStatistics(**...)` for its stored dict `d`, every value checked.

    Args:
        d: A `LayerStatistics.to_dict()` dict (arrays tagged or decoded,
            non-finite floats as numbers or as the strings JSON stores).

    Returns:
        A dict of field name to value (new objects).

    Raises:
        ConfigError: For a value of the wrong type, range or size (naming the
            layer, the field and the value).
        NonFiniteError: For NaN / Inf where a finite value is required.

    Example:

    >>> layer_fields({"name": "d", "count": 10**400})   # doctest: +SKIP
    Traceback (most recent call last):
    ConfigError: Layer 'd': count must be an integer in [0, 9223372036854775807]. Received: count=1000...
    """
    name = _text(d, "name", None, required=True)
    out = {"name": name, "shape": _shape(d, name), "dtype": _text(d, "dtype", name),
           "observer": _text(d, "observer", name), "spec": _spec(d.get("spec"), name),
           "channel_axis": _integer(d, "channel_axis", name, -MAX_AXIS, MAX_AXIS - 1, default=-1),
           "outliers": _outliers(d.get("outliers"), name)}
    for key in _COUNTS:
        out[key] = _integer(d, key, name, default=None if key == "num_samples" else 0)
    for key in _FLOATS:
        out[key] = _finite_float(d.get(key), key, name)
    if out["std"] is not None and out["std"] < 0:
        raise _bad("std", out["std"], "std must be >= 0", name)
    if out["sparsity"] is not None and not 0 <= out["sparsity"] <= 1:
        raise _bad("sparsity", out["sparsity"], "sparsity must lie in [0, 1]", name)
    if out["min"] is not None and out["max"] is not None and out["min"] > out["max"]:
        raise _bad("min", out["min"], f"min exceeds max ({out['max']})", name)
    out["histogram"], out["bin_edges"] = _histogram(d, name)
    out["channel_min"] = out["channel_max"] = None
    if d.get("channel_min") is not None or d.get("channel_max") is not None:
        out["channel_min"], out["channel_max"] = _range_pair(d.get("channel_min"), d.get("channel_max"), "channel", name,
                                                                max_ndim=1)
    out["range_min"], out["range_max"] = _scalar_or_pair(d, name, ("range_min", "range_max"))
    out["scale"], out["zero_point"] = _qparams(d, name)
    return out
