"""Learned step size quantization: LSQ (Esser et al., 2019) and LSQ+ (Bhalgat et al., 2020).

    x_hat = round(clip((x - offset) / s, qmin, qmax)) * s + offset

The gradients are the papers' (the straight-through estimator for `round`),
written out in a custom gradient:

    d x_hat / d x      = 1 inside, 0 outside the clip range
    d x_hat / d s      = round(v) - v inside, qmin (below) or qmax (above) outside,
                         with v = (x - offset) / s
    d x_hat / d offset = 0 inside, 1 outside                      (LSQ+)

and the step size and offset gradients are multiplied by
`grad_scale = 1 / sqrt(numel * qmax)` (the paper's `g`), where `numel` is the
number of elements that share one step size.

Example:

>>> import keras, keras_quant as kq
>>> spec = kq.QuantSpec(bits=4, symmetric=True, learnable=True)
>>> s = keras.Variable(0.1)
>>> y = kq.ops.lsq_fake_quant(keras.random.normal((8, 16)), s, None, spec)
"""

import math

from keras import ops

from keras_quant.ops.core import EPS, apply_params, check_spec, float_tensor, round_half_up

__all__ = ["lsq_fake_quant", "lsq_grad_scale", "scale_gradient"]


def lsq_grad_scale(num_elements, spec):
    """The LSQ gradient scale `1 / sqrt(num_elements * qmax)`.

    Args:
        num_elements: Elements that share one step size (weights of a layer
            per channel, or features of an activation).
        spec: The `kq.QuantSpec` (its `qmax` is the paper's `Q_P`).
    """
    check_spec(spec)
    return 1.0 / math.sqrt(max(int(num_elements), 1) * spec.qmax)


def scale_gradient(v, factor):
    """Identity in the forward pass; multiplies the gradient by `factor`."""
    scaled = v * factor
    return scaled + ops.stop_gradient(v - scaled)


def _sum_to(t, p):
    """Sum `t` over the axes along which `p` was broadcast against it (to `p`'s shape)."""
    if len(p.shape) == 0:
        return ops.sum(t)
    axes = tuple(i for i, (a, b) in enumerate(zip(p.shape, t.shape)) if a == 1 and b != 1)
    return ops.sum(t, axis=axes, keepdims=True) if axes else t


def _lsq_kernel(lo, hi):
    """`x_hat = round(clip((v - beta) / s, lo, hi)) * s + beta` with the papers' gradients, written out.

    Autodiff of the straight-through form would build about twice the
    elementwise ops; the gradient here is the closed form (module docstring):
    `dv` is the mask of the closed range `[lo, hi]`, `ds` is `round(u) - u`
    inside and `lo` / `hi` outside, `dbeta` is 1 outside.
    """

    @ops.custom_gradient
    def fq(v, s, beta):
        u = (v - beta) / s
        c = ops.clip(u, lo, hi)
        q = round_half_up(c)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            inside = ops.logical_and(ops.greater_equal(u, lo), ops.less_equal(u, hi))
            dv = ops.where(inside, upstream, 0.0)
            ds = _sum_to(upstream * ops.where(inside, q - u, c), s)
            dbeta = _sum_to(upstream - dv, beta)
            return dv, ds, dbeta

        return q * s + beta, grad

    return fq


def lsq_fake_quant(x, scale, offset, spec, grad_scale=None):
    """Fake quantization with a trainable step size (and offset).

    Args:
        x: Float tensor.
        scale: Step size `s` (trainable), shaped per the spec's granularity.
            Values below `EPS` are clamped to `EPS`.
        offset: Float offset `beta` for asymmetric specs (LSQ+), same shape
            as `scale`, or None (symmetric LSQ, offset 0). The equivalent
            integer zero point is `-offset / scale`.
        spec: The `kq.QuantSpec`.
        grad_scale: Factor applied to the gradients of `scale` and `offset`.
            Defaults to `lsq_grad_scale(x.size / scale.size, spec)`.

    Returns:
        A tensor like `x` with values on the learned grid.
    """
    check_spec(spec)
    x = float_tensor(x)
    dtype = x.dtype
    x32 = ops.cast(x, "float32")
    scale = ops.cast(ops.convert_to_tensor(scale), "float32")
    if offset is None or spec.symmetric:
        offset = ops.zeros_like(scale)
    offset = ops.cast(ops.convert_to_tensor(offset), "float32")
    if grad_scale is None:
        per_param = math.prod(x32.shape) / max(math.prod(scale.shape) if len(scale.shape) else 1, 1)
        grad_scale = lsq_grad_scale(per_param, spec)
    scale = scale_gradient(ops.maximum(scale, EPS), grad_scale)
    offset = scale_gradient(offset, grad_scale)

    fq = _lsq_kernel(float(spec.qmin), float(spec.qmax))
    return ops.cast(apply_params(x32, scale, offset, spec, fq), dtype)
