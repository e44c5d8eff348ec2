"""keras_quant.data: calibration data from .npy, .npz and image folders (backend-agnostic)."""

import keras
import numpy as np
import pytest
from PIL import Image

from keras_quant.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    conform_array,
    list_images,
    load_calibration_data,
    model_inputs,
    normalize_images,
)
from keras_quant.errors import ConfigError, KerasQuantError, ShapeMismatchError


def _model(shape, name="img"):
    inp = keras.Input(shape, name=name)
    return keras.Model(inp, keras.layers.Flatten()(inp))


def _two_input_model():
    a, b = keras.Input((4,), name="a"), keras.Input((2, 3), name="b")
    out = keras.layers.Concatenate()([a, keras.layers.Flatten()(b)])
    return keras.Model([a, b], out)


def _png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)
    return path


# Model inputs -------------------------------------------------------------------
def test_model_inputs_names_and_shapes():
    assert model_inputs(_model((28, 28, 1))) == [("img", (None, 28, 28, 1))]
    assert model_inputs(_two_input_model()) == [("a", (None, 4)), ("b", (None, 2, 3))]


# .npy ---------------------------------------------------------------------------
def test_npy_float_is_returned_as_float32_unchanged(tmp_path, rng):
    x = rng.normal(size=(5, 6, 6, 3)) * 40.0  # float64, outside [0, 1]: no normalisation
    np.save(tmp_path / "calib.npy", x)
    out = load_calibration_data(tmp_path / "calib.npy", _model((6, 6, 3)), normalize="imagenet")
    assert out.dtype == np.float32 and out.shape == (5, 6, 6, 3)
    np.testing.assert_allclose(out, x.astype(np.float32))


def test_npy_missing_channel_axis_is_added(tmp_path, rng):
    x = rng.random((7, 28, 28)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = load_calibration_data(tmp_path / "calib.npy", _model((28, 28, 1)))
    assert out.shape == (7, 28, 28, 1)
    np.testing.assert_array_equal(out[..., 0], x)


@pytest.mark.parametrize("normalize, expected", [
    ("unit", lambda x: x / 255.0),
    ("none", lambda x: x),
    ("imagenet", lambda x: ((x / 255.0) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)),
])
def test_uint8_arrays_are_pixels_and_get_normalised(tmp_path, rng, normalize, expected):
    x = rng.integers(0, 256, size=(4, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "calib.npy", x)
    out = load_calibration_data(tmp_path / "calib.npy", _model((5, 5, 3)), normalize=normalize)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_other_integer_arrays_are_cast_without_normalisation(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.int32).reshape(2, 3, 3) * 100
    np.save(tmp_path / "calib.npy", x)
    out = load_calibration_data(tmp_path / "calib.npy", _model((3, 3, 1)))
    assert out.dtype == np.float32 and out.shape == (2, 3, 3, 1)
    np.testing.assert_array_equal(out[..., 0], x.astype(np.float32))


def test_none_dimensions_of_the_input_match_anything(tmp_path, rng):
    x = rng.random((3, 10, 4)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    assert load_calibration_data(tmp_path / "calib.npy", _model((None, 4))).shape == (3, 10, 4)


@pytest.mark.parametrize("shape", [(7, 28, 28, 3), (7, 32, 32), (28, 28, 1, 1, 1), (7,)])
def test_wrong_shape_names_expected_and_received(tmp_path, shape):
    np.save(tmp_path / "calib.npy", np.zeros(shape, np.float32))
    with pytest.raises(ShapeMismatchError) as info:
        load_calibration_data(tmp_path / "calib.npy", _model((28, 28, 1)))
    message = str(info.value)
    assert str(shape) in message and "(None, 28, 28, 1)" in message
    assert info.value.expected == (None, 28, 28, 1) and info.value.actual == shape


def test_no_samples_is_an_error(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(ConfigError, match="holds no samples"):
        load_calibration_data(tmp_path / "calib.npy", _model((4,)))


def test_non_numeric_arrays_are_refused(tmp_path):
    np.save(tmp_path / "calib.npy", np.array([["a", "b", "c", "d"]]))
    with pytest.raises(ConfigError, match="must hold numbers"):
        load_calibration_data(tmp_path / "calib.npy", _model((4,)))


def test_pickled_npy_is_not_loaded(tmp_path):
    np.save(tmp_path / "calib.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="cannot read the array file") as info:
        load_calibration_data(tmp_path / "calib.npy", _model((4,)))
    assert info.value.field == "data"


def test_corrupt_npy_is_a_clear_error(tmp_path):
    (tmp_path / "calib.npy").write_bytes(b"not an array at all")
    with pytest.raises(ConfigError, match="cannot read the array file"):
        load_calibration_data(tmp_path / "calib.npy", _model((4,)))


# .npz ---------------------------------------------------------------------------
def test_npz_prefers_x(tmp_path, rng):
    x, y = rng.random((3, 4)).astype(np.float32), rng.random((3, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", y=y, x=x)
    np.testing.assert_array_equal(load_calibration_data(tmp_path / "calib.npz", _model((4,))), x)


def test_npz_single_array_of_any_name(tmp_path, rng):
    data = rng.random((3, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", images=data)
    np.testing.assert_array_equal(load_calibration_data(tmp_path / "calib.npz", _model((4,))), data)


def test_npz_array_named_after_the_input(tmp_path, rng):
    data = rng.random((3, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", labels=np.arange(3), img=data)
    np.testing.assert_array_equal(load_calibration_data(tmp_path / "calib.npz", _model((4,))), data)


def test_npz_ambiguous_lists_the_names(tmp_path):
    np.savez(tmp_path / "calib.npz", first=np.zeros((2, 4)), second=np.ones((2, 4)))
    with pytest.raises(ConfigError) as info:
        load_calibration_data(tmp_path / "calib.npz", _model((4,)))
    assert "['first', 'second']" in str(info.value) and "'x'" in str(info.value)


def test_npz_empty_is_an_error(tmp_path):
    np.savez(tmp_path / "calib.npz")
    with pytest.raises(ConfigError, match="holds no arrays"):
        load_calibration_data(tmp_path / "calib.npz", _model((4,)))


def test_npz_multi_input_by_name(tmp_path, rng):
    a, b = rng.random((6, 4)).astype(np.float32), rng.integers(0, 256, (6, 2, 3), dtype=np.uint8)
    np.savez(tmp_path / "calib.npz", b=b, a=a, y=np.arange(6))
    out = load_calibration_data(tmp_path / "calib.npz", _two_input_model())
    assert sorted(out) == ["a", "b"]
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_allclose(out["b"], b / np.float32(255.0), rtol=1e-6)  # uint8: normalised


def test_npz_multi_input_missing_array_names_inputs(tmp_path):
    np.savez(tmp_path / "calib.npz", a=np.zeros((2, 4)), x=np.zeros((2, 2, 3)))
    with pytest.raises(ConfigError) as info:
        load_calibration_data(tmp_path / "calib.npz", _two_input_model())
    assert "['b']" in str(info.value) and "['a', 'x']" in str(info.value)


def test_npz_multi_input_sample_counts_must_agree(tmp_path):
    np.savez(tmp_path / "calib.npz", a=np.zeros((2, 4)), b=np.zeros((3, 2, 3)))
    with pytest.raises(ConfigError, match="different numbers of samples"):
        load_calibration_data(tmp_path / "calib.npz", _two_input_model())


def test_npz_multi_input_wrong_shape_names_the_array(tmp_path):
    np.savez(tmp_path / "calib.npz", a=np.zeros((2, 5)), b=np.zeros((2, 2, 3)))
    with pytest.raises(ShapeMismatchError, match=r"calib.npz\['a'\] has shape \(2, 5\), expected \(None, 4\)"):
        load_calibration_data(tmp_path / "calib.npz", _two_input_model())


def test_npy_for_a_multi_input_model_is_an_error(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="one array per input"):
        load_calibration_data(tmp_path / "calib.npy", _two_input_model())


# Image folders ------------------------------------------------------------------
def test_rgb_folder_unit_values_and_sorted_recursive_order(tmp_path):
    colours = {"b.png": (10, 20, 30), "a.jpg": None, "sub/c.png": (200, 100, 0), "a.png": (255, 0, 128)}
    for name, colour in colours.items():
        if colour is not None:
            _png(tmp_path / name, np.broadcast_to(np.array(colour, np.uint8), (6, 6, 3)), "RGB")
    (tmp_path / "notes.txt").write_text("skipped")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.png", "b.png", "sub/c.png"]
    out = load_calibration_data(tmp_path, _model((6, 6, 3)))
    assert out.dtype == np.float32 and out.shape == (3, 6, 6, 3)
    expected = np.array([(255, 0, 128), (10, 20, 30), (200, 100, 0)], np.float32) / 255.0
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None, :], out.shape), rtol=1e-6)


def test_rgb_folder_imagenet_and_none(tmp_path):
    _png(tmp_path / "one.png", np.broadcast_to(np.array((51, 102, 204), np.uint8), (4, 4, 3)), "RGB")
    model = _model((4, 4, 3))
    pixel = np.array((51, 102, 204), np.float64)
    imagenet = load_calibration_data(tmp_path, model, normalize="imagenet")
    np.testing.assert_allclose(imagenet[0, 2, 3], (pixel / 255 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-5)
    raw = load_calibration_data(tmp_path, model, normalize="none")
    np.testing.assert_array_equal(raw[0, 0, 0], pixel.astype(np.float32))


def test_grayscale_model_reads_rgb_images_as_grayscale_and_resizes(tmp_path):
    _png(tmp_path / "big.png", np.full((40, 30, 3), 128, np.uint8), "RGB")  # grey RGB image, 40x30
    _png(tmp_path / "small.bmp", np.full((5, 5), 64, np.uint8), "L")
    out = load_calibration_data(tmp_path, _model((28, 28, 1)))
    assert out.shape == (2, 28, 28, 1)
    np.testing.assert_allclose(out[0], 128 / 255.0, rtol=1e-6)  # resizing a flat image keeps its value
    np.testing.assert_allclose(out[1], 64 / 255.0, rtol=1e-6)


def test_rgb_model_reads_grayscale_images_as_rgb(tmp_path):
    _png(tmp_path / "g.png", np.full((3, 3), 200, np.uint8), "L")
    out = load_calibration_data(tmp_path, _model((8, 8, 3)))
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(out, 200 / 255.0, rtol=1e-6)


def test_resize_uses_the_model_height_and_width(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 20).astype(np.uint8), (10, 1))  # 10 high, 20 wide
    _png(tmp_path / "g.png", gradient, "L")
    out = load_calibration_data(tmp_path, _model((5, 7, 1)))
    assert out.shape == (1, 5, 7, 1)
    row = out[0, 0, :, 0]
    assert np.all(np.diff(row) > 0)  # the gradient runs along the width, still increasing


def test_imagenet_needs_three_channels(tmp_path):
    _png(tmp_path / "g.png", np.zeros((4, 4), np.uint8), "L")
    with pytest.raises(ConfigError, match="needs 3 channels"):
        load_calibration_data(tmp_path, _model((4, 4, 1)), normalize="imagenet")


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="holds no images"):
        load_calibration_data(tmp_path, _model((4, 4, 3)))


def test_unreadable_image_is_named(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8), "RGB")
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ConfigError) as info:
        load_calibration_data(tmp_path, _model((4, 4, 3)))
    assert "b.jpg" in str(info.value) and info.value.field == "image"


def test_folder_needs_an_image_model(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8), "RGB")
    with pytest.raises(ShapeMismatchError, match="model input has shape \\(None, 48\\)"):
        load_calibration_data(tmp_path, _model((48,)))
    with pytest.raises(ConfigError, match="single-input model"):
        load_calibration_data(tmp_path, _two_input_model())


# Paths and options ----------------------------------------------------------------
def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder") as info:
        load_calibration_data(tmp_path / "nothing.npy", _model((4,)))
    assert info.value.field == "data"


@pytest.mark.parametrize("name", ["calib.csv", "calib.png", "calib"])
def test_unsupported_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"1,2,3,4")
    with pytest.raises(ConfigError, match="unsupported file extension"):
        load_calibration_data(tmp_path / name, _model((4,)))


def test_unknown_normalize_is_refused(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match="normalize must be one of"):
        load_calibration_data(tmp_path / "calib.npy", _model((4,)), normalize="zscore")


def test_errors_are_keras_quant_errors_and_value_errors():
    with pytest.raises(KerasQuantError):
        conform_array(np.zeros((2, 3)), (None, 4))
    with pytest.raises(ValueError):
        normalize_images(np.zeros((1, 2)), "imagenet")
