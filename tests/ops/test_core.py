"""Tests of keras_quant.ops.core against a numpy reference written here."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_quant as kq
from keras_quant.errors import ConfigError, ShapeMismatchError
from tests.conftest import to_np

# --------------------------------------------------------------------------
# Reference implementation (float64 numpy, written from the definitions).


def ref_qparams(min_val, max_val, spec):
    lo = np.minimum(np.asarray(min_val, np.float64), 0.0)
    hi = np.maximum(np.asarray(max_val, np.float64), 0.0)
    eps = np.finfo(np.float32).eps
    if spec.symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / spec.qmax, eps)
        zp = np.zeros_like(scale)
    else:
        scale = np.maximum((hi - lo) / (spec.qmax - spec.qmin), eps)
        zp = np.clip(np.floor(spec.qmin - lo / scale + 0.5), spec.qmin, spec.qmax)
    return scale, zp.astype(np.int64)


def ref_quantize(x, scale, zp, spec):
    return np.clip(np.floor(x / scale + 0.5) + zp, spec.qmin, spec.qmax)


def ref_fake_quant(x, scale, zp, spec):
    return (ref_quantize(x, scale, zp, spec) - zp) * scale


def near_tie(x, scale, tol=1e-4):
    """Values whose x/scale sits on a rounding boundary (float32 may round either way)."""
    v = np.asarray(x, np.float64) / scale
    return np.abs(v - np.floor(v) - 0.5) < tol


# Lengths of the 1-D property inputs. The ops are elementwise, so what a property checks does not
# depend on the length; a few lengths (not every one in 1..64) spare JAX compiling every op again
# for each new shape.
LENGTHS = st.sampled_from([1, 2, 7, 64])

SPECS = [
    kq.QuantSpec(bits=8),
    kq.QuantSpec(bits=8, symmetric=True),
    kq.QuantSpec(bits=8, symmetric=True, narrow_range=True),
    kq.QuantSpec(bits=4),
    kq.QuantSpec(bits=2, symmetric=True),
    kq.QuantSpec(bits=16, symmetric=True),
    kq.QuantSpec(bits=16),
    kq.QuantSpec(bits=3, narrow_range=True),
]


# --------------------------------------------------------------------------
# compute_qparams


@pytest.mark.parametrize(
    "lo, hi, spec, scale, zp",
    [
        (-1.0, 3.0, kq.QuantSpec(bits=8), 4 / 255, -64),
        (0.0, 255.0, kq.QuantSpec(bits=8), 1.0, -128),
        (-1.0, 1.0, kq.QuantSpec(bits=8, symmetric=True), 1 / 127, 0),
        (-2.0, 1.0, kq.QuantSpec(bits=8, symmetric=True, narrow_range=True), 2 / 127, 0),
        (1.0, 3.0, kq.QuantSpec(bits=8), 3 / 255, -128),  # widened to contain 0
        (-3.0, -1.0, kq.QuantSpec(bits=8), 3 / 255, 127),
        (-8.0, 7.0, kq.QuantSpec(bits=4), 1.0, 0),
        (0.0, 0.0, kq.QuantSpec(bits=8), float(np.finfo(np.float32).eps), -128),
    ],
)
def test_compute_qparams_hand_values(lo, hi, spec, scale, zp):
    s, z = kq.ops.compute_qparams(lo, hi, spec)
    assert to_np(s) == pytest.approx(scale, rel=1e-6)
    assert int(to_np(z)) == zp
    assert str(to_np(z).dtype) == "int32"


@given(
    lo=st.floats(-1e4, 1e4, allow_nan=False),
    width=st.floats(0, 1e4, allow_nan=False),
    spec=st.sampled_from(SPECS),
)
def test_compute_qparams_matches_reference_and_zero_is_exact(lo, width, spec):
    hi = lo + width
    s, z = kq.ops.compute_qparams(np.float32(lo), np.float32(hi), spec)
    rs, rz = ref_qparams(np.float32(lo), np.float32(hi), spec)
    np.testing.assert_allclose(to_np(s), rs, rtol=1e-5)
    assert abs(int(to_np(z)) - int(rz)) <= 1  # float32 vs float64 at a rounding tie
    assert spec.qmin <= int(to_np(z)) <= spec.qmax
    assert np.isfinite(to_np(s)) and to_np(s) > 0
    # 0.0 is exactly representable.
    q = kq.ops.quantize(np.zeros(3, "float32"), s, z, spec)
    assert np.all(to_np(kq.ops.dequantize(q, s, z, spec)) == 0.0)
    assert np.all(to_np(kq.ops.fake_quant(np.zeros(3, "float32"), s, z, spec)) == 0.0)


def test_compute_qparams_range_is_covered():
    # The representable range contains the requested one (up to half a step at the ends).
    spec = kq.QuantSpec(bits=8)
    s, z = (float(to_np(v)) for v in kq.ops.compute_qparams(-0.3, 1.7, spec))
    assert (spec.qmin - z) * s <= -0.3 + s / 2
    assert (spec.qmax - z) * s >= 1.7 - s / 2


def test_compute_qparams_per_channel_shapes():
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    s, z = kq.ops.compute_qparams(np.array([-1.0, -2.0, 0.0]), np.array([1.0, 0.5, 0.0]), spec)
    np.testing.assert_allclose(to_np(s), [1 / 127, 2 / 127, np.finfo(np.float32).eps], rtol=1e-6)
    assert to_np(z).tolist() == [0, 0, 0]


# --------------------------------------------------------------------------
# quantize / dequantize / fake_quant


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_exact_integer_grid_round_trip(spec):
    # Every grid level dequantizes and quantizes back to itself (Brevitas' arange test).
    levels = np.arange(spec.qmin, spec.qmax + 1, dtype=np.float32)
    if levels.size > 4096:
        levels = levels[:: levels.size // 4096]
    s = np.float32(0.0625)  # power of two: exact in float32
    z = np.int32(0 if spec.symmetric else min(max(3, spec.qmin), spec.qmax))
    x = to_np(kq.ops.dequantize(levels, s, z, spec))
    np.testing.assert_array_equal(x, (levels - z) * s)
    q = to_np(kq.ops.quantize(x, s, z, spec))
    np.testing.assert_array_equal(q, levels)
    assert q.dtype == np.dtype(spec.storage_dtype)
    np.testing.assert_array_equal(to_np(kq.ops.fake_quant(x, s, z, spec)), x)


@given(
    x=hnp.arrays(np.float32, LENGTHS, elements=st.floats(-100, 100, width=32)),
    spec=st.sampled_from(SPECS),
    lo=st.floats(-50, 0),
    hi=st.floats(0.01, 50),
)
def test_quantize_and_fake_quant_match_reference(x, spec, lo, hi):
    s, z = kq.ops.compute_qparams(lo, hi, spec)
    s64, z64 = float(to_np(s)), int(to_np(z))
    ok = ~near_tie(x, s64)
    q = to_np(kq.ops.quantize(x, s, z, spec))
    np.testing.assert_array_equal(q[ok], ref_quantize(x.astype(np.float64), s64, z64, spec)[ok])
    assert np.all(np.abs(q - ref_quantize(x.astype(np.float64), s64, z64, spec)) <= 1)
    fq = to_np(kq.ops.fake_quant(x, s, z, spec))
    ref = ref_fake_quant(x.astype(np.float64), s64, z64, spec)
    np.testing.assert_allclose(fq[ok], ref[ok], rtol=1e-5, atol=s64 * 1e-3)
    # fake_quant == dequantize(quantize(x)) away from ties
    dq = to_np(kq.ops.dequantize(q, s, z, spec))
    np.testing.assert_allclose(fq[ok], dq[ok], rtol=1e-5, atol=s64 * 1e-3)


@given(
    x=hnp.arrays(np.float32, LENGTHS, elements=st.floats(-10, 10, width=32)),
    spec=st.sampled_from(SPECS),
)
def test_error_is_at_most_half_a_step_inside_the_range(x, spec):
    s, z = kq.ops.tensor_qparams(x, spec)
    s64, z64 = float(to_np(s)), int(to_np(z))
    err = np.abs(to_np(kq.ops.fake_quant(x, s, z, spec)).astype(np.float64) - x)
    inside = (x >= (spec.qmin - z64) * s64) & (x <= (spec.qmax - z64) * s64)
    assert np.all(err[inside] <= s64 / 2 * (1 + 1e-4) + 1e-7)


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_per_channel_any_axis_matches_reference(rng, axis):
    x = (rng.normal(size=(4, 5, 6)) * rng.uniform(0.1, 10, size=(1, 1, 6))).astype("float32")
    spec = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", axis=axis, narrow_range=True)
    s, z = kq.ops.tensor_qparams(x, spec)
    assert to_np(s).shape == (x.shape[axis],)
    axes = tuple(i for i in range(3) if i != axis % 3)
    rs, rz = ref_qparams(x.min(axis=axes), x.max(axis=axes), spec)
    np.testing.assert_allclose(to_np(s), rs, rtol=1e-6)
    shape = [1, 1, 1]
    shape[axis] = -1
    ref = ref_fake_quant(x.astype(np.float64), rs.reshape(shape), rz.reshape(shape), spec)
    ok = ~near_tie(x, rs.reshape(shape))
    got = to_np(kq.ops.fake_quant(x, s, z, spec))
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-6)
    got_dq = to_np(kq.ops.dequantize(kq.ops.quantize(x, s, z, spec), s, z, spec))
    np.testing.assert_allclose(got_dq[ok], ref[ok], rtol=1e-5, atol=1e-6)


def test_per_group_matches_reference(rng):
    # Dense kernel (in=8, out=3), groups of 4 along `in` for each output channel.
    w = rng.normal(size=(8, 3)).astype("float32")
    w[:4, 0] *= 10  # one group much wider than the others
    spec = kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=4)
    s, z = kq.ops.tensor_qparams(w, spec)
    assert to_np(s).shape == (3, 2)
    groups = w.T.reshape(3, 2, 4)
    rs, rz = ref_qparams(groups.min(-1), groups.max(-1), spec)
    np.testing.assert_allclose(to_np(s), rs, rtol=1e-6)
    ref = ref_fake_quant(groups.astype(np.float64), rs[..., None], rz[..., None], spec).reshape(3, 8).T
    got = to_np(kq.ops.fake_quant(w, s, z, spec))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # A group-wise scale beats the per-channel one on the narrow groups.
    pc = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    got_pc = to_np(kq.ops.fake_quant(w, *kq.ops.tensor_qparams(w, pc), pc))
    assert np.mean((got - w) ** 2) < np.mean((got_pc - w) ** 2)


def test_per_group_needs_divisible_channels():
    spec = kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=3)
    with pytest.raises(ShapeMismatchError, match="group_size=3"):
        kq.ops.tensor_range(np.zeros((8, 2), "float32"), spec)


def test_param_shape_mismatch_is_reported():
    spec = kq.QuantSpec(granularity="per_channel")
    with pytest.raises(ShapeMismatchError, match="scale"):
        kq.ops.quantize(np.zeros((2, 3), "float32"), np.ones(4, "float32"), np.zeros(4, "int32"), spec)
    with pytest.raises(ShapeMismatchError):
        kq.ops.quantize(np.zeros((2, 3), "float32"), np.ones(3, "float32"), np.zeros(3, "int32"), kq.QuantSpec())
    for fn in (kq.ops.quantize, kq.ops.fake_quant):
        with pytest.raises(ShapeMismatchError, match="zero_point"):
            fn(np.zeros((2, 3), "float32"), np.ones(3, "float32"), np.zeros(4, "int32"), spec)


def test_axis_out_of_range():
    spec = kq.QuantSpec(granularity="per_channel", axis=3)
    with pytest.raises(ConfigError, match="axis=3"):
        kq.ops.tensor_range(np.zeros((2, 3), "float32"), spec)


def test_spec_type_checked():
    with pytest.raises(ConfigError, match="spec"):
        kq.ops.compute_qparams(0.0, 1.0, {"bits": 8})


def test_constant_tensor_gives_finite_scale():
    for value in (0.0, 2.5, -3.0):
        x = np.full((5,), value, "float32")
        for spec in SPECS:
            s, z = kq.ops.tensor_qparams(x, spec)
            assert np.isfinite(to_np(s)) and to_np(s) > 0
            y = to_np(kq.ops.fake_quant(x, s, z, spec))
            assert np.all(np.isfinite(y))
            np.testing.assert_allclose(y, x, atol=float(to_np(s)) / 2 + 1e-7)


# --------------------------------------------------------------------------
# stochastic rounding


def test_stochastic_rounding_is_unbiased_and_seeded():
    spec = kq.QuantSpec(bits=8, stochastic_rounding=True)
    x = np.full((20000,), 0.3, "float32")  # 30% of the way between levels 0 and 1 (scale 1)
    s, z = np.float32(1.0), np.int32(0)
    a = to_np(kq.ops.quantize(x, s, z, spec, seed=7))
    b = to_np(kq.ops.quantize(x, s, z, spec, seed=7))
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a).tolist()) == {0, 1}
    assert abs(a.mean() - 0.3) < 0.02
    det = to_np(kq.ops.quantize(x, s, z, kq.QuantSpec(bits=8)))
    assert det.mean() == 0.0
    fq = to_np(kq.ops.fake_quant(x, s, z, spec, seed=3))
    assert abs(fq.mean() - 0.3) < 0.02


# --------------------------------------------------------------------------
# gradients (backend-specific autodiff, same expectations)


def _grad(fn, *args):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            for a in args:
                tape.watch(a)
            y = fn(*args)
        return [to_np(g) if g is not None else None for g in tape.gradient(y, args)]
    if backend == "jax":
        import jax

        return [to_np(g) for g in jax.grad(fn, argnums=tuple(range(len(args))))(*args)]
    pytest.fail(f"no gradient helper for backend {backend}")


@pytest.mark.parametrize(
    "spec",
    [
        kq.QuantSpec(bits=8),
        kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", axis=0),
        kq.QuantSpec(bits=4, granularity="per_group", group_size=2, axis=0),
        kq.QuantSpec(bits=8, stochastic_rounding=True),
    ],
    ids=lambda s: f"{s.granularity}-{s.bits}-{s.stochastic_rounding}",
)
def test_fake_quant_straight_through_gradient(spec):
    x = np.array([[-3.0, -0.5, 0.2, 0.9, 2.5, 9.0], [-0.1, 0.1, 0.3, 1.4, -9.0, 0.0]], "float32")
    lo = np.full((2,) if spec.granularity != "per_tensor" else (), -1.0, "float32")
    hi = np.full(lo.shape, 1.0, "float32")
    if spec.granularity == "per_group":
        lo, hi = np.full((2, 3), -1.0, "float32"), np.full((2, 3), 1.0, "float32")
    s, z = kq.ops.compute_qparams(lo, hi, spec)
    s_np, z_np = to_np(s), to_np(z).astype(np.float64)
    if spec.granularity == "per_tensor":
        s_b, z_b = s_np, z_np
    elif spec.granularity == "per_channel":
        s_b, z_b = s_np[:, None], z_np[:, None]
    else:
        s_b, z_b = np.repeat(s_np, 2, axis=1), np.repeat(z_np, 2, axis=1)
    inside = (x >= (spec.qmin - z_b) * s_b) & (x <= (spec.qmax - z_b) * s_b)
    (g,) = _grad(lambda v: keras.ops.sum(kq.ops.fake_quant(v, s, z, spec, seed=1) * 2.0), x)
    np.testing.assert_array_equal(g, np.where(inside, 2.0, 0.0))


@pytest.mark.tensorflow
def test_fake_quant_emits_tf_fake_quant_ops():
    import tensorflow as tf

    specs = {
        "FakeQuantWithMinMaxVars": kq.QuantSpec(bits=8),
        "FakeQuantWithMinMaxVarsPerChannel": kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel"),
    }
    for op_type, spec in specs.items():
        s, z = kq.ops.compute_qparams(-np.ones(4, "float32"), np.ones(4, "float32"), spec)
        if spec.granularity == "per_tensor":
            s, z = s[0], z[0]

        @tf.function
        def f(v, s=s, z=z, spec=spec):
            return kq.ops.fake_quant(v, s, z, spec)

        graph = f.get_concrete_function(tf.TensorSpec((2, 4), tf.float32)).graph
        assert op_type in {op.type for op in graph.get_operations()}


@pytest.mark.tensorflow
def test_fake_quant_works_under_xla():
    import tensorflow as tf

    spec = kq.QuantSpec(bits=4, granularity="per_group", group_size=2)
    x = np.linspace(-1, 1, 8, dtype="float32").reshape(4, 2)
    s, z = kq.ops.tensor_qparams(x, spec)
    eager = to_np(kq.ops.fake_quant(x, s, z, spec))
    compiled = tf.function(lambda v: kq.ops.fake_quant(v, s, z, spec), jit_compile=True)
    np.testing.assert_allclose(to_np(compiled(tf.constant(x))), eager, atol=1e-7)


def test_fake_quant_keeps_float16_dtype():
    x = keras.ops.cast(np.linspace(-1, 1, 16), "float16")
    spec = kq.QuantSpec(bits=8)
    y = kq.ops.fake_quant(x, *kq.ops.tensor_qparams(x, spec), spec)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"


def test_sixteen_bits_error_is_tiny(rng):
    x = rng.uniform(-1, 1, size=10000).astype("float32")
    spec = kq.QuantSpec(bits=16)
    s, z = kq.ops.tensor_qparams(x, spec)
    s64, z64 = float(to_np(s)), int(to_np(z))
    inside = (x >= (spec.qmin - z64) * s64) & (x <= (spec.qmax - z64) * s64)
    err = np.abs(to_np(kq.ops.fake_quant(x, s, z, spec)) - x)
    # float32 carries ~2**-24 relative error on x / scale ~ 2**15: 1% of a step at 16 bits.
    assert err[inside].max() <= s64 / 2 * 1.01
    assert math.isclose(s64, (x.max() - x.min()) / 65535, rel_tol=1e-3)


def test_variables_are_accepted(rng):
    w = rng.normal(size=(4, 3)).astype("float32")
    var = keras.Variable(w)
    spec = kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    expected = to_np(kq.ops.fake_quant(w, *kq.ops.tensor_qparams(w, spec), spec))
    for value in (var, var.value):  # the Keras variable and the backend's own
        got = kq.ops.fake_quant(value, *kq.ops.tensor_qparams(value, spec), spec)
        np.testing.assert_array_equal(to_np(got), expected)
