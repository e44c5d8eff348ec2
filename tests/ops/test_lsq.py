"""LSQ / LSQ+ gradients against the papers' formulas, written out here."""

import math

import keras
import numpy as np
import pytest

import keras_quant as kq
from tests.ops.test_core import _grad


def ref_lsq(x, s, beta, spec, g):
    """Forward value and gradients of x_hat = round(clip((x-beta)/s, qmin, qmax))*s + beta."""
    v = (x - beta) / s
    below, above = v < spec.qmin, v > spec.qmax
    inside = ~(below | above)
    q = np.clip(np.floor(v + 0.5), spec.qmin, spec.qmax)
    y = q * s + beta
    dx = inside.astype(np.float64)
    ds = np.where(inside, np.floor(v + 0.5) - v, np.where(below, spec.qmin, spec.qmax)) * g
    dbeta = np.where(inside, 0.0, 1.0) * g
    return y, dx, ds, dbeta


def test_grad_scale_formula():
    spec = kq.QuantSpec(bits=4, symmetric=True)
    assert kq.ops.lsq_grad_scale(1000, spec) == pytest.approx(1 / math.sqrt(1000 * 7))
    assert kq.ops.lsq_grad_scale(64, kq.QuantSpec(bits=8)) == pytest.approx(1 / math.sqrt(64 * 127))


def test_lsq_symmetric_gradients_hand_values():
    # 4-bit symmetric: qmin=-8, qmax=7; s = 0.5; x/s = [-10, -3.4, 0.2, 1.6, 3.5, 9]
    spec = kq.QuantSpec(bits=4, symmetric=True, learnable=True)
    x = np.array([-5.0, -1.7, 0.1, 0.8, 1.75, 4.5], "float32")
    s = np.float32(0.5)
    y = keras.ops.convert_to_numpy(kq.ops.lsq_fake_quant(x, s, None, spec, grad_scale=1.0))
    np.testing.assert_allclose(y, [-4.0, -1.5, 0.0, 1.0, 2.0, 3.5], atol=1e-6)
    dx, ds = _grad(lambda a, b: keras.ops.sum(kq.ops.lsq_fake_quant(a, b, None, spec, grad_scale=1.0)), x, s)
    np.testing.assert_allclose(dx, [0, 1, 1, 1, 1, 0])
    # round(v) - v inside; qmin / qmax outside.
    expected_ds = -8 + (-3 + 3.4) + (0 - 0.2) + (2 - 1.6) + (4 - 3.5) + 7
    assert float(ds) == pytest.approx(expected_ds, abs=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_plus_gradients_match_reference(rng, bits):
    spec = kq.QuantSpec(bits=bits, learnable=True)
    x = rng.normal(size=(6, 5)).astype("float32") * 2
    s = np.full((5,), 0.3, "float32")
    beta = rng.normal(size=(5,)).astype("float32") * 0.2
    spec_pc = spec.replace(granularity="per_channel")
    g = kq.ops.lsq_grad_scale(6, spec_pc)
    upstream = rng.normal(size=x.shape).astype("float32")

    def f(a, b, c):
        return keras.ops.sum(kq.ops.lsq_fake_quant(a, b, c, spec_pc) * upstream)

    dx, ds, dbeta = _grad(f, x, s, beta)
    y_ref, dx_ref, ds_ref, dbeta_ref = ref_lsq(x.astype(np.float64), s.astype(np.float64), beta, spec_pc, g)
    y = keras.ops.convert_to_numpy(kq.ops.lsq_fake_quant(x, s, beta, spec_pc))
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref * upstream, atol=1e-5)
    np.testing.assert_allclose(ds, (ds_ref * upstream).sum(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbeta, (dbeta_ref * upstream).sum(0), rtol=1e-4, atol=1e-5)


def test_default_grad_scale_uses_elements_per_step(rng):
    spec = kq.QuantSpec(bits=8, symmetric=True, learnable=True)
    x = rng.normal(size=(10, 4)).astype("float32") * 10  # many values clipped -> non-zero ds
    s = np.float32(0.01)
    (ds_default,) = _grad(lambda b: keras.ops.sum(kq.ops.lsq_fake_quant(x, b, None, spec)), s)
    (ds_one,) = _grad(lambda b: keras.ops.sum(kq.ops.lsq_fake_quant(x, b, None, spec, grad_scale=1.0)), s)
    assert float(ds_default) == pytest.approx(float(ds_one) / math.sqrt(40 * 127), rel=1e-5)


def test_scale_gradient_is_identity_forward():
    v = np.array([1.0, -2.0], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kq.ops.scale_gradient(v, 0.1)), v)
    (g,) = _grad(lambda a: keras.ops.sum(kq.ops.scale_gradient(a, 0.1)), v)
    np.testing.assert_allclose(g, [0.1, 0.1], rtol=1e-6)


def test_lsq_step_size_learns_toward_lower_error(rng):
    """A few SGD steps on the reconstruction loss move a bad step size toward a good one."""
    spec = kq.QuantSpec(bits=4, symmetric=True, learnable=True)
    x = rng.normal(size=(512,)).astype("float32")
    s = keras.Variable(np.float32(0.02))

    def loss(sv):
        return keras.ops.mean((kq.ops.lsq_fake_quant(x, sv, None, spec, grad_scale=1.0) - x) ** 2)

    start = float(keras.ops.convert_to_numpy(loss(s.value)))
    for _ in range(60):
        (g,) = _grad(loss, keras.ops.convert_to_numpy(s.value))
        s.assign(s.value - 0.05 * g)
    end = float(keras.ops.convert_to_numpy(loss(s.value)))
    assert end < start * 0.5


def test_log_step_and_scaled_offset_match_reference(rng):
    """Forward `base * exp(gain * theta)` and `gain * base * phi`; the trainable parameters get the upstream
    gradient over `gain * s` and `gain * base` (numpy reference of the module docstring's formulas)."""
    base = np.array([0.3, 0.05, 1.2], "float32")
    theta = rng.normal(size=3).astype("float32") * 1e-3
    up = rng.normal(size=(4, 3)).astype("float32")
    gain = 300.0
    s_ref = base.astype(np.float64) * np.exp(gain * theta.astype(np.float64))
    s = keras.ops.convert_to_numpy(kq.ops.log_step(base, theta, gain))
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    db, dt = _grad(lambda b, t: keras.ops.sum(kq.ops.log_step(b, t, gain) * up), base, theta)
    np.testing.assert_allclose(db, up.sum(0) * np.exp(gain * theta), rtol=1e-5)  # the chain rule
    np.testing.assert_allclose(dt, up.sum(0) / (gain * s_ref), rtol=1e-5)
    b = keras.ops.convert_to_numpy(kq.ops.scaled_offset(base, theta, 30.0))
    np.testing.assert_allclose(b, 30.0 * base * theta, rtol=1e-5)
    (dp,) = _grad(lambda p: keras.ops.sum(kq.ops.scaled_offset(base, p, 30.0) * up), theta)
    np.testing.assert_allclose(dp, up.sum(0) / (30.0 * base), rtol=1e-5)
    assert kq.ops.LOG_STEP_GAIN > 1


def test_sgd_on_log_step_takes_lsqs_step():
    """To first order an SGD step on theta changes s by `-lr * dL/ds`, as SGD on s itself (LSQ's update)."""
    spec = kq.QuantSpec(bits=4, symmetric=True, learnable=True)
    x = np.linspace(-3.0, 3.0, 41).astype("float32")
    base, lr = np.float32(0.2), 1e-4

    def loss(s):
        return keras.ops.mean((kq.ops.lsq_fake_quant(x, s, None, spec, grad_scale=1.0) - x) ** 2)

    (g_s,) = _grad(loss, base)
    (g_t,) = _grad(lambda t: loss(kq.ops.log_step(base, t)), np.float32(0.0))
    s_new = float(keras.ops.convert_to_numpy(kq.ops.log_step(base, np.float32(-lr * g_t))))
    assert s_new - base == pytest.approx(-lr * float(g_s), rel=1e-2)
