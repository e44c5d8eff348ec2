"""Helpers the benchmark scripts share (not a benchmark: `run.py` runs only `bench_*.py`)."""

from keras_quant.formatting import markdown_table


def print_result(result):
    """Print a benchmark's result as `run.py` would write it: its rows, each titled table, its notes."""
    print(markdown_table(result["rows"]))
    for title, rows in result.get("tables", {}).items():
        print(f"\n### {title}\n\n{markdown_table(rows)}")
    for note in result.get("notes", ()):
        print(f"- {note}")
