"""kq.analysis.plots: PNG figures that open, are not blank, draw what they say, and survive NaN / inf."""

import math
import os
import sys

import numpy as np
import pytest

import keras_quant as kq
from keras_quant.analysis import plots
from keras_quant.calibration.result import LayerStatistics
from keras_quant.errors import ConfigError, NoDataError
from tests.analysis.figures import count_color, make_stats, open_png

CLIP_RED = (0xC4, 0x4E, 0x52)  # plots.activation_histogram's clip-range colour
BAR_BLUE = (0x4C, 0x72, 0xB0)


@pytest.fixture(scope="module")
def stats():
    x = np.random.default_rng(0).standard_t(4, size=(64, 32)).astype("float32")
    return make_stats(x, name="conv1")


def test_activation_histogram_draws_bars_extremes_and_clip_range(stats, tmp_path):
    path = tmp_path / "hist.png"
    png = plots.activation_histogram(stats, spec=kq.QuantSpec(bits=8, observer="percentile"), path=path)
    image = open_png(png)
    assert image.size == (640, 360)
    assert path.read_bytes() == png
    assert sorted(os.listdir(tmp_path)) == ["hist.png"]  # atomic write: no temporary file left
    assert count_color(image, BAR_BLUE) > 500
    assert count_color(image, CLIP_RED) > 100
    plain = open_png(plots.activation_histogram(stats))
    assert count_color(plain, CLIP_RED) == 0  # no spec, no clip range
    given = open_png(plots.activation_histogram(stats, clip_range=(-2.0, 2.0), title="<conv1>"))
    assert count_color(given, CLIP_RED) > 100


def test_activation_histogram_constant_and_non_finite_data():
    const = make_stats(np.full((4, 8), 0.5), name="const")
    open_png(plots.activation_histogram(const, spec=kq.QuantSpec(bits=8)))
    nan_hist = make_stats(np.linspace(-1, 1, 100)[None])
    fields = {f: getattr(nan_hist, f) for f in nan_hist.__dataclass_fields__}
    h = fields["histogram"].copy()
    h[:3] = [np.nan, np.inf, 0.0]
    broken = LayerStatistics(**{**fields, "histogram": h})
    open_png(plots.activation_histogram(broken, clip_range=(-math.inf, 0.5)))


def test_activation_histogram_errors(stats):
    with pytest.raises(ConfigError) as e:
        plots.activation_histogram({"min": 0})
    assert e.value.field == "stats"
    with pytest.raises(NoDataError, match="branch"):
        plots.activation_histogram(LayerStatistics(name="branch"))
    fields = {f: getattr(stats, f) for f in stats.__dataclass_fields__}
    with pytest.raises(ConfigError) as e:
        plots.activation_histogram(LayerStatistics(**{**fields, "histogram": None}))
    assert e.value.field == "histogram" and e.value.layer == "conv1"
    for bad in ((1.0,), (2.0, 1.0), ("a", 1.0)):
        with pytest.raises(ConfigError) as e:
            plots.activation_histogram(stats, clip_range=bad)
        assert e.value.field == "clip_range"
    with pytest.raises(ConfigError, match="not both"):
        plots.activation_histogram(stats, spec=kq.QuantSpec(), clip_range=(0.0, 1.0))
    with pytest.raises(ConfigError) as e:
        plots.activation_histogram(stats, spec="int8")
    assert e.value.field == "spec"


def test_error_heatmap_dict_table_with_inf_and_missing(tmp_path):
    table = {"int8": {"conv1": 41.2, "dense": math.inf}, "int4": {"conv1": 17.5, "dense": math.nan, "pool": 9.0}}
    png = plots.error_heatmap(table, title="SQNR", path=tmp_path / "h.png")
    image = open_png(png)
    assert (tmp_path / "h.png").read_bytes() == png and image.width > 300
    # three layers in first-seen order; inf coloured as the best finite value, NaN / missing masked
    rows, cols, values, per_column = plots._table_matrix(table, None)
    assert rows == ["conv1", "dense", "pool"] and cols == ["int8", "int4"] and not per_column
    colors = plots._color_values(values, per_column)
    assert colors[1, 0] == 41.2 and np.isnan(colors[1, 1]) and np.isnan(colors[2, 0])
    open_png(plots.error_heatmap(table, columns=["int4"]))


def test_error_heatmap_row_dicts_per_column_scale():
    rows = [
        {"name": "conv1", "mse": 1e-4, "sqnr_db": 40.0, "note": "x"},
        {"name": "dense", "mse": 0.0, "sqnr_db": math.inf},
        {"name": "logits", "mse": 1e-2, "sqnr_db": 20.0},
    ]
    open_png(plots.error_heatmap(rows, columns=["mse", "sqnr_db"], value_label="error"))
    names, cols, values, per_column = plots._table_matrix(rows, None)
    assert names == ["conv1", "dense", "logits"] and cols == ["mse", "sqnr_db"] and per_column  # "note" is not numeric
    colors = plots._color_values(values, per_column)
    np.testing.assert_allclose(colors[:, 0], [0.01, 0.0, 1.0])
    np.testing.assert_allclose(colors[:, 1], [1.0, 1.0, 0.0])  # inf: the column's best
    open_png(plots.error_heatmap([{"name": "only", "sqnr_db": math.inf}]))


def test_error_heatmap_errors():
    for empty in ({}, [], {"int8": {}}):
        with pytest.raises(NoDataError) as e:
            plots.error_heatmap(empty)
        assert e.value.field == "table"
    with pytest.raises(ConfigError) as e:
        plots.error_heatmap({"int8": {"conv1": "high"}})
    assert e.value.field == "table['int8']['conv1']" and e.value.value == "high"
    with pytest.raises(ConfigError) as e:
        plots.error_heatmap({"int8": {"conv1": 1.0}}, columns=["int4"])
    assert e.value.field == "columns"
    with pytest.raises(ConfigError) as e:
        plots.error_heatmap([{"mse": 1.0}])
    assert e.value.field == "table[0]"
    with pytest.raises(ConfigError):
        plots.error_heatmap("sqnr")


def test_accuracy_size_chart(tmp_path):
    points = [
        {"label": "float", "size_bytes": 40960, "accuracy": 0.97, "reference": True},
        {"label": "int8", "size_bytes": 10240, "accuracy": 0.965, "reference": True},
        {"label": "step 1", "size_bytes": 10240, "accuracy": 0.96},
        {"label": "step 2", "size_bytes": 7168, "accuracy": 0.95},
        {"label": "step 3", "size_bytes": 5120, "accuracy": math.nan},  # left out
        {"label": "step 4", "size_bytes": math.inf, "accuracy": 0.9},   # left out
    ]
    png = plots.accuracy_size_chart(points, title="search", path=tmp_path / "a.png")
    image = open_png(png)
    assert image.size == (640, 400) and (tmp_path / "a.png").read_bytes() == png
    assert count_color(image, BAR_BLUE) > 50  # the trajectory line
    assert [p[0] for p in plots._points(points)] == ["float", "int8", "step 1", "step 2"]
    assert plots._points(points)[0][1] == 40.0  # KiB


def test_accuracy_size_chart_errors():
    with pytest.raises(NoDataError) as e:
        plots.accuracy_size_chart([])
    assert e.value.field == "points"
    with pytest.raises(NoDataError, match="finite"):
        plots.accuracy_size_chart([{"label": "a", "size_bytes": 1, "accuracy": math.nan}])
    with pytest.raises(ConfigError) as e:
        plots.accuracy_size_chart([{"label": "a", "size_bytes": 1}])
    assert e.value.field == "points[0].accuracy"
    with pytest.raises(ConfigError) as e:
        plots.accuracy_size_chart([{"label": "a", "size_bytes": "1 KiB", "accuracy": 0.5}])
    assert e.value.field == "points[0].size_bytes"
    with pytest.raises(ConfigError):
        plots.accuracy_size_chart({"label": "a"})


def test_missing_matplotlib_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"matplotlib.*keras-quant\[plot\]"):
        plots.accuracy_size_chart([{"label": "a", "size_bytes": 1024, "accuracy": 0.5}])
