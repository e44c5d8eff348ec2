"""Accuracy against the converter over several calibration sets: is a gap kq's method, or one draw?

    python benchmarks/run.py --only calibration_sets [--quick]
    python benchmarks/bench_calibration_sets.py [--models EfficientNetV2B0 ...] [--sets 6] [--train 10000 5]

`bench_zoo.py` compares kq's int8 file with the TFLite converter's on one set of calibration
samples (the last 100 training samples), and its sign test (`acc_p_value`) treats the two files
as fixed: it asks whether the test images could split the disagreements so unevenly by chance,
not whether another calibration set would give the other file the lead. This benchmark trains
each zoo model once, then draws `--sets` calibration sets of `--calib` samples (the zoo's own
first, then random ones), and for each set makes the converter's full-integer file and kq's
files from the same samples, and evaluates all of them in the LiteRT interpreter on `--test`
test samples. Per set and pooled over the sets (summed paired counts, one sign test), it prints
accuracy, agreement with the float model's top-1 class and the paired counts against the
converter's file, for these kq variants:

- `kq`: the zoo's path (`statistics="range"`, `quantize_model`, `export_tflite`);
- `kq_own_range`: as `kq`, but every residual branch on its own range
  (`quantize_model(..., shared_merges=(keras.layers.Concatenate,))`): by default the first input
  an Add alone reads spans the Add's output range, as in the converter's files; this variant
  shows what that choice is worth;
- `kq_margin10`: every frozen wrapper's output range 10% wider at both ends (min-max ranges
  from a hundred samples are narrower than what held-out data reaches).

`--train N EPOCHS` trains on N samples for EPOCHS epochs instead of the zoo's brief training.
Figures, not assertions; results go to `benchmarks/results/`.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_zoo  # noqa: E402
import zoo_models  # noqa: E402

VARIANTS = ("kq", "kq_own_range", "kq_margin10")


def calibration_sets(x, count, size, seed=1):
    """`count` calibration sets of `size` samples: the zoo's (the last `size`), then random draws."""
    rng = np.random.default_rng(seed)
    sets = [x[-size:]]
    while len(sets) < count:
        sets.append(x[np.sort(rng.choice(len(x), size, replace=False))])
    return sets


def _range(wrapper):
    spec = wrapper.quant_config.activations
    scale, zero_point = (float(np.asarray(v).reshape(-1)[0]) for v in wrapper.output_qparams)
    return spec, (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale


def _frozen_outputs(qmodel):
    import keras_quant as kq

    return {layer.name: layer for layer in qmodel.layers
            if isinstance(layer, kq.QuantizeWrapper) and layer.mode == "frozen" and layer.output_qparams is not None
            and layer.fixed_output is None}


def widen_ranges(qmodel, factor):
    """Scale both ends of every frozen wrapper's output range by `factor`; the number changed."""
    import keras_quant as kq

    wrappers = _frozen_outputs(qmodel)
    for wrapper in wrappers.values():
        spec, lo, hi = _range(wrapper)
        wrapper.set_output_qparams(*kq.ops.compute_qparams(np.float32(lo * factor), np.float32(hi * factor), spec))
    return len(wrappers)


def run_model(name, sets, calib, n_test, train, variants, folder, log=print):
    import keras

    import keras_quant as kq
    from keras_quant.transform.plan import SHARED_INPUT_MERGES as SHARED

    zm = zoo_models.MODELS[name]
    n_train, epochs = train or bench_zoo.FULL["train"][zm.task]
    x, y, xt, yt, task = zoo_models.load_task(zm, n_train, n_test)
    model = zm.build(None)
    start = time.perf_counter()
    keras.utils.set_random_seed(bench_zoo.SEED)
    model.fit(x, y, batch_size=bench_zoo.BATCH, epochs=epochs, shuffle=True, verbose=0)
    float_pred = model.predict(xt, batch_size=64, verbose=0)
    log(f"{name}: {task}, trained on {n_train} x {epochs} epochs in {time.perf_counter() - start:.0f} s, "
        f"float accuracy {zoo_models.accuracy(zm, float_pred, yt):.4f} on {len(yt)} test samples")
    rows, pooled = [], {v: [0, 0] for v in variants}
    for index, x_calib in enumerate(calibration_sets(x, sets, calib)):
        conv_path = os.path.join(folder, f"{name}_converter_{index}.tflite")
        bench_zoo.converter_file(model, x_calib, conv_path)
        conv_pred = kq.runtime.load(conv_path).predict(xt)
        row = {"model": name, "set": index, "acc_converter": zoo_models.accuracy(zm, conv_pred, yt),
               "agree_converter": bench_zoo.float_fidelity(zm, conv_pred, float_pred)[0]}
        cb = kq.CalibrationCallback(statistics="range")
        model.predict(x_calib, batch_size=32, verbose=0, callbacks=[cb])
        for variant in variants:
            own = variant == "kq_own_range"
            qmodel = kq.quantize_model(model, calibration=cb.result,
                                       shared_merges=(keras.layers.Concatenate,) if own else SHARED)
            if variant == "kq_margin10":
                widen_ranges(qmodel, 1.1)
            path = os.path.join(folder, f"{name}_{variant}_{index}.tflite")
            kq.export_tflite(qmodel, path)
            pred = kq.runtime.load(path).predict(xt)
            a, b = bench_zoo.paired_counts(zm, pred, conv_pred, yt)
            pooled[variant][0] += a
            pooled[variant][1] += b
            row.update({f"acc_{variant}": zoo_models.accuracy(zm, pred, yt),
                        f"agree_{variant}": bench_zoo.float_fidelity(zm, pred, float_pred)[0],
                        f"{variant}_vs_converter": f"{a} / {b}", f"p_{variant}": bench_zoo.sign_test_p(a, b)})
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        rows.append(row)
    summary = {"model": name, "sets": len(rows),
               "acc_converter": float(np.mean([r["acc_converter"] for r in rows]))}
    for variant, (a, b) in pooled.items():
        summary[f"acc_{variant}"] = float(np.mean([r[f"acc_{variant}"] for r in rows]))
        summary[f"{variant}_wins"] = sum(r[f"acc_{variant}"] > r["acc_converter"] for r in rows)
        summary[f"{variant}_vs_converter"] = f"{a} / {b}"
        summary[f"p_{variant}"] = bench_zoo.sign_test_p(a, b)
    return rows, summary


QUICK = {"models": ["MobileNetV3Small"], "sets": 2, "test": 1000}
FULL = {"models": ["EfficientNetV2B0", "MobileNetV2"], "sets": 6, "test": 10000}


def measure(models, sets, calib, n_test, train=None, variants=VARIANTS, log=print):
    """`(per-set rows, pooled rows)` of every model."""
    all_rows, summaries = [], []
    with tempfile.TemporaryDirectory(prefix="kq_bench_sets_") as folder:
        for name in models:
            rows, summary = run_model(name, sets, calib, n_test, train, variants, folder, log=log)
            all_rows += rows
            summaries.append(summary)
    return all_rows, summaries


def run(quick=False):
    """For `benchmarks/run.py`: the pooled table, the per-set one under it."""
    cfg = QUICK if quick else FULL
    rows, summaries = measure(cfg["models"], cfg["sets"], bench_zoo.FULL["calib"], cfg["test"])
    return {"rows": summaries, "tables": {"per calibration set": rows},
            "notes": "kq's int8 file against the converter's on several calibration sets of the same size; pooled: "
                     "paired counts summed over the sets (variant right and converter wrong / the reverse), one "
                     "sign test"}


def main(argv=None):
    from keras_quant.formatting import markdown_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=FULL["models"])
    parser.add_argument("--sets", type=int, default=FULL["sets"])
    parser.add_argument("--calib", type=int, default=bench_zoo.FULL["calib"])
    parser.add_argument("--test", type=int, default=FULL["test"])
    parser.add_argument("--train", type=int, nargs=2, metavar=("SAMPLES", "EPOCHS"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    all_rows, summaries = measure(args.models, args.sets, args.calib, args.test, args.train, args.variants)
    print("\n### Per calibration set\n")
    print(markdown_table(all_rows))
    print("\n### Pooled over the sets (paired counts summed: variant right and converter wrong / the reverse)\n")
    print(markdown_table(summaries))
    return summaries


if __name__ == "__main__":
    main()
