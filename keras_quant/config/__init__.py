"""Quantization schemes: `QuantSpec` for one tensor, `QuantConfig` for a model.

A `QuantSpec` says how one tensor is quantized: bit width, symmetric or
asymmetric grid, granularity (per tensor, per channel, per group), which
observer sets its range, and whether the range is learned (LSQ).

A `QuantConfig` says which spec each layer's weights and activations get:
a default pair, overrides by layer type, and overrides by layer name (exact or
regular expression). `None` keeps a tensor, or a whole layer, in float.

Integer grids are signed, as TFLite and ONNX QDQ use them: a `b`-bit grid is
`[-2**(b-1), 2**(b-1) - 1]`, and `narrow_range` drops the lowest level
(`[-127, 127]` at 8 bits).

Example:

>>> import keras, keras_quant as kq
>>> config = kq.QuantConfig.int8()
>>> config.set_layer_name("classifier", None)      # keep in float
>>> config.set_layer_type(keras.layers.Conv2D,
...                       weights=kq.QuantSpec(bits=4, symmetric=True,
...                                            granularity="per_channel"))
>>> kq.QuantConfig.from_config(config.get_config()) == config
True
"""

import copy
import dataclasses
import numbers
import re
from typing import Any, Mapping, Optional

from keras_quant.config.checks import MAX_OPTION_INT, check_keys, check_pattern, entries, option_pairs, within
from keras_quant.errors import ConfigError

__all__ = [
    "QuantSpec", "QuantConfig", "LayerQuantConfig", "GRANULARITIES", "LSQ_PARAMS", "OBSERVERS", "AUTO_CANDIDATES",
    "AUTO_TOLERANCE", "auto_candidates", "auto_tolerance", "MIN_BINS", "MAX_BINS", "check_num_bins",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
LSQ_PARAMS = ("log", "linear")
# The names `QuantSpec.observer` accepts: the plain tuple at the bottom layer. Each has a record (observer,
# what it needs, pure range function) in `keras_quant.observers.REGISTRY`, which checks at import that its
# records cover exactly these names.
OBSERVERS = ("minmax", "moving_average", "percentile", "mean_std", "mse", "kl", "auto")
MIN_BITS, MAX_BITS = 2, 16
MAX_AXIS = 32  # `axis` is in [-MAX_AXIS, MAX_AXIS): far past any tensor's rank, short of a typo's 10**9
# Histogram bins (an observer's, a collector's or a calibration's `num_bins`): at least 8, at most 2**16. The
# finest grid keras_quant quantizes to has 2**MAX_BITS = 65536 levels, so more bins than that resolve nothing a
# range can use, while their state (4 bytes a bin per tensor, per channel for per-channel histograms) and the
# range searches (linear in the bins) keep growing: 2e7 bins held 3 GB.
MIN_BINS, MAX_BINS = 8, 2 ** MAX_BITS


def check_num_bins(value, field="num_bins", layer=None):
    """`value` as an int in `[MIN_BINS, MAX_BINS]`, else `ConfigError` naming `field`, `value` and `layer`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not MIN_BINS <= value <= MAX_BINS:
        raise ConfigError(field, value, f"{field} must be an integer in [{MIN_BINS}, {MAX_BINS}] (2**16: the "
                          "levels of the finest 16-bit grid; more bins resolve nothing and cost memory)", layer=layer)
    return int(value)
# `observer="auto"`: the range methods it compares, in order of preference (ties go to the earliest).
AUTO_CANDIDATES = ("minmax", "percentile", "mse", "kl")
# Relative MSE within which a candidate counts as tied with the best (see range_search.auto_range).
AUTO_TOLERANCE = 0.2


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def auto_candidates(value, field="candidates", layer=None):
    """The candidate methods of `observer="auto"` as a tuple of names.

    Args:
        value: A comma-separated string (`"minmax,mse"`, as `observer_options`
            carry it) or a sequence of names; None gives `AUTO_CANDIDATES`.
        field: Field name for the error.
        layer: Optional layer name for the error.

    Returns:
        A non-empty tuple of distinct names from `AUTO_CANDIDATES`, in the given order.

    Raises:
        ConfigError: For an unknown, repeated or missing name.

    Example:

    >>> auto_candidates("minmax, kl")
    ('minmax', 'kl')
    """
    if value is None:
        return AUTO_CANDIDATES
    if isinstance(value, str):
        names = tuple(n.strip() for n in value.split(","))
    elif isinstance(value, (list, tuple)):
        names = tuple(value)
    else:
        raise ConfigError(field, value, "candidates must be a comma-separated string or a sequence of method names",
                          layer=layer)
    if not names or any(n not in AUTO_CANDIDATES for n in names):
        raise ConfigError(field, value, f"candidates must name methods among {AUTO_CANDIDATES}", layer=layer)
    if len(set(names)) != len(names):
        raise ConfigError(field, value, "candidates must not repeat a method", layer=layer)
    return names


def auto_tolerance(value, field="tolerance", layer=None):
    """The tie tolerance of `observer="auto"` as a float in `[0, 10]` (None: `AUTO_TOLERANCE`).

    Raises:
        ConfigError: For anything but a finite number in `[0, 10]`.
    """
    if value is None:
        return AUTO_TOLERANCE
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 10:
        raise ConfigError(field, value, "tolerance must be a number in [0, 10] (a relative MSE margin)", layer=layer)
    return float(value)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: Bit width of the integer grid, 2 to 16.
        symmetric: If True, the zero point is 0 and the range is `[-a, a]`.
        granularity: `"per_tensor"`, `"per_channel"` or `"per_group"`.
        axis: Channel axis for `per_channel` and `per_group`.
        group_size: For `per_group`: number of consecutive elements (in the
            row-major order of the tensor with the channel axis moved first)
            that share one scale within each channel. For a Dense kernel
            `(in, out)` with `axis=-1` this is groups along `in`, as in 4-bit
            weight schemes.
        narrow_range: Drop the lowest level (`[-127, 127]` at 8 bits).
        observer: Range estimator: `"minmax"`, `"moving_average"`,
            `"percentile"`, `"mean_std"`, `"mse"`, `"kl"` or `"auto"` (per
            layer, the one of minmax / percentile / mse / kl whose range gives
            the least expected quantization MSE on this spec's grid; see
            `keras_quant.ops.range_search.auto_range`). The observer
            sets the calibration (PTQ) range; in QAT every observer, `auto`
            included, starts from the calibration's range when one is given
            and then follows the moving min / max of the batches.
            For weights, `"mse"` and `"auto"` search each channel's (group's,
            tensor's) clipping range for the least quantization MSE
            (`kq.ops.weight_range`), at quantization and, in QAT, at every
            step; every other observer takes the weights' min-max.
        learnable: If True, the step size (and the offset, if asymmetric) is
            trained with LSQ.
        lsq_param: How a learnable step size is trained: `"log"` (default)
            trains `log(step)`, so an Adam step changes the step size by a
            fraction of itself (`kq.ops.log_step`), which is what lets it
            move at fine-tuning learning rates; `"linear"` trains an additive
            change (the LSQ paper's form, and how files saved before this
            option load).
        stochastic_rounding: Round up with probability equal to the fractional
            part, instead of to nearest.
        observer_options: Keyword arguments for the observer, e.g.
            `{"percentile": 99.9}` or `{"num_bins": 1024}`. For `"auto"`:
            `candidates` (comma-separated method names, default
            `"minmax,percentile,mse,kl"`), `tolerance` (default 0.2),
            `percentile` and `num_bins`.

    Raises:
        ConfigError: For any invalid field, naming it and the value received.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: str = "per_tensor"
    axis: int = -1
    group_size: Optional[int] = None
    narrow_range: bool = False
    observer: str = "minmax"
    learnable: bool = False
    stochastic_rounding: bool = False
    observer_options: Any = ()
    lsq_param: str = "log"

    def __post_init__(self):
        if not _is_int(self.bits) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError("bits", self.bits, f"bits must be an integer between {MIN_BITS} and {MAX_BITS}")
        for name in ("symmetric", "narrow_range", "learnable", "stochastic_rounding"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), f"{name} must be a bool")
        for name, allowed in (("lsq_param", LSQ_PARAMS), ("granularity", GRANULARITIES), ("observer", OBSERVERS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ConfigError(name, getattr(self, name), f"{name} must be one of {allowed}")
        if not _is_int(self.axis) or not -MAX_AXIS <= self.axis < MAX_AXIS:
            raise ConfigError("axis", self.axis, f"axis must be an integer in [-{MAX_AXIS}, {MAX_AXIS})")
        if self.granularity == "per_group":
            if not _is_int(self.group_size) or not 1 <= self.group_size <= MAX_OPTION_INT:
                raise ConfigError(
                    "group_size", self.group_size, "group_size must be a positive integer with granularity='per_group'"
                )
        elif self.group_size is not None:
            raise ConfigError(
                "group_size", self.group_size, "group_size is only used with granularity='per_group'; leave it None"
            )
        options = option_pairs(self.observer_options)
        object.__setattr__(self, "observer_options", options)
        if "num_bins" in dict(options):
            check_num_bins(dict(options)["num_bins"], "observer_options.num_bins")
        if self.observer == "auto":
            opts = dict(options)
            auto_candidates(opts.get("candidates"), "observer_options.candidates")
            auto_tolerance(opts.get("tolerance"), "observer_options.tolerance")

    # Integer grid ---------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Lowest integer level."""
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """Highest integer level."""
        return 2 ** (self.bits - 1) - 1

    @property
    def num_levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def storage_dtype(self) -> str:
        """Integer dtype that holds the grid: `"int8"` up to 8 bits, else `"int16"`."""
        return "int8" if self.bits <= 8 else "int16"

    @property
    def options(self) -> dict:
        """`observer_options` as a dict."""
        return dict(self.observer_options)

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # Serialization --------------------------------------------------------
    def get_config(self) -> dict:
        config = dataclasses.asdict(self)
        config["observer_options"] = dict(self.observer_options)
        return config

    @classmethod
    def from_config(cls, config: Mapping) -> "QuantSpec":
        """A spec from its `get_config()` dict; missing fields take their defaults (older files load).

        Raises:
            ConfigError: For anything but a dict of known fields with valid values, naming the field
                and the value (values are checked, never converted: `bits=True` or `axis=1.5` are errors).
        """
        if not isinstance(config, Mapping):
            raise ConfigError("config", config, "QuantSpec.from_config needs a dict")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in config if k not in fields]
        if unknown:
            raise ConfigError(str(unknown[0]), config[unknown[0]],
                              f"unknown QuantSpec field {unknown[0]!r}; known fields are {sorted(fields)}")
        if "observer_options" in config and not isinstance(config["observer_options"], Mapping):
            raise ConfigError("observer_options", config["observer_options"], "observer_options must be a dict")
        config = dict(config)
        if "lsq_param" not in config and fields - {"lsq_param"} <= set(config):
            # A complete config saved before `lsq_param` existed: its trained step sizes are additive.
            config["lsq_param"] = "linear"
        return cls(**config)  # missing keys take their defaults (older files load)


def _spec_or_none(value, field, layer=None, strict=False):
    """A spec, None, or (`strict`: from a config dict, where only dicts and None are specs) `_UNSET` as is."""
    if value is None or value is _UNSET or (isinstance(value, QuantSpec) and not strict):
        return value
    if isinstance(value, Mapping):
        with within(field):
            return QuantSpec.from_config(value)
    raise ConfigError(field, value, "expected a kq.QuantSpec, a QuantSpec config dict or None", layer=layer)


def _parse_override(override, field):
    """An override of a config dict: None (float) or a dict of `weights` / `activations` specs."""
    if override is None:
        return None
    if not isinstance(override, Mapping):
        raise ConfigError(field, override, "an override must be None or a dict with keys 'weights' / 'activations'")
    check_keys(override, ("weights", "activations"), (), field)
    parsed = {}
    for key, value in override.items():
        parsed[key] = _spec_or_none(value, f"{field}.{key}", strict=True)
    return parsed


@dataclasses.dataclass(frozen=True)
class LayerQuantConfig:
    """The specs one layer gets. `None` for a field keeps that tensor in float."""

    weights: Optional[QuantSpec]
    activations: Optional[QuantSpec]


_UNSET = object()


def _layer_type_name(cls):
    import keras

    if getattr(keras.layers, cls.__name__, None) is cls:
        return cls.__name__
    return keras.saving.get_registered_name(cls)


def _layer_type_from_name(name, field="layer_type"):
    import keras

    if not isinstance(name, str) or not name:
        raise ConfigError(field, name, "a layer type must be named by a non-empty string")
    cls = getattr(keras.layers, name, None) if name.isidentifier() and not name.startswith("_") else None
    if cls is None:
        cls = keras.saving.get_registered_object(name)
    if not isinstance(cls, type) or not issubclass(cls, keras.layers.Layer):
        raise ConfigError(field
, name, "unknown layer type; use a keras.layers class or one registered with "
            "keras.saving.register_keras_serializable"
        )
    return cls


class QuantConfig:
    """Which spec each layer's weights and activations get.

    Lookup order for a layer: its name (exact match first, then regular
    expressions with `re.fullmatch`, the latest registered winning), then its
    type (the most specific class in its MRO), then the defaults. An override
    may set only `weights` or only `activations`; the other field falls
    through to the next level.

    Args:
        weights: Default `QuantSpec` for weights, or None for float weights.
            Defaults to int8 symmetric per-channel narrow range (TFLite's
            weight scheme).
        activations: Default `QuantSpec` for activations, or None. Defaults to
            int8 asymmetric per-tensor with the min-max observer.

    Example:

    >>> cfg = QuantConfig.w4a8()
    >>> cfg.set_layer_name(r"block_\\d+/.*", activations=QuantSpec(bits=16, symmetric=True))
    >>> cfg.set_layer_name("classifier", None)
    """

    def __init__(self, weights=_UNSET, activations=_UNSET):
        if weights is _UNSET:
            weights = QuantSpec(bits=8, symmetric=True, granularity="per_channel", narrow_range=True)
        if activations is _UNSET:
            activations = QuantSpec(bits=8)
        self.weights = _spec_or_none(weights, "weights")
        self.activations = _spec_or_none(activations, "activations")
        self._type_overrides = {}  # class -> dict(field -> spec or None), or None for float
        self._name_overrides = []  # [(pattern, dict or None)]

    # Presets -------------------------------------------------------------
    @classmethod
    def int8(cls) -> "QuantConfig":
        """W8A8: int8 per-channel symmetric weights, int8 per-tensor asymmetric activations."""
        return cls()

    @classmethod
    def w4a8(cls) -> "QuantConfig":
        """4-bit per-channel symmetric weights, int8 activations."""
        return cls(weights=QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True))

    @classmethod
    def int16x8(cls) -> "QuantConfig":
        """TFLite 16x8: int8 per-channel weights, int16 symmetric activations."""
        return cls(activations=QuantSpec(bits=16, symmetric=True))

    # Overrides -----------------------------------------------------------
    @staticmethod
    def _override(config, weights, activations, field):
        if config is not _UNSET:
            if weights is not _UNSET or activations is not _UNSET:
                raise ConfigError(field, config, "pass either a whole config or weights=/activations=, not both")
            if config is None:
                return None
            if isinstance(config, LayerQuantConfig):
                return {"weights": config.weights, "activations": config.activations}
            if isinstance(config, QuantConfig):
                return {"weights": config.weights, "activations": config.activations}
            raise ConfigError(field, config, "expected None, a QuantConfig or a LayerQuantConfig")
        override = {}
        if weights is not _UNSET:
            override["weights"] = _spec_or_none(weights, "weights")
        if activations is not _UNSET:
            override["activations"] = _spec_or_none(activations, "activations")
        return override

    def set_layer_type(self, layer_type, config=_UNSET, *, weights=_UNSET, activations=_UNSET):
        """Override the specs of every layer of this type (and its subclasses).

        Args:
            layer_type: A layer class, e.g. `keras.layers.Conv2D`.
            config: `None` to keep these layers in float, or a whole config.
            weights: Spec (or None) for the weights.
            activations: Spec (or None) for the activations.
        """
        if not isinstance(layer_type, type):
            raise ConfigError("layer_type", layer_type, "layer_type must be a layer class")
        self._type_overrides[layer_type] = self._override(config, weights, activations, "layer_type")
        return self

    def set_layer_name(self, name, config=_UNSET, *, weights=_UNSET, activations=_UNSET):
        """Override the specs of the layer(s) with this name.

        Args:
            name: An exact layer name or path, or a regular expression matched
                with `re.fullmatch` against the layer's name and its path
                (`outer/inner` for nested models).
            config: `None` to keep the layer in float, or a whole config.
            weights: Spec (or None) for the weights.
            activations: Spec (or None) for the activations.
        """
        check_pattern(name)
        self._name_overrides = [(p, o) for p, o in self._name_overrides if p != name]
        self._name_overrides.append((name, self._override(config, weights, activations, "name")))
        return self

    def copy(self) -> "QuantConfig":
        """An independent copy: overrides set on it later leave this config as it is.

        The override tables are copied; the specs themselves are frozen and shared.

        Example:

        >>> base = QuantConfig.int8()
        >>> trial = base.copy().set_layer_name("head", None)
        >>> base.for_layer("head") is not None, trial.for_layer("head")
        (True, None)
        """
        new = copy.copy(self)  # the same class and attributes (the `copy` module, not this method)
        new._type_overrides = {t: None if o is None else dict(o) for t, o in self._type_overrides.items()}
        new._name_overrides = [(p, None if o is None else dict(o)) for p, o in self._name_overrides]
        return new

    # Lookup ----------------------------------------------------------------
    def _name_override(self, names):
        for pattern, override in reversed(self._name_overrides):
            if pattern in names:
                return True, override
        for pattern, override in reversed(self._name_overrides):
            if any(re.fullmatch(pattern, n) for n in names):
                return True, override
        return False, None

    def names_layer(self, layer, path=None) -> bool:
        """Whether an override (by name, or by a type other than `Layer`) gives this layer a spec.

        `quantize_model` uses it to tell a layer the user asked to quantize
        (an error if no rule exists for its type) from one the defaults merely
        cover (left in float and reported).
        """
        names = [n for n in (layer.name, path) if n]
        found, override = self._name_override(names)
        if found:
            return override is not None and any(v is not None for v in override.values())
        import keras

        return any(
            override is not None and any(v is not None for v in override.values())
            for cls, override in self._type_overrides.items()
            if cls is not keras.layers.Layer and isinstance(layer, cls)
        )

    def for_layer(self, layer, path=None) -> Optional[LayerQuantConfig]:
        """The specs for `layer`, or None if it stays entirely in float.

        Args:
            layer: A Keras layer instance (or a layer name string).
            path: Optional hierarchical name (`outer/inner`) for nested models.
        """
        name = layer if isinstance(layer, str) else layer.name
        names = [n for n in (name, path) if n]
        resolved = {"weights": self.weights, "activations": self.activations}
        levels = []
        if not isinstance(layer, str):
            for cls in reversed(type(layer).__mro__):
                if cls in self._type_overrides:
                    levels.append(self._type_overrides[cls])
        found, override = self._name_override(names)
        if found:
            levels.append(override)
        for level in levels:
            if level is None:
                resolved = {"weights": None, "activations": None}
            else:
                resolved.update(level)
        if resolved["weights"] is None and resolved["activations"] is None:
            return None
        return LayerQuantConfig(**resolved)

    # Serialization -------------------------------------------------------
    @staticmethod
    def _override_config(override):
        if override is None:
            return None
        return {k: (None if v is None else v.get_config()) for k, v in override.items()}

    def get_config(self) -> dict:
        return {
            "weights": None if self.weights is None else self.weights.get_config(),
            "activations": None if self.activations is None else self.activations.get_config(),
            "layer_types": [
                {"layer_type": _layer_type_name(cls), "override": self._override_config(o)}
                for cls, o in self._type_overrides.items()
            ],
            "layer_names": [{"name": p, "override": self._override_config(o)} for p, o in self._name_overrides],
        }

    @classmethod
    def from_config(cls, config: Mapping) -> "QuantConfig":
        """A config from its `get_config()` dict (as JSON gives it back).

        Missing top-level keys take their defaults (`{}` is `QuantConfig()`); every entry of
        `layer_types` / `layer_names` needs all its keys.

        Raises:
            ConfigError: For anything else: a non-dict, an unknown or missing key, a wrong type at any
                level, an invalid spec value, an unknown layer type, an invalid regular expression or a
                repeated entry, naming the field (`layer_names[0].override.weights.bits`) and the value.
                Values are checked, never converted.
        """
        if not isinstance(config, Mapping):
            raise ConfigError("config", config, "QuantConfig.from_config needs a dict")
        check_keys(config, ("weights", "activations", "layer_types", "layer_names"), (), "config")
        weights = _spec_or_none(config.get("weights", _UNSET), "weights", strict=True)
        activations = _spec_or_none(config.get("activations", _UNSET), "activations", strict=True)
        out = cls(weights=weights, activations=activations)
        for i, entry in enumerate(entries(config, "layer_types", ("layer_type", "override"))):
            layer_type = _layer_type_from_name(entry["layer_type"], f"layer_types[{i}].layer_type")
            if layer_type in out._type_overrides:
                raise ConfigError(f"layer_types[{i}].layer_type", entry["layer_type"], "the layer type is listed twice")
            out._type_overrides[layer_type] = _parse_override(entry["override"], f"layer_types[{i}].override")
        for i, entry in enumerate(entries(config, "layer_names", ("name", "override"))):
            name = check_pattern(entry["name"], f"layer_names[{i}].name")
            if any(p == name for p, _ in out._name_overrides):
                raise ConfigError(f"layer_names[{i}].name", name, "the layer name pattern is listed twice")
            out._name_overrides.append((name, _parse_override(entry["override"], f"layer_names[{i}].override")))
        return out

    def __eq__(self, other):
        return isinstance(other, QuantConfig) and self.get_config() == other.get_config()

    def __repr__(self):
        return (
            f"QuantConfig(weights={self.weights}, activations={self.activations}, "
            f"layer_types={len(self._type_overrides)}, layer_names={len(self._name_overrides)})"
        )


def as_spec(spec, field="spec", layer=None):
    """`spec` as a `QuantSpec`: a spec, its config dict, or None (the default int8 spec).

    The one coercion of a `spec` argument at the public entry points (the ops
    kernels take a spec object only and check it with `keras_quant.ops.core.check_spec`).

    Args:
        spec: A `kq.QuantSpec`, its `get_config()` dict, or None.
        field: The argument's name, for the error.
        layer: The layer the spec is for, if any, for the error.

    Raises:
        ConfigError: For anything else, naming `field` and `layer`.
    """
    if spec is None:
        return QuantSpec()
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, dict):
        return QuantSpec.from_config(spec)
    raise ConfigError(field, spec, "expected a kq.QuantSpec or a QuantSpec config dict", layer=layer)
