"""`QuantizationTensorBoard`: quantizer ranges, scales and per-layer errors logged to TensorBoard during QAT.

Two pure readers do the work, eagerly, between training steps (nothing is
added to the compiled train step):

- `quantizer_summaries(model)` reads every `QuantizeWrapper` and
  `ActivationQuantizer`: the activation scale, zero point and clip range, the
  weight scales (per channel: min / mean / max and their histogram), each
  weight's quantization SQNR (float vs fake-quantized kernel) and the range mode.
- `activation_errors(model, x)` runs the model on a sample with
  `training=False` and compares each activation quantizer's output with its
  input on that data (SQNR and MSE).

Tags (`<layer>` the quantizer layer's name; `<role>` `output`, or
`preactivation` before a layer's own softmax / sigmoid / ...)::

    <layer>/<role>/scale  .../zero_point  .../range_min  .../range_max   (scalars)
    <layer>/<role>/sqnr_db  <layer>/<role>/mse                           (with data)
    <layer>/<weight>/scale, or scale_min / scale_mean / scale_max + histogram <layer>/<weight>/scales
    <layer>/<weight>/sqnr_db
    <layer>/range_mode          0 observe, 1 learn, 2 frozen

A per-channel activation writes `scale_min` / `scale_mean` / `scale_max` and a
`scales` histogram like a weight, and its range is the union over channels.

Example:

>>> tb = kq.QuantizationTensorBoard("logs/qat", data=x_test[:256])    # doctest: +SKIP
>>> qat.fit(x, y, epochs=5, callbacks=[tb])            # then: tensorboard --logdir logs/qat  # doctest: +SKIP
"""

import importlib.util
import math
import os

import keras
import numpy as np

from keras_quant.analysis.error import error_stats
from keras_quant.errors import ConfigError, KerasQuantError, check_int
from keras_quant.export.plan import quantizer_layers
from keras_quant.layers.fake_quant import ActivationQuantizer
from keras_quant.layers.qat_quantizer import RANGE_MODES
from keras_quant.layers.wrapper import QuantizeWrapper

__all__ = [
    "QuantizationTensorBoard", "quantizer_summaries", "activation_errors", "histogram_buckets", "RANGE_MODE_CODES",
    "RUN_NAME",
]

# The scalar written for each range mode.
RANGE_MODE_CODES = {mode: i for i, mode in enumerate(RANGE_MODES)}
# Sub-folder of log_dir the callback writes to (a TensorBoard run beside Keras' "train" / "validation").
RUN_NAME = "quantization"
RANGE_MODE_DESCRIPTION = "range mode: " + ", ".join(f"{i} {m}" for m, i in RANGE_MODE_CODES.items())
HISTOGRAM_BUCKETS = 30


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def _activation_quantizers(layer):
    """`[(role, attribute, spec, (scale, zero_point))]` of a quantizer layer's activation quantizers."""
    if isinstance(layer, ActivationQuantizer):
        return [("output", "quantizer", layer.spec, layer.qparams)]
    found = []
    if layer.preactivation_quantizer is not None and layer.preactivation_qparams is not None:
        found.append(("preactivation", "preactivation_quantizer", layer.preactivation_quantizer.spec,
                      layer.preactivation_qparams))
    if layer.output_quantizer is not None and layer.output_qparams is not None:
        found.append(("output", "output_quantizer", layer.output_quantizer.spec, layer.output_qparams))
    return found


def _sqnr(original, quantized):
    try:
        return error_stats(original, quantized, nan_policy="omit").sqnr_db
    except KerasQuantError:  # nothing finite to compare
        return math.nan


def _scales(prefix, scale, zero_point, scalars, histograms):
    if scale.size == 1:
        scalars[f"{prefix}/scale"] = float(scale.reshape(-1)[0])
        scalars[f"{prefix}/zero_point"] = float(zero_point.reshape(-1)[0])
        return
    scalars[f"{prefix}/scale_min"] = float(scale.min())
    scalars[f"{prefix}/scale_mean"] = float(scale.mean())
    scalars[f"{prefix}/scale_max"] = float(scale.max())
    scalars[f"{prefix}/zero_point_min"] = float(zero_point.min())
    scalars[f"{prefix}/zero_point_max"] = float(zero_point.max())
    histograms[f"{prefix}/scales"] = scale.reshape(-1)


def quantizer_summaries(model):
    """What `QuantizationTensorBoard` logs of each quantizer layer's state, read now.

    Args:
        model: A model with `kq.QuantizeWrapper` / `kq.ActivationQuantizer`
            layers (QAT or frozen).

    Returns:
        `(scalars, histograms)`: `{tag: float}` and `{tag: float64 array}`,
        tags as in the module docstring.

    Raises:
        ConfigError: If the model has no (built) quantizer layer.

    Example:

    >>> scalars, _ = quantizer_summaries(qat)                  # doctest: +SKIP
    >>> scalars["conv1/kernel/sqnr_db"] > 30                     # doctest: +SKIP
    True
    """
    layers = [q for q in quantizer_layers(model) if q.built]
    if not layers:
        raise ConfigError("model", getattr(model, "name", model), "the model has no built quantizer layers; build "
                          "it with kq.quantize_model(model, config, mode='qat')")
    scalars, histograms = {}, {}
    for layer in layers:
        name = layer.name
        for role, _, spec, (scale, zero_point) in _activation_quantizers(layer):
            scale, zero_point = _np(scale), _np(zero_point)
            _scales(f"{name}/{role}", scale, zero_point, scalars, histograms)
            scalars[f"{name}/{role}/range_min"] = float(np.min((spec.qmin - zero_point) * scale))
            scalars[f"{name}/{role}/range_max"] = float(np.max((spec.qmax - zero_point) * scale))
        if isinstance(layer, QuantizeWrapper) and layer.weight_specs:
            floats = layer.float_weights()
            quantized = layer.quantized_weights(training=False)
            for weight, (scale, zero_point) in layer.weight_qparams.items():
                _scales(f"{name}/{weight}", _np(scale), _np(zero_point), scalars, histograms)
                scalars[f"{name}/{weight}/sqnr_db"] = _sqnr(floats[weight], quantized[weight])
        scalars[f"{name}/range_mode"] = float(RANGE_MODE_CODES.get(layer.range_mode, -1))
    return scalars, histograms


class _Recorder:
    """Stands in for a quantizer during a probe: calls it and keeps `(input, output)` as numpy."""

    def __init__(self, quantizer):
        self.quantizer = quantizer
        self.seen = []

    def __getattr__(self, name):  # only called for names the recorder lacks: the quantizer's own
        if name == "quantizer":
            raise AttributeError(name)
        return getattr(self.quantizer, name)

    def __call__(self, x, *args, **kwargs):
        y = self.quantizer(x, *args, **kwargs)
        self.seen.append((_np(x).reshape(-1), _np(y).reshape(-1)))
        return y


def activation_errors(model, x):
    """SQNR and MSE of each activation quantizer's output against its input, on the sample `x`.

    Runs `model(x, training=False)` eagerly once, each quantizer standing in
    for a recorder for that call only (restored afterwards); no state changes.
    A quantizer shared by several tensors (a residual Add's inputs) is
    measured over all of them.

    Args:
        model: A model with quantizer layers.
        x: A batch of model inputs.

    Returns:
        `{"<layer>/<role>/sqnr_db": float, "<layer>/<role>/mse": float}` for
        every quantizer the sample reached.

    Example:

    >>> activation_errors(qat, x_test[:64])["conv1/output/sqnr_db"]   # doctest: +SKIP
    38.1
    """
    patched = []
    try:
        for layer in quantizer_layers(model):
            if not layer.built:
                continue
            for role, attr, _, _ in _activation_quantizers(layer):
                recorder = _Recorder(getattr(layer, attr))
                patched.append((layer, attr, role, recorder))
                setattr(layer, attr, recorder)
        model(x, training=False)
    finally:
        for layer, attr, _, recorder in reversed(patched):
            setattr(layer, attr, recorder.quantizer)
    out = {}
    for layer, _, role, recorder in patched:
        if not recorder.seen:
            continue
        a = np.concatenate([s[0] for s in recorder.seen])
        b = np.concatenate([s[1] for s in recorder.seen])
        keep = np.isfinite(a) & np.isfinite(b)
        e = b[keep] - a[keep]
        out[f"{layer.name}/{role}/sqnr_db"] = _sqnr(a, b)
        out[f"{layer.name}/{role}/mse"] = float(np.mean(e * e)) if e.size else math.nan
    return out


def histogram_buckets(values, bucket_count=HISTOGRAM_BUCKETS):
    """TensorBoard's histogram tensor of `values`: `(k, 3)` float64 rows `[left, right, count]`.

    The layout TensorBoard's `histograms` plugin reads; equal values make one
    bucket of width 1 around them, non-finite values are left out.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros((0, 3))
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.array([[lo - 0.5, lo + 0.5, float(v.size)]])
    counts, edges = np.histogram(v, bins=bucket_count, range=(lo, hi))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def _metadata(plugin, description=""):
    """The `SummaryMetadata` that tells TensorBoard which plugin shows a tensor summary."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata(summary_description=description)
    meta.plugin_data.plugin_name = plugin
    return meta


def _sample(data, max_samples):
    """The model inputs of `data` (an `(x, y[, w])` tuple gives `x`), first `max_samples` of them."""
    x = data[0] if isinstance(data, tuple) else data
    return keras.tree.map_structure(lambda a: a[:max_samples], x)


class QuantizationTensorBoard(keras.callbacks.Callback):
    """Logs quantizer ranges, scales and per-layer quantization error to TensorBoard.

    Writes to `<log_dir>/quantization` (a run beside Keras' TensorBoard
    callback's `train` / `validation` when given the same `log_dir`) with
    TensorFlow's `tf.summary` writer (the `tensorboard` package is needed
    only to view the logs), the values read eagerly between steps (any
    Keras backend). Tags are listed in `keras_quant.analysis.tensorboard`'s
    docstring.

    Args:
        log_dir: The TensorBoard log folder.
        data: Optional sample of model inputs (an array, a list / dict of
            arrays, or an `(x, y)` tuple): the activation error of every
            quantizer on it is logged too (one extra eager forward pass).
        update_freq: `"epoch"` (at the end of each epoch, step = epoch) or an
            int N (every N training batches, step = the batch count).
        max_samples: At most this many samples of `data` are used.

    Raises:
        ConfigError: For an `update_freq` or `max_samples` of another kind.

    Example:

    >>> qat.fit(x, y, epochs=3, callbacks=[kq.QuantizationTensorBoard("logs", data=x[:256])])  # doctest: +SKIP
    """

    def __init__(self, log_dir, data=None, update_freq="epoch", max_samples=256):
        super().__init__()
        if importlib.util.find_spec("tensorflow") is None:  # as keras.callbacks.TensorBoard: tf.summary writes the files
            raise ImportError("kq.QuantizationTensorBoard writes TensorBoard event files with tf.summary, under any "
                              "Keras backend: install tensorflow (`pip install tensorflow`)")
        if update_freq != "epoch" and (isinstance(update_freq, bool) or not isinstance(update_freq, int)
                                       or update_freq < 1):
            raise ConfigError("update_freq", update_freq, "update_freq must be 'epoch' or a positive int of batches")
        check_int("max_samples", max_samples)
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.max_samples = max_samples
        self.data = None if data is None else _sample(data, max_samples)
        self._writer = None
        self._batches = 0

    def log(self, step):
        """Write every summary now at `step` (outside `fit` too, after `set_model(model)`)."""
        import tensorflow as tf

        model = self.model
        scalars, histograms = quantizer_summaries(model)
        if self.data is not None:
            scalars.update(activation_errors(model, self.data))
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, RUN_NAME))
        with self._writer.as_default(step=int(step)):
            for tag, value in scalars.items():
                desc = RANGE_MODE_DESCRIPTION if tag.endswith("/range_mode") else ""
                tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_metadata("scalars", desc))
            for tag, values in histograms.items():
                tf.summary.write(tag, tf.constant(histogram_buckets(values)), metadata=_metadata("histograms"))
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            self.log(self._batches)

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self.log(epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
