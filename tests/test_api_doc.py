"""docs/API.md, the public-API reference, is the one docs/generate_api.py writes from the code.

The README points users to it; a public name, signature or docstring that changes without the
reference being regenerated (`python docs/generate_api.py`) fails here.
"""

import importlib.util
import inspect
import pathlib

import keras_quant as kq

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_api", ROOT / "docs" / "generate_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date():
    text = (ROOT / "docs" / "API.md").read_text()
    assert text == _generator().generate(), "docs/API.md is out of date: run python docs/generate_api.py"


def test_reference_names_every_public_name():
    text = (ROOT / "docs" / "API.md").read_text()
    gen = _generator()
    missing = []
    for module in gen.MODULES:
        mod = importlib.import_module(module)
        short = gen._short(module)
        for name in mod.__all__:
            if not inspect.ismodule(getattr(mod, name)) and name != "__version__" and f"`{short}.{name}" not in text:
                missing.append(f"{short}.{name}")
    assert not missing, missing
    for command in ("calibrate", "export", "analyze", "demo"):
        assert f"### `keras-quant {command} --help`" in text


def test_readme_points_to_the_reference_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/API.md" in readme
    assert "../shared" not in readme and "shared/API.md" not in readme
    assert kq.QuantizeWrapper.__doc__.splitlines()[0].strip() in (ROOT / "docs" / "API.md").read_text()


def test_docstring_sections_render_as_markdown():
    gen = _generator()
    doc = '''Summary line.

    Args:
        x: The input,
            on two lines.

    Returns:
        A value.

    Example:

    >>> f(1)
    2
    '''
    text = "\\n".join(gen.render_docstring(doc))
    assert "- `x`: The input, on two lines." in text
    assert "**Returns**" in text and "```python\\n>>> f(1)\\n2\\n```" in text
