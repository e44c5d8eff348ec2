"""The layer-rule table: kinds, weights and their output-channel axes, fusable activations."""

import keras
import pytest

from keras_quant.errors import ConfigError
from keras_quant.layers import rules

L = keras.layers


@pytest.mark.parametrize(
    "layer, kind, weights, axes",
    [
        (L.Dense(4), "compute", ("kernel",), (-1,)),
        (L.Conv2D(4, 3), "compute", ("kernel",), (-1,)),
        (L.DepthwiseConv2D(3), "compute", ("kernel",), (-2,)),
        (L.SeparableConv2D(4, 3), "compute", ("depthwise_kernel", "pointwise_kernel"), (-2, -1)),
        (L.Conv2DTranspose(4, 3), "compute", ("kernel",), (-2,)),
        (L.Embedding(10, 4), "compute", ("embeddings",), (0,)),
        (L.ReLU(), "activation", (), ()),
        (L.Add(), "merge", (), ()),
        (L.Concatenate(), "merge", (), ()),
        (L.GlobalAveragePooling2D(), "pool", (), ()),
        (L.BatchNormalization(), "norm", (), ()),
        (L.MaxPooling2D(), "passthrough", (), ()),
        (L.Flatten(), "passthrough", (), ()),
    ],
)
def test_rule_table(layer, kind, weights, axes):
    rule = rules.get_rule(layer)
    assert (rule.kind, rule.weights, rule.weight_axes) == (kind, weights, axes)
    assert rule.observe == (kind != "passthrough")


def test_subclass_inherits_rule_and_unknown_layer_has_none():
    class MyConv(L.Conv2D):
        pass

    assert rules.get_rule(MyConv(2, 3)) is rules.RULES[L.Conv2D]
    assert rules.get_rule(L.Lambda(lambda x: x)) is None


def test_layer_declares_its_own_rule():
    class Scaled(L.Layer):
        def quantization_rule(self):
            return {"kind": "compute", "weights": ["w"], "weight_axes": [0]}

    rule = rules.get_rule(Scaled())
    assert (rule.kind, rule.weights, rule.weight_axes) == ("compute", ("w",), (0,))


def test_register_rule_and_validation():
    class Custom(L.Layer):
        pass

    with rules.rule_scope():
        rule = rules.register_rule(Custom, weights=("w",))
        assert rules.get_rule(Custom()) is rule and rule.weight_axes == (-1,)
    assert rules.get_rule(Custom()) is None  # the scope undid the registration
    with pytest.raises(ConfigError) as e:
        rules.LayerRule(L.Dense, "bogus")
    assert e.value.field == "kind"
    with pytest.raises(ConfigError) as e:
        rules.LayerRule(L.Dense, "compute", ("kernel",), (-1,), fold_weight="bias", fold_axes=(-1,))
    assert e.value.field == "fold_weight"


def test_rule_scope_restores_replaced_rules():
    dense = rules.RULES[L.Dense]
    with rules.rule_scope():
        rules.register_rule(L.Dense, weights=("kernel",))
        assert rules.get_rule(L.Dense(2)) is not dense
    assert rules.get_rule(L.Dense(2)) is dense


@pytest.mark.parametrize(
    "layer_type, fold",
    [
        (L.Dense, ("kernel", (-1,))),
        (L.Conv2D, ("kernel", (-1,))),
        (L.DepthwiseConv2D, ("kernel", (-2, -1))),
        (L.SeparableConv2D, ("pointwise_kernel", (-1,))),
        (L.Conv2DTranspose, ("kernel", (-2,))),
        (L.Embedding, None),
        (L.EinsumDense, None),
        (L.ReLU, None),
    ],
)
def test_fold_facts_live_in_the_rule(layer_type, fold):
    rule = rules.fold_rule(layer_type)
    assert (None if rule is None else (rule.fold_weight, rule.fold_axes)) == fold


def test_registered_layer_declares_folding_and_export_facts():
    class MyDense(L.Dense):
        pass

    class Opaque(L.Layer):
        pass

    assert rules.fold_rule(MyDense) is rules.RULES[L.Dense]  # inherited along the MRO
    with rules.rule_scope():
        rule = rules.register_rule(Opaque, weights=("w",), fused_activation=False, fold_weight="w", fold_axes=[-1],
                                   export_blocker="no integer kernel")
        assert rules.fold_rule(Opaque()) is rule and rule.fold_axes == (-1,)
        assert rules.lookup(Opaque).export_blocker == "no integer kernel"
    assert rules.lookup(Opaque) is None and rules.fold_rule(Opaque) is None


def test_re_registering_a_built_in_type_keeps_its_folding_and_export_facts():
    with rules.rule_scope():
        dense = rules.register_rule(L.Dense, weights=("kernel",))
        assert (dense.fold_weight, dense.fold_axes) == ("kernel", (-1,))
        assert rules.register_rule(L.Dense, kind="float").fold_weight is None  # no kernel to fold into now
        separable = rules.register_rule(L.SeparableConv2D, weights=("depthwise_kernel",), weight_axes=(-2,))
        assert separable.fold_weight is None
        embedding = rules.register_rule(L.Embedding, weights=("embeddings",), weight_axes=(0,))
        assert embedding.export_blocker == rules.RULES[L.Embedding].export_blocker and embedding.export_per_tensor


@pytest.mark.parametrize(
    "layer_type, per_tensor",
    [(L.SeparableConv2D, False), (L.Conv3D, False), (L.EinsumDense, False), (L.Embedding, True)],
)
def test_export_facts_live_in_the_rule(layer_type, per_tensor):
    rule = rules.lookup(layer_type)
    assert rule.export_blocker and rule.export_per_tensor == per_tensor
    assert rules.lookup(L.Dense).export_blocker is None


@pytest.mark.parametrize(
    "layer, fusable",
    [
        (L.ReLU(), True),
        (L.ReLU(max_value=6.0), True),
        (L.ReLU(max_value=4.0), False),
        (L.ReLU(negative_slope=0.1), False),
        (L.Activation("relu"), True),
        (L.Activation("relu6"), True),
        (L.Activation("tanh"), False),
        (L.LeakyReLU(), False),
        (L.Softmax(), False),
    ],
)
def test_fusable_activations(layer, fusable):
    assert rules.is_fusable_activation(layer) is fusable
