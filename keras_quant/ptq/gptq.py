"""`gptq(qmodel, data)`: GPTQ rounding of a frozen model's kernels onto their fixed grids.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") rounds a layer's weights one input
column at a time and moves each column's rounding error onto the columns not
yet rounded, weighted by the inverse Hessian `H = 2 X X^T` of the layer's
inputs, so that the layer's output `W X` on calibration data changes as little
as it can. This implementation follows the paper's Algorithm 1 with its lazy
block updates and the Cholesky form of `H^-1`, dampening (`damp * mean(diag
H)`), dead inputs (a zero diagonal: weight set to zero) and activation
ordering (columns by decreasing `diag(H)`, then put back).

Unlike the reference, the grid is not chosen here: each frozen
`kq.QuantizeWrapper` already holds its weight scales and zero points (per
tensor, per channel or per group, symmetric or not, any bit width: mixed
precision works as is), and GPTQ only chooses the integers on that grid. A
weight's group is that of its original position (the reference's
`static_groups`), whatever order the columns are rounded in. The chosen
values are written back on the grid (`keras_quant.ptq.weights.set_grid_weight`):
the wrapper's nearest rounding, the TFLite and the ONNX exports then give
exactly GPTQ's integers.

Layers are treated in graph order, each seeing its real input from the
already rounded layers before it. Supported: Dense, EinsumDense (the input
contraction axes read from its equation), Conv1D / Conv2D (the Hessian of
their im2col patches; groups=1, channels_last) and DepthwiseConv1D / 2D (a
small Hessian per channel). Other wrapped layers are skipped with a reason.
The four kernels of a weight-only attention (`kq.layers.WeightOnlyMultiHeadAttention`, what PTQ makes
of a MultiHeadAttention) are rounded on their frozen per-tensor grids too: the query, key and value
projections on the attention's inputs, then the output projection on the attention's values.

Example:

>>> qmodel = kq.quantize_model(model, kq.QuantConfig.w4a8(), calibration=result)  # doctest: +SKIP
>>> report = kq.ptq.gptq(qmodel, x_calib[:256])                                   # doctest: +SKIP
>>> print(report)                                                                 # doctest: +SKIP
"""

import dataclasses
import itertools
import time
from typing import Tuple

import keras
import numpy as np
from keras import layers as L
from keras import ops

from keras_quant import graph as graph_lib
from keras_quant import runtime
from keras_quant.errors import ConfigError, UnsupportedLayerError, check_int, is_number
from keras_quant.formatting import text_table
from keras_quant.layers.weight_only import WeightOnlyMultiHeadAttention
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.progress import ProgressBar
from keras_quant.ptq.common import report_text, select_layers
from keras_quant.ptq.weights import grid_weight, set_grid_weight

__all__ = ["GPTQLayer", "GPTQReport", "gptq", "gptq_integers", "layer_hessian", "reconstruction_error"]

_CONV = (L.Conv1D, L.Conv2D)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)


@dataclasses.dataclass(frozen=True)
class GPTQLayer:
    """One layer GPTQ rounded.

    Attributes:
        name: The wrapper's name.
        layer_type: The wrapped layer's class name.
        bits: Bits of its weight spec.
        granularity: Its weight spec's granularity.
        columns: Input features of one output (the Hessian's size).
        error: `||W X - Q X||^2 / ||W X||^2` of GPTQ's weights `Q` on the calibration inputs.
        nearest_error: The same for round-to-nearest on the same grid.
        changed: Fraction of the integers that differ from round-to-nearest.
        seconds: Time spent on the layer (Hessian and rounding).
    """

    name: str
    layer_type: str
    bits: int
    granularity: str
    columns: int
    error: float
    nearest_error: float
    changed: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class GPTQReport:
    """What `gptq` did.

    Attributes:
        layers: A `GPTQLayer` per rounded layer, in graph order.
        skipped: `(layer, reason)` for wrapped layers left as they were.
        num_samples: Calibration samples the Hessians were measured on.
        seconds: Total wall time.
    """

    layers: Tuple[GPTQLayer, ...]
    skipped: Tuple[Tuple[str, str], ...]
    num_samples: int
    seconds: float

    def table(self) -> str:
        """The report as a plain-text table, one row per layer."""
        rows = [{"layer": r.name, "type": r.layer_type, "bits": r.bits, "granularity": r.granularity,
                 "columns": r.columns, "nearest err": r.nearest_error, "gptq err": r.error,
                 "changed": r.changed, "seconds": r.seconds} for r in self.layers]
        return text_table(rows)

    def __str__(self):
        return report_text(f"GPTQ on {self.num_samples} samples: {len(self.layers)} layers rounded, "
                           f"{len(self.skipped)} skipped, {self.seconds:.2f}s", self.layers and self.table(),
                           self.skipped)


# The GPTQ rounding ---------------------------------------------------------------------------
def _upper_inverse_cholesky(h, damp):
    """`U` with `H^-1 = U^T U` (batched), `H` dampened by `damp * mean(diag H)`; the damping grows tenfold
    (at most four times) where `H` is still not positive definite in float64."""
    eye = np.eye(h.shape[-1])
    mean_diag = np.mean(np.diagonal(h, axis1=-2, axis2=-1), axis=-1)[:, None, None]
    for factor in (1.0, 10.0, 100.0, 1000.0, 10000.0):
        step = max(damp, 1e-6) * factor if factor > 1 else damp
        try:
            lower = np.linalg.cholesky(h + step * mean_diag * eye)
            inverse = np.linalg.inv(lower)
            return np.swapaxes(np.linalg.cholesky(np.swapaxes(inverse, -1, -2) @ inverse), -1, -2)
        except np.linalg.LinAlgError:
            continue
    raise ConfigError("damp", damp, "the Hessian is not positive definite even with 10^4 times this damping")


def _round_columns(w, hinv, scale, zero_point, qmin, qmax, block_size):
    """The lazy-batch column loop on permuted `(B, rows, cols)` weights: the integers chosen."""
    w = w.copy()
    q = np.zeros_like(w)
    cols = w.shape[-1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, hinv1 = w[:, :, i1:i2].copy(), np.zeros_like(w[:, :, i1:i2]), hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s, z = w1[:, :, i], scale[:, :, i1 + i], zero_point[:, :, i1 + i]
            qi = np.clip(np.floor(col / s + 0.5) + z, qmin, qmax)
            q[:, :, i1 + i] = qi
            e = (col - (qi - z) * s) / hinv1[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * hinv1[:, None, i, i:]
            err1[:, :, i] = e
        if i2 < cols:
            w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]
    return q


def gptq_integers(w, h, scale, zero_point, qmin, qmax, block_size=128, damp=0.01, act_order=True):
    """GPTQ's integers for weights `w` of shape `(rows, cols)` (or a batch `(B, rows, cols)`).

    Args:
        w: Float weights, one row per output, one column per input feature.
        h: The Hessian `2 X X^T / n` of the inputs, `(cols, cols)` (or `(B, cols, cols)`).
        scale: The grid's scale per weight (the shape of `w`).
        zero_point: Its zero point per weight.
        qmin: Smallest integer of the grid.
        qmax: Largest integer.
        block_size: Columns per lazy block update.
        damp: Dampening, a fraction of the mean diagonal of `h` added to it.
        act_order: Round the columns by decreasing `diag(h)`.

    Returns:
        The integers (float64, the shape of `w`), round half away from zero as `kq.ops.quantize`.

    Example:

    >>> q = gptq_integers(w, 2 * x.T @ x / len(x), scale, np.zeros_like(w), -8, 7)  # doctest: +SKIP
    """
    batched = np.ndim(w) == 3
    w, h, scale, zero_point = (np.array(a, np.float64) if batched else np.array(a, np.float64)[None]
                               for a in (w, h, scale, zero_point))
    diag = np.diagonal(h, axis1=-2, axis2=-1).copy()
    dead = diag == 0
    b_idx, c_idx = np.nonzero(dead)
    h[b_idx, c_idx, c_idx] = 1.0
    w[b_idx, :, c_idx] = 0.0
    diag[dead] = 1.0  # the order the reference sorts in (a dead column is independent of the others anyway)
    perm = (np.argsort(-diag, axis=-1, kind="stable") if act_order
            else np.broadcast_to(np.arange(w.shape[-1]), diag.shape))
    take = lambda a: np.take_along_axis(a, perm[:, None, :], axis=-1)  # noqa: E731
    h = np.take_along_axis(take(h), perm[:, :, None], axis=-2)
    hinv = _upper_inverse_cholesky(h, damp)
    q = _round_columns(take(w), hinv, take(scale), take(zero_point), qmin, qmax, block_size)
    out = np.empty_like(q)
    np.put_along_axis(out, perm[:, None, :], q, axis=-1)
    return out if batched else out[0]


def reconstruction_error(w, wq, h):
    """`||W X - Q X||^2 / ||W X||^2` from the Hessian `h = 2 X X^T / n` (batched or not); 0 for a zero output."""
    w, wq, h = (np.asarray(a, np.float64) for a in (w, wq, h))
    d = w - wq
    num, den = float(np.sum((d @ h) * d)), float(np.sum((w @ h) * w))
    return num / den if den > 0 else 0.0


# Layouts: a kernel as (B, rows, cols) matrices and the layer's inputs as (B, n, cols) ---------
@dataclasses.dataclass
class _Layout:
    to_matrix: object    # kernel-shaped numpy array -> (B, rows, cols)
    from_matrix: object  # (B, rows, cols) -> kernel shape
    patches: object      # input tensor (a few samples) -> (B, n, cols) tensor


def _dense_layout(shape):
    if len(shape) != 2:
        return None, f"a kernel of shape {tuple(shape)}"
    return _Layout(lambda a: a.T[None], lambda m: m[0].T,
                   lambda x: ops.reshape(x, (1, -1, shape[0]))), None


def _einsum_layout(layer, shape, rank):
    equation = layer.equation.replace(" ", "")
    inputs, out = equation.split("->")
    a, k = inputs.split(",")
    if "." in k or "." in out and "." not in a:
        return None, f"an ellipsis in the kernel's subscripts ({equation})"
    if "..." in a:
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
        filler = "".join(free[:rank - (len(a) - 3)])
        a, out = a.replace("...", filler), out.replace("...", filler)
    if len(a) != rank:
        return None, f"an equation ({equation}) that does not fit an input of rank {rank}"
    contract = [c for c in k if c in a and c not in out]
    kept = [c for c in k if c not in a]
    if len(contract) + len(kept) != len(k) or any(c not in k and c not in out for c in a):
        return None, f"an equation ({equation}) with axes that are neither input features nor outputs"
    kperm = [k.index(c) for c in kept + contract]
    mshape = [shape[i] for i in kperm]
    rows, cols = int(np.prod(mshape[:len(kept)])), int(np.prod(mshape[len(kept):]))
    xperm = [a.index(c) for c in a if c not in contract] + [a.index(c) for c in contract]
    inverse = np.argsort(kperm)
    return _Layout(lambda w: np.transpose(w, kperm).reshape(1, rows, cols),
                   lambda m: np.transpose(m.reshape(mshape), inverse),
                   lambda x: ops.reshape(ops.transpose(x, xperm), (1, -1, cols))), None


def _im2col(x, kernel_size, strides, dilation, padding):
    """`(n, prod(kernel_size) * channels)` patches of a channels_last input, ordered as the kernel's
    `(*kernel_size, channels)` flattened row-major: what each output position of the convolution reads."""
    spatial = x.shape[1:-1]
    pads, outs = [(0, 0)], []
    for n, k, s, d in zip(spatial, kernel_size, strides, dilation):
        eff = (k - 1) * d + 1
        if padding == "valid":
            out, pad = (n - eff) // s + 1, (0, 0)
        elif padding == "causal":
            out, pad = (n - 1) // s + 1, (eff - 1, 0)
        else:  # same
            out = -(-n // s)
            total = max((out - 1) * s + eff - n, 0)
            pad = (total // 2, total - total // 2)
        pads.append(pad)
        outs.append(out)
    x = ops.pad(x, pads + [(0, 0)])
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        index = (slice(None),) + tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, m, s in zip(offsets, dilation, outs, strides))
        taps.append(x[index])
    return ops.reshape(ops.stack(taps, axis=-2), (-1, len(taps) * x.shape[-1]))


def _conv_args(layer):
    return tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate), layer.padding


def _conv_layout(layer, shape):
    if getattr(layer, "groups", 1) != 1:
        return None, f"a grouped convolution (groups={layer.groups})"
    cout = shape[-1]
    args = _conv_args(layer)
    return _Layout(lambda a: a.reshape(-1, cout).T[None], lambda m: m[0].T.reshape(shape),
                   lambda x: _im2col(x, *args)[None]), None


def _depthwise_layout(layer, shape):
    taps, channels, mult = int(np.prod(shape[:-2])), shape[-2], shape[-1]
    args = _conv_args(layer)

    def patches(x):
        p = ops.reshape(_im2col(x, *args), (-1, taps, channels))
        return ops.transpose(p, (2, 0, 1))

    return _Layout(lambda a: a.reshape(taps, channels, mult).transpose(1, 2, 0),
                   lambda m: m.transpose(2, 0, 1).reshape(shape), patches), None


def _layout(wrapper, shape, rank):
    """`(_Layout, None)` for a supported layer, else `(None, reason)`."""
    layer = wrapper.layer
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return None, "channels_first"
    if type(layer) is L.Dense:
        return _dense_layout(shape)
    if type(layer) is L.EinsumDense:
        return _einsum_layout(layer, shape, rank)
    if type(layer) in _CONV:
        return _conv_layout(layer, shape)
    if type(layer) in _DEPTHWISE:
        return _depthwise_layout(layer, shape)
    return None, f"GPTQ does not handle {type(layer).__name__} layers"


def _hessian(layout, x, batch_size):
    """`2 X X^T / n` (numpy float64, `(B, cols, cols)`) of the layer's inputs `x`, in chunks of samples."""
    total, count = None, 0
    for start in range(0, int(x.shape[0]), batch_size):
        p = ops.cast(layout.patches(x[start:start + batch_size]), "float32")
        part = ops.matmul(ops.transpose(p, (0, 2, 1)), p)
        total = part if total is None else ops.add(total, part)
        count += int(p.shape[1])
    return 2.0 * np.asarray(ops.convert_to_numpy(total), np.float64) / max(count, 1)


def layer_hessian(wrapper, x, batch_size=64):
    """The Hessian `2 X X^T / n` GPTQ uses for a wrapper's kernel, on the layer inputs `x`.

    Args:
        wrapper: A frozen `kq.QuantizeWrapper` of a supported layer.
        x: The wrapped layer's inputs (a batch).
        batch_size: Samples per chunk of the accumulation.

    Returns:
        A float64 array `(B, cols, cols)`: B is 1, or a depthwise layer's
        channels; cols the inputs of one output, in the kernel's flattened
        order (a convolution's `(kh, kw, in)` row-major).

    Raises:
        UnsupportedLayerError: A layer GPTQ does not handle.

    Example:

    >>> h = layer_hessian(qmodel.get_layer("conv"), x_conv_inputs)  # doctest: +SKIP
    """
    weight = grid_weight(wrapper)
    x = ops.convert_to_tensor(x)
    layout, reason = (None, "it quantizes no single kernel") if weight is None else _layout(
        wrapper, weight.values.shape, len(x.shape))
    if layout is None:
        raise UnsupportedLayerError(wrapper.name, type(wrapper.layer).__name__, reason)
    return _hessian(layout, x, check_int("batch_size", batch_size))


# The model walk --------------------------------------------------------------------------------
def _round_matrix(name, layer_type, spec, values, scale, zero_point, layout, x, options):
    """GPTQ of one kernel (numpy, kernel-shaped, with its grid) on the layer inputs `x`:
    `(GPTQLayer, chosen integers in the kernel's shape)`."""
    start = time.perf_counter()
    h = _hessian(layout, x, options["batch_size"])
    w, scale, zp = (layout.to_matrix(a) for a in (values, scale, zero_point))
    q = gptq_integers(w, h, scale, zp, spec.qmin, spec.qmax, options["block_size"], options["damp"],
                      options["act_order"])
    nearest = np.clip(np.floor(w / scale + 0.5) + zp, spec.qmin, spec.qmax)
    dequant = lambda ints: (ints - zp) * scale  # noqa: E731
    return GPTQLayer(
        name=name, layer_type=layer_type, bits=spec.bits, granularity=spec.granularity, columns=int(w.shape[-1]),
        error=reconstruction_error(w, dequant(q), h), nearest_error=reconstruction_error(w, dequant(nearest), h),
        changed=float(np.mean(q != nearest)), seconds=time.perf_counter() - start), layout.from_matrix(q)


def _round_layer(wrapper, x, options):
    """GPTQ on one wrapper given its inputs `x`: `(GPTQLayer, None)`, or `(None, reason)`."""
    weight = grid_weight(wrapper)
    if weight is None:
        return None, "it quantizes no single kernel"
    layout, reason = _layout(wrapper, weight.values.shape, len(x.shape))
    if layout is None:
        return None, reason
    row, chosen = _round_matrix(wrapper.name, type(wrapper.layer).__name__, weight.spec, weight.values,
                                weight.scale, weight.zero_point, layout, x, options)
    set_grid_weight(wrapper, weight, weight.dequantize(chosen))
    return row, None


def _projection_inputs(op, names, args, kwargs):
    """The inputs each of the attention's projections `names` reads, from one call of `op`."""
    seen, originals = {}, {}
    for name in names:
        dense = getattr(op, name)
        originals[name] = dense.call

        def hook(inputs, *a, _name=name, **kw):
            seen[_name] = inputs
            return originals[_name](inputs, *a, **kw)

        dense.call = hook
    try:
        op(*args, **kwargs)
    finally:
        for name in names:
            getattr(op, name).call = originals[name]
    return seen


def _round_attention(op, args, kwargs, options):
    """GPTQ of a weight-only attention's four kernels on their frozen per-tensor grids: the query, key and
    value projections first, then the output projection on the attention's output from them."""
    rows, spec = [], op.weight_spec
    for stage in (("query_dense", "key_dense", "value_dense"), ("output_dense",)):
        inputs = _projection_inputs(op, stage, args, kwargs)
        for name in stage:
            dense = getattr(op, name)
            values = np.asarray(ops.convert_to_numpy(dense.kernel), np.float32)
            layout, reason = _einsum_layout(dense, values.shape, len(inputs[name].shape))
            if layout is None:
                raise ConfigError("layers", op.name, f"its {name} has {reason}", layer=op.name)
            scale, zero_point = op.kernel_qparams["_" + name]
            row, chosen = _round_matrix(f"{op.name}/{name}", "EinsumDense (attention)", spec, values,
                                        np.full(values.shape, scale), np.full(values.shape, zero_point), layout,
                                        inputs[name], options)
            dense.kernel.assign(ops.cast((chosen - zero_point) * scale, dense.kernel.dtype))
            rows.append(row)
    return rows


def _is_target(op):
    return isinstance(op, (QuantizeWrapper, WeightOnlyMultiHeadAttention))


def _skip_reason(op):
    if isinstance(op, WeightOnlyMultiHeadAttention):
        if len(op.kernel_qparams) != 4:
            return "a weight-only attention whose kernels are not frozen (QAT)"
    elif op.stage != "frozen":
        return "a QAT wrapper (GPTQ rounds post-training, frozen wrappers)"
    if len(graph_lib.calls(op)) != 1:
        return "called more than once"
    return None


def _targets(qgraph, names):
    """`(layers to round, skipped)` in graph order: the frozen wrappers and weight-only attentions; `names`
    (None: all) selects them."""
    if not any(_is_target(op) for op in graph_lib.operations(qgraph)):
        raise ConfigError("qmodel", getattr(qgraph, "name", None), "it holds no kq.QuantizeWrapper; quantize it "
                          "first with kq.quantize_model(..., mode='ptq')")
    return select_layers(qgraph, names, (QuantizeWrapper, WeightOnlyMultiHeadAttention), _skip_reason)


def _check_options(block_size, damp, act_order, batch_size):
    block_size = check_int("block_size", block_size)
    batch_size = check_int("batch_size", batch_size)
    if not is_number(damp) or not 0 <= float(damp) <= 1:
        raise ConfigError("damp", damp, "damp must be a number in [0, 1] (a fraction of the Hessian's mean "
                          "diagonal)")
    if not isinstance(act_order, (bool, np.bool_)):
        raise ConfigError("act_order", act_order, "act_order must be True or False")
    return {"block_size": block_size, "damp": float(damp), "act_order": bool(act_order), "batch_size": batch_size}


def gptq(qmodel, data, max_samples=256, batch_size=64, block_size=128, damp=0.01, act_order=True, layers=None,
         progress=True):
    """GPTQ rounding of a post-training quantized model's kernels, in place.

    For each frozen `kq.QuantizeWrapper` in graph order, the Hessian of the
    layer's inputs (from the already rounded layers before it, on `data`) is
    measured and the kernel is rounded column by column onto the wrapper's
    fixed grid, each column's error moved onto the columns not yet rounded
    (Frantar et al. 2022). The scales and zero points are kept; the chosen
    integers are what the wrapper, `kq.export_tflite` and `kq.export_onnx`
    then use. Memory: the tensors alive at one point of the graph, for
    `max_samples` samples, and one Hessian. The kernels of a weight-only
    attention (`kq.layers.WeightOnlyMultiHeadAttention`) are rounded on their
    per-tensor grids as well (report rows `"<attention>/query_dense"`, ...).

    Args:
        qmodel: A PTQ model from `kq.quantize_model(..., mode="ptq")`
            (Functional or Sequential); its kernels are changed.
        data: Calibration inputs as the model takes them (an array with the
            batch on axis 0, or a list of arrays for several inputs).
        max_samples: The first this many samples are used (None: all).
        batch_size: Samples per chunk of the Hessian accumulation.
        block_size: Columns per lazy block update (the result does not depend on it,
            up to float rounding).
        damp: Fraction of the Hessian's mean diagonal added to its diagonal.
        act_order: Round the columns with the largest `diag(H)` first.
        layers: Names of the wrapped layers (and weight-only attentions) to
            round (None: all of them).
        progress: Show a progress bar over the layers (on stderr).

    Returns:
        A `GPTQReport`: per rounded layer the relative output error of GPTQ and
        of round-to-nearest on the calibration inputs, and the skipped layers
        with their reasons.

    Raises:
        ConfigError: A model that is not Functional / Sequential or holds no
            wrapper, unknown `layers`, bad `max_samples` / `batch_size` /
            `block_size` / `damp` / `act_order`.
        ShapeMismatchError: `data` does not fit the model's inputs.
        NoDataError: `data` holds no sample.

    Example:

    >>> qmodel = kq.quantize_model(model, kq.QuantConfig.w4a8(), calibration=result)  # doctest: +SKIP
    >>> print(kq.ptq.gptq(qmodel, x_calib[:256]))                                     # doctest: +SKIP
    """
    start = time.perf_counter()
    qgraph = graph_lib.require_functional(qmodel, "qmodel")
    options = _check_options(block_size, damp, act_order, batch_size)
    targets, skipped = _targets(qgraph, layers)
    xs = runtime.graph_samples(qgraph, data, max_samples, "gptq")
    index = {id(w): w for w in targets}
    done = []
    bar = ProgressBar(len(targets), "gptq", enabled=bool(progress))

    def call_fn(op, *args, **kwargs):
        w = index.get(id(op))
        if isinstance(w, WeightOnlyMultiHeadAttention):
            done.extend(_round_attention(w, args, kwargs, options))
            bar.update(label=f"gptq {w.name}")
        elif w is not None:
            row, reason = _round_layer(w, args[0], options)
            if row is None:
                skipped.append((w.name, reason))
            else:
                done.append(row)
            bar.update(label=f"gptq {w.name}")
        return op(*args, **kwargs)

    try:
        with keras.name_scope("gptq"):
            graph_lib.run_releasing(qgraph, [ops.convert_to_tensor(x) for x in xs], call_fn)
    finally:
        bar.close()
    return GPTQReport(layers=tuple(done), skipped=tuple(skipped), num_samples=int(xs[0].shape[0]),
                      seconds=time.perf_counter() - start)
