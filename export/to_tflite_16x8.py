"""Saved quantized .keras model -> TFLite 16x8 (int16 activations, int8 weights), checked in LiteRT.

    python export/to_tflite_16x8.py MODEL.keras [--data fashion|digits|PATH.npz] [--samples N] [--out DIR]

Writes <out>/<stem>_tflite_16x8.tflite (default out: export/artifacts/): int8 weights (per channel),
int16 symmetric activations, int64 biases, int16 input and output. Make the model with
kq.QuantConfig.int16x8(). LiteRT runs 16x8 with its reference kernels (no XNNPACK): accurate, slow.
"""

import sys

from _common import main


def export(model, path):
    import keras_quant as kq

    return kq.export_tflite(model, path, mode="int16x8")


if __name__ == "__main__":
    sys.exit(main(__doc__, "tflite_16x8", ".tflite", export))
