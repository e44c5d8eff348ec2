"""Hostile config dicts: `QuantConfig.from_config` / `QuantSpec.from_config` give a config or a ConfigError.

Whatever the dict (wrong types at any level, missing or extra keys, lists where dicts belong, NaN,
huge numbers, booleans for integers, invalid regular expressions, unknown layer types), reading it
either returns a config that holds exactly the values given (checked, never converted) or raises
`keras_quant.errors.ConfigError` naming the field and the value; never another exception.
"""

import copy
import json
import math

import keras
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_quant as kq
from keras_quant.errors import ConfigError


def _bases():
    plain = kq.QuantConfig.int8()
    mixed = kq.QuantConfig.w4a8()
    mixed.set_layer_type(keras.layers.Conv2D, weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_group",
                                                                   group_size=16))
    mixed.set_layer_type(keras.layers.Dense, None)
    mixed.set_layer_name(r"block_\d+/.*", activations=kq.QuantSpec(bits=16, symmetric=True, observer="percentile",
                                                                    observer_options={"percentile": 99.9}))
    mixed.set_layer_name("head", None)
    auto = kq.QuantConfig(weights=None, activations=kq.QuantSpec(
        observer="auto", observer_options={"candidates": "minmax,mse", "tolerance": 0.1}, learnable=True))
    auto.set_layer_name("stem", weights=kq.QuantSpec(bits=8, axis=-2, granularity="per_channel"))
    return [json.loads(json.dumps(c.get_config())) for c in (plain, mixed, auto)]


BASES = _bases()
HOSTILE = [
    None, True, False, 0, 1, -1, 2, 3, 16, 17, 1.5, 8.0, -0.0, math.nan, math.inf, -math.inf, 10**100, -10**100, 2**31,
    "", "(", "[a-", "*", "x", "per_group", "per_tensor", "minmax", "auto", "Dense", "Conv2D", "os.system", "__class__",
    [], {}, [1], [None], {"a": 1}, [[]], {"bits": 8}, {"weights": None}, [{"name": "x"}], {"name": "(", "override": None},
]


def _locations(node, path=()):
    """Every `(container, key)` in the nested dicts and lists, the root's `(None, None)` first."""
    out = [] if path else [(None, None)]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((node, key))
        out.extend(_locations(child, path + (key,)))
    return out


@st.composite
def mutated_configs(draw):
    """A valid config dict with one to three hostile changes."""
    config = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        where = _locations(config)
        container, key = where[draw(st.integers(0, len(where) - 1))]
        value = copy.deepcopy(draw(st.one_of(st.sampled_from(HOSTILE), st.integers(), st.floats(), st.text(max_size=6))))
        if container is None:
            if draw(st.booleans()):
                return value
            config = {"extra": value, **config} if isinstance(config, dict) else config
            continue
        op = draw(st.sampled_from(["replace", "delete", "add_key", "wrap"]))
        if op == "replace":
            container[key] = value
        elif op == "delete":
            del container[key]
        elif op == "add_key" and isinstance(container, dict):
            container[draw(st.sampled_from(["extra", "bits", "override", "name", "weights", 1]))] = value
        elif op == "wrap":
            container[key] = [container[key]]
    return config


def _assert_echoes(given_value, read_value, path="config"):
    """Every value given is read back as it was, type included: nothing converted."""
    if isinstance(given_value, dict):
        assert isinstance(read_value, dict), path
        for key, value in given_value.items():
            assert key in read_value, f"{path}.{key}"
            _assert_echoes(value, read_value[key], f"{path}.{key}")
    elif isinstance(given_value, list):
        assert isinstance(read_value, list) and len(read_value) == len(given_value), path
        for i, (a, b) in enumerate(zip(given_value, read_value)):
            _assert_echoes(a, b, f"{path}[{i}]")
    else:
        assert type(read_value) is type(given_value) and read_value == given_value, (path, given_value, read_value)


def _check(config):
    given_copy = copy.deepcopy(config)
    try:
        read = kq.QuantConfig.from_config(config)
    except ConfigError as e:
        assert e.field and "Received: " in str(e)
        return False
    assert config == given_copy  # the input is left as it was
    assert kq.QuantConfig.from_config(read.get_config()) == read
    _assert_echoes(config, read.get_config())
    return True


@settings(max_examples=400, deadline=None)
@given(mutated_configs())
def test_mutated_configs_read_back_or_raise_config_error(config):
    _check(config)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(mutated_configs())
def test_mutated_configs_many(config):
    _check(config)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(list(kq.QuantSpec().get_config()))),
                       st.one_of(st.sampled_from(HOSTILE), st.integers(), st.floats(), st.text(max_size=6)),
                       max_size=4))
def test_spec_from_config_of_any_dict(config):
    try:
        spec = kq.QuantSpec.from_config(config)
    except ConfigError:
        return
    _assert_echoes(config, spec.get_config())


def test_the_bases_read_back():
    assert all(_check(copy.deepcopy(base)) for base in BASES)


@pytest.mark.parametrize("config, field", [
    (None, "config"),
    ([], "config"),
    ({"weights": []}, "weights"),
    ({"weights": {"bits": True}}, "weights.bits"),
    ({"weights": {"bits": 8.0}}, "weights.bits"),
    ({"weights": {"bits": math.nan}}, "weights.bits"),
    ({"weights": {"bits": 10**100}}, "weights.bits"),
    ({"weights": {"axis": 1.5}}, "weights.axis"),
    ({"weights": {"axis": 10**9}}, "weights.axis"),
    ({"weights": {"granularity": ["per_tensor"]}}, "weights.granularity"),
    ({"weights": {"granularity": "per_group", "group_size": 2.0}}, "weights.group_size"),
    ({"weights": {"granularity": "per_group", "group_size": True}}, "weights.group_size"),
    ({"weights": {"observer": 3}}, "weights.observer"),
    ({"weights": {"symmetric": 1}}, "weights.symmetric"),
    ({"weights": {"observer_options": {"percentile": math.inf}}}, "weights.observer_options.percentile"),
    ({"weights": {"observer_options": {"num_bins": 10**30}}}, "weights.observer_options.num_bins"),
    ({"weights": {"observer_options": [1, 2]}}, "weights.observer_options"),
    ({"weights": {"colour": "red"}}, "weights.colour"),
    ({"extra": 1}, "config.extra"),
    ({"layer_names": {"name": "a"}}, "layer_names"),
    ({"layer_names": ["a"]}, "layer_names[0]"),
    ({"layer_names": [{"name": "("}]}, "layer_names[0]"),
    ({"layer_names": [{"name": "(", "override": None}]}, "layer_names[0].name"),
    ({"layer_names": [{"name": 3, "override": None}]}, "layer_names[0].name"),
    ({"layer_names": [{"name": "a", "override": None}, {"name": "a", "override": None}]}, "layer_names[1].name"),
    ({"layer_names": [{"name": "a", "override": []}]}, "layer_names[0].override"),
    ({"layer_names": [{"name": "a", "override": {"bias": None}}]}, "layer_names[0].override.bias"),
    ({"layer_names": [{"name": "a", "override": {"weights": {"bits": 99}}}]}, "layer_names[0].override.weights.bits"),
    ({"layer_types": [{"layer_type": "NoSuchLayer", "override": None}]}, "layer_types[0].layer_type"),
    ({"layer_types": [{"layer_type": "__class__", "override": None}]}, "layer_types[0].layer_type"),
    ({"layer_types": [{"layer_type": ["Dense"], "override": None}]}, "layer_types[0].layer_type"),
    ({"layer_types": [{"layer_type": "Dense", "override": None, "x": 1}]}, "layer_types[0].x"),
])
def test_malformed_config_names_the_field_and_value(config, field):
    with pytest.raises(ConfigError) as info:
        kq.QuantConfig.from_config(config)
    assert info.value.field == field
    assert f"Received: {field}=" in str(info.value)


def test_invalid_regular_expression_is_refused_where_it_is_set():
    config = kq.QuantConfig()
    with pytest.raises(ConfigError, match=r"not a valid regular expression.*Received: name='\('"):
        config.set_layer_name("(")
    assert config.get_config()["layer_names"] == []


def test_spec_from_config_refuses_without_converting():
    for bad in (None, [("bits", 8)], "bits=8"):
        with pytest.raises(ConfigError, match="needs a dict"):
            kq.QuantSpec.from_config(bad)
    with pytest.raises(ConfigError) as info:
        kq.QuantSpec.from_config({"bits": 8, "axis": True})
    assert info.value.field == "axis" and info.value.value is True
    assert kq.QuantSpec.from_config({"bits": 6}) == kq.QuantSpec(bits=6)  # missing fields: their defaults
