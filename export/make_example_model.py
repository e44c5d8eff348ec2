"""Train a small CNN, quantize it (PTQ) and save the .keras files the recipes take.

    python export/make_example_model.py [--data digits|fashion] [--epochs N] [--out DIR]

The CNN: Conv2D+BatchNorm+ReLU, a depthwise-separable block (DepthwiseConv2D+BatchNorm+ReLU, then
a 1x1 Conv2D+BatchNorm) added back to its input (residual Add + ReLU), MaxPooling, Dense. Trained
on scikit-learn's 8x8 digits (default, seconds) or Fashion-MNIST (`--data fashion`, Debian's
dataset-fashion-mnist), calibrated with kq.CalibrationCallback on training images, then written as

- <out>/example_int8.keras: kq.quantize_model(model, kq.QuantConfig.int8(), ...) (W8A8 PTQ);
- <out>/example_int16x8.keras: the same with kq.QuantConfig.int16x8() (int16 activations).

Default out: export/artifacts/ (git-ignored).
"""

import argparse
import os
import sys
from pathlib import Path

from _common import ARTIFACTS

SEED = 0
CALIBRATION_SAMPLES = 1000
DEFAULT_EPOCHS = {"digits": 15, "fashion": 2}


def build_model(input_shape):
    """The example CNN, seeded."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(SEED)
    inp = keras.Input(tuple(input_shape), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn")(x)
    x = L.ReLU(name="relu")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.BatchNormalization(momentum=0.9, name="bn_dw")(y)
    y = L.ReLU(name="relu_dw")(y)
    y = L.Conv2D(16, 1, use_bias=False, name="pw")(y)
    y = L.BatchNormalization(momentum=0.9, name="bn_pw")(y)
    x = L.Add(name="add")([x, y])
    x = L.ReLU(name="relu_add")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return keras.Model(inp, x, name="example_cnn")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--data", choices=["digits", "fashion"], default="digits")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {DEFAULT_EPOCHS['digits']} on digits, "
                             f"{DEFAULT_EPOCHS['fashion']} on fashion)")
    parser.add_argument("--out", default=None, help=f"folder for the .keras files (default {ARTIFACTS})")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np

    import keras_quant as kq
    from keras_quant.cli import datasets

    if args.data == "fashion":
        if not datasets.fashion_mnist_available():
            print(f"{Path(sys.argv[0]).name}: error: Fashion-MNIST is not installed (apt-get install "
                  "dataset-fashion-mnist); use --data digits", file=sys.stderr)
            return 1
        (x, y), (x_test, y_test) = datasets.load_fashion_mnist()
    else:
        (x, y), (x_test, y_test) = datasets.load_digits()
    epochs = args.epochs or DEFAULT_EPOCHS[args.data]

    model = build_model(x.shape[1:])
    model.compile(keras.optimizers.Adam(0.01 if args.data == "digits" else 0.001),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, batch_size=32 if args.data == "digits" else 64, epochs=epochs, verbose=0)
    float_acc = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    print(f"float model: {model.count_params()} parameters, {epochs} epochs on {len(x)} {args.data} images, "
          f"test accuracy {float_acc:.4f}")

    out = Path(args.out) if args.out else ARTIFACTS
    out.mkdir(parents=True, exist_ok=True)
    x_calib = x[:CALIBRATION_SAMPLES]
    for name, config in (("int8", kq.QuantConfig.int8()), ("int16x8", kq.QuantConfig.int16x8())):
        cb = kq.CalibrationCallback(config)
        model.predict(x_calib, batch_size=64, verbose=0, callbacks=[cb])
        qmodel = kq.quantize_model(model, config, calibration=cb.result)
        acc = float(np.mean(qmodel.predict(x_test, batch_size=256, verbose=0).argmax(-1) == y_test))
        path = out / f"example_{name}.keras"
        qmodel.save(path)
        print(f"{path}: PTQ {name} (calibrated on {len(x_calib)} training images), Keras test accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
