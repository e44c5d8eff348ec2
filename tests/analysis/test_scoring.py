"""Tests for keras_quant.analysis.scoring's config derivations, and the `QuantConfig.copy` they rely on."""

import keras
import pytest

from keras_quant.analysis.scoring import find_candidates, only_config, with_high
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec


def test_quant_config_copy_is_independent():
    base = QuantConfig.w4a8()
    base.set_layer_type(keras.layers.Conv2D, activations=QuantSpec(bits=16, symmetric=True))
    base.set_layer_name("head", None)
    before = base.get_config()
    copy = base.copy()
    assert copy == base and copy is not base and type(copy) is QuantConfig
    copy.set_layer_name("head", weights=QuantSpec(bits=8))
    copy.set_layer_name("stem", None)
    copy.set_layer_type(keras.layers.Conv2D, None)
    copy.set_layer_type(keras.layers.Dense, None)
    assert base.get_config() == before
    assert base.for_layer("head") is None and copy.for_layer("head").weights == QuantSpec(bits=8)
    assert base.for_layer("stem") is not None and copy.for_layer("stem") is None
    assert base.copy().get_config() == before  # the specs are shared: frozen values


def test_quant_config_copy_of_a_subclass_keeps_its_class():
    class Mine(QuantConfig):
        pass

    mine = Mine()
    assert type(mine.copy()) is Mine


def test_trial_configs_leave_the_analysed_config_alone():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    config = QuantConfig.int8()
    before = config.get_config()
    candidates = find_candidates(model, config)
    assert [c.key for c in candidates] == ["a", "b"]
    high = with_high(config, candidates[:1], None)
    assert high.for_layer(model.get_layer("a")) is None and high.for_layer(model.get_layer("b")) is not None
    only = only_config(config, candidates[1])
    assert only.for_layer(model.get_layer("a")) is None and only.for_layer(model.get_layer("b")) is not None
    int16 = with_high(config, candidates, LayerQuantConfig(weights=None, activations=QuantSpec(bits=16)))
    assert int16.for_layer(model.get_layer("b")).activations.bits == 16
    assert config.get_config() == before
