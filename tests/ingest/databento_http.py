"""A stand-in for Databento's historical HTTP API, on 127.0.0.1, for ``databento.Historical``.

It speaks the wire format the official client (databento 0.88) uses for
``Historical.timeseries.get_range``:

- ``POST /v0/timeseries.get_range`` over HTTPS. The client forces ``https://`` on any
  gateway it is given, so this server serves TLS with a self-signed certificate made at
  start; point ``requests`` at it with ``REQUESTS_CA_BUNDLE=<server.ca_file>``.
- HTTP basic auth: the API key is the username, the password is empty.
- A form body (``application/x-www-form-urlencoded``): ``dataset``, ``start``, ``end``
  (ISO 8601 from ``datetime.isoformat()``, or nanoseconds), ``symbols`` (comma-joined),
  ``schema``, ``stype_in``, ``stype_out``, ``encoding=dbn``, ``compression=zstd``.
- A 200 answer streams zstd-compressed DBN (chunked transfer encoding): metadata whose
  mappings give each requested raw symbol's instrument_id per day of the window, then the
  records sorted by time. The window filters on ``ts_recv`` where the schema has it
  (trades), else on ``ts_event`` (ohlcv): start inclusive, end exclusive.
- Errors are JSON ``{"detail": ...}`` with the HTTP status; the client raises
  ``BentoClientError`` for 4xx and ``BentoServerError`` for 5xx.

Only Databento's servers are stood in for: the records are real DBN, encoded with
``databento_dbn``, and the client is the real one. The server logs every request, and
fails on demand (an HTTP status, a connection closed halfway through the body, or a whole
answer whose DBN is cut or damaged).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

import databento_dbn as dbn
import pandas as pd
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NS = 1_000_000_000
P = 1_000_000_000  # Databento prices: 1e-9 units
DAY_NS = 86_400 * NS
GET_RANGE = "/v0/timeseries.get_range"
BODY_PIECE = 16_384


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded record of a schema: its raw symbol, the time the API filters on, the record."""

    ticker: str
    index_ts: int
    record: Any  # OHLCVMsg, TradeMsg, MBP1Msg, ...


@dataclass
class Catalogue:
    """What the stand-in holds for one dataset: symbology by day and records by schema."""

    dataset: str
    ids: dict[tuple[str, dt.date], int] = field(default_factory=dict)
    records: dict[str, list[Recorded]] = field(default_factory=dict)

    def map(self, ticker: str, day: dt.date, instrument_id: int) -> None:
        """Say that ``ticker`` is ``instrument_id`` on ``day``."""
        self.ids[(ticker, day)] = instrument_id

    def add(self, schema: str, ticker: str, record: Any) -> None:
        """Record one record of ``ticker`` (its instrument_id must be the ticker's on that day)."""
        day = ns_date(record.ts_event)
        assert self.ids.get((ticker, day)) == record.instrument_id, (ticker, day, record.instrument_id)
        # Databento indexes (and filters) every schema but OHLCV by ts_recv.
        index_ts = record.ts_event if isinstance(record, dbn.OHLCVMsg) else record.ts_recv
        self.records.setdefault(schema, []).append(Recorded(ticker, index_ts, record))

    def served(self, schema: str, start_ns: int, end_ns: int, tickers: Iterable[str] | None = None) -> list[Recorded]:
        """The records a request for [start_ns, end_ns) gets, in the order they are sent."""
        wanted = None if tickers is None else set(tickers)
        rows = [
            r
            for r in self.records.get(schema, [])
            if start_ns <= r.index_ts < end_ns and (wanted is None or r.ticker in wanted)
        ]
        return sorted(rows, key=lambda r: (r.index_ts, r.record.instrument_id))

    def mappings(self, tickers: list[str], start_ns: int, end_ns: int) -> tuple[list[Any], list[str], list[str]]:
        """(mappings, partial, not_found) for the days the window touches, as the real API answers."""
        first = ns_date(start_ns)
        last = ns_date(end_ns - 1)
        days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
        mappings, partial, not_found = [], [], []
        for ticker in tickers:
            intervals: list[SimpleNamespace] = []
            for day in days:
                instrument_id = self.ids.get((ticker, day))
                if instrument_id is None:
                    continue
                if intervals and intervals[-1].symbol == str(instrument_id) and intervals[-1].end_date == day:
                    intervals[-1].end_date = day + dt.timedelta(days=1)
                else:
                    intervals.append(
                        SimpleNamespace(start_date=day, end_date=day + dt.timedelta(days=1), symbol=str(instrument_id))
                    )
            if not intervals:
                not_found.append(ticker)
                continue
            if sum((i.end_date - i.start_date).days for i in intervals) < len(days):
                partial.append(ticker)
            mappings.append(SimpleNamespace(raw_symbol=ticker, intervals=intervals))
        return mappings, partial, not_found


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    form: dict[str, str]
    authorised: bool
    status: int = 0
    records: int = 0
    aborted: bool = False


@dataclass
class Fault:
    """A failure to serve: on request number ``on`` (1-based; None: the next one), ``times`` times."""

    status: int | None = None  # answer with this HTTP status and a JSON detail
    detail: str = "Internal server error"
    abort: bool = False  # or send part of the body, then drop the connection
    body: Callable[[bytes], bytes] | None = None  # or a whole 200 answer of these bytes (cut, damaged DBN)
    on: int | None = None
    times: int = 1


class DatabentoHistoricalServer:
    """The stand-in: ``with DatabentoHistoricalServer(key=..., catalogues=[...]) as server: ...``."""

    def __init__(self, *, key: str, catalogues: Iterable[Catalogue], cert_dir: Path) -> None:
        self.key = key
        self.catalogues = {c.dataset: c for c in catalogues}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self.ca_file, key_file = self_signed_certificate(cert_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_file, key_file)
        self._httpd = _TLSServer(("127.0.0.1", 0), _Handler, context)
        self._httpd.stand_in = self
        self.port = self._httpd.server_address[1]
        self.gateway = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="databento-http", daemon=True)

    def __enter__(self) -> DatabentoHistoricalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def fail(self, **kwargs: Any) -> Fault:
        """Fail a coming request (see Fault)."""
        fault = Fault(**kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    @property
    def get_ranges(self) -> list[Request]:
        """Every timeseries.get_range request, in order."""
        return [r for r in self.requests if r.path == GET_RANGE]

    def _log(self, request: Request) -> int:
        with self._lock:
            self.requests.append(request)
            return len(self.get_ranges)

    def _fault(self, number: int) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and (fault.on is None or fault.on == number):
                    fault.times -= 1
                    return fault
        return None


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    stand_in: DatabentoHistoricalServer

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext):
        super().__init__(address, handler)
        self.context = context

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        # The handshake happens in the handler's thread, so one slow client cannot stall accept().
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    def setup(self) -> None:
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        request = Request("GET", self.path.split("?")[0], {}, self._authorised())
        self.server.stand_in._log(request)
        self._error(request, 404, f"{request.path} is not stood in for (only POST {GET_RANGE})")

    def do_POST(self) -> None:
        stand_in = self.server.stand_in
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        form = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        request = Request("POST", self.path, form, self._authorised())
        number = stand_in._log(request)
        if self.path != GET_RANGE:
            self._error(request, 404, f"{self.path} is not stood in for (only POST {GET_RANGE})")
            return
        if self.headers.get("Authorization") is None:
            self._error(request, 401, "Authentication failed: no API key (HTTP basic auth, key as username).")
            return
        if not request.authorised:
            self._error(request, 401, "Authentication failed: unknown API key.")
            return
        fault = stand_in._fault(number)
        if fault is not None and fault.status is not None:
            self._error(request, fault.status, fault.detail)
            return
        try:
            body_bytes, count = self._get_range(form)
        except _BadRequest as exc:
            self._error(request, 422, str(exc))
            return
        if fault is not None and fault.body is not None:
            body_bytes = fault.body(body_bytes)
        request.status, request.records = 200, count
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", f"standin-{number}")
        self.end_headers()
        pieces = [body_bytes[i : i + BODY_PIECE] for i in range(0, len(body_bytes), BODY_PIECE)] or [b""]
        if fault is not None and fault.abort:
            # Half the body, then the connection drops without the closing chunk.
            request.aborted = True
            cut = body_bytes[: max(1, len(body_bytes) // 2)]
            self.wfile.write(f"{len(cut):X}\r\n".encode() + cut + b"\r\n")
            self.wfile.flush()
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return
        for piece in pieces:
            if piece:
                self.wfile.write(f"{len(piece):X}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme != "Basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        return user == self.server.stand_in.key and password == ""

    def _error(self, request: Request, status: int, detail: str) -> None:
        request.status = status
        payload = json.dumps({"detail": detail}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def _get_range(self, form: dict[str, str]) -> tuple[bytes, int]:
        for name in ("dataset", "start", "end", "schema"):
            if not form.get(name):
                raise _BadRequest(f"{name}: required")
        catalogue = self.server.stand_in.catalogues.get(form["dataset"])
        if catalogue is None:
            raise _BadRequest(f"dataset: unknown dataset {form['dataset']!r}")
        if form.get("stype_in", "raw_symbol") != "raw_symbol" or form.get("stype_out") != "instrument_id":
            raise _BadRequest("stype_in/stype_out: only raw_symbol -> instrument_id is stood in for")
        if form.get("encoding") != "dbn":
            raise _BadRequest("encoding: only dbn is stood in for")
        try:
            schema = dbn.Schema.from_str(form["schema"])
        except dbn.DBNError:
            raise _BadRequest(f"schema: unknown schema {form['schema']!r}") from None
        start_ns, end_ns = parse_ns(form["start"], "start"), parse_ns(form["end"], "end")
        if start_ns >= end_ns:
            raise _BadRequest("start: must be before end")
        requested = [s for s in form.get("symbols", "").split(",") if s]
        if not requested or requested == ["ALL_SYMBOLS"]:
            requested = sorted({ticker for ticker, _ in catalogue.ids})
        mappings, partial, not_found = catalogue.mappings(requested, start_ns, end_ns)
        header = dbn.Metadata(
            dataset=catalogue.dataset, schema=schema, start=start_ns, end=end_ns, stype_in=dbn.SType.RAW_SYMBOL,
            stype_out=dbn.SType.INSTRUMENT_ID, symbols=requested, partial=partial, not_found=not_found,
            mappings=mappings, limit=None, ts_out=False, version=3,
        ).encode()  # fmt: skip
        rows = catalogue.served(str(schema), start_ns, end_ns, requested)
        payload = header + b"".join(bytes(r.record) for r in rows)
        if form.get("compression", "zstd") == "zstd":
            payload = zstandard.ZstdCompressor().compress(payload)
        return payload, len(rows)


class _BadRequest(Exception):
    pass


def parse_ns(value: str, name: str) -> int:
    """A request time as the API takes it: nanoseconds, or ISO 8601 (naive means UTC)."""
    if value.isdigit():
        return int(value)
    try:
        ts = pd.Timestamp(value)
    except ValueError:
        raise _BadRequest(f"{name}: not a datetime: {value!r}") from None
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return int(ts.value)


def ns_date(ns: int) -> dt.date:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)).date()


def date_ns(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()) * NS


def self_signed_certificate(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files; the cert is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "databento stand-in")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "standin-cert.pem", directory / "standin-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


# -- recorded data -----------------------------------------------------------------------


def daily_ids(catalogue: Catalogue, tickers: list[str], days: list[dt.date], *, base: int = 100) -> None:
    """Give each ticker an instrument_id that changes every day, reusing yesterday's ids for
    other tickers (as GLBX and OPRA do), so a record only resolves by its own day's mapping."""
    for n, day in enumerate(days):
        for i, ticker in enumerate(tickers):
            catalogue.map(ticker, day, base + n + i)


def minute_bars(
    catalogue: Catalogue, tickers: list[str], days: list[dt.date], *, open_min: int = 14 * 60 + 30,
    close_min: int = 21 * 60, seed: int = 7,
) -> None:  # fmt: skip
    """ohlcv-1m bars for the regular session of each day: a random walk per ticker."""
    rng = random.Random(seed)
    for i, ticker in enumerate(tickers):
        price = (150 + 40 * i) * P
        for day in days:
            instrument_id = catalogue.ids[(ticker, day)]
            for minute in range(open_min, close_min):
                o = price
                c = max(P, o + rng.randint(-20, 20) * P // 100)
                h, low = max(o, c) + rng.randint(0, 10) * P // 100, min(o, c) - rng.randint(0, 10) * P // 100
                ts = date_ns(day) + minute * 60 * NS
                msg = dbn.OHLCVMsg(
                    rtype=int(dbn.RType.OHLCV_1M), publisher_id=2, instrument_id=instrument_id, ts_event=ts,
                    open=o, high=h, low=low, close=c, volume=rng.randint(100, 5000),
                )  # fmt: skip
                catalogue.add("ohlcv-1m", ticker, msg)
                price = c


def tbbo(catalogue: Catalogue, tickers: list[str], days: list[dt.date], *, per_day: int = 50) -> None:
    """Trades with the book before each (tbbo's MBP-1 records), every fifth without a bid."""
    sequence = 5000
    for i, ticker in enumerate(tickers):
        for day in days:
            instrument_id = catalogue.ids[(ticker, day)]
            start = date_ns(day) + 14 * 3600 * NS + 30 * 60 * NS
            for n in range(per_day):
                sequence += 1
                ts = start + n * 60 * NS + i * 1000
                bid = 2**63 - 1 if n % 5 == 4 else (100 + n) * P
                msg = dbn.MBP1Msg(
                    publisher_id=2, instrument_id=instrument_id, ts_event=ts, price=(101 + n) * P, size=5,
                    action=dbn.Action.TRADE, side=dbn.Side.ASK, depth=0, ts_recv=ts + 250, sequence=sequence,
                    levels=dbn.BidAskPair(  # type: ignore[arg-type]
                        bid_px=bid, ask_px=(101 + n) * P, bid_sz=10, ask_sz=20, bid_ct=1, ask_ct=2,
                    ),
                )  # fmt: skip
                catalogue.add("tbbo", ticker, msg)


def trades(
    catalogue: Catalogue, tickers: list[str], days: list[dt.date], *, per_day: int = 200, seed: int = 11
) -> None:
    """Trades spread over each day; each ticker's last trade of a day is stamped 100 ns before
    midnight and received after it, so the API serves it with the next day's window."""
    rng = random.Random(seed)
    sequence = 1000
    for i, ticker in enumerate(tickers):
        price = (80 + 25 * i) * P
        for day in days:
            instrument_id = catalogue.ids[(ticker, day)]
            start = date_ns(day) + 14 * 3600 * NS + 30 * 60 * NS
            stamps = sorted(start + rng.randrange(0, 6 * 3600 * NS) for _ in range(per_day - 1))
            stamps.append(date_ns(day) + DAY_NS - 100)
            for ts in stamps:
                sequence += 1
                price = max(P, price + rng.randint(-5, 5) * P // 100)
                msg = dbn.TradeMsg(
                    publisher_id=2, instrument_id=instrument_id, ts_event=ts, price=price, size=rng.randint(1, 500),
                    action=dbn.Action.TRADE, side=rng.choice([dbn.Side.ASK, dbn.Side.BID, dbn.Side.NONE]), depth=0,
                    ts_recv=ts + 250, flags=0, ts_in_delta=180, sequence=sequence,
                )  # fmt: skip
                catalogue.add("trades", ticker, msg)
