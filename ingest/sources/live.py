"""The live source: ``databento.Live`` -> a bounded queue -> ``pipeline.run``, reconnecting without holes.

One run is one (dataset, schema) subscription for a list of raw symbols. The official
client runs on an event loop of its own (a thread started here, so nothing else shares
it). Its record callback only enqueues into a bounded ``queue.Queue`` of the current
connection (``live_records.Connection``); the calling thread drains that queue through a
generator into ``ingest.pipeline.run``, whose own bounded queue and batch writer store
and publish.

Back-pressure: when the pipeline is slower than the feed, its queue fills, the generator
stops draining, this queue fills, and the callback *waits* for room (in steps of
``live_records.PUT_WAIT_S``, giving up only when its connection is abandoned). Waiting there blocks the
client's event loop, which is this run's alone: the socket is not read, TCP's window
closes, and the gateway sees a slow reader. That is the one place the client's thread
blocks, on purpose and only for as long as the database is behind; nothing is dropped.

Drops: the connection closing (gateway, network) or the no-data watchdog (nothing at
all, not even a heartbeat, for ``watchdog_s``; the client asks the gateway for heartbeats
well inside that) ends the connection. The run then waits a capped, jittered exponential
backoff and subscribes again with ``start=`` the last stored timestamp of the schema and
symbols (max ``Bar.ts`` of the schema's timeframe, or max ``Trade.ts_event``): Databento's
intraday replay resends everything from there, so the stored series has no hole. The
records of the replay that this run already passed on (the overlap) are recognised by
their bytes (``live_records.Recent``) and dropped before the pipeline, so trades that
share a time and sequence do not get a second ordinal, and bars are not fed to the
anomaly detector twice; the store's idempotent upserts absorb anything beyond that. A gap older than the intraday window
(24 h) is counted (``gap_beyond_intraday_replay``) and logged with the exact
``ingest historical`` command that fills it; the subscription then starts at the
window's edge.

Stop: ``stopping`` set (SIGTERM, Ctrl-C) closes the client gracefully, drains what it had
received into the pipeline, and returns the run's stats once the pipeline has flushed.

Wire protocol (Databento LSG, as databento 0.88 speaks it; one ``key=value|...`` text line
each, ``\\n``-terminated, then DBN): gateway ``lsg_version=V``, ``cram=C``; client
``auth=<sha256_hex("C|KEY")>-<last 5 chars of KEY>|dataset=D|encoding=dbn|ts_out=0|
compression=none|heartbeat_interval_s=N|client=UA``; gateway ``success=1|session_id=S`` or
``success=0|error=TEXT`` (then closes); client ``schema=S|stype_in=raw_symbol|symbols=A,B|
start=NS|snapshot=0|id=0|is_last=1`` (``start`` absent for "from now") and
``start_session=0``; gateway streams DBN: metadata, a SymbolMappingMsg per resolved
symbol, then records, heartbeats (SystemMsg) when idle, ErrorMsg on failures.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import datetime

import databento
import databento_dbn as dbn
from databento.common.error import BentoError
from django.utils import timezone

from marketdata.errors import ERR_NAIVE_DATETIME, MarketDataError, ValidationError
from marketdata.selectors.feeds import feed_last_stored
from marketdata.services.feeds import feed_status_errors_add
from marketdata.timeframes import SCHEMAS

from ..pipeline import run
from ..retry import Backoff
from ..source import FeedStart
from ..stats import Stats
from ..symbology import NS_PER_S, date_or_dt_ns, ns_datetime
from .live_records import Connection, Recent

log = logging.getLogger(__name__)

DEFAULT_PORT = 13000  # Databento's live gateways all listen on 13000
INTRADAY_REPLAY_NS = 24 * 3600 * NS_PER_S  # how far back the live gateway replays
REPLAY_EDGE_MARGIN_NS = 60 * NS_PER_S  # start a clamped replay this far inside the window
POLL_S = 0.1  # the drain's wait for a record before it checks the connection
STOP_DRAIN_S = 5.0  # at most this long to drain a stopping client
CLOSE_WAIT_S = 2.0  # at most this long for a dropped client to finish closing
BACKOFF_BASE_S = 0.5  # first reconnect waits up to this, doubling to backoff_max
STABLE_S = 30.0  # a connection that lived this long resets the backoff
HEARTBEAT_MIN_S, HEARTBEAT_MAX_S = 5, 1800  # the gateway's allowed heartbeat intervals
FATAL_CODES = {dbn.ErrorCode.AUTH_FAILED, dbn.ErrorCode.API_KEY_DEACTIVATED, dbn.ErrorCode.INVALID_SUBSCRIPTION}

ERR_AUTH = "the Databento live gateway {gateway} rejected the API key (DATABENTO_API_KEY): {error}"
ERR_FATAL = "the Databento live gateway {gateway} ended the session: {error} (code {code}); not retrying"
ERR_GATEWAY = "--gateway must be HOST or HOST:PORT with a port in 1-65535, got {value!r}"
ERR_SCHEMA = "live ingests one of {schemas}; got schema {value!r}"
ERR_SYMBOLS = "live needs at least one symbol, e.g. --symbols AAPL,MSFT"
ERR_CONNECT = "connection to the live gateway {gateway} failed: {error}"
ERR_LOST = "the live gateway {gateway} connection was lost: {error}"
ERR_WATCHDOG = "no record, not even a heartbeat, from the live gateway {gateway} for {seconds:g} s"
ERR_EXHAUSTED = "gave up after {count} reconnect attempts to the live gateway {gateway} (max_reconnects)"
ERR_GAP = (
    "gap older than Databento's 24 h intraday replay: {schema} for {symbols} from {start} to {end} cannot be "
    "replayed by the live gateway; fill it with: python manage.py ingest historical --dataset {dataset} "
    "--schema {schema} --symbols {symbols} --start {start} --end {end}"
)


class LiveAuthError(MarketDataError):
    """The live gateway refused the API key (or deactivated it, or refused the subscription)."""

    code = "live_auth"


def parse_gateway(value: str | None) -> tuple[str | None, int]:
    """``HOST:PORT`` (or ``HOST``, ``[v6]:PORT``) -> (host, port); None means Databento's own gateway."""
    if value is None or not value.strip():
        return None, DEFAULT_PORT
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValidationError(ERR_GATEWAY.format(value=value), field="gateway")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValidationError(ERR_GATEWAY.format(value=value), field="gateway")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValidationError(ERR_GATEWAY.format(value=value), field="gateway")
    return host, int(port_text)


def reconnect_backoff(backoff_max: float) -> Backoff:
    """The waits before reconnects: BACKOFF_BASE_S doubling up to ``backoff_max``, with equal jitter."""
    return Backoff(base_s=BACKOFF_BASE_S, cap_s=backoff_max, jitter=True)


def last_stored_ns(*, schema: str, symbols: list[str]) -> int | None:
    """The latest stored timestamp of ``schema`` for ``symbols`` (ns), or None when nothing is stored."""
    latest = feed_last_stored(schema=schema, symbols=symbols)
    return date_or_dt_ns(latest) if latest is not None else None


class LiveFeed:
    """The reconnecting record source of one live run; ``records(stopping)`` is what the pipeline iterates.

    About 270 lines, on purpose: the generator, one connection's life (open, stream,
    drain, close), the resume point and the client's event loop share one reconnect state
    (attempts, the last records seen, the current connection); split, each part would
    reach into the others' fields.
    """

    def __init__(
        self,
        *,
        dataset: str,
        schema: str,
        symbols: list[str],
        key: str,
        start_ns: int | None,
        gateway: str | None,
        backoff_max: float,
        watchdog_s: float,
        max_reconnects: int | None,
    ) -> None:
        self.dataset = dataset
        self.schema = schema
        self.symbols = symbols
        self.key = key
        self.start_ns = start_ns
        self.host, self.port = parse_gateway(gateway)
        self.gateway = f"{self.host or dataset.lower().replace('.', '-') + '.lsg.databento.com'}:{self.port}"
        self.stopping = threading.Event()  # records() is given the run's
        self.backoff = reconnect_backoff(backoff_max)
        self.watchdog_s = watchdog_s
        self.max_reconnects = max_reconnects
        self.heartbeat_s = int(min(max(watchdog_s / 3, HEARTBEAT_MIN_S), HEARTBEAT_MAX_S))
        if watchdog_s <= self.heartbeat_s:
            log.warning(
                "live: the watchdog is shorter than the gateway's shortest heartbeat; a quiet feed will reconnect",
                extra={"watchdog_s": watchdog_s, "heartbeat_s": self.heartbeat_s},
            )
        self.stats = Stats()
        self.recent = Recent()
        self.first_start_ns = start_ns
        self.subscriptions: list[int | None] = []  # the start of every subscription made
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.current: Connection | None = None

    # -- the generator -----------------------------------------------------------

    name = "live"

    def records(self, stopping: threading.Event) -> Generator[object, None, None]:
        """The feed, then every record of every connection until ``stopping`` (or max_reconnects) ends the run.

        What the client already received when ``stopping`` is set is still handed over (drained).
        """
        self.stopping = stopping
        yield FeedStart(self.dataset, self.schema, {})
        self._start_loop()
        try:
            yield from self._run()
        finally:
            self._shutdown()

    def _run(self) -> Iterator[object]:
        resume_ns = self._within_window(self.start_ns) if self.start_ns is not None else None
        attempts = 0  # reconnect attempts so far
        failures = 0  # consecutive connections that delivered nothing
        first = True
        while not self.stopping.is_set():
            if not first:
                if self.max_reconnects is not None and attempts >= self.max_reconnects:
                    self.stats.error("reconnects_exhausted", ERR_EXHAUSTED.format(count=attempts, gateway=self.gateway))
                    return
                delay = self.backoff.delay(failures)
                log.info("live: reconnecting", extra={"gateway": self.gateway, "delay_s": round(delay, 3)})
                if self.stopping.wait(delay):
                    return
                attempts += 1
                self.stats.warnings["reconnects"] += 1
                resume_ns = self._resume_point()
            first = False
            conn = self._open(resume_ns)
            if conn is None:
                failures += 1
                continue
            outcome = yield from self._stream(conn)
            if outcome == "stopped":
                return
            if conn.data or time.monotonic() - conn.opened >= STABLE_S:
                failures = 0
            else:
                failures += 1

    # -- one connection ------------------------------------------------------------

    def _open(self, start_ns: int | None) -> Connection | None:
        """Connect, authenticate, subscribe and start; None on a failure worth retrying."""
        client = databento.Live(
            key=self.key, gateway=self.host, port=self.port, heartbeat_interval_s=self.heartbeat_s, loop=self.loop
        )
        conn = Connection(client=client, start_ns=start_ns)
        client.add_callback(conn.on_record, conn.on_error)
        self.subscriptions.append(start_ns)
        try:
            client.subscribe(
                dataset=self.dataset, schema=self.schema, symbols=self.symbols, stype_in="raw_symbol", start=start_ns
            )
        except BentoError as exc:
            text = str(exc)
            self._close(conn)
            # The client words its own transport failures; anything else is the gateway's answer to auth.
            if text.startswith(("Connection to ", "Authentication with ")):
                self.stats.error("connect_failed", ERR_CONNECT.format(gateway=self.gateway, error=text))
                return None
            raise LiveAuthError(ERR_AUTH.format(gateway=self.gateway, error=text)) from None
        try:
            client.start()
        except (BentoError, ValueError) as exc:  # closed between authentication and start
            self._close(conn)
            self.stats.error("connect_failed", ERR_CONNECT.format(gateway=self.gateway, error=exc))
            return None
        self.current = conn
        log.info(
            "live: subscribed",
            extra={
                "gateway": self.gateway, "dataset": self.dataset, "schema": self.schema, "symbols": self.symbols,
                "start": ns_datetime(start_ns).isoformat() if start_ns is not None else "now",
                "session_id": client.session_id,
            },
        )  # fmt: skip
        return conn

    def _stream(self, conn: Connection) -> Generator[object, None, str]:
        """Drain one connection until it drops, the watchdog fires, or the run stops."""
        while True:
            if self.stopping.is_set():
                yield from self._drain_stopping(conn)
                return "stopped"
            try:
                record = conn.inbox.get(timeout=POLL_S)
            except queue.Empty:
                if not conn.client.is_connected():
                    # Callbacks run before the connection is marked lost: everything it got is queued.
                    if conn.inbox.empty():
                        reason = self._close(conn)
                        self.stats.error("connection_lost", ERR_LOST.format(gateway=self.gateway, error=reason))
                        return "lost"
                    continue
                if time.monotonic() - conn.last_seen > self.watchdog_s:
                    self._close(conn)
                    self.stats.error(
                        "watchdog_timeout", ERR_WATCHDOG.format(gateway=self.gateway, seconds=self.watchdog_s)
                    )
                    return "silent"
                continue
            passed = self._accept(conn, record)
            if passed is not None:
                yield passed

    def _drain_stopping(self, conn: Connection) -> Iterator[object]:
        """Close the client gracefully and pass on everything it had received."""
        log.info("live: stopping; draining what was received", extra={"queued": conn.inbox.qsize()})
        conn.client.stop()
        deadline = time.monotonic() + STOP_DRAIN_S
        while time.monotonic() < deadline:
            try:
                record = conn.inbox.get(timeout=POLL_S)
            except queue.Empty:
                if not conn.client.is_connected() and conn.inbox.empty():
                    break
                continue
            passed = self._accept(conn, record)
            if passed is not None:
                yield passed
        left = conn.inbox.qsize()
        if left:
            self.stats.error("stop_drain_timeout", f"{left} received records were not drained within {STOP_DRAIN_S} s")
        self._close(conn)

    def _accept(self, conn: Connection, record: object) -> object | None:
        """The record to pass to the pipeline, or None (a replay's overlap)."""
        if isinstance(record, dbn.OHLCVMsg | dbn.TradeMsg):
            conn.data += 1
            if self.first_start_ns is None:
                metadata = conn.client.metadata
                self.first_start_ns = metadata.start if metadata is not None and metadata.start else time.time_ns()
            if self.recent.seen(record):
                self.stats.skip("replay_overlap")
                return None
        elif isinstance(record, dbn.ErrorMsg):
            log.error("live: gateway error", extra={"code": str(record.code), "error": record.err})
            if record.code in FATAL_CODES:
                self._close(conn)
                raise LiveAuthError(ERR_FATAL.format(gateway=self.gateway, error=record.err, code=record.code))
        return record

    def _close(self, conn: Connection) -> str:
        """Abandon ``conn`` (its callback stops waiting) and close its client; returns why it closed."""
        conn.abandoned.set()
        if self.current is conn:
            self.current = None
        reason = "closed by the gateway"
        try:
            if conn.client.is_connected():
                conn.client.terminate()
            conn.client.block_for_close(timeout=CLOSE_WAIT_S)
        except BentoError as exc:
            reason = str(exc) or type(exc).__name__
        except Exception as exc:  # a client already torn down; its reason is gone
            reason = repr(exc)
        return reason

    # -- where to resume -----------------------------------------------------------

    def _resume_point(self) -> int | None:
        """The start of a gap-fill subscription: the last stored timestamp, within the replay window."""
        stored = last_stored_ns(schema=self.schema, symbols=self.symbols)
        start = stored if stored is not None else self.first_start_ns
        if start is None:
            return None  # nothing was ever received: live from now
        start = self._within_window(start)
        resent = self.recent.expect_replay(start)
        log.info(
            "live: filling the gap by intraday replay",
            extra={"start": ns_datetime(start).isoformat(), "stored": stored is not None, "resent": resent},
        )
        return start

    def _within_window(self, start_ns: int) -> int:
        """``start_ns``, or the replay window's edge (with the gap counted and logged) when it is older."""
        edge = time.time_ns() - INTRADAY_REPLAY_NS + REPLAY_EDGE_MARGIN_NS
        if start_ns >= edge:
            return start_ns
        message = ERR_GAP.format(
            schema=self.schema, symbols=",".join(self.symbols), dataset=self.dataset,
            start=ns_datetime(start_ns).isoformat(), end=ns_datetime(edge).isoformat(),
        )  # fmt: skip
        self.stats.error("gap_beyond_intraday_replay", message)
        log.error(message)
        return edge

    # -- the client's event loop ---------------------------------------------------------

    def _start_loop(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="databento-live", daemon=True)
        self.thread.start()

    def _shutdown(self) -> None:
        if self.current is not None:
            self._close(self.current)
        loop, thread = self.loop, self.thread
        if loop is None or thread is None:
            return

        async def settle() -> None:
            for _ in range(3):  # let aborted transports report their loss
                await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout=CLOSE_WAIT_S)
        except Exception:
            log.exception("live: the client's event loop did not settle")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=CLOSE_WAIT_S)
        if not thread.is_alive():
            loop.close()


def _validate(*, schema: str, symbols: list[str], start: datetime | None) -> int | None:
    if schema not in SCHEMAS:
        raise ValidationError(ERR_SCHEMA.format(schemas=", ".join(SCHEMAS), value=schema), field="schema")
    if not symbols:
        raise ValidationError(ERR_SYMBOLS, field="symbols")
    if start is None:
        return None
    if timezone.is_naive(start):
        raise ValidationError(ERR_NAIVE_DATETIME.format(field="start", value=start), field="start")
    return date_or_dt_ns(start)


def _merge(into: Stats, feed: Stats) -> None:
    into.errors.update(feed.errors)
    into.warnings.update(feed.warnings)
    into.skipped.update(feed.skipped)
    if feed.last_error:
        into.last_error = feed.last_error


def run_live(
    *,
    dataset: str,
    schema: str,
    symbols: list[str],
    key: str,
    start: datetime | None = None,
    gateway: str | None = None,
    publish: bool = True,
    progress: Callable[[Stats, float], None] | None = None,
    stopping: threading.Event | None = None,
    install_signals: bool = False,
    backoff_max: float = 30.0,
    watchdog_s: float = 30.0,
    max_reconnects: int | None = None,
) -> Stats:
    """Ingest a live subscription until ``stopping`` is set (with ``install_signals``, by SIGTERM or Ctrl-C too).

    ``gateway`` is ``HOST:PORT`` (None: Databento's own gateway for the dataset). ``start``
    (aware) asks the first subscription for intraday replay from then; None means from
    now. Reconnects wait a jittered exponential backoff capped at ``backoff_max`` seconds;
    ``max_reconnects`` (None: no limit) ends the run, counted as ``reconnects_exhausted``.
    Raises LiveAuthError when the gateway refuses the key, ValidationError on bad
    arguments, IngestLockedError when another ingester holds (dataset, schema).

    The source's own counts join the pipeline's: errors ``connect_failed``,
    ``connection_lost``, ``watchdog_timeout``, ``gap_beyond_intraday_replay``,
    ``reconnects_exhausted``; warnings ``reconnects``; skipped ``replay_overlap``.
    """
    start_ns = _validate(schema=schema, symbols=symbols, start=start)
    feed = LiveFeed(
        dataset=dataset, schema=schema, symbols=symbols, key=key, start_ns=start_ns, gateway=gateway,
        backoff_max=backoff_max, watchdog_s=watchdog_s, max_reconnects=max_reconnects,
    )  # fmt: skip
    stats = run(
        feed, symbols=symbols, publish=publish, progress=progress, stopping=stopping, install_signals=install_signals
    )[dataset]
    _merge(stats, feed.stats)
    if feed.stats.errors:  # the source's own, added to the feed status the pipeline left at the end of the run
        feed_status_errors_add(
            dataset=dataset, schema=schema, errors=sum(feed.stats.errors.values()),
            skipped=sum(feed.stats.skipped.values()), last_error=feed.stats.last_error,
        )  # fmt: skip
    log.info("live: run ended", extra={"summary": stats.summary(), "subscriptions": len(feed.subscriptions)})
    return stats
