"""Export needs TensorFlow: under another backend it says so, naming the backend."""

import keras
import pytest

import keras_quant as kq
from keras_quant.errors import ExportError


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="checks the error other backends give")
def test_export_under_another_backend_names_the_backend(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ExportError, match="KERAS_BACKEND=tensorflow") as e:
        kq.export_tflite(model, tmp_path / "m.tflite", mode="float32")
    assert e.value.field == "backend" and e.value.value == keras.backend.backend()
    assert not (tmp_path / "m.tflite").exists()


def test_unknown_mode_is_named():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises((ExportError,)) as e:
        kq.export.check(model, "int3")
    assert e.value.field == "mode" and e.value.value == "int3"
