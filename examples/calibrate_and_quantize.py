"""Post-training quantization of a Keras model, end to end.

Trains a small CNN (Conv+BN+ReLU, a residual Add, pooling, Dense) on
scikit-learn's digits (shipped in the wheel, no download), then

1. calibrates it with `kq.CalibrationCallback` in an ordinary `model.predict`
   (statistics gathered inside Keras' own compiled step),
2. saves the statistics (checksummed MessagePack, zstd) and loads them back,
3. builds the int8 PTQ model with `kq.quantize_model` (BatchNorm folded,
   per-channel weights, activation quantizers where TFLite puts them),
4. prints a few statistics and the float / PTQ accuracy.

    python examples/calibrate_and_quantize.py
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_quant as kq  # noqa: E402
from keras_quant.cli import datasets  # noqa: E402  (the offline example data)

L = keras.layers


def build_model():
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.Add(name="add")([x, y])
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="digits_cnn")


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == y))


def main():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    model = build_model()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=15, batch_size=64, verbose=0)

    # 1. Calibrate: one callback in an ordinary predict call.
    config = kq.QuantConfig(activations=kq.QuantSpec(bits=8, observer="percentile"))
    cb = kq.CalibrationCallback(config=config, max_samples=512, sampling="random", seed=0,
                                sampling_options={"rate": 0.5}, verbose=1)
    model.predict(x_train, batch_size=64, callbacks=[cb], verbose=0)
    result = cb.result

    # 2. Save and load (atomic write, SHA-256 verified on load, no pickle).
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calibration.msgpack.zst")
        result.save(path)
        print(f"saved {os.path.getsize(path)} bytes; reloaded equal: {kq.CalibrationResult.load(path) == result}")

    result.summary()
    relu = result["relu1"]
    print(f"relu1: p99.9={relu.percentile(99.9):.4f} skewness={relu.skewness:.3f} outliers={relu.outliers}")

    # 3. The PTQ model.
    qmodel = kq.quantize_model(model, config, calibration=result)
    report = qmodel.quantization_report
    print(f"wrapped {len(report.wrapped)} layers, folded {len(report.folded)} BatchNorm, "
          f"{len(report.activation_quantizers)} activation quantizers")

    # 4. Accuracy.
    float_acc, ptq_acc = accuracy(model, x_test, y_test), accuracy(qmodel, x_test, y_test)
    print(f"float accuracy {float_acc:.4f}  int8 PTQ accuracy {ptq_acc:.4f}  drop {float_acc - ptq_acc:+.4f}")
    return float_acc, ptq_acc


if __name__ == "__main__":
    main()
