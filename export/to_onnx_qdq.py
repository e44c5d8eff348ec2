"""Saved quantized .keras model -> QDQ ONNX (opset 21), checked in onnxruntime.

    python export/to_onnx_qdq.py MODEL.keras [--data fashion|digits|PATH.npz] [--samples N] [--out DIR]

Writes <out>/<stem>_onnx_qdq.onnx (default out: export/artifacts/): QuantizeLinear /
DequantizeLinear pairs with the model's own scales and zero points, int8 per-channel weights (INT4
for 4-bit layers), float32 input and output. The model should have 8-bit activations.
"""

import sys

from _common import main


def export(model, path):
    import keras_quant as kq

    return kq.export_onnx(model, path, opset=21)


if __name__ == "__main__":
    sys.exit(main(__doc__, "onnx_qdq", ".onnx", export))
