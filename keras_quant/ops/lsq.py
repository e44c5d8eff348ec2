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

`log_step` and `scaled_offset` are how a QAT quantizer parameterises what it
trains (`learnable=True`, `lsq_param="log"`): the step size is
`s = base * exp(LOG_STEP_GAIN * theta)` and the offset
`OFFSET_GAIN * base * phi`. Adam (the usual fine-tuning optimizer) moves
each variable by about its learning rate per step whatever the gradient's
scale, so the paper's `g` does nothing under it, and an additive step size
moves by the same absolute amount (1e-4) whether it is 0.01 or 1: at
fine-tuning rates it barely moves at all. In the log domain the same Adam
step changes `s` by a fraction, about `LOG_STEP_GAIN * lr`, as in TQT's
trained log-thresholds (Jain et al. 2019). Their gradients are normalised
so that plain SGD still takes LSQ's step to first order:

    d log_step / d theta     = upstream / (LOG_STEP_GAIN * s)
    d scaled_offset / d phi  = upstream / (OFFSET_GAIN * base)

(`upstream` being the gradient reaching `s` or the offset), so
`s * LOG_STEP_GAIN * delta theta = -lr * upstream`, LSQ's update.

Example:

>>> import keras, keras_quant as kq
>>> spec = kq.QuantSpec(bits=4, symmetric=True, learnable=True)
>>> s = keras.Variable(0.1)
>>> y = kq.ops.lsq_fake_quant(keras.random.normal((8, 16)), s, None, spec)
"""

import math

from keras import ops

from keras_quant.ops.core import EPS, apply_params, check_spec, float_tensor, round_half_up

__all__ = [
    "lsq_fake_quant", "lsq_grad_scale", "scale_gradient", "log_step", "scaled_offset", "LOG_STEP_GAIN", "OFFSET_GAIN",
]

# Gain of the log-domain step size: an Adam step of the fine-tuning rate 1e-4 changes a step size
# by at most about 1.5% (`LOG_STEP_GAIN * lr`). Chosen on the W4A4 models of benchmarks/bench_peers.py
# (with the integer zero point in training): Fashion-MNIST MobileNet's drop 0.67 / 0.98 / 1.24 / 1.63
# points at 100 / 150 / 200 / 300; 100 lost 2.0 points on digits MobileNet, 150 beat plain QAT on all six.
LOG_STEP_GAIN = 150.0
# Gain of a learned offset (LSQ+), in steps of the grid: an Adam step moves it by about 0.003 steps at lr 1e-4.
# Lower than the step size's: with 300, ReLU6 outputs' offsets drifted 1-2 steps below zero on MobileNet.
OFFSET_GAIN = 30.0


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


def log_step(base, theta, gain=None):
    """The step size `base * exp(gain * theta)` with a normalised gradient for `theta`.

    Args:
        base: Positive step size at `theta = 0` (e.g. from calibration);
            it gets the chain rule's gradient.
        theta: Trainable log-domain parameter, broadcastable to `base`.
        gain: Multiplier of `theta` in the exponent (default `LOG_STEP_GAIN`).

    Returns:
        The step size `s`. The gradient of `theta` is
        `upstream / (gain * s)` (module docstring): SGD on `theta` takes
        LSQ's additive step, Adam changes `s` by about `gain * lr` relatively.

    Example:

    >>> s = kq.ops.log_step(keras.ops.convert_to_tensor(0.1), keras.Variable(0.0))
    """
    gain = float(LOG_STEP_GAIN if gain is None else gain)

    @ops.custom_gradient
    def fn(b, t):
        factor = ops.exp(gain * t)
        s = b * factor

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return _sum_to(upstream * factor, b), _sum_to(upstream / (gain * ops.maximum(s, EPS)), t)

        return s, grad

    base = ops.cast(ops.convert_to_tensor(base), "float32")
    theta = ops.cast(ops.convert_to_tensor(theta), "float32")
    return fn(base, theta)


def scaled_offset(base, phi, gain=None):
    """The learned offset `gain * base * phi` (in units of the step size `base`), normalised like `log_step`.

    Args:
        base: Positive step size that sets the offset's unit (held fixed: no gradient).
        phi: Trainable parameter, broadcastable to `base`.
        gain: Multiplier of `phi` (default `OFFSET_GAIN`).

    Returns:
        The offset. The gradient of `phi` is `upstream / (gain * base)`:
        SGD takes LSQ+'s additive step, Adam moves the offset by about
        `gain * lr` steps of the grid.

    Example:

    >>> b = kq.ops.scaled_offset(keras.ops.convert_to_tensor(0.1), keras.Variable(0.0))
    """
    gain = float(OFFSET_GAIN if gain is None else gain)

    @ops.custom_gradient
    def fn(b, p):
        unit = gain * ops.maximum(b, EPS)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return ops.zeros_like(b), _sum_to(upstream / unit, p)

        return unit * p, grad

    base = ops.stop_gradient(ops.cast(ops.convert_to_tensor(base), "float32"))
    phi = ops.cast(ops.convert_to_tensor(phi), "float32")
    return fn(base, phi)


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
