"""Typed reads of event fields: wrong types fall back to the default, text is cut, non-finite numbers are missing."""

import math

import pytest

from potluck.web.fields import MAX_TEXT_CHARS, flag, integer, number, records, text, texts


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ok", "ok"), ("x" * (MAX_TEXT_CHARS + 5), "x" * MAX_TEXT_CHARS), (5, "dflt"), (None, "dflt"), (["a"], "dflt")],
)
def test_text(value: object, expected: str) -> None:
    assert text({"k": value}, "k", default="dflt") == expected


@pytest.mark.parametrize(("value", "expected"), [(3, 3), (True, -1), (2.5, -1), ("3", -1), (None, -1)])
def test_integer_refuses_bools_floats_and_strings(value: object, expected: int) -> None:
    assert integer({"k": value}, "k", default=-1) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, 1.5), (2, 2.0), (math.nan, None), (math.inf, None), (-math.inf, None), (False, None), ("1.0", None)],
)
def test_number_is_finite_or_missing(value: object, expected: float | None) -> None:
    assert number({"k": value}, "k") == expected


def test_flag_records_and_texts_skip_what_is_not_theirs() -> None:
    # Prepare
    event = {"f": 1, "r": [{"a": 1}, "x", None, {"b": 2}, {"c": 3}], "t": ["a", 2, "b" * 600, "c"]}
    # Execute, Assert
    assert flag(event, "f") is False and flag({"f": True}, "f") is True
    assert records(event, "r", max_items=4) == [{"a": 1}, {"b": 2}]
    assert records(event, "missing", max_items=4) == []
    assert texts(event, "t", max_items=3) == ["a", "b" * MAX_TEXT_CHARS]
