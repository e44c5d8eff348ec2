"""The zoo benchmark's parts: MAC counting, fidelity in steps, target judging, one model through the stages.

No timing assertions; the stage runner may record failures today (that is what the benchmark
shows), it must only never raise.
"""

import collections

import numpy as np
import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bz():
    return load_benchmark("bench_zoo")


T = collections.namedtuple("T", "shape type constant")


# MACs ---------------------------------------------------------------------------------------
def test_op_macs_from_shapes(bz):
    tensors = {
        0: T((1, 6, 6, 2), "INT8", False), 1: T((4, 3, 3, 2), "INT8", True), 2: T((1, 4, 4, 4), "INT8", False),
        3: T((1, 3, 3, 4), "INT8", True), 4: T((1, 2, 2, 4), "INT8", False),
        5: T((1, 16), "INT8", False), 6: T((3, 16), "INT8", True), 7: T((1, 3), "INT8", False),
        # TRANSPOSE_CONV: (output shape, weights (Cout, kh, kw, Cin), input)
        8: T((4,), "INT32", True), 9: T((5, 2, 2, 4), "INT8", True), 10: T((1, 3, 3, 4), "INT8", False),
        11: T((1, 6, 6, 5), "INT8", False),
        # BATCH_MATMUL (2, 5, 7) x (2, 7, 3) -> (2, 5, 3)
        12: T((2, 5, 7), "FLOAT32", False), 13: T((2, 7, 3), "FLOAT32", False), 14: T((2, 5, 3), "FLOAT32", False),
        15: T((2, 7, 5), "FLOAT32", False),
    }
    assert bz.op_macs("CONV_2D", tensors, (0, 1, -1), (2,)) == (4 * 4 * 4 * 3 * 3 * 2, 0)
    assert bz.op_macs("DEPTHWISE_CONV_2D", tensors, (2, 3, -1), (4,)) == (2 * 2 * 4 * 3 * 3, 2)
    assert bz.op_macs("FULLY_CONNECTED", tensors, (5, 6, -1), (7,)) == (3 * 16, 5)
    assert bz.op_macs("TRANSPOSE_CONV", tensors, (8, 9, 10, -1), (11,)) == (3 * 3 * 4 * 5 * 2 * 2, 10)
    assert bz.op_macs("BATCH_MATMUL", tensors, (12, 13), (14,)) == (2 * 5 * 3 * 7, 12)
    adj = collections.namedtuple("Opt", "adjX adjY")(True, False)
    assert bz.op_macs("BATCH_MATMUL", tensors, (15, 13), (14,), adj) == (2 * 5 * 3 * 7, 15)
    assert bz.op_macs("ADD", tensors, (0, 0), (0,)) == (0, None)


@pytest.fixture(scope="module")
def tiny_files(bz):
    """A tiny float model (Conv2D 3x3 on 6x6x2 -> 4, DepthwiseConv2D 3x3, Dense 3) and the TFLite
    converter's float and full-integer files of it (the benchmark's own converter recipe)."""
    import keras
    import tensorflow as tf

    import bench_export

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.DepthwiseConv2D(3),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    x = np.random.default_rng(0).random((16, 6, 6, 2)).astype("float32")
    cf = bench_export._concrete_function(model)
    float_bytes = tf.lite.TFLiteConverter.from_concrete_functions([cf]).convert()
    return float_bytes, bench_export.converter_int8_bytes(cf, x)


# Conv 4*4*4 outputs x 3*3*2, depthwise 2*2*4 outputs x 3*3, dense 3 outputs x 16 inputs.
TINY_MACS = 4 * 4 * 4 * 18 + 2 * 2 * 4 * 9 + 3 * 16


@pytest.mark.tensorflow
def test_mac_figures_of_an_int8_file(bz, tiny_files):
    figs = bz.mac_figures(tiny_files[1])
    assert figs["macs"] == TINY_MACS
    assert figs["int_macs"] == TINY_MACS
    assert figs["int_mac_share"] == 1.0
    assert figs["float_ops"] == 0


@pytest.mark.tensorflow
def test_mac_figures_of_a_float_file(bz, tiny_files):
    figs = bz.mac_figures(tiny_files[0])
    assert figs["macs"] == TINY_MACS
    assert figs["int_macs"] == 0 and figs["int_mac_share"] == 0.0
    assert figs["float_ops"] >= 3  # conv, depthwise, fully connected at least
    assert "CONV_2D" in figs["float_op_names"]


@pytest.mark.tensorflow
def test_mac_figures_count_the_ops_inside_loop_bodies(bz):
    import keras
    import tensorflow as tf

    import bench_export

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5, 3), batch_size=1), keras.layers.GRU(4), keras.layers.Dense(2)])
    data = tf.lite.TFLiteConverter.from_concrete_functions([bench_export._concrete_function(model)]).convert()
    figs = bz.mac_figures(data)  # a WHILE loop: its body is a second subgraph
    assert figs["macs"] >= 4 * 2  # the head at least; the recurrent FULLY_CONNECTEDs inside the body too
    assert figs["float_ops"] > 1 and "WHILE" not in figs["float_op_names"]


# Fidelity -----------------------------------------------------------------------------------
def test_paired_counts(bz):
    """Which test samples one file gets right and the other wrong: the difference of accuracies, paired."""
    y = np.array([0, 1, 2, 1])
    a = np.eye(3)[[0, 1, 0, 0]]  # right, right, wrong, wrong
    b = np.eye(3)[[0, 0, 2, 0]]  # right, wrong, right, wrong
    assert bz.paired_counts(bz.zoo_models.get("MobileNet"), a, b, y) == (1, 1)
    assert bz.paired_counts(bz.zoo_models.get("UNet"), a, b, y) is None  # pixel accuracy: not paired per sample


def test_sign_test_p(bz):
    assert bz.sign_test_p(0, 0) == 1.0 and bz.sign_test_p(4, 4) == 1.0
    assert bz.sign_test_p(0, 3) == pytest.approx(0.25)  # 2 * (1/2)**3
    assert bz.sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert bz.sign_test_p(3, 0) == bz.sign_test_p(0, 3)
    assert 0.1 < bz.sign_test_p(31, 45) < 0.15 and bz.sign_test_p(1040, 1241) < 1e-4


def test_float_fidelity_agreement_and_sqnr(bz):
    """How closely a file follows its float model: top-1 agreement (thresholded pixels for a mask) and SQNR."""
    from keras_quant.analysis import error_stats

    float_out = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    file_out = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5], [0.45, 0.45, 0.1]])
    agree, sqnr = bz.float_fidelity(bz.zoo_models.get("MobileNet"), file_out, float_out)
    assert agree == pytest.approx(3 / 4)  # sample 1 moves to class 2; the tie in sample 3 goes to class 0
    noise = np.sum((file_out - float_out) ** 2)
    assert sqnr == pytest.approx(10 * np.log10(np.sum(float_out ** 2) / noise))
    assert sqnr == pytest.approx(error_stats(float_out, file_out).sqnr_db)
    mask_agree, _ = bz.float_fidelity(bz.zoo_models.get("UNet"), np.array([[0.6, 0.4]]), np.array([[0.7, 0.6]]))
    assert mask_agree == pytest.approx(0.5)


def test_fidelity_steps_on_known_arrays(bz):
    keras_out = np.zeros((100, 2))
    file_out = np.zeros((100, 2))
    file_out[0, 0] = 0.5  # 5 steps of 0.1
    file_out[1:3, 1] = -0.1  # 1 step
    p99, mx = bz.fidelity_steps(file_out, keras_out, 0.1)
    assert mx == pytest.approx(5.0)
    assert p99 == pytest.approx(np.percentile(np.abs(file_out).reshape(-1) / 0.1, 99))
    assert bz.fidelity_steps(keras_out, keras_out, 0.1) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bz.fidelity_steps(file_out, keras_out, None)
    with pytest.raises(ValueError):
        bz.fidelity_steps(file_out[:5], keras_out, 0.1)


# Targets ------------------------------------------------------------------------------------
def _good_row(bz, name):
    row = {"model": name, "converter": "ok", "int_mac_share": 1.0, "float_ops": 0, "fid_p99_steps": 1.0,
           "fid_max_steps": 2.0, "acc_kq_minus_converter": 0.0, "latency_vs_converter": 1.0,
           "size_vs_converter": 1.01, "time_vs_converter": 1.5}
    row.update({s: "ok" for s in bz.STAGES})
    return row


def test_judge_row_met_and_missed(bz):
    good = bz.judge_row(_good_row(bz, "a"))
    assert {k: v for k, v in good.items() if k != "model"} == {
        "all_stages": "met", "fully_integer": "met", "fidelity": "met", "accuracy_vs_converter": "met",
        "latency_vs_converter": "met", "size_vs_converter": "met", "time_vs_converter": "met"}
    bad = _good_row(bz, "b")
    bad.update(onnx="ExportError: no", int_mac_share=0.9, float_ops=3, fid_p99_steps=2.0000001, fid_max_steps=7,
               acc_kq_minus_converter=-0.01, latency_vs_converter=1.2, size_vs_converter=1.06, time_vs_converter=2.5)
    v = bz.judge_row(bad)
    assert v["all_stages"] == v["fully_integer"] == v["fidelity"] == "missed"
    assert v["accuracy_vs_converter"] == v["latency_vs_converter"] == "missed"
    assert v["size_vs_converter"] == v["time_vs_converter"] == "missed"
    # On the grid: 2 steps up to float rounding is within 2.
    edge = _good_row(bz, "c")
    edge.update(fid_p99_steps=2.0000001, fid_max_steps=6.0)
    assert bz.judge_row(edge)["fidelity"] == "met"


def test_judge_row_without_converter_or_file(bz):
    row = {"model": "x", "converter": "ConverterError: boom"}
    row.update({s: "ok" for s in bz.STAGES})
    row.update(int_mac_share=1.0, float_ops=0, fid_p99_steps=0.0, fid_max_steps=1.0)
    v = bz.judge_row(row)
    assert v["all_stages"] == "met" and v["fully_integer"] == "met"
    assert v["accuracy_vs_converter"] is None and v["time_vs_converter"] is None  # nothing to compare with
    crashed = {"model": "y", "converter": "ok", "calibrate": "ok", "ptq": "TypeError: t"}
    v = bz.judge_row(crashed)
    assert v["all_stages"] == v["fully_integer"] == v["fidelity"] == "missed"
    assert v["latency_vs_converter"] == "missed"  # the converter converts, kq has no file


def test_judge_summary_counts(bz):
    rows = [_good_row(bz, f"m{i}") for i in range(17)]
    _, summary = bz.judge(rows)
    assert all(s["status"] == "met" for s in summary), summary
    rows[0]["qat"] = "RuntimeError: x"
    rows[1].update(converter="ConverterError: y")
    for r in rows[2:6]:
        r["float_ops"] = 2
    _, summary = bz.judge(rows)
    assert summary[0]["value"] == "16/17" and summary[0]["status"] == "missed"
    assert summary[1]["value"] == "13/17" and summary[1]["status"] == "met"  # >= 13 fully integer
    assert summary[3]["value"] == "16/16" and summary[3]["status"] == "met"  # converter-relative: 16 judged


# Stage runner -------------------------------------------------------------------------------
TINY_CFG = {"train": {t: (None, 1) for t in ("image", "mask", "tokens", "signal")}, "test": 16, "calib": 16,
            "fid": 8, "qat_samples": 32, "qat_epochs": 2, "rounds": 1, "round_s": 0.001, "warmup": 1}


@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.parametrize("name, size", [("Conv1D_audio", 32), ("UNet", 16)])
def test_one_model_through_the_stages(bz, tmp_path, name, size):
    import zoo_models

    zm = zoo_models.MODELS[name]
    x, y = zoo_models.synthetic(zm, 48, size)
    seen = []
    row = bz.run_model(zm, TINY_CFG, str(tmp_path), log=lambda m: None, size=size,
                       data=(x[:32], y[:32], x[32:], y[32:], "synthetic"), progress=lambda r: seen.append(dict(r)))
    assert seen, "progress was never reported"
    assert "error" not in row, row.get("error")
    assert row["model"] == name and row["acc_float"] is not None
    for stage in bz.STAGES:
        assert isinstance(row[stage], str) and row[stage] not in (bz.NOT_RUN, "running"), (stage, row[stage])
    assert row["converter"] == "ok"
    if row["tflite"] == "ok":
        assert 0.0 <= row["int_mac_share"] <= 1.0 and row["size_kq_kb"] > 0
        assert 0.0 <= row["agree_kq"] <= 1.0 and np.isfinite(row["sqnr_kq_db"])
    assert 0.0 <= row["agree_converter"] <= 1.0 and "sqnr_converter_db" in row
    tables = bz.stage_rows([row]), bz.figure_rows([row]), bz.error_rows([row]), bz.judge([row])
    assert tables[0][0]["model"] == name


def test_zoo_has_the_seventeen_models():
    zoo_models = load_benchmark("zoo_models")

    assert len(zoo_models.MODELS) == 17
    assert set(zoo_models.QUICK_MODELS) <= set(zoo_models.MODELS)
    assert zoo_models.MODELS["Xception"].size >= 71 and zoo_models.MODELS["InceptionV3"].size >= 75


def test_rows_from_log_reads_finished_rows(bz):
    import json

    row = _good_row(bz, "m")
    text = "noise\n  " + bz.ROW_PREFIX + json.dumps(row) + "\n[zoo] other\n"
    rows = bz.rows_from_log(text)
    assert rows == [row]
    rerun = dict(row, qat="ok", params=5)
    other = _good_row(bz, "n")
    text2 = text + bz.ROW_PREFIX + json.dumps(other) + "\n" + bz.ROW_PREFIX + json.dumps(rerun) + "\n"
    assert bz.rows_from_log(text2) == [rerun, other]  # the rerun's row, in the first run's place
    stage_table, tables = bz.tables_for(rows)
    assert stage_table[0]["model"] == "m" and tables["Targets"][0]["value"] == "1/1"
