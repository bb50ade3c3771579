"""What the /v1 views and the event loop's fast path (marketdata.api.hot) answer with, in one place.

- the hot cache's side of an answer: where it is kept (``CacheSlot``, ``cache_slot``),
  what a round trip found (``cache_read``), and keeping a computed body (``cache_write``);
- the symbols this process remembers (``symbol_get``, ``symbols_by_ticker``), the
  entitlement rule that answers a symbol not entitled as an unknown one (``entitled``),
  and validated queries (``validated``, memoised);
- the /v1/ohlcv answer: its slot, a cached read counted, the body computed from the
  database and kept, and the page before it prefetched (``ohlcv_*``).

The views (marketdata.api.views) call these in Django's request cycle; the fast path calls
the same functions from the event loop, so the two cannot answer differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from datetime import datetime
from functools import cache as cache_fn
from functools import lru_cache, partial
from typing import Any, NamedTuple
from urllib.parse import urlencode

import orjson
from django.conf import settings
from django.db import connection
from django.utils import timezone
from rest_framework.serializers import Serializer

from marketdata.cache.local import LocalCache
from marketdata.cache.prefetch import filling, prefetch, prefetched_note, prefetched_take
from marketdata.cache.redis_client import mget
from marketdata.cache.versions import cached_set, changes_key, entry_body, entry_key, version_key
from marketdata.columns import micros
from marketdata.errors import ERR_UNKNOWN_SYMBOL, UnknownSymbolError
from marketdata.selectors.bar_text import BarPageText, bar_page_text
from marketdata.selectors.bars import BarOut
from marketdata.selectors.symbols import SymbolRef, symbol_ref, symbol_refs
from marketdata.timeframes import DURATIONS, bucket_ceil, bucket_start, source_candidates
from marketdata.wire import bar_json, data_ts, ts_text
from ops import metrics

JSON = "application/json"


def bar_text(bar: BarOut) -> str:
    return bar_json(bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.anomalies, bar.final)


def _micros(ts: datetime | None) -> str:
    return "-" if ts is None else str(int(ts.timestamp() * 1_000_000))


def _clock(tf: str, end: datetime | None, now: datetime) -> str:
    """The part of a cache key that time alone changes.

    A resampled bar turns final when its bucket closes: an answer holding a forming bar
    holds only until the current ``tf`` bucket ends. A page wholly before the current
    bucket changes only with the data (the version).
    """
    if end is not None and bucket_ceil(end, tf) <= bucket_start(now, tf):
        return "closed"
    return str(int(bucket_start(now, tf).timestamp()))


class CacheSlot(NamedTuple):
    """Where an answer is kept: under ``stable`` when only new data can change it, else ``clocked``.

    ``keys`` are what the request's round trip fetches: the symbol's version and change
    log, then the entries (``stable`` and, for an answer that may hold a forming bar,
    ``clocked``). ``hi`` (microseconds) is the open time before which every bar the
    answer depends on lies (None: no end); ``candidates`` the stored timeframes it may
    be built from, preferred first.
    """

    keys: list[str]
    stable: str
    clocked: str | None
    hi: int | None = None
    candidates: tuple[str, ...] = ()


def cache_slot(*, symbol_id: int, what: str, tf: str, end: datetime | None) -> CacheSlot:
    """Where the answer may be cached.

    An answer whose bars are all final (every stored timeframe, and resampled pages of
    closed buckets) changes only when the symbol's data does, which bumps its version; it
    is kept under a key without the clock, so it survives bucket edges. An answer with a
    forming bar also carries the current bucket in its key.
    """
    clock = _clock(tf, end, timezone.now())
    head = [version_key(symbol_id), changes_key(symbol_id)]
    # Resampled buckets reach past an unaligned end: the answer depends on bars before its ceiling.
    hi = None if end is None else micros(bucket_ceil(end, tf))
    candidates = _candidates(tf)
    if clock == "closed":
        key = entry_key(symbol_id, f"{what}|closed")
        return CacheSlot([*head, key], key, key, hi, candidates)
    stable, clocked = entry_key(symbol_id, f"{what}|final"), entry_key(symbol_id, f"{what}|{clock}")
    return CacheSlot([*head, stable, clocked], stable, clocked, hi, candidates)


@cache_fn
def _candidates(tf: str) -> tuple[str, ...]:
    return tuple(source_candidates(tf))


class CacheRead(NamedTuple):
    """A slot's fetched values: the body if one was cached that still holds, and the version read."""

    body: bytes | None
    version: int


def cache_read(slot: CacheSlot, values: list[Any]) -> CacheRead:
    version, changes = int(values[0] or 0), values[1]
    for value in values[2:]:
        body = entry_body(version, value, changes=changes, candidates=slot.candidates)
        if body is not None:
            return CacheRead(body, version)
    return CacheRead(None, version)


def cache_write(
    slot: CacheSlot, read: CacheRead | None, value: bytes, *, all_final: bool, base: str | None = None
) -> None:
    """Keep a computed answer under the version read before computing it (nothing when Redis was down)."""
    if read is not None:
        cached_set(
            key=slot.stable if all_final else slot.clocked, version=read.version, value=value,
            base=base, hi=slot.hi if base is not None else None,
        )  # fmt: skip


def hot_cache_on() -> bool:
    return bool(getattr(settings, "API_HOT_CACHE", True))


known_symbols: LocalCache[str, SymbolRef] = LocalCache()


def entitled(symbol: SymbolRef, allowed: set[str] | None, *, ticker: str, field: str) -> SymbolRef:
    """``symbol`` if the caller may read its dataset, else the very error an unknown ticker gets.

    A 403 naming the dataset would tell anyone which tickers exist (and where).
    """
    if allowed is not None and symbol.dataset not in allowed:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field=field)
    return symbol


def symbol_get(ticker: str) -> SymbolRef:
    """symbol_ref, remembered for a few seconds (symbol changes through the ORM end it at once)."""
    hit = known_symbols.get(ticker)
    if hit is not None:
        return hit
    generation = known_symbols.generation()
    ref = symbol_ref(ticker=ticker)
    known_symbols.put(ticker, ref, generation=generation)
    return ref


@lru_cache(maxsize=4096)
def validated(serializer_class: type[Serializer], items: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    # Validation depends on nothing but the parameters: a chart's repeated query is checked once.
    serializer = serializer_class(data=dict(items))
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def ohlcv_slot(q: dict[str, Any], symbol: SymbolRef, base_url: str) -> CacheSlot | None:
    """Where a /v1/ohlcv answer is cached (None: the hot cache is off)."""
    if not hot_cache_on():
        return None
    start, end, cursor = q.get("start"), q.get("end"), q.get("cursor")
    what = "|".join(
        ("ohlcv", q["tf"], _micros(start), _micros(end), str(q["limit"]), cursor or "-", q["anomalies"], base_url)
    )
    return cache_slot(symbol_id=symbol.id, what=what, tf=q["tf"], end=end)


def ohlcv_cached(slot: CacheSlot, fetched: list[Any]) -> CacheRead:
    """The slot's cached answer, if one holds; counted as a hit or a miss."""
    read = cache_read(slot, fetched)
    result = "miss" if read.body is None else "hit"
    metrics.API_CACHE.labels("ohlcv", result).inc()
    metrics.CACHE_REQUESTS.labels(result).inc()
    return read


def ohlcv_answer(
    q: dict[str, Any], symbol: SymbolRef, base_url: str, slot: CacheSlot | None, read: CacheRead | None
) -> bytes:
    """The /v1/ohlcv body from the database, kept in the cache under the version ``read`` found.

    A miss (Redis answered, the entry did not hold) also has the page before it filled in
    the background (``ohlcv_prefetch``).
    """
    body, page = _ohlcv_fill(q, symbol, base_url, slot, read)
    if slot is not None and read is not None and not connection.in_atomic_block:
        # Not inside a transaction: the prefetch's thread would not read what this one sees.
        ohlcv_prefetch(ohlcv_previous(q, page), symbol, base_url)
    return body


def _ohlcv_fill(
    q: dict[str, Any], symbol: SymbolRef, base_url: str, slot: CacheSlot | None, read: CacheRead | None
) -> tuple[bytes, BarPageText]:
    """The body from the database and its page, stored under the version ``read`` found (a miss's fill)."""
    tf, end, limit = q["tf"], q.get("end"), q["limit"]
    # While it is computed no prefetch of the same entry starts.
    with filling((slot.stable, slot.clocked)) if slot is not None and read is not None else nullcontext():
        page = bar_page_text(
            ticker=symbol.ticker, tf=tf, start=q.get("start"), end=end, limit=limit, cursor=q.get("cursor"),
            exclude_anomalies=q["anomalies"] == "exclude", symbol_id=symbol.id,
        )  # fmt: skip
        next_url = None
        if page.next_cursor is not None:
            params = {"symbol": symbol.ticker, "tf": tf}
            if end is not None:
                params["end"] = ts_text(end)
            params.update(limit=str(limit), anomalies=q["anomalies"], cursor=page.next_cursor)
            next_url = base_url + "?" + urlencode(params)
        # The page's bars are PostgreSQL's text of wire.bar_json (bar_page_text): spliced, not re-parsed.
        results = orjson.Fragment(f"[{page.bars}]")
        body = orjson.dumps({"symbol": symbol.ticker, "tf": tf, "results": results, "next": next_url})
        if slot is not None:
            cache_write(slot, read, body, all_final=page.all_final, base=page.base)
    return body, page


def ohlcv_previous(q: dict[str, Any], page: BarPageText | None) -> dict[str, Any] | None:
    """The query a chart sends after this page when it scrolls back (None: no such page).

    A page with start and end: the same span just before it. A latest page (no start;
    ``limit`` bars before end or now): the span of ``limit`` bars of ``tf`` ending at its
    first bar, as start and end; none when it holds fewer than ``limit`` bars (nothing
    is older). Pages with a cursor or only a start are read forwards, empty pages end
    the data: none. Without ``page`` (a cached answer): start and end pages only.
    """
    start, end = q.get("start"), q.get("end")
    if q.get("cursor") is not None or (page is not None and not page.count):
        return None
    if start is not None:
        if end is None:
            return None
        return {**q, "start": start - (end - start), "end": start}
    if page is None or page.count < q["limit"] or not page.bars:
        return None
    first = datetime.fromisoformat(data_ts(page.bars))  # the first bar's (wire.bar_json's text)
    return {**q, "start": first - q["limit"] * DURATIONS[q["tf"]], "end": first}


def ohlcv_prefetch(q: dict[str, Any] | None, symbol: SymbolRef, base_url: str) -> None:
    """Fill the cache entry of the query ``q`` (ohlcv_previous's) in the background; never waits."""
    slot = None if q is None else ohlcv_slot(q, symbol, base_url)
    if q is not None and slot is not None:
        prefetch((slot.stable, slot.clocked), partial(ohlcv_prefetch_fill, q, symbol, base_url, slot))


def ohlcv_hit(q: dict[str, Any], symbol: SymbolRef, base_url: str, slot: CacheSlot) -> None:
    """A cached answer was served: the first read of a prefetched page prefetches the page before it.

    A chart scrolling back reads page after page; prefetching only after misses would
    leave every other page a miss.
    """
    if prefetched_take((slot.stable, slot.clocked)):
        ohlcv_prefetch(ohlcv_previous(q, None), symbol, base_url)


def ohlcv_prefetch_fill(q: dict[str, Any], symbol: SymbolRef, base_url: str, slot: CacheSlot) -> Any:
    """A prefetch: the slot's entry if it does not hold already, filled as a miss is (not counted as one)."""
    values = mget(slot.keys)
    if values is None:
        return "unavailable"
    read = cache_read(slot, values)
    if read.body is not None:
        return "cached"
    body, page = _ohlcv_fill(q, symbol, base_url, slot, read)
    if page.count:
        prefetched_note((slot.stable, slot.clocked))
    return "filled", (read.version, body)


def symbols_by_ticker(tickers: Iterable[str], allowed: set[str] | None) -> dict[str, SymbolRef]:
    """The symbols of ``tickers``; the first one unknown or not entitled (which look the same) raises."""
    wanted = list(tickers)
    found = {t: ref for t in wanted if (ref := known_symbols.get(t)) is not None}
    if len(found) < len(wanted):
        generation = known_symbols.generation()
        for ticker, ref in symbol_refs(tickers=[t for t in wanted if t not in found]).items():
            found[ticker] = ref
            known_symbols.put(ticker, ref, generation=generation)
    for ticker in wanted:
        if ticker not in found:
            raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbols")
        entitled(found[ticker], allowed, ticker=ticker, field="symbols")
    return found
