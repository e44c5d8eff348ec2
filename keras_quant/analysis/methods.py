"""Compare range methods layer by layer on one calibration, and the automatic choice.

`compare_methods(calibration)` recomputes, for every layer of a
`kq.CalibrationResult`, the range each method (minmax, percentile, mse, kl)
finds on the layer's stored histogram, and judges each by the quantization
error of that layer's output on the spec's grid: the expected MSE of values
distributed as the histogram (rounding inside the range plus clipping
outside, `keras_quant.ops.range_search.expected_mse`) and the SQNR
against the histogram's signal power. The choice per layer is what
`observer="auto"` picks (`range_search.auto_range`): the earliest method
within the tolerance of the least error.

Everything is numpy on the stored statistics: nothing runs the model.

Example:

>>> comparison = kq.analysis.compare_methods(result)        # doctest: +SKIP
>>> print(comparison)                                         # doctest: +SKIP
>>> comparison.choices["conv2d"], comparison.error("conv2d", "mse")   # doctest: +SKIP
"""

import collections.abc
import dataclasses
import math

from keras_quant.calibration.result import LayerStatistics
from keras_quant.config import AUTO_CANDIDATES, QuantConfig, QuantSpec, as_spec, auto_candidates, auto_tolerance
from keras_quant.errors import ConfigError, NoDataError
from keras_quant.formatting import text_table, to_jsonable
from keras_quant.ops import range_search

__all__ = ["MethodRow", "MethodComparison", "compare_methods"]


def _sqnr_db(signal_power, mse):
    """`10 log10(signal_power / mse)` in dB; `inf` for a zero error (as `error_stats`)."""
    if mse <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / mse)


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """One method's range on one layer, and the error of that layer's output with it.

    Attributes:
        layer: The layer (calibration key).
        method: The range method.
        min, max: Its range.
        mse: Expected quantization MSE of the layer's output with that range.
        sqnr_db: `10 log10(E[x^2] / mse)`, `E[x^2]` from the histogram.
        chosen: Whether `observer="auto"` picks this method for the layer.
    """

    layer: str
    method: str
    min: float
    max: float
    mse: float
    sqnr_db: float
    chosen: bool


@dataclasses.dataclass(frozen=True)
class MethodComparison:
    """Each method's range and error per layer, and the automatic choice.

    Attributes:
        spec: The `kq.QuantSpec` whose grid the ranges were judged on.
        methods: The methods compared, in order of preference.
        tolerance: The tie margin of the choice (see `range_search.auto_range`).
        rows: One `MethodRow` per layer and method, layer by layer.
        choices: `{layer: method}` (what `observer="auto"` picks).
        skipped: `{layer: reason}` for layers without data or histogram.
    """

    spec: QuantSpec
    methods: tuple
    tolerance: float
    rows: tuple
    choices: dict
    skipped: dict = dataclasses.field(default_factory=dict)

    __hash__ = None

    @property
    def layers(self):
        """The compared layers, in calibration order (a new list)."""
        return list(self.choices)

    def row(self, layer, method):
        """The `MethodRow` of `layer` and `method`.

        Raises:
            KeyError: For a layer or method not compared.
        """
        for r in self.rows:
            if r.layer == layer and r.method == method:
                return r
        raise KeyError(f"no row for layer {layer!r} and method {method!r}; layers: {self.layers}, "
                       f"methods: {list(self.methods)}")

    def error(self, layer, method):
        """The expected quantization MSE of `layer`'s output with `method`'s range."""
        return self.row(layer, method).mse

    def sqnr(self, layer, method):
        """The SQNR (dB) of `layer`'s output with `method`'s range."""
        return self.row(layer, method).sqnr_db

    def _layer_dicts(self):
        out = []
        for layer in self.choices:
            d = {"name": layer}
            for r in self.rows:
                if r.layer == layer:
                    d[f"{r.method}_sqnr_db"] = r.sqnr_db
            for r in self.rows:
                if r.layer == layer:
                    d[f"{r.method}_mse"] = r.mse
                    d[f"{r.method}_range"] = [r.min, r.max]
            d["choice"] = self.choices[layer]
            out.append(d)
        return out

    def to_dict(self):
        """Plain JSON-able data.

        Returns:
            `{"spec", "methods", "tolerance", "choices", "skipped", "rows":
            [MethodRow fields], "layers": [{"name", "<method>_sqnr_db", ...,
            "<method>_mse", "<method>_range", "choice"}]}`; the `layers` list
            is one entry per layer with a column per method (a heatmap's
            rows). Infinite SQNR (zero error) is the string `"inf"`.
        """
        return to_jsonable({
            "spec": self.spec.get_config(),
            "methods": list(self.methods),
            "tolerance": self.tolerance,
            "choices": dict(self.choices),
            "skipped": dict(self.skipped),
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "layers": self._layer_dicts(),
        })

    def table(self):
        """One line per layer: each method's SQNR (dB) and the choice."""
        columns = ["layer"] + [f"{m}_sqnr_db" for m in self.methods] + ["choice"]
        rows = []
        for d in self._layer_dicts():
            rows.append({"layer": d["name"], **{c: d[c] for c in columns[1:-1]}, "choice": d["choice"]})
        title = (f"Range methods per layer ({self.spec.bits}-bit {'symmetric' if self.spec.symmetric else 'asymmetric'}"
                 f", SQNR in dB, choice within {self.tolerance:g} relative MSE of the best)")
        text = text_table(rows, columns, title)
        if self.skipped:
            text += "\n" + "\n".join(f"- skipped {name}: {why}" for name, why in self.skipped.items())
        return text

    def __str__(self):
        return self.table()


def _default_spec():
    return QuantConfig.int8().activations


def compare_methods(calibration, spec=None, methods=AUTO_CANDIDATES, layers=None,
                    tolerance=None) -> MethodComparison:
    """Each range method's range and output error for each layer of a calibration.

    Args:
        calibration: A `kq.CalibrationResult` (any mapping of layer name to
            `LayerStatistics`) gathered with histograms (`statistics="full"`,
            the default, or a histogram observer).
        spec: The `kq.QuantSpec` whose grid the ranges are judged on (bits,
            symmetric, narrow_range; its observer is ignored, its
            `tolerance` option is used unless `tolerance` is given). Default
            `kq.QuantConfig.int8().activations`. Per tensor only.
        methods: Methods to compare, among `"minmax"`, `"percentile"`,
            `"mse"`, `"kl"`, in order of preference for the choice (a
            sequence or a comma-separated string).
        layers: Layer names to compare (default all). Named layers must have
            data; by default layers without data or histogram are listed in
            `skipped`.
        tolerance: The choice's relative tie margin (default the spec's
            option, else 0.2).

    Returns:
        A `MethodComparison`.

    Raises:
        ConfigError: For a bad spec, method or tolerance, or a named layer
            calibrated without a histogram.
        NoDataError: For a named layer absent from the calibration or that no
            sample reached, or when no layer could be compared.

    Example:

    >>> cmp = compare_methods(result, kq.QuantSpec(bits=4))     # doctest: +SKIP
    >>> cmp.choices                                              # doctest: +SKIP
    {'conv2d': 'minmax', 'dense': 'mse'}
    """
    if not isinstance(calibration, collections.abc.Mapping):
        raise ConfigError("calibration", type(calibration).__name__, "calibration must be a kq.CalibrationResult")
    spec = _default_spec() if spec is None else as_spec(spec)
    if spec.granularity != "per_tensor":
        raise ConfigError("spec", spec, "compare_methods compares per-tensor ranges (granularity='per_tensor')")
    methods = auto_candidates(methods, field="methods")
    tolerance = auto_tolerance(spec.options.get("tolerance") if tolerance is None else tolerance)
    auto_spec = spec.replace(observer="auto", observer_options={**spec.options, "tolerance": tolerance,
                                                                  "candidates": ",".join(methods)})
    explicit = layers is not None
    if explicit:
        names = [layers] if isinstance(layers, str) else list(layers)
        for name in names:
            if name not in calibration:
                raise NoDataError(name, reason=f"the layer is absent from the calibration "
                                  f"(known layers: {list(calibration)})", layer=name)
    else:
        names = list(calibration)
    rows, choices, skipped = [], {}, {}
    for name in names:
        stats = calibration[name]
        if not isinstance(stats, LayerStatistics):
            raise ConfigError("calibration", type(stats).__name__, "values must be LayerStatistics", layer=name)
        if not explicit and (stats.count <= 0 or stats.histogram is None):
            skipped[name] = "no data" if stats.count <= 0 else "no histogram (calibrated with statistics='range')"
            continue
        choice = stats.choose_method(auto_spec)
        power = range_search.signal_power(stats.histogram, stats.bin_edges)
        for c in choice.candidates:
            rows.append(MethodRow(name, c.method, c.min, c.max, c.mse, _sqnr_db(power, c.mse), c.method == choice.method))
        choices[name] = choice.method
    if not choices:
        raise NoDataError("calibration", reason=f"no layer has data and a histogram ({skipped})")
    return MethodComparison(spec, methods, tolerance, tuple(rows), choices, skipped)
