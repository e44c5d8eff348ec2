"""The one place that reads Keras' graph internals.

A Keras Functional model is a graph of *nodes*: each node is one call of an
*operation*, which is either a `keras.layers.Layer` or a bare
`keras.ops` operation (`x + y`, `keras.ops.mean(x)`, `x[:, 1:]`, a
reshape, ...). Keras exposes the nodes only through private attributes
(`_nodes_by_depth`, `_inbound_nodes`, `_keras_history`, `_run_through_graph`,
...). keras_quant's graph walk, calibration, quantization, export and
analysis read the graph through this module alone, so a change in Keras
touches one file, and `tests/test_graph.py` pins every attribute used here.

Example:

>>> graph = functional(model)            # the Functional graph (Sequential's too), or None
>>> [operation_of(n).name for n in nodes(graph)]
['conv', 'bn', 'add', ...]
"""

import contextlib
import copy
import gc

import keras
import numpy as np

__all__ = [
    "functional", "require_functional", "nodes", "operations", "is_layer", "calls", "producer", "run", "run_releasing",
    "inputs_structure", "sublayers", "node_inputs", "node_outputs", "operation_of", "node_arguments", "copy_operation",
    "output_shape", "tracked_layers", "untrack", "track", "declared_only", "fast_variable_creation",
    "unoptimized_functions", "gc_paused",
]


def functional(model):
    """The Functional graph behind a Functional or built Sequential model, else None (subclassed, unbuilt)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, keras.Model) and hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth"):
        return model
    return None


def require_functional(model, field):
    """`functional(model)`, or a ConfigError naming `field` when the model has no graph to read."""
    graph = functional(model)
    if graph is None:
        from keras_quant.errors import ConfigError

        raise ConfigError(field, getattr(model, "name", type(model).__name__),
                          f"{field} must be a Functional or built Sequential Keras model")
    return graph


def nodes(graph, include_inputs=False):
    """The graph's call nodes in topological order (its input nodes first, when asked for)."""
    by_depth = graph._nodes_by_depth
    return [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and (include_inputs or not node.is_input)
    ]


def index(graph):
    """`(readers, calls)`: `{id(tensor): [node reading it]}` and `{operation name: [node calling it]}`, in
    topological order, one pass over the graph's nodes."""
    readers, by_name = {}, {}
    for node in nodes(graph):
        by_name.setdefault(operation_of(node).name, []).append(node)
        for t in node_inputs(node):
            readers.setdefault(id(t), []).append(node)
    return readers, by_name


def operations(graph):
    """Every operation of the graph (input layers, layers and `keras.ops` operations), in graph order."""
    return list(graph.operations)


def is_layer(op):
    """Whether a graph operation is a Layer (it may hold weights), not a bare `keras.ops` operation."""
    return isinstance(op, keras.layers.Layer)


def operation_of(node):
    return node.operation


def node_inputs(node):
    """The symbolic tensors a node reads (constants in its arguments excluded)."""
    return list(node.input_tensors)


def node_arguments(node):
    """`(args, kwargs)` a node's operation was called with (symbolic tensors and constants)."""
    return tuple(node.arguments.args), dict(node.arguments.kwargs)


def node_outputs(node):
    return list(node.outputs)


def calls(op):
    """The nodes of every call of `op` (in every graph it was called in)."""
    return list(getattr(op, "_inbound_nodes", ()))


def producer(tensor):
    """`(operation, node_index, tensor_index)` that made a symbolic tensor, or `(None, None, None)`."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, None, None
    return history.operation, history.node_index, history.tensor_index


def run(graph, inputs, call_fn):
    """Run the graph over `inputs` (a flat list), calling `call_fn(operation, *args, **kwargs)` at each node."""
    return graph._run_through_graph(inputs, call_fn=call_fn)


def run_releasing(graph, inputs, call_fn):
    """`run`, for concrete values: each computed tensor is dropped after its last reader (bounded memory).

    Returns the flat list of the graph's output values.
    """
    order = nodes(graph)
    keep = {id(t) for t in graph.outputs}
    last = {}
    for i, node in enumerate(order):
        for t in node.input_tensors:
            last[id(t)] = i
    values = {id(x): v for x, v in zip(graph.inputs, inputs)}
    for i, node in enumerate(order):
        args, kwargs = node.arguments.fill_in(values)
        outputs = call_fn(node.operation, *args, **kwargs)
        for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
            values[id(x)] = y
        for t in node.input_tensors:
            if last.get(id(t)) == i and id(t) not in keep:
                values.pop(id(t), None)
    return [values[id(t)] for t in graph.outputs]


def inputs_structure(graph):
    """The structure (dict, list, ...) the Functional model was built with for its inputs, or None."""
    return getattr(graph, "_inputs_struct", None)


def sublayers(model):
    """Every layer inside `model`, nested ones included (Keras' own tracking)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def copy_operation(op, name=None):
    """An unbuilt copy of a layer or `keras.ops` operation (same config; weights are not copied)."""
    config = op.get_config()
    if name is not None:
        config["name"] = name
    try:
        return type(op).from_config(config)
    except (TypeError, ValueError):
        if is_layer(op):
            raise
        # A keras.ops operation whose config does not round-trip: it holds no state, so a shallow copy
        # with its own (empty) call history is the same operation.
        clone = copy.copy(op)
        clone._inbound_nodes, clone._outbound_nodes = [], []
        if name is not None:
            clone.name = name
        return clone


def output_shape(op):
    """The symbolic output shape of an operation's (first) call, or None."""
    try:
        out = op.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    out = keras.tree.flatten(out)
    return tuple(out[0].shape) if out else None


def tracked_layers(layer):
    """The sublayers a (subclassed) layer or model tracks directly, in attribute order."""
    return list(getattr(layer, "_layers", ()))


def untrack(owner, layer):
    """Stop `owner` tracking `layer` (Keras' sublayer tracker)."""
    tracker = getattr(owner, "_tracker", None)
    if tracker is not None:
        tracker.untrack(layer)


def track(owner, layer):
    """Make `owner` track `layer` as a sublayer, once."""
    tracker = getattr(owner, "_tracker", None)
    if tracker is not None and not tracker.is_in_store("layers", layer):
        tracker.track(layer)


@contextlib.contextmanager
def declared_only():
    """Variables created inside are declared (shape, dtype) but never allocated nor initialised.

    For throw-away copies of layers that are only read for their structure
    (a plan): building them costs no initialiser runs and no memory. Their
    values must not be read. Keras keeps such variables in a global list and
    initialises them when an outer `StatelessScope` exits; ours are taken off
    that list, so they are never initialised and are freed with their layers.
    """
    from keras.src.backend.common import global_state

    before = list(global_state.get_global_attribute("uninitialized_variables", []) or [])
    with keras.StatelessScope(initialize_variables=False):
        yield
    global_state.set_global_attribute("uninitialized_variables", before)


def _one_backend_name(next_creator, **kwargs):
    import tensorflow as tf

    kwargs["name"] = "keras_quant"
    with tf.name_scope("keras_quant/"):  # absolute: the layer's name scope would make the name unique again
        return next_creator(**kwargs)


@contextlib.contextmanager
def fast_variable_creation():
    """Variables created inside share one backend-level name (TensorFlow; elsewhere no effect).

    TensorFlow creates an eager variable with a `VarHandleOp` whose
    `debug_name` attribute is the variable's name in its name scope, and an attribute value it
    has not seen makes the runtime build and cache a new kernel: about half a
    millisecond per variable, most of the cost of creating the hundreds of
    variables of a quantized model or a calibration. Keras' own names and
    paths (`variable.name`, `variable.path`), and saving, which goes by layer
    and position, are unchanged.
    """
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    with tf.variable_creator_scope(_one_backend_name):
        yield


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused inside (as it was, after); also a decorator: `@gc_paused()`.

    Tracing, rewriting and converting a model allocate hundreds of thousands of
    small objects (Keras layers, graph ops, the TFLite converter's flatbuffer
    objects), and each allocation burst sets off collections that walk every
    object of the process: in a process that has trained a model (about 700 000
    objects) that was half of a small model's export. Reference counting still
    frees what is dropped; cycles made inside wait for the next collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_UNOPTIMIZED_CONFIGS = {}  # serialized function-call ConfigProto -> the same with Grappler off


@contextlib.contextmanager
def unoptimized_functions():
    """`tf.function`s first run inside are instantiated without Grappler (TensorFlow; elsewhere no effect).

    A new step function's first call optimises its whole graph (constant
    folding, layout, op fusion): a third of calibrating a small model on a
    hundred samples, more than those steps then run. The setting is this
    thread's function-call options (what `tf.config.optimizer` sets for
    every call), so only calls made inside are affected; a function called
    later outside is instantiated again, optimised.
    """
    if keras.backend.backend() != "tensorflow":
        yield
        return
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    options = ctx.function_call_options
    serialized = options.config_proto_serialized
    config = _UNOPTIMIZED_CONFIGS.get(serialized)
    if config is None:
        proto = config_pb2.ConfigProto.FromString(serialized)
        proto.graph_options.rewrite_options.disable_meta_optimizer = True
        config = _UNOPTIMIZED_CONFIGS[serialized] = proto
    unoptimized = copy.copy(options)
    unoptimized.config_proto_serialized = config
    ctx.function_call_options = unoptimized
    try:
        yield
    finally:
        ctx.function_call_options = options


class ValueInitializer:
    """An initializer giving one known array (for a variable created with its value; never serialized)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return self.value if dtype is None else self.value.astype(keras.backend.standardize_dtype(dtype))


def build_with_weights(layer, build_config, weights):
    """Build an unbuilt leaf layer from its build config with `weights` (in `get_weights()` order) as
    the initial values of its variables, instead of running its initializers and assigning after.

    A layer's build creates one variable per `add_weight` call in `weights` order; running the
    initializers (a random kernel) and assigning was most of the cost of folding and rebuilding a
    large model's layers. Falls back to build-then-assign when the layer creates its variables
    otherwise (another order or shape, sublayers). Returns whether the layer is built.
    """
    values = [np.asarray(w) for w in weights]
    pending = list(values)
    mismatch = []
    original = layer.add_weight

    def add_weight(*args, **kwargs):
        shape = kwargs.get("shape", args[0] if args else None)
        if pending and shape is not None and tuple(shape) == pending[0].shape:
            value = pending.pop(0)
            if len(args) > 1:
                args = (args[0], ValueInitializer(value)) + tuple(args[2:])
            else:
                kwargs["initializer"] = ValueInitializer(value)
        else:
            mismatch.append(shape)
        return original(*args, **kwargs)

    object.__setattr__(layer, "add_weight", add_weight)  # not tracked: a plain instance attribute
    try:
        layer.build_from_config(build_config)
    finally:
        object.__delattr__(layer, "add_weight")
    if not layer.built:
        return False
    if mismatch or pending or len(layer.weights) != len(values):
        layer.set_weights(values)
    return True
