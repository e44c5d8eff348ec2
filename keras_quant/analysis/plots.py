"""Figures of quantization results, as PNG bytes: activation histograms, error heatmaps, accuracy vs size.

Each function draws on its own `matplotlib.figure.Figure` with the Agg
canvas (no pyplot, no global state, no backend switch), returns the PNG
bytes and, given `path=`, also writes them atomically. matplotlib is imported
when a figure is drawn, so `import keras_quant` does not need it
(`pip install "keras-quant[plot]"`).

Non-finite values are drawn, not dropped silently: an infinite SQNR (an
exact quantization) colours its heatmap cell like the best finite value and
is written `inf`; a missing or NaN cell is grey; a point without a finite
size or accuracy is left out of the chart.

Example:

>>> png = kq.analysis.plots.activation_histogram(result["conv1"], spec=kq.QuantSpec(observer="mse"))  # doctest: +SKIP
>>> kq.analysis.plots.error_heatmap({"int8": {"conv1": 41.2}, "int4": {"conv1": 17.5}}, path="sqnr.png")  # doctest: +SKIP
"""

import io
import math

import numpy as np

from keras_quant.calibration.result import LayerStatistics
from keras_quant.config import as_spec
from keras_quant.errors import ConfigError, NoDataError, is_number
from keras_quant.formatting import format_number
from keras_quant.io import write_atomic

__all__ = ["activation_histogram", "error_heatmap", "accuracy_size_chart"]

DPI = 100


def _figure(width, height):
    """A new `Figure` on an Agg canvas (matplotlib imported here, not with keras_quant)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "keras_quant.analysis.plots needs matplotlib; install it with pip install 'keras-quant[plot]' "
            "(matplotlib==3.11.2)"
        ) from e
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig, path):
    buf = io.BytesIO()
    fig.canvas.print_png(buf)
    data = buf.getvalue()
    if path is not None:
        write_atomic(path, data)
    return data


def _finite(v):
    return v is not None and is_number(v) and math.isfinite(float(v))


# Activation histogram ------------------------------------------------------------
def _clip(stats, spec, clip_range):
    if spec is not None and clip_range is not None:
        raise ConfigError("clip_range", clip_range, "give spec or clip_range, not both", layer=stats.name)
    if spec is not None:
        spec = as_spec(spec, layer=stats.name)
        lo, hi = stats.compute_range(spec)
        return float(np.min(lo)), float(np.max(hi)), f"clip range ({spec.observer}, {spec.bits} bits)"
    if clip_range is None:
        return None
    if not isinstance(clip_range, (tuple, list)) or len(clip_range) != 2 or not all(map(is_number, clip_range)):
        raise ConfigError("clip_range", clip_range, "clip_range must be a (min, max) pair of numbers", layer=stats.name)
    lo, hi = (float(v) for v in clip_range)
    if lo > hi:
        raise ConfigError("clip_range", clip_range, "clip_range must have min <= max", layer=stats.name)
    return lo, hi, "clip range"


def activation_histogram(stats, spec=None, clip_range=None, title=None, path=None):
    """The histogram of a calibrated activation, log counts, with its observed extremes and clip range.

    Args:
        stats: A `kq.LayerStatistics` gathered with a histogram.
        spec: Optional `kq.QuantSpec`: draws `stats.compute_range(spec)` as
            the clip range (a per-channel range is drawn as the union).
        clip_range: Optional `(min, max)` to draw instead of a spec's range.
        title: Figure title (default: the layer's name).
        path: Optional file to write the PNG to (atomically).

    Returns:
        The PNG bytes.

    Raises:
        ConfigError: If `stats` is not a `LayerStatistics` or holds no
            histogram, for a bad `spec` / `clip_range`, or both given.
        NoDataError: If the layer saw no finite value.

    Example:

    >>> png = activation_histogram(result["conv1"], spec=kq.QuantSpec(bits=8, observer="percentile"))  # doctest: +SKIP
    """
    if not isinstance(stats, LayerStatistics):
        raise ConfigError("stats", type(stats).__name__, "stats must be a kq.LayerStatistics")
    if stats.count <= 0:
        raise NoDataError(stats.name, reason="no calibration sample reached this layer (count is 0)", layer=stats.name)
    if stats.histogram is None or stats.bin_edges is None:
        raise ConfigError("histogram", None, "the plot needs the histogram, which this calibration did not gather "
                          "(calibrate with statistics='full')", layer=stats.name)
    clip = _clip(stats, spec, clip_range)
    hist = np.nan_to_num(np.asarray(stats.histogram, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    edges = np.asarray(stats.bin_edges, np.float64)
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    if not edges[-1] > edges[0]:  # constant data: one bin of a small width around the value
        half = max(abs(float(edges[0])), 1.0) * 1e-3
        hist, edges = np.array([hist.sum()]), np.array([edges[0] - half, edges[0] + half])
    floor = 0.5 * hist[hist > 0].min() if np.any(hist > 0) else 0.5  # log scale: empty bins drawn at the floor
    ax.stairs(np.maximum(hist, floor), edges, baseline=floor, fill=True, color="#4c72b0",
              label=f"{stats.name}: {stats.count} values, observer {stats.observer}")
    ax.set_yscale("log")
    for value, style, label in ((stats.min, "--", "observed min / max"), (stats.max, "--", None)):
        if _finite(value):
            ax.axvline(float(value), color="0.35", linestyle=style, linewidth=1, label=label)
    if clip is not None:
        for i, value in enumerate(clip[:2]):
            if math.isfinite(value):
                ax.axvline(value, color="#c44e52", linewidth=1.5, label=clip[2] if i == 0 else None)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.set_title(title if title is not None else stats.name)
    ax.legend(fontsize=8)
    return _png(fig, path)


# Error heatmap ---------------------------------------------------------------------
def _table_matrix(table, columns):
    """`(row_labels, column_labels, values float64, per_column)` of a heatmap table."""
    if isinstance(table, dict):
        cols = list(table) if columns is None else list(columns)
        for c in cols:
            if c not in table:
                raise ConfigError("columns", c, f"no such column in the table; it has {list(table)}")
            if not isinstance(table[c], dict):
                raise ConfigError(f"table[{c!r}]", table[c], "each column must be a {layer_name: value} dict")
        rows = list(dict.fromkeys(name for c in cols for name in table[c]))
        cells = [[table[c].get(r) for c in cols] for r in rows]
        per_column = False
    elif isinstance(table, (list, tuple)):
        for i, row in enumerate(table):
            if not isinstance(row, dict) or "name" not in row:
                raise ConfigError(f"table[{i}]", row, "each row must be a dict with a 'name' key")
        if columns is None:
            columns = dict.fromkeys(k for row in table for k, v in row.items() if k != "name" and is_number(v))
        cols = list(columns)
        rows = [str(row["name"]) for row in table]
        cells = [[row.get(c) for c in cols] for row in table]
        per_column = len(cols) > 1
    else:
        raise ConfigError("table", type(table).__name__, "table must be a {column: {layer: value}} dict or a list "
                          "of row dicts")
    if not rows or not cols:
        raise NoDataError("table", reason="it has no layer (row) or no column")
    values = np.full((len(rows), len(cols)), np.nan)
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            if v is not None and not is_number(v):
                raise ConfigError(f"table[{cols[j]!r}][{rows[i]!r}]", v, "heatmap values must be numbers or None")
            if v is not None:
                values[i, j] = float(v)
    return rows, [str(c) for c in cols], values, per_column


def _color_values(values, per_column):
    """Values mapped for colouring: infinities at the finite extremes, optionally scaled per column to [0, 1]."""
    out = values.copy()
    groups = [np.s_[:, j] for j in range(values.shape[1])] if per_column else [np.s_[:, :]]
    for g in groups:
        v = out[g]
        finite = v[np.isfinite(v)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        pos, neg = np.isposinf(v), np.isneginf(v)
        if per_column:
            v[...] = (v - lo) / (hi - lo) if hi > lo else np.where(np.isnan(v), np.nan, 0.5)
            lo, hi = 0.0, 1.0
        v[pos], v[neg] = hi, lo
    return out


def error_heatmap(table, columns=None, title=None, value_label="SQNR (dB)", path=None):
    """A layers x columns heatmap of per-layer errors, each cell annotated with its value.

    Args:
        table: `{column_label: {layer_name: value}}` (one column per scheme,
            method or metric; rows are the layers in first-seen order), or a
            list of row dicts `[{"name": layer, "mse": ..., "sqnr_db": ...}]`
            (the rows of `LayerErrors.to_dict()["layers"]`).
        columns: The columns to draw, in order (default: every column; for
            row dicts every numeric key but `name`).
        title: Figure title.
        value_label: Colorbar label. Columns of row dicts are different
            metrics, so with several each is coloured on its own scale
            (0 = its lowest value, 1 = its highest) and the colorbar reads
            "relative (per column)".
        path: Optional file to write the PNG to (atomically).

    Returns:
        The PNG bytes.

    Raises:
        ConfigError: For a table of another shape, a column that is not in
            it, or a value that is not a number.
        NoDataError: If the table has no row or no column.

    Example:

    >>> png = error_heatmap({"int8": {"conv1": 41.2, "dense": float("inf")}, "int4": {"conv1": 17.5}})
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    rows, cols, values, per_column = _table_matrix(table, columns)
    colors = np.ma.masked_invalid(_color_values(values, per_column))
    fig = _figure(max(3.5, 1.3 * len(cols) + 2.5), max(2.5, 0.4 * len(rows) + 1.4))
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(colors, cmap=cmap, aspect="auto", vmin=0.0 if per_column else None,
                      vmax=1.0 if per_column else None)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    norm = image.norm
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            shade = colors[i, j]
            dark = shade is np.ma.masked or norm(shade) < 0.5
            ax.text(j, i, "" if np.isnan(v) else format_number(float(v)), ha="center", va="center", fontsize=8,
                    color="white" if dark and shade is not np.ma.masked else "black")
    fig.colorbar(image, ax=ax, label="relative (per column)" if per_column else value_label)
    if title is not None:
        ax.set_title(title)
    return _png(fig, path)


# Accuracy vs size ------------------------------------------------------------------
def _points(points):
    if not isinstance(points, (list, tuple)):
        raise ConfigError("points", type(points).__name__, "points must be a list of dicts")
    if not points:
        raise NoDataError("points", reason="the list is empty")
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise ConfigError(f"points[{i}]", p, "each point must be a dict with label, size_bytes and accuracy")
        for key in ("label", "size_bytes", "accuracy"):
            if key not in p:
                raise ConfigError(f"points[{i}].{key}", None, f"each point needs a '{key}'")
        for key in ("size_bytes", "accuracy"):
            if p[key] is not None and not is_number(p[key]):
                raise ConfigError(f"points[{i}].{key}", p[key], f"{key} must be a number")
        if _finite(p["size_bytes"]) and _finite(p["accuracy"]):
            out.append((str(p["label"]), float(p["size_bytes"]) / 1024.0, float(p["accuracy"]), bool(p.get("reference"))))
    if not out:
        raise NoDataError("points", reason="no point has a finite size_bytes and accuracy")
    return out


def accuracy_size_chart(points, title=None, x_label="size (KiB)", y_label="accuracy", path=None):
    """Accuracy against model size: a search trajectory as a line, reference points as markers, all labelled.

    Args:
        points: `[{"label", "size_bytes", "accuracy"}, ...]`. Points are
            joined by a line in the given order (e.g. a mixed-precision
            search's steps); a point with `"reference": True` (e.g. the float
            and int8 models) is drawn as its own marker, off the line.
            Points with a non-finite size or accuracy are left out.
        title: Figure title.
        x_label: x-axis label (sizes are drawn in KiB).
        y_label: y-axis label.
        path: Optional file to write the PNG to (atomically).

    Returns:
        The PNG bytes.

    Raises:
        ConfigError: If `points` is not a list of such dicts.
        NoDataError: If it is empty or no point is finite.

    Example:

    >>> png = accuracy_size_chart([{"label": "float", "size_bytes": 40960, "accuracy": 0.97, "reference": True},
    ...                            {"label": "w8", "size_bytes": 10240, "accuracy": 0.96},
    ...                            {"label": "w4", "size_bytes": 5120, "accuracy": 0.93}])
    """
    pts = _points(points)
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    line = [p for p in pts if not p[3]]
    refs = [p for p in pts if p[3]]
    if line:
        ax.plot([p[1] for p in line], [p[2] for p in line], "-o", color="#4c72b0", label="trajectory")
    for k, p in enumerate(refs):
        ax.plot([p[1]], [p[2]], marker="s", linestyle="none", color=f"C{k + 1}", label=p[0])
    for label, x, y, _ in pts:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(0.12)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title is not None:
        ax.set_title(title)
    return _png(fig, path)
