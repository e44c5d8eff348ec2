"""Helpers the analysis modules share: counting samples, reading labels, dividing safely.

Each is defined once here and imported by `keras_quant.analysis.compare`,
`.error`, `.sensitivity` and `.workflow`.

Example:

>>> import numpy as np
>>> from keras_quant.analysis.common import num_samples, ratio
>>> num_samples([np.zeros((3, 4)), np.zeros((3, 2))]), ratio(6, 3), ratio(1, 0)
(3, 2.0, None)
"""

import math

import numpy as np

from keras_quant.errors import NoDataError, ShapeMismatchError

__all__ = ["label_classes", "num_samples", "ratio"]


def num_samples(data, field="data", reason="it needs at least one sample"):
    """The number of samples in `data`: an array (batch on axis 0), or a list / tuple / dict of them.

    Args:
        data: The inputs.
        field: The argument's name, for the errors.
        reason: The `NoDataError`'s explanation (e.g. "compare_models needs at least one sample").

    Returns:
        An int >= 1.

    Raises:
        NoDataError: `data` (or one of its arrays) is None, empty, or has no sample.
        ShapeMismatchError: An array without a batch axis (a scalar), or arrays
            with different numbers of samples.
    """
    if data is None:
        raise NoDataError(field, reason)
    arrays = list(data.values()) if isinstance(data, dict) else list(data) if isinstance(data, (list, tuple)) else [data]
    if not arrays or any(a is None for a in arrays):
        raise NoDataError(field, reason)
    shapes = [np.shape(a) for a in arrays]
    if any(len(s) == 0 for s in shapes):
        raise ShapeMismatchError(field, "arrays with the batch on axis 0", shapes if len(shapes) > 1 else shapes[0])
    sizes = {s[0] for s in shapes}
    if len(sizes) > 1:
        raise ShapeMismatchError(field, "the same number of samples in every input", shapes)
    n = sizes.pop()
    if n == 0:
        raise NoDataError(field, reason)
    return int(n)


def label_classes(labels, output, classes):
    """`labels` as int64 class indices of `classes`' shape (one-hot labels are argmaxed).

    Args:
        labels: Class indices, or one-hot rows shaped like `output`.
        output: The model output the classes were predicted from.
        classes: The predicted classes (`keras_quant.analysis.compare.predicted_classes`).

    Raises:
        ShapeMismatchError: Labels that are not one per prediction (field `labels`).

    Example:

    >>> label_classes(np.eye(3)[[2, 0]], np.zeros((2, 3)), np.zeros(2, np.int64)).tolist()
    [2, 0]
    """
    labels = np.asarray(labels)
    out = np.asarray(output)
    if labels.shape == out.shape and out.ndim > 1 and out.shape[-1] > 1:
        labels = np.argmax(labels, axis=-1)
    if labels.size != classes.size or labels.shape[:1] != classes.shape[:1]:
        raise ShapeMismatchError("labels", classes.shape, labels.shape)
    labels = labels.reshape(classes.shape)
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(labels)
    return labels.astype(np.int64)


def ratio(a, b, zero="none"):
    """`a / b` as a float; None where `a` or `b` is None.

    Args:
        a, b: Numbers, or None.
        zero: What `b == 0` gives: `"none"` None (no ratio: a size or a time
            that was not measured), `"inf"` infinity, or 1.0 where `a` is 0
            too (errors compared: both zero are equal).

    Example:

    >>> ratio(1.0, 0.0), ratio(1.0, 0.0, zero="inf"), ratio(0.0, 0.0, zero="inf")
    (None, inf, 1.0)
    """
    if a is None or b is None:
        return None
    if b == 0:
        if zero == "none":
            return None
        return 1.0 if a == 0 else math.inf
    return float(a) / float(b)
