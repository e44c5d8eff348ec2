"""keras_quant.formatting: the rules every table and JSON printout follows."""

import json
import math

import numpy as np
import pytest

from keras_quant.formatting import format_number, markdown_table, text_table, to_jsonable


@pytest.mark.parametrize(
    "value, cell",
    [(None, ""), (0.0, "0"), (1234.5678, "1235"), (0.5, "0.5"), (1e-9, "1.000e-09"), (math.nan, "nan"),
     (True, "True"), (7, "7"), (np.float32(2.5), "2.5"), (1.23456, "1.235"), (123456.0, "1.235e+05")],
)
def test_format_number(value, cell):
    assert format_number(value) == cell


def test_markdown_table_escapes_and_orders_columns():
    text = markdown_table([{"a": 1.5, "b": "x|y"}, {"c": None, "a": 2}])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.5 | x\\|y |  |", "| 2 |  |  |"]
    assert markdown_table([]) == "_no rows_\n"


def test_text_table():
    text = text_table([{"a": 1.23456, "b": "x"}, {"a": 123456.0, "b": "yy"}], ["a", "b"], "T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["a", "b"]
    assert lines[3].split() == ["1.235", "x"]
    assert lines[4].split() == ["1.235e+05", "yy"]


def test_to_jsonable_round_trips_through_json():
    data = {"inf": math.inf, "nan": math.nan, "np": np.float64(1.5), "t": (1, np.int32(2)), 3: [None, True]}
    out = json.loads(json.dumps(to_jsonable(data)))
    assert out == {"inf": "inf", "nan": "nan", "np": 1.5, "t": [1, 2], "3": [None, True]}


def test_result_text_prints_rows_tables_and_notes():
    from keras_quant.formatting import result_text

    text = result_text({"rows": [{"case": "a", "ratio": 1.5}], "tables": {"More": [{"b": 2}]}, "notes": ["n1"]}, "T")
    lines = text.splitlines()
    assert lines[0] == "T" and "ratio" in lines[1] and "More" in lines and lines[-1] == "- n1"
    assert result_text({"rows": [], "notes": "one note"}, "Empty").splitlines()[-1] == "- one note"
