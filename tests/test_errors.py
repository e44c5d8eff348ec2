"""The error hierarchy and its messages."""

import numpy as np
import pytest

from keras_quant import errors


def test_hierarchy():
    for cls in (
        errors.ConfigError,
        errors.ShapeMismatchError,
        errors.NonFiniteError,
        errors.MemoryLimitExceededError,
        errors.IntegrityError,
        errors.UnsupportedLayerError,
        errors.NoDataError,
    ):
        assert issubclass(cls, errors.KerasQuantError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.MemoryLimitExceededError, MemoryError)
    assert issubclass(errors.UnsupportedLayerError, TypeError)


@pytest.mark.parametrize(
    "error, fragments, attrs",
    [
        (errors.ConfigError("bits", 40, "bits must be between 2 and 16", layer="conv"),
         ["Layer 'conv'", "Received: bits=40"], {"field": "bits", "value": 40, "layer": "conv"}),
        (errors.ShapeMismatchError("scale", (4,), (3,), layer="dense"),
         ["Layer 'dense'", "scale has shape (3,), expected (4,)"], {"expected": (4,), "actual": (3,)}),
        (errors.NonFiniteError(5, field="x", layer="relu"), ["5 non-finite", "Received: non_finite_count=5"],
         {"count": 5}),
        (errors.MemoryLimitExceededError(2048, 1024), ["2048 bytes", "limit of 1024"],
         {"current": 2048, "limit": 1024}),
        (errors.IntegrityError("calib.json", "checksum mismatch"), ["calib.json", "checksum mismatch"],
         {"path": "calib.json"}),
        (errors.UnsupportedLayerError("lstm", "LSTM"), ["Layer 'lstm'", "LSTM"], {"layer_type": "LSTM"}),
        (errors.NoDataError("relu", reason="no calibration sample reached this branch"),
         ["relu has seen no finite data", "no calibration sample"], {"field": "relu"}),
    ],
)
def test_messages_name_field_and_value(error, fragments, attrs):
    for fragment in fragments:
        assert fragment in str(error)
    for name, value in attrs.items():
        assert getattr(error, name) == value


@pytest.mark.parametrize("value, kwargs, expected", [
    (3, {}, 3), (np.int64(5), {}, 5), (0, {"minimum": 0}, 0), (None, {"allow_none": True}, None),
])
def test_check_int_returns_the_int(value, kwargs, expected):
    out = errors.check_int("batch_size", value, **kwargs)
    assert out == expected and (out is None or type(out) is int)


@pytest.mark.parametrize("value, kwargs", [
    (0, {}), (-1, {"minimum": 0}), (1.5, {}), (True, {}), ("4", {}), (None, {}), (np.float32(2), {}),
])
def test_check_int_refuses_with_field_value_and_layer(value, kwargs):
    with pytest.raises(errors.ConfigError) as e:
        errors.check_int("runs", value, layer="dense", **kwargs)
    assert (e.value.field, e.value.layer) == ("runs", "dense")
    assert e.value.value is value or e.value.value == value
    minimum = kwargs.get("minimum", 1)
    assert f"runs must be an integer >= {minimum}" in str(e.value) and "Layer 'dense'" in str(e.value)
