"""Quantized layers and the table of layer rules shared by PTQ and QAT."""

from keras_quant.layers.rules import KINDS, RULES, LayerRule, get_rule, register_rule

__all__ = ["LayerRule", "RULES", "KINDS", "get_rule", "register_rule"]
