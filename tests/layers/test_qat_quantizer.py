"""QATQuantizer, Schedule and ActivationQuantizer(mode="qat"): STE masks, LSQ gradients, range modes.

The expected values are written out here: a float64 numpy reference of the
affine grid (`ref_qparams`, `ref_fake_quant`) and of LSQ / LSQ+ (`ref_lsq`,
Esser et al. 2019, Bhalgat et al. 2020), and hand-picked cases whose
gradients are worked out in the comments. Every test but the ones marked
`tensorflow` runs under TensorFlow and JAX.
"""

import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_quant as kq
from keras_quant.errors import ConfigError
from keras_quant.layers import ActivationQuantizer, QuantizeWrapper
from keras_quant.layers.qat_quantizer import NEVER, QATQuantizer, Schedule, effective_qparams, sync_range
from tests.conftest import to_np

EPS = float(np.finfo(np.float32).eps)
A4 = kq.QuantSpec(bits=4)  # qmin = -8, qmax = 7
S4 = kq.QuantSpec(bits=4, symmetric=True)
GAIN, OGAIN = kq.ops.LOG_STEP_GAIN, kq.ops.OFFSET_GAIN


def var_grad(grad, unit, lsq_param, gain=GAIN):
    """The gradient a trainable delta gets from `grad` reaching the step size (offset) of size `unit`:
    itself with `lsq_param="linear"`, `grad / (gain * unit)` in the log form (`kq.ops.log_step`)."""
    return grad if lsq_param == "linear" else grad / (gain * unit)
W4 = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", narrow_range=True)  # [-7, 7]

# --------------------------------------------------------------------------
# Reference implementations (float64 numpy, from the definitions).


def ref_qparams(lo, hi, spec):
    """Scale and integer zero point mapping [lo, hi] (widened to contain 0) onto the grid."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if spec.symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / spec.qmax, EPS)
        return scale, np.zeros_like(scale)
    scale = np.maximum((hi - lo) / (spec.qmax - spec.qmin), EPS)
    return scale, np.clip(np.floor(spec.qmin - lo / scale + 0.5), spec.qmin, spec.qmax)


def ref_fake_quant(x, scale, zp, spec):
    q = np.clip(np.floor(np.asarray(x, np.float64) / scale + 0.5) + zp, spec.qmin, spec.qmax)
    return (q - zp) * scale


def ref_lsq(x, s, beta, spec, g):
    """x_hat = round(clip((x - beta) / s, qmin, qmax)) * s + beta and its element-wise gradients.

    d/dx = 1 inside, 0 outside; d/ds = round(v) - v inside, qmin below, qmax
    above (times g); d/dbeta = 0 inside, 1 outside (times g).
    """
    v = (np.asarray(x, np.float64) - beta) / s
    below, above = v < spec.qmin, v > spec.qmax
    inside = ~(below | above)
    y = np.clip(np.floor(v + 0.5), spec.qmin, spec.qmax) * s + beta
    ds = np.where(inside, np.floor(v + 0.5) - v, np.where(below, spec.qmin, spec.qmax)) * g
    return y, inside.astype(np.float64), ds, (~inside).astype(np.float64) * g


def near_tie(x, scale, offset=0.0, tol=1e-4):
    """Values whose (x - offset) / scale sits on a rounding boundary (float32 may round either way)."""
    v = (np.asarray(x, np.float64) - offset) / scale
    return np.abs(v - np.floor(v) - 0.5) < tol


# --------------------------------------------------------------------------
# Helpers: a layer owning one QATQuantizer, and gradients of one training call.


class Host(keras.layers.Layer):
    """A layer that owns one `QATQuantizer`'s state and calls it with fixed mode flags."""

    def __init__(self, quantizer, shape, observing=True, frozen=False, slots=None, **kwargs):
        super().__init__(**kwargs)
        self.quantizer, self.observing, self.frozen = quantizer, observing, frozen
        self.state = quantizer.build(self, shape, "q", slots=slots)
        self.built = True

    def call(self, x, training=None, slot=None):
        return self.quantizer(x, self.state, bool(training), observing=self.observing, frozen=self.frozen, slot=slot)


def train_grads(layer, x, upstream=None, training=True, jit=True, **kwargs):
    """`(y, dL/dx, {variable name: dL/dvariable})` of one call, `L = sum(upstream * layer(x))`.

    The layer's non-trainable state is updated as in a training step (JAX:
    `stateless_call`, then the new values are written back). A variable the
    loss does not reach gets a zero gradient. JAX compiles the step once
    (`jit`), faster than compiling each eager op for a new shape; repeated
    calls on one shape are faster eagerly (`jit=False`), the ops being cached.
    """
    x = np.asarray(x, "float32")
    up = 1.0 if upstream is None else np.asarray(upstream, "float32")
    variables = list(layer.trainable_variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=training, **kwargs)
            loss = tf.reduce_sum(tf.cast(y, "float32") * up)
        grads = tape.gradient(loss, [xt] + variables)
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(xv, tv):
            y, new_state = layer.stateless_call(tv, non_trainable, xv, training=training, **kwargs)
            return jnp.sum(y.astype("float32") * up), (y, new_state)

        grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
        grad_fn = jax.jit(grad_fn) if jit else grad_fn
        (dx, dvars), (y, new_state) = grad_fn(x, [v.value for v in variables])
        for var, value in zip(layer.non_trainable_variables, new_state):
            var.assign(value)
        grads = [dx] + list(dvars)
    else:
        pytest.fail(f"no gradient helper for backend {backend}")
    grads = [np.zeros(v.shape, "float32") if g is None else to_np(g) for g, v in zip(grads, [x] + variables)]
    return to_np(y), grads[0], {v.name: g for v, g in zip(variables, grads[1:])}


def values(layer, *names):
    """Current values of a layer's variables, by name."""
    by_name = {v.name: v for v in layer.variables}
    return [to_np(by_name[n]).copy() for n in names]


# --------------------------------------------------------------------------
# 1. Straight-through masks.

# 4-bit, scale 0.5. Symmetric: zero point 0, range [-8 * 0.5, 7 * 0.5] = [-4.0, 3.5].
SYM_X = [-5.0, -4.1, -1.7, 0.1, 0.8, 3.4, 4.5]
# Asymmetric: zero point -3, range [(-8 + 3) * 0.5, (7 + 3) * 0.5] = [-2.5, 5.0].
ASYM_X = [-4.0, -2.6, -1.2, 0.3, 2.2, 4.9, 6.0]
MASK = [0, 0, 1, 1, 1, 1, 0]
# Second row: zeros, always representable; the batch of two must not change the LSQ scale.
SYM_CASE = (S4, 0.5, 0, SYM_X, [-4.0, -4.0, -1.5, 0.0, 1.0, 3.5, 3.5])
ASYM_CASE = (A4, 0.5, -3, ASYM_X, [-2.5, -2.5, -1.0, 0.5, 2.0, 5.0, 5.0])


def _batch(row):
    return np.array([row, [0.0] * len(row)], "float32")


@pytest.mark.parametrize("spec, scale, zp, row, y_row", [SYM_CASE, ASYM_CASE], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("how", ["inference", "training-frozen"])
def test_activation_quantizer_ste_mask(spec, scale, zp, row, y_row, learnable, how):
    q = ActivationQuantizer(spec.replace(learnable=learnable), scale=scale, zero_point=zp, mode="qat")
    q.build((None, 7))
    if how == "training-frozen":
        q.set_range_mode("frozen")
    y, dx, _ = train_grads(q, _batch(row), training=how != "inference")
    np.testing.assert_allclose(dx, [MASK, [1.0] * 7])
    np.testing.assert_allclose(y[0], y_row, atol=1e-6)
    np.testing.assert_allclose(y[1], 0.0, atol=1e-6)


def test_activation_quantizer_ste_mask_learn_mode():
    """A learnable quantizer given a range learns from step 0: the mask is that of the learned step."""
    q = ActivationQuantizer(A4.replace(learnable=True), scale=0.5, zero_point=-3, mode="qat")
    q.build((None, 7))
    assert q.range_mode == "learn"
    y, dx, _ = train_grads(q, _batch(ASYM_X))
    np.testing.assert_allclose(dx, [MASK, [1.0] * 7])
    np.testing.assert_allclose(y[0], ASYM_CASE[4], atol=1e-6)


@pytest.mark.parametrize("spec, scale, zp, row, y_row", [SYM_CASE, ASYM_CASE], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize(
    "role, observing, frozen",
    [("activation", False, False), ("activation", True, True), ("weight", False, True)],
    ids=["activation-learn", "activation-frozen", "weight-frozen"],
)
def test_qat_quantizer_ste_mask(spec, scale, zp, row, y_row, learnable, role, observing, frozen):
    quantizer = QATQuantizer(spec.replace(learnable=learnable), role=role)
    host = Host(quantizer, (2, 7), observing=observing, frozen=frozen)
    quantizer.set_range(host.state, scale, zp)
    y, dx, _ = train_grads(host, _batch(row))
    np.testing.assert_allclose(dx, [MASK, [1.0] * 7])
    np.testing.assert_allclose(y[0], y_row, atol=1e-6)


def test_fixed_weight_range_follows_the_tensor_so_nothing_is_clipped():
    """A non-learnable weight quantizer observes its tensor until frozen: every element is inside."""
    quantizer = QATQuantizer(S4, role="weight")
    host = Host(quantizer, (2, 7), observing=False, frozen=False)
    quantizer.set_range(host.state, 0.5, 0)
    y, dx, _ = train_grads(host, _batch(SYM_X))
    np.testing.assert_allclose(dx, 1.0)
    # Symmetric range max|x| = 5 -> scale 5 / 7.
    assert float(to_np(host.state["scale"])) == pytest.approx(5 / 7, rel=1e-6)
    np.testing.assert_allclose(y, ref_fake_quant(_batch(SYM_X), 5 / 7, 0, S4), atol=1e-5)


@pytest.mark.parametrize("where", ["weight", "activation"])
def test_ste_gradient_is_one_on_the_range_boundary(where):
    """The largest |value| maps exactly onto the boundary qmax * scale: it is inside, gradient 1.

    Weights: max |w| = 3.5 and 1.75 give scales 0.5 and 0.25 (exact in float32), so
    7 * scale is exactly 3.5 and 1.75. Activations: the first batch of a symmetric
    4-bit quantizer with max |x| = 3.5 gives scale 0.5, range [-4.0, 3.5].
    """
    if where == "weight":
        wrapper = QuantizeWrapper(keras.layers.Dense(2, use_bias=False), (W4, None))
        wrapper(np.zeros((1, 3), "float32"))
        wrapper.layer.kernel.assign(np.array([[3.5, -1.75], [0.2, 0.6], [-1.0, 1.2]], "float32"))
        _, _, grads = train_grads(wrapper, np.ones((1, 3), "float32"))
        np.testing.assert_allclose(grads["kernel"], 1.0)  # d sum(x @ w_q) / dw = x = 1 inside
    else:
        q = ActivationQuantizer(S4, mode="qat")
        q.build((None, 3))
        _, dx, _ = train_grads(q, np.array([[3.5, -1.0, 0.2]], "float32"))
        np.testing.assert_allclose(dx, 1.0)


# --------------------------------------------------------------------------
# 2. LSQ gradients reaching scale_delta / offset_delta.


@pytest.mark.parametrize("lsq_param", ["log", "linear"])
def test_lsq_gradients_hand_values_symmetric(lsq_param):
    # v = x / 0.5 = [-10, -8.2, -3.4, 0.2, 1.6, 6.8, 9]; round(v) - v inside: 0.4, -0.2, 0.4, 0.2;
    # two below (qmin = -8 each), one above (qmax = 7): sum = -16 + 0.8 + 7 = -8.2.
    # g = 1 / sqrt(N_F * qmax), N_F = 7 features per sample (not 14 elements in the batch) -> 1 / 7.
    # The log form (default) hands log(step) the normalised gradient: that over GAIN * 0.5.
    q = ActivationQuantizer(S4.replace(learnable=True, lsq_param=lsq_param), scale=0.5, zero_point=0, mode="qat")
    q.build((None, 7))
    assert [v.name for v in q.trainable_variables] == ["scale_delta"]
    _, _, grads = train_grads(q, _batch(SYM_X))
    assert float(grads["scale_delta"]) == pytest.approx(var_grad(-8.2 / 7, 0.5, lsq_param), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("lsq_param", ["log", "linear"])
def test_lsq_plus_gradients_hand_values_asymmetric(lsq_param):
    # beta = -zp * s = 1.5; v = (x - 1.5) / 0.5 = [-11, -8.2, -5.4, -2.4, 1.4, 6.8, 9].
    # d/ds: round(v) - v inside: 0.4, 0.4, -0.4, 0.2; outside -8, -8, 7 -> -8.4, times g = 1/7.
    # d/dbeta: 3 values outside -> 3, times g. The zero row sits on the grid (v = -3): 0 for both.
    q = ActivationQuantizer(A4.replace(learnable=True, lsq_param=lsq_param), scale=0.5, zero_point=-3, mode="qat")
    q.build((None, 7))
    _, _, grads = train_grads(q, _batch(ASYM_X))
    assert float(grads["scale_delta"]) == pytest.approx(var_grad(-8.4 / 7, 0.5, lsq_param), rel=1e-5, abs=1e-7)
    assert float(grads["offset_delta"]) == pytest.approx(var_grad(3 / 7, 0.5, lsq_param, OGAIN), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_activation_gradients_match_reference_with_learned_deltas(rng, symmetric):
    """With a non-zero learned step and offset, the variable gradients are LSQ's at those values."""
    spec = kq.QuantSpec(bits=4, symmetric=symmetric, learnable=True, lsq_param="linear")
    q = ActivationQuantizer(spec, scale=0.4, zero_point=0 if symmetric else 2, mode="qat")
    q.build((None, 5, 3))
    q._state["scale_delta"].assign(0.05)
    if not symmetric:
        q._state["offset_delta"].assign(-0.3)
    # Learned offset -2 * 0.4 - 0.3 = -1.1 is moved onto the integer zero point round(1.1 / 0.45) = 2.
    step, offset = 0.45, (0.0 if symmetric else -2 * 0.45)
    x = (rng.normal(size=(4, 5, 3)) * 3).astype("float32")
    x[near_tie(x, step, offset)] += 0.01
    up = rng.normal(size=x.shape).astype("float32")
    y, dx, grads = train_grads(q, x, up)
    g = 1 / math.sqrt(15 * spec.qmax)
    y_ref, dx_ref, ds_ref, db_ref = ref_lsq(x, step, offset, spec, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref * up, atol=1e-6)
    assert float(grads["scale_delta"]) == pytest.approx((ds_ref * up).sum(), rel=1e-4, abs=1e-5)
    if not symmetric:
        assert float(grads["offset_delta"]) == pytest.approx((db_ref * up).sum(), rel=1e-4, abs=1e-5)


def test_lsq_per_channel_weight_gradients_match_reference(rng):
    spec = kq.QuantSpec(bits=4, granularity="per_channel", axis=-1, learnable=True, lsq_param="linear")
    quantizer = QATQuantizer(spec, role="weight")
    host = Host(quantizer, (3, 4), observing=False, frozen=False)  # learn mode
    scale = np.array([0.1, 0.2, 0.3, 0.05], "float32")
    zp = np.array([0.0, -2.0, 3.0, 1.0], "float32")
    quantizer.set_range(host.state, scale, zp)
    w = (rng.normal(size=(3, 4)) * np.array([1.0, 1.5, 2.5, 0.6])).astype("float32")
    w[near_tie(w, scale, -zp * scale)] += 0.003
    up = rng.normal(size=w.shape).astype("float32")
    # N_W = 3 weights per step size.
    g = 1 / math.sqrt(3 * 7)
    assert quantizer._grad_scale(w, host.state) == pytest.approx(g, rel=1e-12)
    y, dx, grads = train_grads(host, w, up)
    y_ref, dx_ref, ds_ref, db_ref = ref_lsq(w, scale, -zp * scale, spec, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref * up, atol=1e-6)
    np.testing.assert_allclose(grads["q_scale_delta"], (ds_ref * up).sum(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["q_offset_delta"], (db_ref * up).sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "role, spec, shape, n",
    [
        ("activation", kq.QuantSpec(bits=4, learnable=True), (2, 5, 3), 15),  # 15 features / 1 step
        ("activation", kq.QuantSpec(bits=8, learnable=True), (7, 10), 10),
        ("activation", kq.QuantSpec(bits=4, granularity="per_channel", learnable=True), (2, 5, 3), 5),  # 15 / 3
        ("weight", kq.QuantSpec(bits=4, learnable=True), (3, 4), 12),  # 12 weights / 1 step
        ("weight", kq.QuantSpec(bits=4, granularity="per_channel", learnable=True), (3, 4), 3),  # 12 / 4
        ("weight", kq.QuantSpec(bits=8, granularity="per_channel", axis=-1, learnable=True), (3, 3, 2, 8), 18),
    ],
)
def test_grad_scale_formula(role, spec, shape, n):
    quantizer = QATQuantizer(spec, role=role)
    host = Host(quantizer, shape)
    g = quantizer._grad_scale(np.zeros(shape, "float32"), host.state)
    assert g == pytest.approx(1 / math.sqrt(n * spec.qmax), rel=1e-12)


def test_no_variable_gradient_while_observing():
    """In observe mode the step is the observed one: scale_delta and offset_delta get no gradient."""
    q = ActivationQuantizer(A4.replace(learnable=True), mode="qat", observe_steps=5)
    q.build((None, 7))
    assert q.range_mode == "observe"
    _, dx, grads = train_grads(q, _batch(ASYM_X))
    np.testing.assert_allclose(dx[:, 1:-1], 1.0)  # the range was just observed from this batch
    assert float(grads["scale_delta"]) == 0.0 and float(grads["offset_delta"]) == 0.0


# --------------------------------------------------------------------------
# 3. Modes and the schedule.


def test_observe_moving_average_and_inference():
    q = ActivationQuantizer(kq.QuantSpec(bits=8), mode="qat", momentum=0.75)
    assert q(np.zeros((1, 3), "float32")).shape == (1, 3)  # builds; inference does not observe
    assert float(to_np(q._state["seen"])) == 0.0
    q(np.array([[-1.0, 0.5, 2.0]], "float32"), training=True)
    lo, hi, seen, step = values(q, "min", "max", "seen", "qat_step")
    assert (float(lo), float(hi), float(seen), float(step)) == (-1.0, 2.0, 1.0, 1.0)  # first batch: exact
    x2 = np.array([[-3.0, 1.0, 6.0]], "float32")
    y2 = to_np(q(x2, training=True))
    lo, hi, seen, step = values(q, "min", "max", "seen", "qat_step")
    # 0.75 * old + 0.25 * new
    assert (float(lo), float(hi), float(seen), float(step)) == (-1.5, 3.0, 2.0, 2.0)
    scale, zp = ref_qparams(-1.5, 3.0, kq.QuantSpec(bits=8))  # 4.5 / 255, -43
    assert zp == -43
    assert float(to_np(q.scale)) == pytest.approx(scale, rel=1e-6)
    assert float(to_np(q.zero_point)) == -43.0
    np.testing.assert_allclose(y2, ref_fake_quant(x2, scale, zp, kq.QuantSpec(bits=8)), atol=1e-6)
    assert y2[0, 0] == pytest.approx(-1.5) and y2[0, 2] == pytest.approx(3.0)
    # Inference: no update, the current range is used.
    before = values(q, "min", "max", "seen", "qat_step", "scale", "zero_point")
    y3 = to_np(q(np.array([[-100.0, 0.0, 100.0]], "float32"), training=False))
    for a, b in zip(before, values(q, "min", "max", "seen", "qat_step", "scale", "zero_point")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y3, [[-1.5, 0.0, 3.0]], atol=1e-6)


def test_set_mode_frozen_stops_updates():
    q = ActivationQuantizer(kq.QuantSpec(bits=8), mode="qat")
    q(np.array([[-1.0, 2.0]], "float32"), training=True)
    assert q.range_mode == "observe"
    q.set_range_mode("frozen")
    assert q.range_mode == "frozen"
    before = values(q, "min", "max", "seen", "scale", "zero_point")
    y = to_np(q(np.array([[-5.0, 9.0]], "float32"), training=True))
    for a, b in zip(before, values(q, "min", "max", "seen", "scale", "zero_point")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y, [[-1.0, 2.0]], atol=1e-6)  # clipped to the frozen range
    assert q.range_mode == "frozen"


@pytest.mark.parametrize(
    "scale_delta, offset_delta, scale, zero_point",
    [
        (0.0, 0.0, 0.5, -3),  # offset 1.5: -1.5 / 0.5 = -3
        (0.1, -0.8, 0.6, -1),  # offset 0.7: -0.7 / 0.6 = -1.17 -> -1
        (0.1, 0.75, 0.6, -4),  # offset 2.25: -3.75 -> -4
        (0.0, -10.0, 0.5, 7),  # offset -8.5: 17 -> clipped to qmax
        (-0.2, 4.0, 0.3, -8),  # offset 5.5: -18.3 -> clipped to qmin
        (-1.0, 0.0, EPS, -8),  # step clamped to EPS
    ],
)
def test_frozen_learned_offset_becomes_integer_zero_point(scale_delta, offset_delta, scale, zero_point):
    q = ActivationQuantizer(A4.replace(learnable=True, lsq_param="linear"), scale=0.5, zero_point=-3, mode="qat")
    q.build((None, 7))
    q._state["scale_delta"].assign(scale_delta)
    q._state["offset_delta"].assign(offset_delta)
    s, z = (float(to_np(v)) for v in q.qparams)
    assert s == pytest.approx(scale, rel=1e-6) and z == zero_point
    s2, z2 = (float(to_np(v)) for v in effective_qparams(q._state, q.spec))
    assert (s2, z2) == (s, z)
    q.set_range_mode("frozen")
    x = np.array([[-5.0, -1.3, -0.2, 0.0, 0.4, 1.9, 3.3]], "float32")
    y, _, grads = train_grads(q, x)
    np.testing.assert_allclose(y, ref_fake_quant(x, s, zero_point, A4), atol=1e-5)
    assert float(grads["scale_delta"]) == 0.0 and float(grads["offset_delta"]) == 0.0
    assert float(to_np(q._state["scale_delta"])) == pytest.approx(scale_delta)


def test_learn_mode_uses_integer_zero_point_and_switches_back():
    """Training sees the integer zero point inference and export use (offset 0.6, not the learned 0.7), so no
    fraction-of-a-step shift the model learns in training is lost at inference; the offset still learns."""
    q = ActivationQuantizer(A4.replace(learnable=True, lsq_param="linear"), scale=0.5, zero_point=-3, mode="qat")
    q.build((None, 7))
    q._state["scale_delta"].assign(0.1)
    q._state["offset_delta"].assign(-0.8)  # offset 1.5 - 0.8 = 0.7: zero point round(-0.7 / 0.6) = -1
    x = _batch([-5.0, -1.3, -0.25, 0.3, 0.4, 1.9, 3.3])
    q.set_range_mode("frozen")
    q.set_range_mode("learn")
    assert q.range_mode == "learn"
    y, _, grads = train_grads(q, x)
    np.testing.assert_allclose(y, ref_lsq(x, 0.6, 0.6, A4, 1.0)[0], atol=1e-5)
    np.testing.assert_allclose(y, to_np(q(x, training=False)), atol=1e-6)  # training == inference
    assert float(grads["offset_delta"]) != 0.0  # straight through the rounding: LSQ+'s offset gradient
    q.set_range_mode("observe")
    assert q.range_mode == "observe"
    lo_before, = values(q, "min")
    q(x, training=True)  # the first observed batch after a given range: their union
    lo_after, = values(q, "min")
    assert float(lo_after) == min(float(lo_before), -5.0)
    q(x * 0.5, training=True)  # then the moving average
    lo_next, = values(q, "min")
    assert float(lo_next) == pytest.approx(0.99 * float(lo_after) + 0.01 * -2.5, rel=1e-6)


def test_schedule_observes_exactly_n_steps_then_learns():
    q = ActivationQuantizer(A4.replace(learnable=True), mode="qat", observe_steps=3, momentum=0.5)
    q.build((None, 2))
    modes, mins, maxs, ds = [], [], [], []
    for k in range(1, 6):
        modes.append(q.range_mode)
        _, _, grads = train_grads(q, np.array([[-k, 2.0 * k]], "float32"), jit=False)
        lo, hi = values(q, "min", "max")
        mins.append(float(lo))
        maxs.append(float(hi))
        ds.append(float(grads["scale_delta"]))
    assert modes == ["observe", "observe", "observe", "learn", "learn"]
    assert q.range_mode == "learn"
    # Moving average, momentum 0.5: -1, -1.5, -2.25, then fixed.
    assert mins == [-1.0, -1.5, -2.25, -2.25, -2.25]
    assert maxs == [2.0, 3.0, 4.5, 4.5, 4.5]
    assert float(values(q, "seen")[0]) == 3.0 and float(values(q, "qat_step")[0]) == 5.0
    # The observed range [-2.25, 4.5] hands over to learning: 4-bit asymmetric, scale 6.75 / 15 = 0.45, zp -3.
    assert float(to_np(q.scale)) == pytest.approx(0.45, rel=1e-6)
    assert float(to_np(q.zero_point)) == -3.0
    # Observing: no gradient. Learning, x = [-4, 8] and [-5, 10] are both clipped: (qmin + qmax) * g = -1 / sqrt(2 * 7).
    # The log form: that over GAIN * 0.45.
    assert ds[:3] == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(ds[3:], [-1 / math.sqrt(14) / (GAIN * 0.45)] * 2, rtol=1e-5)


def test_frozen_wins_over_observing():
    q = ActivationQuantizer(kq.QuantSpec(bits=8), mode="qat", momentum=0.5)  # observes until changed
    q.build((None, 2))
    q.schedule.set(freeze=2)
    assert float(to_np(q.schedule.observe_until)) == NEVER
    mins = []
    for k in range(1, 5):
        q(np.array([[-k, k]], "float32"), training=True)
        mins.append(float(values(q, "min")[0]))
    assert mins == [-1.0, -1.5, -1.5, -1.5]
    assert q.range_mode == "frozen"
    # The quantizer itself: observing=True and frozen=True do not observe either.
    quantizer = QATQuantizer(kq.QuantSpec(bits=8))
    host = Host(quantizer, (1, 2), observing=True, frozen=True)
    quantizer.set_range(host.state, 0.01, 0)
    before = values(host, "q_min", "q_max", "q_scale", "q_seen")
    y = to_np(host(np.array([[-5.0, 5.0]], "float32"), training=True))
    for a, b in zip(before, values(host, "q_min", "q_max", "q_scale", "q_seen")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y, [[-1.28, 1.27]], atol=1e-6)


def test_schedule_modes_and_thresholds():
    host = keras.layers.Layer()
    schedule = Schedule(host, observe_steps=2)
    assert schedule.range_mode == "observe"
    schedule.advance()
    schedule.advance()
    assert schedule.range_mode == "learn"
    schedule.set_range_mode("observe")
    assert schedule.range_mode == "observe" and float(to_np(schedule.observe_until)) == NEVER
    schedule.set_range_mode("frozen")
    assert schedule.range_mode == "frozen" and float(to_np(schedule.freeze_at)) == 2.0
    schedule.set_range_mode("learn")
    assert schedule.range_mode == "learn" and float(to_np(schedule.freeze_at)) == NEVER
    observing, frozen = (bool(to_np(f)) for f in schedule.flags())
    assert (observing, frozen) == (False, False)
    assert schedule.batch_norm_frozen  # no BatchNormalization threshold


def test_mode_switch_inside_a_compiled_step_needs_no_retrace():
    """Mode changes are variable writes: a compiled training call switches without retracing."""
    q = ActivationQuantizer(kq.QuantSpec(bits=8), mode="qat", momentum=0.5)
    q.build((None, 2))
    traces = []
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(x):
            traces.append(1)
            return q(x, training=True)

        run = step
    else:
        import jax

        @jax.jit
        def pure(state, x):
            traces.append(1)
            y, new_state = q.stateless_call([], state, x, training=True)
            return y, new_state

        def run(x):
            y, new_state = pure([v.value for v in q.non_trainable_variables], x)
            for var, value in zip(q.non_trainable_variables, new_state):
                var.assign(value)
            return y

    run(np.array([[-1.0, 3.0]], "float32"))
    run(np.array([[-3.0, 5.0]], "float32"))
    assert float(values(q, "min")[0]) == -2.0
    q.set_range_mode("frozen")
    y = to_np(run(np.array([[-9.0, 9.0]], "float32")))
    assert float(values(q, "min")[0]) == -2.0 and float(values(q, "qat_step")[0]) == 3.0
    # Range [-2, 4], 8 bits: scale 6 / 255, zero point -43: [-85 s, 170 s] = [-2, 4].
    np.testing.assert_allclose(y, [[-2.0, 4.0]], rtol=1e-6)
    assert len(traces) == 1


def test_learnable_quantizer_trains_in_fit(rng):
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32") * 4
    q = ActivationQuantizer(kq.QuantSpec(bits=4, learnable=True), scale=0.1, zero_point=0, mode="qat")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), q])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert float(values(q, "qat_step")[0]) == 4.0
    assert float(to_np(q._state["scale_delta"])) != 0.0  # the step size was trained
    assert q.range_mode == "learn"


# --------------------------------------------------------------------------
# 4. A quantizer shared by two tensors.


def test_shared_quantizer_slots_keep_own_ranges_and_use_the_union():
    spec = kq.QuantSpec(bits=8)
    q = ActivationQuantizer(spec, mode="qat", slots=2, momentum=0.5)
    q.build((None, 3))
    a, b = np.array([[-1.0, 0.25, 2.0]], "float32"), np.array([[-0.5, 1.0, 4.0]], "float32")
    c, d = np.array([[-3.0, 0.5, 1.2]], "float32"), np.array([[0.0, 2.0, 6.0]], "float32")

    def check(x, slot, mins, maxs, seen, step, union):
        y = to_np(q(x, slot=slot, training=True))
        lo, hi, got_seen, got_step = values(q, "min", "max", "seen", "qat_step")
        np.testing.assert_allclose(lo, mins)
        np.testing.assert_allclose(hi, maxs)
        np.testing.assert_array_equal(got_seen, seen)
        assert float(got_step) == step
        scale, zp = ref_qparams(*union, spec)
        assert float(to_np(q.scale)) == pytest.approx(scale, rel=1e-6)
        assert float(to_np(q.zero_point)) == zp
        np.testing.assert_allclose(y, ref_fake_quant(x, float(to_np(q.scale)), zp, spec), atol=1e-6)

    # First pair: slot 1 has seen nothing when slot 0 is called, so the union is slot 0's range.
    check(a, 0, [-1.0, 0.0], [2.0, 0.0], [1, 0], 0.0, (-1.0, 2.0))
    check(b, 1, [-1.0, -0.5], [2.0, 4.0], [1, 1], 1.0, (-1.0, 4.0))
    # Second pair: each slot's moving average (momentum 0.5), the union of both.
    check(c, 0, [-2.0, -0.5], [1.6, 4.0], [2, 1], 1.0, (-2.0, 4.0))
    check(d, 1, [-2.0, -0.25], [1.6, 5.0], [2, 2], 2.0, (-2.0, 5.0))
    # Inference with either slot: the union range, no update.
    x = np.array([[-9.0, 0.0, 9.0]], "float32")
    y = to_np(q(x, slot=0, training=False))
    np.testing.assert_allclose(y, ref_fake_quant(x, *ref_qparams(-2.0, 5.0, spec), spec), atol=1e-6)
    assert float(values(q, "qat_step")[0]) == 2.0


def test_shared_quantizer_set_qparams_initialises_every_slot():
    q = ActivationQuantizer(A4, scale=0.5, zero_point=-3, mode="qat", slots=3)
    q.build((None, 2))
    lo, hi, seen = values(q, "min", "max", "seen")
    np.testing.assert_array_equal(lo, [-2.5] * 3)
    np.testing.assert_array_equal(hi, [5.0] * 3)
    np.testing.assert_array_equal(seen, [0.5] * 3)  # given, no training batch yet (qat.GIVEN)


# --------------------------------------------------------------------------
# 5. Weights in QuantizeWrapper(mode="qat").

K1 = np.array([[0.7, -1.4], [0.3, 0.2], [-0.1, 0.8]], "float32")  # per-channel max |w| 0.7, 1.4 -> scale 0.1, 0.2


def test_wrapper_weight_ranges_follow_weights_until_frozen():
    wrapper = QuantizeWrapper(keras.layers.Dense(2), (W4, None))
    assert wrapper.stage == "qat" and wrapper.mode == "qat"  # `mode`: the saved name
    x = np.array([[1.0, 2.0, -1.0]], "float32")
    wrapper(x)
    wrapper.layer.kernel.assign(K1)
    np.testing.assert_allclose(to_np(wrapper.quantized_weights()["kernel"]), K1, atol=1e-6)  # on its own grid
    wrapper(x, training=True)
    np.testing.assert_allclose(to_np(wrapper.weight_qparams["kernel"][0]), [0.1, 0.2], rtol=1e-6)
    # New weights while observing: the range follows them.
    k2 = K1 * np.array([2.0, 0.5], "float32") + np.array([[0.03, 0.01]] * 3, "float32")
    wrapper.layer.kernel.assign(k2)
    scale2 = np.abs(k2).max(0) / 7
    np.testing.assert_allclose(to_np(wrapper.quantized_weights()["kernel"]), ref_fake_quant(k2, scale2, 0, W4),
                               atol=1e-6)
    wrapper(x, training=True)
    np.testing.assert_allclose(to_np(wrapper.weight_qparams["kernel"][0]), scale2, rtol=1e-6)
    # Frozen: the range stays that of k2, whatever the weights become.
    wrapper.set_range_mode("frozen")
    k3 = K1 * 3.0
    wrapper.layer.kernel.assign(k3)
    frozen = ref_fake_quant(k3, scale2, 0, W4)
    np.testing.assert_allclose(to_np(wrapper.quantized_weights(training=True)["kernel"]), frozen, atol=1e-6)
    y = to_np(wrapper(x, training=True))
    np.testing.assert_allclose(to_np(wrapper.weight_qparams["kernel"][0]), scale2, rtol=1e-6)
    np.testing.assert_allclose(y, x @ frozen + to_np(wrapper.layer.bias), atol=1e-5)


def test_wrapper_stochastic_rounding_is_on_grid_and_unbiased(rng):
    spec = W4.replace(stochastic_rounding=True)
    wrapper = QuantizeWrapper(keras.layers.Dense(4), (spec, None), seed=7)
    wrapper(np.zeros((1, 5), "float32"))
    w = rng.normal(size=(5, 4)).astype("float32")
    wrapper.layer.kernel.assign(w)
    scale = np.abs(w).max(0) / 7
    v = w / scale
    samples = np.stack([to_np(wrapper.quantized_weights(training=True)["kernel"]) for _ in range(200)])
    q = samples / scale
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)  # on the grid
    assert np.all(q >= np.floor(v) - 1e-4) and np.all(q <= np.ceil(v) + 1e-4)  # one of the two neighbours
    fractional = np.abs(v - np.round(v)) > 0.05
    assert np.all(q.std(0)[fractional] > 0)  # really random
    # Unbiased: the mean over calls is the float weight (std of a mean <= 0.5 / sqrt(200) = 0.035 steps).
    np.testing.assert_allclose(q.mean(0), v, atol=0.15)
    # Inference rounds to nearest, every time.
    nearest = ref_fake_quant(w, scale, 0, W4)
    for _ in range(2):
        np.testing.assert_allclose(to_np(wrapper.quantized_weights(training=False)["kernel"]), nearest, atol=1e-6)


def test_wrapper_learnable_with_stochastic_rounding_raises():
    spec = W4.replace(learnable=True, stochastic_rounding=True)
    with pytest.raises(ConfigError) as e:
        QuantizeWrapper(keras.layers.Dense(2), (spec, None))
    assert e.value.field == "stochastic_rounding"


# --------------------------------------------------------------------------
# 6. Properties.


@settings(max_examples=25, deadline=None)
@given(
    x=hnp.arrays(np.float32, (2, 6), elements=st.floats(-6.0, 6.0, width=32)),
    symmetric=st.booleans(),
    scale_delta=st.floats(-0.2, 0.3),
    offset_delta=st.floats(-1.0, 1.0),
)
def test_learn_mode_error_bound_and_grid(x, symmetric, scale_delta, offset_delta):
    spec = kq.QuantSpec(bits=4, symmetric=symmetric, learnable=True, lsq_param="linear")
    zp = 0 if symmetric else -3
    q = ActivationQuantizer(spec, scale=0.5, zero_point=zp, mode="qat")
    q.build((None, 6))
    q._state["scale_delta"].assign(scale_delta)
    step = float(np.float32(0.5) + np.float32(scale_delta))
    offset = 0.0
    if not symmetric:
        q._state["offset_delta"].assign(offset_delta)
        learned = np.float32(1.5) + np.float32(offset_delta)  # on the integer zero point inference uses
        zero_point = np.clip(np.floor(-learned / np.float32(step) + np.float32(0.5)), spec.qmin, spec.qmax)
        offset = float(-zero_point * np.float32(step))
    y = to_np(q(x, training=True)).astype(np.float64)
    assert q.range_mode == "learn"
    k = (y - offset) / step
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # on the learned grid
    assert k.min() >= spec.qmin - 1e-3 and k.max() <= spec.qmax + 1e-3
    v = (x.astype(np.float64) - offset) / step
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    assert np.all(np.abs(y - x)[inside] <= step / 2 + 1e-5)
    np.testing.assert_allclose(y[v < spec.qmin], spec.qmin * step + offset, atol=1e-5)
    np.testing.assert_allclose(y[v > spec.qmax], spec.qmax * step + offset, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(x=hnp.arrays(np.float32, (3, 4), elements=st.floats(-10.0, 10.0, width=32)))
def test_observe_mode_first_batch_covers_the_data(x):
    """The first observed batch sets the range: |error| <= scale / 2 everywhere.

    The integer zero point shifts the grid by up to scale / 2, so an extreme
    value may sit just outside the representable range (the STE mask says so).
    """
    q = ActivationQuantizer(kq.QuantSpec(bits=8), mode="qat")
    q.build((None, 4))
    y, dx, _ = train_grads(q, x, jit=False)
    scale = float(to_np(q.scale))
    zp = float(to_np(q.zero_point))
    assert np.all(np.abs(y - x) <= scale / 2 + 1e-5)
    lo, hi = (-128 - zp) * scale, (127 - zp) * scale
    assert lo <= min(x.min(), 0.0) + scale / 2 + 1e-6 and hi >= max(x.max(), 0.0) - scale / 2 - 1e-6
    clear = (np.abs(x - lo) > 1e-5) & (np.abs(x - hi) > 1e-5)
    np.testing.assert_array_equal(dx[clear], ((x >= lo) & (x <= hi))[clear].astype("float32"))
    lo, hi = values(q, "min", "max")
    assert float(lo) == x.min() and float(hi) == x.max()


def test_sync_range_is_identity_without_replicas():
    lo, hi = sync_range(keras.ops.convert_to_tensor(-1.5), keras.ops.convert_to_tensor(2.0))
    assert (float(to_np(lo)), float(to_np(hi))) == (-1.5, 2.0)


# --------------------------------------------------------------------------
# 7. Errors name their field.


def _field(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.field


def test_errors_name_the_field():
    spec = kq.QuantSpec(bits=8)
    assert _field(lambda: ActivationQuantizer(spec, mode="frozen", slots=2)) == "slots"
    assert _field(lambda: ActivationQuantizer(spec, mode="qat", slots=0)) == "slots"
    assert _field(lambda: ActivationQuantizer(spec, mode="bogus")) == "mode"
    assert _field(lambda: QATQuantizer(spec, role="bogus")) == "role"
    assert _field(lambda: QATQuantizer(spec, momentum=1.0)) == "momentum"
    host = keras.layers.Layer()
    assert _field(lambda: Schedule(host, observe_steps=-1)) == "observe_steps"
    assert _field(lambda: Schedule(host, observe_steps="3")) == "observe_steps"
    assert _field(lambda: Schedule(host, observe_steps=0).set_range_mode("bogus")) == "mode"
    assert _field(lambda: ActivationQuantizer(spec, mode="qat", observe_steps=-1).build((None, 3))) == "observe_steps"
    q = ActivationQuantizer(spec, mode="qat")
    q.build((None, 3))
    assert _field(lambda: q.set_range_mode("bogus")) == "mode"
    frozen = ActivationQuantizer(spec)
    frozen.build((None, 3))
    assert _field(lambda: frozen.set_range_mode("learn")) == "mode"
    assert frozen.range_mode == "frozen"


def test_given_range_is_widened_by_the_first_training_batch_then_averaged():
    """A calibrated range (inference mode) covers the first training batch, then the moving average runs."""
    q = ActivationQuantizer(kq.QuantSpec(bits=8), scale=4.0 / 255, zero_point=-64, mode="qat", momentum=0.75)
    q.build((None, 3))
    lo0, hi0 = (-128 + 64) * 4.0 / 255, (127 + 64) * 4.0 / 255  # about [-1.004, 2.996]
    q(np.array([[-0.5, 0.0, 9.0]], "float32"), training=True)  # wider above, narrower below
    lo, hi, seen = values(q, "min", "max", "seen")
    assert float(lo) == pytest.approx(lo0, rel=1e-6) and float(hi) == 9.0 and float(seen) == 1.0
    q(np.array([[-1.0, 0.0, 1.0]], "float32"), training=True)
    lo, hi, seen = values(q, "min", "max", "seen")
    assert float(lo) == pytest.approx(0.75 * lo0 + 0.25 * -1.0, rel=1e-6)
    assert float(hi) == pytest.approx(0.75 * 9.0 + 0.25 * 1.0) and float(seen) == 2.0


def test_stage_is_saved_under_its_old_name_mode():
    """The layers' stage keeps the config key `mode`: files written before and after load alike."""
    q = ActivationQuantizer(kq.QuantSpec(bits=8), mode="qat")
    config = q.get_config()
    assert config["mode"] == "qat" and "stage" not in config
    assert ActivationQuantizer.from_config(config).stage == "qat"
    frozen = ActivationQuantizer(kq.QuantSpec(bits=8)).get_config()
    assert "mode" not in frozen and ActivationQuantizer.from_config(frozen).stage == "frozen"
    wrapper = kq.QuantizeWrapper(keras.layers.Dense(2), mode="frozen")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapper), safe_mode=True)
    assert wrapper.get_config()["mode"] == "frozen" and again.stage == "frozen" and again.mode == "frozen"


# --------------------------------------------------------------------------
# 7. The log-domain step size (lsq_param="log", the default) and files saved before it.


def _drop_lsq_param(tree):
    """A saved config as it was before `lsq_param` existed."""
    if isinstance(tree, dict):
        return {k: _drop_lsq_param(v) for k, v in tree.items() if k != "lsq_param"}
    if isinstance(tree, list):
        return [_drop_lsq_param(v) for v in tree]
    return tree


def test_log_form_qparams_and_a_file_saved_before_it_loads_as_linear(tmp_path):
    """Default: step `0.5 * exp(GAIN * d)`, offset `1.5 + OGAIN * 0.5 * o`. An older file (no `lsq_param` in its
    specs) holds additive deltas: it loads with safe_mode=True and reads them as such."""
    import json
    import zipfile

    spec = A4.replace(learnable=True)
    assert spec.lsq_param == "log"
    q = ActivationQuantizer(spec, scale=0.5, zero_point=-3, mode="qat", name="aq")
    model = keras.Sequential([keras.Input((7,)), q])
    d, o = 0.001, -0.002
    q._state["scale_delta"].assign(d)
    q._state["offset_delta"].assign(o)
    step = 0.5 * math.exp(GAIN * d)
    s, z = (float(to_np(v)) for v in q.qparams)
    assert s == pytest.approx(step, rel=1e-5)
    assert z == np.clip(np.floor(-(1.5 + OGAIN * 0.5 * o) / step + 0.5), -8, 7)
    path, old = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(path)
    again = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose([float(to_np(v)) for v in again.layers[-1].qparams], [s, z], rtol=1e-6)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(_drop_lsq_param(json.loads(data))).encode()
            dst.writestr(item, data)
    legacy = keras.models.load_model(old, safe_mode=True).layers[-1]
    assert legacy.spec.lsq_param == "linear"
    s_old, z_old = (float(to_np(v)) for v in legacy.qparams)
    assert s_old == pytest.approx(0.5 + d, rel=1e-6)
    assert z_old == np.clip(np.floor(-(1.5 + o) / (0.5 + d) + 0.5), -8, 7)


def test_lsq_param_in_spec_configs():
    assert kq.QuantSpec.from_config({"bits": 4, "learnable": True}).lsq_param == "log"  # a written config
    complete = kq.QuantSpec(bits=4, learnable=True).get_config()
    assert complete["lsq_param"] == "log" and kq.QuantSpec.from_config(complete).lsq_param == "log"
    del complete["lsq_param"]  # every other field: a config saved before the option existed
    assert kq.QuantSpec.from_config(complete).lsq_param == "linear"
    with pytest.raises(ConfigError, match="lsq_param"):
        kq.QuantSpec(bits=4, learnable=True, lsq_param="exp")


@pytest.mark.parametrize("lsq_param, moves", [("log", True), ("linear", False)])
def test_adam_moves_a_log_step_by_a_fraction_of_itself(lsq_param, moves):
    """Adam's first step moves each variable by about its learning rate: 1e-4 of an additive step size of 0.5
    is nothing, the log form changes it by about GAIN * 1e-4 (relatively)."""
    spec = kq.QuantSpec(bits=4, symmetric=True, learnable=True, lsq_param=lsq_param)
    q = ActivationQuantizer(spec, scale=0.5, zero_point=0, mode="qat")
    model = keras.Sequential([keras.Input((7,)), q])
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    x = np.array([SYM_X], "float32")
    model.fit(x, np.zeros_like(x), batch_size=1, epochs=1, verbose=0)
    ratio = float(to_np(q.qparams[0])) / 0.5
    expected = math.exp(-GAIN * 1e-4) if moves else 1 - 1e-4 / 0.5  # the loss wants a smaller step here
    assert ratio == pytest.approx(expected, rel=1e-3)
