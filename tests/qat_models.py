"""Models and helpers shared by the quantization-aware-training tests (`tests/test_qat.py`).

Imported by the test module and by the subprocess that trains under
`tf.distribute.MirroredStrategy`, so it must import nothing from pytest.
"""

import keras
import numpy as np

import keras_quant as kq
from keras_quant.cli import datasets

L = keras.layers

# The data every QAT test trains on: the first N_TRAIN digits, in order.
N_TRAIN, BATCH, EPOCHS = 192, 32, 3
STEPS = N_TRAIN // BATCH * EPOCHS


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def digits():
    """`(x_train, y_train), (x_test, y_test)` of scikit-learn's digits (8x8x1 in [0, 1])."""
    return datasets.load_digits()


def cnn(synchronized=False, seed=0):
    """Conv+BN+ReLU twice, a residual Add, a Conv+BN head (folded, with an output quantizer), pooling, Dense.

    In the QAT model: `conv1`, `conv2` fold their BatchNormalization and fuse
    the ReLU (the quantizer goes after the ReLU, shared by both Add inputs);
    `conv3` folds `bn3` and keeps its own output quantizer.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(momentum=0.9, synchronized=synchronized, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.Conv2D(8, 3, padding="same", name="conv2")(x)
    y = L.BatchNormalization(momentum=0.9, synchronized=synchronized, name="bn2")(y)
    y = L.ReLU(name="relu2")(y)
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(8, 1, name="conv3")(x)
    x = L.BatchNormalization(momentum=0.9, synchronized=synchronized, name="bn3")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, name="logits")(x)
    return keras.Model(inp, x, name="cnn")


def compile_for_qat(model, lr=0.01, **kwargs):
    model.compile(
        keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], **kwargs,
    )
    return model


def step_counts(model):
    """`{quantizer layer: training steps it has counted}`."""
    return {q.name: float(to_np(q.schedule.step)) for q in kq.qat.quantizer_layers(model)}


def sync(model):
    """Inside a JAX `fit`, write the trainer's state back to the variables (no-op elsewhere)."""
    fn = getattr(model, "jax_state_sync", None)
    if callable(fn):
        fn()


def snapshot(model):
    """The state the QAT tests follow, as numpy arrays, keyed `layer/variable`.

    - `bn`: moving statistics of the folded BatchNormalizations.
    - `act`: moving range, scale and zero point of every activation quantizer
      (standalone or a wrapper's output quantizer).
    - `weight`: scale and zero point of every weight quantizer.
    """
    out = {"bn": {}, "act": {}, "weight": {}}
    for q in kq.qat.quantizer_layers(model):
        if isinstance(q, kq.QuantizeWrapper):
            if q.batch_norm is not None:
                for v in (q.batch_norm.moving_mean, q.batch_norm.moving_variance):
                    out["bn"][f"{q.name}/{v.name}"] = to_np(v).copy()
            for name, state in q._weight_state.items():
                for field in ("scale", "zero_point"):
                    out["weight"][f"{q.name}/{name}_{field}"] = to_np(state[field]).copy()
            state = q._output_state or {}
        else:
            state = q._state
        for field in ("min", "max", "scale", "zero_point"):
            if field in state:
                out["act"][f"{q.name}/{field}"] = to_np(state[field]).copy()
    return out


def changed(before, after):
    """Keys whose values differ between two snapshots' sections."""
    return sorted(k for k in before if not np.array_equal(before[k], after[k]))


class Recorder(keras.callbacks.Callback):
    """Records `kq.qat.modes`, step counts and `snapshot` at the start and after every batch."""

    def __init__(self):
        super().__init__()
        self.modes, self.states, self.steps = [], [], []

    def _record(self):
        sync(self.model)
        self.modes.append(kq.qat.modes(self.model))
        self.states.append(snapshot(self.model))
        self.steps.append(step_counts(self.model))

    def on_train_begin(self, logs=None):
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._record()


class SwitchAt(keras.callbacks.Callback):
    """Calls `fn(model)` at the end of batch `batch` (once)."""

    def __init__(self, batch, fn):
        super().__init__()
        self.batch, self.fn = batch, fn

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            self.fn(self.model)


# A subclassed model ------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="kq_tests")
class SmallNet(keras.Model):
    """A subclassed CNN: a stem conv, residual conv blocks held in a list, a Dense head."""

    def __init__(self, filters=8, classes=10, blocks=1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.classes, self.num_blocks = filters, classes, blocks
        self.stem = L.Conv2D(filters, 3, padding="same", activation="relu", name="stem")
        self.blocks = [L.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{i}") for i in range(blocks)]
        self.pool = L.MaxPooling2D(2, name="pool")
        self.flatten = L.Flatten(name="flatten")
        self.head = L.Dense(classes, name="head")

    def call(self, x, training=None):
        # `training` is passed on explicitly: Keras' trainers pass it only to a model whose `call`
        # takes it, and JAX's trainer runs `call` itself (`stateless_call`), without the call
        # context that would otherwise hand it to the sublayers. QAT wrappers that never see
        # `training=True` never observe a range.
        h = self.stem(x, training=training)
        for block in self.blocks:
            h = h + block(h, training=training)
        return self.head(self.flatten(self.pool(h)), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, classes=self.classes, blocks=self.num_blocks)
        return config


# User-defined compute layers ---------------------------------------------------------
class _PlainDense(L.Layer):
    """A dense layer with weights `w` and `b`, of a type keras_quant knows nothing about."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="zeros")

    def call(self, x):
        return keras.ops.matmul(x, self.w) + self.b

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="kq_tests")
class RuleDense(_PlainDense):
    """Declared to keras_quant with `kq.register_rule(RuleDense, weights=("w",))`, inside the test's
    `kq.layers.rule_scope()`."""


@keras.saving.register_keras_serializable(package="kq_tests")
class MethodDense(_PlainDense):
    """The same layer declaring its rule itself, with a `quantization_rule()` method."""

    def quantization_rule(self):
        return {"kind": "compute", "weights": ("w",), "weight_axes": (-1,)}


def custom_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Flatten(name="flatten")(inp)
    x = RuleDense(32, name="rule_dense")(x)
    x = L.ReLU(name="relu")(x)
    x = MethodDense(10, name="method_dense")(x)
    return keras.Model(inp, x, name="custom_mlp")


def mlp(seed=0, widths=(64, 16)):
    """Flatten, ReLU Dense layers of `widths`, Dense logits (no Add: W4A4 PTQ and QAT start from the same ranges)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Flatten(name="flatten")(inp)
    for i, width in enumerate(widths):
        x = L.Dense(width, activation="relu", name=f"hidden{i}")(x)
    x = L.Dense(10, name="logits")(x)
    return keras.Model(inp, x, name="mlp")
