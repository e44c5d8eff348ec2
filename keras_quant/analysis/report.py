"""`Report`: headings, text, tables and figures gathered in one self-contained HTML file.

The HTML has its CSS inline and each image as a `data:image/png;base64,`
URI: no script, no external link, so the file can be mailed or archived on
its own. `save` also writes every image as a PNG file into a folder beside it.
Every text is HTML-escaped. Files are written atomically (a temporary file in
the same folder, then `os.replace`): the images first, the HTML last, so a
failed save leaves an existing report as it was.

Example:

>>> report = kq.analysis.Report("int8 calibration")                              # doctest: +SKIP
>>> report.add_calibration(result, spec=kq.QuantSpec(bits=8, observer="mse"))   # doctest: +SKIP
>>> report.add_image(kq.analysis.plots.error_heatmap(table), "SQNR per layer")   # doctest: +SKIP
>>> report.save("report.html")            # report.html and report_files/*.png  # doctest: +SKIP
"""

import base64
import html
import os
import re

import numpy as np

from keras_quant.calibration.result import CalibrationResult
from keras_quant.errors import ConfigError, check_int
from keras_quant.formatting import format_number
from keras_quant.io import write_atomic

__all__ = ["Report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_LAYERS = 32
_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
figure{margin:1rem 0}img{max-width:100%}figcaption{font-size:.9rem;color:#555}
""".strip()


def _cell(v):
    """A table cell's text: numbers in 4 significant digits, arrays as `n values: min .. max`."""
    if isinstance(v, (np.ndarray, list, tuple)) and np.ndim(v) > 0:
        a = np.asarray(v, np.float64).reshape(-1)
        if a.size == 1:
            return format_number(float(a[0]))
        return f"{a.size} values: {format_number(float(a.min()))} .. {format_number(float(a.max()))}"
    if isinstance(v, np.generic):
        v = v.item()
    return format_number(v)


class Report:
    """A report builder: add content in order, then `to_html()` or `save(path)`.

    Args:
        title: The report's title (the page title and first heading).

    Example:

    >>> r = Report("QAT run")
    >>> r.add_table([{"layer": "conv1", "sqnr_db": 41.23}])
    >>> "41.23" in r.to_html()
    True
    """

    def __init__(self, title):
        self.title = str(title)
        self._parts = []
        self._images = []  # (file name, png bytes)

    # Content -------------------------------------------------------------------
    def add_heading(self, text, level=2):
        """Add a heading (`level` 1 to 6)."""
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 6:
            raise ConfigError("level", level, "level must be an int from 1 to 6")
        self._parts.append(f"<h{level}>{html.escape(str(text))}</h{level}>")

    def add_text(self, text):
        """Add a paragraph of plain text (escaped; blank lines start new paragraphs)."""
        for para in re.split(r"\n\s*\n", str(text)):
            self._parts.append(f"<p>{html.escape(para.strip())}</p>")

    def add_table(self, rows, columns=None):
        """Add a table.

        Args:
            rows: A list of dicts (columns default to their keys in
                first-seen order), or a list of lists with `columns`.
            columns: Column names (and order).

        Raises:
            ConfigError: For list rows without `columns` or of another length.
        """
        rows = list(rows)
        if columns is None:
            if not all(isinstance(r, dict) for r in rows):
                raise ConfigError("columns", None, "rows that are lists need columns=")
            columns = list(dict.fromkeys(k for r in rows for k in r))
        columns = list(columns)
        body = []
        for i, r in enumerate(rows):
            if isinstance(r, dict):
                values = [r.get(c) for c in columns]
            elif isinstance(r, (list, tuple)) and len(r) == len(columns):
                values = list(r)
            else:
                raise ConfigError(f"rows[{i}]", r, f"each row must be a dict or a list of {len(columns)} values")
            body.append("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in values) + "</tr>")
        head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>"
        self._parts.append(f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>")

    def add_image(self, png_bytes, caption, name=None):
        """Add a PNG figure with a caption.

        Args:
            png_bytes: The PNG file's bytes (e.g. from `kq.analysis.plots`).
            caption: The caption (escaped).
            name: File name stem of the PNG `save` writes (default
                `figure_<n>`); unsafe characters become `_`, and a repeated
                name gets a numbered suffix.

        Returns:
            The PNG file's name.

        Raises:
            ConfigError: If `png_bytes` is not a PNG.
        """
        if not isinstance(png_bytes, (bytes, bytearray)) or not bytes(png_bytes).startswith(PNG_SIGNATURE):
            raise ConfigError("png_bytes", type(png_bytes).__name__, "png_bytes must be the bytes of a PNG file")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name or f"figure_{len(self._images) + 1}")).strip("._") or "figure"
        taken = {n for n, _ in self._images}
        filename, k = f"{stem}.png", 2
        while filename in taken:
            filename, k = f"{stem}_{k}.png", k + 1
        self._images.append((filename, bytes(png_bytes)))
        data = base64.b64encode(png_bytes).decode("ascii")
        alt = html.escape(str(caption))
        self._parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                           f"<figcaption>{alt}</figcaption></figure>")
        return filename

    def add_calibration(self, result, spec=None, layers=None, max_layers=MAX_LAYERS):
        """Add a calibration's statistics table and one activation histogram per layer.

        Args:
            result: A `kq.CalibrationResult`.
            spec: The `kq.QuantSpec` whose clip range, scale and zero point
                are shown (default: each layer's calibration spec).
            layers: Layer names to show (default: every layer, in order).
            max_layers: At most this many histograms; a note names how many were left out.

        Raises:
            ConfigError: For a result of another type, an unknown layer, or a
                `max_layers` below 1.
        """
        from keras_quant.analysis.plots import activation_histogram

        if not isinstance(result, CalibrationResult):
            raise ConfigError("result", type(result).__name__, "result must be a kq.CalibrationResult")
        check_int("max_layers", max_layers)
        names = result.layer_names if layers is None else [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in result]
        if unknown:
            raise ConfigError("layers", unknown, f"no such layer in the calibration; it has {result.layer_names}")
        rows, figures = [], []
        for name in names:
            st = result[name]
            row = {"layer": name, "count": st.count, "min": st.min, "max": st.max, "mean": st.mean, "std": st.std,
                   "sparsity": st.sparsity, "scale": st.scale, "zero point": st.zero_point}
            if st.count > 0 and spec is not None:
                row["scale"], row["zero point"] = st.qparams(spec)
            rows.append(row)
            if st.count > 0 and st.histogram is not None and len(figures) < max_layers:
                figures.append((name, activation_histogram(st, spec=spec or st.spec)))
        self.add_table(rows)
        for name, png in figures:
            self.add_image(png, f"{name}: activation histogram and clip range", name=name)
        shown = sum(1 for n in names if result[n].count > 0 and result[n].histogram is not None)
        if shown > len(figures):
            self.add_text(f"Histograms of {shown - len(figures)} more layer(s) left out (max_layers={max_layers}).")

    # Output --------------------------------------------------------------------
    def to_html(self):
        """The report as one self-contained HTML document (a str)."""
        title = html.escape(self.title)
        body = "\n".join([f"<h1>{title}</h1>"] + self._parts)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
                f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")

    def save(self, path, images_dir=None):
        """Write the HTML to `path` and each image as a PNG file into `images_dir`.

        Args:
            path: The HTML file.
            images_dir: Folder of the PNG files (default `<stem>_files/` beside `path`).

        Returns:
            The HTML path (a str).
        """
        path = os.fspath(path)
        if images_dir is None:
            images_dir = os.path.splitext(path)[0] + "_files"
        for filename, png in self._images:
            write_atomic(os.path.join(images_dir, filename), png, make_parents=True)
        write_atomic(path, self.to_html(), make_parents=True)
        return path
