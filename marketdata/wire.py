"""The JSON text of prices, times, bars and trades, shared by REST and WebSocket.

Prices are printed from the exact fixed-point integer as the shortest decimal (no binary
float ever touches them); times are RFC 3339 UTC with a ``Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

import numpy as np

from .timeframes import anomaly_names

SCALE = 1_000_000_000


# Small caches on purpose: they only need what repeats within a batch or a page (prices
# near the current one, the batch's few timestamps). At ~300 bytes an entry, 65,536
# prices and 16,384 timestamps grew a long-running ingester by ~25 MiB (bench/soak.py).
@lru_cache(maxsize=8192)  # prices sit on a tick grid and repeat: most calls are hits
def price_text(value: int) -> str:
    """Shortest decimal text of a 1e-9 fixed-point price: 189120000000 -> '189.12'."""
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), SCALE)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


PRICE_TEXTS_MAX = 1 << 17  # prices whose text is kept (about 15 MB at most); past it the cache starts again


class _PriceTexts(dict[int, str]):
    """price_text of each price asked for, kept. A feed's prices mostly repeat earlier ones
    (a walk over ticks), and a lookup costs a fraction of making the text: the publisher's
    bar texts took 1.38 us a bar with the prices made per batch, 0.78 us with them kept."""

    def __missing__(self, price: int) -> str:
        if len(self) >= PRICE_TEXTS_MAX:
            self.clear()
        text = self[price] = price_text(price)
        return text


_price_texts = _PriceTexts()


def time_text(ts: datetime) -> str:
    """RFC 3339 UTC with a Z; microseconds only when present (uncached: for times that rarely repeat)."""
    text = ts.isoformat()  # several times faster than strftime
    if text.endswith("+00:00"):
        return text[:-6] + "Z"
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


# Many streams' bars share the same few times. Trade times rarely repeat: trade_json uses
# time_text directly (a cache miss cost 0.35 us more than no cache; the ingester's
# publisher spent 39% of its time here on trades).
ts_text = lru_cache(maxsize=4096)(time_text)


def bar_json(
    ts: datetime, open_: int, high: int, low: int, close: int, volume: int, anomalies: int, final: bool
) -> str:
    """The protocol's BAR object as JSON text."""
    return bar_data(
        ts_text(ts), price_text(open_), price_text(high), price_text(low), price_text(close), volume, anomalies, final
    )


def bar_data(ts: str, open_: str, high: str, low: str, close: str, volume: int, anomalies: int, final: bool) -> str:
    """bar_json with the time and prices already text."""
    flags = ""
    if anomalies:
        flags = ',"anomalies":[' + ",".join(f'"{n}"' for n in anomaly_names(anomalies)) + "]"
    return (
        f'{{"ts":"{ts}","open":{open_},"high":{high},"low":{low},"close":{close},"volume":{volume},'
        f'"final":{"true" if final else "false"}{flags}}}'
    )


def bar_datas(
    ts: np.ndarray, open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
    anomalies: np.ndarray, final: bool | np.ndarray,
) -> list[str]:  # fmt: skip
    """bar_json of each of arrays of bars (times in Unix microseconds; ``final`` one for all or
    one a bar): each distinct time made text once, prices through the kept texts."""
    n = len(ts)
    text_of = _price_texts.__getitem__
    times, when = np.unique(ts, return_inverse=True)
    time_of = np.array(time_texts(times), dtype=object)[when]
    rows = zip(
        time_of.tolist(), *(map(text_of, prices.tolist()) for prices in (open_, high, low, close)), volume.tolist(),
        anomalies.tolist(), np.broadcast_to(final, n).tolist(), strict=True,
    )  # fmt: skip
    return [bar_data(t, o, h, lo, c, v, a, f) for t, o, h, lo, c, v, a, f in rows]


def trade_json(ts: datetime, price: int, size: int, side: str) -> str:
    """The protocol's trade data object as JSON text."""
    return trade_data(time_text(ts), price, size, side)


def trade_data(ts: str, price: int, size: int, side: str) -> str:
    """trade_json with the time already text."""
    return f'{{"ts":"{ts}","price":{_price_texts[price]},"size":{size},"side":"{side}"}}'


TS_AT = len('{"ts":"')  # where the time's text starts in every bar and trade data text this module writes


def data_ts(data: str) -> str:
    """The time (RFC 3339 text) of a bar or trade data text this module wrote.

    Read by position, not parsed: the snapshot and the page-before prefetch read it from
    many texts on the way to a client. tests/marketdata/test_wire.py holds every text this
    module writes equal, parsed, to the object it stands for, this time included.
    """
    return data[TS_AT : data.index('"', TS_AT)]


def time_texts(micros: np.ndarray) -> list[str]:
    """time_text of each of an array of Unix-microsecond times, made at once."""
    texts = np.datetime_as_string(micros.astype("datetime64[us]"), unit="us").tolist()
    whole = (micros % 1_000_000 == 0).tolist()
    return [text[:-7] + "Z" if w else text + "Z" for text, w in zip(texts, whole, strict=True)]
