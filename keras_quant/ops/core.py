"""Uniform affine quantization, written with `keras.ops` (TensorFlow and JAX).

The grid is signed: `q in [spec.qmin, spec.qmax]`, and

    q     = clip(round(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

with round-half-up (`floor(v + 0.5)`), the rounding TensorFlow's FakeQuant ops
use. `scale` and `zero_point` are scalars (per tensor), shape `(C,)` (per
channel, `C` the size of `spec.axis`) or `(C, G)` (per group, `G` groups of
`spec.group_size` elements in each channel).

Ranges are widened to contain 0 and the zero point is rounded to an integer,
so 0.0 is exactly representable, as TensorFlow's fake-quant nudging does.

Example:

>>> import numpy as np, keras_quant as kq
>>> spec = kq.QuantSpec(bits=8)
>>> scale, zp = kq.ops.compute_qparams(-1.0, 3.0, spec)
>>> q = kq.ops.quantize(np.array([0.0, 1.0], "float32"), scale, zp, spec)
>>> kq.ops.dequantize(q, scale, zp, spec)
"""

import math

import numpy as np
from keras import ops

from keras_quant.config import QuantSpec
from keras_quant.errors import ConfigError, ShapeMismatchError

__all__ = [
    "EPS",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "tensor_range",
    "tensor_qparams",
    "weight_range",
    "weight_qparams",
    "numpy_qparams",
    "numpy_weight_qparams",
    "WEIGHT_SEARCH_OBSERVERS",
    "WEIGHT_SEARCH_RATIOS",
    "round_half_up",
    "moving_average",
    "param_shape",
    "channel_axis",
    "to_groups",
    "check_spec",
    "float_tensor",
    "apply_params",
]

# Smallest scale handed out: a zero-width range (a constant tensor) still gets a
# valid, finite scale whose reciprocal is finite in float32.
EPS = float(np.finfo(np.float32).eps)


def check_spec(spec, layer=None):
    """Raise `ConfigError` (naming `layer`, if given) unless `spec` is a `kq.QuantSpec`.

    The kernels take a spec object only (not its config dict, which
    `keras_quant.config.as_spec` coerces at the public entry points).
    """
    if not isinstance(spec, QuantSpec):
        raise ConfigError("spec", spec, "expected a kq.QuantSpec", layer=layer)


def moving_average(average, value, momentum):
    """`momentum * average + (1 - momentum) * value`: Keras' moving-average convention.

    The one exponential moving average of the package: the QAT range and the
    moving-average observer both step with it (`momentum=0.99` keeps 99% of the
    old value per batch, as `keras.layers.BatchNormalization` does).
    """
    return ops.add(ops.multiply(momentum, average), ops.multiply(1.0 - momentum, value))


def round_half_up(v):
    """`floor(v + 0.5)`: TensorFlow FakeQuant's rounding."""
    return ops.floor(ops.add(v, 0.5))


def _tensor(x):
    """A backend tensor; variables (Keras' or the backend's own) are read."""
    x = ops.convert_to_tensor(x)
    if hasattr(x, "read_value"):  # a tf.Variable, e.g. `keras.Variable.value` on TensorFlow
        x = x.read_value()
    return x


def float_tensor(x):
    """`x` as a backend tensor of a float dtype (integers and bools become float32; floats keep theirs)."""
    x = _tensor(x)
    if not _is_float(x.dtype):
        x = ops.cast(x, "float32")
    return x


def _is_float(dtype):
    return "float" in str(dtype)


def channel_axis(spec, ndim):
    """`spec.axis` as a non-negative index into a tensor of rank `ndim`."""
    axis = spec.axis
    if not -ndim <= axis < ndim:
        raise ConfigError("axis", axis, f"axis is out of range for a tensor of rank {ndim}")
    return axis % ndim


def param_shape(shape, spec):
    """Shape of `scale` / `zero_point` for a tensor of `shape` under `spec`."""
    check_spec(spec)
    if spec.granularity == "per_tensor":
        return ()
    shape = tuple(shape)
    axis = channel_axis(spec, len(shape))
    channels = shape[axis]
    if spec.granularity == "per_channel":
        return (channels,)
    rest = math.prod(shape[:axis] + shape[axis + 1 :])
    if rest % spec.group_size:
        raise ShapeMismatchError(
            "x", f"a multiple of group_size={spec.group_size} elements per channel", shape
        )
    return (channels, rest // spec.group_size)


def to_groups(x, spec):
    """`(C, G, group_size)` view of `x` for a per-group spec, and the function that undoes it.

    Channel `c` is `x` with `spec.axis` moved first, flattened row-major and
    cut into `G` runs of `group_size` elements.
    """
    shape = tuple(x.shape)
    axis = channel_axis(spec, len(shape))
    channels, groups = param_shape(shape, spec)
    moved = ops.moveaxis(x, axis, 0)
    moved_shape = tuple(moved.shape)
    grouped = ops.reshape(moved, (channels, groups, spec.group_size))

    def undo(y):
        return ops.moveaxis(ops.reshape(y, moved_shape), 0, axis)

    return grouped, undo


def _broadcastable(p, x, spec, field):
    """Reshape a per-tensor or per-channel parameter to broadcast against `x`."""
    p = ops.convert_to_tensor(p)
    if spec.granularity == "per_tensor":
        if len(p.shape) and math.prod(p.shape) != 1:
            raise ShapeMismatchError(field, (), p.shape)
        return ops.reshape(p, ())
    ndim = len(x.shape)
    axis = channel_axis(spec, ndim)
    channels = x.shape[axis]
    size = math.prod(p.shape) if len(p.shape) else 1
    if channels is not None and size not in (1, channels):
        raise ShapeMismatchError(field, (channels,), p.shape)
    shape = [1] * ndim
    shape[axis] = -1 if size != 1 else 1
    return ops.reshape(p, shape)


def apply_params(x, scale, zero_point, spec, fn):
    """Run `fn(x, scale, zero_point)` with the parameters broadcast per `spec` (per group: on `to_groups(x)`)."""
    scale = float_tensor(scale)
    zero_point = ops.cast(ops.convert_to_tensor(zero_point), "float32")
    if spec.granularity == "per_group":
        grouped, undo = to_groups(x, spec)
        expected = tuple(grouped.shape[:2])
        for field, p in (("scale", scale), ("zero_point", zero_point)):
            if len(p.shape) and tuple(p.shape) != expected:
                raise ShapeMismatchError(field, expected, p.shape)
        s = ops.reshape(scale, expected + (1,)) if len(scale.shape) else scale
        z = ops.reshape(zero_point, expected + (1,)) if len(zero_point.shape) else zero_point
        return undo(fn(grouped, s, z))
    return fn(x, _broadcastable(scale, x, spec, "scale"), _broadcastable(zero_point, x, spec, "zero_point"))


def compute_qparams(min_val, max_val, spec):
    """Scale and zero point that map `[min_val, max_val]` onto the spec's grid.

    The range is first widened to contain 0. Symmetric specs use
    `scale = max(|min|, |max|) / qmax` and zero point 0; asymmetric specs use
    `scale = (max - min) / (qmax - qmin)` and an integer zero point, so 0.0 is
    exactly representable. A zero-width range gives `scale = EPS`.

    Args:
        min_val: Minimum, a scalar or an array (per channel / per group).
        max_val: Maximum, same shape as `min_val`.
        spec: The `kq.QuantSpec`.

    Returns:
        `(scale, zero_point)`: float32 and int32 tensors of `min_val`'s shape.
    """
    check_spec(spec)
    min_val = ops.minimum(ops.cast(ops.convert_to_tensor(min_val), "float32"), 0.0)
    max_val = ops.maximum(ops.cast(ops.convert_to_tensor(max_val), "float32"), 0.0)
    if spec.symmetric:
        amax = ops.maximum(ops.negative(min_val), max_val)
        scale = ops.maximum(ops.divide(amax, float(spec.qmax)), EPS)
        zero_point = ops.zeros_like(scale)
    else:
        scale = ops.maximum(ops.divide(max_val - min_val, float(spec.qmax - spec.qmin)), EPS)
        zero_point = ops.clip(round_half_up(spec.qmin - min_val / scale), spec.qmin, spec.qmax)
    return scale, ops.cast(zero_point, "int32")


def _quantize_float(x, scale, zero_point, spec, seed):
    v = ops.divide(x, scale)
    if spec.stochastic_rounding:
        import keras

        v = ops.floor(v + keras.random.uniform(ops.shape(v), dtype=v.dtype, seed=seed))
    else:
        v = round_half_up(v)
    return ops.clip(v + zero_point, float(spec.qmin), float(spec.qmax))


def quantize(x, scale, zero_point, spec, seed=None):
    """Quantize `x` to integers on the spec's grid.

    Args:
        x: Float tensor.
        scale: Scale (scalar, `(C,)` or `(C, G)` per the spec's granularity).
        zero_point: Integer zero point, same shape as `scale`.
        spec: The `kq.QuantSpec`.
        seed: Seed (int or `keras.random.SeedGenerator`) for stochastic rounding.

    Returns:
        An `int8` (bits <= 8) or `int16` tensor holding grid values.
    """
    check_spec(spec)
    x = ops.cast(float_tensor(x), "float32")
    q = apply_params(x, scale, zero_point, spec, lambda v, s, z: _quantize_float(v, s, z, spec, seed))
    return ops.cast(q, spec.storage_dtype)


def dequantize(q, scale, zero_point, spec):
    """Map grid integers back to floats: `(q - zero_point) * scale` (float32)."""
    check_spec(spec)
    q = ops.cast(_tensor(q), "float32")
    return apply_params(q, scale, zero_point, spec, lambda v, s, z: (v - z) * s)


def _uses_tf_fake_quant(spec):
    import keras

    return (
        keras.backend.backend() == "tensorflow"
        and not spec.stochastic_rounding
        and spec.granularity in ("per_tensor", "per_channel")
    )


def fake_quant(x, scale, zero_point, spec, seed=None):
    """Quantize then dequantize, with the straight-through gradient.

    The gradient with respect to `x` is 1 inside the representable range
    `[(qmin - zp) * scale, (qmax - zp) * scale]` and 0 outside; `scale` and
    `zero_point` receive no gradient (see `kq.ops.lsq_fake_quant` for learned
    ranges). On TensorFlow, per-tensor and per-channel deterministic schemes go
    through `keras.quantizers.fake_quant_with_min_max_vars`, which emits
    `tf.quantization.fake_quant_with_min_max_vars(_per_channel)`, the op the
    TFLite converter reads; elsewhere the same arithmetic is written with
    `keras.ops`.

    Args:
        x: Float tensor (any float dtype; the result has the same dtype).
        scale: Scale, shaped per the spec's granularity.
        zero_point: Integer zero point, same shape as `scale`.
        spec: The `kq.QuantSpec`.
        seed: Seed for stochastic rounding.

    Returns:
        A tensor like `x` with values on the quantization grid.
    """
    check_spec(spec)
    x = float_tensor(x)
    dtype = x.dtype
    x32 = ops.cast(x, "float32")
    scale = ops.stop_gradient(float_tensor(scale))
    zero_point = ops.stop_gradient(ops.cast(_tensor(zero_point), "float32"))

    if _uses_tf_fake_quant(spec):
        from keras import quantizers

        _broadcastable(scale, x32, spec, "scale")  # shape checks only
        _broadcastable(zero_point, x32, spec, "zero_point")
        nudged_min = (spec.qmin - zero_point) * scale
        nudged_max = (spec.qmax - zero_point) * scale
        axis = None
        if spec.granularity == "per_channel":
            axis = spec.axis
            if math.prod(nudged_min.shape) == 1:  # one range shared by every channel
                channels = x32.shape[channel_axis(spec, len(x32.shape))]
                nudged_min = ops.broadcast_to(ops.reshape(nudged_min, ()), (channels,))
                nudged_max = ops.broadcast_to(ops.reshape(nudged_max, ()), (channels,))
        if axis is not None and len(x32.shape) > 4:
            # TensorFlow's per-channel FakeQuant gradient takes rank <= 4: quantize a
            # (elements, channels) view (channels last) and restore the layout.
            ch = channel_axis(spec, len(x32.shape))
            moved = ops.moveaxis(x32, ch, -1)
            flat = ops.reshape(moved, (-1, moved.shape[-1]))
            y = quantizers.fake_quant_with_min_max_vars(
                flat, nudged_min, nudged_max, num_bits=spec.bits, narrow_range=spec.narrow_range, axis=-1
            )
            return ops.cast(ops.moveaxis(ops.reshape(y, ops.shape(moved)), -1, ch), dtype)
        y = quantizers.fake_quant_with_min_max_vars(
            x32, nudged_min, nudged_max, num_bits=spec.bits, narrow_range=spec.narrow_range, axis=axis
        )
        return ops.cast(y, dtype)

    def fq(v, s, z):
        lo = (spec.qmin - z) * s
        hi = (spec.qmax - z) * s
        # Gradient 1 on the closed range [lo, hi], 0 outside. `ops.clip` would split the
        # gradient 0.5 / 0.5 at the bounds on JAX, where a channel's largest weight lies.
        inside = ops.logical_and(ops.greater_equal(v, lo), ops.less_equal(v, hi))
        clipped = ops.where(inside, v, ops.stop_gradient(ops.clip(v, lo, hi)))
        y = (_quantize_float(v, s, z, spec, seed) - z) * s
        return clipped + ops.stop_gradient(y - clipped)

    return ops.cast(apply_params(x32, scale, zero_point, spec, fq), dtype)


def tensor_range(x, spec):
    """Min and max of `x` reduced per the spec's granularity.

    Returns:
        `(min, max)`: scalars, `(C,)` or `(C, G)` tensors.
    """
    check_spec(spec)
    x = float_tensor(x)
    if spec.granularity == "per_tensor":
        return ops.min(x), ops.max(x)
    if spec.granularity == "per_channel":
        axis = channel_axis(spec, len(x.shape))
        axes = tuple(i for i in range(len(x.shape)) if i != axis)
        return ops.min(x, axis=axes), ops.max(x, axis=axes)
    grouped, _ = to_groups(x, spec)
    return ops.min(grouped, axis=-1), ops.max(grouped, axis=-1)


def tensor_qparams(x, spec):
    """`compute_qparams` on the min-max range of `x`."""
    return compute_qparams(*tensor_range(x, spec), spec)


# Weight observers that search the clipping range (`keras_quant.observers.REGISTRY` checks at import that
# these are its records with `weight_search`); every other observer takes
# the weights' min-max (weights are known exactly: there is no distribution to
# estimate, and percentile / KL / mean-std ranges are activation estimators).
WEIGHT_SEARCH_OBSERVERS = ("mse", "auto")
# Candidate ranges: the min-max range shrunk by these factors, 1.0 first (so a
# tie keeps min-max), down to 0.22 in steps of 0.02.
WEIGHT_SEARCH_RATIOS = tuple(round(1.0 - 0.02 * k, 2) for k in range(40))


# Elements (candidates x weights) the search evaluates at once: bounds its memory
# (64 MiB of float32) whatever the layer's size.
_SEARCH_CHUNK_ELEMENTS = 1 << 24


def _columns(x, spec):
    """`x` as `(N, R)`: one column per range of the spec (R = 1, C or C * G)."""
    if spec.granularity == "per_tensor":
        return ops.reshape(x, (-1, 1))
    if spec.granularity == "per_channel":
        moved = ops.moveaxis(x, channel_axis(spec, len(x.shape)), -1)
        return ops.reshape(moved, (-1, moved.shape[-1]))
    grouped, _ = to_groups(x, spec)  # (C, G, g)
    channels, groups, size = grouped.shape
    return ops.transpose(ops.reshape(grouped, (channels * groups, size)))


def weight_range(x, spec, ratios=WEIGHT_SEARCH_RATIOS):
    """The range a weight tensor is quantized over, per the spec's `observer`.

    `"mse"` and `"auto"` search, independently for each range of the spec's
    granularity (tensor, channel or group), the min-max range shrunk by one of
    `ratios` whose quantize-dequantize has the least mean squared error on `x`
    (ties go to the earliest ratio; with the default ratios that is the widest,
    1.0 being min-max itself, so the error is never above min-max's; a range
    whose errors are not numbers, from NaN or infinite weights, keeps the first
    ratio, so it is min-max's with its NaN / inf semantics). At 4 bits
    and below this clips the few largest weights of a channel to give the
    others finer steps. Every other observer gives the min-max range
    (`tensor_range`). The candidates are evaluated together, in chunks of
    bounded size, so the search is a handful of ops in a compiled step.

    Args:
        x: The weights.
        spec: The `kq.QuantSpec`.
        ratios: The shrink factors tried (each in (0, 1]).

    Returns:
        `(min, max)`: scalars, `(C,)` or `(C, G)` float32 tensors.
    """
    check_spec(spec)
    x = ops.cast(float_tensor(x), "float32")
    lo, hi = tensor_range(x, spec)
    if spec.observer not in WEIGHT_SEARCH_OBSERVERS:
        return lo, hi
    ratios = [float(r) for r in ratios]
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ConfigError("ratios", ratios, "shrink factors must be a non-empty list of values in (0, 1]")
    plain = spec.replace(stochastic_rounding=False)  # the search compares deterministic grids
    cols = _columns(x, spec)  # (N, R)
    n = max(int(cols.shape[0]), 1)
    flat_lo, flat_hi = ops.reshape(lo, (1, -1)), ops.reshape(hi, (1, -1))  # (1, R)
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // (n * max(int(cols.shape[1]), 1)))
    best_r = best_err = None
    for start in range(0, len(ratios), chunk):
        r = ops.convert_to_tensor(np.asarray(ratios[start : start + chunk], "float32")[:, None])  # (k, 1)
        scale, zero_point = compute_qparams(flat_lo * r, flat_hi * r, spec)  # (k, R)
        s, z = scale[:, None, :], ops.cast(zero_point, "float32")[:, None, :]
        q = _quantize_float(cols[None], s, z, plain, None)
        err = ops.mean(ops.square((q - z) * s - cols[None]), axis=1)  # (k, R)
        low = ops.min(err, axis=0)
        k = err.shape[0]
        first = ops.min(ops.where(ops.less_equal(err, low[None]), ops.arange(k, dtype="int32")[:, None], k), axis=0)
        first = ops.where(ops.equal(first, k), 0, first)  # no error is a number (NaN weights): the first ratio
        chunk_r = ops.take(ops.reshape(r, (-1,)), first)
        if best_err is None:
            best_r, best_err = chunk_r, low
        else:  # an earlier chunk wins ties
            better = ops.less(low, best_err)
            best_r, best_err = ops.where(better, chunk_r, best_r), ops.where(better, low, best_err)
    best_r = ops.reshape(best_r, ops.shape(lo))
    return lo * best_r, hi * best_r


def weight_qparams(x, spec):
    """`compute_qparams` on `weight_range(x, spec)`: what PTQ and QAT weight quantizers use."""
    return compute_qparams(*weight_range(x, spec), spec)


# Build-time forms: the same float32 arithmetic in numpy, for values known now (a model being built, a
# calibration being read). Each numpy op is correctly rounded float32 as the backend's is, in the same order,
# so the results are the same bits; many small eager backend ops cost far more than the arithmetic.


def numpy_qparams(min_val, max_val, spec):
    """`compute_qparams` on concrete values, computed in numpy: the same scale and zero point, bit for bit.

    Args:
        min_val: Minimum, a number or an array.
        max_val: Maximum, same shape.
        spec: The `kq.QuantSpec`.

    Returns:
        `(scale, zero_point)`: float32 and int32 numpy arrays of `min_val`'s shape.
    """
    check_spec(spec)
    lo, hi = np.asarray(min_val), np.asarray(max_val)
    if lo.dtype.kind in "fiub" and hi.dtype.kind in "fiub":
        with np.errstate(over="ignore"):
            lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    if lo.dtype != np.float32 or hi.dtype != np.float32 or not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        scale, zero_point = compute_qparams(min_val, max_val, spec)  # NaN / inf: the backend's min / max semantics
        return np.asarray(ops.convert_to_numpy(scale), np.float32), np.asarray(ops.convert_to_numpy(zero_point), np.int32)
    lo, hi = np.minimum(lo, np.float32(0.0)), np.maximum(hi, np.float32(0.0))
    if spec.symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / np.float32(spec.qmax), np.float32(EPS))
        zero_point = np.zeros(np.shape(scale), np.int32)
    else:
        scale = np.maximum((hi - lo) / np.float32(spec.qmax - spec.qmin), np.float32(EPS))
        v = np.floor((np.float32(spec.qmin) - lo / scale) + np.float32(0.5))
        zero_point = np.clip(v, np.float32(spec.qmin), np.float32(spec.qmax)).astype(np.int32)
    return np.asarray(scale, np.float32), np.asarray(zero_point, np.int32)


def _numpy_range(x, spec):
    """`tensor_range` of a float32 numpy array."""
    if spec.granularity == "per_tensor":
        return x.min(), x.max()
    axis = channel_axis(spec, x.ndim)
    if spec.granularity == "per_channel":
        axes = tuple(i for i in range(x.ndim) if i != axis)
        return x.min(axis=axes), x.max(axis=axes)
    channels, groups = param_shape(x.shape, spec)
    grouped = np.moveaxis(x, axis, 0).reshape(channels, groups, spec.group_size)
    return grouped.min(axis=-1), grouped.max(axis=-1)


def numpy_weight_qparams(x, spec):
    """`weight_qparams` of concrete weights (a numpy array), min-max ranges computed in numpy: the same bits.

    The searching observers (`WEIGHT_SEARCH_OBSERVERS`) and weights that are not all finite go through
    `weight_qparams` itself.

    Returns:
        `(scale, zero_point)`: float32 and int32 numpy arrays.
    """
    check_spec(spec)
    x = np.asarray(x)
    if (spec.observer in WEIGHT_SEARCH_OBSERVERS or x.size == 0 or x.dtype.kind not in "fiub"
            or not np.isfinite(x).all()):
        scale, zero_point = weight_qparams(x, spec)
        return np.asarray(ops.convert_to_numpy(scale), np.float32), np.asarray(ops.convert_to_numpy(zero_point), np.int32)
    return numpy_qparams(*_numpy_range(x.astype(np.float32), spec), spec)
