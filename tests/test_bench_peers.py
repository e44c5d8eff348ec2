"""The peers benchmark's parts: real contenders on a tiny model, and its tables, targets and chart.

No timing assertions: the figures are checked for presence and consistency, not speed.
"""

import numpy as np
import pytest

from tests.benchmarks import load_benchmark

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def bp():
    return load_benchmark("bench_peers")


@pytest.fixture(scope="module")
def digits_mlp(bp):
    import keras

    from keras_quant.cli import datasets

    (x, y), (xt, yt) = datasets.load_digits()
    model = bp.compile_model(keras, bp.build_model(keras, "mlp", x.shape[1:]), bp.TRAIN_LR)
    model.fit(x, y, batch_size=64, epochs=15, verbose=0)
    return model, x, y, xt, yt


@pytest.mark.parametrize("kind", ["cnn", "mobilenet", "mlp"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1)])
def test_models_build_for_both_image_sizes(bp, kind, shape):
    import keras

    model = bp.build_model(keras, kind, shape)
    assert model.output_shape == (None, 10)
    again = bp.build_model(keras, kind, shape)  # seeded: the same initial weights
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    if kind == "mobilenet":
        assert any(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in model.layers)


@pytest.mark.slow
def test_every_contender_writes_a_file_its_runtime_runs(bp, digits_mlp, tmp_path):
    model, x, y, xt, yt = digits_mlp
    x_calib = x[-200:]
    arts = []
    bp._timed(arts, lambda p: bp.float_tflite(model, p), "float32", "float", str(tmp_path / "f.tflite"), "litert")
    bp._timed(arts, lambda p: bp.converter_int8(model, x_calib, p), "tflite_converter", "W8A8",
              str(tmp_path / "c.tflite"), "litert")
    result = bp.kq_ptq_artifacts(model, x_calib, str(tmp_path), arts, observers=("minmax", "auto"))
    bp._timed(arts, lambda p: bp.keras_quantize(model, "int8", p), "keras_quantize", "W8A8",
              str(tmp_path / "k.keras"), "keras")
    bp.ort_artifacts(arts[0]["path"], x_calib, str(tmp_path), arts)
    x_ft, y_ft, epochs = bp.finetune_data(x, y, (256, 1))
    arts.append(bp.float_control(model, x_ft, y_ft, epochs, str(tmp_path / "control.keras")))
    bp.kq_qat_artifacts(model, result, x_ft, y_ft, epochs, str(tmp_path), arts,
                        variants=(("W8A8", False), ("W8A8", True)))
    assert [a.get("error") for a in arts] == [None] * len(arts), arts  # the MLP has no MaxPool: ORT W4A4 runs too
    contenders = {(a["contender"], a["scheme"]) for a in arts}
    assert {("kq_ptq_minmax", "W4A4"), ("kq_ptq_auto", "W8A8"), ("ort_minmax", "W4A8"), ("ort_entropy", "W8A8"),
            ("ort_percentile", "W4A4"), ("kq_qat", "W8A8"), ("kq_qat_lsq", "W8A8")} <= contenders

    cfg = dict(bp.QUICK, rounds=2, round_s=0.002, warmup=1)
    bp.measure(arts, xt, yt, cfg)
    float_acc = float(np.mean(np.argmax(model.predict(xt, verbose=0), -1) == yt))
    rows = bp.rows_for_model("digits", "mlp", float_acc, arts)
    by = {(r["contender"], r["scheme"]): r for r in rows}
    assert by[("float32", "float")]["drop_pts"] == pytest.approx(0.0, abs=1e-9)  # the float file is the model
    conv = by[("tflite_converter", "W8A8")]
    assert conv["size_vs_converter"] == conv["latency_vs_converter"] == conv["time_vs_converter"] == 1.0
    for key in (("kq_ptq_minmax", "W8A8"), ("ort_minmax", "W8A8")):
        assert by[key]["drop_pts"] < 3.0  # 8 bits lose little on digits
        assert 0.9 < by[key]["size_vs_converter"] < 1.2  # both hold int8 weights
    assert by[("ort_minmax", "W4A8")]["size_kb"] < 0.75 * by[("ort_minmax", "W8A8")]["size_kb"]  # int4 initializers
    assert by[("keras_quantize", "W8A8")]["runtime"] == "keras"
    assert by[("kq_qat", "W8A8")]["qat_step_ratio"] > 0  # over the float control's step
    assert by[("float_finetuned", "float")]["qat_step_ratio"] == 1.0
    for r in rows:
        assert r["latency_ms"] > 0
        if r["contender"] != "float_finetuned":  # the control is not a contender: no production time
            assert r["peak_mb"] >= 0 and r["time_s"] > 0


def test_ort_w4a4_into_maxpool_is_an_error_row_not_a_crash(bp, tmp_path):
    import keras

    from keras_quant.cli import datasets

    (x, y), _ = datasets.load_digits()
    model = bp.build_model(keras, "cnn", x.shape[1:])
    arts = []
    bp._timed(arts, lambda p: bp.float_tflite(model, p), "float32", "float", str(tmp_path / "f.tflite"), "litert")
    bp.ort_artifacts(arts[0]["path"], x[:16], str(tmp_path), arts)
    errors = {(a["contender"], a["scheme"]): a.get("error") for a in arts[1:]}
    assert errors[("ort_minmax", "W8A8")] is None
    assert "MaxPool" in errors[("ort_minmax", "W4A4")]


def _row(contender, scheme, acc, **kw):
    return dict({"dataset": "digits", "model": "cnn", "contender": contender, "scheme": scheme,
                 "runtime": "litert", "accuracy": acc, "drop_pts": 100 * (0.95 - acc)}, **kw)


ROWS = [
    _row("float32", "float", 0.95),
    _row("tflite_converter", "W8A8", 0.94, latency_vs_converter=1.0, size_vs_converter=1.0),
    _row("kq_ptq_minmax", "W8A8", 0.94),
    _row("kq_ptq_minmax", "W4A8", 0.90),
    _row("kq_ptq_auto", "W8A8", 0.945, latency_vs_converter=1.02, size_vs_converter=1.08),
    _row("kq_ptq_auto", "W4A8", 0.93),
    _row("ort_minmax", "W4A8", 0.89),
    {"dataset": "digits", "model": "cnn", "contender": "ort_minmax", "scheme": "W4A4", "runtime": "onnxruntime",
     "error": "uint4 MaxPool"},
    _row("kq_qat", "W8A8", 0.948),
    _row("kq_qat_lsq", "W8A8", 0.951),
    _row("kq_qat_lsq", "W4A4", 0.92),
]
FLOAT = [{"dataset": "digits", "model": "cnn", "float_accuracy": 0.95}]


def test_targets_compare_the_right_figures(bp):
    t = {r["target"]: r for r in bp.target_rows(ROWS, FLOAT)}
    auto8 = t["kq_ptq_auto W8A8 drop <= converter's (pts)"]
    assert auto8["value"] == pytest.approx(0.5) and auto8["reference"] == pytest.approx(1.0)
    assert auto8["status"] == "met"
    assert t["kq_ptq_minmax W8A8 drop <= converter's (pts)"]["status"] == "met"  # equal drops meet it
    half = t["kq_ptq_auto W4A8 drop <= half of ort_minmax's (pts)"]
    assert half["reference"] == pytest.approx(3.0) and half["status"] == "met"  # 2 <= 6 / 2
    assert t["kq_ptq_minmax W4A8 drop <= half of ort_minmax's (pts)"]["status"] == "missed"  # 5 > 3
    assert t["kq_qat W8A8 within 0.3 pts of float"]["status"] == "met"  # 0.2
    assert t["kq_qat_lsq W4A4 within 2.0 pts of float"]["status"] == "missed"  # 3
    assert t["kq_ptq_auto W8A8 latency / converter's"]["status"] == "met"
    assert t["kq_ptq_auto W8A8 size / converter's"]["status"] == "missed"  # 1.08 > 1.05


def test_four_bit_targets(bp):
    rows = ROWS + [_row("kq_ptq_algos", "W4A8", 0.925), _row("kq_ptq_algos", "W4A4", 0.925, latency_vs_converter=1.1),
                   _row("kq_qat", "W4A4", 0.93, latency_vs_converter=1.3)]
    t = {r["target"]: r for r in bp.target_rows(rows, FLOAT)}
    algo8 = t["kq_ptq_algos W4A8 drop <= half of ort_minmax's (pts)"]
    assert algo8["value"] == pytest.approx(2.5) and algo8["reference"] == pytest.approx(3.0) and algo8["status"] == "met"
    assert t["kq_ptq_algos W4A4 within 3.0 pts of float"]["status"] == "met"  # 2.5
    assert "kq_ptq_algos W4A8 within 1.0 pts of float" not in t  # judged on the Fashion MobileNet only
    lsq = t["kq_qat_lsq W4A4 drop <= kq_qat's (pts)"]
    assert lsq["value"] == pytest.approx(3.0) and lsq["reference"] == pytest.approx(2.0) and lsq["status"] == "missed"
    assert t["kq_ptq_algos W4A4 latency / converter's int8"]["status"] == "met"
    assert t["kq_qat_lsq W4A4 latency / converter's int8"]["status"] is None  # no latency figure
    fashion = [dict(r, dataset="fashion_mnist", model="mobilenet") for r in rows]
    t = {r["target"]: r for r in bp.target_rows(fashion, [dict(FLOAT[0], dataset="fashion_mnist",
                                                                  model="mobilenet")])}
    assert t["kq_ptq_algos W4A8 within 1.0 pts of float"]["status"] == "missed"  # 2.5


def test_missing_figures_leave_a_target_unjudged(bp):
    rows = [r for r in ROWS if r["contender"] != "ort_minmax"]
    t = {r["target"]: r for r in bp.target_rows(rows, FLOAT)}
    assert t["kq_ptq_auto W4A8 drop <= half of ort_minmax's (pts)"]["status"] is None


def test_summary_pivots_drops_and_marks_errors(bp):
    summary = bp.summary_rows(ROWS, FLOAT)
    assert summary[0] == {"contender": "float accuracy", "scheme": "", "digits/cnn": 0.95}
    by = {(r["contender"], r["scheme"]): r for r in summary[1:]}
    assert ("float32", "float") not in by
    assert by[("kq_ptq_auto", "W4A8")]["digits/cnn"] == pytest.approx(2.0)
    assert by[("ort_minmax", "W4A4")]["digits/cnn"] == "error"


def test_chart_is_a_png(bp):
    data = bp.drop_chart(ROWS, FLOAT)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_tfmot_failure_becomes_its_row(bp):
    arts = bp.tfmot_artifacts({"error": "No module named 'tf_keras'"}, "cnn")
    rows = bp.rows_for_model("digits", "cnn", 0.9, arts)
    assert rows == [{"dataset": "digits", "model": "cnn", "contender": "tfmot_qat", "scheme": "W8A8",
                     "runtime": "litert", "error": "No module named 'tf_keras'"}]


def test_non_tensorflow_backend_is_skipped_with_a_note(bp, monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    out = bp.run(True)
    assert out["rows"] == [] and "TensorFlow backend" in out["notes"][0]


def test_missing_fashion_mnist_is_left_out_with_a_note(bp, monkeypatch):
    from keras_quant.cli import datasets

    monkeypatch.setattr(datasets, "fashion_mnist_available", lambda: False)
    names, notes = bp.available_datasets(("fashion_mnist", "digits"))
    assert names == ["digits"] and "dataset-fashion-mnist" in notes[0]


def test_chart_is_redrawn_from_a_results_file(bp, tmp_path):
    import json

    results = tmp_path / "2000-01-02.json"
    results.write_text(json.dumps({"benchmarks": {"peers": {"tables": {"Every file": ROWS, "Float models": FLOAT}}}}))
    bp.main(["--chart", str(results), str(tmp_path / "chart.png")])
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_ratio_headline_summarises_each_contender_over_models(bp):
    rows = [dict(r) for r in ROWS] + [dict(ROWS[4], model="mlp", latency_vs_converter=0.98, size_vs_converter=1.0)]
    by = {(r["contender"], r["scheme"]): r for r in bp.ratio_rows(rows)}
    auto = by[("kq_ptq_auto", "W8A8")]
    assert auto["models"] == 2
    assert auto["latency_vs_converter"] == "1 (0.98 .. 1.02)"  # median, min .. max
    assert auto["size_vs_converter"] == "1.04 (1 .. 1.08)"
    assert by[("ort_minmax", "W4A4")]["models"] == 0 and "size_vs_converter" not in by[("ort_minmax", "W4A4")]
