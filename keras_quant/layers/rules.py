"""The one table of layer rules: what keras_quant quantizes in each layer type.

A `LayerRule` names, for one Keras layer type, the weights that get a weight
quantizer (with the axis of their output channels, for per-channel scales)
and what the layer does to activations (its `kind`):

- `"compute"`: a layer with quantized weights (Dense, Conv, Embedding, ...);
  its output (after the fused activation) gets an activation quantizer.
- `"activation"`: a standalone activation (ReLU, Activation, ...). TFLite
  fuses ReLU/ReLU6 into the preceding compute op, so the quantizer sits after it.
- `"merge"`: Add, Concatenate, Multiply, ...: integer kernels need their
  output requantized (and, for Concatenate, the inputs on one scale).
- `"pool"`: AveragePooling/GlobalAveragePooling (requantized output);
  max pooling keeps its input's scale and is `"passthrough"`.
- `"norm"`: BatchNormalization (folded into the preceding compute layer
  where possible, otherwise quantized as an affine layer).
- `"passthrough"`: shape-only layers (Flatten, Reshape, Dropout, MaxPooling,
  ...): the output range is the input's, nothing to observe.
- `"float"`: layers keras_quant knows and keeps in float by default (the
  recurrent layers, MultiHeadAttention, ...): their output is observed, and
  quantized where it enters the integer graph; the report names them.

Bare `keras.ops` operations in a Functional graph (`x + y`, `x * s`,
`keras.ops.mean`, slicing, reshapes, activations) have rules too
(`OP_RULES`, by the operation's class name): the ops TFLite runs in int8 are
merges, pools, activations or passthrough; any other op stays float.

A rule also carries the other per-layer-type facts, so that every
consumer reads this one table:

- folding (`fold_weight`, `fold_axes`): the weight a following
  BatchNormalization is folded into and its output-channel axes
  (`kq.layers.folding`);
- export (`export_blocker`, `export_per_tensor`): why an integer TFLite / ONNX
  model cannot hold the layer type, unless (`export_per_tensor`) every weight
  is quantized per tensor (`keras_quant.export.plan.check`).

Calibration observes the outputs of every layer whose rule has
`observe=True`; the PTQ and QAT models use the same table to place weight
and activation quantizers. Adding a layer type is one entry in `RULES`, or
`register_rule(...)` for a user-defined layer (inside `rule_scope()` for a
registration that should last only for a block, as tests do).

Example:

>>> import keras
>>> rule = get_rule(keras.layers.Conv2D(8, 3))
>>> rule.weights, rule.kind
(('kernel',), 'compute')
"""

import contextlib
import dataclasses
from typing import Optional, Tuple

import keras

from keras_quant.errors import ConfigError

__all__ = [
    "LayerRule", "RULES", "get_rule", "register_rule", "KINDS", "FUSABLE_ACTIVATIONS", "is_fusable_activation",
    "PREACTIVATION", "preactivation_key", "split_activation", "OP_KINDS", "OP_RULES", "is_keras_op",
    "FIXED_GRIDS", "output_function", "activation_function", "fixed_output_qparams", "INFERENCE_IDENTITY",
    "without_activation", "lookup", "fold_rule", "rule_scope", "make_rule",
]

KINDS = ("compute", "activation", "merge", "pool", "norm", "passthrough", "float")


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How one layer type is quantized, folded and exported.

    Args:
        layer_type: The Keras layer class.
        kind: One of `KINDS` (see the module docstring).
        weights: Attribute names of the weights that get a weight quantizer.
        weight_axes: For each weight, the axis of its output channels (the
            per-channel axis), counted from the end as Keras lays kernels out.
        fold_weight: The weight a following BatchNormalization is folded into
            (one of `weights`), or None: the layer type does not fold one.
        fold_axes: The output-channel axes of `fold_weight`: one axis, or a run
            of consecutive axes whose row-major product is the channels (a
            depthwise kernel `(..., in, multiplier)`: `(-2, -1)`).
        export_blocker: Why an integer model (TFLite, ONNX QDQ) cannot hold
            this layer type (exactly this class, not its subclasses), or None.
        export_per_tensor: Whether `export_blocker` is lifted when every weight
            is quantized per tensor (an Embedding is then an integer GATHER).

    Raises:
        ConfigError: For an unknown kind, one axis too few or many, or a
            `fold_weight` that is not one of `weights`.
    """

    layer_type: type
    kind: str
    weights: Tuple[str, ...] = ()
    weight_axes: Tuple[int, ...] = ()
    fold_weight: Optional[str] = None
    fold_axes: Tuple[int, ...] = ()
    export_blocker: Optional[str] = None
    export_per_tensor: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError("kind", self.kind, f"kind must be one of {KINDS}")
        if len(self.weights) != len(self.weight_axes):
            raise ConfigError("weight_axes", self.weight_axes, f"need one axis per weight {self.weights}")
        if self.fold_weight is not None and (self.fold_weight not in self.weights or not self.fold_axes):
            raise ConfigError("fold_weight", self.fold_weight,
                              f"fold_weight must be one of the weights {self.weights}, with its fold_axes")

    @property
    def observe(self) -> bool:
        """Whether calibration records this layer's output."""
        return self.kind != "passthrough"


L = keras.layers


def _application_affine_layers():
    """Per-channel scale layers of `keras.applications` (ConvNeXt's LayerScale), where this Keras has them."""
    try:
        from keras.src.applications.convnext import LayerScale
    except ImportError:  # pragma: no cover - another Keras layout
        return ()
    return (LayerScale,)


# Passthrough layers that return their input at inference (no op in the file).
INFERENCE_IDENTITY = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.Identity,
)


def _no_integer_kernel(op):
    return f"TFLite has no integer {op} kernel; set its config to None"


def _separable_blocker(depthwise, conv):
    return (f"its depthwise output (inside the layer) has no quantizer, so TFLite would run the layer in float; "
            f"build it as {depthwise} + {conv}, or set its config to None")


def _compute_rules():
    """The compute layers: `(class, weights, weight axes, folding, export)` per row.

    Folding is `(weight, output-channel axes)` of the weight a BatchNormalization
    scales (depthwise kernels are `(..., in, multiplier)`: output channel
    `c = i * multiplier + m`); export is `(blocker, lifted per tensor)`.
    """
    kernel, last = ("kernel",), (-1,)
    gather = ("TFLite's integer GATHER keeps one scale per tensor, not per row; quantize its weights per tensor "
              "(the default for Embedding) or set its config to None")
    rows = [
        (L.Dense, kernel, last, ("kernel", (-1,)), None),
        (L.EinsumDense, kernel, last, None,
         ("its einsum is not lowered to an integer TFLite kernel; set its config to None", False)),
        (L.Conv1D, kernel, last, ("kernel", (-1,)), None),
        (L.Conv2D, kernel, last, ("kernel", (-1,)), None),
        (L.Conv3D, kernel, last, ("kernel", (-1,)), (_no_integer_kernel("CONV_3D"), False)),
        # Depthwise kernels are (..., in, multiplier): TFLite's output channel
        # is in * multiplier; with multiplier 1 that is the `in` axis.
        (L.DepthwiseConv1D, kernel, (-2,), ("kernel", (-2, -1)), None),
        (L.DepthwiseConv2D, kernel, (-2,), ("kernel", (-2, -1)), None),
        (L.SeparableConv1D, ("depthwise_kernel", "pointwise_kernel"), (-2, -1), ("pointwise_kernel", (-1,)),
         (_separable_blocker("DepthwiseConv1D", "Conv1D"), False)),
        (L.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel"), (-2, -1), ("pointwise_kernel", (-1,)),
         (_separable_blocker("DepthwiseConv2D", "Conv2D"), False)),
        # Transposed kernels are (..., out, in).
        (L.Conv1DTranspose, kernel, (-2,), ("kernel", (-2,)), None),
        (L.Conv2DTranspose, kernel, (-2,), ("kernel", (-2,)), None),
        (L.Conv3DTranspose, kernel, (-2,), ("kernel", (-2,)), (_no_integer_kernel("CONV_3D_TRANSPOSE"), False)),
        # One scale per row (token), as Keras' own int8 embeddings.
        (L.Embedding, ("embeddings",), (0,), None, (gather, True)),
    ]
    return [
        LayerRule(cls, "compute", w, a, *(fold or (None, ())), *(export or (None, False)))
        for cls, w, a, fold, export in rows
    ]


def _rules():
    rules = _compute_rules()
    rules += [LayerRule(cls, "activation") for cls in (L.ReLU, L.Activation, L.LeakyReLU, L.PReLU, L.ELU, L.Softmax)]
    rules += [
        LayerRule(cls, "merge")
        for cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate)
    ]
    rules += [
        LayerRule(cls, "pool")
        for cls in (
            L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
            L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
        )
    ]
    rules += [LayerRule(L.BatchNormalization, "norm")]
    # Affine per-channel maps: quantized like an unfolded BatchNormalization (one output range).
    rules += [LayerRule(cls, "norm") for cls in (L.Rescaling, L.Normalization, *_application_affine_layers())]
    # Known layers kept in float by default: no integer TFLite kernel keras_quant can feed exact ranges to
    # (the converter lowers them to many ops whose inner tensors have no quantizer).
    rules += [
        LayerRule(cls, "float")
        for cls in (
            L.LayerNormalization, L.GroupNormalization, L.UnitNormalization, L.MultiHeadAttention,
            L.LSTM, L.GRU, L.SimpleRNN, L.Bidirectional, L.RNN, L.ConvLSTM1D, L.ConvLSTM2D, L.ConvLSTM3D,
            L.TimeDistributed,
        )
        if cls is not None
    ]
    rules += [
        LayerRule(cls, "passthrough")
        for cls in (
            *INFERENCE_IDENTITY, L.Flatten, L.Reshape, L.Permute, L.RepeatVector, L.Cropping1D,
            L.Cropping2D, L.Cropping3D, L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.UpSampling1D,
            L.UpSampling2D, L.UpSampling3D, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
            L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.InputLayer,
        )
    ]
    return {r.layer_type: r for r in rules}


# Bare keras.ops operations (the class name of a `keras.src.ops` Operation) -> kind, as TFLite runs them:
# ADD / SUB / MUL / MAXIMUM / MINIMUM / CONCATENATION / PACK requantize their output; MEAN / SUM
# requantize; activations get their own range; shape ops keep their input's scale.
OP_KINDS = {
    "merge": ("Add", "Subtract", "Multiply", "Maximum", "Minimum", "Concatenate", "Stack", "Append"),
    "pool": ("Mean", "Sum"),
    "activation": (
        "Relu", "Relu6", "Sigmoid", "Tanh", "Softmax", "Gelu", "Silu", "HardSigmoid", "HardSilu", "LeakyRelu",
        "Elu", "LogSoftmax", "Clip", "Softplus",
    ),
    "passthrough": (
        "Reshape", "Transpose", "GetItem", "ExpandDims", "Squeeze", "Tile", "Pad", "Flip", "Split", "Max", "Min",
        "Repeat", "BroadcastTo", "Ravel", "Take", "Identity", "Copy", "MaxPool", "Roll", "SwapAxes", "MoveAxis",
    ),
}
OP_RULES = {name: kind for kind, names in OP_KINDS.items() for name in names}
# keras.ops activations TFLite fuses into the op before them.
FUSABLE_OPS = ("Relu", "Relu6")


def is_keras_op(op) -> bool:
    """Whether `op` is a bare `keras.ops` operation (a graph node that is not a layer)."""
    cls = op if isinstance(op, type) else type(op)
    return not issubclass(cls, keras.layers.Layer) and cls.__module__.startswith("keras.src.ops")


# Layer class -> LayerRule. Looked up along the MRO: a subclass of Conv2D gets Conv2D's rule.
RULES = _rules()


def make_rule(layer_type, kind="compute", weights=(), weight_axes=None, fused_activation=None, **facts):
    """A `LayerRule` from `register_rule`'s arguments (the form a `quantization_rule()` dict also takes).

    `weight_axes` defaults to `-1` for each weight. `fused_activation` is
    accepted for rules written before it was dropped and ignored: whether
    TFLite fuses a layer's activation is read from the activation itself
    (`is_fusable_activation`, `split_activation`). `facts` are the folding and
    export fields of `LayerRule` (`fold_weight`, `fold_axes`, `export_blocker`,
    `export_per_tensor`).
    """
    del fused_activation
    weights = tuple(weights)
    axes = tuple(weight_axes) if weight_axes is not None else (-1,) * len(weights)
    if "fold_axes" in facts:
        facts["fold_axes"] = tuple(facts["fold_axes"])
    return LayerRule(layer_type, kind, weights, axes, **facts)


def register_rule(layer_type, kind="compute", weights=(), weight_axes=None, fused_activation=None, *,
                  fold_weight=None, fold_axes=(), export_blocker=None, export_per_tensor=False):
    """Declare how a (user-defined) layer type is quantized, folded and exported.

    The rule holds for the rest of the process, or until the enclosing
    `rule_scope()` block ends.

    Args:
        layer_type: The layer class.
        kind: One of `KINDS`.
        weights: Attribute names of the weights to quantize (e.g. `("kernel",)`).
        weight_axes: Output-channel axis of each weight; default `-1` for each.
        fused_activation: Accepted for older callers and ignored (see `make_rule`).
        fold_weight: The weight a following BatchNormalization folds into, or None
            (re-registering a type keeps the replaced rule's `fold_weight` and
            `fold_axes` when that weight is still among `weights`).
        fold_axes: Its output-channel axes (e.g. `(-1,)`).
        export_blocker: Why an integer export cannot hold the layer, or None
            (re-registering a type keeps the replaced rule's export facts).
        export_per_tensor: Whether per-tensor weights lift `export_blocker`.

    Returns:
        The new `LayerRule`.

    Raises:
        ConfigError: If `layer_type` is not a class, or the rule is invalid.

    Example:

    >>> class MyDense(keras.layers.Layer): ...
    >>> with rule_scope():
    ...     register_rule(MyDense, weights=("w",), fold_weight="w", fold_axes=(-1,)).kind
    'compute'
    """
    if not isinstance(layer_type, type):
        raise ConfigError("layer_type", layer_type, "layer_type must be a layer class")
    replaced = RULES.get(layer_type)
    if (replaced is not None and fold_weight is None
            and replaced.fold_weight in tuple(weights or ())):  # re-registered: keeps its folding if it still can
        fold_weight, fold_axes = replaced.fold_weight, replaced.fold_axes
    if replaced is not None and export_blocker is None:  # ... and what its export cannot hold
        export_blocker, export_per_tensor = replaced.export_blocker, replaced.export_per_tensor
    rule = make_rule(layer_type, kind, weights, weight_axes, fold_weight=fold_weight, fold_axes=fold_axes,
                     export_blocker=export_blocker, export_per_tensor=export_per_tensor)
    RULES[layer_type] = rule
    return rule


@contextlib.contextmanager
def rule_scope():
    """A block whose rule registrations (`register_rule`, or edits of `RULES`) are undone when it ends.

    Example:

    >>> with rule_scope():
    ...     register_rule(MyDense, weights=("w",))
    >>> get_rule(MyDense) is None
    True
    """
    saved = dict(RULES)
    try:
        yield RULES
    finally:
        RULES.clear()
        RULES.update(saved)


def lookup(layer_type) -> Optional[LayerRule]:
    """The rule registered for exactly `layer_type` (not inherited from a base class), or None."""
    return RULES.get(layer_type)


def fold_rule(layer) -> Optional[LayerRule]:
    """The rule that says how a BatchNormalization folds into `layer` (instance or class), or None.

    The first rule along the class's MRO that declares a `fold_weight`, or the
    layer's own `quantization_rule()` when that declares one.
    """
    if not isinstance(layer, type):
        own = _own_rule(layer)
        if own is not None and own.fold_weight is not None:
            return own
    cls = layer if isinstance(layer, type) else type(layer)
    for klass in cls.__mro__:
        rule = RULES.get(klass)
        if rule is not None and rule.fold_weight is not None:
            return rule
    return None


def _own_rule(layer):
    """The rule a layer instance declares with a `quantization_rule()` method, or None."""
    own = getattr(layer, "quantization_rule", None)
    if not callable(own):
        return None
    rule = own()
    return make_rule(type(layer), **rule) if isinstance(rule, dict) else rule


def get_rule(layer) -> Optional[LayerRule]:
    """The rule for a layer (instance or class), or None if there is none.

    A layer can also declare its own rule with a `quantization_rule()` method
    returning a `LayerRule` (or the keyword arguments of `register_rule`).
    Otherwise the rule is the first registered along the class's MRO.
    """
    cls = layer if isinstance(layer, type) else type(layer)
    if is_keras_op(cls):
        kind = OP_RULES.get(cls.__name__)
        return _op_rule(cls, kind) if kind is not None else None
    if not isinstance(layer, type) and callable(getattr(layer, "quantization_rule", None)):
        return _own_rule(layer)
    for klass in cls.__mro__:
        if klass in RULES:
            return RULES[klass]
    return None


_OP_RULE_CACHE = {}


def _op_rule(cls, kind):
    rule = _OP_RULE_CACHE.get(cls)
    if rule is None:
        rule = _OP_RULE_CACHE[cls] = LayerRule(cls, kind)
    return rule


# Activation functions TFLite fuses into the compute op before them (RELU, RELU6,
# RELU_N1_TO_1 need no separate kernel), by `keras.activations` name.
FUSABLE_ACTIVATIONS = ("relu", "relu6", "linear")


def is_fusable_activation(layer) -> bool:
    """Whether a standalone activation layer is fused by TFLite into the op before it.

    True for `ReLU()` (no negative slope or threshold; `max_value` None or 6)
    and `Activation` of one of `FUSABLE_ACTIVATIONS`.

    Example:

    >>> is_fusable_activation(keras.layers.ReLU(max_value=6.0)), is_fusable_activation(keras.layers.ELU())
    (True, False)
    """
    if isinstance(layer, L.ReLU):
        return (
            float(layer.negative_slope) == 0.0
            and float(layer.threshold) == 0.0
            and (layer.max_value is None or float(layer.max_value) == 6.0)
        )
    if type(layer) is L.Activation:
        return getattr(layer.activation, "__name__", None) in FUSABLE_ACTIVATIONS
    if is_keras_op(layer):
        return type(layer).__name__ in FUSABLE_OPS
    return False


# Calibration key of the tensor before a compute layer's own (non-fused) activation.
PREACTIVATION = ":preactivation"


def preactivation_key(key):
    """The calibration key of the input of `key`'s own activation (`"dense:preactivation"`)."""
    return f"{key}{PREACTIVATION}"


@contextlib.contextmanager
def without_activation(layer):
    """Within the block, `layer` (a Dense, Conv, ...) computes its linear output: its activation is linear."""
    activation = getattr(layer, "activation", None)
    if activation is not None:
        layer.activation = keras.activations.linear
    try:
        yield layer
    finally:
        if activation is not None:
            layer.activation = activation


def split_activation(layer):
    """A compute layer's own activation when TFLite runs it as a separate op, else None.

    RELU, RELU6 and linear are fused into CONV_2D / FULLY_CONNECTED; softmax,
    sigmoid, tanh, gelu, ... run as their own op, whose integer kernel reads a
    quantized input: the layer's output before the activation needs its own
    quantizer (and calibration statistics).
    """
    rule = get_rule(layer)
    activation = getattr(layer, "activation", None)
    if rule is None or rule.kind != "compute" or not callable(activation):
        return None
    if getattr(activation, "__name__", None) in FUSABLE_ACTIVATIONS:
        return None
    return activation


# TFLite's integer SOFTMAX / LOGISTIC / TANH write a fixed output grid, whatever the calibration says:
# int8 softmax and logistic 1/256 with zero point -128 ([0, 1)), int8 tanh 1/128 with zero point 0
# ([-1, 1)); int16 all three 1/32768 with zero point 0. The file requantizes from that grid to the next
# range, so the Keras model must quantize there too to compute what the file computes.
FIXED_GRIDS = {
    ("softmax", 8): (1.0 / 256, -128), ("sigmoid", 8): (1.0 / 256, -128), ("tanh", 8): (1.0 / 128, 0),
    ("softmax", 16): (1.0 / 32768, 0), ("sigmoid", 16): (1.0 / 32768, 0), ("tanh", 16): (1.0 / 32768, 0),
}
_OP_FUNCTIONS = {"Softmax": "softmax", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def output_function(layer):
    """`"softmax"`, `"sigmoid"` or `"tanh"` when `layer`'s output is that function's (an activation layer or
    op, or a compute layer's own activation), else None."""
    if is_keras_op(layer):
        return _OP_FUNCTIONS.get(type(layer).__name__)
    if isinstance(layer, L.Softmax):
        return "softmax"
    return activation_function(getattr(layer, "activation", None))


def activation_function(activation):
    """`"softmax"`, `"sigmoid"` or `"tanh"` when the activation function `activation` is one of those, else None."""
    name = getattr(activation, "__name__", None)
    return name if name in ("softmax", "sigmoid", "tanh") else None


def fixed_output_qparams(function, spec):
    """`(scale, zero_point)` of TFLite's fixed output grid for `function` under `spec`, or None.

    Only where the spec is that grid's storage: 8-bit asymmetric (full range), or 16-bit symmetric.

    Example:

    >>> fixed_output_qparams("softmax", kq.QuantSpec(bits=8))
    (0.00390625, -128)
    """
    if function is None or spec is None or spec.granularity != "per_tensor":
        return None
    if spec.bits == 8 and not spec.symmetric and not spec.narrow_range:
        return FIXED_GRIDS[(function, 8)]
    if spec.bits == 16 and spec.symmetric:
        return FIXED_GRIDS[(function, 16)]
    return None
