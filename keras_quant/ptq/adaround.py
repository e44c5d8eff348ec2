"""`adaround(qmodel, data)`: adaptive rounding of a post-training model's weights (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding each weight to the nearest point of its grid is not the best choice
for the layer's output: the errors of a layer's weights add up over its
inputs. AdaRound chooses, per weight, rounding down or up so that the layer's
output on real inputs stays close to the float layer's. Per layer it learns a
continuous variable `V` (one per weight) with the soft-quantized kernel

    W~(V) = s * clip(floor(W / s) + h(V), qmin - z, qmax - z),
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)     (rectified sigmoid, zeta=1.1, gamma=-0.1),

minimising `||W X - W~(V) X||^2 + reg_weight * sum(1 - |2 h(V) - 1|^beta)`
with Adam, `beta` annealed from `beta_range[0]` to `beta_range[1]` after a
warm-up without the regulariser, then rounds `h(V) >= 0.5` up. `V` starts where
`h(V)` equals the fractional part `W / s - floor(W / s)` (the paper's
initialisation), so the first rounding is the nearest one. The scales and zero
points are the wrapper's own (per tensor, per channel or per group): only the
integers change, and `kq.ptq.weights.set_grid_weight` writes them back so the
wrapper's nearest rounding and the TFLite / ONNX exports reproduce them.

The loss is the layer's *linear* output (before its activation), with the
float kernel on the same quantized input as the target (the paper's
asymmetric reconstruction, without the activation). The paper also
describes a variant with the activation inside the loss; it is not used here
because a frozen wrapper may run its activation in another form (an integer
hard-swish, a requantized sigmoid), and because the linear loss needs only one
convolution per step, `f(X; W - W~)`, the layer being linear in its kernel.
Layers are treated in graph order, each one seeing its real inputs from the
already rounded layers before it.

Example:

>>> qmodel = kq.quantize_model(model, config, calibration=result)          # doctest: +SKIP
>>> report = kq.ptq.adaround(qmodel, x_calib[:1024], time_budget=300)       # doctest: +SKIP
>>> print(report)                                                           # doctest: +SKIP
"""

import dataclasses
import math
import time
from typing import Optional, Tuple

import keras
import numpy as np
from keras import ops

from keras_quant import graph as graph_lib
from keras_quant import runtime
from keras_quant.errors import ConfigError, check_int, is_number
from keras_quant.formatting import text_table
from keras_quant.layers.rules import without_activation
from keras_quant.layers.wrapper import QuantizeWrapper
from keras_quant.progress import ProgressBar
from keras_quant.ptq.common import report_text, select_layers
from keras_quant.ptq.weights import grid_weight, set_grid_weight

__all__ = ["AdaRoundLayer", "AdaRoundReport", "LayerRounder", "adaround", "rectified_sigmoid", "initial_v",
           "rounding_regularizer", "beta_schedule", "SUPPORTED_LAYERS"]

GAMMA, ZETA = -0.1, 1.1
SUPPORTED_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                    keras.layers.Conv2DTranspose)
_TIMED_STEPS = 8  # steps timed (after the compiling one) before a time budget fixes a layer's iterations
_EVAL_BATCH = 256


# The paper's functions -------------------------------------------------------------------------
def rectified_sigmoid(v):
    """`h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)` (keras.ops; eq. 23 of the paper)."""
    return ops.clip(ops.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(frac):
    """The `V` (numpy float32) whose rectified sigmoid is `frac` (in [0, 1)): the inverse of `h` inside (0, 1)."""
    p = (np.asarray(frac, np.float64) - GAMMA) / (ZETA - GAMMA)
    return np.log(p / (1.0 - p)).astype(np.float32)


def rounding_regularizer(h, beta):
    """`sum(1 - |2 h - 1|^beta)` (keras.ops; eq. 24): 0 once every `h` is 0 or 1."""
    return ops.sum(1.0 - ops.power(ops.abs(2.0 * h - 1.0), beta))


def beta_schedule(step, total, beta_range=(20.0, 2.0), warmup=0.2):
    """`(beta, regularised)` at `step` of `total`: no regulariser during the first `warmup` fraction, then
    `beta` decays from `beta_range[0]` to `beta_range[1]` on a half cosine (AIMET's schedule)."""
    start, end = float(beta_range[0]), float(beta_range[1])
    warm = warmup * total
    if step < warm:
        return start, False
    rel = (step - warm) / max(total - warm, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(min(rel, 1.0) * math.pi)), True


# The report ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdaRoundLayer:
    """One rounded layer.

    Attributes:
        name: The wrapper's name.
        kind: The wrapped layer's class name.
        weights: Weights rounded.
        iterations: Adam steps run.
        nearest_error: Reconstruction error of nearest rounding: the mean over samples (and positions) of
            `sum over output channels (W X - W_q X)^2`, on the layer's stored inputs.
        adaround_error: The same for the integers written.
        changed: Fraction of the weights whose integer differs from the nearest one.
        seconds: Wall time spent on the layer.
        kept_nearest: Whether the learned rounding was worse than nearest on the stored inputs and nearest
            rounding was kept.
    """

    name: str
    kind: str
    weights: int
    iterations: int
    nearest_error: float
    adaround_error: float
    changed: float
    seconds: float
    kept_nearest: bool = False


@dataclasses.dataclass(frozen=True)
class AdaRoundReport:
    """What `adaround` did.

    Attributes:
        layers: An `AdaRoundLayer` per rounded layer, in graph order.
        skipped: `(layer, reason)` for wrapped layers left with nearest rounding.
        num_samples: Samples each layer's loss was measured on.
        seconds: Wall time of the whole run.
        time_budget: The budget asked for (None: none).
    """

    layers: Tuple[AdaRoundLayer, ...]
    skipped: Tuple[Tuple[str, str], ...]
    num_samples: int
    seconds: float
    time_budget: Optional[float] = None

    def table(self) -> str:
        """The report as a plain-text table, one row per layer."""
        rows = [{"layer": r.name, "type": r.kind, "weights": r.weights, "iterations": r.iterations,
                 "nearest err": r.nearest_error, "adaround err": r.adaround_error,
                 "err ratio": r.adaround_error / r.nearest_error if r.nearest_error > 0 else 1.0,
                 "changed": r.changed, "seconds": r.seconds, "note": "kept nearest" if r.kept_nearest else ""}
                for r in self.layers]
        return text_table(rows)

    def __str__(self):
        budget = "" if self.time_budget is None else f" (budget {self.time_budget:g} s)"
        return report_text(f"adaround on {self.num_samples} samples: {len(self.layers)} layers rounded, "
                           f"{len(self.skipped)} skipped, {self.seconds:.1f} s{budget}",
                           self.layers and self.table(), self.skipped)


# Layer selection -------------------------------------------------------------------------------
def _roundable(wrapper):
    """Why a wrapper's kernel is not rounded, or None."""
    if wrapper.stage != "frozen":
        return "a QAT wrapper (AdaRound is for post-training models)"
    if not isinstance(wrapper.layer, SUPPORTED_LAYERS):
        return f"a {type(wrapper.layer).__name__} (AdaRound treats Dense, Conv1D, Conv2D, DepthwiseConv2D, " \
               f"Conv2DTranspose)"
    if len(graph_lib.calls(wrapper)) != 1:
        return "called more than once"
    if grid_weight(wrapper) is None:
        return "no single quantized kernel"
    return None


def _cost(wrapper):
    """A layer's relative cost per sample of one step: its multiply-adds, its elementwise work on `V`."""
    size = int(np.prod(grid_weight(wrapper).values.shape))
    shape = [d for d in wrapper.output.shape[1:] if d is not None]
    positions = max(int(np.prod(shape)) // max(int(shape[-1]) if shape else 1, 1), 1)
    return size * positions + 20 * size + 20000


# One layer -------------------------------------------------------------------------------------
def _linear_fn(wrapper, kernel_name):
    """`f(x, kernel) -> the wrapped layer's linear output without bias` (the wrapper's own call with the
    kernel, and a zero bias, in place of its variables)."""
    layer = wrapper.layer
    has_bias = getattr(layer, "use_bias", False)

    def run(x, kernel):
        overrides = {kernel_name: ops.cast(kernel, getattr(layer, kernel_name).dtype)}
        if has_bias:
            overrides["bias"] = ops.zeros(layer.bias.shape, layer.bias.dtype)
        with without_activation(layer):
            return wrapper.run_with_weights(x, overrides)

    return run


def _channels(wrapper):
    return int(wrapper.output.shape[1 if getattr(wrapper.layer, "data_format", None) == "channels_first" else -1])


class LayerRounder(keras.Model):
    """AdaRound's model of one layer: it holds `V` and adds the loss of a batch with `add_loss`, so Keras' own
    `train_on_batch` / `fit` give a backend-agnostic step.

    Its input is `[x, control]`: a batch of the layer's inputs and a `(batch, 2)` array whose first row
    holds `beta` and the regulariser's weight (0 during warm-up). The loss is
    `reconstruction(x, W~(h(V))) + control[0, 1] * rounding_regularizer(h(V), control[0, 0])`; the
    output is the reconstruction term.

    Args:
        wrapper: A frozen `kq.QuantizeWrapper` of a Dense, Conv1D, Conv2D, DepthwiseConv2D or Conv2DTranspose.
        grid: Its kernel on the grid (default: `kq.ptq.weights.grid_weight(wrapper)`).

    Example:

    >>> rounder = LayerRounder(qmodel.get_layer("dense"))                    # doctest: +SKIP
    >>> rounder.compile(optimizer=keras.optimizers.Adam(1e-2))                # doctest: +SKIP
    >>> rounder.train_on_batch([x, np.tile([[20.0, 0.01]], (len(x), 1))])     # doctest: +SKIP
    """

    def __init__(self, wrapper, grid=None):
        super().__init__(name=f"adaround_{wrapper.name}")
        grid = grid_weight(wrapper) if grid is None else grid
        self.grid = grid
        self._linear = _linear_fn(wrapper, grid.name)
        self._channels = float(_channels(wrapper))
        base, frac, lo, hi = _grid_parts(grid)
        shape = grid.values.shape
        const = lambda name, value: self.add_weight(  # noqa: E731
            shape=shape, initializer=keras.initializers.Constant(value), trainable=False, name=name)
        self.v = self.add_weight(shape=shape, initializer=keras.initializers.Constant(initial_v(frac)), name="v")
        self.target = const("w", grid.values)
        self.scale = const("scale", grid.scale)
        self.base = const("base", base)
        self.lo = const("lo", lo)
        self.hi = const("hi", hi)

    def soft_kernel(self, h):
        """`W~ = s * clip(floor(W / s) + h, qmin - z, qmax - z)` (the grid's values relative to the zero point)."""
        return self.scale.value * ops.clip(self.base.value + h, self.lo.value, self.hi.value)

    def reconstruction(self, x, kernel):
        """Mean over samples and positions of the sum over output channels of `f(x; W - kernel)^2`."""
        y = self._linear(x, ops.subtract(self.target.value, kernel))
        return ops.mean(ops.square(ops.cast(y, "float32"))) * self._channels

    def call(self, inputs):
        x, control = inputs
        h = rectified_sigmoid(self.v.value)
        recon = self.reconstruction(x, self.soft_kernel(h))
        self.add_loss(recon + control[0, 1] * rounding_regularizer(h, control[0, 0]))
        return recon


def _grid_parts(grid):
    """`(base, frac, lo, hi)` of a `GridWeight` (numpy): `W / s = base + frac`, the integers relative to the
    zero point clipped to `[lo, hi]` (a channel whose scale is 0 has base and frac 0)."""
    w, s = grid.values, grid.scale
    ratio = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
    base = np.floor(ratio)
    return base, ratio - base, grid.spec.qmin - grid.zero_point, grid.spec.qmax - grid.zero_point


def _error(rounder, x, grid, q):
    """Reconstruction error of the integers `q` on all of `x` (in batches)."""
    kernel = ops.convert_to_tensor(grid.dequantize(q))
    total = 0.0
    for start in range(0, len(x), _EVAL_BATCH):
        chunk = ops.convert_to_tensor(x[start:start + _EVAL_BATCH])
        total += float(ops.convert_to_numpy(rounder.reconstruction(chunk, kernel))) * int(chunk.shape[0])
    return total / len(x)


@dataclasses.dataclass(frozen=True)
class _Options:
    iterations: int
    batch_size: int
    reg_weight: float
    beta_range: Tuple[float, float]
    warmup: float
    learning_rate: float


def _optimise(rounder, x, opts, deadline, rng):
    """Adam steps on random batches of `x`; `(steps run, seconds of the steps after the compiling one)`.

    With a `deadline`, the first steps are timed and the number of steps (the length of the beta schedule)
    is what fits before it; the loop also stops at the deadline.
    """
    n, total = len(x), opts.iterations
    control = np.zeros((min(opts.batch_size, n), 2), np.float32)

    def step(i):
        beta, regularised = beta_schedule(i, total, opts.beta_range, opts.warmup)
        control[:, 0], control[:, 1] = beta, opts.reg_weight if regularised else 0.0
        rounder.train_on_batch([x[rng.integers(0, n, len(control))], control])

    step(0)  # traces and compiles the step
    done, started = 1, time.perf_counter()
    if deadline is not None and done < total:
        if started >= deadline:
            return done, 0.0
        timed = min(_TIMED_STEPS, total - done)
        for i in range(done, done + timed):
            step(i)
        done += timed
        per_step = (time.perf_counter() - started) / timed
        total = max(done, min(total, done + int((deadline - time.perf_counter()) / per_step)))
    while done < total and (deadline is None or time.perf_counter() < deadline):
        step(done)
        done += 1
    return done, time.perf_counter() - started


def _round_layer(wrapper, x, opts, deadline, rng):
    """AdaRound one wrapper on its inputs `x` (numpy) and write the integers; `(AdaRoundLayer, seconds of
    the steps after the compiling one)`."""
    start = time.perf_counter()
    rounder = LayerRounder(wrapper)
    grid = rounder.grid
    rounder.compile(optimizer=keras.optimizers.Adam(learning_rate=opts.learning_rate))
    iterations, step_seconds = _optimise(rounder, x, opts, deadline, rng)
    base, _, lo, hi = _grid_parts(grid)
    h = np.asarray(ops.convert_to_numpy(rectified_sigmoid(rounder.v.value)))
    learned = np.clip(base + (h >= 0.5), lo, hi) + grid.zero_point
    nearest = grid.nearest()
    nearest_error, learned_error = _error(rounder, x, grid, nearest), _error(rounder, x, grid, learned)
    kept = learned_error > nearest_error
    q = nearest if kept else learned
    set_grid_weight(wrapper, grid, grid.dequantize(q))
    seconds = time.perf_counter() - start
    result = AdaRoundLayer(name=wrapper.name, kind=type(wrapper.layer).__name__, weights=int(q.size),
                           iterations=int(iterations), nearest_error=nearest_error,
                           adaround_error=min(learned_error, nearest_error), changed=float(np.mean(q != nearest)),
                           seconds=seconds, kept_nearest=bool(kept))
    return result, step_seconds


class _Budget:
    """Spreads `seconds` over the layers in proportion to their estimated cost per step, less the time
    outside the steps (tracing, measuring, the walk between layers) measured so far per layer, reserved for
    this layer and each one still to come."""

    def __init__(self, seconds, costs, start):
        self.seconds, self.costs, self.start = seconds, [float(c) for c in costs], start
        self.step_seconds = 0.0

    def deadline(self, i):
        """None (no budget), False (spent: skip the layer), or the time at which layer `i` must stop."""
        if self.seconds is None:
            return None
        now = time.perf_counter()
        left = self.start + self.seconds - now
        if left <= 0:
            return False
        overhead = (now - self.start - self.step_seconds) / i if i else 0.0
        reserve = overhead * (len(self.costs) - i)
        return now + max(left - reserve, 0.0) * self.costs[i] / sum(self.costs[i:])

    def record(self, step_seconds):
        self.step_seconds += step_seconds


class _Done(Exception):
    """Ends the walk once the last layer to round is rounded (the rest of the graph is not needed)."""


def _options(iterations, batch_size, reg_weight, beta_range, warmup, learning_rate, time_budget):
    iterations = check_int("iterations", iterations)
    batch_size = check_int("batch_size", batch_size)
    for field, value in (("reg_weight", reg_weight), ("learning_rate", learning_rate)):
        if not is_number(value) or not value >= 0 or (field == "learning_rate" and value == 0):
            raise ConfigError(field, value, f"{field} must be a number >= 0" + (" and > 0" if field ==
                                                                                  "learning_rate" else ""))
    if (not isinstance(beta_range, (tuple, list)) or len(beta_range) != 2
            or not all(is_number(b) and b > 0 for b in beta_range)):
        raise ConfigError("beta_range", beta_range, "beta_range must be two numbers > 0 (start, end)")
    if not is_number(warmup) or not 0 <= warmup < 1:
        raise ConfigError("warmup", warmup, "warmup must be a fraction in [0, 1)")
    if time_budget is not None and (not is_number(time_budget) or not time_budget > 0):
        raise ConfigError("time_budget", time_budget, "time_budget must be None or a number of seconds > 0")
    return _Options(iterations, batch_size, float(reg_weight), (float(beta_range[0]), float(beta_range[1])),
                    float(warmup), float(learning_rate))


def _walk(qgraph, xs, targets, skipped, opts, budget, bar, rng):
    """Round `targets` in graph order, each on its inputs from the layers before it; the `AdaRoundLayer`s."""
    index, results = {id(w): i for i, w in enumerate(targets)}, []

    def call_fn(op, *args, **kwargs):
        i = index.get(id(op))
        if i is not None:
            deadline = budget.deadline(i)
            if deadline is False:
                skipped.append((op.name, "the time budget was spent before it (nearest rounding kept)"))
            else:
                x = np.asarray(ops.convert_to_numpy(args[0]), np.float32)
                result, step_seconds = _round_layer(op, x, opts, deadline, rng)
                results.append(result)
                budget.record(step_seconds)
            bar.update(label=f"adaround {op.name}")
            if i == len(targets) - 1:
                raise _Done()
        return op(*args, **kwargs)

    if targets:
        try:
            with keras.name_scope("adaround"):
                graph_lib.run_releasing(qgraph, [ops.convert_to_tensor(x) for x in xs], call_fn)
        except _Done:
            pass
    return results


def adaround(qmodel, data, max_samples=1024, batch_size=32, iterations=2000, reg_weight=0.01, beta_range=(20, 2),
             warmup=0.2, learning_rate=1e-2, time_budget=None, layers=None, progress=True, seed=0):
    """AdaRound the kernels of a post-training quantized model, in place.

    For each frozen `kq.QuantizeWrapper` of a Dense, Conv1D, Conv2D,
    DepthwiseConv2D or Conv2DTranspose, in graph order, on its real inputs
    (from the already rounded layers before it; all samples at once, so
    memory is the tensors alive at one point of the graph for `max_samples`
    samples): learn up-or-down rounding of each weight on the wrapper's fixed
    grid (see the module's description), then write the integers into the
    layer. Where the learned rounding reconstructs the layer's output worse
    than nearest rounding on these samples, nearest rounding is kept. Biases,
    scales and activation ranges are not changed.

    Args:
        qmodel: A PTQ model from `kq.quantize_model(..., mode="ptq")` (Functional or Sequential).
        data: Calibration inputs as the model takes them (an array with the batch on axis 0, or a list).
        max_samples: The first this many samples are used (None: all).
        batch_size: Samples per Adam step.
        iterations: Adam steps per layer (fewer where `time_budget` runs out).
        reg_weight: Weight of the rounding regulariser (the paper's lambda).
        beta_range: `(start, end)` of the regulariser's annealed exponent.
        warmup: Fraction of the steps run without the regulariser.
        learning_rate: Adam's learning rate on `V`.
        time_budget: Seconds for the whole model (None: no limit), spread over
            the layers in proportion to their cost per step; a layer that finds
            it spent keeps nearest rounding. The budget may be overrun by one
            layer's setup (tracing its step and measuring its errors).
        layers: Names of the wrappers to treat (None: all that can be).
        progress: Draw a progress bar over the layers (stderr).
        seed: Seed of the batch sampling.

    Returns:
        An `AdaRoundReport`: per layer the steps run, the reconstruction
        errors of nearest rounding and of AdaRound, the fraction of weights
        rounded differently, the time; and the wrappers skipped and why.

    Raises:
        ConfigError: A model that is not Functional / Sequential, a bad argument, an unknown layer name.
        ShapeMismatchError: `data` does not fit the model's inputs.
        NoDataError: `data` holds no sample.

    Example:

    >>> cb = kq.CalibrationCallback(); model.predict(x_calib, callbacks=[cb])    # doctest: +SKIP
    >>> qmodel = kq.quantize_model(model, config, calibration=cb.result)          # doctest: +SKIP
    >>> print(kq.ptq.adaround(qmodel, x_calib, time_budget=120))                  # doctest: +SKIP
    """
    start = time.perf_counter()
    opts = _options(iterations, batch_size, reg_weight, beta_range, warmup, learning_rate, time_budget)
    qgraph = graph_lib.require_functional(qmodel, "qmodel")
    xs = runtime.graph_samples(qgraph, data, max_samples, "adaround")
    targets, skipped = select_layers(qgraph, layers, QuantizeWrapper, _roundable)
    budget = _Budget(time_budget, [_cost(w) for w in targets], start)
    with ProgressBar(len(targets), "adaround", enabled=progress) as bar:
        results = _walk(qgraph, xs, targets, skipped, opts, budget, bar, np.random.default_rng(seed))
    return AdaRoundReport(layers=tuple(results), skipped=tuple(skipped), num_samples=int(xs[0].shape[0]),
                          seconds=time.perf_counter() - start,
                          time_budget=None if time_budget is None else float(time_budget))
