"""Does a zoo model's int8 file compute what its frozen Keras PTQ model computes? Where first does it not?

    python benchmarks/diag_nasnet.py [--model NASNetMobile] [--train 2000] [--samples 300] [--tensors 10]

Builds the model as `zoo_models.py` does, trains one epoch (batch 64, so BatchNorm statistics are
real), calibrates on the last 100 training samples, quantizes (`kq.quantize_model`), exports
(`kq.export_tflite`) and prints the output disagreement in steps of the file's output scale
(p50 / p99 / max). With `--tensors N` it then runs N samples through the file with every
intermediate tensor kept and compares each int8 tensor with the Keras tensor that writes it, in the
file's op order, printing the mismatching ones (the first is where to look).

Pairing is by the op's TF name scope: the first component of the tensor name after the model's
scope, less the `_<n>` suffix TF adds (`activation_1_2/Relu` is Keras `activation_1`); a layer with
a quantizer is compared after it (`X_quant`). Known non-mismatches it still lists: a QUANTIZE op
(the converter requantizing a tensor onto a Concatenate's scale; paired with the tensor before it)
and the logits before a softmax. `kq.analysis.layer_errors(qmodel, file, x)` matches names by
mention and mispairs NASNet's `activation_N` layers for that suffix.
"""

import argparse
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compare_tensors(qmodel, path, x):
    """`[(op index, op name, keras layer, max steps, share of elements off)]` for the mismatching int8 tensors."""
    import keras

    from keras_quant.runtime import TFLiteRunner

    with open(path, "rb") as f:
        runner = TFLiteRunner(f.read(), os.path.basename(path), path=path, preserve_all_tensors=True)
    names = {layer.name for layer in qmodel.layers}
    details = runner.tensor_details()
    rows = []
    for op in runner.ops():
        if op["op_name"] == "DELEGATE":  # its outputs are the delegated ops' own, listed already
            continue
        for index in op["outputs"]:
            detail = details.get(index)
            if detail is None or not np.issubdtype(detail["dtype"], np.integer):
                continue
            parts = detail["name"].split(";")[0].split("/")
            scope = parts[1] if len(parts) > 1 else parts[0]
            base = re.sub(r"_\d+$", "", scope)
            name = base if base in names else scope if scope in names else None
            if name is not None:
                name = name + "_quant" if name + "_quant" in names else name
                rows.append((op["index"], op["op_name"], index, name, detail["quantization"][0]))
    layers = list(dict.fromkeys(r[3] for r in rows))
    probe = keras.Model(qmodel.inputs, [qmodel.get_layer(n).output for n in layers])
    keras_out = dict(zip(layers, probe.predict(x, batch_size=16, verbose=0)))
    file_out = runner.intermediates(x.astype("float32"), [r[2] for r in rows], batch_size=16)
    bad = []
    for (op_index, op_name, _, name, scale), got in zip(rows, file_out):
        want = keras_out[name]
        if want.size != got.size:
            continue
        steps = np.abs(want.reshape(got.shape) - got) / scale
        if steps.max() > 1e-3:
            bad.append((op_index, op_name, name, float(steps.max()), float(np.mean(steps > 1e-3))))
    return bad, len(rows)


def main(argv=None):
    import keras

    import keras_quant as kq
    import zoo_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="NASNetMobile")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--tensors", type=int, default=0, help="samples for the per-tensor comparison (0: none)")
    parser.add_argument("--out", default=None, help="folder for the .tflite file (default: a temporary one)")
    args = parser.parse_args(argv)

    zm = zoo_models.get(args.model)
    x, y, x_test, _, _ = zoo_models.load_task(zm, args.train, args.samples)
    model = zm.build()
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    cb = kq.CalibrationCallback()
    model.predict(x[-100:], batch_size=32, callbacks=[cb], verbose=0)
    qmodel = kq.quantize_model(model, calibration=cb.result)
    out = args.out or tempfile.mkdtemp(prefix="diag_")
    path = os.path.join(out, f"{args.model}.tflite")
    kq.export_tflite(qmodel, path)
    runner = kq.runtime.load(path)
    got = np.asarray(runner.predict(x_test))
    steps = np.abs(got - np.asarray(qmodel.predict(x_test, verbose=0))) / runner.output_quantization[0]
    p50, p99, top = np.percentile(steps, [50, 99, 100])
    print(f"{args.model}: file - Keras PTQ output, steps of the output scale: p50 {p50:.0f} p99 {p99:.0f} "
          f"max {top:.0f}; elements off: {np.mean(steps > 1e-3):.3f}")
    if args.tensors:
        bad, paired = compare_tensors(qmodel, path, x_test[:args.tensors])
        print(f"{paired} int8 tensors paired, {len(bad)} differ:")
        for op_index, op_name, name, top, share in bad[:30]:
            note = "  (a requantization: paired with its input)" if op_name == "QUANTIZE" else ""
            print(f"  op {op_index:4d} {op_name:18s} {name:50s} max {top:6.2f} steps, {share:.3f} of elements{note}")
    keras.backend.clear_session()


if __name__ == "__main__":
    main()
