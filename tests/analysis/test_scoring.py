"""Tests for keras_quant.analysis.scoring's config derivations."""

import keras

from keras_quant.analysis.scoring import find_candidates, only_config, with_high
from keras_quant.config import LayerQuantConfig, QuantConfig, QuantSpec


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
