"""Plain data and tables for people and scripts: one set of rules for every printout.

`to_jsonable` turns results (numpy scalars, non-finite floats, tuples) into
what `json.dumps` takes; `format_number` writes a number in 4 significant
digits; `text_table` and `markdown_table` lay out rows of dicts.

Example:

>>> print(text_table([{"layer": "conv", "sqnr_db": 41.2345}], ["layer", "sqnr_db"]))
layer  sqnr_db
-----  -------
conv   41.23
"""

import math

__all__ = ["to_jsonable", "format_number", "text_table", "markdown_table", "result_text"]


def _scalar(v):
    """A 0-d numpy value as the Python scalar it holds."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return v.item()
    return v


def to_jsonable(v):
    """`v` with numpy scalars unwrapped, non-finite floats as strings, tuples as lists.

    JSON has no literal for inf or nan, so they become `"inf"`, `"-inf"`,
    `"nan"`; anything else unknown becomes its `str`.
    """
    v = _scalar(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def format_number(v):
    """A table cell: 4 significant digits for floats, blank for None."""
    v = _scalar(v)
    if v is None:
        return ""
    if isinstance(v, float) and not isinstance(v, bool):
        if not math.isfinite(v):
            return str(v)
        if v == 0.0:
            return "0"
        if 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def _columns(rows, columns):
    if columns is not None:
        return list(columns)
    seen = []
    for row in rows:
        seen += [k for k in row if k not in seen]
    return seen


def text_table(rows, columns=None, title=None):
    """Rows (dicts) as aligned plain text; columns default to the keys in first-seen order."""
    columns = _columns(rows, columns)
    body = [[format_number(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def markdown_table(rows, columns=None):
    """Rows (dicts) as a markdown table; columns default to the keys in first-seen order."""
    if not rows:
        return "_no rows_\n"
    columns = _columns(rows, columns)

    def cell(v):
        return format_number(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def result_text(result, title):
    """A benchmark result (`{"rows", "tables", "notes"}`) as text: the rows, each further table, the notes."""
    parts = [text_table(result["rows"], title=title)]
    for name, rows in result.get("tables", {}).items():
        parts += ["", text_table(rows, title=name)]
    notes = result.get("notes", [])
    parts += [f"- {note}" for note in ([notes] if isinstance(notes, str) else notes)]
    return "\n".join(parts)
