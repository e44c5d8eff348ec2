"""PTQ ranges of residual Add inputs: the first input an Add alone reads spans the Add's output range,
as in the TFLite converter's own files (checked against the real converter)."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from tests.benchmarks import load_benchmark
from tests.layers import ProbeCalibration

L = keras.layers


def residual_model():
    """Four Adds: conv -> BN -> Dropout -> Add (the EfficientNet tail); Add([skip read twice, conv]) (MobileNetV2);
    Add([conv, conv]) (ResNetV2's first block: only the first is widened); Add([max pool, conv]) (nothing)."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(6, 3, padding="same", name="stem")(inp)
    b = L.Conv2D(6, 1, name="project_conv")(h)
    b = L.BatchNormalization(name="project_bn")(b)
    b = L.Dropout(0.2, name="drop")(b)
    h2 = L.Add(name="add_tail")([b, h])  # h is also read by project_conv
    c = L.Conv2D(6, 1, name="branch2")(h2)
    h3 = L.Add(name="add_second")([h2, c])  # h2 is also read by branch2: the second input is the first sole one
    s1 = L.Conv2D(6, 1, name="short_a")(h3)
    s2 = L.Conv2D(6, 3, padding="same", name="short_b")(h3)
    h4 = L.Add(name="add_pair")([s1, s2])
    p = L.MaxPooling2D(1, name="pool")(h4)
    d = L.Conv2D(6, 1, name="after_pool")(h4)
    h5 = L.Add(name="add_pool")([p, d])
    out = L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(h5))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    model.get_layer("project_bn").set_weights(
        [rng.uniform(0.1, 0.3, 6), rng.normal(size=6) * 0.1, rng.normal(size=6) * 0.1, rng.uniform(0.2, 1, 6)])
    # small branches on a large skip: each sum spans more than the branch that is added to it
    for name, factor in (("stem", 4.0), ("branch2", 0.2), ("short_a", 0.2), ("after_pool", 0.2)):
        layer = model.get_layer(name)
        layer.set_weights([w * factor for w in layer.get_weights()])
    return model


@pytest.fixture(scope="module")
def calibrated():
    model = residual_model()
    x = np.random.default_rng(1).normal(size=(48, 8, 8, 3)).astype("float32")
    probe = ProbeCalibration(model, x)  # min-max of every layer output, on any backend
    return model, x, probe


def ends(qmodel, name):
    wrapper = qmodel.get_layer(name)
    spec = wrapper.quant_config.activations
    scale, zero_point = (float(np.asarray(v).reshape(-1)[0]) for v in wrapper.output_qparams)
    return (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale, scale


def test_the_first_sole_input_spans_the_add_range(calibrated):
    model, _, result = calibrated
    qmodel = kq.quantize_model(model, calibration=result)
    widened = {"project_conv": ("project_bn", "add_tail"), "branch2": ("branch2", "add_second"),
               "short_a": ("short_a", "add_pair")}
    for name, (own, add) in widened.items():
        lo, hi, step = ends(qmodel, name)
        want_lo = min(result.ranges[own][0], result.ranges[add][0], 0.0)
        want_hi = max(result.ranges[own][1], result.ranges[add][1], 0.0)
        assert abs(lo - want_lo) <= step and abs(hi - want_hi) <= step, (name, lo, hi, want_lo, want_hi)
        assert hi - lo > result.ranges[own][1] - min(result.ranges[own][0], 0.0) + step, name  # wider than its own
    for name in ("short_b", "after_pool"):  # the second of two sole inputs; an Add whose first sole input is a pool
        lo, hi, step = ends(qmodel, name)
        assert abs(lo - min(result.ranges[name][0], 0.0)) <= step and abs(hi - result.ranges[name][1]) <= step, name

    own = kq.quantize_model(model, calibration=result, shared_merges=(keras.layers.Concatenate,))
    lo, hi, step = ends(own, "project_conv")
    own_lo, own_hi = result.ranges["project_bn"]
    assert abs(lo - min(own_lo, 0.0)) <= step and abs(hi - own_hi) <= step


@pytest.mark.tensorflow
@pytest.mark.slow
def test_the_file_holds_the_converters_add_input_scales(calibrated, tmp_path):
    """Every ADD input's scale in kq's file is the one the converter's own file holds, on the same samples."""
    from ai_edge_litert.interpreter import Interpreter

    model, x, result = calibrated
    qmodel = kq.quantize_model(model, calibration=result)
    kq.export_tflite(qmodel, tmp_path / "kq.tflite")
    bench = load_benchmark("bench_export")
    (tmp_path / "conv.tflite").write_bytes(bench.converter_int8_bytes(bench._concrete_function(model), x))

    def add_scales(path):
        it = Interpreter(str(path))
        details = {t["index"]: t["quantization"][0] for t in it.get_tensor_details()}
        return [[details[i] for i in [*op["inputs"][:2], op["outputs"][0]]]
                for op in it._get_ops_details() if op["op_name"] == "ADD"]

    ours, theirs = add_scales(tmp_path / "kq.tflite"), add_scales(tmp_path / "conv.tflite")
    assert len(ours) == len(theirs) == 4
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # the tail, the second and the pair's first input are on the sum's grid; the pool's Add keeps its own
    assert [[abs(a - add) < 1e-6 * add for a in (a0, a1)] for a0, a1, add in ours] == [
        [True, False], [False, True], [True, False], [False, False]]
