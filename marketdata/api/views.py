"""The /v1 endpoints: validate with DRF, call one selector, write the JSON text with marketdata.wire.

/v1/ohlcv and /v1/latest go through the Redis hot cache (marketdata.cache): the key holds
the symbol's version, which the ingester bumps after each commit, and every parameter of
the answer, so a hit is never older than the database; the value is the body itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import urlencode

import orjson
from django.conf import settings
from django.db.models import Q
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from marketdata import cache
from marketdata.access import dataset_check, datasets_allowed, datasets_check
from marketdata.errors import ERR_UNKNOWN_SYMBOL, UnknownSymbolError
from marketdata.models import Symbol
from marketdata.selectors import (
    BarOut,
    bar_list,
    latest_bars,
    leaderboard,
    symbol_ref,
    trade_list,
)
from marketdata.timeframes import bucket_ceil, bucket_start
from marketdata.wire import bar_json, price_text, trade_json, ts_text
from ops import metrics

from . import serializers as s
from .renderers import FirstRendererNegotiation

JSON = "application/json"

ERRORS = {
    400: OpenApiResponse(s.ErrorResponse, description="A bad parameter (field names it)."),
    401: OpenApiResponse(s.ErrorResponse, description="No or bad credentials."),
    403: OpenApiResponse(s.ErrorResponse, description="Not entitled to the symbol's dataset."),
    429: OpenApiResponse(s.ErrorResponse, description="Rate limited; see Retry-After."),
}
ERRORS_404 = {**ERRORS, 404: OpenApiResponse(s.ErrorResponse, description="Unknown symbol.")}


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
    """Where an answer is kept: under ``stable`` when only new data can change it, else ``clocked``."""

    stable: str | None
    clocked: str | None


def _cache_read(*, symbol_id: int, what: str, tf: str, end: datetime | None) -> tuple[bytes | None, CacheSlot]:
    """The cached answer, if any, and the keys to keep a computed one under.

    An answer whose bars are all final (every stored timeframe, and resampled pages of
    closed buckets) changes only when the symbol's data does, which bumps its version; it
    is kept under a key without the clock, so it survives bucket edges. An answer with a
    forming bar also carries the current bucket in its key.
    """
    clock = _clock(tf, end, timezone.now())
    if clock == "closed":
        body, key = cache.cached_get(symbol_id=symbol_id, what=f"{what}|closed")
        return body, CacheSlot(key, key)
    body, stable = cache.cached_get(symbol_id=symbol_id, what=f"{what}|final")
    if body is not None:
        return body, CacheSlot(stable, None)
    body, clocked = cache.cached_get(symbol_id=symbol_id, what=f"{what}|{clock}")
    return body, CacheSlot(stable, clocked)


def _cache_write(slot: CacheSlot | None, value: bytes, *, all_final: bool) -> None:
    if slot is not None:
        cache.cached_set(key=slot.stable if all_final else slot.clocked, value=value)


def _hot_cache() -> bool:
    return bool(getattr(settings, "API_HOT_CACHE", True))


class ApiView(APIView):
    """Base of the /v1 views: JSON whatever the Accept header, parameters from the query string."""

    content_negotiation_class = FirstRendererNegotiation
    renderer_classes = [JSONRenderer]

    def query(self, serializer_class: type[Serializer]) -> dict[str, Any]:
        """Validated query parameters; an empty value counts as absent (``?dataset=&search=``)."""
        data = {key: value for key, value in self.request.query_params.items() if value != ""}
        serializer = serializer_class(data=data)
        serializer.is_valid(raise_exception=True)
        return dict(serializer.validated_data)

    def page_url(self, params: dict[str, str]) -> str:
        """The absolute URL of this endpoint with these parameters (never the caller's token)."""
        return self.request.build_absolute_uri(self.request.path) + "?" + urlencode(params)


class OhlcvView(ApiView):
    """Bars of one symbol, ascending by open time; the latest page when neither start nor cursor is given."""

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
        q = self.query(s.OhlcvQuery)
        symbol = symbol_ref(ticker=q["symbol"])
        dataset_check(datasets_allowed(request.user), symbol.dataset)
        tf, start, end, limit, cursor = q["tf"], q.get("start"), q.get("end"), q["limit"], q.get("cursor")
        exclude = q["anomalies"] == "exclude"
        base_url = self.request.build_absolute_uri(self.request.path)
        slot = None
        if _hot_cache():
            what = "|".join(
                ("ohlcv", tf, _micros(start), _micros(end), str(limit), cursor or "-", q["anomalies"], base_url)
            )
            cached, slot = _cache_read(symbol_id=symbol.id, what=what, tf=tf, end=end)
            metrics.API_CACHE.labels("ohlcv", "miss" if cached is None else "hit").inc()
            if cached is not None:
                return HttpResponse(cached, content_type=JSON)
        page = bar_list(
            ticker=symbol.ticker, tf=tf, start=start, end=end, limit=limit, cursor=cursor, exclude_anomalies=exclude
        )
        next_url = "null"
        if page.next_cursor is not None:
            params = {"symbol": symbol.ticker, "tf": tf}
            if end is not None:
                params["end"] = ts_text(end)
            params.update(limit=str(limit), anomalies=q["anomalies"], cursor=page.next_cursor)
            next_url = _text(base_url + "?" + urlencode(params))
        body = (
            f'{{"symbol":{_text(symbol.ticker)},"tf":"{tf}","results":['
            + ",".join(_bar_text(bar) for bar in page.bars)
            + f'],"next":{next_url}}}'
        ).encode()
        _cache_write(slot, body, all_final=all(bar.final for bar in page.bars))
        return HttpResponse(body, content_type=JSON)


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
        symbol = symbol_ref(ticker=q["symbol"])
        dataset_check(datasets_allowed(request.user), symbol.dataset)
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


def _symbols_by_ticker(tickers: Iterable[str]) -> dict[str, Symbol]:
    wanted = list(tickers)
    found = {sym.ticker: sym for sym in Symbol.objects.filter(ticker__in=wanted)}
    for ticker in wanted:
        if ticker not in found:
            raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbols")
    return found


class LatestView(ApiView):
    """The most recent bar of each symbol asked for."""

    @extend_schema(
        operation_id="latest",
        parameters=[s.LatestQuery],
        responses={200: s.LatestResponse, **ERRORS_404},
        description="The latest bar of each ticker (forming bars have final=false); null where there is none.",
    )
    def get(self, request: Request) -> HttpResponse:
        q = self.query(s.LatestQuery)
        tickers: list[str] = q["symbols"]
        tf = q["tf"]
        symbols = _symbols_by_ticker(tickers)
        datasets_check(datasets_allowed(request.user), (symbols[t].dataset for t in tickers))
        texts: dict[str, str] = {}
        slots: dict[str, CacheSlot] = {}
        if _hot_cache():
            for ticker in tickers:
                value, slots[ticker] = _cache_read(symbol_id=symbols[ticker].pk, what=f"latest|{tf}", tf=tf, end=None)
                metrics.API_CACHE.labels("latest", "miss" if value is None else "hit").inc()
                if value is not None:
                    texts[ticker] = value.decode()
        missing = [t for t in tickers if t not in texts]
        if missing:
            for ticker, bar in latest_bars(tickers=missing, tf=tf).items():
                texts[ticker] = "null" if bar is None else _bar_text(bar)
                _cache_write(slots.get(ticker), texts[ticker].encode(), all_final=bar is None or bar.final)
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
        rows = leaderboard(metric=q["metric"], tf=q["tf"], limit=q["limit"], datasets=datasets_allowed(request.user))
        entries = []
        for row in rows:
            prev = "null" if row.prev_close is None else price_text(row.prev_close)
            change = "null" if row.change_pct is None else format(row.change_pct.normalize(), "f")
            entries.append(
                f'{{"rank":{row.rank},"symbol":{_text(row.ticker)},"dataset":{_text(row.dataset)},'
                f'"bar":{_bar_text(row.bar)},"prev_close":{prev},"change_pct":{change}}}'
            )
        body = f'{{"metric":"{q["metric"]}","tf":"{q["tf"]}","results":[' + ",".join(entries) + "]}"
        return HttpResponse(body.encode(), content_type=JSON)


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
