"""4-bit TFLite files: W4A4 clamp ops folded away, and 4-bit weights stored as INT4.

    python benchmarks/run.py --only w4 [--quick]     # as part of the benchmark report
    python benchmarks/bench_w4.py [--quick]           # on its own (prints the tables)

The six models of `bench_peers` (cnn / mobilenet / mlp on Fashion-MNIST, when installed, and on
digits; `--quick`: digits only), built and trained as `bench_peers.run_model` does, then:

- `converter_int8`: the TFLite converter's own full-integer PTQ (`bench_peers.converter_int8`), the
  latency baseline;
- `w4a4_before`: keras_quant's W4A4 PTQ file (minmax, per-channel symmetric narrow 4-bit weights,
  per-tensor 4-bit activations) in the plain form exports wrote before: each 4-bit activation at
  its spec's zero point with a MAXIMUM and a MINIMUM op (the converted file, not rewritten by
  `kq.export.clamps`);
- `w4a4_after`: `kq.export_tflite(qmodel, path)` as it is now: 4-bit activations moved to the top
  of int8 (no MINIMUM), clamp ops folded into their producers (`kq.export.clamps`);
- `w4a4_int4` / `w4a4_int4_xnnpack`: the same with `weight_storage="int4"` / `"int4_xnnpack"`.

Figures per file: MINIMUM / MAXIMUM / RELU op counts, test accuracy, whether its integer outputs are
`w4a4_before`'s (`same_as_before`: every test image, LiteRT with XNNPACK), size, batch-1 latency
(LiteRT, one thread, XNNPACK, as `bench_peers.load_runner`; the files of one model take turns in
rounds, each ratio the median over rounds of the per-round ratio, as `bench_peers.measure`).

Targets (reported, not asserted): W4A4 latency within 1.2x the converter's int8 file; INT4-storage
files at most 0.6x the int8-storage file's size where every 4-bit weight can be INT4.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import bench_peers  # noqa: E402

QUICK = {"datasets": ("digits",), "calib": 300, "epochs": {"digits": 20}, "rounds": 7, "round_s": 0.05, "warmup": 5}
FULL = {"datasets": ("fashion_mnist", "digits"), "calib": 1000, "epochs": {"fashion_mnist": 4, "digits": 40},
        "rounds": 11, "round_s": 0.08, "warmup": 5}
TARGETS = {"latency": 1.2, "size": 0.6}
FILES = ("converter_int8", "w4a4_before", "w4a4_after", "w4a4_int4", "w4a4_int4_xnnpack")
CLAMP_OPS = ("MINIMUM", "MAXIMUM", "RELU", "RELU6")


def train(dataset, kind, data, cfg):
    """The float model `bench_peers.run_model` trains: `(model, float accuracy)`."""
    import keras

    x, y, xt, yt = data
    model = bench_peers.compile_model(keras, bench_peers.build_model(keras, kind, x.shape[1:]), bench_peers.TRAIN_LR)
    keras.utils.set_random_seed(bench_peers.SEED)
    model.fit(x, y, batch_size=bench_peers.BATCH, epochs=cfg["epochs"][dataset], shuffle=True, verbose=0)
    return model, float(np.mean(np.argmax(model.predict(xt, batch_size=256, verbose=0), axis=-1) == yt))


def plain_bytes(qmodel):
    """The W4A4 file as exports wrote it before: 4-bit activations at their zero point, MAXIMUM + MINIMUM each."""
    from keras_quant.export.tflite import tflite_bytes

    return tflite_bytes(qmodel, "int8", input_type="int8", output_type="int8", fold_clamps=False)[0]


def make_files(model, x_calib, folder):
    """`{name: path}` of the converter's int8 file and keras_quant's W4A4 files of `model`."""
    import keras_quant as kq
    from keras_quant.io import write_atomic

    paths = {name: os.path.join(folder, name + ".tflite") for name in FILES}
    bench_peers.converter_int8(model, x_calib, paths["converter_int8"])
    cb = kq.CalibrationCallback()
    model.predict(x_calib, batch_size=256, callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, bench_peers.kq_config("minmax", "W4A4"), calibration=cb.result)
    write_atomic(paths["w4a4_before"], plain_bytes(qmodel))
    kq.export_tflite(qmodel, paths["w4a4_after"])
    kq.export_tflite(qmodel, paths["w4a4_int4"], weight_storage="int4")
    kq.export_tflite(qmodel, paths["w4a4_int4_xnnpack"], weight_storage="int4_xnnpack")
    return paths


def op_counts(path):
    from keras_quant.export import flatbuffer

    with open(path, "rb") as f:
        names = [op.name for op in flatbuffer.FlatModel(f.read()).ops()]
    return {op: names.count(op) for op in CLAMP_OPS}


def integer_outputs(runner, x):
    """The file's output integers minus their zero point, per image (batch 1 as the latency runs)."""
    scale = runner.output_quantization[0] if runner.output_quantization else None
    y = runner.predict(x, batch_size=1)
    return np.round(y / scale).astype(np.int64) if scale else y


def measure_model(paths, xt, yt, cfg):
    """`{name: figures}` of each file: ops, accuracy, size, outputs against w4a4_before, latency series."""
    import bench_export

    runners = {name: bench_peers.load_runner(p) for name, p in paths.items()}
    figures = {}
    before = integer_outputs(runners["w4a4_before"], xt)
    for name, runner in runners.items():
        f = figures[name] = {"size_bytes": os.path.getsize(paths[name]), **op_counts(paths[name])}
        f["accuracy"] = bench_peers.accuracy(runner, xt, yt)
        if name.startswith("w4a4"):
            f["same_as_before"] = bool(np.array_equal(integer_outputs(runner, xt), before))
    times, _ = bench_export.round_robin_latency(runners, xt, cfg["rounds"], cfg["round_s"], cfg["warmup"],
                                                 min_runs=5, max_runs=2000)
    for name, series in times.items():
        figures[name]["latency_series"] = series
    return figures


def rows_for(dataset, kind, float_acc, figures):
    ref = figures["converter_int8"]["latency_series"]
    int8_size = figures["w4a4_after"]["size_bytes"]
    rows = []
    for name, f in figures.items():
        row = {"dataset": dataset, "model": kind, "file": name, "accuracy": f["accuracy"],
               "drop_pts": 100 * (float_acc - f["accuracy"]), **{op: f[op] for op in CLAMP_OPS}}
        if "same_as_before" in f:
            row["same_as_before"] = f["same_as_before"]
        row["size_kb"] = f["size_bytes"] / 1024
        if name.startswith("w4a4_int4"):
            row["size_vs_int8_storage"] = f["size_bytes"] / int8_size
        row["latency_ms"] = 1000 * statistics.median(f["latency_series"])
        row["latency_vs_converter"] = bench_peers._ratio_series(f["latency_series"], ref)
        rows.append(row)
    return rows


def target_rows(rows):
    out = []
    for (dataset, kind) in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        mine = {r["file"]: r for r in rows if (r["dataset"], r["model"]) == (dataset, kind)}
        after, before = mine["w4a4_after"], mine["w4a4_before"]
        out.append({
            "dataset": dataset, "model": kind,
            "clamp_ops_before": sum(before[op] for op in CLAMP_OPS),
            "clamp_ops_after": sum(after[op] for op in CLAMP_OPS),
            "latency_before_vs_converter": before["latency_vs_converter"],
            "latency_after_vs_converter": after["latency_vs_converter"],
            "latency_met": after["latency_vs_converter"] <= TARGETS["latency"],
            "accuracy_unchanged": after["accuracy"] == before["accuracy"] and after["same_as_before"],
            "int4_size_vs_int8": mine["w4a4_int4"]["size_vs_int8_storage"],
            "int4_xnnpack_size_vs_int8": mine["w4a4_int4_xnnpack"]["size_vs_int8_storage"],
            "size_met": mine["w4a4_int4"]["size_vs_int8_storage"] <= TARGETS["size"],
        })
    return out


def run(quick: bool, log=None) -> dict:
    """Every model of `bench_peers` on every installed dataset; the runner's dict (rows, tables, notes)."""
    import keras

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if keras.backend.backend() != "tensorflow":
        return {"rows": [], "notes": [f"w4 needs the TensorFlow backend; skipped on {keras.backend.backend()}"]}
    cfg = QUICK if quick else FULL
    names, notes = bench_peers.available_datasets(cfg["datasets"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="kq_bench_w4_") as folder:
        for dataset in names:
            data = bench_peers.load_dataset(dataset)
            for kind in bench_peers.MODELS:
                start = time.perf_counter()
                model, float_acc = train(dataset, kind, data, cfg)
                sub = os.path.join(folder, dataset, kind)
                os.makedirs(sub)
                paths = make_files(model, data[0][-cfg["calib"]:], sub)
                rows += rows_for(dataset, kind, float_acc, measure_model(paths, data[2], data[3], cfg))
                log(f"  [{dataset}/{kind}] float {float_acc:.4f}, {time.perf_counter() - start:.0f} s")
    notes += [
        "latency_vs_converter: median over rounds of the per-round ratio to the converter's int8 file (batch 1, "
        "one thread, LiteRT with XNNPACK). size_vs_int8_storage: over w4a4_after (the same file, int8 weights).",
        "w4a4_int4 holds INT4 CONV_2D / DEPTHWISE_CONV_2D weights, which XNNPACK does not take: those ops run "
        "in LiteRT's builtin kernels (slower; a step off XNNPACK's int8 path here and there, so same_as_before "
        "may be False). w4a4_int4_xnnpack packs only the FULLY_CONNECTED weights XNNPACK reads.",
    ]
    return {"rows": target_rows(rows), "tables": {"Every file": rows}, "notes": notes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.quick)
    from common import print_result

    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
