"""The main job: train a small CNN on shipped data and quantize it tensor by tensor.

    python examples/quantize_tensors.py [--epochs N] [--seed S] [--json]

Same as `keras-quant demo`. The steps live in `keras_quant/cli/demo.py`; each one
uses only the public API:

- weights:      `kq.ops.tensor_qparams` + `kq.ops.fake_quant`, per channel and per group;
- activations:  `kq.observers.get(spec)` -> `update(batch)` -> `compute_qparams(spec)`;
- errors:       `kq.analysis.error_stats(original, quantized)` (MSE, SQNR, max error).
"""

import sys

from keras_quant.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
