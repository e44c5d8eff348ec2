"""kq.export_tflite(weight_storage="int4" / "int4_xnnpack"): 4-bit weights as packed TFLite INT4 tensors.

Checked in LiteRT itself: the tensor types of the file, its outputs against the int8-storage file
(the same integers: identical under the builtin kernels, and under the XNNPACK delegate where it
takes the INT4 ops), and the file size.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import keras
import keras_quant as kq
from keras_quant.cli import datasets
from keras_quant.errors import ConfigError
from keras_quant.export import flatbuffer
from tests.export import models
from tests.export.test_fused_clamp import integer_outputs

L = keras.layers


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(-8, 7), min_size=0, max_size=41))
def test_pack_int4_round_trips(values):
    q = np.asarray(values, np.int8)
    packed = flatbuffer.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == (q.size + 1) // 2
    np.testing.assert_array_equal(flatbuffer.unpack_int4(packed, q.shape), q)


def test_pack_int4_puts_the_first_value_in_the_low_nibble():
    """LiteRT's UnpackDenseInt4IntoInt8 reads element 2i from the low nibble, 2i+1 from the high one."""
    np.testing.assert_array_equal(flatbuffer.pack_int4([1, -2, 7]), np.array([0xE1, 0x07], np.uint8))
    with pytest.raises(ValueError, match="-8, 7"):
        flatbuffer.pack_int4([8])


def _mlp():
    keras.utils.set_random_seed(5)
    return keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(255, activation="relu"),
                             L.Dense(97, activation="relu"), L.Dense(10)], name="mlp_int4")


def _convnet():
    keras.utils.set_random_seed(6)
    return keras.Sequential([
        keras.Input((8, 8, 1)), L.Conv2D(16, 3, padding="same", activation="relu"),
        L.DepthwiseConv2D(3, padding="same", activation="relu"), L.Conv2D(24, 1, activation="relu"),
        L.GlobalAveragePooling2D(), L.Dense(13, activation="relu"), L.Dense(10)], name="conv_int4")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`{(model, activation bits, weight_storage): (path, report)}` and the test images."""
    (x, _), (x_test, _) = datasets.load_digits()
    folder = tmp_path_factory.mktemp("int4")
    out = {}
    for name, build in (("mlp", _mlp), ("conv", _convnet)):
        model = build()
        calibration = models.calibrate(model, x[:256])
        for abits in (8, 4):
            config = kq.QuantConfig(weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel"),
                                    activations=kq.QuantSpec(bits=abits))
            qmodel = kq.quantize_model(model, config, calibration=calibration)
            for storage in ("int8", "int4", "int4_xnnpack"):
                path = folder / f"{name}_a{abits}_{storage}.tflite"
                out[(name, abits, storage)] = (path, kq.export_tflite(qmodel, path, weight_storage=storage))
    return out, x_test[:96]


def _weight_types(path):
    flat = flatbuffer.FlatModel(path.read_bytes())
    return [(op.name, flat.tensor(op.inputs[1]).type) for op in flat.ops() if op.name in flatbuffer.WEIGHT_OPS]


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_tensor_types_and_report_rows(exported, name):
    files, _ = exported
    for abits in (8, 4):
        types = {s: _weight_types(files[(name, abits, s)][0]) for s in ("int8", "int4", "int4_xnnpack")}
        assert all(t == "INT8" for _, t in types["int8"])
        assert all(t == "INT4" for _, t in types["int4"])
        # XNNPACK reads INT4 FULLY_CONNECTED weights with an even number of inputs (mlp: 64, not 255 or 97).
        even = [(op, t) for op, t in types["int4_xnnpack"] if op == "FULLY_CONNECTED"]
        assert [t for _, t in even] == (["INT4", "INT8", "INT8"] if name == "mlp" else ["INT4", "INT8"])  # 24 in, 13 in
        assert all(t == "INT8" for op, t in types["int4_xnnpack"] if op != "FULLY_CONNECTED")
        for storage in ("int8", "int4"):
            report = files[(name, abits, storage)][1]
            assert {row[2] for row in report.weights} == {storage} and all(row[1] == 4 for row in report.weights)
        mixed = files[(name, abits, "int4_xnnpack")][1]
        assert [row[2] for row in mixed.weights] == [t.lower() for _, t in types["int4_xnnpack"]]
        assert any("INT4" in n for n in mixed.notes) and any("left in int8" in n for n in mixed.notes)


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.parametrize("abits", [8, 4])
def test_outputs_are_the_int8_storage_files(exported, name, abits):
    """Builtin kernels: every INT4 file computes the int8-storage file's integers. XNNPACK: the
    "int4_xnnpack" file too (XNNPACK runs its INT4 FULLY_CONNECTED ops)."""
    files, x_test = exported
    content = {s: files[(name, abits, s)][0].read_bytes() for s in ("int8", "int4", "int4_xnnpack")}
    builtin = integer_outputs(content["int8"], x_test, delegate=False)
    for storage in ("int4", "int4_xnnpack"):
        np.testing.assert_array_equal(integer_outputs(content[storage], x_test, delegate=False), builtin)
    xnnpack = integer_outputs(content["int8"], x_test, delegate=True)
    np.testing.assert_array_equal(integer_outputs(content["int4_xnnpack"], x_test, delegate=True), xnnpack)


@pytest.mark.tensorflow
@pytest.mark.slow
def test_int4_files_are_smaller(exported):
    files, _ = exported
    for abits in (8, 4):
        size = {s: files[("mlp", abits, s)][0].stat().st_size for s in ("int8", "int4", "int4_xnnpack")}
        assert size["int4"] <= 0.6 * size["int8"], size  # weights dominate: nearly half
        assert size["int4"] < size["int4_xnnpack"] < size["int8"], size  # 64x255 INT4, 255x97 and 97x10 int8
        conv = {s: files[("conv", abits, s)][0].stat().st_size for s in ("int8", "int4", "int4_xnnpack")}
        assert conv["int4"] < conv["int4_xnnpack"] < conv["int8"], conv


@pytest.mark.tensorflow
def test_weight_storage_is_checked(tmp_path):
    model = _mlp()
    with pytest.raises(ConfigError, match="weight_storage"):
        kq.export_tflite(model, tmp_path / "x.tflite", mode="float32", weight_storage="int4")
    with pytest.raises(ConfigError, match="weight_storage"):
        kq.export_tflite(model, tmp_path / "x.tflite", mode="int8", weight_storage="int2")
    assert not (tmp_path / "x.tflite").exists()
