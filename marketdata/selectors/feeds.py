"""Reads of feeds: their readiness (age of last data), and where an ingester's feed resumes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django.conf import settings
from django.db.models import Max
from django.utils import timezone

from ..models import Bar, FeedStatus, Quote, StatusChange, Symbol, Trade
from ..timeframes import QUOTE_SCHEMAS, SCHEMA_TIMEFRAMES, STATUS_SCHEMA


def feed_ages() -> dict[str, str]:
    """Each live feed's age of last data, as a readiness check result: "ok" or why it is stale.

    Only feeds whose last writer was ``ingest live`` are judged: a finished replay or
    historical fetch is not expected to keep writing. READYZ_FEED_MAX_AGE_S = 0 turns
    the check off (markets close; set it to what a feed's quietest hour allows).
    """
    limit = settings.READYZ_FEED_MAX_AGE_S
    if not limit:
        return {}
    now = timezone.now()
    results = {}
    for feed in FeedStatus.objects.filter(source="live"):
        name = f"feed {feed.dataset} {feed.schema}"
        if feed.last_batch_at is None:
            results[name] = "no data yet"
            continue
        age = (now - feed.last_batch_at).total_seconds()
        results[name] = "ok" if age <= limit else f"no data for {age:.0f} s (limit {limit} s)"
    return results


def feed_stored_until(
    *, dataset: str, schema: str, symbols: Sequence[str], start: datetime, end: datetime
) -> datetime | None:
    """The earliest of the symbols' latest stored times of ``schema`` in [start, end), or None when any has none."""
    ids = list(Symbol.objects.filter(dataset=dataset, ticker__in=symbols).values_list("pk", flat=True))
    if len(ids) < len(set(symbols)):
        return None
    timeframe = SCHEMA_TIMEFRAMES.get(schema)
    if timeframe is not None:
        bars = Bar.objects.filter(symbol_id__in=ids, timeframe=timeframe, ts__gte=start, ts__lt=end)
        latest = [row["last"] for row in bars.values("symbol_id").annotate(last=Max("ts"))]
    elif schema in QUOTE_SCHEMAS or schema == STATUS_SCHEMA:  # (their time is ts_recv)
        rows = (
            Quote.objects.filter(schema=QUOTE_SCHEMAS[schema])
            if schema in QUOTE_SCHEMAS
            else StatusChange.objects.all()
        )
        rows = rows.filter(symbol_id__in=ids, ts_recv__gte=start, ts_recv__lt=end)
        latest = [row["last"] for row in rows.values("symbol_id").annotate(last=Max("ts_recv"))]
    else:
        trades = Trade.objects.filter(symbol_id__in=ids, ts_event__gte=start, ts_event__lt=end)
        latest = [row["last"] for row in trades.values("symbol_id").annotate(last=Max("ts_event"))]
    if len(latest) < len(ids):
        return None
    return min(latest)


def feed_last_stored(*, schema: str, symbols: Sequence[str]) -> datetime | None:
    """The latest stored time of ``schema`` for any of ``symbols``, or None when nothing is stored."""
    latest: datetime | None = None
    for symbol_id in Symbol.objects.filter(ticker__in=symbols).values_list("pk", flat=True):
        if schema == "trades":
            trades = Trade.objects.filter(symbol_id=symbol_id)
            last = trades.order_by("-ts_event").values_list("ts_event", flat=True).first()
        elif schema in QUOTE_SCHEMAS:
            quotes = Quote.objects.filter(symbol_id=symbol_id, schema=QUOTE_SCHEMAS[schema])
            last = quotes.order_by("-ts_recv").values_list("ts_recv", flat=True).first()
        elif schema == STATUS_SCHEMA:
            changes = StatusChange.objects.filter(symbol_id=symbol_id)
            last = changes.order_by("-ts_recv").values_list("ts_recv", flat=True).first()
        else:
            bars = Bar.objects.filter(symbol_id=symbol_id, timeframe=SCHEMA_TIMEFRAMES[schema])
            last = bars.order_by("-ts").values_list("ts", flat=True).first()
        if last is not None and (latest is None or last > latest):
            latest = last
    return latest
