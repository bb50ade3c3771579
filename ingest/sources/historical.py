"""Databento's historical API as a source: get_range in chunks, resumed from what is stored.

Each chunk is one ``timeseries.get_range`` request, spooled to a temporary file by the
client and decoded from there, so only one chunk is on disk and only the decoder's buffer
is in memory. The chunk's symbology goes into the pipeline first, then its records.

Resume: a run starts at the later of ``start`` and the earliest of the requested
symbols' latest stored timestamps inside [start, end) (a symbol with nothing stored there
starts at ``start``). The stored series is a time-ordered prefix of what was fetched, so
refetching from that point leaves no gap; the timestamp itself is fetched again, which
the idempotent upserts absorb, so there is no duplicate either.

Retries: 5xx answers, 408/429, timeouts and dropped connections are retried with capped
exponential backoff, a bounded number of times. Any other 4xx is counted as an error with
Databento's message. Either way the run stops at that chunk, so no later data is stored
past a hole that a resumed run would not go back to fill.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import databento
import requests
from databento.common.enums import HistoricalGateway
from databento.common.error import BentoClientError, BentoError, BentoHttpError
from django.core.exceptions import ValidationError as DjangoValidationError

from marketdata.errors import ERR_NAIVE_DATETIME, ValidationError
from marketdata.models import dataset_validator
from marketdata.selectors.feeds import feed_stored_until
from marketdata.timeframes import SCHEMAS

from ..pipeline import run
from ..retry import Backoff
from ..source import FeedStart, Mappings
from ..stats import Stats
from .keys import api_key_get
from .replay import FileStart, decode_error, file_records

log = logging.getLogger(__name__)

SOURCE = "historical"
CHUNK_RECORDS = 4096  # records handed to the pipeline at once
# Statuses worth asking again: the request timed out, or the client is being throttled.
RETRY_STATUSES = frozenset({408, 429})
API_ATTEMPTS = 6  # requests for one window in all before the run stops at it
API_BACKOFF = Backoff(base_s=1.0, cap_s=60.0)  # between them: 1 s, 2 s, 4 s, ... up to 60 s
# Error causes that mean the window was not fetched to its end.
API_ERRORS = ("api_client_error", "api_unavailable", "api_unreadable")

ERR_SCHEMA = "schema {value!r} is not ingested: expected one of " + " ".join(SCHEMAS)
ERR_RANGE = "start {start} must be before end {end}"
ERR_SYMBOLS = "symbols must name at least one raw symbol, e.g. AAPL,MSFT"
ERR_DATASET = "dataset must be a Databento dataset code such as XNAS.ITCH, got {value!r}"
ERR_CHUNK = "chunk must be a positive duration, got {value}"
ERR_API_REFUSED = "historical API refused {dataset} {schema} {lo}..{hi}: {error}"
ERR_API_UNREADABLE = "historical API answer for {dataset} {schema} {lo}..{hi} not read whole: {reason}"
ERR_API_GAVE_UP = "historical API failed {attempts} times for {dataset} {schema} {lo}..{hi}; last: {error}"


@dataclass
class HistoricalStats(Stats):
    """A historical run's stats, with where it resumed and how far it fetched."""

    resumed_from: datetime | None = None
    fetched_until: datetime | None = None
    complete: bool = False
    requests: int = 0

    def summary(self) -> str:
        """One line for the end of a run."""
        resumed = self.resumed_from.isoformat() if self.resumed_from else "no (nothing stored in the window)"
        until = self.fetched_until.isoformat() if self.fetched_until else "nothing"
        return (
            f"{super().summary()}; resumed: {resumed}; fetched until: {until}"
            f"{'' if self.complete else ' (INCOMPLETE)'}; requests={self.requests}"
        )


class HistoricalSource:
    """[start, end) of one (dataset, schema) from the historical API, in chunks, resumed from the store."""

    name = SOURCE

    def __init__(
        self, *, dataset: str, schema: str, symbols: list[str], start: datetime, end: datetime,
        key: str | None = None, gateway: str | None = None, chunk: timedelta = timedelta(days=1),
        backoff: Backoff = API_BACKOFF, attempts: int = API_ATTEMPTS,
    ) -> None:  # fmt: skip
        self.symbols = _validated(dataset=dataset, schema=schema, symbols=symbols, start=start, end=end, chunk=chunk)
        key = api_key_get(source=SOURCE, environ=None if key is None else {"DATABENTO_API_KEY": key})
        self.dataset, self.schema, self.chunk, self.backoff, self.attempts = dataset, schema, chunk, backoff, attempts
        self.start, self.end = start.astimezone(UTC), end.astimezone(UTC)
        self.stored = feed_stored_until(
            dataset=dataset, schema=schema, symbols=self.symbols, start=self.start, end=self.end
        )
        self.first = max(self.start, self.stored) if self.stored is not None else self.start
        self.notes = HistoricalStats(resumed_from=self.stored)
        # The details go in the message itself: the JSON log renders a stdlib record's message, not its extras.
        if self.stored is None:
            log.info("historical %s %s %s: fetching %s..%s", dataset, schema, ",".join(self.symbols), start, end)
        else:
            log.info(
                "historical %s %s %s: resuming from %s (the earliest of the symbols' latest stored), fetching to %s",
                dataset, schema, ",".join(self.symbols), self.first, self.end,
            )  # fmt: skip
        self.client = databento.Historical(key=key, gateway=gateway or HistoricalGateway.BO1)

    def records(self, stopping: threading.Event) -> Generator[object, None, None]:
        """The feed, then each window's Mappings and records; ends early on an API error or ``stopping``."""
        yield FeedStart(self.dataset, self.schema, {})
        with tempfile.TemporaryDirectory(prefix="ingest-historical-") as spool:
            records = _records(
                self.client, dataset=self.dataset, schema=self.schema, symbols=self.symbols,
                windows=chunk_windows(self.start, self.first, self.end, self.chunk), notes=self.notes,
                stopping=stopping, backoff=self.backoff, attempts=self.attempts, spool=Path(spool),
            )  # fmt: skip
            try:
                for item in records:
                    yield item
                    if stopping.is_set():
                        return
            finally:
                records.close()  # release the spooled chunk before its directory goes

    def result(self, stats: Stats, stopping: threading.Event) -> HistoricalStats:
        """The pipeline's stats with what this source noted: where it resumed, how far it fetched."""
        notes = self.notes
        result = HistoricalStats(**vars(stats))
        result.errors.update(notes.errors)
        result.warnings.update(notes.warnings)
        result.last_error = notes.last_error or result.last_error
        result.resumed_from, result.fetched_until, result.requests = self.stored, notes.fetched_until, notes.requests
        result.complete = notes.fetched_until == self.end and not stopping.is_set()
        log.info("historical %s %s done: %s", self.dataset, self.schema, result.summary())
        return result


def run_historical(
    *,
    dataset: str,
    schema: str,
    symbols: list[str],
    start: datetime,
    end: datetime,
    key: str | None = None,
    gateway: str | None = None,
    chunk: timedelta = timedelta(days=1),
    publish: bool = True,
    progress: Callable[[Stats, float], None] | None = None,
    stopping: threading.Event | None = None,
    install_signals: bool = False,
    backoff: Backoff = API_BACKOFF,
    attempts: int = API_ATTEMPTS,
) -> HistoricalStats:
    """Fetch [start, end) of ``schema`` for ``symbols`` in chunks and ingest it, resuming from the store.

    ``key`` is checked (or read from DATABENTO_API_KEY when None) before any request;
    a missing or malformed key raises ApiKeyError. Bad arguments raise ValidationError.
    ``stopping`` (or, with ``install_signals``, SIGTERM or Ctrl-C) ends the fetch early.
    """
    source = HistoricalSource(
        dataset=dataset, schema=schema, symbols=symbols, start=start, end=end, key=key, gateway=gateway, chunk=chunk,
        backoff=backoff, attempts=attempts,
    )  # fmt: skip
    stopping = stopping if stopping is not None else threading.Event()
    stats = run(
        source, symbols=source.symbols, publish=publish, progress=progress, stopping=stopping,
        install_signals=install_signals,
    )  # fmt: skip
    return source.result(stats[dataset], stopping)


def chunk_windows(
    start: datetime, first: datetime, end: datetime, chunk: timedelta
) -> Iterator[tuple[datetime, datetime]]:
    """[lo, hi) windows from ``first`` to ``end``, cut on the grid start + k * chunk.

    Keeping the grid of the original start means a resumed run asks for the rest of the
    interrupted chunk, then the same chunks the first run would have asked for.
    """
    k = (first - start) // chunk
    lo = first
    while lo < end:
        k += 1
        hi = min(start + k * chunk, end)
        if hi > lo:
            yield lo, hi
        lo = hi


def _records(
    client: databento.Historical, *, dataset: str, schema: str, symbols: list[str],
    windows: Iterator[tuple[datetime, datetime]], notes: HistoricalStats, stopping: threading.Event,
    backoff: Backoff, attempts: int, spool: Path,
) -> Generator[object, None, None]:  # fmt: skip
    """Each window's Mappings, then its records; ends early on an API error or a stop request."""
    for lo, hi in windows:
        if stopping.is_set():
            return
        path = _fetch(
            client, dataset=dataset, schema=schema, symbols=symbols, lo=lo, hi=hi, notes=notes, stopping=stopping,
            backoff=backoff, attempts=attempts, spool=spool,
        )  # fmt: skip
        if path is None:
            return
        # Read as replay reads a file, not by DBNStore: a cut or damaged answer is an error
        # (DBNStore only warns, and allocates whatever metadata length the header claims).
        read = Stats()
        try:
            for item in file_records(path, read):
                if isinstance(item, FileStart):
                    mappings = item.metadata.mappings
                    yield Mappings({ticker: [dict(i) for i in spans] for ticker, spans in mappings.items()})
                    continue
                assert isinstance(item, list)  # without raw=True, the reader yields lists of records
                for at in range(0, len(item), CHUNK_RECORDS):  # in lists: runs of them go in as columns
                    yield item[at : at + CHUNK_RECORDS]
        finally:
            path.unlink(missing_ok=True)
        if read.errors:
            # The records before the damage are stored: a rerun resumes from them, as after a crash.
            reason = read.last_error.removeprefix(f"{path}: ")
            notes.error("api_unreadable", ERR_API_UNREADABLE.format(reason=reason, dataset=dataset, schema=schema,
                                                                     lo=lo.isoformat(), hi=hi.isoformat()))  # fmt: skip
            return
        notes.fetched_until = hi


def _fetch(
    client: databento.Historical, *, dataset: str, schema: str, symbols: list[str], lo: datetime, hi: datetime,
    notes: HistoricalStats, stopping: threading.Event | None, backoff: Backoff, attempts: int, spool: Path,
) -> Path | None:  # fmt: skip
    """Download one window to a file in ``spool``, retrying what is transient; None when it gave up."""
    where = {"dataset": dataset, "schema": schema, "lo": lo.isoformat(), "hi": hi.isoformat()}
    for attempt in range(1, attempts + 1):
        path = spool / f"{int(lo.timestamp() * 1e6)}-{attempt}.dbn.zst"
        notes.requests += 1
        try:
            client.timeseries.get_range(
                dataset=dataset, schema=schema, symbols=symbols, stype_in="raw_symbol", start=lo, end=hi, path=path
            )
            return path
        except BentoClientError as exc:
            if exc.http_status not in RETRY_STATUSES:
                notes.error("api_client_error", ERR_API_REFUSED.format(error=exc, **where))
                return None
            error: Exception = exc
        except (BentoError, requests.ConnectionError, requests.Timeout) as exc:
            if _answer_unread(exc, path):
                return path
            # BentoServerError (5xx), or the connection dropped while the body streamed.
            error = exc
        except BaseException as exc:
            if not _answer_unread(exc, path):
                raise
            return path
        path.unlink(missing_ok=True)
        if attempt == attempts:
            notes.error("api_unavailable", ERR_API_GAVE_UP.format(attempts=attempt, error=error, **where))
            return None
        delay = backoff.delay(attempt - 1)
        notes.warnings["api_retry"] += 1
        log.warning(
            "historical %s %s %s..%s: attempt %d failed (%s); retrying in %.1fs",
            dataset, schema, where["lo"], where["hi"], attempt, error, delay,
        )  # fmt: skip
        if stopping is not None:
            if stopping.wait(delay):
                return None
        else:
            time.sleep(delay)
    return None


def _answer_unread(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` is the client failing to read an answer it downloaded whole to ``path``.

    The client (databento 0.88) opens what it downloaded with DBNStore before returning:
    a cut or damaged answer fails there, with a BentoError that is neither an HTTP status
    nor "Error streaming response", or with the decoder's own exceptions. Such an answer
    would be the same again: it goes to the reader (file_records), which says what is wrong.
    """
    if not path.exists():
        return False
    if isinstance(exc, requests.RequestException | BentoHttpError):
        return False
    if isinstance(exc, BentoError):
        return not str(exc).startswith("Error streaming response")
    return isinstance(exc, Exception) or decode_error(exc)


def _validated(
    *, dataset: str, schema: str, symbols: list[str], start: datetime, end: datetime, chunk: timedelta
) -> list[str]:
    """The symbols, stripped and deduplicated in order; ValidationError naming the field otherwise."""
    if schema not in SCHEMAS:
        raise ValidationError(ERR_SCHEMA.format(value=schema), field="schema")
    try:
        dataset_validator(dataset)
    except DjangoValidationError:
        raise ValidationError(ERR_DATASET.format(value=dataset), field="dataset") from None
    cleaned = list(dict.fromkeys(s.strip() for s in symbols if s.strip()))
    if not cleaned:
        raise ValidationError(ERR_SYMBOLS, field="symbols")
    for name, value in (("start", start), ("end", end)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValidationError(ERR_NAIVE_DATETIME.format(field=name, value=value), field=name)
    if not start < end:
        raise ValidationError(ERR_RANGE.format(start=start.isoformat(), end=end.isoformat()), field="start")
    if chunk <= timedelta(0):
        raise ValidationError(ERR_CHUNK.format(value=chunk), field="chunk")
    return cleaned
