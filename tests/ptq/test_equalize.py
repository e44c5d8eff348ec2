"""kq.ptq.equalize: cross-layer equalization and high-bias absorption (Nagel et al. 2019, 4.1 and 4.2.1),
against a numpy reference of the scale formula and of one sweep, and for what it must preserve."""

import keras
import numpy as np
import pytest

import keras_quant as kq
from keras_quant.errors import ConfigError

L = keras.layers


# Numpy reference --------------------------------------------------------------------------------------------
def ref_scale(r1, r2):
    """The paper's s_i = (1 / r2_i) sqrt(r1_i r2_i)."""
    return np.sqrt(r1 * r2) / r2


def ref_fold(bn):
    """`(gamma / sqrt(var + eps), gamma, beta)` of a BatchNormalization, or None."""
    if bn is None:
        return None
    gamma, beta, mean, var = [np.asarray(w, np.float64) for w in bn.get_weights()]
    return gamma / np.sqrt(var + bn.epsilon), gamma, beta


def ref_out_range(kernel, fold, depthwise):
    """max |w| of each output channel of the BN-folded kernel (depthwise: channel i * multiplier + j)."""
    k = np.abs(kernel).reshape(-1, kernel.shape[-2] * kernel.shape[-1] if depthwise else kernel.shape[-1])
    r = k.max(axis=0)
    return r if fold is None else r * np.abs(fold)


def ref_in_range(kernel, fold, depthwise):
    """max |w| of each input channel of the BN-folded kernel."""
    k = np.abs(kernel)
    if fold is not None:
        k = k * np.abs(fold).reshape(kernel.shape[-2:] if depthwise else (-1,))
    axes = tuple(a for a in range(k.ndim) if a != k.ndim - 2)
    return k.max(axis=axes)


def ref_step(w1, b1, bn1, w2, bn2, depthwise1=False, depthwise2=False):
    """One equalization step of a pair in numpy: new (w1, b1, (gamma, beta) or None, w2) and the scales.

    `bn1` / `bn2`: `(fold, gamma, beta)` of the BatchNormalization after layer1 / layer2, or None."""
    r1 = ref_out_range(w1, None if bn1 is None else bn1[0], depthwise1)
    r2 = ref_in_range(w2, None if bn2 is None else bn2[0], depthwise2)
    s = ref_scale(r1, r2)
    if bn1 is None:
        w1 = w1 / (s.reshape(w1.shape[-2:]) if depthwise1 else s)
        b1 = None if b1 is None else b1 / s
        gb = None
    else:
        gb = (bn1[1] / s, bn1[2] / s)
    shape = [1] * w2.ndim
    shape[-2] = -1
    return w1, b1, gb, w2 * s.reshape(shape), s


# Helpers ----------------------------------------------------------------------------------------------------
def np64(v):
    return np.asarray(keras.ops.convert_to_numpy(v), np.float64)


def run(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)


def randomize(model, seed, spread=1.5):
    """BatchNormalization statistics at random; each compute layer's output channels scaled by exp(N(0, spread))
    so that their ranges differ by orders of magnitude."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.5, n), rng.normal(0, 0.3, n),
                               rng.uniform(0.2, 2.0, n)])
        elif isinstance(layer, (L.Conv1D, L.Conv2D, L.Dense, L.DepthwiseConv2D)):
            w = layer.get_weights()
            w[0] = w[0] * np.exp(rng.normal(0, spread, w[0].shape[-1]))
            if len(w) > 1:
                w[1] = rng.normal(0, 0.3, w[1].shape)
            layer.set_weights(w)
    return model


def dense_pair(bias2=True):
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    x = L.Dense(5, name="d1")(inp)
    x = L.ReLU(name="relu")(x)
    out = L.Dense(4, use_bias=bias2, name="d2")(x)
    return randomize(keras.Model(inp, out), 1)


def chain(act="relu", multiplier=1):
    """conv -> BN -> act -> depthwise -> BN -> act -> pointwise (MobileNet's block)."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((9, 9, 3))
    x = L.Conv2D(6, 3, use_bias=False, name="conv")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Activation(act, name="act1")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=multiplier, use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.Activation(act, name="act2")(x)
    out = L.Conv2D(4, 1, name="pw")(x)
    return randomize(keras.Model(inp, out), 2)


def data(shape, n=32, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=(n,) + shape) * scale).astype("float32")


# The scale formula and one sweep ----------------------------------------------------------------------------
def test_scale_formula_balances_each_channel():
    rng = np.random.default_rng(0)
    r1, r2 = np.exp(rng.normal(0, 3, 50)), np.exp(rng.normal(0, 3, 50))
    s = ref_scale(r1, r2)
    np.testing.assert_allclose(r1 / s, r2 * s, rtol=1e-12)
    np.testing.assert_allclose(s, np.sqrt(r1 / r2), rtol=1e-12)
    # It maximises the paper's objective sum_i p1_i p2_i (p_i = r_i / R): no other scaling does better.
    objective = lambda a, b: np.sum(a / a.max() * b / b.max())
    best = objective(r1 / s, r2 * s)
    assert best > objective(r1, r2)
    for _ in range(20):
        t = s * np.exp(rng.normal(0, 0.3, 50))
        assert objective(r1 / t, r2 * t) <= best + 1e-12


def test_dense_pair_matches_reference_step():
    model = dense_pair()
    w1, b1 = [np64(w) for w in model.get_layer("d1").get_weights()]
    w2 = np64(model.get_layer("d2").kernel)
    ew1, eb1, _, ew2, s = ref_step(w1, b1, None, w2, None)
    eq = kq.ptq.equalize(model, iterations=1, absorb_high_bias=False)
    np.testing.assert_allclose(np64(eq.get_layer("d1").kernel), ew1, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("d1").bias), eb1, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("d2").kernel), ew2, rtol=1e-6)
    (pair,) = eq.equalization_report.pairs
    assert (pair.layer1, pair.layer2, pair.path) == ("d1", "d2", "relu")
    assert eq.equalization_report.skipped == (("d2", "its output is a model output"),)
    np.testing.assert_allclose(pair.scales, s, rtol=1e-6)
    np.testing.assert_allclose(pair.ratio_after, 1.0, rtol=1e-6)
    # The step maximises the paper's objective sum_i (r1_i / R1)(r2_i / R2) for one pair.
    objective = lambda a, b: np.sum(a / a.max() * b / b.max())
    r1, r2 = np.abs(w1).max(0), np.abs(w2).max(1)
    assert objective(r1 / s, r2 * s) >= objective(r1, r2) - 1e-12  # equal here: one channel holds both maxima
    x = data((6,))
    np.testing.assert_allclose(run(eq, x), run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_conv_depthwise_pointwise_sweep_matches_reference(multiplier):
    model = chain(multiplier=multiplier)
    conv, dw, pw = (np64(model.get_layer(n).kernel) for n in ("conv", "dw", "pw"))
    bn1, bn2 = ref_fold(model.get_layer("bn1")), ref_fold(model.get_layer("bn2"))
    # Pair 1 (conv -> dw): scales through bn1; dw's input range is that of its bn2-folded kernel.
    _, _, (g1, be1), dw, s1 = ref_step(conv, None, bn1, dw, bn2, depthwise2=True)
    # Pair 2 (dw -> pw), on the dw kernel pair 1 left.
    _, _, (g2, be2), pw, s2 = ref_step(dw, None, bn2, pw, None, depthwise1=True)
    eq = kq.ptq.equalize(model, iterations=1, absorb_high_bias=False)
    np.testing.assert_allclose(np64(eq.get_layer("conv").kernel), conv, rtol=1e-6)  # scaled through bn1, not itself
    np.testing.assert_allclose(np64(eq.get_layer("bn1").gamma), g1, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("bn1").beta), be1, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("dw").kernel), dw, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("bn2").gamma), g2, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("bn2").beta), be2, rtol=1e-6)
    np.testing.assert_allclose(np64(eq.get_layer("pw").kernel), pw, rtol=1e-6)
    report = eq.equalization_report
    np.testing.assert_allclose(report.pairs[0].scales, s1, rtol=1e-6)
    np.testing.assert_allclose(report.pairs[1].scales, s2, rtol=1e-6)
    assert report.sweeps == 1 and not report.converged


def pair_ranges(model, l1, bn1, l2, bn2):
    f1 = None if bn1 is None else ref_fold(model.get_layer(bn1))[0]
    f2 = None if bn2 is None else ref_fold(model.get_layer(bn2))[0]
    a, b = model.get_layer(l1), model.get_layer(l2)
    return (ref_out_range(np64(a.kernel), f1, isinstance(a, L.DepthwiseConv2D)),
            ref_in_range(np64(b.kernel), f2, isinstance(b, L.DepthwiseConv2D)))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_converged_chain_is_balanced_and_preserves_outputs(multiplier):
    model = chain(multiplier=multiplier)
    eq = kq.ptq.equalize(model, absorb_high_bias=False, tolerance=1e-9, iterations=500)
    report = eq.equalization_report
    assert report.converged and len(report.pairs) == 2
    precision = []
    for l1, bn1, l2, bn2 in (("conv", "bn1", "dw", "bn2"), ("dw", "bn2", "pw", None)):
        r1, r2 = pair_ranges(eq, l1, bn1, l2, bn2)
        np.testing.assert_allclose(r1 / r1.max(), r2 / r2.max(), rtol=1e-5)  # the paper's optimum
        b1, b2 = pair_ranges(model, l1, bn1, l2, bn2)
        # The paper's objective, sum_i p1_i p2_i with p_i = r_i / R: the precision the channels keep.
        precision.append((np.sum(b1 / b1.max() * b2 / b2.max()), np.sum(r1 / r1.max() * r2 / r2.max())))
    if multiplier == 1:  # a unique balanced point (each channel's three ranges equal); measured 2.2 -> 3.9
        assert sum(a for _, a in precision) > sum(b for b, _ in precision)
    x = data((9, 9, 3))
    np.testing.assert_allclose(run(eq, x), run(model, x), rtol=1e-4, atol=1e-5 * np.abs(run(model, x)).max())


# Outputs preserved ------------------------------------------------------------------------------------------
def conv1d_model(act):
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 4))
    x = L.Conv1D(8, 3, activation=act, name="c1")(inp)
    x = L.MaxPooling1D(name="pool")(x)
    x = L.Conv1D(6, 3, padding="same", name="c2")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation(act, name="act")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    x = L.Dense(8, activation=act, name="d1")(x)
    out = L.Dense(3, name="d2")(x)
    return randomize(keras.Model(inp, out), 3)


def conv_model(act):
    keras.utils.set_random_seed(4)
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, use_bias=False, name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(6.0 if act == "relu6" else None, name="r1")(x)
    x = L.ZeroPadding2D(name="pad")(x)
    x = L.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.Activation(act, name="r2")(x)
    x = L.Conv2D(6, 1, use_bias=False, name="pw")(x)
    x = L.BatchNormalization(name="bn3")(x)
    x = L.Activation(act, name="r3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(3, name="head")(x)
    return randomize(keras.Model(inp, out), 4)


@pytest.mark.parametrize("build,shape", [(conv1d_model, (16, 4)), (conv_model, (10, 10, 3))])
@pytest.mark.parametrize("act", ["relu", "linear"])
@pytest.mark.parametrize("with_data", [True, False])
def test_outputs_preserved(build, shape, act, with_data):
    model = build(act)
    x = data(shape)
    before = [np64(w) for w in model.weights]
    eq = kq.ptq.equalize(model, data=x if with_data else None, absorb_high_bias=with_data)
    ref = run(model, x)
    np.testing.assert_allclose(run(eq, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert len(eq.equalization_report.pairs) >= 3
    assert all(np.array_equal(a, np64(w)) for a, w in zip(before, model.weights))  # the user's model untouched
    if build is conv1d_model:
        assert ("c1", "c2") in [(p.layer1, p.layer2) for p in eq.equalization_report.pairs]


@pytest.mark.parametrize("build,shape", [(conv1d_model, (16, 4)), (conv_model, (10, 10, 3))])
def test_relu6_modes(build, shape):
    model = build("relu6")
    x = data(shape, scale=3.0)
    ref = run(model, x)
    tol = dict(rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    bounded = kq.ptq.equalize(model, data=x, relu6="bounded")
    np.testing.assert_allclose(run(bounded, x), ref, **tol)
    report = bounded.equalization_report
    assert report.replaced == () and any(p.clamped for p in report.pairs)

    skip = kq.ptq.equalize(model, data=x, relu6="skip")
    np.testing.assert_allclose(run(skip, x), ref, **tol)
    assert any("relu6='skip'" in why for _, why in skip.equalization_report.skipped)
    assert len(skip.equalization_report.pairs) < len(report.pairs)

    no_data = kq.ptq.equalize(model, relu6="bounded")  # falls back to "skip", and says so
    np.testing.assert_allclose(run(no_data, x), ref, **tol)
    assert [p.layer1 for p in no_data.equalization_report.pairs] == [p.layer1 for p in skip.equalization_report.pairs]
    assert any("without data" in note for note in no_data.equalization_report.notes)

    # "replace": the model with ReLU in place of each ReLU6 of an equalized pair, exactly.
    replaced = kq.ptq.equalize(model, data=x, relu6="replace", absorb_high_bias=False)
    names = replaced.equalization_report.replaced
    assert names and all(name in {layer.name for layer in model.layers} for name in names)
    relu_model = build("relu")
    relu_model.set_weights(model.get_weights())
    ref_relu = run(relu_model, x)
    np.testing.assert_allclose(run(replaced, x), ref_relu, rtol=1e-4, atol=1e-5 * np.abs(ref_relu).max())
    assert not np.allclose(ref_relu, ref, rtol=1e-3)  # the inputs do exceed 6: the function changed


def test_bounded_never_crosses_the_clip():
    model = chain(act="relu6")
    x = data((9, 9, 3), scale=2.0)
    eq = kq.ptq.equalize(model, data=x, relu6="bounded", absorb_high_bias=False)
    for bn, p in (("bn1", 0), ("bn2", 1)):
        a = run(keras.Model(model.inputs[0], model.get_layer(bn).output), x)
        b = run(keras.Model(eq.inputs[0], eq.get_layer(bn).output), x)
        a, b = a.reshape(-1, a.shape[-1]).max(0), b.reshape(-1, b.shape[-1]).max(0)
        pair = eq.equalization_report.pairs[p]
        assert np.all(b[a < 6] < 6)  # channels under the clip stay under it
        np.testing.assert_allclose(pair.scales[a >= 6], 1.0)  # channels reaching it keep their scale


# High-bias absorption ---------------------------------------------------------------------------------------
def high_bias_model(bias2=True, layer2="conv", padding="valid"):
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, use_bias=False, name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu")(x)
    if layer2 == "conv":
        out = L.Conv2D(4, 3, padding=padding, use_bias=bias2, name="c2")(x)
    elif layer2 == "dw":
        out = L.BatchNormalization(name="bn2")(L.DepthwiseConv2D(3, use_bias=False, name="c2")(x))
    else:
        out = L.Dense(4, use_bias=bias2, name="c2")(L.GlobalAveragePooling2D(name="gap")(x))
    model = randomize(keras.Model(inp, out), 5)
    bn = model.get_layer("bn1")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma * 0.3, beta + np.linspace(0.5, 4, 6), mean, var])  # high biases
    return model


def pre_activation(model, x):
    y = run(keras.Model(model.inputs[0], model.get_layer("bn1").output), x)
    return y.reshape(-1, y.shape[-1])


@pytest.mark.parametrize("layer2,bias2", [("conv", True), ("conv", False), ("dw", False), ("dense", True),
                                          ("dense", False)])
def test_absorption_with_data_is_exact_and_lowers_the_minimum(layer2, bias2):
    model = high_bias_model(bias2, layer2)
    x = data((8, 8, 3))
    eq = kq.ptq.equalize(model, data=x)
    ref = run(model, x)
    np.testing.assert_allclose(run(eq, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    (absorbed,) = eq.equalization_report.absorbed
    assert absorbed[:2] == ("c1", "c2") and absorbed[2] > 0
    assert absorbed[5] == {"conv": "bias" if bias2 else "new bias", "dw": "moving_mean",
                           "dense": "bias" if bias2 else "new bias"}[layer2]
    assert eq.equalization_report.absorb_rule == "data minimum"
    # The pre-activation minimum, per channel, drops to 0 where it was positive (after equalization's scale).
    plain = kq.ptq.equalize(model, data=x, absorb_high_bias=False)
    lo_plain, lo = pre_activation(plain, x).min(0), pre_activation(eq, x).min(0)
    assert np.all(lo <= lo_plain + 1e-6) and np.any(lo_plain > 0.1)
    np.testing.assert_allclose(lo[lo_plain > 0], 0.0, atol=1e-4 * np.abs(lo_plain).max())
    hi_plain, hi = pre_activation(plain, x).max(0), pre_activation(eq, x).max(0)
    assert np.all(hi <= hi_plain + 1e-6) and np.any(hi < hi_plain - 0.1)  # layer2's input range shrinks


def test_absorption_without_data_uses_the_three_sigma_rule():
    model = high_bias_model()
    plain = kq.ptq.equalize(model, absorb_high_bias=False)
    eq = kq.ptq.equalize(model)
    gamma, beta = np64(plain.get_layer("bn1").gamma), np64(plain.get_layer("bn1").beta)
    c = np.maximum(beta - 3 * np.abs(gamma), 0)
    assert np.any(c > 0)
    np.testing.assert_allclose(np64(eq.get_layer("bn1").beta), beta - c, rtol=1e-5, atol=1e-6)
    w2 = np64(plain.get_layer("c2").kernel)
    np.testing.assert_allclose(np64(eq.get_layer("c2").bias),
                               np64(plain.get_layer("c2").bias) + np.einsum("hwio,i->o", w2, c), rtol=1e-5, atol=1e-5)
    assert eq.equalization_report.absorb_rule == "beta - 3 gamma"


def test_absorption_skipped_where_padding_would_differ():
    model = high_bias_model(padding="same")
    eq = kq.ptq.equalize(model, data=data((8, 8, 3)))
    assert eq.equalization_report.absorbed == ()
    assert any("pads its input" in why for _, why in eq.equalization_report.skipped)


# Skipped pairs and bad input --------------------------------------------------------------------------------
def branching_model():
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 3, padding="same", name="b")(inp)
    s = L.Add(name="add")([a, L.ReLU(name="b_relu")(b)])
    c = L.Conv2D(4, 1, name="c")(s)
    d = L.Conv2D(4, 1, activation="swish", name="d")(c)
    e = L.Concatenate(name="cat")([L.Conv2D(4, 1, name="e")(d), d])
    f = L.Conv2D(4, 1, activation="relu", name="f")(e)
    g = L.Conv2D(4, 1, name="g")(f)
    h = L.Conv2D(4, 1, name="h")(g)
    out = L.Add(name="add2")([L.Conv2D(4, 1, name="i")(h), h])
    return randomize(keras.Model(inp, out), 6)


def test_skips_what_cannot_be_scaled():
    model = branching_model()
    eq = kq.ptq.equalize(model)
    report = eq.equalization_report
    assert {(p.layer1, p.layer2) for p in report.pairs} == {("c", "d"), ("f", "g"), ("g", "h")}
    why = dict(report.skipped)
    assert "Add" in why["a"] and "Add" in why["b"] and "Concatenate" in why["e"]
    assert "not positively homogeneous" in why["d"] and "read by 2 layers" in why["h"] and "add2" in why["i"]
    assert "no BatchNormalization statistics and no data" in why["f -> g"]
    x = data((8, 8, 3))
    np.testing.assert_allclose(run(eq, x), run(model, x), rtol=1e-4, atol=1e-5 * np.abs(run(model, x)).max())
    assert "3 pairs equalized" in str(report)


def test_sequential_gives_a_functional_clone():
    model = keras.Sequential([keras.Input((5,)), L.Dense(7, activation="relu"), L.Dense(3)])
    randomize(model, 7)
    eq = kq.ptq.equalize(model)
    assert isinstance(eq, keras.Model) and not isinstance(eq, keras.Sequential)
    assert len(eq.equalization_report.pairs) == 1
    x = data((5,))
    np.testing.assert_allclose(run(eq, x), run(model, x), rtol=1e-5, atol=1e-5)


def test_a_loaded_sequential_is_equalized(tmp_path):
    # A loaded Sequential's layers also keep the nodes of the graph it was rebuilt from: a layer is "called more
    # than once" only within the model's own graph.
    model = keras.Sequential([keras.Input((5,)), L.Dense(7, activation="relu"), L.Dense(3)])
    randomize(model, 7)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    eq = kq.ptq.equalize(loaded)
    assert len(eq.equalization_report.pairs) == 1, eq.equalization_report
    x = data((5,))
    np.testing.assert_allclose(run(eq, x), run(model, x), rtol=1e-5, atol=1e-5)


class Subclassed(keras.Model):
    def call(self, x):
        return x


@pytest.mark.parametrize("kwargs,field", [
    ({"relu6": "clip"}, "relu6"), ({"absorb_high_bias": "yes"}, "absorb_high_bias"), ({"iterations": 0}, "iterations"),
    ({"tolerance": -1.0}, "tolerance"), ({"tolerance": float("nan")}, "tolerance"), ({"batch_size": 0}, "batch_size")])
def test_bad_options(kwargs, field):
    with pytest.raises(ConfigError) as e:
        kq.ptq.equalize(dense_pair(), **kwargs)
    assert e.value.field == field


def test_subclassed_model_refused():
    with pytest.raises(ConfigError) as e:
        kq.ptq.equalize(Subclassed())
    assert e.value.field == "model"


# The point of it all ----------------------------------------------------------------------------------------
def sqnr(ref, y):
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))


def randomize_bn(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]  # variances over orders of magnitude: folded kernels as unequal as trained ones
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.5, n), rng.normal(0, 0.5, n),
                               np.exp(rng.normal(0, 2, n))])
    return model


def random_bn_mobilenet(shape, alpha, seed):
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(weights=None, input_shape=shape, classes=10, alpha=alpha)
    return randomize_bn(model, seed)


def predict(model, x):
    return np.asarray(model.predict(x, verbose=0, batch_size=256), np.float64)


@pytest.mark.slow
def test_per_tensor_weight_quantization_improves_on_mobilenet():
    """benchmarks/bench_peers.py's MobileNet-style net on digits, BN statistics at random (variances over
    orders of magnitude, so the folded depthwise kernels' channels do too): 8-bit per-tensor weights."""
    from keras_quant.cli import datasets
    from tests.benchmarks import load_benchmark

    (x, _), _ = datasets.load_digits()
    x = x[:256]
    model = load_benchmark("bench_peers").build_model(keras, "mobilenet", x.shape[1:])
    randomize_bn(model, 0)
    eq = kq.ptq.equalize(model, data=x)
    ref = predict(model, x)
    np.testing.assert_allclose(predict(eq, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert len(eq.equalization_report.pairs) == 7
    config = kq.QuantConfig(weights=kq.QuantSpec(bits=8, symmetric=True, granularity="per_tensor"), activations=None)
    before = sqnr(ref, predict(kq.quantize_model(model, config), x))
    after = sqnr(ref, predict(kq.quantize_model(eq, config), x))
    assert after > before + 5.0, (before, after)  # measured (TF): 39.5 dB -> 51.3 dB


@pytest.mark.slow
def test_mobilenet_v2_96():
    model = random_bn_mobilenet((96, 96, 3), 1.0, 1)
    x = np.random.default_rng(1).uniform(0, 1, (16, 96, 96, 3)).astype("float32")
    eq = kq.ptq.equalize(model, data=x)
    ref = run(model, x)
    np.testing.assert_allclose(run(eq, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    report = eq.equalization_report
    assert len(report.pairs) >= 35 and report.converged  # measured: 37 pairs, 18 high biases absorbed
    why = [w for _, w in report.skipped if not w.startswith("high-bias")]
    assert sum("Add" in w for w in why) >= 10 and sum("read by 2 layers" in w for w in why) >= 5
