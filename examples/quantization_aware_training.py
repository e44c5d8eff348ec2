"""Quantization-aware training of a Keras model, end to end.

Trains a small CNN (Conv+BN+ReLU, a residual Add, max pooling, Dense) on
scikit-learn's digits (shipped in the wheel, no download), then

1. calibrates it in one `model.predict` and measures W4A4 post-training
   quantization,
2. builds the QAT model with `kq.quantize_model(..., mode="qat")`: BatchNorm
   folded into the convolution as in Jacob et al. 2018, LSQ step sizes
   initialised from the calibration, the residual Add's inputs on one scale,
3. fine-tunes it with ordinary `fit`, with `kq.QATScheduler` freezing the
   BatchNorm statistics and then every range at given steps,
4. saves it, reloads it with `safe_mode=True` and checks the outputs agree.

    python examples/quantization_aware_training.py
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
    y = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv2")(x)
    y = L.BatchNormalization(momentum=0.9, name="bn2")(y)
    x = L.ReLU(name="relu2")(L.Add(name="add")([x, y]))
    x = L.Flatten(name="flatten")(L.MaxPooling2D(2, name="pool")(x))
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="digits_cnn")


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == y))


def main(epochs=15, qat_epochs=4):
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build_model()
    model.compile(keras.optimizers.Adam(0.01), loss)
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)

    # 1. W4A4: 4-bit per-channel weights and 4-bit activations, with learned step sizes (LSQ).
    config = kq.QuantConfig(
        weights=kq.QuantSpec(bits=4, symmetric=True, granularity="per_channel", learnable=True),
        activations=kq.QuantSpec(bits=4, learnable=True),
    )
    calibration = None
    ptq_acc = None
    if keras.backend.backend() == "tensorflow":  # the calibration callback hooks TensorFlow's trainer
        cb = kq.CalibrationCallback(config=config, statistics="range")
        model.predict(x_train, batch_size=128, callbacks=[cb], verbose=0)
        calibration = cb.result
        ptq_acc = accuracy(kq.quantize_model(model, config, calibration=calibration), x_test, y_test)

    # 2. The QAT model (the float model is not modified).
    qat = kq.quantize_model(model, config, mode="qat", calibration=calibration)
    report = qat.quantization_report
    print(f"wrapped {report.wrapped}, folded {report.folded}, shared quantizers {report.shared}")

    # 3. Fine-tune; BatchNorm statistics freeze at step 60, every range at step 100.
    qat.compile(keras.optimizers.Adam(1e-3), loss)
    steps_per_epoch = int(np.ceil(len(x_train) / 64))
    scheduler = kq.QATScheduler(freeze_bn_step=steps_per_epoch * (qat_epochs - 1), freeze_step=steps_per_epoch * qat_epochs)
    qat.fit(x_train, y_train, epochs=qat_epochs, batch_size=64, callbacks=[scheduler], verbose=0)
    print("quantizer modes after training:", sorted(set(kq.qat.modes(qat).values())))

    # 4. Save and reload with safe_mode=True (no custom_objects needed).
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qat.keras")
        qat.save(path)
        again = keras.models.load_model(path, safe_mode=True)
        same = np.array_equal(again.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))
        print(f"reloaded with identical outputs: {same}")

    float_acc, qat_acc = accuracy(model, x_test, y_test), accuracy(qat, x_test, y_test)
    ptq = f"W4A4 PTQ {ptq_acc:.4f}  " if ptq_acc is not None else ""
    print(f"float {float_acc:.4f}  {ptq}W4A4 QAT+LSQ {qat_acc:.4f}")
    return float_acc, ptq_acc, qat_acc


if __name__ == "__main__":
    main()
