"""AdaRound (`kq.ptq.adaround`) against nearest rounding on bench_peers' Fashion-MNIST MobileNet.

    python benchmarks/bench_adaround.py [--quick] [--iterations 2000] [--time-budget SECONDS]

The model is bench_peers' `mobilenet` (`build_model`), trained as its `run_model` trains it
(`compile_model`, Adam at `TRAIN_LR`, batch `BATCH`, its epochs). One calibration pass on the
last `calib` training images; per scheme (W4A8, W4A4: per-channel symmetric 4-bit weights,
per-tensor asymmetric activations, bench_peers' `kq_config`), the quantized model with nearest
rounding and a second one rounded by AdaRound on the same calibration images. Reported: test
accuracy and the drop in points from float of each, AdaRound's wall time and its ratio to plain
calibration (the calibration pass plus `quantize_model`), and AdaRound's per-layer report.
`--quick`: the digits MobileNet. Figures, not assertions.
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:  # this checkout's keras_quant
    sys.path.insert(0, os.path.dirname(HERE))

import bench_peers  # noqa: E402

SCHEMES = ("W4A8", "W4A4")
QUICK = {"dataset": "digits", "calib": 300, "iterations": 500}
FULL = {"dataset": "fashion_mnist", "calib": 1024, "iterations": 2000}


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1) == y))


def train(dataset):
    """bench_peers' MobileNet trained as its `run_model` trains it; `(model, data, float accuracy, seconds)`."""
    import keras

    x, y, xt, yt = bench_peers.load_dataset(dataset)
    model = bench_peers.compile_model(keras, bench_peers.build_model(keras, "mobilenet", x.shape[1:]),
                                      bench_peers.TRAIN_LR)
    keras.utils.set_random_seed(bench_peers.SEED)
    start = time.perf_counter()
    epochs = bench_peers.FULL["epochs"][dataset]
    model.fit(x, y, batch_size=bench_peers.BATCH, epochs=epochs, shuffle=True, verbose=0)
    return model, (x, y, xt, yt), accuracy(model, xt, yt), time.perf_counter() - start


def measure(quick=False, iterations=None, time_budget=None, observer="minmax", log=print):
    import keras_quant as kq

    cfg = QUICK if quick else FULL
    iterations = iterations or cfg["iterations"]
    model, (x, _, xt, yt), float_acc, train_s = train(cfg["dataset"])
    log(f"[{cfg['dataset']}/mobilenet] float {float_acc:.4f} (trained in {train_s:.0f} s)")
    x_calib = x[-cfg["calib"]:]
    start = time.perf_counter()
    cb = kq.CalibrationCallback(kq.QuantConfig.int8())
    model.predict(x_calib, batch_size=bench_peers.BATCH, verbose=0, callbacks=[cb])
    calib_pass_s = time.perf_counter() - start
    rows, reports = [], {}
    for scheme in SCHEMES:
        config = bench_peers.kq_config(observer, scheme)
        start = time.perf_counter()
        nearest = kq.quantize_model(model, config, calibration=cb.result)
        calib_s = calib_pass_s + time.perf_counter() - start
        nearest_acc = accuracy(nearest, xt, yt)
        qmodel = kq.quantize_model(model, config, calibration=cb.result)
        start = time.perf_counter()
        report = kq.ptq.adaround(qmodel, x_calib, iterations=iterations, time_budget=time_budget)
        ada_s = time.perf_counter() - start
        ada_acc = accuracy(qmodel, xt, yt)
        reports[scheme] = report
        rows.append({"dataset": cfg["dataset"], "scheme": scheme, "float": float_acc, "nearest": nearest_acc,
                     "adaround": ada_acc, "nearest drop pts": 100 * (float_acc - nearest_acc),
                     "adaround drop pts": 100 * (float_acc - ada_acc), "calibration s": calib_s,
                     "adaround s": ada_s, "ratio": ada_s / calib_s, "iterations": iterations,
                     "budget s": time_budget})
        log(f"[{scheme}] nearest {nearest_acc:.4f}  adaround {ada_acc:.4f}  ({ada_s:.0f} s, "
            f"{ada_s / calib_s:.0f}x calibration)\n{report}")
    return rows, reports


def run(quick: bool, log=None) -> dict:
    """The benchmark runner's entry (`benchmarks/run.py`): the rows and the per-layer reports as notes."""
    rows, reports = measure(quick, log=log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    return {"rows": rows, "notes": [f"{scheme}:\n{report}" for scheme, report in reports.items()]}


def main(argv=None):
    from keras_quant.formatting import markdown_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the digits MobileNet")
    parser.add_argument("--iterations", type=int, default=None, help="Adam steps per layer")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for AdaRound per model")
    parser.add_argument("--observer", default="minmax", help="the calibration observer (bench_peers' kq_config)")
    args = parser.parse_args(argv)
    rows, _ = measure(args.quick, args.iterations, args.time_budget, args.observer)
    print()
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
