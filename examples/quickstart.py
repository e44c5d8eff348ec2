"""keras_quant in thirty lines: quantize a tensor, observe activations, measure the error."""

import numpy as np

import keras_quant as kq

rng = np.random.default_rng(0)

# A weight matrix (Dense kernel: in=64, out=16) with one wide output channel.
w = rng.normal(size=(64, 16)).astype("float32")
w[:, 0] *= 20

for spec in (
    kq.QuantSpec(bits=8, symmetric=True, narrow_range=True),                           # per tensor
    kq.QuantSpec(bits=8, symmetric=True, narrow_range=True, granularity="per_channel"),
    kq.QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=16),
):
    scale, zero_point = kq.ops.tensor_qparams(w, spec)
    q = kq.ops.quantize(w, scale, zero_point, spec)            # int8 storage
    w_hat = kq.ops.dequantize(q, scale, zero_point, spec)
    s = kq.analysis.error_stats(w, w_hat)
    print(f"{spec.bits}-bit {spec.granularity:<12} SQNR {s.sqnr_db:6.2f} dB  max error {s.max_error:.4f}")

# Activations: a heavy-tailed stream, ranges chosen by different observers at 4 bits.
spec = kq.QuantSpec(bits=4)
acts = [rng.laplace(size=(32, 128)).astype("float32") for _ in range(20)]
for name in ("minmax", "percentile", "mse", "kl"):
    observer = kq.observers.get(spec.replace(observer=name))
    for batch in acts:
        observer.update(batch)
    scale, zero_point = observer.compute_qparams(spec)
    x = np.concatenate(acts)
    s = kq.analysis.error_stats(x, kq.ops.fake_quant(x, scale, zero_point, spec))
    print(f"observer {name:<10} range {observer.compute_range()}  SQNR {s.sqnr_db:6.2f} dB")
