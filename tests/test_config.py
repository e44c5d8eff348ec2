"""QuantSpec / QuantConfig: validation, lookup order, serialization."""

import json

import keras
import pytest

import keras_quant as kq
from keras_quant.config import QuantConfig, QuantSpec
from keras_quant.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"granularity": "per_row"}, "granularity"),
        ({"axis": 1.5}, "axis"),
        ({"granularity": "per_group"}, "group_size"),
        ({"granularity": "per_group", "group_size": 0}, "group_size"),
        ({"group_size": 32}, "group_size"),
        ({"narrow_range": 1}, "narrow_range"),
        ({"observer": "max"}, "observer"),
        ({"learnable": None}, "learnable"),
        ({"stochastic_rounding": "no"}, "stochastic_rounding"),
        ({"observer_options": [1, 2]}, "observer_options"),
    ],
)
def test_spec_validation_names_field_and_value(kwargs, field):
    with pytest.raises(ConfigError) as info:
        kq.QuantSpec(**kwargs)
    assert info.value.field == field
    assert f"Received: {field}=" in str(info.value)
    assert repr(list(kwargs.values())[-1]) in str(info.value) or field == "group_size"


def test_bits_message_in_keras_form():
    with pytest.raises(ConfigError, match=r"bits must be an integer between 2 and 16\. Received: bits=17"):
        kq.QuantSpec(bits=17)


@pytest.mark.parametrize(
    "bits, symmetric, narrow, qmin, qmax",
    [(8, False, False, -128, 127), (8, True, True, -127, 127), (4, True, False, -8, 7), (16, True, False, -32768, 32767), (2, False, True, -1, 1)],
)
def test_grid(bits, symmetric, narrow, qmin, qmax):
    spec = kq.QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.num_levels == qmax - qmin + 1
    assert spec.storage_dtype == ("int8" if bits <= 8 else "int16")


def test_spec_round_trip_and_defaults_for_old_files():
    spec = kq.QuantSpec(
        bits=4, symmetric=True, granularity="per_group", group_size=32, axis=0, observer="mse",
        observer_options={"num_bins": 1024},
    )
    config = json.loads(json.dumps(spec.get_config()))
    assert kq.QuantSpec.from_config(config) == spec
    assert spec.options == {"num_bins": 1024}
    assert hash(spec) == hash(kq.QuantSpec.from_config(config))
    # A file written before a field existed still loads with the default.
    assert kq.QuantSpec.from_config({"bits": 6}) == kq.QuantSpec(bits=6)
    with pytest.raises(ConfigError, match="unknown QuantSpec field"):
        kq.QuantSpec.from_config({"bits": 8, "colour": "red"})


def test_replace_validates():
    spec = kq.QuantSpec()
    assert spec.replace(bits=4).bits == 4
    with pytest.raises(ConfigError):
        spec.replace(bits=40)


def test_presets():
    int8 = kq.QuantConfig.int8()
    assert int8.weights == kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel", narrow_range=True)
    assert int8.activations == kq.QuantSpec(bits=8)
    assert kq.QuantConfig.w4a8().weights.bits == 4
    assert kq.QuantConfig.w4a8().activations.bits == 8
    a16 = kq.QuantConfig.int16x8().activations
    assert (a16.bits, a16.symmetric) == (16, True)


class MyConv(keras.layers.Conv2D):
    pass


def test_lookup_order():
    w4 = kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    a16 = kq.QuantSpec(bits=16, symmetric=True)
    config = kq.QuantConfig.int8()
    config.set_layer_type(keras.layers.Conv2D, weights=w4)
    config.set_layer_name(r"block_\d+/.*", activations=a16)
    config.set_layer_name("classifier", None)
    config.set_layer_type(keras.layers.Dropout, None)

    dense = keras.layers.Dense(3, name="dense")
    assert config.for_layer(dense) == kq.LayerQuantConfig(config.weights, config.activations)
    conv = keras.layers.Conv2D(3, 3, name="conv")
    assert config.for_layer(conv).weights == w4  # type override
    assert config.for_layer(conv).activations == config.activations  # falls through
    sub = MyConv(3, 3, name="sub")
    assert config.for_layer(sub).weights == w4  # subclasses follow their base's rule
    nested = keras.layers.Conv2D(3, 3, name="conv_a")
    got = config.for_layer(nested, path="block_2/conv_a")
    assert got.weights == w4 and got.activations == a16  # name over type, per field
    assert config.for_layer(keras.layers.Dense(2, name="classifier")) is None
    assert config.for_layer(keras.layers.Dropout(0.1)) is None
    assert config.for_layer("classifier") is None


def test_exact_name_beats_regex_and_later_regex_wins():
    a4 = kq.QuantSpec(bits=4)
    a6 = kq.QuantSpec(bits=6)
    config = kq.QuantConfig()
    config.set_layer_name("dense_1", activations=a4)
    config.set_layer_name(r"dense_\d", activations=a6)
    assert config.for_layer("dense_1").activations == a4
    assert config.for_layer("dense_2").activations == a6
    config.set_layer_name(r"dense_.*", None)
    assert config.for_layer("dense_2") is None
    assert config.for_layer("dense_1").activations == a4


def test_override_arguments_are_validated():
    config = kq.QuantConfig()
    with pytest.raises(ConfigError, match="name"):
        config.set_layer_name("(", None)
    with pytest.raises(ConfigError, match="layer_type"):
        config.set_layer_type("Dense", None)
    with pytest.raises(ConfigError, match="weights"):
        config.set_layer_name("x", weights=8)
    with pytest.raises(ConfigError, match="not both"):
        config.set_layer_name("x", None, weights=None)


@keras.saving.register_keras_serializable(package="kq_tests")
class Custom(keras.layers.Layer):
    pass


def test_config_round_trip_through_json():
    config = kq.QuantConfig.w4a8()
    config.set_layer_type(keras.layers.Conv2D, weights=kq.QuantSpec(bits=8, symmetric=True, granularity="per_channel"))
    config.set_layer_type(Custom, None)
    config.set_layer_name(r"block_\d+/.*", activations=kq.QuantSpec(bits=16, symmetric=True))
    config.set_layer_name("classifier", None)
    restored = kq.QuantConfig.from_config(json.loads(json.dumps(config.get_config())))
    assert restored == config
    assert restored.for_layer(keras.layers.Conv2D(1, 1)).weights.bits == 8
    assert restored.for_layer(Custom()) is None
    assert restored.for_layer("classifier") is None
    # Defaults for older files; float-only configs.
    assert kq.QuantConfig.from_config({}) == kq.QuantConfig()
    assert kq.QuantConfig(weights=None).for_layer("x").weights is None
    assert kq.QuantConfig(weights=None, activations=None).for_layer("x") is None


def test_unknown_layer_type_in_file_is_an_error():
    with pytest.raises(ConfigError, match="layer_type"):
        kq.QuantConfig.from_config({"layer_types": [{"layer_type": "os.system", "override": None}]})


def test_auto_observer_spec_and_options_round_trip():
    spec = kq.QuantSpec(bits=4, observer="auto", observer_options={"candidates": "minmax,mse", "tolerance": 0.1})
    assert spec.options == {"candidates": "minmax,mse", "tolerance": 0.1}
    assert kq.QuantSpec.from_config(json.loads(json.dumps(spec.get_config()))) == spec
    assert "auto" in kq.config.OBSERVERS
    assert kq.config.auto_candidates(" kl , minmax") == ("kl", "minmax")
    assert kq.config.auto_candidates(None) == ("minmax", "percentile", "mse", "kl")
    assert kq.config.auto_tolerance(None) == kq.config.AUTO_TOLERANCE == 0.2


@pytest.mark.parametrize(
    "options, field",
    [
        ({"candidates": "minmax,entropy"}, "observer_options.candidates"),
        ({"candidates": "mse,mse"}, "observer_options.candidates"),
        ({"candidates": ""}, "observer_options.candidates"),
        ({"tolerance": -1.0}, "observer_options.tolerance"),
        ({"tolerance": "small"}, "observer_options.tolerance"),
        ({"tolerance": float("inf")}, "observer_options.tolerance"),
    ],
)
def test_auto_observer_options_validated(options, field):
    with pytest.raises(ConfigError) as info:
        kq.QuantSpec(observer="auto", observer_options=options)
    assert info.value.field == field
    assert f"Received: {field}=" in str(info.value)


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
