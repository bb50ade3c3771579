"""The /v1 endpoints: validate with DRF, call one selector, write the JSON text with marketdata.wire.

/v1/ohlcv and /v1/latest go through the Redis hot cache (marketdata.cache): the key holds
the symbol's version, which the ingester bumps after each commit, and every parameter of
the answer, so a hit is never older than the database; the value is the body itself.
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
import redis
from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from marketdata import cache
from marketdata.access import dataset_check, datasets_allowed
from marketdata.errors import ERR_UNKNOWN_SYMBOL, UnknownSymbolError
from marketdata.models import Symbol
from marketdata.selectors import (
    BarOut,
    BarPageText,
    LeaderboardRow,
    SymbolRef,
    bar_page_text,
    latest_bars,
    leaderboard,
    symbol_ref,
    trade_list,
)
from marketdata.timeframes import DURATIONS, bucket_ceil, bucket_start, source_candidates
from marketdata.wire import bar_json, price_text, trade_json, ts_text
from ops import metrics

from . import serializers as s
from .renderers import FirstRendererNegotiation
from .throttling import ApiRateThrottle

JSON = "application/json"
COUNTED_KEY = cache.COUNTED_KEY

ERRORS = {
    400: OpenApiResponse(s.ErrorResponse, description="A bad parameter (field names it)."),
    401: OpenApiResponse(s.ErrorResponse, description="No or bad credentials."),
    403: OpenApiResponse(
        s.ErrorResponse,
        description=(
            "Not entitled to the dataset named by `dataset`. A symbol of a dataset you are not entitled to "
            "answers 404, as an unknown symbol does."
        ),
    ),
    429: OpenApiResponse(s.ErrorResponse, description="Rate limited; see Retry-After."),
}
ERRORS_404 = {
    **ERRORS,
    404: OpenApiResponse(s.ErrorResponse, description="Unknown symbol, or one of a dataset you are not entitled to."),
}


def _text(value: str) -> str:
    """A JSON string literal."""
    return orjson.dumps(value).decode()


def _bar_text(bar: BarOut) -> str:
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


def _cache_slot(*, symbol_id: int, what: str, tf: str, end: datetime | None) -> CacheSlot:
    """Where the answer may be cached.

    An answer whose bars are all final (every stored timeframe, and resampled pages of
    closed buckets) changes only when the symbol's data does, which bumps its version; it
    is kept under a key without the clock, so it survives bucket edges. An answer with a
    forming bar also carries the current bucket in its key.
    """
    clock = _clock(tf, end, timezone.now())
    head = [cache.version_key(symbol_id), cache.changes_key(symbol_id)]
    # Resampled buckets reach past an unaligned end: the answer depends on bars before its ceiling.
    hi = None if end is None else cache.micros(bucket_ceil(end, tf))
    candidates = _candidates(tf)
    if clock == "closed":
        key = cache.entry_key(symbol_id, f"{what}|closed")
        return CacheSlot([*head, key], key, key, hi, candidates)
    stable, clocked = cache.entry_key(symbol_id, f"{what}|final"), cache.entry_key(symbol_id, f"{what}|{clock}")
    return CacheSlot([*head, stable, clocked], stable, clocked, hi, candidates)


@cache_fn
def _candidates(tf: str) -> tuple[str, ...]:
    return tuple(source_candidates(tf))


class CacheRead(NamedTuple):
    """A slot's fetched values: the body if one was cached that still holds, and the version read."""

    body: bytes | None
    version: int


def _cache_read(slot: CacheSlot, values: list[Any]) -> CacheRead:
    version, changes = int(values[0] or 0), values[1]
    for value in values[2:]:
        body = cache.entry_body(version, value, changes=changes, candidates=slot.candidates)
        if body is not None:
            return CacheRead(body, version)
    return CacheRead(None, version)


def _cache_write(
    slot: CacheSlot, read: CacheRead | None, value: bytes, *, all_final: bool, base: str | None = None
) -> None:
    """Keep a computed answer under the version read before computing it (nothing when Redis was down)."""
    if read is not None:
        cache.cached_set(
            key=slot.stable if all_final else slot.clocked, version=read.version, value=value,
            base=base, hi=slot.hi if base is not None else None,
        )  # fmt: skip


def _hot_cache() -> bool:
    return bool(getattr(settings, "API_HOT_CACHE", True))


_symbols: cache.LocalCache[str, SymbolRef] = cache.LocalCache()


def _entitled(symbol: SymbolRef, allowed: set[str] | None, *, ticker: str, field: str) -> SymbolRef:
    """``symbol`` if the caller may read its dataset, else the very error an unknown ticker gets.

    A 403 naming the dataset would tell anyone which tickers exist (and where).
    """
    if allowed is not None and symbol.dataset not in allowed:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field=field)
    return symbol


def _symbol(ticker: str) -> SymbolRef:
    """symbol_ref, remembered for a few seconds (symbol changes through the ORM end it at once)."""
    hit = _symbols.get(ticker)
    if hit is not None:
        return hit
    generation = _symbols.generation()
    ref = symbol_ref(ticker=ticker)
    _symbols.put(ticker, ref, generation=generation)
    return ref


@lru_cache(maxsize=4096)
def _validated(serializer_class: type[Serializer], items: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    # Validation depends on nothing but the parameters: a chart's repeated query is checked once.
    serializer = serializer_class(data=dict(items))
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class ApiView(APIView):
    """Base of the /v1 views: JSON whatever the Accept header, parameters from the query string.

    Every request makes one Redis round trip before its handler: the rate-limit counters,
    the cache epoch (are this process's token and symbol look-ups still good?) and the
    cache entries the view names in ``prepare``. Errors found by ``prepare`` (a bad
    parameter, an unknown symbol, a dataset not entitled) are raised after the rate
    limit, in the order the handlers would raise them.
    """

    content_negotiation_class = FirstRendererNegotiation
    renderer_classes = [JSONRenderer]
    throttle_classes: list[Any] = []  # check_throttles below counts in the round trip
    # What prepare() asks the round trip to fetch, and what it fetched (None: Redis down).
    fetch_keys: list[str]
    fetched: list[Any] | None

    def prepare(self, request: Request) -> list[str]:
        """Validate what can be validated before the handler; return the Redis keys the handler will need."""
        return []

    def check_throttles(self, request: Request) -> None:
        throttle = ApiRateThrottle()
        checks = throttle.plan(request)
        deferred: Exception | None = None
        try:
            keys = self.prepare(request)
        except Exception as exc:  # raised after the rate limit, as the handler would have
            deferred, keys = exc, []
        # The event loop's fast path (marketdata.api.hot) may have counted this request already.
        counted = request.META.get(COUNTED_KEY)
        if counted is not None and len(counted) != len(checks):
            counted = None
        incr = [] if counted is not None else [(c.key, c.period + 1) for c in checks]
        result = cache.round_trip(incr=incr, get=[cache.EPOCH_KEY, *keys])
        counts: list[int] | None = None
        self.fetched = None
        if result is not None:
            counts, values = result
            counts = counted if counted is not None else counts
            self.fetched = values[1:]
            if cache.epoch_note(values[0]):
                # A token, entitlement, user or symbol changed somewhere: look the caller
                # and the symbols up again (the local caches are empty now).
                request._authenticate()  # type: ignore[attr-defined]  # DRF's own, as Request.user calls it
                self.check_permissions(request)
                deferred = None
                try:
                    keys = self.prepare(request)
                except Exception as exc:
                    deferred, keys = exc, []
                self.fetched = cache.mget(keys) if keys else []
        if not throttle.decide(checks, counts):
            self.throttled(request, throttle.wait() or 1)
        if deferred is not None:
            raise deferred

    def query(self, serializer_class: type[Serializer]) -> dict[str, Any]:
        """Validated query parameters; an empty value counts as absent (``?dataset=&search=``)."""
        s.query_utf8_check(self.request.META.get("QUERY_STRING", ""))
        items = tuple(sorted((key, value) for key, value in self.request.query_params.items() if value != ""))
        return dict(_validated(serializer_class, items))

    def page_url(self, params: dict[str, str]) -> str:
        """The absolute URL of this endpoint with these parameters (never the caller's token)."""
        return self.request.build_absolute_uri(self.request.path) + "?" + urlencode(params)


class OhlcvView(ApiView):
    """Bars of one symbol, ascending by open time; the latest page when neither start nor cursor is given."""

    def prepare(self, request: Request) -> list[str]:
        self.q = q = self.query(s.OhlcvQuery)
        self.symbol = symbol = _entitled(
            _symbol(q["symbol"]), datasets_allowed(request.user), ticker=q["symbol"], field="symbol"
        )
        self.base_url = self.request.build_absolute_uri(self.request.path)
        self.slot = ohlcv_slot(q, symbol, self.base_url)
        return [] if self.slot is None else self.slot.keys

    @extend_schema(
        operation_id="ohlcv",
        parameters=[s.OhlcvQuery],
        responses={200: s.OhlcvResponse, **ERRORS_404},
        description=(
            "Bars with start <= ts < end (bar open times), ascending. With neither start nor cursor: the "
            "latest `limit` bars before end. `next` is the URL of the next page, or null. Anomalous bars "
            "are included and flagged unless anomalies=exclude."
        ),
    )
    def get(self, request: Request) -> HttpResponse:
        read = None
        if self.slot is not None and self.fetched is not None:
            read = ohlcv_cached(self.slot, self.fetched)
            if read.body is not None:
                if not connection.in_atomic_block:  # as for a miss: a prefetch's thread would not see this one's rows
                    ohlcv_hit(self.q, self.symbol, self.base_url, self.slot)
                return HttpResponse(read.body, content_type=JSON)
        return HttpResponse(ohlcv_answer(self.q, self.symbol, self.base_url, self.slot, read), content_type=JSON)


def ohlcv_slot(q: dict[str, Any], symbol: SymbolRef, base_url: str) -> CacheSlot | None:
    """Where a /v1/ohlcv answer is cached (None: the hot cache is off)."""
    if not _hot_cache():
        return None
    start, end, cursor = q.get("start"), q.get("end"), q.get("cursor")
    what = "|".join(
        ("ohlcv", q["tf"], _micros(start), _micros(end), str(q["limit"]), cursor or "-", q["anomalies"], base_url)
    )
    return _cache_slot(symbol_id=symbol.id, what=what, tf=q["tf"], end=end)


def ohlcv_cached(slot: CacheSlot, fetched: list[Any]) -> CacheRead:
    """The slot's cached answer, if one holds; counted as a hit or a miss."""
    read = _cache_read(slot, fetched)
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
    with cache.filling((slot.stable, slot.clocked)) if slot is not None and read is not None else nullcontext():
        page = bar_page_text(
            ticker=symbol.ticker, tf=tf, start=q.get("start"), end=end, limit=limit, cursor=q.get("cursor"),
            exclude_anomalies=q["anomalies"] == "exclude", symbol_id=symbol.id,
        )  # fmt: skip
        next_url = "null"
        if page.next_cursor is not None:
            params = {"symbol": symbol.ticker, "tf": tf}
            if end is not None:
                params["end"] = ts_text(end)
            params.update(limit=str(limit), anomalies=q["anomalies"], cursor=page.next_cursor)
            next_url = _text(base_url + "?" + urlencode(params))
        body = f'{{"symbol":{_text(symbol.ticker)},"tf":"{tf}","results":[{page.bars}],"next":{next_url}}}'.encode()
        if slot is not None:
            _cache_write(slot, read, body, all_final=page.all_final, base=page.base)
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
    if page is None or page.count < q["limit"] or not page.bars.startswith(_FIRST_TS):
        return None
    first = datetime.fromisoformat(page.bars[len(_FIRST_TS) : page.bars.index('"', len(_FIRST_TS))])
    return {**q, "start": first - q["limit"] * DURATIONS[q["tf"]], "end": first}


_FIRST_TS = '{"ts":"'  # how wire.bar_json writes a bar's first field


def ohlcv_prefetch(q: dict[str, Any] | None, symbol: SymbolRef, base_url: str) -> None:
    """Fill the cache entry of the query ``q`` (ohlcv_previous's) in the background; never waits."""
    slot = None if q is None else ohlcv_slot(q, symbol, base_url)
    if q is not None and slot is not None:
        cache.prefetch((slot.stable, slot.clocked), partial(_prefetch_fill, q, symbol, base_url, slot))


def ohlcv_hit(q: dict[str, Any], symbol: SymbolRef, base_url: str, slot: CacheSlot) -> None:
    """A cached answer was served: the first read of a prefetched page prefetches the page before it.

    A chart scrolling back reads page after page; prefetching only after misses would
    leave every other page a miss.
    """
    if cache.prefetched_take((slot.stable, slot.clocked)):
        ohlcv_prefetch(ohlcv_previous(q, None), symbol, base_url)


def _prefetch_fill(q: dict[str, Any], symbol: SymbolRef, base_url: str, slot: CacheSlot) -> Any:
    """A prefetch: the slot's entry if it does not hold already, filled as a miss is (not counted as one)."""
    values = cache.mget(slot.keys)
    if values is None:
        return "unavailable"
    read = _cache_read(slot, values)
    if read.body is not None:
        return "cached"
    body, page = _ohlcv_fill(q, symbol, base_url, slot, read)
    if page.count:
        cache.prefetched_note((slot.stable, slot.clocked))
    return "filled", (read.version, body)


class TradesView(ApiView):
    """Trades of one symbol, ascending; the latest page when neither start nor cursor is given."""

    @extend_schema(
        operation_id="trades",
        parameters=[s.TradesQuery],
        responses={200: s.TradesResponse, **ERRORS_404},
        description="Trades with start <= ts < end, ascending by (ts_event, publisher, sequence).",
    )
    def get(self, request: Request) -> HttpResponse:
        q = self.query(s.TradesQuery)
        symbol = _entitled(
            symbol_ref(ticker=q["symbol"]), datasets_allowed(request.user), ticker=q["symbol"], field="symbol"
        )
        end = q.get("end")
        page = trade_list(ticker=symbol.ticker, start=q.get("start"), end=end, limit=q["limit"], cursor=q.get("cursor"))
        next_url = "null"
        if page.next_cursor is not None:
            params = {"symbol": symbol.ticker}
            if end is not None:
                params["end"] = ts_text(end)
            params.update(limit=str(q["limit"]), cursor=page.next_cursor)
            next_url = _text(self.page_url(params))
        body = (
            f'{{"symbol":{_text(symbol.ticker)},"results":['
            + ",".join(trade_json(t.ts_event, t.price, t.size, t.side) for t in page.trades)
            + f'],"next":{next_url}}}'
        )
        return HttpResponse(body.encode(), content_type=JSON)


def _symbols_by_ticker(tickers: Iterable[str], allowed: set[str] | None) -> dict[str, SymbolRef]:
    """The symbols of ``tickers``; the first one unknown or not entitled (which look the same) raises."""
    wanted = list(tickers)
    found = {t: ref for t in wanted if (ref := _symbols.get(t)) is not None}
    if len(found) < len(wanted):
        generation = _symbols.generation()
        rows = Symbol.objects.filter(ticker__in=[t for t in wanted if t not in found]).values_list(
            "id", "ticker", "dataset"
        )
        for row in rows:
            ref = found[row[1]] = SymbolRef(*row)
            _symbols.put(ref.ticker, ref, generation=generation)
    for ticker in wanted:
        if ticker not in found:
            raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbols")
        _entitled(found[ticker], allowed, ticker=ticker, field="symbols")
    return found


class LatestView(ApiView):
    """The most recent bar of each symbol asked for."""

    def prepare(self, request: Request) -> list[str]:
        self.q = q = self.query(s.LatestQuery)
        tickers: list[str] = q["symbols"]
        self.symbols = symbols = _symbols_by_ticker(tickers, datasets_allowed(request.user))
        self.slots: dict[str, CacheSlot] = {}
        if not _hot_cache():
            return []
        for ticker in tickers:
            self.slots[ticker] = _cache_slot(
                symbol_id=symbols[ticker].id, what=f"latest|{q['tf']}", tf=q["tf"], end=None
            )
        return [key for slot in self.slots.values() for key in slot.keys]

    @extend_schema(
        operation_id="latest",
        parameters=[s.LatestQuery],
        responses={200: s.LatestResponse, **ERRORS_404},
        description="The latest bar of each ticker (forming bars have final=false); null where there is none.",
    )
    def get(self, request: Request) -> HttpResponse:
        q, slots = self.q, self.slots
        tickers: list[str] = q["symbols"]
        tf = q["tf"]
        texts: dict[str, str] = {}
        reads: dict[str, CacheRead] = {}
        if slots and self.fetched is not None:
            at = 0
            for ticker in tickers:
                slot = slots[ticker]
                reads[ticker] = read = _cache_read(slot, self.fetched[at : at + len(slot.keys)])
                at += len(slot.keys)
                metrics.API_CACHE.labels("latest", "miss" if read.body is None else "hit").inc()
                metrics.CACHE_REQUESTS.labels("miss" if read.body is None else "hit").inc()
                if read.body is not None:
                    texts[ticker] = read.body.decode()
        missing = [t for t in tickers if t not in texts]
        if missing:
            for ticker, bar in latest_bars(tickers=missing, tf=tf).items():
                texts[ticker] = "null" if bar is None else _bar_text(bar)
                if ticker in slots:
                    _cache_write(
                        slots[ticker], reads.get(ticker), texts[ticker].encode(), all_final=bar is None or bar.final
                    )
        body = f'{{"tf":"{tf}","results":{{' + ",".join(f"{_text(t)}:{texts[t]}" for t in tickers) + "}}"
        return HttpResponse(body.encode(), content_type=JSON)


class LeaderboardView(ApiView):
    """Symbols ranked by their latest bar's volume or change from the previous close."""

    @extend_schema(
        operation_id="leaderboard",
        parameters=[s.LeaderboardQuery],
        responses={200: s.LeaderboardResponse, **ERRORS},
        description=(
            "Active symbols of the datasets you are entitled to, ranked (descending) by the volume of their "
            "latest tf bar, or by that bar's close against the previous bar's close in percent. Each symbol's "
            "own latest bar counts; its ts says which."
        ),
    )
    def get(self, request: Request) -> HttpResponse:
        q = self.query(s.LeaderboardQuery)
        metric, tf, limit = q["metric"], q["tf"], q["limit"]
        datasets = datasets_allowed(request.user)
        rows = _leaderboard_hot(metric=metric, tf=tf, limit=limit, datasets=datasets) if _hot_cache() else None
        if rows is None:
            rows = leaderboard(metric=metric, tf=tf, limit=limit, datasets=datasets)
        entries = []
        for row in rows:
            prev = "null" if row.prev_close is None else price_text(row.prev_close)
            change = "null" if row.change_pct is None else format(row.change_pct.normalize(), "f")
            entries.append(
                f'{{"rank":{row.rank},"symbol":{_text(row.ticker)},"dataset":{_text(row.dataset)},'
                f'"bar":{_bar_text(row.bar)},"prev_close":{prev},"change_pct":{change}}}'
            )
        body = f'{{"metric":"{metric}","tf":"{tf}","results":[' + ",".join(entries) + "]}"
        return HttpResponse(body.encode(), content_type=JSON)


def _leaderboard_hot(*, metric: str, tf: str, limit: int, datasets: set[str] | None) -> list[LeaderboardRow] | None:
    """selectors.leaderboard's answer from the Redis sets the ingester keeps; None when Redis cannot give it."""
    if datasets is not None and not datasets:
        return []
    symbols = Symbol.objects.filter(active=True).order_by("ticker")
    if datasets is not None:
        symbols = symbols.filter(dataset__in=sorted(datasets))
    # Ties go by ticker in the database's collation, as the statement orders them: by this list's order.
    known = {
        sid: (ticker, dataset, n)
        for n, (sid, ticker, dataset) in enumerate(symbols.values_list("id", "ticker", "dataset"))
    }
    try:
        found = cache.leaderboard_read(metric=metric, tf=tf, limit=limit, candidates=sorted(known))
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("get").inc()
        found = None
    metrics.API_CACHE.labels("leaderboard", "miss" if found is None else "hit").inc()
    if found is None:
        return None
    # The statement's order exactly: the metric (Decimal for change_pct) descending, then the ticker.
    found.sort(key=lambda e: (-(e.volume if metric == "volume" else e.change_pct), known[e.symbol_id][2]))
    now = timezone.now()
    return [
        LeaderboardRow(
            rank,
            known[e.symbol_id][0],
            known[e.symbol_id][1],
            BarOut(
                e.bucket,
                e.open,
                e.high,
                e.low,
                e.close,
                e.volume,
                e.anomalies,
                e.base == tf or e.bucket + DURATIONS[tf] <= now,
            ),
            e.prev_close,
            e.change_pct,
        )
        for rank, e in enumerate(found[:limit], start=1)
    ]


class SymbolsView(ApiView):
    """The symbols of the datasets you are entitled to, by ticker."""

    @extend_schema(
        operation_id="symbols",
        parameters=[s.SymbolsQuery],
        responses={200: s.SymbolsResponse, **ERRORS},
        description="Symbols by ticker, filtered by dataset, active flag and a search text; paged like the others.",
    )
    def get(self, request: Request) -> HttpResponse:
        q = self.query(s.SymbolsQuery)
        allowed = datasets_allowed(request.user)
        rows = Symbol.objects.order_by("ticker")
        if allowed is not None:
            rows = rows.filter(dataset__in=sorted(allowed))
        if "dataset" in q:
            dataset_check(allowed, q["dataset"])
            rows = rows.filter(dataset=q["dataset"])
        if "active" in q:
            rows = rows.filter(active=q["active"])
        if "search" in q:
            rows = rows.filter(Q(ticker__icontains=q["search"]) | Q(description__icontains=q["search"]))
        if "cursor" in q:
            rows = rows.filter(ticker__gt=q["cursor"])
        limit = q["limit"]
        page = list(rows.values_list("ticker", "dataset", "active", "description")[: limit + 1])
        next_url = None
        if len(page) > limit:
            page = page[:limit]
            params = {k: str(v).lower() if k == "active" else str(v) for k, v in q.items() if k != "cursor"}
            params["cursor"] = s.symbol_cursor_encode(page[-1][0])
            next_url = self.page_url(params)
        body = {
            "results": [{"symbol": t, "dataset": d, "active": a, "description": desc} for t, d, a, desc in page],
            "next": next_url,
        }
        return HttpResponse(orjson.dumps(body), content_type=JSON)
