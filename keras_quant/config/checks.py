"""The checks `keras_quant.config` reads a config dict with: keys, lists of entries, option values, patterns.

Each refuses a malformed value with a `keras_quant.errors.ConfigError` naming the field (a path such as
`layer_names[0].override`) and the value; none converts a value.

Example:

>>> check_pattern(r"block_\\d+")
'block_\\\\d+'
>>> option_pairs({"percentile": 99.9})
(('percentile', 99.9),)
"""

import contextlib
import math
import re
from typing import Mapping

from keras_quant.errors import ConfigError

__all__ = ["MAX_OPTION_INT", "is_option_value", "option_pairs", "within", "check_pattern", "check_keys", "entries"]

MAX_OPTION_INT = 2**31 - 1  # observer option integers (`num_bins`, ...) and `group_size` fit an int32


def is_option_value(v):
    """Whether `v` is an observer option value: a string, a bool, None, or a finite number of sane size."""
    if v is None or isinstance(v, (str, bool)):
        return True
    if isinstance(v, int):
        return abs(v) <= MAX_OPTION_INT
    return isinstance(v, float) and math.isfinite(v)


def option_pairs(options, field="observer_options"):
    """`observer_options` (a mapping, or `(name, value)` pairs) as pairs sorted by name.

    Raises:
        ConfigError: Unless the names are distinct non-empty strings and the values scalars
            (`is_option_value`), naming `field` or `field.name`.
    """
    if options is None:
        return ()
    pairs = list(options.items()) if isinstance(options, Mapping) else options
    if not isinstance(pairs, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ConfigError(field, options, f"{field} must be a dict of option names to values")
    names = [k for k, _ in pairs]
    if not all(isinstance(k, str) and k for k in names) or len(set(names)) != len(names):
        raise ConfigError(field, options, f"{field} must have distinct non-empty strings as names")
    for name, value in pairs:
        if not is_option_value(value):
            raise ConfigError(f"{field}.{name}", value, "an observer option must be a string, a bool, None, an "
                              f"integer of at most {MAX_OPTION_INT} in size or a finite float")
    return tuple(sorted(((k, v) for k, v in pairs), key=lambda p: p[0]))


@contextlib.contextmanager
def within(prefix):
    """Re-raise a `ConfigError` of the block with its field under `prefix` (`layer_names[0].override.weights.bits`)."""
    try:
        yield
    except ConfigError as e:
        suffix = f". Received: {e.field}={e.value!r}"
        text = str(e)
        reason = text[: -len(suffix)] if text.endswith(suffix) else text
        raise ConfigError(f"{prefix}.{e.field}", e.value, reason, layer=e.layer) from None


def check_pattern(name, field="name"):
    """`name` as a layer-name pattern: a non-empty string that compiles as a regular expression."""
    if not isinstance(name, str) or not name:
        raise ConfigError(field, name, "a layer name pattern must be a non-empty string")
    try:
        re.compile(name)
    except (re.error, RecursionError, OverflowError) as e:
        raise ConfigError(field, name, f"the layer name pattern is not a valid regular expression ({e})") from None
    return name


def check_keys(config, allowed, required, field):
    """Refuse a key of `config` outside `allowed` (or a missing `required` one), naming it under `field`."""
    for key in config:
        if key not in allowed:
            raise ConfigError(f"{field}.{key}", config[key], f"unknown key {key!r}; the keys are {list(allowed)}")
    for key in required:
        if key not in config:
            raise ConfigError(field, config, f"the key {key!r} is missing")


def entries(config, key, fields):
    """The dicts of the list `config[key]` (absent: none), each with exactly the keys `fields`."""
    entries = config.get(key, [])
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(key, entries, f"{key} must be a list of dicts with keys {list(fields)}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}[{i}]", entry, f"each entry of {key} must be a dict with keys {list(fields)}")
        check_keys(entry, fields, fields, f"{key}[{i}]")
    return entries
