"""Per-layer error: how far each activation of a quantized model is from the float model's.

`layer_errors(float_model, quantized_model, data)` runs both models on the same
data, reads every intermediate activation, and compares each quantized tensor
with the float layer output it stands for: the numbers TFLite's
QuantizationDebugger and PyTorch's Numeric Suite report.

The quantized model is a Keras model from `kq.quantize_model` (PTQ or QAT) or
a TFLite file from `kq.export_tflite` (int8, int16x8). Quantized tensors are
matched to float layers by name:

- Keras: an activation quantizer stands for the layer its calibration key
  names (`qmodel.quantization_report.activation_quantizers`); a wrapper with
  a folded BatchNormalization stands for that BatchNormalization's output;
  any other layer for the float layer of the same name (a layer that took the
  Rescaling / Normalization before it into its weights, `input_folds`, still
  for its own). Where several tensors
  stand for one layer (`relu` and then `relu_quant`), the last one is used.
- TFLite: a tensor stands for the first layer its name mentions (`X_quant`
  for `X`; a layer followed by a BatchNormalization the file has no op for,
  for that BatchNormalization). Integer tensors (dequantized with their own
  scale and zero point) are preferred over float ones, later over earlier.

Layers called more than once, inside nested models, or with no counterpart
(a convolution whose BatchNormalization was folded) get no row. Each model
output gets one more row, `"<output>"` (`"<output_i>"` for several), last.

Metrics are float64 numpy (`kq.analysis.error_stats` for MSE, MAE, max error
and SQNR). `cosine_similarity` is computed per sample over the flattened
activation and averaged over samples (1 where both vectors are zero, 0 where
one is), so one sample's large activation does not dominate it.

Example:

>>> errs = kq.analysis.layer_errors(model, qmodel, x_test[:256])   # doctest: +SKIP
>>> print(errs.worst(3))                                           # doctest: +SKIP
"""

import dataclasses
import os
from typing import Optional, Tuple

import keras
import numpy as np

import keras_quant.graph as graph_lib
import keras_quant.runtime as runtime
from keras_quant.analysis.error import error_stats
from keras_quant.errors import ConfigError, check_int
from keras_quant.export.flatbuffer import layer_names_of
from keras_quant.export.plan import activation_table
from keras_quant.formatting import text_table, to_jsonable
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.rules import get_rule

__all__ = ["LayerError", "LayerErrors", "activation_error", "layer_errors"]

OUTPUT = "<output>"
QUANT_SUFFIX = "_quant"
# `by` of LayerErrors.worst -> whether a larger value is worse (mean_error: its magnitude).
RANKINGS = {"sqnr_db": False, "cosine_similarity": False, "mse": True, "mae": True, "max_error": True,
            "mean_error": True, "max_error_steps": True}
COLUMNS = ("name", "sqnr_db", "cosine_similarity", "mse", "mae", "max_error", "mean_error", "scale",
           "max_error_steps", "num_elements")


@dataclasses.dataclass(frozen=True)
class LayerError:
    """The error `quantized - float` of one layer's output over the data.

    Attributes:
        name: The float layer's name (`"<output>"` for the model output).
        mse, mae, max_error, sqnr_db: As in `kq.analysis.ErrorStats`.
        mean_error: Signed mean of `quantized - float` (the bias).
        cosine_similarity: Per-sample cosine of the flattened activations, averaged.
        num_elements: Elements compared (samples times the activation's size).
        scale: Quantization step of the quantized tensor where known, else None.
        max_error_steps: `max_error / scale`, or None.
    """

    name: str
    mse: float
    mae: float
    max_error: float
    mean_error: float
    sqnr_db: float
    cosine_similarity: float
    num_elements: int
    scale: Optional[float] = None
    max_error_steps: Optional[float] = None

    def to_dict(self) -> dict:
        """The row as a plain dict (JSON-serializable)."""
        return to_jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class LayerErrors:
    """Every matched layer's `LayerError`, in the float model's graph order, then the output rows.

    Iterate it, index it by position or layer name, rank it with `worst`.

    Attributes:
        layers: The `LayerError`s.
        source: `(reference, candidate)` labels: the float model and the quantized model or file.
        num_samples: Samples compared.
    """

    layers: Tuple[LayerError, ...]
    source: Tuple[str, str] = ("", "")
    num_samples: int = 0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer, slice)):
            return self.layers[key]
        for row in self.layers:
            if row.name == key:
                return row
        raise ConfigError("name", key, f"no row for layer '{key}'; the rows are {list(self.names)}", layer=key)

    @property
    def names(self) -> Tuple[str, ...]:
        """The layer names, in the table's order."""
        return tuple(row.name for row in self.layers)

    def worst(self, n=5, by="sqnr_db") -> "LayerErrors":
        """The `n` layers (output rows left out) with the worst `by`: lowest SQNR / cosine, else largest."""
        if by not in RANKINGS:
            raise ConfigError("by", by, f"by must be one of {tuple(RANKINGS)}")
        check_int("n", n)
        rows = [r for r in self.layers if not r.name.startswith(OUTPUT[:-1]) and getattr(r, by) is not None]
        sign = -1.0 if RANKINGS[by] else 1.0
        rows.sort(key=lambda r: sign * (abs(r.mean_error) if by == "mean_error" else getattr(r, by)))
        return dataclasses.replace(self, layers=tuple(rows[:n]))

    def to_dict(self) -> dict:
        """`{"layers": [row, ...], "source": [reference, candidate], "num_samples": n}`, JSON-able."""
        return {"layers": [row.to_dict() for row in self.layers], "source": list(self.source),
                "num_samples": self.num_samples}

    def table(self) -> str:
        """The errors as a plain-text table, one row per layer."""
        title = f"per-layer error: {self.source[1]} against {self.source[0]}, {self.num_samples} samples"
        return text_table([dataclasses.asdict(r) for r in self.layers], COLUMNS, title=title)

    def __str__(self):
        return self.table()


# Pure functions -----------------------------------------------------------------
def _cosine(a, b):
    """Mean over samples (axis 0) of the cosine of the flattened activations."""
    a, b = a.reshape(a.shape[0], -1).copy(), b.reshape(b.shape[0], -1).copy()
    for v in (a, b):  # each row over its largest |value| first: no underflow of tiny activations
        peak = np.max(np.abs(v), axis=1, keepdims=True) if v.size else np.ones((v.shape[0], 1))
        v /= np.where(peak == 0, 1.0, peak)
    norms = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
    zero_a, zero_b = ~np.any(a, axis=1), ~np.any(b, axis=1)
    cos = np.sum(a * b, axis=1) / np.where(norms == 0, 1.0, norms)
    cos = np.where(zero_a & zero_b, 1.0, np.where(zero_a | zero_b, 0.0, np.clip(cos, -1.0, 1.0)))
    return float(np.mean(cos))


def activation_error(name, reference, quantized, scale=None) -> LayerError:
    """The `LayerError` of one activation: `quantized` against `reference`, batch on axis 0.

    Args:
        name: The row's name.
        reference: The float activation.
        quantized: The quantized model's (dequantized) activation, same shape.
        scale: Its quantization step, if known.

    Returns:
        A `LayerError` of Python floats.

    Raises:
        ShapeMismatchError: The shapes differ.

    Example:

    >>> activation_error("x", np.ones((2, 3)), np.full((2, 3), 1.5), scale=0.5).max_error_steps
    1.0
    """
    r = np.asarray(keras.ops.convert_to_numpy(reference), np.float64)
    q = np.asarray(keras.ops.convert_to_numpy(quantized), np.float64)
    stats = error_stats(r, q)
    r, q = r.reshape((r.shape[0] if r.ndim else 1, -1)), q.reshape((q.shape[0] if q.ndim else 1, -1))
    scale = float(scale) if scale is not None and scale > 0 else None
    return LayerError(name=name, mse=stats.mse, mae=stats.mae, max_error=stats.max_error,
                      mean_error=float(np.mean(q - r)), sqnr_db=stats.sqnr_db, cosine_similarity=_cosine(r, q),
                      num_elements=stats.num_samples, scale=scale,
                      max_error_steps=None if scale is None else stats.max_error / scale)


# Graph walking -----------------------------------------------------------------
def _node_outputs(graph):
    """`(operation, i, node, tensor)` in graph order: the single output of each layer's (or keras.ops
    operation's) i-th node in this graph (i counts a shared layer's calls in call order)."""
    nodes = graph_lib.nodes(graph, include_inputs=True)
    members = {id(n) for n in nodes}
    for node in nodes:
        op = graph_lib.operation_of(node)
        outputs = graph_lib.node_outputs(node)
        if len(outputs) == 1:
            calls = [n for n in graph_lib.calls(op) if id(n) in members]
            yield op, calls.index(node), node, outputs[0]


def _float_tensors(graph):
    """`{name: tensor}` of the float layers with one output in this graph (not shared)."""
    found = {}
    for layer, i, _, tensor in _node_outputs(graph):
        found[layer.name] = None if i or layer.name in found else tensor
    return {name: t for name, t in found.items() if t is not None}


def _folded(graph, present):
    """`{producer: bn}` for BatchNormalizations the quantized model has no layer / op for, folded into the
    compute layer before them (a lone one folded into the layer after it stands for nothing: no row)."""
    found = {}
    for layer, _, node, _ in _node_outputs(graph):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.name not in present:
            source = graph_lib.producer(graph_lib.node_inputs(node)[0])[0]
            if getattr(get_rule(source), "kind", None) == "compute":
                found[source.name] = layer.name
    return found


def _resolve(qname, float_names, folded, translation=None):
    """The float layer a quantized layer (or `X_quant` quantizer) name stands for, or None."""
    name = (translation or {}).get(qname)
    if name is None:
        name = qname if qname in float_names else qname[: -len(QUANT_SUFFIX)] if qname.endswith(QUANT_SUFFIX) else None
        name = folded.get(name, name)
    return name if name in float_names else None


def _keras_matches(float_names, folded, qmodel):
    """`{float_name: (tensor, scale)}` of a quantized Keras model's tensors, and `{id(tensor): scale}`."""
    report = getattr(qmodel, "quantization_report", None)
    pairs = [(q, k) for q, k in (report.activation_quantizers if report else ()) if ":" not in k]
    translation = dict(pairs)
    translation.update({into: bn for bn, into in (report.folded if report else ())})
    scales = {name: s for name, (s, _, _) in activation_table(qmodel).items()}
    tensor_scale, matches = {}, {}
    for layer, i, node, tensor in _node_outputs(graph_lib.require_functional(qmodel, "quantized_model")):
        keys = [k for q, k in pairs if q == layer.name]
        if isinstance(layer, ActivationQuantizer) and len(keys) > 1:  # QAT: one quantizer, one key per call
            name = keys[i] if i < len(keys) and keys[i] in float_names else None
        else:
            name = _resolve(layer.name, float_names, folded, translation)
        scale, rule = scales.get(layer.name), get_rule(layer)
        inputs = graph_lib.node_inputs(node)
        if scale is None and rule is not None and rule.kind == "passthrough" and len(inputs) == 1:
            scale = tensor_scale.get(id(inputs[0]))
        tensor_scale[id(tensor)] = scale
        if name is not None:
            matches[name] = (tensor, scale)
    return matches, tensor_scale


def _predict(graph, tensors, xs, batch_size):
    model = keras.Model(graph.inputs, list(tensors))
    out = model.predict(xs[0] if len(xs) == 1 else xs, batch_size=batch_size or runtime.DEFAULT_BATCH_SIZE, verbose=0)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in (out if isinstance(out, list) else [out])]


# TFLite ops that apply an activation a Keras layer can carry itself.
_ACTIVATION_OPS = ("SOFTMAX", "LOGISTIC", "TANH", "HARD_SWISH", "GELU", "LOG_SOFTMAX", "ELU", "LEAKY_RELU")


def _tflite_matches(float_names, graph, runner):
    """`{float_name: (tensor_index, scale)}` of a TFLite file's activation tensors."""
    details, ops = runner.tensor_details(), runner.ops()
    order = [details[d["index"]] for d in runner.input_details]
    order += [details[o] for op in ops for o in op["outputs"] if o in details]
    candidates = set(float_names) | {n + QUANT_SUFFIX for n in float_names}
    mentions = [(d, layer_names_of(d["name"], candidates)) for d in order]
    folded = _folded(graph, {_resolve(m[0], float_names, {}) for _, m in mentions if m})
    matches = {}
    for d, mentioned in mentions:
        name = _resolve(mentioned[0], float_names, folded) if mentioned else None
        integer = np.issubdtype(d["dtype"], np.integer)
        if name is None or not integer and name in matches and matches[name][2]:
            continue  # an integer tensor is kept over a later float one (the dequantized input, the output)
        scale = runtime.tflite_qparams(d)
        matches[name] = (d["index"], scale[0] if integer and scale else None, integer)
    # A layer's own activation (`Dense(10, activation="softmax")`) is an op after its matmul whose output names
    # that layer or none (the model's output): the layer's output is that op's, not the matmul's. (With a
    # delegate the op list is not in graph order, so the activation's output may come first.)
    named = {d["index"]: set(mentioned) for d, mentioned in mentions}
    by_index = {index: name for name, (index, _, _) in matches.items()}
    for op in ops:
        if op["op_name"] not in _ACTIVATION_OPS or op["inputs"][0] not in by_index:
            continue
        layer = by_index[op["inputs"][0]]
        if not named.get(op["outputs"][0]) or layer in named[op["outputs"][0]]:
            d = details.get(op["outputs"][0])
            if d is not None and np.issubdtype(d["dtype"], np.integer):
                scale = runtime.tflite_qparams(d)
                matches[layer] = (d["index"], scale[0] if scale else None, True)
    return {name: (index, scale) for name, (index, scale, _) in matches.items()}, mentions


# Inputs ------------------------------------------------------------------------
def _quantized_artifact(quantized_model):
    """A Keras model, or `(content, label)` of a TFLite file."""
    if isinstance(quantized_model, keras.Model):
        return quantized_model
    if isinstance(quantized_model, (bytes, bytearray, memoryview)):
        content, label = bytes(quantized_model), f"<{len(quantized_model)} bytes>"
    elif isinstance(quantized_model, (str, os.PathLike)) and str(quantized_model).lower().endswith(".tflite"):
        if not os.path.isfile(quantized_model):
            raise ConfigError("quantized_model", str(quantized_model), "no such file")
        with open(quantized_model, "rb") as f:
            content, label = f.read(), os.path.basename(str(quantized_model))
    else:
        raise ConfigError("quantized_model", quantized_model if isinstance(quantized_model, (str, os.PathLike))
                          else type(quantized_model).__name__,
                          "quantized_model must be a Keras model from kq.quantize_model, or a .tflite file "
                          "(a path or its bytes) from kq.export_tflite")
    if content[4:8] != runtime.TFLITE_IDENTIFIER:
        raise ConfigError("quantized_model", label, "the bytes are not a TFLite flatbuffer (identifier 'TFL3')")
    return content, label


def layer_errors(float_model, quantized_model, data, batch_size=None, max_samples=1024) -> LayerErrors:
    """Per-layer error of a quantized model's activations against the float model's.

    Args:
        float_model: The float Functional or Sequential Keras model.
        quantized_model: A Keras model from `kq.quantize_model` (PTQ or QAT,
            run with `training=False`), or a TFLite file from
            `kq.export_tflite` (int8 or int16x8): a `.tflite` path or its bytes.
        data: Float32 array with the batch on axis 0 (a list of arrays for
            several inputs), as the float model takes it.
        batch_size: Samples per batch where the batch dimension is dynamic (default 32).
        max_samples: At most this many samples (the first ones) are used; None: all.

    Returns:
        A `LayerErrors`: one row per matched layer in the float model's graph
        order, then one per model output (see the module docstring).

    Raises:
        ConfigError: A model or file of the wrong kind, no layer in common (the
            message lists both sides' names), a bad `max_samples` / `batch_size`.
        ShapeMismatchError: `data` does not fit the float model's inputs.
        NoDataError: `data` holds no sample.
    """
    graph = graph_lib.require_functional(float_model, "float_model")
    batch_size = check_int("batch_size", batch_size, allow_none=True)
    xs = runtime.graph_samples(graph, data, max_samples, "layer_errors")
    float_tensors = _float_tensors(graph)
    names = list(float_tensors)
    artifact = _quantized_artifact(quantized_model)
    if isinstance(artifact, keras.Model):
        qgraph = graph_lib.require_functional(artifact, "quantized_model")
        present = {layer.name for layer in qgraph.layers}
        matches, tensor_scale = _keras_matches(names, _folded(graph, present), artifact)
        label, theirs = artifact.name, sorted(present)
    else:
        runner = runtime.TFLiteRunner(artifact[0], name=artifact[1], preserve_all_tensors=True)
        matches, mentions = _tflite_matches(names, graph, runner)
        label = artifact[1]
        theirs = sorted({m for _, found in mentions for m in found} or {d["name"] for d, _ in mentions[:10]})
    common = [n for n in names if n in matches]
    if not common:
        raise ConfigError("quantized_model", label, f"no layer in common with the float model: the float model has "
                          f"{names}, the quantized model {theirs}")
    outputs = list(graph.outputs)
    reference = _predict(graph, [float_tensors[n] for n in common] + outputs, xs, batch_size)
    if isinstance(artifact, keras.Model):
        quantized = _predict(qgraph, [matches[n][0] for n in common] + list(qgraph.outputs), xs, batch_size)
        out_scales = [tensor_scale.get(id(t)) for t in qgraph.outputs]
    else:
        indices = [matches[n][0] for n in common] + [d["index"] for d in runner.output_details]
        quantized = runner.intermediates(xs, indices, batch_size)
        first = runner.output_quantization  # as compare_models reads it (also behind a DEQUANTIZE)
        out_scales = [(first or (None,))[0]] + [(runtime.tflite_qparams(d) or (None,))[0]
                                                 if np.issubdtype(d["dtype"], np.integer) else None
                                                 for d in runner.output_details[1:]]
    row_names = common + ([OUTPUT] if len(outputs) == 1 else [f"<output_{i}>" for i in range(len(outputs))])
    scales = [matches[n][1] for n in common] + out_scales
    rows = []
    for name, r, q, scale in zip(row_names, reference, quantized, scales):
        if r.size != q.size:
            continue  # a tensor of another shape (the file reshaped it): nothing to compare element-wise
        rows.append(activation_error(name, r, q.reshape(r.shape), scale))
    return LayerErrors(tuple(rows), source=(float_model.name, label), num_samples=int(xs[0].shape[0]))
