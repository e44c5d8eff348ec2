"""Write docs/API.md, the public-API reference, from the code's own docstrings.

    python docs/generate_api.py            # rewrite docs/API.md
    python docs/generate_api.py --check    # exit 1 if docs/API.md is out of date

Every public name is one that a module lists in `__all__`: the package itself (`kq`) and its
public modules. For each the reference gives the signature and the docstring (Google style:
`Args:` / `Returns:` / `Raises:` / `Attributes:` / `Example:` sections become headed lists and
code blocks); a class also lists its own public methods and properties. The command line's
`--help` texts close the file. tests/test_api_doc.py fails when the file is stale, so the
reference changes in the same commit as the code it describes.
"""

import argparse
import contextlib
import inspect
import io
import os
import pathlib
import re
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "API.md"
sys.path.insert(0, str(ROOT))  # this checkout's keras_quant, installed or not
MODULES = ("keras_quant", "keras_quant.ops", "keras_quant.observers", "keras_quant.calibration",
           "keras_quant.layers", "keras_quant.qat", "keras_quant.ptq", "keras_quant.export",
           "keras_quant.runtime", "keras_quant.analysis", "keras_quant.errors")
SECTIONS = {"Args", "Arguments", "Returns", "Yields", "Raises", "Attributes", "Example", "Examples",
            "Note", "Notes", "Warning"}
# Methods every Keras layer / callback overrides: documented by Keras, not repeated here.
KERAS_OVERRIDES = {"build", "call", "get_config", "compute_output_shape", "compute_output_spec",
                   "on_train_begin", "on_train_end", "on_test_begin", "on_test_end", "on_predict_begin",
                   "on_predict_end", "on_train_batch_end", "on_test_batch_end", "on_predict_batch_end",
                   "on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "set_model"}
HEADER = """# keras_quant API reference

Generated from the docstrings by `python docs/generate_api.py`; do not edit by hand.
Import the package as `kq` (`import keras_quant as kq`). The public names are those listed
below: the package's own and those of its public modules (`kq.ops`, `kq.observers`, ...).
Errors are `kq.errors` classes; every one is a `kq.errors.KerasQuantError`.
"""


def _short(name):
    return "kq" + name[len("keras_quant"):]


def _signature(obj):
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _section_lines(title, body):
    """One docstring section as markdown lines."""
    out = [f"**{title}**", ""]
    body = textwrap.dedent("\n".join(body)).strip("\n")
    if title in ("Example", "Examples"):  # an unindented doctest below the heading is fenced on its own
        return out + (["```python", body, "```", ""] if body.strip() else [])
    items = []
    for line in body.splitlines():
        entry = re.match(r"^(\S[^:]{0,60}):\s*(.*)$", line)
        if entry and not line.startswith(" ") and title not in ("Returns", "Yields", "Note", "Notes", "Warning"):
            items.append(f"- `{entry.group(1)}`: {entry.group(2)}".rstrip())
        elif items and line.strip():
            items[-1] += " " + line.strip()
        elif line.strip():
            items.append(line.strip() if not items else line.strip())
    return out + items + [""]


def render_docstring(doc):
    """A Google-style docstring as markdown lines."""
    if not doc:
        return ["*(no docstring)*", ""]
    lines = inspect.cleandoc(doc).splitlines()
    out, i, fence = [], 0, False
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^([A-Z][a-z]+):\s*$", line)
        if head and head.group(1) in SECTIONS and not fence:
            body, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            out += _section_lines(head.group(1), body)
            continue
        if line.startswith(">>>") and not fence:  # a bare doctest block: fence it
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["```python"] + block + ["```"]
            continue
        fence = fence != line.strip().startswith("```")
        out.append(line)
        i += 1
    return out + [""]


def _own_members(cls):
    """The public methods and properties `cls` (or a keras_quant base) defines itself."""
    members = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") or (name in KERAS_OVERRIDES and name != "from_config"):
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if isinstance(value, property) or inspect.isfunction(func):
            members.append((name, value))
    return members


def render_object(qualname, obj):
    lines = []
    if inspect.isclass(obj):
        lines += [f"### class `{qualname}`", "", "```python", f"{qualname}{_signature(obj)}", "```", ""]
        lines += render_docstring(obj.__doc__)
        for name, member in _own_members(obj):
            if isinstance(member, property):
                lines += [f"#### property `{qualname}.{name}`", ""]
                lines += render_docstring(inspect.getdoc(member))
                continue
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            kind = "classmethod " if isinstance(member, classmethod) else ""
            lines += [f"#### {kind}`{qualname}.{name}`", "", "```python", f"{name}{_signature(func)}", "```", ""]
            lines += render_docstring(inspect.getdoc(getattr(obj, name)))  # a base class's when it has none
    elif callable(obj):
        lines += [f"### `{qualname}`", "", "```python", f"{qualname}{_signature(obj)}", "```", ""]
        lines += render_docstring(obj.__doc__)
    else:
        value = re.sub(r" at 0x[0-9a-f]+", "", repr(obj))
        if len(value) > 200 and isinstance(obj, dict):  # a registry: its keys say what it holds
            value = "{" + ", ".join(f"{k!r}: ..." for k in obj) + "}"
        value = value if len(value) <= 200 else value[:197] + "..."
        lines += [f"### `{qualname}`", "", "```python", f"{qualname} = {value}", "```", ""]
    return lines


def _anchor(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def _homes():
    """`{id(obj): qualname}` of every object a public submodule documents (the package's own names point there)."""
    import importlib

    homes = {}
    for module in MODULES[1:]:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not inspect.ismodule(obj) and (inspect.isclass(obj) or callable(obj)):
                homes.setdefault(id(obj), (f"{_short(module)}.{name}", inspect.isclass(obj)))
    return homes


def render_module(module, homes):
    import importlib

    mod = importlib.import_module(module)
    short = _short(module)
    lines = [f"## `{short}`", ""] + render_docstring(mod.__doc__)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.ismodule(obj) or name == "__version__":
            continue
        home = homes.get(id(obj)) if module == MODULES[0] else None
        if home:
            heading = f"{'class ' if home[1] else ''}`{home[0]}`"
            lines += [f"### `{short}.{name}`", "", f"The same object as [{heading}](#{_anchor(heading)}).", ""]
            continue
        lines += render_object(f"{short}.{name}", obj)
    return lines


def render_cli():
    from keras_quant.cli import build_parser

    parser = build_parser()
    lines = ["## Command line: `keras-quant`", "",
             "The same commands run as `python -m keras_quant.cli ...`.", ""]
    helps = [("keras-quant --help", parser.format_help())]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for name, command in sub.choices.items():
        helps.append((f"keras-quant {name} --help", command.format_help()))
    for title, text in helps:
        lines += [f"### `{title}`", "", "```text", text.rstrip(), "```", ""]
    return lines


def generate():
    """The reference's text."""
    os.environ["COLUMNS"] = "100"  # argparse wraps --help to the terminal; fixed for a stable file
    lines = HEADER.splitlines() + ["", "## Contents", ""]
    lines += [f"- [`{_short(m)}`](#{_short(m).replace('.', '')})" for m in MODULES]
    lines += ["- [Command line](#command-line-keras-quant)", ""]
    with contextlib.redirect_stdout(io.StringIO()):
        homes = _homes()
        for module in MODULES:
            lines += render_module(module, homes)
        lines += render_cli()
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print("docs/API.md is out of date: run python docs/generate_api.py", file=sys.stderr)
            return 1
        return 0
    from keras_quant.io import write_atomic

    write_atomic(OUT, text.encode())
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
