"""Run every benchmark and write the day's results.

    python benchmarks/run.py [--quick] [--only NAME ...] [--out DIR]

Discovers `benchmarks/bench_*.py`; each module exposes `run(quick: bool) -> dict`
with a `"rows"` list of flat dicts (one table row each), optional `"notes"`
(a string or a list of strings), optional `"tables"` (`{title: rows}`, more
tables under the first) and optional `"figures"` (`{title: PNG bytes}`, written
as `<out>/<YYYY-MM-DD>-<name>-<title>.png` and shown in the markdown). Writes `<out>/<YYYY-MM-DD>.json` and
`<out>/<YYYY-MM-DD>.md` (one markdown table per benchmark) atomically, with a
description of the machine. A benchmark that raises is recorded with its error
and the others still run; the exit status is then 1.

With `--only`, the day's existing results for the other benchmarks are kept.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Measure this checkout's keras_quant, whatever an editable install points at.
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from keras_quant.formatting import markdown_table, to_jsonable  # noqa: E402  (after the path set-up)
from keras_quant.io import write_atomic as _write_atomic  # noqa: E402
DEFAULT_OUT = HERE / "results"
PREFIX = "bench_"
SCHEMA = 1


# Discovery -------------------------------------------------------------------------
def discover(bench_dir=HERE):
    """`{name: path}` of the `bench_<name>.py` modules in `bench_dir`, sorted by name."""
    bench_dir = Path(bench_dir)
    return {p.stem[len(PREFIX) :]: p for p in sorted(bench_dir.glob(f"{PREFIX}*.py"))}


def load(path):
    """Import a benchmark module from its file (the folder need not be a package)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_kq_benchmarks.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path} has no run(quick) function")
    return module


# Machine description ----------------------------------------------------------------
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes():
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(distribution):
    """Installed version, read from package metadata (importing TensorFlow just for this is slow)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(cwd=HERE.parent):
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        # Untracked source files count too (new modules change what runs); results do not.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(top,exclude)benchmarks/results"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    """Platform, Python, CPU, memory, library versions, Keras backend and git commit."""
    try:
        import keras

        backend = keras.backend.backend()
    except Exception:  # noqa: BLE001
        backend = os.environ.get("KERAS_BACKEND")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_bytes(),
        "keras": _version("keras"),
        "tensorflow": _version("tensorflow"),
        "jax": _version("jax"),
        "numpy": _version("numpy"),
        "keras_backend": backend,
        "git_commit": _git_commit(),
    }


# Output -----------------------------------------------------------------------------
def write_atomic(path, data):
    """Write `data` (text or bytes) to `path` atomically: keras_quant's writer (temp file, fsync,
    rename), after creating the folder."""
    _write_atomic(path, data, make_parents=True)


def _notes(notes):
    if not notes:
        return []
    return [notes] if isinstance(notes, str) else list(notes)


def render_markdown(report):
    """The whole report as markdown: machine, then one section per benchmark."""
    m = report["machine"]
    gib = f"{m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else "?"
    out = [
        f"# Benchmarks {report['date']}",
        "",
        f"- machine: {m.get('cpu_model')} ({m.get('cpu_count')} CPUs, {gib}), {m.get('platform')}",
        f"- python {m.get('python')}, keras {m.get('keras')} (backend: {m.get('keras_backend')}), "
        f"tensorflow {m.get('tensorflow')}, jax {m.get('jax')}, numpy {m.get('numpy')}",
        f"- git commit: {m.get('git_commit')}",
        "",
        "Ratios compare against a reference measured in the same run; absolute times are noisy.",
        "",
    ]
    for name, result in report["benchmarks"].items():
        quick = " (quick)" if result.get("quick") else ""
        out += [f"## {name}{quick}", ""]
        if result.get("error"):
            out += ["**Failed:**", "", "```", result["error"].rstrip(), "```", ""]
            continue
        out.append(markdown_table(result.get("rows", [])))
        for title, rows in (result.get("tables") or {}).items():
            out += [f"### {title}", "", markdown_table(rows)]
        for title, filename in (result.get("figures") or {}).items():
            out += [f"![{title}]({filename})", ""]
        for note in _notes(result.get("notes")):
            out.append(f"- {note}")
        if result.get("seconds") is not None:
            out.append(f"- ran in {result['seconds']:.1f} s")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# Running ----------------------------------------------------------------------------
def run_one(name, path, quick):
    """Run one benchmark; never raises (a failure is recorded under `"error"`)."""
    start = time.perf_counter()
    try:
        result = load(path).run(quick)
        if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
            raise TypeError(f"bench_{name}.run must return a dict with a 'rows' list; got {type(result).__name__}")
        result = dict(result)
    except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
        result = {"rows": [], "error": traceback.format_exc(limit=8)}
    result["quick"] = bool(quick)
    result["seconds"] = time.perf_counter() - start
    result["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return result


def run_all(only=None, quick=False, out_dir=DEFAULT_OUT, bench_dir=HERE, date=None, log=print):
    """Run the benchmarks, write `<out_dir>/<date>.json` and `.md`, return the report dict."""
    found = discover(bench_dir)
    names = list(found) if not only else list(only)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; found {sorted(found)} in {bench_dir}")
    date = date or datetime.date.today().isoformat()
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{date}.json", out_dir / f"{date}.md"

    benchmarks = {}
    if only and json_path.exists():  # keep the day's other results
        try:
            benchmarks = dict(json.loads(json_path.read_text()).get("benchmarks", {}))
        except (OSError, ValueError):
            benchmarks = {}
    for name in names:
        log(f"[{name}] running{' (quick)' if quick else ''} ...")
        result = run_one(name, found[name], quick)
        status = "FAILED" if result.get("error") else "ok"
        log(f"[{name}] {status} in {result['seconds']:.1f} s")
        if result.get("error"):
            log(result["error"])
        figures = result.pop("figures", None) or {}
        if figures:  # PNG bytes -> <date>-<benchmark>-<figure>.png beside the results
            result["figures"] = {}
            for title, data in figures.items():
                filename = f"{date}-{name}-{title}.png"
                write_atomic(out_dir / filename, data)
                result["figures"][title] = filename
        benchmarks[name] = result

    report = {"schema": SCHEMA, "date": date, "machine": machine_info(), "benchmarks": benchmarks}
    write_atomic(json_path, json.dumps(to_jsonable(report), indent=2, sort_keys=False) + "\n")
    write_atomic(md_path, render_markdown(report))
    log(f"wrote {json_path} and {md_path}")
    return report


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a script, not the library: quiet TF's C++ logs
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (well under 2 minutes)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (bench_NAME.py)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: benchmarks/results)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, path in discover().items():
            print(f"{name}\t{path}")
        return 0
    report = run_all(only=args.only, quick=args.quick, out_dir=args.out)
    print(render_markdown(report))
    ran = args.only or list(report["benchmarks"])
    return 1 if any(report["benchmarks"][n].get("error") for n in ran) else 0


if __name__ == "__main__":
    sys.exit(main())
