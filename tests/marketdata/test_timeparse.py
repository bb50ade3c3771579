"""Times from people and clients: accepted forms, and naive times refused by name."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from marketdata.errors import ValidationError
from marketdata.timeparse import TIME_MAX, TIME_MIN, time_parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02T14:30:00Z", datetime(2024, 1, 2, 14, 30, tzinfo=UTC)),
        ("2024-01-02T09:30:00-05:00", datetime(2024, 1, 2, 14, 30, tzinfo=UTC)),
        ("2024-01-02 14:30:00.250+00:00", datetime(2024, 1, 2, 14, 30, 0, 250000, tzinfo=UTC)),
        ("1704205800000", datetime(2024, 1, 2, 14, 30, tzinfo=UTC)),
        ("0", datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_accepted_forms(text, expected):
    assert time_parse(text, field="start") == expected


def test_naive_time_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match=r"^end has no UTC offset: '2024-01-02T14:30:00'") as info:
        time_parse("2024-01-02T14:30:00", field="end")
    assert info.value.field == "end"


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "2024-01-02", "2024-13-02T00:00:00Z", "-5", "\u00b9", "\u0663", "2024-01-02T14:30:00Z\x00",
     "2024-01-02T14:30:00\x00Z", "2024-01-02T14:30:00\x1bZ", "2024-01-02T14:30:00\u200bZ"],
)  # fmt: skip
def test_malformed_times_are_refused(text):
    with pytest.raises(ValidationError, match=r"^start is not a time"):
        time_parse(text, field="start")


@pytest.mark.parametrize(
    "text",
    ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-01:00",
     "1969-12-31T23:59:59.999999Z", "2262-04-11T23:47:16.000001Z", "9223372036001", "99999999999999999",
     "9" * 5000],
)  # fmt: skip
def test_times_out_of_range_are_refused_naming_the_range(text):
    with pytest.raises(ValidationError, match=r"^end is out of range: .*1970-01-01T00:00:00Z to 2262-04-11T23:47:16Z$"):
        time_parse(text, field="end")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1970-01-01T00:00:00Z", TIME_MIN), ("1970-01-01T01:00:00+01:00", TIME_MIN), ("0", TIME_MIN),
     ("2262-04-11T23:47:16Z", TIME_MAX), ("2262-04-11T22:47:16-01:00", TIME_MAX), ("9223372036000", TIME_MAX)],
)  # fmt: skip
def test_the_ends_of_the_range_are_accepted(text, expected):
    assert time_parse(text, field="start") == expected
