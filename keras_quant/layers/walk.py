"""Walking a model's layers and operations with stable keys, shared by calibration and quantization.

Calibration results are keyed by layer name (a model input by its input
layer's name); a name used by two layers of different nested models is keyed
by its path (`outer/inner`) instead. `layer_keys` and `input_keys` are the one
place that rule is written, so the key a calibration records is the key
`quantize_model` looks up.

The leaves of a Functional model are its graph's operations: its layers and
also the bare `keras.ops` operations (`x + y`, `keras.ops.mean`, slicing),
each keyed by its own name.

`quantizer_layers` finds every keras_quant quantizer layer of a model (the
one definition export, analysis and `kq.qat` read).
"""

import keras

from keras_quant import graph as graph_lib
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = ["leaf_layers", "layer_keys", "input_keys", "quantizer_layers"]


def quantizer_layers(model, stage=None):
    """Every `QuantizeWrapper` and `ActivationQuantizer` of `model` (nested layers included), in order.

    Args:
        model: A Keras model (or layer).
        stage: None for all of them, or `"qat"` / `"frozen"` for the built
            ones in that stage (`keras_quant.layers.qat_quantizer.STAGES`).
    """
    return [
        layer for layer in graph_lib.sublayers(model)
        if isinstance(layer, (QuantizeWrapper, ActivationQuantizer))
        and (stage is None or (layer.stage == stage and layer.built))
    ]


def _children(layer):
    graph = graph_lib.functional(layer) if isinstance(layer, keras.Model) else None
    if graph is not None:  # its layers and its bare keras.ops operations
        return graph_lib.operations(graph)
    if isinstance(layer, keras.Model) or hasattr(layer, "layers") and not isinstance(layer, keras.layers.Wrapper):
        try:
            return list(layer.layers)
        except (AttributeError, TypeError):
            return []
    return []


def leaf_layers(model, prefix=""):
    """`(path, layer)` for every leaf layer (and graph operation) of `model`, nested models expanded, in order."""
    out = []
    for layer in _children(model):
        path = f"{prefix}{layer.name}"
        children = _children(layer)
        if children:
            out.extend(leaf_layers(layer, prefix=path + "/"))
        else:
            out.append((path, layer))
    return out


def layer_keys(model):
    """`{key: layer}` over the leaf layers: the layer's name, or its path where names collide."""
    leaves = leaf_layers(model)
    counts = {}
    for _, layer in leaves:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    keys = {}
    for path, layer in leaves:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        keys[layer.name if counts[layer.name] == 1 else path] = layer
    return keys


def input_keys(model, count=None):
    """The key of each model input, in order: its input layer's name.

    A model with no symbolic inputs (a subclassed model) has no input layers;
    given the number of inputs it receives, its keys are `"input"` for one,
    `"input_0"`, `"input_1"`, ... for several. Otherwise the result is None.
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if inputs:
        names = []
        for i, t in enumerate(inputs):
            op, _, _ = graph_lib.producer(t)
            names.append(op.name if op is not None else (getattr(t, "name", None) or f"input_{i}"))
        return names
    if count is None:
        return None
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]
