"""`FlatGraph`: a model as one flat Functional graph of fresh copies, the input of every transform.

Nested Functional and Sequential models are inlined; each layer and each bare
`keras.ops` operation becomes an unbuilt copy (layers get the original's
weights), so planning and rebuilding never touch the float model. Every copy
remembers its original (`origin`), its calibration key (`key`) and its path.

A read-only graph of a model that is already flat (no nested model, every
operation called in this graph only) is a view of the model itself: each
"copy" is its original, and nothing is copied.
"""

import collections
import contextlib

import keras
from keras import tree

from keras_quant import graph as graph_lib
from keras_quant.layers import walk
from keras_quant.transform.guards import copy_operation

__all__ = ["FlatGraph", "already_flat"]


class FlatGraph:
    """The model as one flat Functional graph of staging copies, with each copy's key and path.

    Args:
        model: A Functional or built Sequential model.
        graph: Its Functional graph (`keras_quant.graph.functional(model)`).
        weights: Give the copies the originals' weights (what a rebuild
            needs). False makes a graph for reading only (a plan for
            calibration): the copies' variables are declared, not allocated,
            and must not be read.

    Attributes:
        model: The flat `keras.Model` of staging copies.
        nodes: Its call nodes in topological order.
        consumers: `{id(tensor): [node or None]}`: who reads each tensor
            (None: a model output).
        input_keys: Calibration key of each model input.
    """

    def __init__(self, model, graph, weights=True):
        self.keys = {id(layer): key for key, layer in walk.layer_keys(model).items()}
        self.paths = {id(layer): path for path, layer in walk.leaf_layers(model)}
        self.input_keys = walk.input_keys(model) or [t.name for t in graph.inputs]
        self._clones = {}  # id(original) -> staging copy
        self.origin = {}  # id(staging copy) -> original
        self.with_weights = weights
        self.inputs_struct = graph_lib.inputs_structure(graph)
        self.is_view = not weights and already_flat(graph)
        if self.is_view:  # read-only and flat already: the model's own graph, each operation its own "copy"
            for op in graph_lib.operations(graph):
                self._clones[id(op)] = self.origin[id(op)] = op
            self.model = graph
        else:
            inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=name)
                      for t, name in zip(graph.inputs, self.input_keys)]
            # Building a copy creates (and initialises) its variables; for a read-only graph they are only
            # declared, which makes planning a large model several times cheaper.
            with contextlib.nullcontext() if weights else graph_lib.declared_only():
                outputs = self._run(graph, inputs)
            self.model = keras.Model(inputs, outputs, name=model.name)
        self.nodes = graph_lib.nodes(self.model)
        self._node_ids = {id(node) for node in self.nodes}
        self.consumers = collections.defaultdict(list)
        for node in self.nodes:
            for t in graph_lib.node_inputs(node):
                self.consumers[id(t)].append(node)
        for t in self.model.outputs:
            self.consumers[id(t)].append(None)  # a model output

    def _run(self, graph, inputs):
        return graph_lib.run(graph, inputs, self._call)

    def _call(self, op, *args, **kwargs):
        sub = graph_lib.functional(op) if isinstance(op, keras.Model) else None
        if sub is not None:  # a nested model: run its graph inline
            inner = args[0] if args else kwargs.get("inputs")
            return self._run(sub, tree.flatten(inner))
        clone = self._clones.get(id(op))
        first = clone is None
        if first:
            key = self.keys.get(id(op), op.name)
            clone = copy_operation(op, name=key.replace("/", "_") if "/" in key else None)
            self._clones[id(op)] = clone
            self.origin[id(clone)] = op
        outputs = clone(*args, **kwargs)
        if first and self.with_weights and graph_lib.is_layer(op) and op.weights:
            clone.set_weights(op.get_weights())
        return outputs

    def key(self, layer):
        """The calibration key of a staging copy's original."""
        return self.keys.get(id(self.origin[id(layer)]), layer.name)

    def path(self, layer):
        return self.paths.get(id(self.origin[id(layer)]))

    def calls(self, layer):
        """The nodes of a staging copy's calls in the flat graph."""
        return [node for node in graph_lib.calls(layer) if id(node) in self._node_ids]

    def producer(self, tensor):
        """`(operation, node)` that computed a tensor of the flat graph, or `(None, None)` for an input."""
        op, node_index, _ = graph_lib.producer(tensor)
        if op is None or isinstance(op, keras.layers.InputLayer):
            return None, None
        return op, graph_lib.calls(op)[node_index]  # Keras' index among all the operation's calls

    def outputs_of(self, layer):
        """Every output tensor of every call of a staging copy."""
        return [t for node in self.calls(layer) for t in graph_lib.node_outputs(node)]

    def single_output(self, layer):
        """The output tensor of a copy called once with one output, else None."""
        calls = self.calls(layer)
        if len(calls) != 1:
            return None
        outputs = graph_lib.node_outputs(calls[0])
        return outputs[0] if len(outputs) == 1 else None

    def sole_consumer(self, layer):
        """The one copy that consumes `layer`'s only output, if there is exactly one and neither is shared."""
        out = self.single_output(layer)
        if out is None:
            return None
        users = self.consumers[id(out)]
        if len(users) != 1 or users[0] is None or len(self.calls(users[0].operation)) != 1:
            return None
        return users[0].operation


def already_flat(graph):
    """Whether `graph` nests no model and each of its operations is called in it alone (then it is flat)."""
    nodes = {id(node) for node in graph_lib.nodes(graph, include_inputs=True)}
    for op in graph_lib.operations(graph):
        if isinstance(op, keras.Model) or any(id(node) not in nodes for node in graph_lib.calls(op)):
            return False
    return True
