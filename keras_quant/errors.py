"""Errors raised by keras_quant.

Every error derives from `KerasQuantError`, so callers can catch the toolkit's
errors in one place, and from the closest builtin (`ValueError`, `MemoryError`,
`TypeError`), so code written against plain Python still catches them.

Messages follow Keras' form: what is wrong, then `Received: field=value`, and
name the layer when there is one.

Example:

>>> import keras_quant as kq
>>> try:
...     kq.QuantSpec(bits=1)
... except kq.errors.ConfigError as e:
...     print(e.field, e.value)
bits 1
"""

import numbers

import numpy as np

__all__ = [
    "KerasQuantError",
    "ConfigError",
    "ShapeMismatchError",
    "NonFiniteError",
    "MemoryLimitExceededError",
    "IntegrityError",
    "UnsupportedLayerError",
    "NoDataError",
    "ExportError",
    "check_int",
    "is_number",
]


def _where(layer):
    return f"Layer '{layer}': " if layer else ""


class KerasQuantError(Exception):
    """Base class of every error keras_quant raises."""


class ConfigError(KerasQuantError, ValueError):
    """An invalid configuration value.

    Args:
        field: Name of the offending field (e.g. `"bits"`).
        value: The value received.
        reason: What was expected, as a sentence without the final period.
        layer: Optional name of the layer the value belongs to.
    """

    def __init__(self, field, value, reason, layer=None):
        self.field = field
        self.value = value
        self.layer = layer
        super().__init__(f"{_where(layer)}{reason}. Received: {field}={value!r}")


class ShapeMismatchError(KerasQuantError, ValueError):
    """A tensor whose shape differs from the one expected.

    Args:
        field: What the shape belongs to (e.g. `"scale"`).
        expected: The expected shape (a tuple, or a description).
        actual: The shape received.
        layer: Optional layer name.
    """

    def __init__(self, field, expected, actual, layer=None):
        self.field = field
        self.expected = expected
        self.actual = actual
        self.layer = layer
        shape, want = _shape(actual), _shape(expected)
        super().__init__(f"{_where(layer)}{field} has shape {shape}, expected {want}. Received: {field}.shape={shape}")


def _shape(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


class NonFiniteError(KerasQuantError, ValueError):
    """NaN or Inf values where `nan_policy="raise"` forbids them.

    Args:
        count: Number of non-finite values seen.
        field: What held them (e.g. `"x"` or an observer's name).
        layer: Optional layer name.
        nan_policy: The policy that forbade them, named in the message; None
            where the function has no such option.
    """

    def __init__(self, count, field="x", layer=None, nan_policy="raise"):
        self.count = int(count)
        self.field = field
        self.layer = layer
        policy = f" and nan_policy={nan_policy!r}" if nan_policy else ""
        super().__init__(
            f"{_where(layer)}{field} contains {self.count} non-finite value(s) "
            f"(NaN or Inf){policy}. Received: non_finite_count={self.count}"
        )


class MemoryLimitExceededError(KerasQuantError, MemoryError):
    """An operation would grow past a configured memory limit.

    Args:
        current: Bytes that would be in use.
        limit: The configured limit in bytes.
        field: What was growing.
    """

    def __init__(self, current, limit, field="memory"):
        self.current = int(current)
        self.limit = int(limit)
        self.field = field
        super().__init__(
            f"{field} would use {self.current} bytes, over the limit of {self.limit} bytes. "
            f"Received: memory_limit={self.limit}"
        )


class IntegrityError(KerasQuantError):
    """A file that is truncated, tampered with or of an unknown schema.

    Args:
        path: The file.
        reason: What failed (e.g. "checksum mismatch").
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}. Nothing was loaded.")


class UnsupportedLayerError(KerasQuantError, TypeError):
    """A layer that keras_quant has no quantization rule for.

    Args:
        layer: The layer's name.
        layer_type: The layer's class name.
        reason: Optional explanation.
    """

    def __init__(self, layer, layer_type, reason=None):
        self.layer = layer
        self.layer_type = layer_type
        detail = reason or "there is no quantization rule for this layer type"
        super().__init__(
            f"Layer '{layer}' of type {layer_type} cannot be quantized: {detail}. "
            f"Received: layer_type={layer_type}"
        )


class NoDataError(KerasQuantError, ValueError):
    """Statistics were asked of something that has seen no (finite) data.

    Args:
        field: What has no data (an observer's or a layer's name).
        reason: Why, when known (e.g. "no calibration sample reached this branch").
        layer: Optional layer name.
    """

    def __init__(self, field, reason=None, layer=None):
        self.field = field
        self.layer = layer
        detail = f": {reason}" if reason else ""
        super().__init__(f"{_where(layer)}{field} has seen no finite data{detail}. Received: num_elements=0")


class ExportError(KerasQuantError, ValueError):
    """A model that cannot be written to the requested format as it is.

    Raised before conversion for what keras_quant knows the target cannot
    express (a layer, a quantizer's scheme), and after conversion when the
    converter left a compute op in float that the config quantizes.

    Args:
        field: The offending field (e.g. `"weights.granularity"`, `"mode"`).
        value: The value received.
        reason: What the target needs, as a sentence without the final period.
        layer: Optional name of the layer.
        problems: Every `(layer, field, value, reason)` found, when several.
    """

    def __init__(self, field, value, reason, layer=None, problems=()):
        self.field = field
        self.value = value
        self.layer = layer
        self.problems = tuple(problems) or ((layer, field, value, reason),)
        more = ""
        if len(self.problems) > 1:
            more = "\n" + "\n".join(
                f"  - {_where(l)}{r}. Received: {f}={v!r}" for l, f, v, r in self.problems[1:]
            )
        super().__init__(f"{_where(layer)}{reason}. Received: {field}={value!r}{more}")


# Validation helpers ---------------------------------------------------------------
def is_number(value):
    """Whether `value` is a real number (Python or numpy; not a bool), for argument checks."""
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))


def check_int(field, value, minimum=1, allow_none=False, layer=None):
    """`value` as an int `>= minimum`: the one check of a count argument (batch_size, runs, ...).

    Booleans are refused (`True` is not a count); numpy integers are accepted.

    Args:
        field: The argument's name, for the error.
        value: The value received.
        minimum: The smallest value accepted.
        allow_none: Whether None is accepted (and returned as None).
        layer: Optional layer name, for the error.

    Returns:
        `int(value)`, or None.

    Raises:
        ConfigError: Anything else, naming `field`, `value` and `layer`.

    Example:

    >>> check_int("batch_size", 32)
    32
    >>> check_int("warmup", 0, minimum=0)
    0
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(field, value, f"{field} must be an integer >= {minimum}", layer=layer)
    return int(value)

