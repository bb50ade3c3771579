"""The /v1 endpoints: validate with DRF, call one selector, write the JSON text with marketdata.wire.

/v1/ohlcv and /v1/latest go through the Redis hot cache (marketdata.cache): the key holds
the symbol's version, which the ingester bumps after each commit, and every parameter of
the answer, so a hit is never older than the database; the value is the body itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
import redis
from django.db import connection
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from marketdata.access import dataset_check, datasets_allowed
from marketdata.cache import redis_client
from marketdata.cache.leaderboards import leaderboard_read
from marketdata.cache.local import EPOCH_KEY, epoch_note
from marketdata.selectors.bars import BarOut, latest_bars
from marketdata.selectors.leaderboard import LeaderboardRow, leaderboard
from marketdata.selectors.symbols import active_symbols, symbol_list, symbol_ref
from marketdata.selectors.trades import trade_list
from marketdata.timeframes import DURATIONS
from marketdata.wire import price_text, trade_json, ts_text
from ops import metrics

from . import serializers as s
from .answers import (
    JSON,
    CacheRead,
    CacheSlot,
    bar_text,
    cache_read,
    cache_slot,
    cache_write,
    entitled,
    hot_cache_on,
    ohlcv_answer,
    ohlcv_cached,
    ohlcv_hit,
    ohlcv_slot,
    symbol_get,
    symbols_by_ticker,
    validated,
)
from .renderers import FirstRendererNegotiation
from .throttling import ApiRateThrottle

COUNTED_KEY = redis_client.COUNTED_KEY

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
        result = redis_client.round_trip(incr=incr, get=[EPOCH_KEY, *keys])
        counts: list[int] | None = None
        self.fetched = None
        if result is not None:
            counts, values = result
            counts = counted if counted is not None else counts
            self.fetched = values[1:]
            if epoch_note(values[0]):
                # A token, entitlement, user or symbol changed somewhere: look the caller
                # and the symbols up again (the local caches are empty now).
                request._authenticate()  # type: ignore[attr-defined]  # DRF's own, as Request.user calls it
                self.check_permissions(request)
                deferred = None
                try:
                    keys = self.prepare(request)
                except Exception as exc:
                    deferred, keys = exc, []
                self.fetched = redis_client.mget(keys) if keys else []
        if not throttle.decide(checks, counts):
            self.throttled(request, throttle.wait() or 1)
        if deferred is not None:
            raise deferred

    def query(self, serializer_class: type[Serializer]) -> dict[str, Any]:
        """Validated query parameters; an empty value counts as absent (``?dataset=&search=``)."""
        s.query_utf8_check(self.request.META.get("QUERY_STRING", ""))
        items = tuple(sorted((key, value) for key, value in self.request.query_params.items() if value != ""))
        return dict(validated(serializer_class, items))

    def page_url(self, params: dict[str, str]) -> str:
        """The absolute URL of this endpoint with these parameters (never the caller's token)."""
        return self.request.build_absolute_uri(self.request.path) + "?" + urlencode(params)


class OhlcvView(ApiView):
    """Bars of one symbol, ascending by open time; the latest page when neither start nor cursor is given."""

    def prepare(self, request: Request) -> list[str]:
        self.q = q = self.query(s.OhlcvQuery)
        self.symbol = symbol = entitled(
            symbol_get(q["symbol"]), datasets_allowed(request.user), ticker=q["symbol"], field="symbol"
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
        symbol = entitled(
            symbol_ref(ticker=q["symbol"]), datasets_allowed(request.user), ticker=q["symbol"], field="symbol"
        )
        end = q.get("end")
        page = trade_list(ticker=symbol.ticker, start=q.get("start"), end=end, limit=q["limit"], cursor=q.get("cursor"))
        next_url = None
        if page.next_cursor is not None:
            params = {"symbol": symbol.ticker}
            if end is not None:
                params["end"] = ts_text(end)
            params.update(limit=str(q["limit"]), cursor=page.next_cursor)
            next_url = self.page_url(params)
        results = orjson.Fragment(
            "[" + ",".join(trade_json(t.ts_event, t.price, t.size, t.side) for t in page.trades) + "]"
        )
        body = orjson.dumps({"symbol": symbol.ticker, "results": results, "next": next_url})
        return HttpResponse(body, content_type=JSON)


class LatestView(ApiView):
    """The most recent bar of each symbol asked for."""

    def prepare(self, request: Request) -> list[str]:
        self.q = q = self.query(s.LatestQuery)
        tickers: list[str] = q["symbols"]
        self.symbols = symbols = symbols_by_ticker(tickers, datasets_allowed(request.user))
        self.slots: dict[str, CacheSlot] = {}
        if not hot_cache_on():
            return []
        for ticker in tickers:
            self.slots[ticker] = cache_slot(
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
                reads[ticker] = read = cache_read(slot, self.fetched[at : at + len(slot.keys)])
                at += len(slot.keys)
                metrics.API_CACHE.labels("latest", "miss" if read.body is None else "hit").inc()
                metrics.CACHE_REQUESTS.labels("miss" if read.body is None else "hit").inc()
                if read.body is not None:
                    texts[ticker] = read.body.decode()
        missing = [t for t in tickers if t not in texts]
        if missing:
            for ticker, bar in latest_bars(tickers=missing, tf=tf).items():
                texts[ticker] = "null" if bar is None else bar_text(bar)
                if ticker in slots:
                    cache_write(
                        slots[ticker], reads.get(ticker), texts[ticker].encode(), all_final=bar is None or bar.final
                    )
        results = {t: orjson.Fragment(texts[t]) for t in tickers}
        return HttpResponse(orjson.dumps({"tf": tf, "results": results}), content_type=JSON)


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
        rows = _leaderboard_hot(metric=metric, tf=tf, limit=limit, datasets=datasets) if hot_cache_on() else None
        if rows is None:
            rows = leaderboard(metric=metric, tf=tf, limit=limit, datasets=datasets)
        entries = [
            {
                "rank": row.rank,
                "symbol": row.ticker,
                "dataset": row.dataset,
                "bar": orjson.Fragment(bar_text(row.bar)),
                "prev_close": None if row.prev_close is None else orjson.Fragment(price_text(row.prev_close)),
                "change_pct": None
                if row.change_pct is None
                else orjson.Fragment(format(row.change_pct.normalize(), "f")),
            }
            for row in rows
        ]
        body = orjson.dumps({"metric": metric, "tf": tf, "results": entries})
        return HttpResponse(body, content_type=JSON)


def _leaderboard_hot(*, metric: str, tf: str, limit: int, datasets: set[str] | None) -> list[LeaderboardRow] | None:
    """The leaderboard selector's answer from the Redis sets the ingester keeps; None when Redis cannot give it."""
    if datasets is not None and not datasets:
        return []
    # Ties go by ticker in the database's collation, as the statement orders them: by this list's order.
    known = {ref.id: (ref.ticker, ref.dataset, n) for n, ref in enumerate(active_symbols(datasets=datasets))}
    try:
        found = leaderboard_read(metric=metric, tf=tf, limit=limit, candidates=sorted(known))
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
        if "dataset" in q:
            dataset_check(allowed, q["dataset"])
        limit = q["limit"]
        page = symbol_list(
            datasets=allowed, dataset=q.get("dataset"), active=q.get("active"), search=q.get("search"),
            after=q.get("cursor"), limit=limit + 1,
        )  # fmt: skip
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
