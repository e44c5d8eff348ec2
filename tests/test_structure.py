"""The package's shape, checked: small functions and modules, no private reach-ins, no import cycles.

Rules (issue 15, "one place for each idea"):

- no function or method longer than 80 lines (`def` line to last line);
- no module longer than 600 lines;
- no `from keras_quant.x import _name` of another module's private name;
- no `obj._name` where `_name` is not defined in the same module (a module may
  use its own classes' private attributes; another module's are off limits),
  except the few third-party hooks listed in `THIRD_PARTY_PRIVATE` with why;
- no import cycle between modules, counting imports inside functions too;
- nothing lower imports anything higher: config -> ops -> observers -> layers ->
  transform -> (calibration | qat) -> (export | runtime) -> analysis -> the
  package's public face -> cli
  (`LAYERS` ranks every module of the package).

Pure source analysis with `ast`: no TensorFlow, so it runs in a second.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_quant"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600

# Private names of third-party libraries that have no public equivalent, each used
# in one place. (module, attribute): why.
THIRD_PARTY_PRIVATE = {
    ("graph", "_nodes_by_depth"): "Keras Functional: the node order of a graph (no public accessor)",
    ("graph", "_run_through_graph"): "Keras Functional: running the graph with a per-layer hook",
    ("graph", "_flatten_layers"): "Keras Layer: the nested layers of a subclassed model",
    ("graph", "_inbound_nodes"): "Keras Layer: a cloned layer's graph links, reset before reuse",
    ("graph", "_outbound_nodes"): "Keras Layer: a cloned layer's graph links, reset before reuse",
    ("export.flatbuffer", "_modify_model_input_type"): "TFLite converter util: int8 model inputs",
    ("export.flatbuffer", "_modify_model_output_type"): "TFLite converter util: int8 model outputs",
    ("export.flatbuffer", "_remove_redundant_quantize_ops"): "TFLite converter util: the converter's own cleanup",
    ("export.onnx", "_mul_handler"): "tf2onnx TransposeOptimizer: a handler patched for per-channel QDQ",
    ("runtime.tflite_runner", "_get_ops_details"): "LiteRT Interpreter: the op list (no public accessor)",
}


# The package's layers, lowest first. A module may import its own layer and the ones below.
LAYERS = [
    ("version", "errors", "formatting", "progress"),
    ("io", "config"),
    ("ops", "graph"),
    ("observers",),
    ("layers", "data"),
    ("transform",),
    ("calibration", "qat", "quantize"),
    ("ptq", "export", "runtime"),
    ("analysis",),
    ("",),  # keras_quant/__init__.py: the public face
    ("cli",),  # the command line: a user of the public face
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), path, is_package


MODULES = {name: (path, is_package) for name, path, is_package in _modules()}
TREES = {name: ast.parse(path.read_text()) for name, (path, _) in MODULES.items()}


def _short(module):
    return module.removeprefix("keras_quant.")


def _imported(module, node, is_package):
    """(target module, imported name) pairs of an import statement inside the package."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split(".")[0] == "keras_quant"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "keras_quant":
        return []
    return [(target, a.name) for a in node.names]


def test_no_long_functions():
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_long_modules():
    long = [f"{name}: {n}" for name, (path, _) in MODULES.items()
            if (n := path.read_text().count("\n")) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_imports_of_private_names():
    bad = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, imported in _imported(name, node, MODULES[name][1]):
                    if imported and imported.startswith("_") and not imported.startswith("__"):
                        bad.append(f"{name} imports {target}.{imported}")
    assert not bad, bad


def _own_private_names(tree):
    """Private names a module defines: functions, classes, attributes set on self/cls, class fields."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    return {n for n in own if n.startswith("_")}


def test_no_private_reach_ins():
    bad = []
    for name, tree in TREES.items():
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            if node.attr in own or (_short(name), node.attr) in THIRD_PARTY_PRIVATE:
                continue
            bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, bad


def _import_graph():
    graph = {name: set() for name in MODULES}
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, imported in _imported(name, node, MODULES[name][1]):
                    sub = f"{target}.{imported}" if imported else None
                    dest = sub if sub in MODULES else target
                    if dest in MODULES and dest != name:
                        graph[name].add(dest)
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_import_graph())
    assert not cycles, f"import cycles (imports inside functions count): {cycles}"


def _rank(module):
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else ""]


def test_every_module_has_a_layer():
    missing = sorted({name.split(".")[1] for name in MODULES if "." in name} - set(RANK))
    assert not missing, f"add these to LAYERS: {missing}"


def test_nothing_lower_imports_anything_higher():
    bad = [f"{a} imports {b}" for a, targets in _import_graph().items() for b in sorted(targets)
           if _rank(b) > _rank(a)]
    assert not bad, bad


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_cycle_finder(graph, expected):
    assert _cycles(graph) == expected
