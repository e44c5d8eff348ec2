"""Tests for keras_quant.analysis.common: the helpers the analysis modules share (any backend)."""

import math

import numpy as np
import pytest

from keras_quant.analysis.common import label_classes, num_samples, ratio
from keras_quant.errors import NoDataError, ShapeMismatchError


@pytest.mark.parametrize("data, expected", [
    (np.zeros((5, 3)), 5),
    ([np.zeros((4, 2)), np.zeros((4, 7))], 4),
    ((np.zeros((2, 1)),), 2),
    ({"a": np.zeros((3, 2)), "b": np.zeros((3,))}, 3),
])
def test_num_samples_counts_axis_0(data, expected):
    assert num_samples(data) == expected


@pytest.mark.parametrize("data", [None, [], [None], np.zeros((0, 3)), {}])
def test_num_samples_refuses_no_data_naming_the_field(data):
    with pytest.raises(NoDataError) as e:
        num_samples(data, "eval_data", "sensitivity needs data")
    assert e.value.field == "eval_data" and "sensitivity needs data" in str(e.value)


def test_num_samples_refuses_mismatched_or_batchless_arrays():
    with pytest.raises(ShapeMismatchError) as e:
        num_samples([np.zeros((3, 2)), np.zeros((4, 2))], "data")
    assert e.value.field == "data" and e.value.actual == [(3, 2), (4, 2)]
    with pytest.raises(ShapeMismatchError) as e:
        num_samples(np.float32(1.0), "calibration_data")
    assert e.value.field == "calibration_data" and e.value.actual == ()


@pytest.mark.parametrize("a, b, zero, expected", [
    (6, 3, "none", 2.0), (6, 3, "inf", 2.0), (1, 0, "none", None), (0, 0, "none", None),
    (1, 0, "inf", math.inf), (0, 0, "inf", 1.0), (None, 2, "none", None), (2, None, "inf", None),
])
def test_ratio_says_what_a_zero_divisor_gives(a, b, zero, expected):
    assert ratio(a, b, zero=zero) == expected


def test_label_classes_takes_indices_one_hot_and_float_labels():
    out = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    classes = np.array([1, 0])
    assert label_classes(np.array([1, 2]), out, classes).tolist() == [1, 2]
    assert label_classes(np.eye(3)[[2, 0]], out, classes).tolist() == [2, 0]
    assert label_classes(np.array([[1.0], [0.0]]), out, classes).dtype == np.int64
    with pytest.raises(ShapeMismatchError) as e:
        label_classes(np.zeros(3), out, classes)
    assert e.value.field == "labels" and e.value.expected == (2,) and e.value.actual == (3,)
