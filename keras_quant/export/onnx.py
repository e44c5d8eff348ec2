"""`export_onnx`: QuantizeLinear / DequantizeLinear (QDQ) ONNX with keras_quant's own ranges.

The model is first written as a full-integer TFLite flatbuffer with float
input and output (`export_tflite`'s int8 path: keras_quant's scales and zero
points, BatchNorm folded, narrow-range per-channel int8 weights), and
tf2onnx turns every quantized tensor of it into QDQ: activations as
QuantizeLinear -> DequantizeLinear pairs with keras_quant's scale and zero
point, weights as int8 initializers behind a DequantizeLinear with per-channel
scales (`axis`). Activations are stored as uint8 by default (zero point + 128,
the same grid), int8 on request; 8-bit weights as uint8 with zero point 128
by default (the same grid: onnxruntime's U8U8 kernels, which never saturate;
its int8-weight kernels do on x86 CPUs without VNNI), int8 on request.
Data-movement ops (Reshape, Transpose, ...) that tf2onnx leaves on an int8
tensor get one QDQ pair around each chain of them (`Q -> DQ -> ops -> Q -> DQ`,
same scale), the form onnxruntime fuses into integer kernels. tf2onnx writes
no 4-bit type, so for opset 21 and above the exporter rewrites the weights of
sub-8-bit layers itself (onnx helper) as INT4 initializers, the type the opset
has for them; below opset 21 they stay 8-bit initializers holding 4-bit
values, and the report says so.

The batch dimension is symbolic (`"batch"`) unless `batch_size` fixes it:
the int8 flatbuffer is converted with a dynamic batch, which tf2onnx keeps
(a Dense on a rank-3 input is traced as reshape -> 2-D matmul -> reshape, so
it stays one integer FULLY_CONNECTED). A model with LSTM / GRU / SimpleRNN
layers converts only with a fixed batch (their while loops' TensorLists need
a static element shape): with a symbolic batch, the recurrent layers are
traced unrolled over their (static) time steps, float ops with no loop, and
the report says so; where that fails too (an unknown sequence length), the
file is written with batch 1 and the report says so (`kq.runtime` runs such a
file sample by sample). With `batch_size` set, the recurrent layers stay
float ONNX Loops; the quantized tensor a loop reads is dequantized before it
(`loops.float_loop_carries`: tf2onnx would otherwise feed the Loop a
float tensor its body declares int8, which onnxruntime refuses).
GELU, which tf2onnx cannot convert, is written as its Erf (or Tanh)
formula between the same QDQ pair; any other TFLite op tf2onnx leaves
unconverted is an `ExportError` naming its layer. tf2onnx's transpose optimizer
runs with one fix (`_squared_mul_handler`): a LayerNormalization on a 1x1 feature
map (ConvNeXt's last stage at small inputs) was written with a wrong Reshape.

The file passes `onnx.checker` and is loaded in onnxruntime before it is
written.

Example:

>>> report = kq.export_onnx(qmodel, "model.onnx", opset=21)
>>> print(report)
"""

import collections
import contextlib
import os
import tempfile
import threading
import warnings

import keras

from keras_quant import graph as graph_lib
from keras_quant.errors import ConfigError, ExportError
from keras_quant.export import loops, plan as plan_lib, qdq
from keras_quant.export.tflite import ExportReport, check_batch_size, tflite_bytes
from keras_quant.io import write_atomic
from keras_quant.transform.guards import export_ready

__all__ = ["export_onnx", "onnx_model", "MIN_OPSET", "INT4_OPSET"]

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
INT4_OPSET = 21  # INT4 / UINT4 tensors in QuantizeLinear / DequantizeLinear
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("uint8", "int8")
_TF2ONNX_MAX_OPSET = 18


def _check_opset(opset):
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ConfigError("opset", opset, f"QDQ with per-channel weight scales needs opset {MIN_OPSET} or later")
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise ConfigError("opset", opset, f"the installed onnx knows opsets up to {onnx.defs.onnx_opset_version()}")


def _unconverted_ops(proto, model):
    """Raise `ExportError` naming the layers of TFLite ops tf2onnx could not convert (left as `TFL_*` nodes)."""
    from keras_quant.export.flatbuffer import layer_names_of

    names = {layer.name for layer in graph_lib.sublayers(model)}
    problems = []
    for node in proto.graph.node:
        if node.op_type.startswith("TFL_"):
            layers = layer_names_of(";".join(node.output), names)
            problems.append((", ".join(layers) or None, "op", node.op_type[4:],
                             f"tf2onnx has no ONNX conversion for the TFLite op {node.op_type[4:]}; replace the "
                             "layer's activation or op with one ONNX has (relu, sigmoid, tanh, swish, gelu), or "
                             "export this model to TFLite only"))
    if problems:
        layer, field, value, reason = problems[0]
        raise ExportError(field, value, reason, layer=layer, problems=problems)


class _DropTFLGelu:
    """A logging filter: tf2onnx logs an ERROR for each TFL_GELU it leaves, which `qdq.decompose_gelu` converts."""

    def filter(self, record):
        return "TFL_GELU" not in record.getMessage()


class _quiet_tf2onnx:
    """A context manager that keeps tf2onnx's TFL_GELU errors out of the log while it converts."""

    def __enter__(self):
        import logging

        self._loggers = [logging.getLogger(n) for n in ("tf2onnx", "tf2onnx.tfonnx")]
        self._filter = _DropTFLGelu()
        for logger in self._loggers:
            logger.addFilter(self._filter)

    def __exit__(self, *exc):
        for logger in self._loggers:
            logger.removeFilter(self._filter)
        return False


@contextlib.contextmanager
def _unrolled_recurrent(model):
    """Every recurrent layer of `model` unrolled while the block runs (an export trace), then as it was.

    Yields the names of the layers it unrolled (empty: nothing recurrent, or already unrolled).
    """
    layers = [layer for layer in graph_lib.sublayers(model)
              if isinstance(layer, keras.layers.RNN) and not layer.unroll]
    for layer in layers:
        layer.unroll = True
    try:
        yield [layer.name for layer in layers]
    finally:
        for layer in layers:
            layer.unroll = False


# tf2onnx private API, touched here only: `TransposeOptimizer._mul_handler` (swapped in and restored by
# `_tf2onnx_fixes`) and the optimizer's graph `self._g` inside the handler. Third-party internals
# (tf2onnx 1.17); tests/export/test_onnx.py's LayerNormalization-at-1x1 test pins the fix.
_TF2ONNX_LOCK = threading.Lock()


def _squared_mul_handler(handler):
    """tf2onnx's TransposeOptimizer `_mul_handler`, also transposing the shape it records for `Mul(t, t)`.

    When both inputs of a Mul are one NHWC Transpose `t` (TFLite's SQUARED_DIFFERENCE, as in
    LayerNormalization's variance, becomes `Sub` then `Mul(d, d)`), tf2onnx 1.17 moves the Transpose
    after the Mul but keeps the Mul's NHWC shape on what is now an NCHW tensor (its other branches
    transpose it back: `_switch_transpose_and_node`). `post_optimize_action` then replaces a
    Transpose of that tensor whose spatial size is 1x1 by a Reshape to the wrong shape
    (`[-1, 1, C, 1]` instead of `[-1, 1, 1, C]`): the file loads, and a later op fails at run time
    or broadcasts to a wrong result (ConvNeXt's last stage at 1x1: its residual QLinearAdd of
    `(batch, C, 1, 1)` and `(batch * C, C, 1, 1)`). This records the shape the Mul really has.
    """
    from tf2onnx.optimizer.transpose_optimizer import invert_perm

    def mul_handler(self, trans, node):
        squared = all(name == trans.output[0] for name in node.input)
        shape = self._g.get_shape(node.output[0])
        handled = handler(self, trans, node)
        if handled and squared and shape:
            perm_inv = invert_perm(trans.get_attr_value("perm"))
            self._g.set_shape(node.output[0], [shape[i] for i in perm_inv])
        return handled

    return mul_handler


class _tf2onnx_fixes:
    """A context manager: tf2onnx's TransposeOptimizer with `_squared_mul_handler` while it converts.

    Held under a lock (the handler is a class attribute); the original is restored on exit.
    """

    def __enter__(self):
        from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

        _TF2ONNX_LOCK.acquire()
        try:
            self._original = TransposeOptimizer.__dict__["_mul_handler"]
            TransposeOptimizer._mul_handler = _squared_mul_handler(self._original)
        except BaseException:
            _TF2ONNX_LOCK.release()
            raise

    def __exit__(self, *exc):
        from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

        TransposeOptimizer._mul_handler = self._original
        _TF2ONNX_LOCK.release()
        return False


def _int8_flatbuffer(model, strict, batch_size):
    """The full-integer, float-I/O TFLite flatbuffer tf2onnx converts: `(data, details, batch_size, note)`.

    Some graphs convert only with a static batch (a recurrent layer's while loop: the converter lowers
    its TensorList only with a static element shape). For a symbolic batch (`batch_size=None`) such a
    model is traced with its recurrent layers unrolled (plain float ops that take any batch); where
    that fails too, with batch 1 rather than not at all. `note` says which (None: as asked).
    """
    try:
        data, details = tflite_bytes(model, "int8", input_type="float32", output_type="float32", strict=strict,
                                     batch_size=batch_size)
        return data, details, batch_size, None
    except ExportError as e:
        if batch_size is not None or (e.field != "float_ops" and e.__cause__ is None):
            raise  # a fixed batch asked for, or what the mode cannot express: batch 1 would fail the same
        why = (("fails" if e.field != "float_ops" else f"leaves {e.layer} in float") +
               f" ({str(e).splitlines()[0][:200]})")
        error = e
    try:
        with _unrolled_recurrent(model) as unrolled:
            if not unrolled:
                raise error
            data, details = tflite_bytes(model, "int8", input_type="float32", output_type="float32",
                                         strict=strict, batch_size=None)
        return data, details, None, (f"recurrent layers traced unrolled over their time steps "
                                     f"({', '.join(unrolled)}), float ops with no loop, for a symbolic batch: "
                                     f"with their loops the TFLite converter {why}")
    except (ExportError, ValueError):  # ValueError: Keras cannot unroll an unknown sequence length
        data, details = tflite_bytes(model, "int8", input_type="float32", output_type="float32",
                                     strict=strict, batch_size=1)
        return data, details, 1, f"written with batch 1: with a symbolic batch the TFLite converter {why}"


def _tf2onnx_convert(data, opset):
    """tf2onnx's ONNX model of int8 flatbuffer `data` at `min(opset, 18)`; returns `(proto, that opset)`.

    tf2onnx reads a file, so the flatbuffer goes to a temporary one (removed after). Its transpose
    optimizer runs with `_tf2onnx_fixes` and its TFL_GELU errors are kept out of the log.
    """
    import tf2onnx

    data, _ = loops.float_loop_carries(data)  # recurrent loops: tf2onnx types int8 loop carries wrongly
    fd, tmp = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        base = min(opset, _TF2ONNX_MAX_OPSET)
        with warnings.catch_warnings():  # tf2onnx reads the flatbuffer with the deprecated tf.lite.Interpreter
            warnings.simplefilter("ignore")
            with _quiet_tf2onnx(), _tf2onnx_fixes():
                proto, _ = tf2onnx.convert.from_tflite(tmp, opset=base)
    except Exception as e:  # tf2onnx raises plain exceptions; name what failed
        raise ExportError("opset", opset, f"tf2onnx could not convert the integer model ({type(e).__name__}: "
                          f"{e})") from e
    finally:
        os.remove(tmp)
    return proto, base


def _raise_opset(proto, base, opset):
    """`proto` (at opset `base`) converted to `opset` by onnx's version converter (as it is if equal)."""
    if opset <= base:
        return proto
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(proto, opset)
    except Exception as e:  # the C++ converter's assertions arrive as RuntimeError
        raise ExportError("opset", opset, f"onnx's version converter could not raise the model from opset "
                          f"{base} to {opset} ({type(e).__name__}: {e}); pass opset={base}") from e
    del proto.graph.value_info[:]  # shapes the converter inferred: not needed, and they double small files
    return proto


def _edit_qdq(proto, infos, opset, batch_size, activation_type, weight_type):
    """Run the `keras_quant.export.qdq` rewrites on `proto` in place; returns the notes they call for."""
    notes = []
    qdq.qdq_around_data_movement(proto)
    if batch_size is None:
        qdq.name_batch_dimension(proto)
    if activation_type == "uint8":
        qdq.activations_to_uint8(proto)
    if opset >= INT4_OPSET:
        int4 = qdq.int4_weights(proto, infos)
        if int4:
            notes.append("4-bit weights written as INT4 initializers for: " + ", ".join(int4))
    elif any(i.bits < 8 for i in infos):
        notes.append(f"opset {opset} has no 4-bit type: sub-8-bit weights are int8 initializers holding values "
                     f"on their grid (INT4 needs opset {INT4_OPSET})")
    if weight_type == "uint8" and qdq.weights_to_uint8(proto):
        notes.append("8-bit weights stored as uint8 with zero point 128 (the same grid): onnxruntime's U8U8 "
                     "kernels, exact on x86 CPUs without VNNI where its int8-weight kernels saturate")
    return notes


def onnx_model(model, opset=INT4_OPSET, strict=True, activation_type="uint8", weight_type="uint8", batch_size=None):
    """The QDQ `onnx.ModelProto` of a quantized Keras model, and the report details (see `export_onnx`)."""
    import onnx
    import tf2onnx  # noqa: F401  (missing: fail before the TFLite conversion, as `_tf2onnx_convert` would after)

    _check_opset(opset)
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError("activation_type", activation_type, f"activation_type must be one of {ACTIVATION_TYPES}")
    if weight_type not in WEIGHT_TYPES:
        raise ConfigError("weight_type", weight_type, f"weight_type must be one of {WEIGHT_TYPES}")
    model = export_ready(model)  # finite grids, float32 (a mixed_float16 model's copy)
    data, details, batch_size, batch_note = _int8_flatbuffer(model, strict, check_batch_size(batch_size))
    proto, base = _tf2onnx_convert(data, opset)
    notes = list(details["notes"]) + ([batch_note] if batch_note else [])
    if qdq.decompose_gelu(proto):
        notes.append("GELU written as ONNX Erf / Tanh ops in float between its QuantizeLinear / DequantizeLinear "
                     "pair (tf2onnx has no conversion for TFLite's GELU)")
    _unconverted_ops(proto, model)
    proto = _raise_opset(proto, base, opset)
    notes += _edit_qdq(proto, plan_lib.weight_infos(model), opset, batch_size, activation_type, weight_type)
    proto.producer_name = "keras_quant"
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # a rewrite above wrote an invalid graph: a keras_quant bug, named as such
        raise ExportError("opset", opset, f"the QDQ model fails onnx.checker ({type(e).__name__}: {e}); please "
                          "report it to keras_quant with the model") from e
    return proto, dict(details, notes=tuple(n for n in notes if "stored as int8" not in n or opset < INT4_OPSET))


def _load_error(model, opset, error):
    """An `ExportError` for a model onnxruntime refuses: the layers of the nodes it names, and the remedy."""
    import re

    from keras_quant.export.flatbuffer import layer_names_of

    text = str(error)
    names = {layer.name for layer in graph_lib.sublayers(model)}
    layers = []
    for node in re.findall(r"Node:?\s*\(?([^\s()]+)", text):
        layers += [n for n in layer_names_of(node, names) if n not in layers]
    return ExportError("opset", opset, f"onnxruntime cannot load the exported model ({text.strip()[:400]}); "
                       f"try another opset (tf2onnx writes up to {_TF2ONNX_MAX_OPSET}), or export this model to "
                       "TFLite (kq.export_tflite), which runs the named layers", layer=", ".join(layers) or None)


@graph_lib.gc_paused()
def export_onnx(model, path, opset=INT4_OPSET, strict=True, activation_type="uint8", weight_type="uint8",
                batch_size=None):
    """Write a quantized Keras model as QDQ ONNX with keras_quant's scales and zero points.

    Args:
        model: A model from `kq.quantize_model` (PTQ or QAT) whose activations
            are at most 8 bits.
        path: Output `.onnx` file (written to a temporary file, then renamed).
        opset: ONNX opset, at least 13 (per-axis QDQ). From 21, 4-bit weights
            are INT4 initializers; below, int8 initializers on the 4-bit grid.
        strict: As for `export_tflite`: a quantized layer left in float is an error.
        activation_type: `"uint8"` (default; onnxruntime's CPU layout, U8S8) or
            `"int8"` for the activation integers. The same grid either way: uint8
            zero points are keras_quant's plus 128.
        weight_type: `"uint8"` (default: zero point 128, the same grid, for
            weights that reach beyond +-64) or `"int8"` (zero point 0) for 8-bit weights. onnxruntime's int8-weight
            (U8S8) kernels saturate on x86 CPUs without VNNI (AVX2, AVX-512F)
            and then differ from Keras by tens of steps; its uint8-weight (U8U8)
            kernels are exact everywhere, about 2x slower on such CPUs. Choose
            `"int8"` for runtimes that require signed symmetric weights
            (TensorRT) or CPUs with VNNI / ARM dot-product instructions.
        batch_size: None (default): a symbolic batch dimension named `"batch"`
            on every input and output, so one session runs any batch size. An
            integer fixes it (the file then takes only that batch).

    Returns:
        An `ExportReport` (`format="onnx"`, `mode="qdq"`) read back from the model.

    Raises:
        ExportError: What QDQ cannot express, named by layer, before conversion.
        ConfigError: For an opset below 13 or above the installed onnx's, or a bad `batch_size`.
    """
    import onnxruntime as ort

    proto, details = onnx_model(model, opset, strict, activation_type, weight_type, batch_size)
    data = proto.SerializeToString()
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _load_error(model, opset, e) from e
    write_atomic(path, data, make_parents=True)
    ops = dict(collections.Counter(n.op_type for n in proto.graph.node))
    _, dq_weights = qdq.qdq_tables(proto)
    elem = {1: "float32", 3: "int8", 2: "uint8", 5: "int16", 6: "int32", 7: "int64"}
    in_type = elem.get(proto.graph.input[0].type.tensor_type.elem_type, "other")
    out_type = elem.get(proto.graph.output[0].type.tensor_type.elem_type, "other")
    return ExportReport(
        path=str(path), format="onnx", mode="qdq", size_bytes=len(data), ops=ops, float_ops=details["float_ops"],
        weights=details["weights"], activations=details["activations"], input_type=in_type, output_type=out_type,
        notes=details["notes"],
    )
