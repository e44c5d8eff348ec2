"""Guards at the edges of the transforms: copies of user layers, values checked before a model or file is made.

- `copy_operation`: an unbuilt copy of a layer, a `keras.layers.Lambda`
  included: an in-memory Lambda is copied from its Python function (no
  deserialization of code is involved), so quantizing a model that holds
  one never needs Keras' unsafe mode; `.keras` files still load with
  `safe_mode=True` (`kq.runtime.load`).
- `check_model_qparams`: every quantizer variable of a model (scales, zero
  points, ranges) finite, before `quantize_model` returns it and before
  export writes it (`keras_quant.errors.NonFiniteError` naming the layer,
  the variable and the value).
- `float32_model`: a float32 copy of a model built under a float16 /
  bfloat16 / mixed dtype policy, for export (the converters' fake-quant ops
  take float32; the integer file is the same).

Example:

>>> qmodel = kq.quantize_model(model, calibration=result)   # checks its qparams   # doctest: +SKIP
>>> check_model_qparams(qmodel, where="export")               # doctest: +SKIP
"""

import keras
import numpy as np

from keras_quant import graph as graph_lib
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.errors import ExportError
from keras_quant.ops.checks import non_finite_error

__all__ = [
    "copy_operation", "check_model_qparams", "export_ready", "quantizer_variables", "float32_model", "float_policy",
]

# Endings of the names of a quantizer's own variables that hold a grid (QAT's schedule counters hold inf).
_GRID_VARIABLES = ("scale", "zero_point", "min", "max", "delta")


def copy_operation(op, name=None):
    """An unbuilt copy of `op` (`keras_quant.graph.copy_operation`), a `keras.layers.Lambda` made from its function.

    Keras copies a layer through its config, and a Lambda's config holds its
    function as serialized code, which safe mode refuses to load. The
    in-memory function object is the user's own code, already running in
    this process: the copy calls the same object.
    """
    if type(op) is keras.layers.Lambda:
        config = op.get_config()
        return keras.layers.Lambda(
            op.function, output_shape=getattr(op, "_output_shape", None), mask=op.mask, arguments=op.arguments,
            name=config["name"] if name is None else name, dtype=op.dtype_policy,
        )
    return graph_lib.copy_operation(op, name=name)


def quantizer_variables(model):
    """`[(layer name, variable)]`: the grid variables (scales, zero points, ranges) of every quantizer in `model`.

    The variables a `QuantizeWrapper` or `ActivationQuantizer` owns itself
    (not the wrapped layer's weights, nor a folded BatchNormalization's), whose
    names end in one of `_GRID_VARIABLES`.
    """
    found = []
    for layer in graph_lib.sublayers(model) if isinstance(model, keras.Model) else [model]:
        if not isinstance(layer, (QuantizeWrapper, ActivationQuantizer)):
            continue
        inner = []
        for sub in (getattr(layer, "layer", None), getattr(layer, "batch_norm", None)):
            inner += [] if sub is None else sub.weights
        skip = {id(v) for v in inner}
        found += [(layer.name, v) for v in layer.weights
                  if id(v) not in skip and v.name.split("/")[-1].endswith(_GRID_VARIABLES)]
    return found


def check_model_qparams(model, where="quantize_model"):
    """Raise `NonFiniteError` if a quantizer variable of `model` holds NaN or Inf (read on the host).

    Args:
        model: A Keras model (or one layer) holding `QuantizeWrapper` / `ActivationQuantizer` layers.
        where: What is being made, for the message (`"quantize_model"`, `"export"`).

    Raises:
        NonFiniteError: Naming the layer, the variable and its value.
    """
    for layer_name, variable in quantizer_variables(model):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise non_finite_error(
                variable.name, value, layer=layer_name,
                reason=f"{where} refuses a NaN / Inf quantization grid (from non-finite or overflowing "
                       "weights, calibration ranges or scales set by hand)",
            )


def float_policy(model):
    """The first non-float32 floating dtype policy name among `model`'s layers (itself included), or None."""
    for layer in [model] + graph_lib.sublayers(model):
        policy = getattr(layer, "dtype_policy", None)
        name = getattr(policy, "name", str(policy))
        compute, variable = getattr(policy, "compute_dtype", None), getattr(policy, "variable_dtype", None)
        if any(d is not None and "float" in str(d) and str(d) != "float32" for d in (compute, variable)):
            return name
    return None


def _float32_config(config):
    """`config` (a layer's, nested) with every floating dtype policy set to float32."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and _is_float_policy(value):
                out[key] = "float32"
            else:
                out[key] = _float32_config(value)
        return out
    if isinstance(config, (list, tuple)):
        return type(config)(_float32_config(v) for v in config)
    return config


def _is_float_policy(value):
    if isinstance(value, dict):  # a serialized DTypePolicy
        value = value.get("config", {}).get("name", "")
    return isinstance(value, str) and ("float" in value) and value != "float32"


def _float32_layer(layer):
    if type(layer) is keras.layers.Lambda:
        return keras.layers.Lambda(layer.function, output_shape=getattr(layer, "_output_shape", None),
                                   mask=layer.mask, arguments=layer.arguments, name=layer.name, dtype="float32")
    config = _float32_config(keras.saving.serialize_keras_object(layer))
    return keras.saving.deserialize_keras_object(config)


def float32_model(model):
    """`model` itself if every layer computes in float32; else a float32 copy with the same weights (cast).

    A model built under `mixed_float16` (or with `dtype="float16"` /
    `"bfloat16"` layers) computes in 16 bits, but its quantizers' scales and
    zero points are float32 and its integer grid is the same: export traces a
    float32 copy, so the integer file is the one a float32 model gives. The
    copy's float inputs are float32. Functional and Sequential models only
    (`keras.models.clone_model`).

    Raises:
        ExportError: For a model that cannot be copied so (a subclassed model), naming its dtype policy.
    """
    policy = float_policy(model) if isinstance(model, keras.Model) else None
    if policy is None:
        return model
    if graph_lib.functional(model) is None:
        raise ExportError("dtype_policy", policy, "a subclassed model computing in 16 bits cannot be copied to "
                          "float32 for export; build it with dtype='float32'", layer=model.name)
    inputs = [keras.Input(batch_shape=t.shape, name=t.name.split(":")[0],
                          dtype="float32" if "float" in str(t.dtype) else t.dtype) for t in model.inputs]
    copy = keras.models.clone_model(model, input_tensors=inputs if len(inputs) > 1 else inputs[0],
                                    clone_function=_float32_layer)
    if len(copy.weights) != len(model.weights):
        raise ExportError("dtype_policy", policy, "the float32 copy of the model for export does not hold the same "
                          "variables", layer=model.name)
    for target, source in zip(copy.weights, model.weights):
        target.assign(np.asarray(keras.ops.convert_to_numpy(source)).astype(str(target.dtype)))
    if hasattr(model, "quantization_report"):  # what export's strict check reads (float islands kept by design)
        copy.quantization_report = model.quantization_report
    return copy


def export_ready(model):
    """The model export traces: its quantizer variables checked finite, float32 (`float32_model`).

    Raises:
        NonFiniteError: A NaN / Inf scale, zero point or range, naming the layer and variable.
        ExportError: A 16-bit model that cannot be copied to float32, naming its dtype policy.
    """
    if not isinstance(model, keras.Model):
        return model
    check_model_qparams(model, where="export")
    return float32_model(model)
