"""flatbuffer.layer_names_of: which Keras layer a converted tensor belongs to."""

from keras_quant.export.flatbuffer import layer_names_of


def test_outermost_layer_scope_only():
    names = {"add", "layer_normalization", "dense"}
    # The `add` inside a LayerNormalization is its op, not the layer named "add".
    assert layer_names_of("model/layer_normalization/add", names) == ["layer_normalization"]
    assert layer_names_of("model/add/Add", names) == ["add"]


def test_fused_names_and_call_suffixes():
    names = {"dense", "add"}
    assert layer_names_of("model/dense_1/MatMul;model/add/Add", names) == ["dense", "add"]
    assert layer_names_of("model/unknown/Relu", names) == []
