"""Helpers shared by the plot and report tests: calibration statistics from numpy, PNG checks."""

import io

import numpy as np
from PIL import Image

import keras_quant as kq
from keras_quant.calibration.result import LayerStatistics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_stats(x, name="layer", spec=None, num_bins=256):
    """A `LayerStatistics` of the numpy sample `x`, as a calibration would hold it (no model)."""
    spec = spec or kq.QuantSpec(bits=8)
    v = np.asarray(x, np.float64).reshape(-1)
    lo, hi = float(v.min()), float(v.max())
    hist, edges = np.histogram(v, bins=num_bins, range=(lo, hi))
    stats = LayerStatistics(
        name=name, count=v.size, num_samples=len(x), shape=(None,) + np.shape(x)[1:], dtype="float32", min=lo,
        max=hi, mean=float(v.mean()), std=float(v.std()), sparsity=float(np.mean(v == 0)),
        histogram=hist.astype(np.float64), bin_edges=edges, spec=spec,
    )
    lo_r, hi_r = stats.compute_range(spec)
    scale, zero_point = stats.qparams(spec)
    return LayerStatistics(**{**{f: getattr(stats, f) for f in stats.__dataclass_fields__},
                              "range_min": lo_r, "range_max": hi_r, "scale": float(scale),
                              "zero_point": int(zero_point)})


def open_png(data):
    """The PIL image of PNG bytes, checked to be a non-blank PNG (more than one colour)."""
    assert data[:8] == PNG_SIGNATURE
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    colors = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colors) > 1
    return image


def count_color(image, rgb, tol=12):
    """Pixels of `image` within `tol` of the colour `rgb` in every channel."""
    a = np.asarray(image.convert("RGB"), np.int16)
    return int(np.all(np.abs(a - np.asarray(rgb, np.int16)) <= tol, axis=-1).sum())
