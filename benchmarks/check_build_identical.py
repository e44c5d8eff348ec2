"""Check that `quantize_model` (PTQ) builds bit-identical models from two source trees.

    python benchmarks/check_build_identical.py OLD_TREE NEW_TREE [MODEL ...]

Each tree builds the PTQ model of each zoo model (synthetic data, random BatchNorm statistics,
statistics="range") in a
subprocess and dumps every weight (by path), the model config, the report, the predictions and
the int8 TFLite file; the two dumps must be equal byte for byte.
"""

import json
import os
import pickle
import subprocess
import sys
import tempfile

MODELS = ("MobileNet", "ResNet50", "NASNetMobile")


def dump(tree, names, out):
    sys.path.insert(0, tree)
    sys.path.insert(0, os.path.join(tree, "benchmarks"))
    import keras
    import numpy as np
    import keras_quant as kq
    import zoo_models

    assert kq.__file__.startswith(tree), kq.__file__
    result = {}
    for name in names:
        zm = zoo_models.get(name)
        model = zm.build(None)
        x, _ = zoo_models.synthetic(zm, 32)
        rng = np.random.default_rng(0)  # trained-looking BatchNorm statistics, so folding has work to do
        for layer in zoo_models._all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                for var in layer.weights:
                    low, high = (0.2, 2.0) if "variance" in var.name else (-1.0, 1.0)
                    var.assign(rng.uniform(low, high, var.shape).astype("float32"))
        cb = kq.CalibrationCallback(statistics="range")
        model.predict(x, verbose=0, callbacks=[cb])
        q = kq.quantize_model(model, calibration=cb.result)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.tflite")
            kq.export_tflite(q, path)
            tfl = open(path, "rb").read()
        result[name] = {
            "weights": [(w.path, w.dtype, np.asarray(w.numpy()).tobytes()) for w in q.weights],
            "config": json.dumps(q.get_config(), sort_keys=True, default=str),
            "report": repr(q.quantization_report),
            "predict": q.predict(x, verbose=0).tobytes(),
            "tflite": tfl,
        }
    with open(out, "wb") as f:
        pickle.dump(result, f)


def main(old, new, names):
    dumps = []
    for tree in (old, new):
        fd, out = tempfile.mkstemp(suffix=".pkl")
        os.close(fd)
        subprocess.run([sys.executable, __file__, "--dump", tree, out, *names], check=True)
        with open(out, "rb") as f:
            dumps.append(pickle.load(f))
        os.remove(out)
    ok = True
    for name in names:
        a, b = dumps[0][name], dumps[1][name]
        for field in a:
            same = a[field] == b[field]
            if not same and field == "weights":
                for wa, wb in zip(a[field], b[field]):
                    if wa != wb:
                        print(f"  {name}: first differing weight {wa[0]} / {wb[0]}")
                        break
                if len(a[field]) != len(b[field]):
                    print(f"  {name}: {len(a[field])} vs {len(b[field])} weights")
            print(f"{name:14s} {field:8s} {'identical' if same else 'DIFFERENT'}")
            ok &= same
    print("ALL IDENTICAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1] == "--dump":
        dump(sys.argv[2], sys.argv[4:] or MODELS, sys.argv[3])
    else:
        sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:] or MODELS))
