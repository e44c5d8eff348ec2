"""The range searches on a histogram, under their older import path.

They are defined in `keras_quant.ops.range_search` (pure numpy functions of
`(hist, bin_edges, spec)`, below the observers). This module stands for that
one: importing `keras_quant.observers.range_search` gives the very same
module object, so there is one definition and one module state.
"""

import sys

import keras_quant.ops.range_search as range_search

sys.modules[__name__] = range_search
