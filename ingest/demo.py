"""Demo market data: realistic Databento DBN files (1m history and a live session) from a seed.

The files are encoded with ``databento_dbn`` (DBN v3, zstd), so the demo goes through the
same decoder path as real Databento files. Everything below is a pure function of the
seed and of "today" in New York (given as ``now``): the same inputs give the same bytes.

- ``history.ohlcv-1m.dbn.zst``: 1m bars (rtype OHLCV_1M) for the ``days`` most recent
  weekdays before the live day, full regular sessions 09:30-16:00 America/New_York (DST
  aware; exchange holidays are not modelled). Prices follow a random walk with a daily
  volatility of 1.5-3 % per symbol; volume follows a U-shaped intraday profile. It holds
  exactly one halt (HALT_BARS zero-volume bars, O=H=L=C=the last price, of one symbol on
  one day) and exactly one volume spike (one bar with SPIKE_MULTIPLE times the usual
  volume of its minute, of another symbol on another day when there are several).
- ``live.dbn.zst``: a mixed-schema file for LIVE_MINUTES from 09:30 New York on the live
  day (today, or the last weekday when today is a weekend): the trades, the 1s bars
  (OHLCV_1S) of every second that has trades, and the 1m bars (OHLCV_1M). Records are in
  the order a live feed delivers them: a trade at its ts_recv, a 1s bar when its second
  ends (after the second's trades), a 1m bar when its minute ends (right after the
  minute's last 1s bar). Each 1s bar is the aggregate of its trades and each 1m bar the
  aggregate of its 1s bars. ``ingest replay --loop --speed 1`` shifts the times to now.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import databento_dbn as dbn
import zstandard

from .anomalies import SPIKE_FACTOR, SPIKE_SPAN, WARMUP

NEW_YORK = ZoneInfo("America/New_York")
DATASET = "XNAS.ITCH"
PUBLISHER_ID = 2
NS = 1_000_000_000
MINUTE_NS = 60 * NS
TICK = 10_000_000  # $0.01 in Databento's fixed-point units of 1e-9
SESSION_OPEN = time(9, 30)
SESSION_MINUTES = 390  # 09:30-16:00
LIVE_MINUTES = 60
HALT_BARS = 10
SPIKE_MULTIPLE = 30
SUBSTEPS = 6  # price points sampled inside a history minute (its high and low come from them)
VOLUME_NOISE = 0.3  # sigma of the log-normal noise on a bar's volume
# Trade sizes and their cumulative weights in %: round lots, odd lots (0: 1-99 shares), a few larger prints.
TRADE_SIZES = ((100, 50), (0, 80), (200, 92), (300, 97), (500, 100))
MEAN_TRADE_SIZE = 120
DEFAULT_SYMBOLS = 20
DEFAULT_DAYS = 5
DEFAULT_SEED = 20_240_614
HISTORY_FILE = "history.ohlcv-1m.dbn.zst"
LIVE_FILE = "live.dbn.zst"

# Ticker, Nasdaq TotalView-ITCH-looking instrument_id, starting price in dollars.
TICKERS: tuple[tuple[str, int, float], ...] = (
    ("AAPL", 38, 189.50), ("MSFT", 10_888, 415.20), ("NVDA", 11_667, 121.40), ("AMZN", 1_048, 184.70),
    ("GOOGL", 7_152, 171.30), ("META", 9_945, 502.10), ("TSLA", 16_244, 248.60), ("BRK.B", 2_347, 409.80),
    ("JPM", 8_793, 199.40), ("V", 17_496, 274.90), ("UNH", 17_141, 521.30), ("XOM", 18_542, 114.70),
    ("JNJ", 8_726, 154.80), ("WMT", 18_152, 67.90), ("MA", 9_648, 461.20), ("PG", 13_262, 165.30),
    ("AVGO", 1_397, 161.50), ("HD", 7_822, 358.40), ("CVX", 4_339, 155.10), ("LLY", 9_331, 801.70),
    ("COST", 4_012, 852.30), ("ABBV", 407, 174.60), ("PEP", 12_810, 169.90), ("KO", 9_017, 62.85),
    ("MRK", 10_554, 125.40), ("ADBE", 448, 519.80), ("CRM", 3_804, 259.70), ("NFLX", 11_273, 648.20),
    ("AMD", 853, 159.30), ("INTC", 8_164, 30.45), ("CSCO", 4_194, 48.35), ("ORCL", 12_359, 139.80),
    ("BAC", 1_693, 39.25), ("DIS", 5_163, 99.70), ("PFE", 12_929, 28.90), ("T", 15_806, 18.35),
    ("F", 6_574, 12.15), ("NKE", 11_543, 89.60), ("QCOM", 13_497, 169.40), ("TXN", 16_661, 194.70),
)  # fmt: skip
MAX_SYMBOLS = len(TICKERS)


@dataclass(frozen=True, slots=True)
class Instrument:
    """One demo symbol: its ids, starting price, daily volatility and trade rate (trades/s at profile 1)."""

    ticker: str
    instrument_id: int
    price: float
    daily_vol: float
    trade_rate: float

    @property
    def minute_volume(self) -> float:
        """Expected volume of a 1m bar at profile 1 (consistent with the live trade rate)."""
        return self.trade_rate * 60 * MEAN_TRADE_SIZE


@dataclass(frozen=True, slots=True)
class Event:
    """Where the halt or the spike is: symbol index, history day index, minute of the session."""

    symbol: int
    day: int
    minute: int


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A file written and its record counts by schema."""

    path: Path
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(slots=True)
class _Interval:
    """A ``databento_dbn.MappingInterval``: raw symbol -> instrument_id over [start_date, end_date)."""

    start_date: date
    end_date: date
    symbol: str


@dataclass(slots=True)
class _Mapping:
    """A ``databento_dbn.SymbolMapping``."""

    raw_symbol: str
    intervals: Sequence[dbn.MappingInterval]


# -- calendar ------------------------------------------------------------------------


def live_day(*, now: datetime) -> date:
    """The live session's day: today in New York, or the last weekday before it on a weekend."""
    day = now.astimezone(NEW_YORK).date()
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def trading_days(*, before: date, count: int) -> list[date]:
    """The ``count`` most recent weekdays strictly before ``before``, oldest first."""
    days: list[date] = []
    day = before
    while len(days) < count:
        day -= timedelta(days=1)
        if day.weekday() < 5:
            days.append(day)
    return days[::-1]


def session_open_ns(*, day: date) -> int:
    """09:30 New York on ``day`` as nanoseconds since the epoch (UTC), DST included."""
    local = datetime.combine(day, SESSION_OPEN, tzinfo=NEW_YORK)
    return int(local.astimezone(UTC).timestamp()) * NS


def volume_profile(*, minute: int) -> float:
    """Relative volume at ``minute`` of the session: high at the open and close, low at midday."""
    to_close = SESSION_MINUTES - 1 - minute
    return 0.6 + 2.5 * math.exp(-minute / 25) + 1.8 * math.exp(-to_close / 20)


# -- price and volume ----------------------------------------------------------------


def to_ticks(*, price: float) -> int:
    """A dollar price as fixed-point 1e-9 on the $0.01 grid."""
    return max(1, round(price * 100)) * TICK


def universe(*, count: int, rng: random.Random) -> list[Instrument]:
    """The first ``count`` demo symbols with a volatility and a trade rate drawn from ``rng``."""
    if not 1 <= count <= MAX_SYMBOLS:
        raise ValueError(f"symbols must be between 1 and {MAX_SYMBOLS}, got {count}")
    return [
        Instrument(ticker, iid, price, daily_vol=rng.uniform(0.015, 0.03), trade_rate=rng.uniform(0.5, 1.5))
        for ticker, iid, price in TICKERS[:count]
    ]


def minute_sigma(*, daily_vol: float) -> float:
    """Log-return sigma of one minute of a session with daily volatility ``daily_vol``."""
    return daily_vol / math.sqrt(SESSION_MINUTES)


def pick_events(*, symbols: int, days: int, rng: random.Random) -> tuple[Event, Event]:
    """The halt and the spike: midday, on different symbols and days where there are several."""
    halt = Event(rng.randrange(symbols), rng.randrange(days), rng.randrange(120, 240))
    spike_symbol = (halt.symbol + 1 + rng.randrange(symbols - 1)) % symbols if symbols > 1 else halt.symbol
    spike_day = (halt.day + 1 + rng.randrange(days - 1)) % days if days > 1 else halt.day
    spike_minute = rng.randrange(140, 260)
    if (spike_symbol, spike_day) == (halt.symbol, halt.day):
        spike_minute = halt.minute + HALT_BARS + 30
    return halt, Event(spike_symbol, spike_day, spike_minute)


def _bar(*, rtype: dbn.RType, iid: int, ts: int, ohlc: Sequence[int], volume: int) -> dbn.OHLCVMsg:
    o, h, low, c = ohlc
    return dbn.OHLCVMsg(int(rtype), PUBLISHER_ID, iid, ts, o, h, low, c, volume)


def session_bars(
    *, inst: Instrument, price: float, open_ns: int, rng: random.Random, halt: int | None, spike: int | None
) -> tuple[list[dbn.OHLCVMsg], float]:
    """One symbol's 1m bars of one session starting at ``price``; returns them and the closing price.

    ``halt`` and ``spike`` are the session minutes of the halt run and of the spike bar, if any.
    """
    bars: list[dbn.OHLCVMsg] = []
    step = minute_sigma(daily_vol=inst.daily_vol) / math.sqrt(SUBSTEPS)
    for minute in range(SESSION_MINUTES):
        ts = open_ns + minute * MINUTE_NS
        if halt is not None and halt <= minute < halt + HALT_BARS:
            last = to_ticks(price=price)
            bars.append(_bar(rtype=dbn.RType.OHLCV_1M, iid=inst.instrument_id, ts=ts, ohlc=[last] * 4, volume=0))
            if minute == halt + HALT_BARS - 1:
                price *= math.exp(rng.gauss(0, 3 * inst.daily_vol))  # resumes on the news
            continue
        points = [price]
        for _ in range(SUBSTEPS):
            points.append(points[-1] * math.exp(rng.gauss(0, step)))
        price = points[-1]
        ticks = [to_ticks(price=p) for p in points]
        volume = inst.minute_volume * volume_profile(minute=minute) * rng.lognormvariate(0, VOLUME_NOISE)
        if minute == spike:
            volume = inst.minute_volume * volume_profile(minute=minute) * SPIKE_MULTIPLE
        ohlc = (ticks[0], max(ticks), min(ticks), ticks[-1])
        bars.append(
            _bar(rtype=dbn.RType.OHLCV_1M, iid=inst.instrument_id, ts=ts, ohlc=ohlc, volume=max(1, round(volume)))
        )
    return bars, price


def history_bars(
    *, instruments: Sequence[Instrument], days: Sequence[date], rng: random.Random
) -> tuple[list[dbn.OHLCVMsg], list[float]]:
    """The 1m bars of every symbol over ``days`` in time order, and each symbol's last price."""
    halt, spike = pick_events(symbols=len(instruments), days=len(days), rng=rng)
    prices = [inst.price for inst in instruments]
    records: list[dbn.OHLCVMsg] = []
    for d, day in enumerate(days):
        per_symbol: list[list[dbn.OHLCVMsg]] = []
        for s, inst in enumerate(instruments):
            gap = math.exp(rng.gauss(0, 0.5 * inst.daily_vol)) if d else 1.0  # overnight
            bars, prices[s] = session_bars(
                inst=inst,
                price=prices[s] * gap,
                open_ns=session_open_ns(day=day),
                rng=rng,
                halt=halt.minute if (s, d) == (halt.symbol, halt.day) else None,
                spike=spike.minute if (s, d) == (spike.symbol, spike.day) else None,
            )
            per_symbol.append(bars)
        records.extend(bar for minute in zip(*per_symbol, strict=True) for bar in minute)
    return records, prices


# -- live session --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Trade:
    ts_recv: int
    ts_event: int
    iid: int
    price: int
    size: int
    side: dbn.Side


def _poisson(*, lam: float, rng: random.Random) -> int:
    """A Poisson draw (Knuth; ``lam`` is small here)."""
    limit, count, product = math.exp(-lam), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def _trade_size(*, rng: random.Random) -> int:
    draw = rng.random() * 100
    size = next(size for size, cumulative in TRADE_SIZES if draw < cumulative)
    return size or 1 + int(rng.random() * 99)


def _side(*, rng: random.Random) -> dbn.Side:
    """The aggressor: B (a buyer lifts the ask), A (a seller hits the bid), rarely N (a cross)."""
    draw = rng.random()
    return dbn.Side.BID if draw < 0.48 else dbn.Side.ASK if draw < 0.96 else dbn.Side.NONE


def symbol_trades(*, inst: Instrument, price: float, start_ns: int, rng: random.Random) -> list[_Trade]:
    """One symbol's trades over the live session: Poisson arrivals on the U profile, bid/ask bounce."""
    trades: list[_Trade] = []
    sigma = minute_sigma(daily_vol=inst.daily_vol) / math.sqrt(60)
    spread = max(1, round(price * 0.0001 * 100))  # in ticks
    last_recv = 0
    norm = _VolumeNorm()
    for second in range(LIVE_MINUTES * 60):
        price *= math.exp(rng.gauss(0, sigma))
        count = _poisson(lam=inst.trade_rate * volume_profile(minute=second // 60), rng=rng)
        sizes = norm.cap(sizes=[_trade_size(rng=rng) for _ in range(count)])
        base = start_ns + second * NS
        bid = max(1, math.floor(price * 100 - spread / 2))
        offsets = sorted(int(rng.random() * (NS - 1_000_000)) for _ in sizes)
        for offset, size in zip(offsets, sizes, strict=True):
            side = _side(rng=rng)
            cents = bid + spread if side == dbn.Side.BID else bid if side == dbn.Side.ASK else bid + spread // 2
            ts_event = base + offset
            last_recv = max(ts_event + 8_000 + int(rng.random() * 32_000), last_recv + 1)
            trades.append(_Trade(last_recv, ts_event, inst.instrument_id, cents * TICK, size, side))
    return trades


@dataclass(slots=True)
class _VolumeNorm:
    """The ingester's rolling volume norm of one symbol's 1s bars (ingest.anomalies).

    The live part must not trip the spike rule by chance (the demo's one spike is in the
    history), so a second's trades are cut to stay under half of the spike threshold.
    """

    mean: float = 0.0
    seen: int = 0

    def cap(self, *, sizes: list[int]) -> list[int]:
        """The sizes kept for one second (a prefix; a lone trade is shrunk), updating the norm."""
        limit = SPIKE_FACTOR / 2 * self.mean if self.seen >= WARMUP else math.inf
        kept: list[int] = []
        for size in sizes:
            if sum(kept) + size > limit:
                if kept:
                    break
                size = max(1, int(limit))
            kept.append(size)
        if kept:
            volume = sum(kept)
            self.mean = volume if self.seen == 0 else self.mean + 2 / (SPIKE_SPAN + 1) * (volume - self.mean)
            self.seen += 1
        return kept


def _aggregate(*, items: Iterable[tuple[int, int, int, int, int]]) -> tuple[int, int, int, int, int]:
    """(open, high, low, close, volume) of time-ordered (open, high, low, close, volume) parts."""
    parts = list(items)
    return (
        parts[0][0],
        max(p[1] for p in parts),
        min(p[2] for p in parts),
        parts[-1][3],
        sum(p[4] for p in parts),
    )


def live_records(
    *, instruments: Sequence[Instrument], prices: Sequence[float], start_ns: int, rng: random.Random
) -> list[dbn.TradeMsg | dbn.OHLCVMsg]:
    """Trades, 1s bars and 1m bars of the live session, in live delivery order."""
    trades: list[_Trade] = []
    for inst, price in zip(instruments, prices, strict=True):
        gap = math.exp(rng.gauss(0, 0.5 * inst.daily_vol))
        trades.extend(symbol_trades(inst=inst, price=price * gap, start_ns=start_ns, rng=rng))
    seconds: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    for t in trades:  # per symbol in time order
        seconds.setdefault((t.iid, t.ts_event // NS * NS), []).append((t.price, t.price, t.price, t.price, t.size))
    minutes: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    keyed: list[tuple[tuple[int, int, int], object]] = []
    for (iid, ts), parts in seconds.items():
        ohlcv = _aggregate(items=parts)
        minutes.setdefault((iid, ts - (ts - start_ns) % MINUTE_NS), []).append(ohlcv)
        bar = _bar(rtype=dbn.RType.OHLCV_1S, iid=iid, ts=ts, ohlc=ohlcv[:4], volume=ohlcv[4])
        keyed.append(((ts + NS, 1, iid), bar))
    for (iid, ts), parts in minutes.items():
        ohlcv = _aggregate(items=parts)
        bar = _bar(rtype=dbn.RType.OHLCV_1M, iid=iid, ts=ts, ohlc=ohlcv[:4], volume=ohlcv[4])
        keyed.append(((ts + MINUTE_NS, 2, iid), bar))
    keyed.extend(((t.ts_recv, 0, t.iid), t) for t in trades)
    keyed.sort(key=lambda pair: pair[0])
    records: list[dbn.TradeMsg | dbn.OHLCVMsg] = []
    sequence = 1_000_000
    for _, item in keyed:
        if isinstance(item, _Trade):
            sequence += 1 + rng.randrange(40)  # other venue messages in between
            records.append(_trade_msg(trade=item, sequence=sequence))
        else:
            assert isinstance(item, dbn.OHLCVMsg)
            records.append(item)
    return records


def _trade_msg(*, trade: _Trade, sequence: int) -> dbn.TradeMsg:
    return dbn.TradeMsg(
        publisher_id=PUBLISHER_ID,
        instrument_id=trade.iid,
        ts_event=trade.ts_event,
        price=trade.price,
        size=trade.size,
        action=dbn.Action.TRADE,
        side=trade.side,
        depth=0,
        ts_recv=trade.ts_recv,
        flags=dbn.F_LAST,
        ts_in_delta=trade.ts_recv - trade.ts_event - 500,
        sequence=sequence,
    )


# -- encoding ------------------------------------------------------------------------


def metadata(
    *, schema: dbn.Schema | None, instruments: Sequence[Instrument], days: Sequence[date], start: int, end: int
) -> dbn.Metadata:
    """DBN v3 metadata with raw_symbol -> instrument_id mappings over ``days``."""
    first, last = days[0], days[-1] + timedelta(days=1)
    mappings = [_Mapping(i.ticker, [_Interval(first, last, str(i.instrument_id))]) for i in instruments]
    return dbn.Metadata(
        dataset=DATASET,
        schema=schema,
        start=start,
        stype_in=dbn.SType.RAW_SYMBOL,
        stype_out=dbn.SType.INSTRUMENT_ID,
        symbols=[i.ticker for i in instruments],
        partial=[],
        not_found=[],
        mappings=mappings,
        end=end,
        limit=None,
        ts_out=False,
        version=3,
    )


def write_dbn(*, path: Path, meta: dbn.Metadata, records: Sequence[dbn.TradeMsg | dbn.OHLCVMsg]) -> WrittenFile:
    """Encode ``meta`` and ``records`` as zstd-compressed DBN at ``path`` (atomically); count by schema."""
    raw = b"".join([meta.encode(), *(bytes(r) for r in records)])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    tmp.replace(path)
    counts: dict[str, int] = {}
    for r in records:
        name = "trades" if isinstance(r, dbn.TradeMsg) else f"ohlcv-{'1s' if r.rtype == dbn.RType.OHLCV_1S else '1m'}"
        counts[name] = counts.get(name, 0) + 1
    return WrittenFile(path, counts)


def write_demo(
    *,
    out: Path,
    now: datetime,
    symbols: int = DEFAULT_SYMBOLS,
    days: int = DEFAULT_DAYS,
    seed: int = DEFAULT_SEED,
) -> list[WrittenFile]:
    """Write the history and live demo files into ``out``; the same arguments give the same bytes."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    rng = random.Random(seed)  # noqa: S311 - simulated prices, reproducible by design; not security
    instruments = universe(count=symbols, rng=rng)
    live = live_day(now=now)
    history_days = trading_days(before=live, count=days)
    bars, prices = history_bars(instruments=instruments, days=history_days, rng=rng)
    out.mkdir(parents=True, exist_ok=True)
    start = session_open_ns(day=history_days[0])
    end = session_open_ns(day=history_days[-1]) + SESSION_MINUTES * MINUTE_NS
    meta = metadata(schema=dbn.Schema.OHLCV_1M, instruments=instruments, days=history_days, start=start, end=end)
    history = write_dbn(path=out / HISTORY_FILE, meta=meta, records=bars)
    live_start = session_open_ns(day=live)
    records = live_records(instruments=instruments, prices=prices, start_ns=live_start, rng=rng)
    meta = metadata(
        schema=None, instruments=instruments, days=[live], start=live_start, end=live_start + LIVE_MINUTES * MINUTE_NS
    )
    return [history, write_dbn(path=out / LIVE_FILE, meta=meta, records=records)]
