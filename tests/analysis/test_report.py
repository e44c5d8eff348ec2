"""kq.analysis.Report: one self-contained, escaped HTML file, PNGs beside it, atomic saves."""

import base64
import html
import os
import re

import numpy as np
import pytest

import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.analysis import plots
from keras_quant.analysis.report import Report
from keras_quant.calibration.result import CalibrationResult, LayerStatistics
from keras_quant.errors import ConfigError
from tests.analysis.figures import make_stats, open_png

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(0)
    a = make_stats(np.maximum(rng.normal(size=(32, 16)), 0.0), name="conv<1>")
    b = make_stats(rng.normal(0.5, 2.0, size=(32, 10)), name="dense")
    return CalibrationResult([a, b, LayerStatistics(name="branch")])


@pytest.fixture(scope="module")
def png():
    return plots.error_heatmap({"int8": {"conv1": 41.2, "dense": float("inf")}})


def test_html_escapes_every_text_and_keeps_table_values(png):
    r = Report('Run <1> & "two"')
    r.add_heading("<h1>injected</h1>", level=3)
    r.add_text("a < b & c\n\nsecond <para>")
    r.add_table([{"layer": "<script>alert(1)</script>", "sqnr_db": 41.23456, "mse": 1.5e-7},
                 {"layer": "dense", "sqnr_db": float("inf"), "mse": None}])
    r.add_table([["conv", 3], ["pool", 4]], columns=["name", "n"])
    r.add_image(png, "SQNR <per> layer")
    page = r.to_html()
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "<title>Run &lt;1&gt; &amp; &quot;two&quot;</title>" in page
    assert "<h3>&lt;h1&gt;injected&lt;/h1&gt;</h3>" in page
    assert "<p>a &lt; b &amp; c</p>" in page and "<p>second &lt;para&gt;</p>" in page
    for cell in ("&lt;script&gt;alert(1)&lt;/script&gt;", "41.23", "1.500e-07", "inf", "conv", "pool", "4"):
        assert f"<td>{cell}</td>" in page
    assert "<th>sqnr_db</th>" in page and "<figcaption>SQNR &lt;per&gt; layer</figcaption>" in page
    images = DATA_URI.findall(page)
    assert len(images) == 1 and base64.b64decode(images[0]) == png


def test_save_writes_one_html_and_pngs_beside_it(tmp_path, calibration, png):
    r = Report("calibration")
    r.add_calibration(calibration, spec=kq.QuantSpec(bits=8, observer="percentile"))
    r.add_image(png, "heatmap", name="sqnr heatmap")
    r.add_image(png, "again", name="sqnr heatmap")
    out = r.save(tmp_path / "report.html")
    assert out == str(tmp_path / "report.html")
    assert sorted(os.listdir(tmp_path)) == ["report.html", "report_files"]  # no temporary file left
    files = sorted(os.listdir(tmp_path / "report_files"))
    assert files == ["conv_1.png", "dense.png", "sqnr_heatmap.png", "sqnr_heatmap_2.png"]
    page = (tmp_path / "report.html").read_text("utf-8")
    images = [base64.b64decode(d) for d in DATA_URI.findall(page)]
    assert len(images) == 4
    for data in images:
        open_png(data)
    on_disk = {(tmp_path / "report_files" / f).read_bytes() for f in files}
    assert on_disk == set(images)
    # the statistics table: every layer, the chosen spec's scale, escaped names
    for name in ("conv&lt;1&gt;", "dense", "branch"):
        assert f"<td>{name}</td>" in page
    st = calibration["dense"]
    scale, zero_point = st.qparams(kq.QuantSpec(bits=8, observer="percentile"))
    for v in (st.min, st.max, st.mean, st.std, float(scale), int(zero_point)):
        assert f"<td>{html.escape(kq.formatting.format_number(v))}</td>" in page
    assert "<script" not in page.lower()


def test_save_into_a_chosen_images_dir(tmp_path, png):
    r = Report("x")
    r.add_image(png, "one")
    r.save(tmp_path / "out" / "r.html", images_dir=tmp_path / "figs")
    assert os.listdir(tmp_path / "figs") == ["figure_1.png"] and os.listdir(tmp_path / "out") == ["r.html"]


def test_failed_save_keeps_an_existing_report(tmp_path, png, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")
    r = Report("new")
    r.add_image(png, "fig")
    (tmp_path / "blocked_files").write_text("a file where the images folder would go")
    with pytest.raises(OSError):
        r.save(path, images_dir=tmp_path / "blocked_files")
    assert path.read_text() == "old report"
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".html"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        r.save(path)
    assert path.read_text() == "old report"
    assert sorted(os.listdir(tmp_path)) == ["blocked_files", "report.html", "report_files"]  # temp file removed


def test_add_calibration_limits_and_errors(calibration, png):
    r = Report("x")
    r.add_calibration(calibration, max_layers=1, layers=["dense", "conv<1>"])
    page = r.to_html()
    assert len(DATA_URI.findall(page)) == 1 and "1 more layer(s) left out (max_layers=1)" in page
    assert page.index("<td>dense</td>") < page.index("<td>conv&lt;1&gt;</td>")
    with pytest.raises(ConfigError) as e:
        r.add_calibration(calibration, layers=["nope"])
    assert e.value.field == "layers" and e.value.value == ["nope"]
    with pytest.raises(ConfigError) as e:
        r.add_calibration({"dense": calibration["dense"]})
    assert e.value.field == "result"
    with pytest.raises(ConfigError) as e:
        r.add_calibration(calibration, max_layers=0)
    assert e.value.field == "max_layers"
    with pytest.raises(ConfigError) as e:
        r.add_image(b"GIF89a", "not a png")
    assert e.value.field == "png_bytes"
    with pytest.raises(ConfigError) as e:
        r.add_heading("h", level=7)
    assert e.value.field == "level"
    with pytest.raises(ConfigError) as e:
        r.add_table([[1, 2]])
    assert e.value.field == "columns"
    with pytest.raises(ConfigError) as e:
        r.add_table([[1, 2, 3]], columns=["a", "b"])
    assert e.value.field == "rows[0]"


@pytest.mark.tensorflow
def test_report_of_a_real_calibration(tmp_path):
    import keras

    (x, _), _ = datasets.load_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(10, name="dense")])
    cb = kq.CalibrationCallback()
    model.predict(x[:64], callbacks=[cb], verbose=0)
    r = Report("digits")
    r.add_calibration(cb.result)
    page = (lambda p: open(p, encoding="utf-8").read())(r.save(tmp_path / "calib.html"))
    names = cb.result.layer_names
    assert len(DATA_URI.findall(page)) == len(names) == len(os.listdir(tmp_path / "calib_files"))
    st = cb.result["conv"]
    assert f"<td>{kq.formatting.format_number(st.max)}</td>" in page and f"<td>{st.count}</td>" in page
