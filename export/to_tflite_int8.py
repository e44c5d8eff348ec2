"""Saved quantized .keras model -> full-integer int8 TFLite, checked in the LiteRT interpreter.

    python export/to_tflite_int8.py MODEL.keras [--data fashion|digits|PATH.npz] [--samples N] [--out DIR]

Writes <out>/<stem>_tflite_int8.tflite (default out: export/artifacts/): int8 weights (per channel),
int8 activations with the model's own scales and zero points, int32 biases, int8 input and output.
The model should come from kq.quantize_model with 8-bit activations (kq.QuantConfig.int8()).
"""

import sys

from _common import main


def export(model, path):
    import keras_quant as kq

    return kq.export_tflite(model, path, mode="int8")


if __name__ == "__main__":
    sys.exit(main(__doc__, "tflite_int8", ".tflite", export))
