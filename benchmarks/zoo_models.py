"""The model zoo of `bench_zoo.py`: builders (small inputs, seed 0) and the offline data they train on.

Importable by the tests (`benchmarks/` on `sys.path`). Nothing here downloads anything:
`keras.applications` models are built with `weights=None`, the data come from Fashion-MNIST's
local idx files (`keras_quant.cli.datasets`; scikit-learn's digits stand in when it is not installed)
and scikit-learn's digits.

Every model is a `ZooModel`: a `build(size=None)` function returning a compiled Keras model,
the task it trains on (`"image"`, `"mask"`, `"tokens"` or `"signal"`) and whether the task is
classification (accuracy = argmax agreement) or segmentation (accuracy = pixel agreement of the
0.5-thresholded mask).

Tasks:

- `image`: Fashion-MNIST resized to the model's input size (bilinear) and tiled to 3 channels.
  Pixel values in [0, 255] for the models that rescale inside (`include_preprocessing`: the
  MobileNetV3s, EfficientNets, ConvNeXt), in [0, 1] for the others.
- `mask`: Fashion-MNIST padded to 32x32, one channel in [0, 1]; the target is the foreground mask
  `x > 0.2` (a U-Net learns it in an epoch).
- `tokens`: scikit-learn's digits, each 8x8 image read row by row as 64 tokens (its 17 grey levels
  0..16 are the vocabulary), classified into the 10 digits. Real data, and learnable by an
  attention or recurrent model in a few epochs.
- `signal`: Fashion-MNIST images flattened to a 784-step 1-channel signal, 10 classes.
"""

import dataclasses
from typing import Callable, Optional, Tuple

import numpy as np

SEED = 0
NUM_CLASSES = 10
BN_MOMENTUM = 0.9  # few training steps: the moving statistics must follow them (the applications use 0.99+)
LR = 1e-3
VOCAB = 17  # digits grey levels 0..16
SEQ_LEN = 64
SIGNAL_LEN = 784


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    family: str  # "keras.applications" or "custom"
    task: str  # "image", "mask", "tokens", "signal"
    size: int  # default input size (image side, sequence / signal length)
    build_fn: Callable
    scale: float = 1.0  # image pixel range: 1.0 -> [0, 1], 255.0 -> [0, 255]
    cheap: bool = False  # in the --quick subset
    note: str = ""

    @property
    def segmentation(self):
        return self.task == "mask"

    def build(self, size=None):
        """A compiled model, seeded (`keras.utils.set_random_seed(0)`), BatchNorm momentum 0.9."""
        import keras

        keras.utils.set_random_seed(SEED)
        model = self.build_fn(size or self.size)
        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = BN_MOMENTUM
        loss = "binary_crossentropy" if self.segmentation else "sparse_categorical_crossentropy"
        model.compile(optimizer=keras.optimizers.Adam(LR), loss=loss, metrics=["accuracy"])
        return model

    def input_shape(self, size=None):
        size = size or self.size
        if self.task == "image":
            return (size, size, 3)
        if self.task == "mask":
            return (size, size, 1)
        if self.task == "tokens":
            return (size,)
        return (size, 1)


def _all_layers(model):
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out.extend(_all_layers(layer))
    return out


# keras.applications ----------------------------------------------------------------------
def _app(fn_name, **kwargs):
    def build(size):
        import keras

        fn = getattr(keras.applications, fn_name)
        return fn(weights=None, input_shape=(size, size, 3), classes=NUM_CLASSES, **kwargs)

    return build


# Custom models ---------------------------------------------------------------------------
def transformer(size):
    """Embedding + positional embedding (`h + pos`, pos from `keras.ops.arange`), 2 encoder blocks
    (MultiHeadAttention, LayerNormalization, gelu FFN), average pooling, Dense softmax."""
    import keras

    L, ops = keras.layers, keras.ops
    dim, heads = 32, 2
    inp = keras.Input((size,), dtype="int32", name="tokens")
    h = L.Embedding(VOCAB, dim, name="tok_emb")(inp)
    pos = L.Embedding(size, dim, name="pos_emb")(ops.arange(size))
    h = h + pos
    for i in range(2):
        a = L.MultiHeadAttention(heads, dim // heads, name=f"mha{i}")(h, h)
        h = L.LayerNormalization(name=f"ln{i}a")(h + a)
        f = L.Dense(2 * dim, activation="gelu", name=f"ffn{i}a")(h)
        f = L.Dense(dim, name=f"ffn{i}b")(f)
        h = L.LayerNormalization(name=f"ln{i}b")(h + f)
    h = L.GlobalAveragePooling1D(name="pool")(h)
    out = L.Dense(NUM_CLASSES, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="transformer")


def rnn(size):
    """Embedding, Bidirectional(LSTM, sequences), GRU, Dense softmax."""
    import keras

    L = keras.layers
    inp = keras.Input((size,), dtype="int32", name="tokens")
    h = L.Embedding(VOCAB, 16, name="emb")(inp)
    h = L.Bidirectional(L.LSTM(24, return_sequences=True), name="bilstm")(h)
    h = L.GRU(32, name="gru")(h)
    out = L.Dense(NUM_CLASSES, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="lstm_gru")


def unet(size):
    """A 2-level U-Net: Conv+BN+ReLU, MaxPool, UpSampling2D and Conv2DTranspose decoders, Concatenate skips."""
    import keras

    L = keras.layers

    def block(x, filters, name):
        for i in range(2):
            x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = L.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = L.ReLU(name=f"{name}_relu{i}")(x)
        return x

    inp = keras.Input((size, size, 1), name="image")
    e1 = block(inp, 8, "enc1")
    e2 = block(L.MaxPooling2D(name="pool1")(e1), 16, "enc2")
    b = block(L.MaxPooling2D(name="pool2")(e2), 32, "bottom")
    u2 = L.Conv2DTranspose(16, 2, strides=2, name="up2")(b)
    d2 = block(L.Concatenate(name="cat2")([u2, e2]), 16, "dec2")
    u1 = L.UpSampling2D(name="up1")(d2)
    d1 = block(L.Concatenate(name="cat1")([u1, e1]), 8, "dec1")
    out = L.Conv2D(1, 1, activation="sigmoid", name="mask")(d1)
    return keras.Model(inp, out, name="unet")


def conv1d_audio(size):
    """Per-signal mean removal (`keras.ops.mean`), a gain (`x * s`), Conv1D stacks, a strided slice
    (`x[:, ::2]`), a difference of slices, global average pooling, Dense softmax."""
    import keras

    L, ops = keras.layers, keras.ops
    inp = keras.Input((size, 1), name="signal")
    x = inp - ops.mean(inp, axis=1, keepdims=True)
    x = x * 2.0
    for i, filters in enumerate((16, 32)):
        x = L.Conv1D(filters, 5, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
        x = x[:, ::2]  # decimation by slicing
    x = x[:, 1:] - x[:, :-1]  # a first difference along time
    x = L.Conv1D(48, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    out = L.Dense(NUM_CLASSES, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="conv1d_audio")


APP = "keras.applications"
MODELS = {m.name: m for m in [
    ZooModel("MobileNet", APP, "image", 32, _app("MobileNet", alpha=0.25), cheap=True),
    ZooModel("MobileNetV2", APP, "image", 32, _app("MobileNetV2", alpha=0.35)),
    ZooModel("MobileNetV3Small", APP, "image", 32, _app("MobileNetV3Small", alpha=0.75), scale=255.0, cheap=True),
    ZooModel("MobileNetV3Large", APP, "image", 32, _app("MobileNetV3Large", alpha=0.75), scale=255.0),
    ZooModel("EfficientNetB0", APP, "image", 32, _app("EfficientNetB0"), scale=255.0),
    ZooModel("EfficientNetV2B0", APP, "image", 32, _app("EfficientNetV2B0"), scale=255.0),
    ZooModel("ResNet50", APP, "image", 32, _app("ResNet50")),
    ZooModel("ResNet50V2", APP, "image", 32, _app("ResNet50V2")),
    ZooModel("DenseNet121", APP, "image", 32, _app("DenseNet121")),
    ZooModel("ConvNeXtTiny", APP, "image", 32, _app("ConvNeXtTiny"), scale=255.0),
    ZooModel("Xception", APP, "image", 71, _app("Xception"), note="minimum input 71x71"),
    ZooModel("InceptionV3", APP, "image", 75, _app("InceptionV3"), note="minimum input 75x75"),
    ZooModel("NASNetMobile", APP, "image", 32, _app("NASNetMobile")),
    ZooModel("Transformer", "custom", "tokens", SEQ_LEN, transformer, cheap=True),
    ZooModel("LSTM_GRU", "custom", "tokens", SEQ_LEN, rnn),
    ZooModel("UNet", "custom", "mask", 32, unet, cheap=True),
    ZooModel("Conv1D_audio", "custom", "signal", SIGNAL_LEN, conv1d_audio, cheap=True),
]}
QUICK_MODELS = tuple(n for n, m in MODELS.items() if m.cheap)


# Data --------------------------------------------------------------------------------------
def _fashion(n_train, n_test):
    """`(x, y, xt, yt)`: 28x28x1 float32 in [0, 1] (digits, upscaled, when Fashion-MNIST is missing)."""
    from keras_quant.cli import datasets

    x, y, xt, yt, _ = datasets.load_fashion_or_digits(n_train, n_test)
    return x, y, xt, yt


def _resize(images, size):
    import tensorflow as tf

    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = [tf.image.resize(images[i : i + 512], (size, size), method="bilinear").numpy()
           for i in range(0, len(images), 512)]
    return np.clip(np.concatenate(out), 0.0, 1.0).astype("float32")


def load_task(model: ZooModel, n_train, n_test, size=None):
    """`(x_train, y_train, x_test, y_test, description)` for `model`'s task at input `size`."""
    size = size or model.size
    if model.task == "tokens":
        from keras_quant.cli import datasets

        (x, y), (xt, yt) = datasets.load_digits()
        tok = lambda a: np.rint(a.reshape(len(a), -1) * 16).astype("int32")[:, :size]  # noqa: E731
        x, xt = tok(x), tok(xt)
        return x[:n_train], y[:n_train], xt[:n_test], yt[:n_test], "digits rows as 64 tokens (vocab 17)"
    x, y, xt, yt = _fashion(n_train, n_test)
    if model.task == "signal":
        flat = lambda a: a.reshape(len(a), -1, 1)[:, :size].astype("float32")  # noqa: E731
        return flat(x), y, flat(xt), yt, f"Fashion-MNIST as {size}-step signals"
    if model.task == "mask":
        pad = lambda a: _resize(a, size) if a.shape[1] > size else np.pad(  # noqa: E731
            a, ((0, 0), ((size - a.shape[1]) // 2,) * 2, ((size - a.shape[2]) // 2,) * 2, (0, 0)))
        x, xt = pad(x), pad(xt)
        return x, (x > 0.2).astype("float32"), xt, (xt > 0.2).astype("float32"), \
            f"Fashion-MNIST {size}x{size} foreground mask (x > 0.2)"
    tile = lambda a: np.repeat(_resize(a, size), 3, axis=-1) * model.scale  # noqa: E731
    return tile(x), y, tile(xt), yt, f"Fashion-MNIST {size}x{size}x3 (tiled), range [0, {model.scale:g}]"


def accuracy(model: ZooModel, pred, y) -> float:
    """Top-1 accuracy, or pixel accuracy of the 0.5-thresholded mask for segmentation."""
    pred = np.asarray(pred)
    if model.segmentation:
        return float(np.mean((pred > 0.5) == (np.asarray(y) > 0.5)))
    return float(np.mean(np.argmax(pred, axis=-1) == np.asarray(y)))


def synthetic(model: ZooModel, n, size=None, seed=0) -> Tuple[np.ndarray, np.ndarray]:
    """Random data of the right shapes and types (tests): `(x, y)`."""
    rng = np.random.default_rng(seed)
    shape = model.input_shape(size)
    if model.task == "tokens":
        x = rng.integers(0, VOCAB, (n,) + shape).astype("int32")
    else:
        x = (rng.random((n,) + shape) * model.scale).astype("float32")
    if model.segmentation:
        return x, (x > 0.2).astype("float32")
    return x, rng.integers(0, NUM_CLASSES, n).astype("int32")


def get(name) -> Optional[ZooModel]:
    return MODELS.get(name)
