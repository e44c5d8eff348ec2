"""The TFLite converter run for export: the trace it converts, its setup, and its errors by layer.

`concrete_function` traces a quantized model's inference form with its
variables as constants; `frozen_graph_def` gives that trace's GraphDef when it
is already frozen; `make_converter` sets up `tf.lite.TFLiteConverter` for an
export mode; `convert` runs it and finishes the file's IO passes;
`converter_error` turns a converter failure into an `ExportError` naming the
layers. The converter's private methods this relies on are overridden in
one place, `_frozen_converter_class` (`_freeze_concrete_function`,
`_validate_inputs`, `_optimize_tflite_model` of TensorFlow's
`lite.TFLiteConverterBase`): tests/export/test_tflite.py pins that the
result equals the converter's own passes.

Example:

>>> cf = concrete_function(qmodel, plan_lib.build_plan(qmodel, "int8"))   # doctest: +SKIP
>>> data, flat = convert(qmodel, plan, None, "int8", "int8", "int8", 1)    # doctest: +SKIP
"""

import functools
import types
import warnings

import keras

from keras_quant import graph as graph_lib
from keras_quant.errors import ExportError
from keras_quant.export import flatbuffer, plan as plan_lib
from keras_quant.layers.inference import inference_scope

__all__ = ["concrete_function", "frozen_graph_def", "make_converter", "convert", "converter_error"]


def _input_specs(model, batch_size):
    import tensorflow as tf

    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ExportError("model.inputs", None, "export needs a model with known inputs (a Functional or "
                          "Sequential model, or a subclassed model that has been built by calling it on "
                          "keras.Input tensors)", layer=model.name)
    specs = []
    for i, t in enumerate(inputs):
        shape = (batch_size,) + tuple(t.shape[1:])
        if any(d is None for d in shape[1:]):
            raise ExportError("input_shape", tuple(t.shape), "export needs every input dimension but the batch "
                              "known", layer=model.name)
        specs.append(tf.TensorSpec(shape, t.dtype, name=f"input_{i}"))
    return specs


def concrete_function(model, plan, batch_size=1, values=None):
    """`model`'s inference form traced with `plan`, its variables read as constants.

    The trace runs in a `keras.StatelessScope` that gives each variable read
    its current value as a constant made inside the graph: the function is
    frozen as traced (`frozen_graph_def`), and the converter need not freeze it
    (`make_converter`; its general freeze re-imports the whole graph, about a
    fifth of a small model's export). A variable read outside Keras (a
    captured resource) or a graph with function bodies (a recurrent loop) is
    left to the converter's own freeze. `values`: the model's
    `plan.VariableValues`, when the caller has read them.
    """
    import tensorflow as tf

    specs = _input_specs(model, batch_size)
    single = len(specs) == 1
    values = (values or plan_lib.VariableValues(model)).arrays

    def serve(*xs):
        with _ConstantScope(values):
            return model(xs[0] if single else list(xs), training=False)

    with inference_scope(plan):
        return tf.function(serve, autograph=False).get_concrete_function(*specs)


class _ConstantScope(keras.StatelessScope):
    """A `StatelessScope` whose variables read as constants of `values` (`{id(variable): array}`), each
    made in the current graph when first read: a variable the trace does not read (a kernel the plan
    replaces with its grid values) adds nothing to the graph, and an eager tensor would be captured as
    an input rather than embedded."""

    def __init__(self, values):
        super().__init__()
        self._values = values

    def get_current_value(self, variable):
        value = super().get_current_value(variable)
        if value is None and id(variable) in self._values:
            import tensorflow as tf

            array = self._values[id(variable)]
            value = self.state_mapping[id(variable)] = tf.constant(array, dtype=array.dtype)
        return value


def frozen_graph_def(cf):
    """The GraphDef of a concrete function that reads no variable and calls no function body (its graph is
    its frozen form), else None (the converter freezes it)."""
    if cf.captured_inputs:
        return None
    graph_def = cf.graph.as_graph_def()
    return None if graph_def.library.function else graph_def


@functools.lru_cache(maxsize=None)
def _frozen_converter_class():
    import tensorflow as tf

    class FrozenConverter(tf.lite.TFLiteConverter):
        """The converter for a concrete function already frozen (`frozen_graph_def`): that GraphDef as is,
        set as `graph_def` (serialising a graph with its constants is not done twice).

        It also leaves its last Python passes (the model's IO types, buffer
        deduplication, the conversion metadata) to `flatbuffer.finish_conversion`,
        which export runs on the model it unpacks anyway: `finish_io` holds the
        IO types to set and `finish_metadata` the metadata to write, or both are
        None when the converter ran the passes itself.
        """

        graph_def = finish_io = finish_metadata = None

        def _freeze_concrete_function(self):
            (func,) = self._funcs
            return self.graph_def, list(func.inputs), list(func.outputs), func

        def _validate_inputs(self, graph_def, input_tensors):
            # The base class also collects the Python stack of every traced op, for the source locations
            # in its error messages: a tenth of a small model's export. `converter_error` names the
            # layers from the op names, which the messages keep, so that is done without the stacks.
            funcs, self._funcs = self._funcs, [types.SimpleNamespace(graph=None)]
            try:
                super()._validate_inputs(graph_def, input_tensors)
            finally:
                self._funcs = funcs

        def _optimize_tflite_model(self, model, quant_mode, debug_options=None, quant_io=True):
            if (quant_mode.is_post_training_integer_quantization() or self._sparsify_model()
                    or self.experimental_use_stablehlo_quantizer or self._experimental_use_buffer_offset):
                return super()._optimize_tflite_model(model, quant_mode, debug_options, quant_io)
            io = (tf.float32, tf.float32)
            if quant_mode.is_integer_quantization():
                io = (self.inference_input_type or tf.float32, self.inference_output_type or tf.float32)
            self.finish_io = io
            if not self.exclude_conversion_metadata:  # written after the passes, as the converter does
                self.finish_metadata, self.exclude_conversion_metadata = self._metadata, True
            return model

    return FrozenConverter


def make_converter(cf, mode, input_type, output_type):
    """A `tf.lite.TFLiteConverter` of concrete function `cf` set up for export `mode` and the IO type names.

    A trace `frozen_graph_def` can read is given to `_frozen_converter_class`'s converter as it is;
    any other to TensorFlow's own converter, which freezes it.
    """
    import tensorflow as tf

    types = {"int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16, "float32": tf.float32}
    graph_def = frozen_graph_def(cf)
    if graph_def is None:
        conv = tf.lite.TFLiteConverter.from_concrete_functions([cf])
    else:
        conv = _frozen_converter_class().from_concrete_functions([cf])
        conv.graph_def = graph_def
    if mode == "float32":
        return conv
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int16x8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "int16x8"):
        conv.inference_input_type = types[input_type]
        conv.inference_output_type = types[output_type]
    return conv


def _layers_running(model, graph, op_types):
    """Names of `model`'s layers whose traced TensorFlow ops include one of `op_types` (by the op's scope)."""
    names = {layer.name for layer in graph_lib.sublayers(model)}
    found = []
    for op in graph.get_operations() if graph is not None else ():
        if op.type in op_types:
            found += [n for n in flatbuffer.layer_names_of(op.name, names) if n not in found]
    return found


def converter_error(model, mode, error, graph=None):
    """An `ExportError` for an exception the TFLite converter raised: what failed, the layers, the remedy.

    Args:
        model: The model converted.
        mode: The export mode.
        error: The converter's exception (its `ConverterError` carries MLIR diagnostics).
        graph: The traced `tf.Graph`, to find the layers whose ops the converter names.
    """
    import re

    text = str(error)
    details = list(getattr(error, "errors", None) or ())  # converter_error_data_pb2 records: message, location
    select = re.search(r"TF Select ops: ([^\n]+)", text)
    op_types = set(re.findall(r"'tf\.(\w+)' op", text))
    if select:
        op_types |= {op.strip() for op in select.group(1).split(",")}
    layers = _layers_running(model, graph, op_types)
    names = {layer.name for layer in graph_lib.sublayers(model)}
    for record in details:  # the traced op each diagnostic points at (`functional_1/cat_1/concat`)
        for call in getattr(getattr(record, "location", None), "call", ()):
            layers += [n for n in flatbuffer.layer_names_of(call.name, names) if call.name and n not in layers]
    if select:
        ops = select.group(1).strip()
        reason = (f"TFLite has no builtin kernel for the TensorFlow op(s) {ops} (the converter would need TF Select "
                  "ops, which LiteRT does not run by default); replace the layer by ops TFLite has (for "
                  "MaxPooling3D: a strided Conv3D, or 2D pooling over reshaped slices), or leave it out of the "
                  "exported model")
        field, value = "ops", ops
    else:
        first = next((r.error_message.strip() for r in details if getattr(r, "error_message", "")), None)
        if first is None:
            first = next((line.split("error:", 1)[1].strip() for line in text.splitlines() if "error:" in line),
                         text.strip()[:300])
        reason = f"the TFLite converter failed ({type(error).__name__}: {first})"
        field, value = "mode", mode
    return ExportError(field, value, reason, layer=", ".join(layers) or None)


def convert(model, plan, values, mode, input_type, output_type, batch_size):
    """Trace `model` with `plan` and run the TFLite converter; returns `(data, flat, finished)`.

    `data` is the converter's bytes and `flat` the file as a `flatbuffer.FlatModel`; `finished`
    says whether the IO passes were run here on `flat` (`flatbuffer.finish_conversion`: then
    `flat.to_bytes()` gives the file, `data` does not). A converter failure becomes `converter_error`'s
    `ExportError` (the converter's exception chained).

    Args:
        model: The quantized Keras model.
        plan: Its export plan (`keras_quant.export.plan.build_plan`).
        values: Its `plan.VariableValues`, or None.
        mode: The export mode.
        input_type, output_type: The file's IO type names (`"int8"`, `"float32"`, ...).
        batch_size: The batch dimension, or None for a dynamic one.
    """
    cf = concrete_function(model, plan, batch_size, values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        converter = make_converter(cf, mode, input_type, output_type)
        try:
            data = converter.convert()
        except Exception as e:  # the converter's ConverterError (MLIR diagnostics), or anything it raises
            raise converter_error(model, mode, e, cf.graph) from e
    flat = flatbuffer.FlatModel(data)
    finish_io = getattr(converter, "finish_io", None)
    if finish_io is not None:
        flatbuffer.finish_conversion(flat, finish_io, converter.finish_metadata)
    return data, flat, finish_io is not None
