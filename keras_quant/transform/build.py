"""`quantize_model`: a new Keras model with quantizers placed where TFLite quantizes.

Post-training quantization (`mode="ptq"`) rewrites a Functional or Sequential
model's graph (nested models are inlined) in three steps:

1. Flatten: run the graph with Keras' own traversal
   (`Functional._run_through_graph`, as `keras.models.clone_model` does), each
   leaf layer replaced by a clone with the same weights, nested
   Functional/Sequential models run inline. The float model is not touched.
2. Plan, from the layer rules (`keras_quant.layers.rules.RULES`) and the config: each
   compute layer gets a `QuantizeWrapper` (frozen per-channel weight
   quantizers). A BatchNormalization that is the compute layer's only
   consumer is folded into it, and a ReLU/ReLU6 after that is fused (TFLite
   fuses both), so the output quantizer goes after the last layer of that
   chain, with that layer's calibration statistics. Merge, pool, unfolded
   norm and other activation layers, and every float model input, get an
   `ActivationQuantizer` on their output; passthrough layers get nothing.
   As in TFLite: an Add / Subtract / Multiply followed by a ReLU / ReLU6 has
   one quantizer, after the activation (ADD fuses it); an average pool
   keeps its input's range (AVERAGE_POOL_2D has one scale); a Concatenate's
   inputs take its range where the converter writes them on its scale (an
   input only the Concatenate reads, and a pooled / padded tensor with no
   quantizer of its own, requantized for all its readers:
   `ranges.plan_concat_ranges`); the first input an Add alone reads spans
   the Add's output range too, as in the converter's files
   (`ranges.plan_add_ranges`); and a layer kept
   in float whose output feeds the integer graph gets a quantizer there (an
   integer runtime quantizes that tensor, and must not borrow a range). A
   compute layer with its own softmax / sigmoid / tanh / ... activation
   (TFLite runs it as a separate op) is also quantized before it, with the
   statistics the callback keys `"<layer>:preactivation"`.
3. Rebuild: run the flat graph again over new `keras.Input`s, creating the
   planned layers, with activation scales from `calibration.qparams(key, spec)`.

Layers the config sets to None stay float. Layers with no rule stay float and
are listed in `qmodel.quantization_report.unsupported` (with a warning),
unless the config names them explicitly, which raises `UnsupportedLayerError`.

Example:

>>> cb = kq.CalibrationCallback()
>>> model.predict(x_calib, callbacks=[cb])
>>> qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=cb.result)
>>> qmodel.quantization_report.folded
(('bn', 'conv'),)
"""

import warnings

import keras
import numpy as np
from keras import tree

from keras_quant import graph as graph_lib
from keras_quant.config import QuantConfig
from keras_quant.errors import ConfigError, NoDataError, NonFiniteError
from keras_quant.layers import qat_quantizer
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.integer import IntegerBinaryOp
from keras_quant.layers.rules import PREACTIVATION, fixed_output_qparams, get_rule, is_keras_op
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.ops.checks import check_qparams, non_finite_error
from keras_quant.transform.guards import check_model_qparams
from keras_quant.transform.integer_layers import (
    call_binary_op, fused_scale, integer_binary_op, integer_layer, integer_merge, tensor_grid, tensor_scale,
)
from keras_quant.transform.plan import plan_model
from keras_quant.transform.ranges import (
    SHARED_INPUT_MERGES, has_fixed_grid, plan_add_ranges, plan_concat_ranges, resolve_ranges, share_merge_inputs,
    union_qparams,
)
from keras_quant.transform.report import QuantizationReport
from keras_quant.transform.steps import Names, build_separable, build_step, finish_separable, finish_step

__all__ = ["quantize_model", "MODES"]

# The modes this module implements: a frozen post-training model, or a trainable QAT model.
MODES = ("ptq", "qat")


def _fixed_qparams(steps):
    """Give each quantizer of a softmax / sigmoid / tanh output TFLite's fixed grid (PTQ and QAT alike).

    TFLite's integer SOFTMAX / LOGISTIC / TANH write that grid whatever the
    calibration says; a QAT model keeps it frozen (it is neither observed
    nor learned), or the file would requantize where the Keras model did not.
    """
    for step in steps:
        fixed = fixed_output_qparams(step.fixed, step.quant_spec)
        if fixed is not None:
            step.qparams = tuple(np.asarray(v, dtype="float32") for v in fixed)


def _fetch_qparams(steps, calibration):
    """Look up every activation quantizer's scale and zero point before anything is built."""
    requests = [s for s in steps if s.quant_spec is not None and s.range_from is None and not has_fixed_grid(s)]
    inner = [s for s in steps if s.inner_key is not None]
    if (requests or inner) and calibration is None:
        first = requests[0].quant_key if requests else inner[0].inner_key
        raise ConfigError(
            "calibration", None,
            f"the config quantizes activations (first: '{first}'), so quantize_model needs a kq.CalibrationResult; "
            "calibrate first with kq.CalibrationCallback, or use a weights-only config (activations=None)",
        )
    for step in requests:
        step.qparams = _lookup(calibration, step.quant_key, step.quant_spec, step.quant_what)
    for step in steps:  # quantizers inside a layer: before its own activation, between separable halves
        if step.preact_key is not None and calibration is not None:
            step.preact_qparams = _lookup(calibration, step.preact_key, step.preact_spec,
                                          "the input of the layer's own activation")
        if step.inner_key is not None and calibration is not None:
            step.inner_qparams = _lookup(calibration, step.inner_key, step.inner_spec,
                                         "the depthwise output inside the separable convolution")
    resolve_ranges(steps)


def _lookup(calibration, key, spec, what):
    """The calibrated `(scale, zero_point)` of a quantizer."""
    if key not in calibration:
        raise NoDataError(
            key, reason=f"quantize_model needs activation statistics for layer '{key}' ({what}), "
            "and the calibration result has none for it", layer=key,
        )
    try:
        scale, zero_point = calibration.qparams(key, spec)
    except NoDataError as e:
        raise NoDataError(
            key, reason=f"quantize_model needs activation statistics for layer '{key}' ({what}): {e}", layer=key,
        ) from e
    try:
        return check_qparams(scale, zero_point, spec, layer=key, field="scale")
    except NonFiniteError as e:
        try:
            stats = calibration[key]
            seen = f"the calibration saw [{getattr(stats, 'min', None)}, {getattr(stats, 'max', None)}]"
        except (KeyError, TypeError):
            seen = "see the calibration's statistics"
        raise non_finite_error(e.field, e.value, layer=key, reason=(
            f"the '{spec.observer}' range of {what} gives no finite int{spec.bits} grid ({seen}); "
            "calibrate on finite data within float32's range, or keep the layer in float")) from None


@graph_lib.gc_paused()
def quantize_model(model, config=None, calibration=None, mode="ptq", observe_steps=None, bn_statistics="quantized",
                   shared_merges=SHARED_INPUT_MERGES):
    """A new Keras model with fake-quantized weights and activations: post-training or trainable.

    `mode="ptq"` gives the frozen post-training model. `mode="qat"` gives a
    model to train with ordinary `fit`: compute layers become
    `kq.QuantizeWrapper`s in `"qat"` mode (a following BatchNormalization is
    folded into them as in Jacob et al. 2018, not removed), activation
    quantizers observe, learn (LSQ, for `learnable` specs) or freeze their
    ranges, and the inputs of each residual Add and each Concatenate share
    one quantizer, as do an average pool's input and output (TFLite's
    AVERAGE_POOL_2D keeps one scale). The output of a softmax / sigmoid /
    tanh keeps TFLite's fixed grid (`kq.layers.rules.FIXED_GRIDS`), frozen:
    neither observed nor learned. A subclassed model (no graph to rewrite)
    is copied and its compute layers wrapped in place of the originals.

    Args:
        model: A Functional or Sequential Keras model (nested ones are
            inlined; `"qat"` also takes subclassed models). It is not modified.
        config: A `kq.QuantConfig`; None means `kq.QuantConfig()` (W8A8:
            int8 per-channel symmetric weights, int8 per-tensor activations).
        calibration: A `kq.CalibrationResult` (anything with
            `qparams(key, spec)` and `key in calibration`). Needed by
            `"ptq"` when the config quantizes activations; optional for
            `"qat"`, where it initialises the activation ranges (else the first
            training batches do).
        mode: `"ptq"`: frozen quantizers with scales from the weights and the
            calibration statistics. `"qat"`: trainable quantizers.
        observe_steps: QAT: training steps the ranges are observed before
            learnable quantizers learn. Default: learnable quantizers learn
            from the first step when a calibration is given, else after
            `keras_quant.layers.qat_quantizer.LSQ_OBSERVE_STEPS`; the others observe (moving
            average) until changed (`kq.qat.set_mode`, `kq.qat.QATScheduler`).
        bn_statistics: QAT: where a folded BatchNormalization's batch
            statistics come from in training, `"quantized"` (one pass) or
            `"float"` (an extra float pass, as in Jacob et al. 2018); see
            `kq.QuantizeWrapper`.
        shared_merges: Merge layer types whose inputs are put on a shared
            range (default Add and Concatenate). QAT: their inputs share one
            activation quantizer. PTQ: with Add listed, the first input that
            an Add alone reads (the residual branch's last convolution, through
            a folded BatchNormalization or Dropout) takes the union of its
            range and the Add's output range, as the converter's own files do
            (`keras_quant.transform.ranges.plan_add_ranges`: a coarser grid, but no
            clipping of the branch where held-out data exceeds the
            calibration). TFLite's CONCATENATION needs one scale, so a PTQ
            Concatenate's sole-reader inputs always take its range; its ADD
            rescales its inputs, so `(keras.layers.Concatenate,)` keeps each
            residual input on its own range (in QAT this can matter at 4 bits
            when a skip tensor also feeds other layers); `()` shares no merge
            inputs in QAT. An average pool shares its input's quantizer
            whatever this says.

    Returns:
        A new `keras.Model` with the float model's input names, shapes and
        dtypes, and a `quantization_report` attribute (`QuantizationReport`).

    Raises:
        ConfigError: For an unknown mode or config, a subclassed or unbuilt
            model, or missing calibration when activations are quantized.
        UnsupportedLayerError: For a rule-less layer the config names explicitly.
        NoDataError: When the calibration has no statistics for a layer that needs an activation quantizer.
        NonFiniteError: A NaN / Inf / float32-overflowing range or weight, naming the layer, field and value.

    Example:

    >>> qmodel = quantize_model(model, kq.QuantConfig.int8(), calibration=result)
    >>> qmodel.save("model_int8.keras")
    """
    graph, config = _check_arguments(model, config, mode)
    if graph is None:  # a built subclassed model, for QAT
        from keras_quant.transform.subclassed import quantize_subclassed

        return quantize_subclassed(model, config, calibration, observe_steps)
    planned, steps, groups, observe_steps = _plan(model, config, calibration, mode, observe_steps, shared_merges)
    builder = _GraphBuilder(planned, config, mode, observe_steps, bn_statistics)
    qmodel = builder.run(model)
    qmodel.quantization_report = _report(planned, builder.quantizers, groups)
    _warn_unsupported(planned.report["unsupported"])
    return qmodel


def _warn_unsupported(unsupported):
    """Warn (at `quantize_model`'s caller) about the layers left in float for want of a rule."""
    if unsupported:
        warnings.warn(
            f"quantize_model: no quantization rule for layer(s) {unsupported}; they stay in float "
            "(see qmodel.quantization_report.unsupported, or declare rules with kq.layers.register_rule)",
            stacklevel=3,
        )


def _check_arguments(model, config, mode):
    """`(graph, config)`: the model's Functional graph (None: a built subclassed model for QAT), the config.

    Raises:
        ConfigError: For an unknown mode or config, or a model `quantize_model` cannot rewrite.
    """
    if mode not in MODES:
        raise ConfigError("mode", mode, f"mode must be one of {MODES}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError("config", config, "expected a kq.QuantConfig or None")
    graph = graph_lib.functional(model)
    if graph is None and mode == "qat" and model.built and not isinstance(model, keras.Sequential):
        return None, config
    if graph is None:
        reason = (
            "the Sequential model is not built; give it a keras.Input or call build() first"
            if isinstance(model, keras.Sequential)
            else "quantize_model rewrites the graph of Functional and Sequential models only; wrap the "
            f"layers of this subclassed {type(model).__name__} in kq.QuantizeWrapper yourself"
        )
        raise ConfigError("model", getattr(model, "name", model), reason)
    return graph, config


def _plan(model, config, calibration, mode, observe_steps, shared_merges):
    """`(planned, steps, groups, observe_steps)`: the plan with its ranges and calibrated scales.

    `steps`: the model inputs' steps then every layer's; `groups`: QAT's merge inputs
    sharing one quantizer; `observe_steps`: QAT's default, given a calibration.
    """
    # The copies' weights are read from the originals. QAT trains the affine layers' float form (not folded).
    planned = plan_model(model, config, weights=False, fold_inputs=mode == "ptq")
    flat, plan = planned.flat, planned.steps
    if mode == "ptq":
        plan_concat_ranges(flat, plan)
        if any(issubclass(keras.layers.Add, cls) for cls in shared_merges):
            plan_add_ranges(flat, plan)
    steps = planned.inputs + list(plan.values())
    _fixed_qparams(steps)
    if mode == "ptq" or calibration is not None:
        _fetch_qparams(steps, calibration)
    groups = share_merge_inputs(flat, plan, planned.inputs, shared_merges) if mode == "qat" else []
    if mode == "qat" and calibration is not None:
        observe_steps = qat_quantizer.default_observe_steps(observe_steps, [s.quant_spec for s in steps], True)
    return planned, steps, groups, observe_steps


def _report(planned, quantizers, groups):
    """The `QuantizationReport` of a built model."""
    report = planned.report
    wrapped = tuple(layer.name for s in planned.steps.values() for layer in (s.inner_layer, s.layer)
                    if isinstance(layer, QuantizeWrapper))
    return QuantizationReport(
        wrapped=wrapped,
        folded=tuple(report["folded"]),
        activation_quantizers=tuple(quantizers),
        float_layers=tuple(report["float_layers"]),
        unsupported=tuple(report["unsupported"]),
        shared=tuple(tuple(st.quant_key for st in group) for group in groups),
        float_islands=tuple(report["float_islands"]),
        rewritten=tuple(report["rewritten"]),
        input_folds=tuple(report["input_folds"]),
    )


def _float_input(step, x):
    """A quantized integer model input (values a Dense / Conv reads) cast to float32 first, as that layer would."""
    return keras.ops.cast(x, "float32") if step.quant_spec is not None and "float" not in str(x.dtype) else x


class _GraphBuilder:
    """Runs the flat graph over new inputs, creating each planned step's layers and quantizers (step 3).

    `quantizers` lists `(quantizer layer name, calibration key)` as they are made.
    PTQ tracks, per Keras tensor, the int8 grid its values lie on (`tensor_grids`:
    a per-tensor quantizer's output, or a tensor read through layers that keep their
    input's grid), for the integer layers that read it.
    """

    def __init__(self, planned, config, mode, observe_steps, bn_statistics):
        self.flat, self.plan, self.input_steps = planned.flat, planned.steps, planned.inputs
        self.config, self.mode, self.ptq = config, mode, mode == "ptq"
        self.observe_steps, self.bn_statistics = observe_steps, bn_statistics
        self.quantizer_kwargs = {"mode": "qat", "observe_steps": observe_steps} if mode == "qat" else {}
        self.names = Names(op.name for op in graph_lib.operations(self.flat.model))
        self.quantizers = []
        self.tensor_grids = {}

    def run(self, model):
        """The new `keras.Model` (compiled as `model` was)."""
        flat = self.flat
        new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=key)
                      for t, key in zip(flat.model.inputs, flat.input_keys)]
        with graph_lib.fast_variable_creation():
            quantized = [self.add_quantizer(s, _float_input(s, x), s.quant_key)
                         for s, x in zip(self.input_steps, new_inputs)]
            outputs = graph_lib.run(flat.model, quantized, self.call)
        inputs = new_inputs
        if flat.inputs_struct is not None:
            inputs = tree.pack_sequence_as(flat.inputs_struct, new_inputs)
        qmodel = keras.Model(inputs, outputs, name=model.name)
        check_model_qparams(qmodel)  # weights' grids too: no NaN / Inf scale reaches a model
        if getattr(model, "compiled", False):
            # `compile`, not `compile_from_config`: that also creates the optimizer's slot variables now
            # (a tenth of a small model's quantize_model); `fit` creates them when it first needs them.
            qmodel.compile(**keras.saving.deserialize_keras_object(model.get_compile_config()))
        return qmodel

    def add_quantizer(self, step, x, base, input_scale=None):
        """`x` through the step's activation quantizer (created on first use), or `x` when it has none."""
        if step.quant_spec is None:
            return x
        if step.group is not None:  # QAT: one quantizer shared by the inputs of a merge
            first = step.group[0]
            if first.quantizer is None:
                qparams = (union_qparams([st.qparams for st in step.group], step.quant_spec)
                           if first.qparams is not None else (None, None))
                first.quantizer = ActivationQuantizer(
                    step.quant_spec, *qparams, slots=len(step.group),
                    name=self.names(f"{first.quant_key}_shared_quant"), **self.quantizer_kwargs,
                )
            self.quantizers.append((first.quantizer.name, step.quant_key))
            return first.quantizer(x, slot=step.slot)
        if step.quantizer is None:
            qparams = step.qparams if step.qparams is not None else (None, None)
            # A fixed softmax / sigmoid / tanh grid is a frozen quantizer in QAT too: never observed or learned.
            kwargs = {} if has_fixed_grid(step) else self.quantizer_kwargs
            if input_scale is not None and tensor_scale(step.qparams, step.quant_spec) is not None:
                kwargs = {"input_scale": input_scale}  # PTQ: a requantization of an int8 tensor (QUANTIZE)
            step.quantizer = ActivationQuantizer(step.quant_spec, *qparams, name=self.names(f"{base}_quant"), **kwargs)
            self.quantizers.append((step.quantizer.name, step.quant_key))
        out = step.quantizer(x)
        if self.ptq:
            self.tensor_grids[id(out)] = tensor_grid(step.qparams, step.quant_spec)
        return out

    def _quantized_here(self, staging):
        return self.config.for_layer(self.flat.origin[id(staging)], self.flat.path(staging)) is not None

    def _create(self, step, staging, args, kwargs, in_grid):
        """Create a step's layer(s) on its first call: an integer form (PTQ), or the planned layer."""
        flat, plan, ptq = self.flat, self.plan, self.ptq
        clone = ptq and step.kind == "clone"
        if (clone and type(staging) in (keras.layers.Add, keras.layers.Concatenate, keras.layers.Multiply)
                and self._quantized_here(staging)):
            step.layer = integer_merge(step, staging, args, self.tensor_grids, flat, plan)
        elif clone and is_keras_op(staging) and self._quantized_here(staging):
            step.layer = integer_binary_op(step, staging, args, kwargs, self.tensor_grids, plan)
        elif clone and in_grid is not None:
            step.layer = integer_layer(step, staging, in_grid, self.config, flat)
        if step.layer is not None:
            return False
        in_scale = None if in_grid is None else in_grid[0]
        fused = fused_scale(step, plan) if ptq else None
        if step.inner_key is not None:  # a separable convolution: depthwise, quantizer, pointwise
            step.inner_layer, step.layer, final = build_separable(
                step, staging, self.mode, self.observe_steps, self.bn_statistics, flat, in_scale, fused)
        else:
            step.layer, final = build_step(step, staging, self.mode, self.observe_steps, self.bn_statistics, flat,
                                           in_scale, fused)
        return final

    def _finish(self, step, staging, final):
        """Weights and ranges of a step's layer(s), just built by their first call; the quantizers they hold."""
        if step.inner_layer is not None:
            finish_separable(step, staging, self.mode, self.flat, final)
            self.quantizers.append((step.inner_layer.name, step.inner_key))
        else:
            finish_step(step, staging, self.mode, self.flat, final)
        if isinstance(step.layer, QuantizeWrapper) and step.layer.preactivation_quantizer is not None:
            self.quantizers.append((step.layer.name + PREACTIVATION, step.preact_key))
        if isinstance(step.layer, QuantizeWrapper) and step.layer.output_quantizer is not None:
            self.quantizers.append((step.layer.name, step.quant_key))

    def call(self, staging, *args, **kwargs):
        """`graph_lib.run`'s call of one flat-graph operation: its planned layer(s) and quantizer."""
        step = self.plan[id(staging)]
        if step.kind == "folded":  # a BatchNormalization, or `+ c` folded into a bias: its tensor passes through
            return next(a for a in args if keras.backend.is_keras_tensor(a))
        first, final = step.layer is None, False
        source = args[0] if args and keras.backend.is_keras_tensor(args[0]) else None
        in_grid = self.tensor_grids.get(id(source)) if self.ptq and source is not None else None
        if step.affine is not None:  # the 1x1 depthwise conv takes the tensor alone (no mask, ...)
            args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k == "training"}
        if first:
            final = self._create(step, staging, args, kwargs, in_grid)
        if step.inner_layer is not None:
            outputs = step.layer(step.inner_layer(*args, **kwargs), **kwargs)
        elif isinstance(step.layer, IntegerBinaryOp):
            outputs = call_binary_op(step.layer, args)
        else:
            outputs = step.layer(*args, **kwargs)
        if first:
            self._finish(step, staging, final)
        if step.kind == "wrap" and step.group is None:
            if self.ptq and getattr(step.layer, "output_quantizer", None) is not None:
                self.tensor_grids[id(outputs)] = tensor_grid(step.qparams, step.quant_spec)
            return outputs  # the wrapper's own output quantizer, if any
        passthrough = (source is not None and keras.backend.is_keras_tensor(outputs)
                       and getattr(get_rule(staging), "kind", None) == "passthrough")  # max pool, padding, reshape
        if step.quant_spec is None and passthrough:
            self.tensor_grids[id(outputs)] = self.tensor_grids.get(id(source))  # the same grid
        requantized = in_grid[0] if passthrough and in_grid is not None and self.ptq else None
        return self.add_quantizer(step, outputs, staging.name, requantized)
