"""Shared fixtures: the real PostgreSQL (pytest-django's test database) and the real Redis."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings
from hypothesis import settings as hypothesis_settings

from marketdata.models import Symbol
from marketdata.storage import timescaledb_enabled


def _samples_dir() -> Path:
    """The shared Databento samples: $MARKETDATA_SAMPLES, else ../shared beside the checkout, else /work/shared."""
    candidates = [
        os.environ.get("MARKETDATA_SAMPLES", ""),
        str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "databento"),
        "/work/shared/data/databento",
    ]
    for candidate in filter(None, candidates):
        if Path(candidate).is_dir():
            return Path(candidate)
    return Path(candidates[1])


SAMPLES = _samples_dir()

# CI replays the same examples every run (a red build must mean a change broke something);
# local runs keep exploring new ones.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture
def samples() -> Path:
    """The Databento sample files shipped beside the project."""
    if not SAMPLES.is_dir():
        pytest.fail(f"Databento samples not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture
def make_symbol(db: None) -> Callable[..., Symbol]:
    """Create a symbol (factory)."""
    counter = iter(range(1_000_000))

    def make(ticker: str | None = None, dataset: str = "XNAS.ITCH", **kwargs: object) -> Symbol:
        return Symbol.objects.create(ticker=ticker or f"SYM{next(counter)}", dataset=dataset, **kwargs)

    return make


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A client on the test Redis database, flushed before and after."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def timescaledb(db: None) -> None:
    """Skip unless the test database runs the TimescaleDB path."""
    if not timescaledb_enabled():
        # make test's TimescaleDB run sets this: there a missing extension is a failure, not a skip.
        if os.environ.get("MARKETDATA_EXPECT_TIMESCALEDB") == "1":
            pytest.fail("MARKETDATA_EXPECT_TIMESCALEDB=1 but the test database has no TimescaleDB extension")
        pytest.skip("TimescaleDB is not installed on this PostgreSQL server (plain PostgreSQL path)")


def dbn_records(path: Path) -> list[object]:
    """Decode a DBN file (plain or zstd) with Databento's own reader."""
    import databento

    return list(databento.DBNStore.from_file(path))
