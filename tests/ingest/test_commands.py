"""The ingest command's checks that come before any connection."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

ARGS = ["--dataset", "XNAS.ITCH", "--schema", "ohlcv-1m", "--symbols", "AAPL"]
WINDOW = ["--start", "2024-01-02T00:00:00Z", "--end", "2024-01-03T00:00:00Z"]


@pytest.mark.django_db
@pytest.mark.parametrize("source", ["historical", "live"])
def test_missing_key_is_a_clear_error(monkeypatch, source):
    monkeypatch.delenv("DATABENTO_API_KEY", raising=False)
    with pytest.raises(CommandError, match=r"^DATABENTO_API_KEY is not set"):
        call_command("ingest", source, *ARGS, *(WINDOW if source == "historical" else []))


@pytest.mark.django_db
@pytest.mark.parametrize("source", ["historical", "live"])
def test_malformed_key_is_a_clear_error(monkeypatch, source):
    monkeypatch.setenv("DATABENTO_API_KEY", "db-tooshort")
    with pytest.raises(CommandError, match=r"^DATABENTO_API_KEY is malformed"):
        call_command("ingest", source, *ARGS, *(WINDOW if source == "historical" else []))


def test_naive_start_is_refused_by_name():
    with pytest.raises(CommandError, match="start has no UTC offset"):
        call_command("ingest", "historical", *ARGS, "--start", "2024-01-02T00:00:00", "--end", "2024-01-03T00:00:00Z")


@pytest.mark.parametrize("bad", [["--speed", "0"], ["--speed", "fast"], ["--symbols", ","]])
def test_bad_replay_options(bad):
    with pytest.raises(CommandError):
        call_command("ingest", "replay", "some.dbn", *bad)


def test_speed_and_max_exclude_each_other():
    with pytest.raises(CommandError, match="not allowed with argument"):
        call_command("ingest", "replay", "some.dbn", "--speed", "2", "--max")
