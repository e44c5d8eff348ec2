"""Host-side checks of quantization parameters, run where a model or a file is built from them.

The kernels of `keras_quant.ops.core` keep the backend's NaN / Inf semantics
(a range with an infinite end gives an infinite scale); these checks stop such
values before they reach a model's variables or an exported file, where they
would silently zero every output or crash an interpreter. They run on numpy
values, outside any compiled step.

Example:

>>> import keras_quant as kq
>>> spec = kq.QuantSpec(bits=8)
>>> scale, zp = kq.ops.numpy_qparams(-3e38, 3e38, spec)
>>> kq.ops.checks.check_qparams(scale, zp, spec, layer="dense")
Traceback (most recent call last):
...
keras_quant.errors.NonFiniteError: Layer 'dense': scale contains 1 non-finite value(s) (NaN or Inf)...
"""

import numpy as np

from keras_quant.config import QuantSpec
from keras_quant.errors import ConfigError, NonFiniteError

__all__ = ["check_qparams", "non_finite_error", "is_numeric"]


def _shown(value):
    """A short text of a value for an error message (the first entries of an array)."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item())
    text = np.array2string(arr.reshape(-1)[:4], precision=6, separator=", ")
    return f"{text[:-1]}, ...] (shape {arr.shape})" if arr.size > 4 else text


def is_numeric(value):
    """Whether `value` converts to a numeric (float, int, bool) numpy array."""
    try:
        return np.asarray(value).dtype.kind in "fiub"
    except (TypeError, ValueError):
        return False


def non_finite_error(field, value, layer=None, reason=None):
    """A `NonFiniteError` for `field` (of `layer`) that names `value` in its message and holds it as `.value`.

    Args:
        field: What holds the value (e.g. `"scale"`).
        value: The offending value (a number or an array).
        layer: The layer (or calibration key).
        reason: Optional explanation appended to the message.

    Example:

    >>> raise non_finite_error("scale", float("inf"), layer="dense")   # doctest: +SKIP
    """
    arr = np.asarray(value, np.float64) if is_numeric(value) else np.asarray([np.nan])
    count = max(int(arr.size - np.count_nonzero(np.isfinite(arr))), 1)
    error = NonFiniteError(count, field=field, layer=layer, nan_policy=None)
    error.value = value
    error.args = (f"{error.args[0]}; {field}={_shown(value)}{f': {reason}' if reason else ''}",)
    return error


def check_qparams(scale, zero_point, spec, layer=None, field="scale"):
    """Raise unless `(scale, zero_point)` is a usable grid for `spec`; returns them as float32 / int32 arrays.

    The scale must be finite and positive, the zero point an integer on the
    spec's grid, and the grid's span `(qmax - qmin) * scale` finite in
    float32: a range wider than float32 holds (`max - min` overflowing, as
    `[-3e38, 3e38]` does) has no grid that TFLite, ONNX or the fake-quant
    ops can compute with.

    Args:
        scale: Scale (a number or an array), as `kq.ops.compute_qparams` gives it.
        zero_point: Zero point, same shape.
        spec: The `kq.QuantSpec`.
        layer: The layer (or calibration key) the error names.
        field: What the scale is (e.g. `"output scale"`), named by the error.

    Returns:
        `(scale, zero_point)`: float32 and int32 numpy arrays.

    Raises:
        NonFiniteError: A NaN / Inf scale or zero point, or a grid wider than float32.
        ConfigError: A scale that is not positive, or a zero point off the grid.

    Example:

    >>> spec = kq.QuantSpec(bits=8)
    >>> kq.ops.checks.check_qparams(*kq.ops.numpy_qparams(-1.0, 1.0, spec), spec, layer="dense")  # doctest: +SKIP
    """
    if not isinstance(spec, QuantSpec):
        raise ConfigError("spec", spec, "expected a kq.QuantSpec", layer=layer)
    if not (is_numeric(scale) and is_numeric(zero_point)):
        raise ConfigError(field, scale, "the scale and zero point must be numbers", layer=layer)
    s64, z64 = np.asarray(scale, np.float64), np.asarray(zero_point, np.float64)
    if not np.isfinite(s64).all():
        raise non_finite_error(field, np.asarray(scale), layer)
    if not np.isfinite(z64).all():
        raise non_finite_error(f"{field} zero_point", np.asarray(zero_point), layer)
    if np.any(s64 <= 0):
        raise ConfigError(field, _shown(scale), f"{field} must be positive", layer=layer)
    if np.any(z64 != np.round(z64)) or np.any(z64 < spec.qmin) or np.any(z64 > spec.qmax):
        raise ConfigError(f"{field} zero_point", _shown(zero_point),
                          f"the zero point must be an integer in [{spec.qmin}, {spec.qmax}]", layer=layer)
    with np.errstate(over="ignore"):
        s32 = s64.astype(np.float32)
        span = np.float32(spec.qmax - spec.qmin) * s32
    if not np.isfinite(span).all():
        raise non_finite_error(
            f"{field} range", span, layer, reason=f"the grid (qmax - qmin) * scale, scale={_shown(scale)}, is wider "
            "than float32 holds (the range's max - min overflows float32); clip or rescale the data",
        )
    return s32, z64.astype(np.int32)
