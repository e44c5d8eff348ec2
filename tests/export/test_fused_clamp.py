"""4-bit activations in int8 TFLite files: the clamp ops folded away, the integers unchanged.

The reference is the plain converted form (the spec's zero point, a MAXIMUM and a MINIMUM op per
4-bit tensor), given keras_quant's weight scales as `export_tflite` does but not rewritten by
`kq.export.clamps`; the new file must compute the same integers (each output's `q - zero_point`)
under LiteRT's builtin kernels and under the XNNPACK delegate.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import keras
import keras_quant as kq
from keras_quant import runtime
from keras_quant.cli import datasets
from keras_quant.export import clamps
from tests.export import models

L = keras.layers
W4A4 = dict(weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel"), activations=kq.QuantSpec(bits=4))


def _sequential():
    """Conv+BN+ReLU, DepthwiseConv+BN+ReLU6, 1x1 Conv+BN+ReLU, MaxPool, Flatten, Dense+ReLU, Dense."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(8, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(),
        L.DepthwiseConv2D(3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(6.0),
        L.Conv2D(12, 1, use_bias=False), L.BatchNormalization(), L.ReLU(),
        L.MaxPooling2D(2), L.Flatten(), L.Dense(16, activation="relu"), L.Dense(10),
    ], name="seq_w4a4")


def _branches():
    """4-bit tensors into CONCATENATION, AVERAGE_POOL_2D (raw-integer rounding: not moved), ADD and SOFTMAX."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 1))
    a = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    b = L.Conv2D(8, 3, padding="same", activation="relu6")(a)
    c = L.Conv2D(8, 1, padding="same")(L.MaxPooling2D(1)(a))
    m = L.AveragePooling2D(2)(L.Concatenate()([b, c]))
    m = L.Add()([m, L.Conv2D(16, 1, activation="relu")(m)])
    return keras.Model(inp, L.Dense(10, activation="softmax")(L.Flatten()(m)), name="branches")


@pytest.fixture(scope="module")
def data():
    (x, _), (x_test, _) = datasets.load_digits()
    return x[:256], x_test[:160]


def _quantized(model, x):
    return kq.quantize_model(model, kq.QuantConfig(**W4A4), calibration=models.calibrate(model, x))


@pytest.fixture(scope="module")
def qmodels(data):
    x, _ = data
    model, _, _ = models.trained()
    return {"cnn": _quantized(model, x), "sequential": _quantized(_sequential(), x),
            "branches": _quantized(_branches(), x)}


def reference_bytes(qmodel):
    """The plain W4A4 file: both clamps as MAXIMUM / MINIMUM ops, the 4-bit integers at the spec's zero point."""
    from keras_quant.export.tflite import tflite_bytes

    return tflite_bytes(qmodel, "int8", input_type="int8", output_type="int8", fold_clamps=False)[0]


def integer_outputs(content, x, delegate):
    """`q - zero_point` of the file's output for each sample, batch 1, int8 input."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=bytes(content), num_threads=1, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    (s, z), zo = inp["quantization"], out["quantization"][1]
    found = []
    for sample in x:
        it.set_tensor(inp["index"], np.clip(np.round(sample[None] / s) + z, -128, 127).astype(np.int8))
        it.invoke()
        found.append(it.get_tensor(out["index"]).astype(np.int32) - zo)
    return np.concatenate(found)


@pytest.fixture(scope="module")
def files(qmodels, tmp_path_factory):
    folder = tmp_path_factory.mktemp("w4a4")
    out = {}
    for name, qmodel in qmodels.items():
        report = kq.export_tflite(qmodel, folder / f"{name}.tflite")
        out[name] = (folder / f"{name}.tflite", report, reference_bytes(qmodel))
    return out


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "sequential"])
def test_no_minimum_and_a_maximum_only_below_zero(qmodels, files, name):
    """No MINIMUM op (int8 saturation is the 4-bit maximum); a clamp op stays only where the grid's minimum is
    below 0 and no fused activation reaches it (a pre-Add or logits tensor), or on the graph's input."""
    path, report, reference = files[name]
    from keras_quant.export import flatbuffer

    before = [op.name for op in flatbuffer.FlatModel(reference).ops()]
    assert before.count("MINIMUM") >= 5  # the plain form: one per 4-bit tensor
    assert "MINIMUM" not in report.ops
    negative = sum(1 for _, _, zp, bits in report.activations if bits == 4 and zp > -8)
    assert report.ops.get("MAXIMUM", 0) <= negative
    # The input's clamp (no op produces the input) is a 1x1 MAX_POOL_2D with a fused RELU, which XNNPACK runs.
    assert report.ops.get("RELU", 0) == 0 and report.ops.get("RELU6", 0) == 0
    assert any("1x1 MAX_POOL_2D" in n for n in report.notes)
    assert sum(report.ops.get(op, 0) for op in ("MAXIMUM", "MINIMUM", "RELU", "RELU6")) <= negative
    assert any("clamp ops" in n for n in report.notes)
    if name == "sequential":  # every 4-bit tensor but the input and the logits follows a ReLU
        assert report.ops.get("MAXIMUM", 0) <= 1
    assert len(report.ops) and path.stat().st_size == report.size_bytes
    flat = flatbuffer.FlatModel(path.read_bytes())  # the removed ops' tensors are gone too
    used = {i for op in flat.ops() for i in op.inputs + op.outputs if i >= 0} | set(flat.graph.inputs)
    assert used == set(range(len(flat.graph.tensors)))


@pytest.mark.tensorflow
@pytest.mark.slow
def test_grids_an_op_reads_in_raw_integers_keep_their_clamps(files):
    """The concatenated and average-pooled tensors keep their zero point and MINIMUM; the others lose theirs."""
    _, report, reference = files["branches"]
    from keras_quant.export import flatbuffer

    before = [op.name for op in flatbuffer.FlatModel(reference).ops()].count("MINIMUM")
    assert 0 < report.ops.get("MINIMUM", 0) < before
    assert any("top of int8" in n for n in report.notes)


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "sequential", "branches"])
@pytest.mark.parametrize("delegate", [True, False], ids=["xnnpack", "builtin"])
def test_same_integers_as_the_plain_file(data, files, name, delegate):
    _, x_test = data
    path, _, reference = files[name]
    np.testing.assert_array_equal(integer_outputs(path.read_bytes(), x_test, delegate),
                                  integer_outputs(reference, x_test, delegate))


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "sequential", "branches"])
def test_the_file_agrees_with_the_keras_model(data, qmodels, files, name):
    _, x_test = data
    runner = runtime.load(files[name][0])
    got, want = runner.predict(x_test), qmodels[name].predict(x_test, verbose=0)
    if name != "branches":  # untrained: its softmax outputs are near ties
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97
    assert models.within_steps(want, got, runner.output_quantization[0])


@settings(max_examples=200, deadline=None)
@given(scale=st.floats(1e-4, 10.0).map(np.float32), zero_point=st.integers(-128, 127))
def test_relu_bounds_agree_across_runtimes(scale, zero_point):
    """A RELU's floor is the zero point in both runtimes; RELU6's ceiling is exact unless 6 / scale is a tie."""
    assert clamps.activation_bounds(0.0, None, scale, zero_point, exact=True) == (zero_point, 127)
    q = 6.0 / float(scale)
    bounds = clamps.activation_bounds(0.0, 6.0, scale, zero_point, exact=True)
    if abs(q - np.floor(q) - 0.5) > 1e-3:
        want = int(np.clip(zero_point + np.floor(q + 0.5), -128, 127))
        assert bounds == (zero_point, want)
    wide = clamps.activation_bounds(0.0, 6.0, scale, zero_point)
    assert bounds is None or bounds == wide


def test_a_tie_is_not_used_as_a_fused_bound():
    """6 / 12 = 0.5: TFLite rounds it to 1 (halves away from zero), XNNPACK to 0 (to even)."""
    assert clamps.activation_bounds(0.0, 6.0, np.float32(12.0), 0, exact=True) is None
    assert clamps.activation_bounds(0.0, 6.0, np.float32(12.0), 0) == (0, 1)
    assert clamps.activation_bounds(0.0, 6.0, np.float32(0.4), 5, exact=True) == (5, 20)
