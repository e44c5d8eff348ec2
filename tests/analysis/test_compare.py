"""Tests for keras_quant.analysis.compare_models (Keras and ONNX on any backend; TFLite on TensorFlow)."""

import json

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.analysis import ModelComparison, compare_models, predicted_classes
from keras_quant.errors import ConfigError, NoDataError, ShapeMismatchError
from tests.test_runtime import IN, OUT, QUIET, data, dense_model, onnx_dense, onnx_fake_quant, tflite_bytes

pytestmark = QUIET


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x)).astype(np.float64)


def test_identical_models_agree_fully():
    model = dense_model()
    x = data(20)
    labels = np.argmax(outputs(model, x), axis=-1)
    labels[:5] = (labels[:5] + 1) % OUT  # 75% accuracy for both
    r = compare_models(model, model, x, labels=labels, latency_runs=3)
    assert isinstance(r, ModelComparison)
    assert (r.reference, r.candidate, r.num_samples) == (model.name, model.name, 20)
    assert r.argmax_agreement == 1.0
    assert r.max_abs_diff == 0.0 and r.mean_abs_diff == 0.0 and r.max_diff_steps is None
    assert r.reference_accuracy == r.candidate_accuracy == 0.75 and r.accuracy_drop == 0.0
    assert r.reference_size_bytes == r.candidate_size_bytes == 4 * (IN * 8 + 8 + 8 * OUT + OUT)
    assert r.compression == 1.0
    assert r.reference_latency_s > 0 and r.candidate_latency_s > 0
    assert r.speedup == pytest.approx(r.reference_latency_s / r.candidate_latency_s)
    with pytest.raises(AttributeError):
        r.num_samples = 3  # frozen


def test_different_models_match_a_hand_computed_reference():
    ref_model, cand_model = dense_model(seed=0), dense_model(seed=3)
    x = data(30)
    a, b = outputs(ref_model, x), outputs(cand_model, x)
    labels = np.arange(30) % OUT
    one_hot = np.eye(OUT)[labels]
    r = compare_models(ref_model, cand_model, x, labels=labels, latency_runs=0, batch_size=7)
    assert r.argmax_agreement == pytest.approx(np.mean(a.argmax(-1) == b.argmax(-1)))
    assert r.max_abs_diff == pytest.approx(np.abs(a - b).max(), rel=1e-5)
    assert r.mean_abs_diff == pytest.approx(np.abs(a - b).mean(), rel=1e-5)
    assert r.reference_accuracy == pytest.approx(np.mean(a.argmax(-1) == labels))
    assert r.candidate_accuracy == pytest.approx(np.mean(b.argmax(-1) == labels))
    assert r.accuracy_drop == pytest.approx(r.reference_accuracy - r.candidate_accuracy)
    assert r.reference_latency_s is None and r.candidate_latency_s is None and r.speedup is None
    with_one_hot = compare_models(ref_model, cand_model, x, labels=one_hot, latency_runs=0)
    assert with_one_hot.candidate_accuracy == r.candidate_accuracy


def test_keras_against_a_qdq_onnx_file_counts_steps(tmp_path):
    model = dense_model()
    scale, zero_point = 0.05, -3  # [-6.25, 6.5] holds every output
    path = onnx_dense(tmp_path / "qdq.onnx", model, output_q=(scale, zero_point))
    x = data(25)
    assert np.abs(outputs(model, x)).max() < 6
    r = compare_models(model, str(path), x, latency_runs=2, num_threads=1)
    expected = np.abs(onnx_fake_quant(outputs(model, x), scale, zero_point) - outputs(model, x))
    assert r.candidate == "qdq.onnx"
    assert r.max_abs_diff == pytest.approx(expected.max(), rel=1e-4)
    assert r.max_diff_steps == pytest.approx(expected.max() / scale, rel=1e-4)
    assert 0 < r.max_diff_steps <= 0.5 + 1e-4  # inside the range: half a step at most
    assert r.candidate_size_bytes == path.stat().st_size
    assert r.compression == pytest.approx(r.reference_size_bytes / path.stat().st_size)
    # The reference's grid is used when the candidate has none.
    swapped = compare_models(path, model, x, latency_runs=0)
    assert swapped.max_diff_steps == pytest.approx(r.max_diff_steps)


@pytest.mark.parametrize(
    "output, threshold, expected",
    [
        ([[0.1, 0.9, 0.0], [3.0, -1.0, 2.0]], 0.0, [1, 0]),
        ([[0.7], [0.2], [0.5]], 0.5, [1, 0, 0]),
        ([[1.5], [-0.2]], 0.0, [1, 0]),
        ([0.3, -0.3], 0.0, [1, 0]),
        ([[[0.0, 1.0], [2.0, 1.0]]], 0.0, [[1, 0]]),
    ],
)
def test_predicted_classes(output, threshold, expected):
    assert predicted_classes(np.array(output), threshold).tolist() == expected


def test_single_unit_outputs_use_a_probability_or_logit_threshold():
    logits = dense_model(units=1)
    x = data(40)
    weights = logits.get_weights()
    weights[-1] -= np.median(outputs(logits, x))  # about half the samples on each side
    logits.set_weights(weights)
    probs = dense_model(units=1, activation="sigmoid")
    probs.set_weights(weights)
    z, p = outputs(logits, x)[:, 0], outputs(probs, x)[:, 0]
    labels = (z > 0).astype(int)
    assert 0 < labels.mean() < 1 and p.min() >= 0 and p.max() <= 1
    r = compare_models(probs, probs, x, labels=labels, latency_runs=0)  # threshold 0.5
    assert r.argmax_agreement == 1.0 and r.reference_accuracy == 1.0
    r = compare_models(logits, logits, x, labels=labels.astype(float)[:, None], latency_runs=0)  # threshold 0
    assert r.reference_accuracy == 1.0


def test_errors_name_the_field():
    model = dense_model()
    with pytest.raises(NoDataError) as e:
        compare_models(model, model, np.zeros((0, IN), "float32"))
    assert e.value.field == "data"
    with pytest.raises(NoDataError):
        compare_models(model, model, None)
    with pytest.raises(ShapeMismatchError) as e:
        compare_models(model, dense_model(units=2), data(), latency_runs=0)
    assert e.value.field == "candidate output" and e.value.expected == (7, OUT) and e.value.actual == (7, 2)
    with pytest.raises(ShapeMismatchError) as e:
        compare_models(model, model, data(), labels=np.zeros(3), latency_runs=0)
    assert e.value.field == "labels"
    with pytest.raises(ConfigError) as e:
        compare_models(model, model, data(), latency_runs=-1)
    assert e.value.field == "latency_runs"
    with pytest.raises(ConfigError) as e:
        compare_models(model, "model.h5", data())
    assert e.value.field == "artifact"


def test_to_dict_and_table():
    model = dense_model()
    r = kq.analysis.compare_models(model, model, data(), labels=np.zeros(7, int), latency_runs=2)
    d = r.to_dict()
    assert list(d) == [f.name for f in r.__dataclass_fields__.values()]
    assert json.loads(json.dumps(d)) == d
    assert all(v is None or type(v) in (int, float, str) for v in d.values())
    text = str(r)
    assert text == r.format()
    assert text.splitlines()[0] == f"{model.name} (reference) vs {model.name} (candidate), 7 samples"
    for row in ("accuracy", "size (bytes)", "latency (ms)", "argmax agreement", "max |diff|", "compression 1x"):
        assert row in text


@pytest.mark.tensorflow
def test_keras_against_int8_tflite(tmp_path):
    model = dense_model()
    path = tmp_path / "int8.tflite"
    path.write_bytes(tflite_bytes(model, mode="int8"))
    float_path = tmp_path / "float.tflite"
    float_path.write_bytes(tflite_bytes(model))
    x = data(40)
    labels = np.argmax(outputs(model, x), axis=-1)
    r = compare_models(model, path, x, labels=labels, latency_runs=3)
    scale = kq.runtime.load(path).output_quantization[0]
    assert r.candidate == "int8.tflite" and r.reference_accuracy == 1.0
    assert r.max_diff_steps == pytest.approx(r.max_abs_diff / scale)
    assert r.max_diff_steps <= 2
    assert r.argmax_agreement >= 0.9 and r.accuracy_drop == pytest.approx(1.0 - r.candidate_accuracy)
    assert r.candidate_size_bytes == path.stat().st_size and r.candidate_latency_s > 0
    files = compare_models(float_path, path, x, latency_runs=0)
    assert files.compression == pytest.approx(float_path.stat().st_size / path.stat().st_size)
    assert files.max_diff_steps == pytest.approx(r.max_diff_steps, abs=1e-3)  # float TFLite == Keras
