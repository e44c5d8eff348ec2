"""Quantized layers and the table of layer rules shared by PTQ and QAT."""

from keras_quant.layers.fake_quant import ActivationQuantizer, FrozenQuantizer
from keras_quant.layers.folding import fold_batch_norm, fold_into_layer
from keras_quant.layers.rules import (
    KINDS, RULES, LayerRule, get_rule, is_fusable_activation, lookup, register_rule, rule_scope,
)
from keras_quant.layers.weight_only import WeightOnlyMultiHeadAttention
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = [
    "LayerRule",
    "RULES",
    "KINDS",
    "get_rule",
    "register_rule",
    "rule_scope",
    "lookup",
    "is_fusable_activation",
    "ActivationQuantizer",
    "FrozenQuantizer",
    "QuantizeWrapper",
    "WeightOnlyMultiHeadAttention",
    "fold_batch_norm",
    "fold_into_layer",
]

