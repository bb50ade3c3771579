"""Times from people and clients: accepted forms, and naive times refused by name."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from marketdata.errors import ValidationError
from marketdata.timeparse import time_parse


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
    "text", ["", "yesterday", "2024-01-02", "2024-13-02T00:00:00Z", "-5", "99999999999999999", "\u00b9", "\u0663"]
)
def test_malformed_times_are_refused(text):
    with pytest.raises(ValidationError, match=r"^start is not a time"):
        time_parse(text, field="start")
