"""GPTQ on a small causal language model: keras_quant's `kq.ptq.gptq` against Keras' own
`model.quantize("gptq", ...)`, 4-bit weight-only.

The corpus is the Python standard library's docstrings (no download), tokenized by characters; the
model is a 2-block transformer (token + position embedding, keras.layers.MultiHeadAttention,
LayerNormalization, a Dense MLP, a Dense head), trained for a few minutes at most on the CPU. Held-out
perplexity and next-token accuracy of: the float model, Keras GPTQ (its defaults: group_size 128,
asymmetric, no act_order; and group_size equal to ours), kq GPTQ and kq round-to-nearest
(`kq.QuantConfig(weights=<4-bit spec>, activations=None)`), with the wall time of each quantization.

Both quantize the same layers: the Dense layers of the blocks and the attention projections; the
embedding and the head stay float. keras_quant keeps a MultiHeadAttention as a weight-only island
whose four kernels are on ONE symmetric scale each (`kq.layers.WeightOnlyMultiHeadAttention`; the
transform makes any weight spec per-tensor there), where Keras uses its groups: `kq.ptq.gptq` rounds
those kernels on their per-tensor grids. The row "kq gptq, attention float" keeps MultiHeadAttention
float, to show what the per-tensor attention kernels cost.

    python3 benchmarks/bench_gptq.py            # full settings (a few minutes)
    python3 benchmarks/bench_gptq.py --quick    # a smaller model and corpus, under a minute of training
"""

import argparse
import ast
import os
import sys
import sysconfig
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers as L  # noqa: E402

import keras_quant as kq  # noqa: E402
from keras_quant.formatting import text_table  # noqa: E402

SETTINGS = {
    "full": dict(chars=1_000_000, seq=128, d=128, heads=4, ff=512, steps=500, batch=32, calib=128, group=32),
    "quick": dict(chars=200_000, seq=64, d=64, heads=4, ff=256, steps=250, batch=32, calib=64, group=32),
}


# Corpus and tokenizer -------------------------------------------------------------------------
def stdlib_docstrings(limit):
    """Docstrings of the standard library's modules, classes and functions, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        texts.append(doc)
                        total += len(doc) + 1
                        if total >= limit:
                            return texts
    return texts


class CharTokenizer:
    """Printable ASCII and newline, one token each; anything else is token 0. `tokenize` as Keras' GPTQ calls it."""

    def __init__(self):
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.index = {c: i + 1 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 1

    def tokenize(self, text):
        return np.asarray([self.index.get(c, 0) for c in text], "int32")

    __call__ = tokenize


# Model ---------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="bench_gptq")
class TokenAndPosition(L.Layer):
    def __init__(self, vocab, seq, d, **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.seq, self.d = vocab, seq, d
        self.tokens = L.Embedding(vocab, d, name="tokens")
        self.positions = L.Embedding(seq, d, name="positions")

    def call(self, x):
        return self.tokens(x) + self.positions(keras.ops.arange(self.seq))

    def get_config(self):
        return {**super().get_config(), "vocab": self.vocab, "seq": self.seq, "d": self.d}


def block(x, s, i):
    h = L.MultiHeadAttention(s["heads"], s["d"] // s["heads"], name=f"mha{i}")(x, x, use_causal_mask=True)
    x = L.LayerNormalization(name=f"ln{i}a")(L.Add(name=f"add{i}a")([x, h]))
    h = L.Dense(s["ff"], activation="gelu", name=f"ff{i}a")(x)
    h = L.Dense(s["d"], name=f"ff{i}b")(h)
    return L.LayerNormalization(name=f"ln{i}b")(L.Add(name=f"add{i}b")([x, h]))


def build(s, vocab, nested=False):
    """The language model; `nested`: each block a sub-model (the `sequential_blocks` Keras' GPTQ walks)."""
    tokens = keras.Input((s["seq"],), dtype="int32", name="tokens")
    embed = TokenAndPosition(vocab, s["seq"], s["d"], name="embed")
    x, blocks = embed(tokens), []
    for i in range(2):
        if nested:
            inp = keras.Input((s["seq"], s["d"]))
            blocks.append(keras.Model(inp, block(inp, s, i), name=f"block{i}"))
            x = blocks[-1](x)
        else:
            x = block(x, s, i)
    model = keras.Model(tokens, L.Dense(vocab, name="head")(x), name="lm")
    return model, {"pre_block_layers": [embed], "sequential_blocks": blocks}


def named_layers(model):
    """The model's layers by name, those of its sub-models (the blocks) included (a MultiHeadAttention's
    sublayers are named alike in every block: layers are matched at the model's level, not the leaves)."""
    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(named_layers(layer))
        else:
            found[layer.name] = layer
    return found


def copy_weights(src, dst):
    dst_layers = named_layers(dst)
    for name, layer in named_layers(src).items():
        if layer.weights:
            dst_layers[name].set_weights(layer.get_weights())


# Data, training, evaluation ------------------------------------------------------------------
def windows(ids, seq, count, rng):
    starts = rng.integers(0, len(ids) - seq - 1, size=count)
    return np.stack([ids[i:i + seq + 1] for i in starts])


def evaluate(model, data, batch=64):
    """(perplexity, next-token accuracy) on windows `data` (n, seq + 1)."""
    nll, hits, count = 0.0, 0, 0
    for start in range(0, len(data), batch):
        chunk = data[start:start + batch]
        logits = np.asarray(keras.ops.convert_to_numpy(model(chunk[:, :-1], training=False)), "float64")
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target = chunk[:, 1:]
        nll -= np.take_along_axis(logp, target[..., None], -1).sum()
        hits += int((logits.argmax(-1) == target).sum())
        count += target.size
    return float(np.exp(nll / count)), hits / count


def train(model, ids, s, rng):
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = windows(ids, s["seq"], s["steps"] * s["batch"], rng)
    start = time.perf_counter()
    model.fit(data[:, :-1], data[:, 1:], batch_size=s["batch"], epochs=1, verbose=0)
    return time.perf_counter() - start


# The quantizations ---------------------------------------------------------------------------
def kq_config(spec, attention=True):
    config = kq.QuantConfig(weights=spec, activations=None)
    config.set_layer_type(L.Embedding, None)
    config.set_layer_name("head", None)
    if not attention:
        config.set_layer_type(L.MultiHeadAttention, None)
    return config


def run_kq(model, calib, spec, use_gptq, attention=True):
    start = time.perf_counter()
    qmodel = kq.quantize_model(model, kq_config(spec, attention))
    report = kq.ptq.gptq(qmodel, calib[:, :-1], progress=False) if use_gptq else None
    return qmodel, time.perf_counter() - start, report


def run_keras(model, s, vocab, texts, tokenizer, group_size, calib_count):
    qmodel, structure = build(s, vocab, nested=True)
    copy_weights(model, qmodel)
    before = evaluate(qmodel, windows_for_check)
    config = keras.quantizers.GPTQConfig(
        dataset=texts, tokenizer=tokenizer, weight_bits=4, num_samples=calib_count, sequence_length=s["seq"],
        group_size=group_size, quantization_layer_structure=structure)
    start = time.perf_counter()
    qmodel.quantize("gptq", config=config, filters=lambda layer: layer.name not in ("head", "tokens", "positions"))
    return qmodel, time.perf_counter() - start, before


windows_for_check = None


def run(quick: bool, log=print) -> dict:
    """Train, quantize with each contender and evaluate; the runner's dict (`benchmarks/run.py`)."""
    s = SETTINGS["quick" if quick else "full"]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    tokenizer = CharTokenizer()
    texts = stdlib_docstrings(s["chars"])
    cut = int(0.9 * len(texts))
    train_texts, held_texts = texts[:cut], texts[cut:]
    train_ids = tokenizer.tokenize("\n".join(train_texts))
    held = windows(tokenizer.tokenize("\n".join(held_texts)), s["seq"], 256, rng)
    calib = windows(train_ids, s["seq"], s["calib"], rng)
    log(f"corpus: {len(texts)} stdlib docstrings, {len(train_ids)} training characters; "
        f"backend {keras.backend.backend()}")

    model, _ = build(s, tokenizer.vocab_size)
    seconds = train(model, train_ids, s, rng)
    log(f"trained {s['steps']} steps in {seconds:.0f}s")

    group = s["group"]
    spec = kq.QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=group)
    rows = []

    def row(name, qmodel, seconds=None, note=""):
        ppl, acc = evaluate(qmodel, held)
        rows.append({"model": name, "perplexity": ppl, "next-token acc": acc, "quantize s": seconds, "note": note})
        log(rows[-1])

    global windows_for_check
    windows_for_check = held
    row("float", model)
    keras_rows = {}
    for gs, note in ((128, "Keras defaults (group 128, asymmetric)"), (group, f"group {group}, asymmetric")):
        qmodel, t, before = run_keras(model, s, tokenizer.vocab_size, train_texts, tokenizer, gs, s["calib"])
        keras_rows[gs] = t
        log(f"keras copy before quantize: perplexity {before[0]:.4g}")
        row(f"keras gptq g{gs}", qmodel, t, note)
    qmodel, t, _ = run_kq(model, calib, spec, use_gptq=False)
    row(f"kq nearest g{group}", qmodel, t, "attention kernels per-tensor")
    qmodel, t, report = run_kq(model, calib, spec, use_gptq=True)
    row(f"kq gptq g{group}", qmodel, t, f"attention per-tensor gptq; {t / keras_rows[group]:.2f}x keras time")
    log(report)
    qmodel, t, _ = run_kq(model, calib, spec, use_gptq=True, attention=False)
    row(f"kq gptq g{group}, attention float", qmodel, t, "MLP only")
    log("")
    log(text_table(rows, title=f"4-bit weight-only GPTQ, held-out perplexity ({len(held)} windows of "
                               f"{s['seq']} characters)"))
    return {"rows": rows, "notes": [str(report)]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and corpus")
    args = parser.parse_args(argv)
    run(args.quick, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
