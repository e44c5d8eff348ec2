"""What the post-training algorithms share: the float and quantized graphs, the samples, and where each
quantized layer's float counterpart is read.

`setup` resolves both models and the samples; `float_references` finds, per frozen wrapper, the float
tensor its linear output is compared with; `float_pass` folds a reduction over the float model's values
of those tensors in batches.
"""

import dataclasses

import keras

from keras_quant import graph as graph_lib
from keras_quant import runtime
from keras_quant.errors import ConfigError, check_int
from keras_quant.layers.rules import without_activation

__all__ = ["Setup", "setup", "float_pass", "float_references", "is_linear", "select_layers", "report_text"]


def is_linear(activation):
    return getattr(activation, "__name__", "linear") == "linear"


def float_references(fgraph, qmodel, wrappers, index=None):
    """`{wrapper name: (float tensor, layer or None)}`: where each wrapper's float linear output is read.

    A float layer without an activation of its own stands for the tensor after the layers folded into
    the wrapper (`quantization_report.folded`: a BatchNormalization, a constant added): that tensor,
    with None. A layer with its own activation has nothing folded after it: its input tensor, with the
    layer, whose call without the activation gives the linear output. Also the skip reasons. `index`:
    `graph_lib.index(fgraph)`, where the caller has it.
    """
    report = getattr(qmodel, "quantization_report", None)
    folded_into = {}
    for name, into in (report.folded if report else ()):
        folded_into.setdefault(into, set()).add(name)
    readers, calls = index or graph_lib.index(fgraph)
    found, skipped = {}, []
    for w in wrappers:
        hits = calls.get(w.name, [])
        if len(hits) != 1:
            skipped.append((w.name, "no single call of a float layer of that name"))
            continue
        node = hits[0]
        layer = graph_lib.operation_of(node)
        if type(layer) is not type(w.layer):
            skipped.append((w.name, f"its float layer is a {type(layer).__name__}, rewritten as a "
                                    f"{type(w.layer).__name__}"))
            continue
        inputs, outputs = graph_lib.node_inputs(node), graph_lib.node_outputs(node)
        if len(inputs) != 1 or len(outputs) != 1:
            skipped.append((w.name, "not a layer with one input and one output"))
            continue
        if not is_linear(getattr(layer, "activation", None)):
            found[w.name] = (inputs[0], layer)
            continue
        tensor, chain = outputs[0], folded_into.get(w.name, set())
        while chain:
            nxt = [n for n in readers.get(id(tensor), ()) if graph_lib.operation_of(n).name in chain]
            if len(nxt) != 1:
                break
            tensor = graph_lib.node_outputs(nxt[0])[0]
            chain = chain - {graph_lib.operation_of(nxt[0]).name}
        found[w.name] = (tensor, None)
    return found, skipped


@dataclasses.dataclass
class Setup:
    """What both algorithms start from: the graphs, the samples, the items to treat (each with a `name`) and
    the float tensor each reads its float values from (`{name: (tensor, layer or None)}`)."""

    fgraph: object
    qgraph: object
    xs: list
    num_samples: int
    items: list
    references: dict
    skipped: list


def setup(float_model, qmodel, data, max_samples, batch_size, what, select):
    """`(Setup, batch_size)`; `select(fgraph, qgraph, qmodel) -> (items, references, skipped)`."""
    fgraph = graph_lib.require_functional(float_model, "float_model")
    qgraph = graph_lib.require_functional(qmodel, "qmodel")
    batch_size = check_int("batch_size", batch_size, allow_none=True) or 64
    xs = runtime.graph_samples(fgraph, data, max_samples, what)
    items, references, skipped = select(fgraph, qgraph, qmodel)
    items = [item for item in items if item.name in references]
    return Setup(fgraph, qgraph, xs, int(xs[0].shape[0]), items, references, skipped), batch_size


def float_pass(setup, batch_size, reduce):
    """`{item name: value}` folding `reduce(value or None, float linear output of a batch)` over the samples.

    One pass of the float model in batches; each wrapper's linear output is read from the tensor
    `float_references` found (the layer called without its activation where it has one).
    """
    tensors = list({id(t): t for t, _ in setup.references.values()}.values())
    index = {id(t): i for i, t in enumerate(tensors)}
    probe = keras.Model(setup.fgraph.inputs, tensors)
    values = {}
    for start in range(0, setup.num_samples, batch_size):
        outs = probe([x[start:start + batch_size] for x in setup.xs], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for w in setup.items:
            tensor, layer = setup.references[w.name]
            y = outs[index[id(tensor)]]
            if layer is not None:
                with without_activation(layer):
                    y = layer(y, training=False)
            values[w.name] = reduce(values.get(w.name), y)
    return values


def select_layers(qgraph, layers, kinds, reason):
    """`(targets, skipped)` in graph order: the operations of `qgraph` that are instances of `kinds`, those
    named in `layers` (a list of names; None: all), each a target unless `reason(op)` says why not (then
    `(name, reason)` in `skipped`).

    Raises:
        ConfigError: `layers` is not a list of names, or names no such operation.
    """
    found = [op for op in graph_lib.operations(qgraph) if isinstance(op, kinds)]
    if layers is not None:
        if isinstance(layers, str) or not isinstance(layers, (list, tuple, set)) or not all(
                isinstance(n, str) for n in layers):
            raise ConfigError("layers", layers, "layers must be a list of wrapped layer names, or None")
        unknown = sorted(set(layers) - {op.name for op in found})
        if unknown:
            raise ConfigError("layers", unknown, f"no kq.QuantizeWrapper of these names; the model's are "
                              f"{[op.name for op in found]}")
        found = [op for op in found if op.name in set(layers)]
    targets, skipped = [], []
    for op in found:
        why = reason(op)
        if why:
            skipped.append((op.name, why))
        else:
            targets.append(op)
    return targets, skipped


def report_text(header, table, skipped):
    """A post-training algorithm's report as text: `header`, the per-layer `table` (None or "" when no layer
    was treated), then one line per skipped `(layer, reason)`."""
    lines = [header] + ([table] if table else [])
    return "\n".join(lines + [f"skipped {name}: {why}" for name, why in skipped])
