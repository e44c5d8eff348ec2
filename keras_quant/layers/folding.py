"""Folding a BatchNormalization (inference mode) into the compute layer before it.

`BN(conv(x))` with moving statistics is affine per output channel:
`gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta`. Multiplying the
kernel by `gamma / sqrt(var + eps)` along its output channels and setting the
bias to `beta + (b - mean) * gamma / sqrt(var + eps)` gives one layer with the
same outputs, which is what TFLite quantizes.

`fold_batch_norm` is the numpy arithmetic; `fold_into_layer` clones a layer
with `use_bias=True` and the folded weights; each layer type's rule
(`keras_quant.layers.rules`, `fold_weight` and `fold_axes`) says which weight
is scaled and along which axes its output channels lie.

In QAT (`kq.QuantizeWrapper(batch_norm=...)`) the fold happens inside the
training step, in `keras.ops`: `fold_terms` with moving or batch statistics,
`statistics_from_folded_output` (the batch statistics read off the folded
layer's quantized output) and `train_batch_norm` (the moving-statistics
update and the `sigma_moving / sigma_batch` correction of Jacob et al. 2018).

Example:

>>> k, b = fold_batch_norm(kernel, None, gamma, beta, mean, var, 1e-3, channel_axis=-1)
>>> folded = fold_into_layer(conv, bn)     # a new Conv2D: conv then bn, in one
"""

import keras
import numpy as np
from keras import ops

from keras_quant import graph as graph_lib
from keras_quant import ops as kq_ops
from keras_quant.errors import ConfigError, ShapeMismatchError
from keras_quant.layers import rules

__all__ = [
    "fold_batch_norm", "fold_into_layer", "fold_weights", "fold_blocker", "fold_rule", "fold_factor_and_bias", "scale_channels",
    "factor_shape", "bn_axes", "output_rank", "moving_statistics", "fold_terms", "batch_moments",
    "statistics_from_folded_output", "train_batch_norm",
]

L = keras.layers

def fold_rule(layer):
    """`(weight attribute, output-channel axes)` of the weight a BatchNormalization folds into, or None.

    Read from the layer's rule (`LayerRule.fold_weight`, `fold_axes`; see
    `keras_quant.layers.rules.fold_rule`).
    """
    rule = rules.fold_rule(layer)
    return None if rule is None else (rule.fold_weight, rule.fold_axes)


def _axes(channel_axis, ndim):
    axes = (channel_axis,) if isinstance(channel_axis, (int, np.integer)) else tuple(channel_axis)
    axes = tuple(sorted(a % ndim for a in axes))
    if not axes or list(axes) != list(range(axes[0], axes[0] + len(axes))):
        raise ConfigError("channel_axis", channel_axis, "channel_axis must be an axis or a run of consecutive axes")
    return axes


def factor_shape(kernel_shape, channel_axis):
    """Shape that broadcasts a `(C,)` per-output-channel factor over a kernel.

    `channel_axis` is the kernel's output-channel axis, or a run of
    consecutive axes whose row-major product is the `C` channels (a
    depthwise kernel `(kh, kw, in, multiplier)`: channel `i * multiplier + m`).
    """
    ndim = len(kernel_shape)
    shape = [1] * ndim
    for a in _axes(channel_axis, ndim):
        shape[a] = kernel_shape[a]
    return tuple(shape)


def fold_factor_and_bias(bias, gamma, beta, mean, variance, epsilon):
    """The per-channel kernel factor and the bias of `BN(layer(x))` folded into one layer (`keras.ops`).

    `factor = gamma / sqrt(variance + epsilon)` and
    `folded_bias = beta + (bias - mean) * factor`. QAT calls it with batch or
    moving statistics inside the training step; `fold_batch_norm` with the
    moving ones. None for `bias`, `gamma`, `beta` means 0, 1, 0.

    Returns:
        `(factor, folded_bias)`, float32 tensors of shape `(C,)`.
    """

    def f32(v, default=None):
        return default if v is None else ops.cast(ops.convert_to_tensor(v), "float32")

    mean = f32(mean)
    zeros = ops.zeros_like(mean)
    factor = f32(gamma, ops.ones_like(mean)) / ops.sqrt(f32(variance) + float(epsilon))
    return factor, f32(beta, zeros) + (f32(bias, zeros) - mean) * factor


def scale_channels(kernel, factor, channel_axis):
    """`kernel` times a `(C,)` factor along its output channels (`keras.ops`)."""
    kernel = ops.convert_to_tensor(kernel)
    shape = factor_shape(tuple(kernel.shape), channel_axis)
    return ops.multiply(kernel, ops.cast(ops.reshape(factor, shape), kernel.dtype))


def moving_statistics(bn):
    """`(moving_mean, moving_variance)` of a BatchNormalization as float32 tensors, read now.

    `convert_to_tensor` takes a snapshot: on TensorFlow `Variable.value` is
    the variable itself, which later reads would see after the training
    step's moving-statistics update.
    """
    return tuple(ops.cast(ops.convert_to_tensor(v), "float32") for v in (bn.moving_mean, bn.moving_variance))


def fold_terms(layer, bn, mean, variance):
    """`fold_factor_and_bias` with `layer`'s bias and `bn`'s gamma and beta, for statistics `(mean, variance)`."""
    bias = layer.bias.value if getattr(layer, "use_bias", False) else None
    return fold_factor_and_bias(
        bias, bn.gamma.value if bn.scale else None, bn.beta.value if bn.center else None, mean, variance,
        bn.epsilon,
    )


def batch_moments(y, bn):
    """Per-channel `(mean, variance)` of `y` over all but its last axis (across replicas when `bn` syncs)."""
    axes = list(range(len(y.shape) - 1))
    return ops.moments(ops.cast(y, "float32"), axes=axes, synchronized=bn.synchronized)


def statistics_from_folded_output(y, factor, layer, bn):
    """The batch statistics of the unfolded layer's output, read off the folded layer's output `y` (one pass).

    `y = factor * z`, with `z` the unfolded layer's output (quantized weights,
    no bias), so `z`'s batch statistics follow from `y`'s per-channel moments;
    the layer's bias is added back to the mean.
    """
    safe = ops.where(ops.equal(factor, 0.0), 1.0, factor)
    y_mean, y_var = batch_moments(y, bn)
    b_mean, b_var = y_mean / safe, y_var / (safe * safe)
    if getattr(layer, "use_bias", False):
        b_mean = b_mean + ops.cast(ops.convert_to_tensor(layer.bias), "float32")
    return b_mean, b_var


def train_batch_norm(y, layer, bn, moving, batch, frozen):
    """The training output of `bn(layer(x))` folded, from the folded layer's bias-free output `y`.

    Updates `bn`'s moving statistics with the batch's (`ops.moving_average`,
    `bn.momentum`) unless `frozen`, and returns `y` corrected by
    `sigma_moving / sigma_batch` plus the bias folded with the batch mean
    (Jacob et al. 2018, section 3.2).

    Args:
        y: The folded layer's output without bias (kernel scaled with the moving statistics).
        layer: The compute layer.
        bn: The BatchNormalization folded into it.
        moving: `(mean, variance)`, the moving statistics `y`'s kernel was folded with.
        batch: `(mean, variance)` of this batch (already the moving ones where `frozen`).
        frozen: Boolean tensor: the statistics are frozen (no update).
    """
    (mean, var), (b_mean, b_var) = moving, batch
    m = bn.momentum
    for v, old, new in ((bn.moving_mean, mean, b_mean), (bn.moving_variance, var, b_var)):
        v.assign(ops.cast(ops.where(frozen, old, kq_ops.moving_average(old, ops.stop_gradient(new), m)), v.dtype))
    _, bias = fold_terms(layer, bn, b_mean, b_var)
    correction = ops.sqrt((var + bn.epsilon) / (b_var + bn.epsilon))  # sigma_moving / sigma_batch
    return ops.add(ops.multiply(y, ops.cast(correction, y.dtype)), ops.cast(bias, y.dtype))


def fold_batch_norm(kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon, channel_axis=-1):
    """Fold inference-mode batch normalization into a kernel and bias (numpy).

    Args:
        kernel: The compute layer's kernel.
        bias: Its bias, or None (`use_bias=False`).
        gamma: BN scale, or None (`scale=False`, i.e. 1).
        beta: BN offset, or None (`center=False`, i.e. 0).
        moving_mean: BN moving mean, shape `(C,)`.
        moving_variance: BN moving variance, shape `(C,)`.
        epsilon: BN epsilon.
        channel_axis: The kernel's output-channel axis, or a run of
            consecutive axes whose row-major product is the `C` channels
            (`(-2, -1)` for a depthwise kernel `(kh, kw, in, multiplier)`).

    Returns:
        `(folded_kernel, folded_bias)`, float arrays of the kernel's dtype
        (float32 at least), the bias of shape `(C,)`.

    Raises:
        ShapeMismatchError: If the kernel's channels differ from the BN's.

    Example:

    >>> k, b = fold_batch_norm(np.ones((3, 2)), None, None, None, np.zeros(2), np.ones(2), 0.0)
    >>> b
    array([0., 0.], dtype=float32)
    """
    kernel = np.asarray(kernel)
    dtype = np.result_type(kernel.dtype, np.float32)
    channels = np.asarray(moving_mean).shape[0]
    axes = _axes(channel_axis, kernel.ndim)
    if int(np.prod([kernel.shape[a] for a in axes])) != channels:
        raise ShapeMismatchError("kernel", f"{channels} output channels on axes {axes}", kernel.shape)
    # `fold_factor_and_bias` and `scale_channels` in numpy: the same float32 operations in the same order.
    def f32(v, default):
        return default if v is None else np.asarray(v).astype(np.float32)

    mean = np.asarray(moving_mean).astype(np.float32)
    zeros = np.zeros_like(mean)
    factor = f32(gamma, np.ones_like(mean)) / np.sqrt(f32(moving_variance, None) + np.float32(epsilon))
    folded_bias = f32(beta, zeros) + (f32(bias, zeros) - mean) * factor
    shape = factor_shape(kernel.shape, axes)
    folded_kernel = kernel.astype(dtype) * factor.reshape(shape).astype(dtype)
    return np.asarray(folded_kernel, dtype), np.asarray(folded_bias, dtype)


def bn_axes(bn):
    """The axes a BatchNormalization normalizes, as a tuple of ints, however `axis` is spelled.

    Keras 3 stores an int; a layer restored from a tf.keras config (or set by
    hand) may hold a list or tuple such as `[3]` or `[-1]`.
    """
    axis = bn.axis
    if isinstance(axis, (list, tuple)):
        return tuple(int(a) for a in axis)
    return (int(axis),)


def _input_rank(layer):
    """Rank of a built layer's (first) input, or None when the layer is not built."""
    config = layer.get_build_config() if getattr(layer, "built", False) else None
    shape = next(iter(config.values()), None) if config else None
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, (int, type(None))) for d in shape):
        return len(shape)
    return None


def output_rank(layer, bn=None):
    """Rank of `layer`'s output (= `bn`'s input): from `bn`'s or `layer`'s build shape, a conv's
    `rank + 2`, else None (an unbuilt Dense)."""
    for known in (bn, layer):
        rank = None if known is None else _input_rank(known)
        if rank is not None:
            return rank
    rank = getattr(layer, "rank", None)
    return rank + 2 if isinstance(rank, int) else None


def fold_blocker(layer, bn, rank=None):
    """Why `bn` cannot be folded into `layer`, or None if it can.

    Folding needs a layer type whose rule has a `fold_weight`, no activation between the two
    (`activation="linear"`), channels-last data and a BatchNormalization over
    the last axis, spelled any way (`-1`, `3` or `[3]` on a 4-D tensor).

    Args:
        layer: The compute layer.
        bn: The layer after it.
        rank: Rank of the tensor between the two, when known; else taken from
            the layers' build shapes or a conv's `rank`. When it cannot be
            known (unbuilt Dense, non-negative axis) the axis is not judged
            here; `QuantizeWrapper.build` checks it again with the shape.
    """
    if not isinstance(bn, L.BatchNormalization):
        return f"{type(bn).__name__} is not a BatchNormalization"
    if fold_rule(layer) is None:
        return f"{type(layer).__name__} has no folding rule"
    activation = getattr(layer, "activation", None)
    if activation is not None and getattr(activation, "__name__", "linear") != "linear":
        return f"{layer.name} applies an activation before the BatchNormalization"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"{layer.name} is not channels_last"
    axes = bn_axes(bn)
    rank = output_rank(layer, bn) if rank is None else int(rank)
    if len(axes) != 1:
        return f"{bn.name} normalizes axes {list(axes)}, not only the last (channel) axis"
    if axes[0] != -1 and rank is not None and axes[0] % rank != rank - 1:
        return f"{bn.name} normalizes axis {axes[0]}, not the last (channel) axis of its {rank}-D input"
    return None


def _np(var):
    return None if var is None else np.asarray(keras.ops.convert_to_numpy(var))


def fold_input_affine(kernel, bias, a, b, depthwise=False):
    """`(kernel, bias)` of `layer(a * x + b)` as one layer, `a` and `b` per input channel (numpy float32).

    `kernel` is channels-last with the input channels on axis -2: Dense
    `(in, out)`, Conv `(..., in, out)`, DepthwiseConv `(..., in, multiplier)`
    (output channel `c * multiplier + m`). The kernel takes `a` per input
    channel and the bias gains the kernel applied to `b`; exact where no
    padding reads the input (zeros padded after `a * x + b` are not `b`).
    `bias` None: the layer had none (zeros).
    """
    kernel = np.asarray(kernel, np.float64)
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    shape = [1] * kernel.ndim
    shape[-2] = kernel.shape[-2]
    weighted = kernel * b.reshape(shape)
    if depthwise:  # each input channel feeds its own `multiplier` outputs
        shift = weighted.sum(axis=tuple(range(kernel.ndim - 2))).reshape(-1)
    else:
        shift = weighted.sum(axis=tuple(range(kernel.ndim - 1)))
    bias = np.zeros(shift.shape) if bias is None else np.asarray(bias, np.float64)
    return (kernel * a.reshape(shape)).astype("float32"), (bias + shift).astype("float32")


def fold_weights(layer, bn, input_affine=None):
    """`{weight attribute: folded array}` of `bn(layer(x))` as one layer: the folded kernel and `"bias"` (numpy).

    The arrays `fold_into_layer` gives its new layer, before they are cast to its variables' dtypes.
    `bn` may be None when `input_affine`, the `(a, b)` of `layer(a * x + b)`, is given (`fold_input_affine`).

    Raises:
        ConfigError: If the pair cannot be folded (see `fold_blocker`).
    """
    reason = fold_blocker(layer, bn) if bn is not None else None
    if reason:
        raise ConfigError("layer", layer.name, f"cannot fold {bn.name} into it: {reason}", layer=layer.name)
    weight, axes = fold_rule(layer)
    kernel = _np(getattr(layer, weight))
    bias = _np(layer.bias) if getattr(layer, "use_bias", False) else None
    if input_affine is not None:
        depthwise = isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))
        kernel, bias = fold_input_affine(kernel, bias, *input_affine, depthwise=depthwise)
    if bn is None:
        return {weight: kernel, "bias": bias}
    folded_kernel, folded_bias = fold_batch_norm(
        kernel, bias, _np(bn.gamma) if bn.scale else None, _np(bn.beta) if bn.center else None,
        _np(bn.moving_mean), _np(bn.moving_variance), bn.epsilon, axes,
    )
    return {weight: folded_kernel, "bias": folded_bias}


def fold_into_layer(layer, bn, name=None, input_affine=None, bias_offset=None):
    """A new layer computing `bn(layer(a * x + b)) + c` (inference mode) in one compute layer.

    The clone is made with `type(layer).from_config(layer.get_config())`,
    `use_bias=True` and the same name (or `name`), built from `layer`'s build
    config, and given `layer`'s weights with the folded kernel and bias.

    Args:
        layer: A built compute layer (Dense, Conv*, DepthwiseConv*, SeparableConv*, Conv*Transpose).
        bn: A built BatchNormalization that follows it, or None.
        name: The new layer's name; default `layer`'s.
        input_affine: `(a, b)`, per input channel, of an affine map before the layer (`fold_input_affine`).
        bias_offset: `c`, a constant added to the output (scalar or per channel).

    Returns:
        The new, built layer.

    Raises:
        ConfigError: If the pair cannot be folded (see `fold_blocker`).

    Example:

    >>> folded = fold_into_layer(model.get_layer("conv"), model.get_layer("bn"))
    """
    folded = fold_weights(layer, bn, input_affine)
    if bias_offset is not None:
        folded["bias"] = (folded["bias"] + np.asarray(bias_offset, np.float32)).astype("float32")
    weight, _ = fold_rule(layer)
    config = layer.get_config()
    config["use_bias"] = True
    if name is not None:
        config["name"] = name
    new = type(layer).from_config(config)
    kernel = getattr(layer, weight)
    values = []  # the new layer's weights in creation order: the original's, the bias added after the kernel
    for var in _without_bias(layer):
        values.append(folded[weight] if var is kernel else _np(var))
        if var is kernel:
            values.append(folded["bias"])
    if not graph_lib.build_with_weights(new, layer.get_build_config(), values):
        raise ConfigError("layer", layer.name, "cannot rebuild it from its build config", layer=layer.name)
    return new


def _without_bias(layer):
    """The layer's weights other than `bias`, in creation order (the same in both layers)."""
    return [v for v in layer.weights if v.name != "bias"]
