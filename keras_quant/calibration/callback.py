"""`CalibrationCallback`: activation statistics gathered in Keras' own step.

Add the callback to an ordinary `model.fit`, `model.evaluate` or
`model.predict` call. While that call runs, the callback

1. hooks the `call` of every layer the config quantizes (leaf layers of
   Sequential, Functional, subclassed and nested models alike) so that, inside
   the compiled step, each output is also folded into a `LayerCollector`
   (fixed-size statistics and the range observer of the layer's spec); for a
   layer with its own softmax / sigmoid / tanh / ... activation (an op of its
   own in TFLite), the activation's input too, keyed `"<layer>:preactivation"`;
2. wraps the model's `train_step` / `test_step` / `predict_step` so the step
   picks the samples to observe (the sampler and the `max_samples` budget),
   observes the model inputs, and switches the hooks on only for the step of
   the call it calibrates: validation inside `fit` is not observed;
3. rebuilds the model's step function so the observers are part of the one
   compiled graph Keras runs anyway (`tf.function`, `jit_compile=True`):
   there is no second pass over the data and no `py_function`.

When the call ends, every hook is removed and the model's step functions are
put back as they were, so weights, outputs and later calls are unchanged.
Statistics accumulate across calls until `reset()`; `result` reads them.

Under `MirroredStrategy` / `MultiWorkerMirroredStrategy` every replica folds
in the whole global batch (in `predict` / `evaluate` it gathers the step's
inputs and runs the model on them, observed; in `fit` it gathers each tensor),
so every worker holds what one process computes on the same batches.

The callback needs the TensorFlow backend (it hooks TensorFlow's trainer).
The observers and collectors themselves are backend-agnostic.

Example:

>>> import keras_quant as kq
>>> cb = kq.CalibrationCallback(max_samples=1000, sampling="random", seed=0)
>>> model.predict(x_calib, callbacks=[cb])
>>> cb.result["conv2d"].max
"""

import contextlib
import functools
import threading
import time

import keras

from keras_quant.version import __version__
import keras_quant.graph as graph_lib
import keras_quant.calibration.sampling as sampling_lib
from keras_quant.calibration.compiled import gather, replica_context, trace_once
from keras_quant.calibration.detach import guard
from keras_quant.calibration.result import CalibrationResult
from keras_quant.calibration.stats import STATISTICS, LayerCollector
from keras_quant.calibration.step import SAMPLE
from keras_quant.config import QuantConfig, check_num_bins
from keras_quant.errors import ConfigError, MemoryLimitExceededError, NoDataError, check_int
from keras_quant.layers.rules import get_rule, preactivation_key, split_activation
from keras_quant.layers.walk import input_keys, leaf_layers, layer_keys

__all__ = ["CalibrationCallback"]

_STEPS = {"train": "train_step", "test": "test_step", "predict": "predict_step"}
_FUNCTIONS = {"train": "train_function", "test": "test_function", "predict": "predict_function"}
_MAKERS = {"train": "make_train_function", "test": "make_test_function", "predict": "make_predict_function"}


def _depthwise(layer, x):
    """The depthwise half of a SeparableConv1D / 2D `layer` applied to `x`."""
    return keras.ops.depthwise_conv(x, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
                                    data_format=layer.data_format, dilation_rate=layer.dilation_rate)


def _depthwise_shape(layer):
    """The shape of `_depthwise(layer, x)` for the layer's own (first) input, or None if unknown.

    Known up front, the collector is built before the step is traced: a variable made inside
    the trace makes TensorFlow trace the whole step a second time.
    """
    try:
        return tuple(_depthwise(layer, keras.KerasTensor(layer.input.shape, layer.input.dtype)).shape)
    except (AttributeError, ValueError, TypeError):  # no single input (a layer called twice), unknown shape
        return None


def _first_tensor(outputs):
    flat = keras.tree.flatten(outputs)
    return flat[0] if flat else None


def _batched(t):
    return t is not None and len(t.shape) >= 1 and "float" in str(t.dtype)


class CalibrationCallback(keras.callbacks.Callback):
    """Gathers activation statistics of every quantized layer during `fit`, `evaluate` or `predict`.

    Args:
        config: A `kq.QuantConfig` choosing which layers are observed (those
            whose activation spec is not None and whose type has a layer rule)
            and each activation's spec (its `observer` picks the range
            observer). Default `kq.QuantConfig.int8()`.
        max_samples: Stop updating after this many samples (exact), or None.
        sampling: `"all"`, `"random"`, `"systematic"`, `"stratified"`,
            `"importance"`, or a sampler object with a
            `select(inputs, labels) -> (batch,) mask` method.
        seed: Seed for the random samplers.
        sampling_options: Constructor arguments of the named sampler, e.g.
            `{"rate": 0.25}` or `{"step": 10}` or `{"num_strata": 10}`.
        num_bins: Histogram bins per layer (percentiles, outliers, range
            searches), in `[8, 2**16]` (`keras_quant.config.MAX_BINS`).
        statistics: `"full"` (every statistic: moments, sparsity,
            per-channel extremes, histogram, outliers, for every layer the
            config quantizes) or `"range"` (only what `kq.quantize_model`
            reads: the tensors where it puts activation quantizers, and only
            what each one's observer needs; the cheapest in the step).
        sample_size: The most values of a tensor's batch the moments, zero count
            and histogram read (`kq.calibration.LayerCollector`; counts and
            extremes read all). None: every statistic exact.
        memory_limit: Optional bound in bytes on the statistics' state; the
            callback raises `kq.errors.MemoryLimitExceededError` before
            creating state past it. The state is fixed-size, so the bound
            holds however many samples are streamed.
        verbose: 1 prints a progress line (samples seen, layers tracked) per
            batch; 0 is silent.

    Raises:
        ConfigError: For an invalid argument.

    Example:

    >>> cb = CalibrationCallback(config=kq.QuantConfig.int8())
    >>> model.fit(x, y, epochs=1, callbacks=[cb])
    >>> cb.result.summary()
    """

    def __init__(self, config=None, max_samples=None, sampling="all", seed=None, *, sampling_options=None,
                 num_bins=2048, statistics="full", sample_size=SAMPLE, memory_limit=None, verbose=0):
        super().__init__()
        if config is None:
            config = QuantConfig.int8()
        if not isinstance(config, QuantConfig):
            raise ConfigError("config", config, "config must be a kq.QuantConfig or None")
        if memory_limit is not None and (
            isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 1
        ):
            raise ConfigError("memory_limit", memory_limit, "memory_limit must be a positive number of bytes or None")
        if verbose not in (0, 1):
            raise ConfigError("verbose", verbose, "verbose must be 0 or 1")
        self.config = config
        self.max_samples = max_samples
        self.sampling = sampling
        self.seed = seed
        self.num_bins = check_num_bins(num_bins)
        self.statistics = statistics
        self.sample_size = check_int("sample_size", sample_size, minimum=1, allow_none=True)
        self.memory_limit = memory_limit
        self.verbose = verbose
        if statistics not in STATISTICS:
            raise ConfigError("statistics", statistics, f"statistics must be one of {STATISTICS}")
        self._sampler = sampling_lib.get(sampling, max_samples=max_samples, seed=seed, **(sampling_options or {}))
        self._budget = sampling_lib.SampleBudget(max_samples)
        self._keeps_all = max_samples is None and type(self._sampler) is sampling_lib.AllSampler
        self._collectors = {}  # key -> LayerCollector, in recording order
        self._result = None  # cb.result, until the statistics change
        self._local = threading.local()
        self._attached = None  # the mode being calibrated, while attached
        self._saved = {}
        self._patched = []
        self._patched_activations = []
        self._points = None
        self._preact_tracked = []
        self._inner_tracked = []
        self._planned = {}
        self._progbar = None
        self._model_name = None
        self._step_cache = self._compiled = None  # (its key, the calibrating step function); Keras' inside it

    # Which tensors ------------------------------------------------------------
    def _tracked_layers(self, model):
        """`[(key, layer, spec)]` for the leaf layers whose output is observed.

        With `statistics="range"` and a graph `quantize_model` can rewrite,
        only the places where it puts activation quantizers (a conv's output
        folded into BatchNorm and ReLU is not one), each with that quantizer's
        spec; otherwise every layer the config quantizes.
        """
        from keras_quant.transform.plan import activation_points  # the PTQ model's plan

        planned = activation_points(model, self.config) or {}
        points = planned if self.statistics == "range" else None
        self._points, self._planned = points, planned
        paths = {id(layer): path for path, layer in leaf_layers(model)}
        tracked = []
        for key, layer in layer_keys(model).items():
            if points:
                if key in points:
                    tracked.append((key, layer, points[key]))
                continue
            if key in planned:  # a tensor the quantized model reads (float layers entering the integer graph too)
                tracked.append((key, layer, planned[key]))
                continue
            rule = get_rule(layer)
            if rule is None or not rule.observe:
                continue
            layer_config = self.config.for_layer(layer, paths.get(id(layer)))
            if layer_config is None or layer_config.activations is None:
                continue
            tracked.append((key, layer, layer_config.activations))
        return tracked

    def _depthwise_outputs(self, model):
        """`[(key, layer, spec)]`: the depthwise output inside each planned separable convolution.

        Every separable layer of the plan, whether or not its own output is observed (with
        `statistics="range"`, one followed by BatchNormalization and ReLU has no quantizer of its own).
        """
        from keras_quant.transform.plan import SEPARABLE, separable_key

        return [(separable_key(key), layer, self._planned[separable_key(key)])
                for key, layer in layer_keys(model).items()
                if isinstance(layer, SEPARABLE) and separable_key(key) in self._planned]

    def _preactivations(self, model, tracked):
        """`[(key, layer, spec)]`: tracked compute layers whose own activation runs as a separate TFLite op."""
        points = self._points
        found = []
        for key, layer, spec in tracked:
            if split_activation(layer) is None:
                continue
            pkey = preactivation_key(key)
            if points and pkey not in points:
                continue
            found.append((pkey, layer, points[pkey] if points else spec))
        return found

    # Collectors -------------------------------------------------------------
    def _collector(self, key, spec, shape=None):
        if key in self._collectors:
            return self._collectors[key]
        collector = LayerCollector(spec=spec, num_bins=self.num_bins, statistics=self.statistics,
                                   sample_size=self.sample_size, name=f"kq_calibration_{len(self._collectors)}")
        if shape is not None:
            self._check_memory(key, collector, shape)
            collector.build(shape)
        self._collectors[key] = collector
        return collector

    def _check_memory(self, key, collector, shape):
        if self.memory_limit is None:
            return
        used = sum(c.state_bytes for c in self._collectors.values() if c.built)
        needed = collector.planned_bytes(shape)
        if used + needed > self.memory_limit:
            raise MemoryLimitExceededError(used + needed, self.memory_limit, field=f"calibration statistics of '{key}'")

    def _create_state(self, model):
        strategy = getattr(model, "distribute_strategy", None)
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        tracked = self._tracked_layers(model)
        with scope:
            if not self._sampler.built:
                self._sampler.build()
            if not self._budget.built:
                self._budget.build()
            self._input_names = input_keys(model)
            for key, tensor in zip(self._input_names or (), model.inputs if self._input_names else ()):
                spec = self._input_spec(key)
                if spec is not None:
                    self._collector(key, spec, tuple(tensor.shape))
            for key, layer, spec in tracked:
                self._collector(key, spec, graph_lib.output_shape(layer))
            self._preact_tracked = self._preactivations(model, tracked)
            for key, layer, spec in self._preact_tracked:
                self._collector(key, spec, graph_lib.output_shape(layer))
            self._inner_tracked = self._depthwise_outputs(model)
            for key, layer, spec in self._inner_tracked:
                self._collector(key, spec, _depthwise_shape(layer))
        return tracked

    # Attaching ----------------------------------------------------------------
    def _hook(self, key, spec, original, observe_input=False, transform=None):
        """`original` that also observes its output (or, `observe_input`, its first argument; or
        `transform(first argument)`)."""
        @functools.wraps(original)
        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            local = self._local
            if getattr(local, "active", False):
                if transform is not None:
                    tensor = _first_tensor(transform(args[0]))
                else:
                    tensor = _first_tensor(args[0] if observe_input else outputs)
                if _batched(tensor):
                    self._observe(key, spec, tensor if getattr(local, "whole", False) else gather(tensor), local.mask)
            return outputs

        return call

    def _observe(self, key, spec, tensor, mask):
        collector = self._collectors.get(key)
        if collector is None:
            collector = self._collector(key, spec)
        if not collector.built:
            self._check_memory(key, collector, tuple(tensor.shape))
            collector(tensor, sample_mask=mask)
        else:  # built: its update alone, without Keras' per-call layer machinery (hundreds per step)
            collector.call(tensor, sample_mask=mask)

    def _wrap_step(self, mode, original):
        @functools.wraps(original)
        def step(data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            if mode == "predict":
                y = None
            x_all, y_all = gather(x), gather(y)
            mask = self._budget(self._sampler(x_all, labels=y_all))
            if self._keeps_all:  # every sample is kept: spare the observers the masked path
                mask = None
            self._observe_inputs(x_all, mask)
            local = self._local
            if mode != "train" and replica_context() is not None:
                # Several replicas: each observes the model on the whole batch, then runs its share
                # unobserved (one collective per step: per-layer ones mismatched across workers).
                local.active, local.mask, local.whole = True, mask, True
                try:
                    self.model(x_all, training=False)
                finally:
                    local.active, local.mask, local.whole = False, None, False
                return original(data)
            local.active, local.mask = True, mask
            try:
                return original(data)
            finally:
                local.active, local.mask = False, None

        return step

    def _input_spec(self, key):
        """The activation spec of a model input, as `quantize_model` resolves it (name overrides apply)."""
        layer_config = self.config.for_layer(key)
        return None if layer_config is None else layer_config.activations

    def _observe_inputs(self, x, mask):
        names = self._input_names
        if isinstance(x, dict) and names:
            keys = [n for n in names if n in x]
            tensors = [x[n] for n in keys]
        else:
            tensors = keras.tree.flatten(x)
            if not names or len(names) != len(tensors):
                names = input_keys(self.model, count=len(tensors))
            keys = names
        for key, t in zip(keys, tensors):
            spec = self._input_spec(key)
            if spec is not None and t is not None and len(t.shape) and "float" not in str(t.dtype) and (
                    "int" in str(t.dtype) or "bool" in str(t.dtype)):  # token ids, uint8 pixels: float32 statistics
                t = keras.ops.cast(t, "float32")
            if spec is not None and _batched(t):
                self._observe(key, spec, t, mask)

    @graph_lib.gc_paused()
    def _attach(self, mode):
        model = self.model
        if keras.backend.backend() != "tensorflow":
            raise ConfigError(
                "backend", keras.backend.backend(), "CalibrationCallback hooks TensorFlow's trainer; "
                "use KERAS_BACKEND=tensorflow (observers alone run on every backend)"
            )
        self._detach()
        self._model_name = model.name
        with graph_lib.fast_variable_creation():
            tracked = self._create_state(model)
        for key, layer, spec in tracked:
            own = layer.__dict__.get("call")
            self._patched.append((layer, own))
            layer.call = self._hook(key, spec, layer.call)
        for key, layer, spec in self._preact_tracked:
            # The input of a softmax / sigmoid / ... the layer applies itself (its own TFLite op).
            original = layer.activation
            self._patched_activations.append((layer, original))
            layer.activation = self._hook(key, spec, original, observe_input=True)
        for key, layer, spec in self._inner_tracked:
            # A separable convolution's depthwise output (a tensor of its own in the integer file).
            self._patched.append((layer, layer.__dict__.get("call")))
            layer.call = self._hook(key, spec, layer.call, transform=functools.partial(_depthwise, layer))
        step_name, fn_name = _STEPS[mode], _FUNCTIONS[mode]
        self._saved = {
            "step": (step_name, model.__dict__.get(step_name)),
            "function": (fn_name, getattr(model, fn_name, None)),
        }
        setattr(model, step_name, self._wrap_step(mode, getattr(model, step_name)))
        self._compile_step(model, mode, fn_name)
        self._saved["restore"] = guard(model, fn_name, _MAKERS[mode], self._detach)  # detached on an exception
        self._attached = mode
        self._result = None
        if self.verbose:
            steps = (self.params or {}).get("steps") if mode != "train" else None
            self._progbar = keras.utils.Progbar(steps, stateful_metrics=["samples", "layers"])
            self._start = time.time()

    def _compile_step(self, model, mode, fn_name):
        """Put the calibrating step function on `model`: the one compiled on this callback's last call when
        nothing it depends on changed (no trace, no new graph: RSS stays flat over calls), else a new one."""
        key = (id(model), mode, len(self._collectors), self._saved["step"][1], type(model), model.run_eagerly,
               getattr(model, "jit_compile", None), getattr(model, "distribute_strategy", None))
        if self._step_cache is not None and self._step_cache[0] == key:  # same variables: stats accumulate
            setattr(model, fn_name, self._step_cache[1])
            return
        getattr(model, _MAKERS[mode])(force=True)
        self._compiled = getattr(model, fn_name)
        if mode == "predict" and not model.run_eagerly:
            model.predict_function = trace_once(model.predict_function)
        self._step_cache = (key, getattr(model, fn_name))

    def detach(self):
        """Put the model back as it was (hooks, step, step function) now.

        The callback does this itself when the `fit` / `evaluate` / `predict`
        call ends; Keras does not end a call that raised (e.g. interrupted),
        so call this after such an exception. The statistics are kept.
        """
        self._detach()
        self._progbar = None

    def _detach(self):
        """Remove every hook and restore the model's step and step function."""
        for layer, original in reversed(self._patched_activations):
            layer.activation = original
        self._patched_activations = []
        for layer, own in reversed(self._patched):
            if own is None:
                layer.__dict__.pop("call", None)
            else:
                layer.call = own
        self._patched = []
        model = self.model if self._saved else None
        if model is not None:
            step_name, own_step = self._saved["step"]
            if own_step is None:
                model.__dict__.pop(step_name, None)
            else:
                setattr(model, step_name, own_step)
            fn_name, fn = self._saved["function"]
            setattr(model, fn_name, fn)
            self._saved.get("restore", lambda: None)()
        self._saved = {}
        self._attached = None
        self._local.active, self._local.mask, self._local.whole = False, None, False

    # Keras callback hooks -----------------------------------------------------
    def _check_not_empty(self, call):  # before anything is hooked: Keras knows an empty array has no batch
        if (self.params or {}).get("steps") == 0:
            raise NoDataError("calibration data", reason=f"{call} was given 0 samples (an empty array)")

    def on_train_begin(self, logs=None):
        self._attach("train")

    def on_train_end(self, logs=None):
        if self._attached == "train":
            self._finish()

    def on_test_begin(self, logs=None):
        if self._attached is None:  # validation inside fit is not calibrated
            self._check_not_empty("evaluate")
            self._attach("test")

    def on_test_end(self, logs=None):
        if self._attached == "test":
            self._finish()

    def on_predict_begin(self, logs=None):
        if self._attached is None:
            self._check_not_empty("predict")
            self._attach("predict")

    def on_predict_end(self, logs=None):
        if self._attached == "predict":
            self._finish()

    def _progress(self, batch):
        if self._progbar is not None and self._attached is not None:
            self._progbar.update(batch + 1, values=[("samples", self.samples_seen), ("layers", len(self._collectors))])

    def on_train_batch_end(self, batch, logs=None):
        if self._attached == "train":
            self._progress(batch)

    def on_test_batch_end(self, batch, logs=None):
        if self._attached == "test":
            self._progress(batch)

    def on_predict_batch_end(self, batch, logs=None):
        if self._attached == "predict":
            self._progress(batch)

    def _finish(self):
        self._detach()
        if self._progbar is not None:
            print(f"\ncalibrated {self.samples_seen} samples, {len(self._collectors)} tensors tracked "
                  f"in {time.time() - self._start:.1f}s")
            self._progbar = None

    # Results ------------------------------------------------------------------
    @property
    def samples_seen(self):
        """Number of samples folded into the statistics so far."""
        if not self._budget.built:
            return 0
        return int(keras.ops.convert_to_numpy(self._budget.kept))

    @property
    def state_bytes(self):
        """Bytes held by the statistics' state (fixed however many samples are seen)."""
        return sum(c.state_bytes for c in self._collectors.values() if c.built)

    @property
    def result(self):
        """The statistics gathered so far, as a `kq.CalibrationResult`.

        Read from the state once (range searches included) and kept until the
        statistics change (the next calibrating call, or `reset()`).
        """
        if self._result is None or self._attached is not None:
            self._result = self._read_result()
        return self._result

    @graph_lib.gc_paused()
    def _read_result(self):
        layers = {key: c.to_statistics(name=key) for key, c in self._collectors.items()}
        sampling = self.sampling if isinstance(self.sampling, str) else type(self.sampling).__name__
        metadata = {
            "samples_seen": self.samples_seen,
            "sampling": sampling,
            "max_samples": self.max_samples,
            "statistics": self.statistics,
            "model": self._model_name,
            "keras_quant_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.config.get_config(),
        }
        return CalibrationResult(layers, metadata=metadata)

    def reset(self):
        """Forget every statistic and the samples seen."""
        self._result = None
        for c in self._collectors.values():
            if c.built:
                c.reset()
        if self._sampler.built:
            self._sampler.reset()
        if self._budget.built:
            self._budget.kept.assign(0)
