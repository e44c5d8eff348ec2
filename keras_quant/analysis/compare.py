"""Compare two models end to end: outputs, accuracy, size and latency.

`compare_models(reference, candidate, data)` runs both through
`keras_quant.runtime` (a Keras model, a `.keras`, `.tflite` or `.onnx` file,
or TFLite bytes), each in its real runtime, and returns a `ModelComparison`.

Output metrics are computed in float64 on the first output (every output's
shape is checked). Predicted classes are the argmax over the last axis when it
has more than one unit; a single-unit output (shape `(N,)` or `(..., 1)`) is
one binary class, `output > threshold`, with the threshold 0.5 when every
reference output lies in `[0, 1]` (probabilities) and 0 otherwise (logits),
the same threshold for both models.

Example:

>>> import keras, numpy as np
>>> from keras_quant.analysis import compare_models
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
>>> compare_models(model, model, x, latency_runs=0).argmax_agreement
1.0
"""

import dataclasses
from typing import Optional

import numpy as np

import keras_quant.runtime as runtime
from keras_quant.analysis.common import label_classes, num_samples, ratio
from keras_quant.errors import ShapeMismatchError, check_int
from keras_quant.formatting import format_number, text_table, to_jsonable

__all__ = ["ModelComparison", "compare_models", "predicted_classes"]


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """How a candidate model differs from a reference on the same data.

    Attributes:
        reference: The reference's label (runner name).
        candidate: The candidate's label.
        num_samples: Samples compared.
        argmax_agreement: Fraction of predictions (samples, or positions for
            outputs with more axes) where both models predict the same class.
        max_abs_diff: Largest `|candidate - reference|` over the first output.
        mean_abs_diff: Mean `|candidate - reference|`.
        max_diff_steps: `max_abs_diff` in quantization steps: divided by the
            candidate's output scale, else the reference's, else None.
        reference_accuracy: Fraction of predicted classes equal to `labels`
            (None without labels); likewise `candidate_accuracy`.
        accuracy_drop: `reference_accuracy - candidate_accuracy` (a fraction;
            negative when the candidate does better).
        reference_size_bytes: The reference's size (see `runtime`); likewise
            `candidate_size_bytes`.
        compression: `reference_size_bytes / candidate_size_bytes`.
        reference_latency_s: Median seconds of one batch-1 inference (None
            with `latency_runs=0`); likewise `candidate_latency_s`.
        speedup: `reference_latency_s / candidate_latency_s`.
    """

    reference: str
    candidate: str
    num_samples: int
    argmax_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    max_diff_steps: Optional[float]
    reference_accuracy: Optional[float]
    candidate_accuracy: Optional[float]
    accuracy_drop: Optional[float]
    reference_size_bytes: int
    candidate_size_bytes: int
    compression: Optional[float]
    reference_latency_s: Optional[float]
    candidate_latency_s: Optional[float]
    speedup: Optional[float]

    def to_dict(self) -> dict:
        """The fields as a plain dict of Python numbers, strings and None."""
        return to_jsonable(dataclasses.asdict(self))

    def format(self) -> str:
        """A short table: accuracy, size and latency side by side, then the output differences."""

        def ms(v):
            return None if v is None else v * 1e3

        def times(word, v):
            return "" if v is None else f"{word} {format_number(v)}x"

        def row(metric, reference=None, candidate=None, change=""):
            return {"metric": metric, "reference": reference, "candidate": candidate, "change": change}

        drop = "" if self.accuracy_drop is None else f"drop {format_number(float(self.accuracy_drop))}"
        steps = "" if self.max_diff_steps is None else f"{format_number(self.max_diff_steps)} steps"
        compression, speedup = times("compression", self.compression), times("speedup", self.speedup)
        rows = [
            row("accuracy", self.reference_accuracy, self.candidate_accuracy, drop),
            row("size (bytes)", self.reference_size_bytes, self.candidate_size_bytes, compression),
            row("latency (ms)", ms(self.reference_latency_s), ms(self.candidate_latency_s), speedup),
            row("argmax agreement", candidate=self.argmax_agreement),
            row("max |diff|", candidate=self.max_abs_diff, change=steps),
            row("mean |diff|", candidate=self.mean_abs_diff),
        ]
        title = f"{self.reference} (reference) vs {self.candidate} (candidate), {self.num_samples} samples"
        return text_table(rows, ["metric", "reference", "candidate", "change"], title=title)

    def __str__(self):
        return self.format()


# Pure functions -----------------------------------------------------------------
def _binary_threshold(reference_output):
    r = np.asarray(reference_output)
    return 0.5 if r.size and r.min() >= 0.0 and r.max() <= 1.0 else 0.0


def predicted_classes(output, threshold=0.0):
    """Class indices: argmax over the last axis, or `output > threshold` for one unit.

    Args:
        output: Model output, batch on axis 0.
        threshold: Decision threshold of a single-unit output (shape `(N,)`
            or `(..., 1)`).

    Returns:
        An int64 array: the output's shape without its last axis (a
        single-unit `(N,)` output keeps its shape).

    Example:

    >>> predicted_classes(np.array([[0.1, 0.9], [2.0, -1.0]])).tolist()
    [1, 0]
    >>> predicted_classes(np.array([[0.7], [0.2]]), threshold=0.5).tolist()
    [1, 0]
    """
    out = np.asarray(output)
    if out.ndim == 1:
        return (out > threshold).astype(np.int64)
    if out.shape[-1] == 1:
        return (out[..., 0] > threshold).astype(np.int64)
    return np.argmax(out, axis=-1).astype(np.int64)


def _as_list(out):
    return list(out) if isinstance(out, list) else [out]


def _first_outputs(ref, cand, data, batch_size):
    """Both runners' first outputs on `data` as float64, once every output's shape is checked to match."""
    ref_outs = _as_list(ref.predict(data, batch_size=batch_size))
    cand_outs = _as_list(cand.predict(data, batch_size=batch_size))
    ref_shapes = [o.shape for o in ref_outs]
    cand_shapes = [o.shape for o in cand_outs]
    if ref_shapes != cand_shapes:
        field = "candidate output" if len(ref_shapes) == 1 == len(cand_shapes) else "candidate outputs"
        expected, actual = (ref_shapes[0], cand_shapes[0]) if field == "candidate output" else (ref_shapes, cand_shapes)
        raise ShapeMismatchError(field, expected, actual)
    return ref_outs[0].astype(np.float64), cand_outs[0].astype(np.float64)


def _accuracies(labels, reference_output, ref_classes, cand_classes):
    """`(reference_accuracy, candidate_accuracy, drop)`, all None without labels."""
    if labels is None:
        return None, None, None
    y = label_classes(labels, reference_output, ref_classes)
    ref_acc = float(np.mean(ref_classes == y))
    cand_acc = float(np.mean(cand_classes == y))
    return ref_acc, cand_acc, ref_acc - cand_acc


# Public ------------------------------------------------------------------------
def compare_models(
    reference, candidate, data, labels=None, batch_size=None, latency_runs=30, num_threads=None
) -> ModelComparison:
    """Run both models on `data` and compare outputs, accuracy, size and latency.

    Args:
        reference: The model to compare against (usually the float one):
            anything `keras_quant.runtime.load` takes.
        candidate: The model under test (e.g. the exported `.tflite`).
        data: Float32 array, batch on axis 0 (a list of arrays for several
            inputs), as the Keras model takes it.
        labels: Optional class labels (indices, or one-hot) for accuracy.
        batch_size: Passed to each runner's `predict`.
        latency_runs: Timed batch-1 runs per model; 0 skips latency (the
            latency fields are None).
        num_threads: CPU threads for the TFLite and ONNX runtimes.

    Returns:
        A `ModelComparison`.

    Raises:
        NoDataError: `data` holds no sample.
        ShapeMismatchError: The models' outputs (or `labels`) differ in shape.
        ConfigError: A bad `latency_runs`, or an artifact `load` refuses.

    Example:

    >>> result = compare_models(model, "model_int8.tflite", x_test, labels=y_test)  # doctest: +SKIP
    >>> print(result)                                                               # doctest: +SKIP
    """
    latency_runs = check_int("latency_runs", latency_runs, minimum=0)
    n = num_samples(data, reason="compare_models needs at least one sample")
    ref = runtime.load(reference, num_threads=num_threads)
    cand = runtime.load(candidate, num_threads=num_threads)
    r, c = _first_outputs(ref, cand, data, batch_size)
    diff = np.abs(c - r)
    max_abs_diff = float(diff.max()) if diff.size else 0.0
    qparams = cand.output_quantization or ref.output_quantization
    threshold = _binary_threshold(r)
    ref_classes, cand_classes = predicted_classes(r, threshold), predicted_classes(c, threshold)
    ref_acc, cand_acc, drop = _accuracies(labels, r, ref_classes, cand_classes)
    ref_lat = ref.latency(data, runs=latency_runs) if latency_runs else None
    cand_lat = cand.latency(data, runs=latency_runs) if latency_runs else None
    return ModelComparison(
        reference=ref.name,
        candidate=cand.name,
        num_samples=n,
        argmax_agreement=float(np.mean(ref_classes == cand_classes)),
        max_abs_diff=max_abs_diff,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        max_diff_steps=None if qparams is None else max_abs_diff / qparams[0],
        reference_accuracy=ref_acc,
        candidate_accuracy=cand_acc,
        accuracy_drop=drop,
        reference_size_bytes=int(ref.size_bytes),
        candidate_size_bytes=int(cand.size_bytes),
        compression=ratio(ref.size_bytes, cand.size_bytes),
        reference_latency_s=ref_lat,
        candidate_latency_s=cand_lat,
        speedup=ratio(ref_lat, cand_lat),
    )
