"""keras_quant.graph: pins every Keras graph internal keras_quant relies on.

If a Keras release renames or changes one of these, this file fails first,
naming the attribute, instead of a crash deep in quantize_model.
"""

import keras
import numpy as np
import pytest

from keras_quant import graph as graph_lib

L = keras.layers


def _model():
    inp = keras.Input((6,), name="x")
    h = L.Dense(4, name="dense")(inp)
    h = keras.ops.mean(h * 2.0, axis=-1, keepdims=True)
    return keras.Model(inp, [h, L.Dense(2, name="head")(inp)], name="m")


def test_private_attributes_keras_quant_reads_exist():
    model = _model()
    assert hasattr(model, "_run_through_graph")
    assert isinstance(model._nodes_by_depth, dict)
    dense = model.get_layer("dense")
    assert len(dense._inbound_nodes) == 1
    history = dense.output._keras_history
    assert (history.operation, history.node_index, history.tensor_index) == (dense, 0, 0)
    seq = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    assert isinstance(seq._functional, keras.Model)
    assert list(model._flatten_layers(include_self=False, recursive=True))


def test_nodes_in_topological_order_with_ops():
    model = _model()
    names = [type(graph_lib.operation_of(n)).__name__ for n in graph_lib.nodes(model)]
    assert names.index("Dense") < names.index("Multiply") < names.index("Mean")
    assert "InputLayer" not in names
    ops = graph_lib.operations(model)
    assert [type(op).__name__ for op in ops if not graph_lib.is_layer(op)] == ["Multiply", "Mean"]


def test_producer_calls_and_node_tensors():
    model = _model()
    mean_out = model.outputs[0]
    op, node_index, tensor_index = graph_lib.producer(mean_out)
    assert type(op).__name__ == "Mean" and (node_index, tensor_index) == (0, 0)
    node = graph_lib.calls(op)[node_index]
    assert graph_lib.node_outputs(node)[0] is mean_out
    (source,) = graph_lib.node_inputs(node)
    assert type(graph_lib.producer(source)[0]).__name__ == "Multiply"
    assert len(graph_lib.calls(op)) == 1
    assert graph_lib.producer(np.zeros(3)) == (None, None, None)


def test_index_lists_each_tensors_readers_and_each_names_calls():
    model = _model()
    readers, by_name = graph_lib.index(model)
    x = model.inputs[0]
    assert [graph_lib.operation_of(n).name for n in readers[id(x)]] == ["dense", "head"]  # topological order
    dense_out = model.get_layer("dense").output
    assert [type(graph_lib.operation_of(n)).__name__ for n in readers[id(dense_out)]] == ["Multiply"]
    assert id(model.outputs[0]) not in readers  # a model output nobody reads
    assert by_name["head"] == graph_lib.calls(model.get_layer("head"))
    assert sum(map(len, by_name.values())) == len(graph_lib.nodes(model))


def test_run_calls_every_operation_with_its_arguments():
    model = _model()
    seen = []

    def call_fn(op, *args, **kwargs):
        seen.append(type(op).__name__)
        return op(*args, **kwargs)

    x = keras.Input((6,))
    outs = graph_lib.run(model, [x], call_fn)
    assert sorted(seen) == ["Dense", "Dense", "Mean", "Multiply"]
    assert seen.index("Multiply") < seen.index("Mean")
    assert [tuple(o.shape) for o in outs] == [(None, 1), (None, 2)]


def test_functional_of_sequential_subclassed_and_inputs_structure():
    seq = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    assert graph_lib.functional(seq) is seq._functional

    class Sub(keras.Model):
        def call(self, x):
            return x

    assert graph_lib.functional(Sub()) is None
    a, b = keras.Input((2,), name="a"), keras.Input((2,), name="b")
    model = keras.Model({"a": a, "b": b}, L.Add()([a, b]))
    assert isinstance(graph_lib.inputs_structure(model), dict)


def test_copy_operation_for_layers_and_ops():
    dense = L.Dense(3, name="d")
    copy = graph_lib.copy_operation(dense, name="d2")
    assert isinstance(copy, L.Dense) and copy.name == "d2" and not copy.built
    op = graph_lib.producer(keras.ops.mean(keras.Input((4,)), axis=1))[0]
    clone = graph_lib.copy_operation(op)
    assert type(clone) is type(op) and list(np.ravel(clone.axis)) == [1] and not graph_lib.calls(clone)


@pytest.mark.parametrize("layer", [L.Dense(3), L.Conv2D(2, 1)])
def test_output_shape(layer):
    shape = (4,) if isinstance(layer, L.Dense) else (5, 5, 1)
    layer(keras.Input(shape))
    assert graph_lib.output_shape(layer)[-1] == (3 if isinstance(layer, L.Dense) else 2)
    assert graph_lib.output_shape(L.Dense(1)) is None


def test_declared_only_variables_are_never_initialised():
    from keras.src.backend.common import global_state

    with graph_lib.declared_only():
        layer = L.Dense(3)
        layer.build((None, 4))
    assert layer.kernel._value is None  # declared, not allocated
    assert not global_state.get_global_attribute("uninitialized_variables", [])
    assert keras.ops.convert_to_numpy(L.Dense(2)(np.ones((1, 2), "float32"))).shape == (1, 2)  # later ones work


def test_node_arguments_keep_constants():
    inp = keras.Input((3,))
    out = keras.ops.subtract(L.Dense(2, name="d")(inp), np.ones(2, "float32")) + 3.0
    model = keras.Model(inp, out)
    ops_nodes = [n for n in graph_lib.nodes(model) if not graph_lib.is_layer(graph_lib.operation_of(n))]
    (sub_args, _), (add_args, _) = (graph_lib.node_arguments(n) for n in ops_nodes)
    np.testing.assert_array_equal(sub_args[1], np.ones(2))
    assert add_args[1] == 3.0 and add_args[0] is graph_lib.node_outputs(ops_nodes[0])[0]


@pytest.mark.parametrize("make", [
    lambda: keras.layers.Conv2D(4, 3, use_bias=True),
    lambda: keras.layers.SeparableConv2D(5, 3, depth_multiplier=2),
    lambda: keras.layers.BatchNormalization(),
    lambda: keras.layers.MultiHeadAttention(2, 4),  # sublayers: built, then assigned
])
def test_build_with_weights_gives_exactly_the_values(make):
    from keras_quant.graph import build_with_weights

    keras.utils.set_random_seed(0)
    source = make()
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    if isinstance(source, keras.layers.MultiHeadAttention):
        x = x.reshape(2, 36, 3)
        source(x, x)
    else:
        source(x)
    rng = np.random.default_rng(1)
    values = [rng.normal(size=w.shape).astype("float32") for w in source.weights]
    target = make()
    assert build_with_weights(target, source.get_build_config(), values)
    assert target.built
    for got, want in zip(target.get_weights(), values):
        np.testing.assert_array_equal(got, want)
    assert "add_weight" not in target.__dict__  # the build-time hook is gone


def test_fast_variable_creation_keeps_keras_names_values_and_saving(tmp_path):
    with graph_lib.fast_variable_creation():
        layer = keras.layers.Dense(3, name="fc")
        model = keras.Sequential([keras.Input((4,)), layer])
        extra = keras.Variable(np.arange(3.0, dtype="float32"), name="extra", trainable=False)
    assert [v.name for v in layer.weights] == ["kernel", "bias"] and extra.name == "extra"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(extra), [0.0, 1.0, 2.0])
    if keras.backend.backend() == "tensorflow":  # one backend name: no new kernel per variable
        assert {v.value.name for v in (*layer.weights, extra)} == {"keras_quant/keras_quant:0"}
    x = np.ones((2, 4), "float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.tensorflow
def test_unoptimized_functions_turns_grappler_off_for_calls_inside_only():
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    def meta_optimizer_off():
        proto = config_pb2.ConfigProto.FromString(context.context().function_call_options.config_proto_serialized)
        return proto.graph_options.rewrite_options.disable_meta_optimizer

    f = tf.function(lambda x: tf.nn.relu(x * 2.0 + 1.0))
    before = meta_optimizer_off()
    with graph_lib.unoptimized_functions():
        assert meta_optimizer_off()
        inside = f(tf.constant([-1.0, 2.0]))
    assert meta_optimizer_off() == before  # restored
    np.testing.assert_array_equal(inside.numpy(), [0.0, 5.0])
    np.testing.assert_array_equal(f(tf.constant([-1.0, 2.0])).numpy(), [0.0, 5.0])  # instantiated again, optimised
    with pytest.raises(ValueError), graph_lib.unoptimized_functions():
        raise ValueError("restored on errors too")
    assert meta_optimizer_off() == before


def test_gc_paused_restores_the_collector_as_it_was():
    import gc

    assert gc.isenabled()
    with graph_lib.gc_paused():
        assert not gc.isenabled()
        with graph_lib.gc_paused():  # nested: the inner exit leaves it paused
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), graph_lib.gc_paused():
        raise KeyError("restored on errors too")
    assert gc.isenabled()
    gc.disable()
    try:
        with graph_lib.gc_paused():
            pass
        assert not gc.isenabled()  # paused by someone else before: left paused
    finally:
        gc.enable()

    @graph_lib.gc_paused()
    def work(x):
        """Doc."""
        return gc.isenabled(), x

    assert work(3) == (False, 3) and work.__doc__ == "Doc." and gc.isenabled()
