"""The ingester's exit code is the truth: any input not read whole fails the run, with its one-line reason.

Each test runs ``manage.py ingest`` as a subprocess (what a script, a cron job or a
Kubernetes Job sees) against the test database, and checks the exit status, the line on
stderr, and that what was read whole is stored.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import databento_dbn as dbn
import pytest
import zstandard
from django.conf import settings

from ingest.sources import replay as source
from marketdata.models import Bar, Symbol, Trade
from tests.conftest import dbn_records
from tests.ingest.databento_http import Catalogue, DatabentoHistoricalServer, daily_ids, minute_bars
from tests.ingest.databento_live import LiveGateway
from tests.ingest.dbnfile import NS, P

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
HUGE = 0xFFFFFFF0
# The decoder reserving a damaged metadata length (4 GiB) aborts the process under this
# limit; the ingester itself runs well within it.
MEMORY_LIMIT = 3 << 30


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """stderr's lines that say what went wrong: a file's failure, the command's error.

        JSON log records and progress reports are left out (they come from other threads,
        so their place among these lines is not fixed); a traceback fails the test.
        """
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        return [line for line in self.stderr.splitlines() if line.startswith(("failed: ", "CommandError: "))]


def subprocess_env() -> dict[str, str]:
    """This environment, pointed at the test database and the test Redis."""
    db = settings.DATABASES["default"]
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "TEST_REDIS_URL": settings.REDIS_URL,
        "CHANNELS_PREFIX": settings.CHANNELS_PREFIX,
    }


def ingest(*args: str | Path, env: dict[str, str] | None = None, memory_limit: int | None = None) -> Run:
    """Run ``manage.py ingest ARGS`` on the test database and Redis; return how it ended."""
    environ = {**subprocess_env(), **(env or {})}

    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    proc = subprocess.run(
        [sys.executable, "manage.py", "ingest", *map(str, args)],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )  # fmt: skip
    return Run(proc.returncode, proc.stdout, proc.stderr)


def plain(path: Path) -> bytes:
    """A sample's DBN bytes (decompressed when it is zstd)."""
    data = path.read_bytes()
    return zstandard.ZstdDecompressor().decompressobj().decompress(data) if path.suffix == ".zst" else data


def metadata_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[4:8], "little")


def header(length: int) -> bytes:
    """A DBN v3 prefix whose metadata length is ``length``."""
    return b"DBN\x03" + length.to_bytes(4, "little")


# -- bad inputs, each made from the shared samples in tmp_path: (file, its one-line reason) --------


def cut_plain(tmp: Path, samples: Path) -> tuple[Path, str]:
    data = plain(samples / "dbn-repo" / "test_data.ohlcv-1m.dbn")
    path = tmp / "cut.dbn"
    path.write_bytes(data[:-20])  # the second bar loses its tail
    size = data[metadata_end(data)] * 4
    return path, source.ERR_TRUNCATED.format(path=path, count=size - 20)


def cut_zstd(tmp: Path, samples: Path) -> tuple[Path, str]:
    packed = zstandard.ZstdCompressor().compress(plain(samples / "dbn-repo" / "test_data.ohlcv-1m.dbn"))
    path = tmp / "cut.dbn.zst"
    path.write_bytes(packed[: len(packed) - 8])  # the frame's end (and its checksum) is missing
    return path, source.ERR_ZSTD_CUT.format(path=path)


def corrupt(tmp: Path, samples: Path) -> tuple[Path, str]:
    data = bytearray(plain(samples / "dbn-repo" / "test_data.ohlcv-1m.dbn"))
    second = metadata_end(data) + data[metadata_end(data)] * 4
    data[second] = 0  # a record length of 0: shorter than any record's header
    path = tmp / "corrupt.dbn"
    path.write_bytes(bytes(data))
    return path, source.ERR_CORRUPT.format(path=path, error="")  # the decoder words the rest


def empty(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "empty.dbn"
    path.write_bytes(b"")
    return path, source.ERR_EMPTY.format(path=path)


def not_dbn(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "notes.dbn"
    path.write_text("symbol,ts,close\nAAPL,2024-01-02T14:30:00Z,185.2\n")
    return path, source.ERR_NOT_DBN.format(path=path)


def not_zstd(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "gzip.dbn.zst"
    path.write_bytes(zlib.compress(plain(samples / "dbn-repo" / "test_data.ohlcv-1m.dbn")))
    return path, source.ERR_CORRUPT.format(path=path, error="")


def directory(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "folder.dbn"
    path.mkdir()
    return path, source.ERR_DIRECTORY.format(path=path)


def missing(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "nope.dbn"
    return path, source.ERR_MISSING.format(path=path)


def header_cut(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "header.dbn"
    path.write_bytes(b"DBN\x03\x10")
    return path, source.ERR_HEADER_CUT.format(path=path, count=5)


def metadata_past_end(tmp: Path, samples: Path) -> tuple[Path, str]:
    path = tmp / "short.dbn"
    path.write_bytes(header(100_000) + bytes(200))
    return path, source.ERR_METADATA_PAST_END.format(path=path, length=100_000, size=200)


BAD: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    f.__name__: f
    for f in (cut_plain, cut_zstd, corrupt, empty, not_dbn, not_zstd, directory, missing, header_cut, metadata_past_end)
}


def good_files(samples: Path) -> list[Path]:
    return [samples / "XNAS.ITCH" / "test_data.ohlcv-1m.dbn.zst", samples / "XNAS.ITCH" / "test_data.trades.dbn.zst"]


def assert_good_files_stored(samples: Path) -> None:
    bars, trades = (len(dbn_records(path)) for path in good_files(samples))
    xnas = Symbol.objects.filter(dataset="XNAS.ITCH")
    assert Bar.objects.filter(symbol__in=xnas).count() == bars == 4
    assert Trade.objects.filter(symbol__in=xnas).count() == trades == 4


def read_whole_line(path: Path, records: int) -> str:
    from ingest.runs import OUT_READ_WHOLE

    return OUT_READ_WHOLE.format(path=path, records=records)


def failed_line(reason: str) -> str:
    from ingest.runs import ERR_FILE_FAILED

    return ERR_FILE_FAILED.format(reason=reason)


def failed_total(failed: int, total: int) -> str:
    from ingest.runs import ERR_FILES_FAILED

    return "CommandError: " + ERR_FILES_FAILED.format(failed=failed, total=total)


# -- replay ----------------------------------------------------------------------------------------


def test_files_read_whole_exit_zero_and_say_so(samples):
    ohlcv, trades = good_files(samples)

    run = ingest("replay", ohlcv, trades, "--no-publish")

    assert run.returncode == 0, run.stderr
    assert read_whole_line(ohlcv, 4) in run.stdout.splitlines()
    assert read_whole_line(trades, 4) in run.stdout.splitlines()
    assert not run.lines()
    assert_good_files_stored(samples)


@pytest.mark.parametrize("kind", BAD)
def test_a_file_not_read_whole_fails_the_run_with_its_reason(tmp_path, samples, kind):
    bad, reason = BAD[kind](tmp_path, samples)

    run = ingest("replay", bad, "--no-publish")

    assert run.returncode == 1, (run.stdout, run.stderr)
    [line, total] = run.lines()
    assert line.startswith(failed_line(reason)), run.stderr
    assert total == failed_total(1, 1)


@pytest.mark.parametrize("kind", BAD)
def test_the_good_files_beside_a_bad_one_are_stored_and_reported(tmp_path, samples, kind):
    bad, reason = BAD[kind](tmp_path, samples)
    ohlcv, trades = good_files(samples)

    run = ingest("replay", ohlcv, bad, trades, "--no-publish")

    assert run.returncode == 1, (run.stdout, run.stderr)
    assert read_whole_line(ohlcv, 4) in run.stdout.splitlines()
    assert read_whole_line(trades, 4) in run.stdout.splitlines()
    [line, total] = run.lines()
    assert line.startswith(failed_line(reason))
    assert total == failed_total(1, 3)
    assert_good_files_stored(samples)


def test_the_whole_records_before_a_cut_stay_stored_and_published(tmp_path, samples, redis_client):
    bad, reason = cut_plain(tmp_path, samples)
    ohlcv, _ = good_files(samples)

    run = ingest("replay", bad, ohlcv)

    assert run.returncode == 1
    assert failed_line(reason) in run.lines()
    assert Bar.objects.filter(symbol__dataset="GLBX.MDP3").count() == 1  # the cut file's first bar
    assert Bar.objects.filter(symbol__dataset="XNAS.ITCH").count() == 4
    published = {key.decode() for key in redis_client.scan_iter("md:buf:bars:1m:*")}
    tickers = Symbol.objects.values_list("ticker", flat=True)
    assert published == {f"md:buf:bars:1m:{ticker}" for ticker in tickers}


def test_several_failures_are_each_reported(tmp_path, samples):
    reasons = [BAD[kind](tmp_path, samples) for kind in ("missing", "directory", "cut_plain")]
    ohlcv, _ = good_files(samples)

    run = ingest("replay", *(path for path, _ in reasons), ohlcv, "--no-publish")

    assert run.returncode == 1
    *lines, total = run.lines()
    assert lines == [failed_line(reason) for _, reason in reasons]
    assert total == failed_total(3, 4)
    assert read_whole_line(ohlcv, 4) in run.stdout.splitlines()


def test_a_paced_replay_fails_the_same_way(tmp_path, samples):
    bad, reason = cut_plain(tmp_path, samples)
    ohlcv, _ = good_files(samples)

    run = ingest("replay", bad, ohlcv, "--speed", "100000", "--no-publish")

    assert run.returncode == 1
    assert run.lines() == [failed_line(reason), failed_total(1, 2)]
    assert read_whole_line(ohlcv, 4) in run.stdout.splitlines()


def test_a_looped_replay_says_each_file_once_and_a_stop_does_not_hide_a_failure(tmp_path, samples):
    bad, reason = missing(tmp_path, samples)
    ohlcv, _ = good_files(samples)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "ingest", "replay", str(ohlcv), str(bad), "--loop", "--no-publish"], cwd=ROOT,
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not Bar.objects.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(2)  # more passes
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)

    assert err.count('"cause": "missing_file"') >= 2, err[-3000:]  # the log has a line per pass
    assert proc.returncode == 1
    lines = Run(proc.returncode, out, err).lines()
    assert lines == [failed_line(reason), failed_total(1, 2)]
    assert out.splitlines().count(read_whole_line(ohlcv, 4)) == 1


def test_a_looped_replay_of_nothing_readable_ends_at_once(tmp_path, samples):
    bad, reason = missing(tmp_path, samples)

    run = ingest("replay", bad, "--loop", "--no-publish")  # no stop needed: it ends by itself

    assert run.returncode == 1
    assert run.lines() == [failed_line(reason), failed_total(1, 1)]
    assert run.stderr.count('"cause": "missing_file"') == 1


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
def test_a_huge_metadata_length_is_refused_before_any_allocation(tmp_path, samples, zstd):
    payload = header(HUGE) + bytes(200_000)
    bad = tmp_path / ("huge.dbn.zst" if zstd else "huge.dbn")
    bad.write_bytes(zstandard.ZstdCompressor().compress(payload) if zstd else payload)
    ohlcv, _ = good_files(samples)

    run = ingest("replay", bad, ohlcv, "--no-publish", memory_limit=MEMORY_LIMIT)

    assert run.returncode == 1, run.stderr[-2000:]  # not 134: the decoder never saw the length
    reason = source.ERR_METADATA_HUGE.format(path=bad, length=HUGE, limit=source.METADATA_LIMIT)
    assert failed_line(reason) in run.lines()
    assert Bar.objects.filter(symbol__dataset="XNAS.ITCH").count() == 4


def test_a_metadata_length_past_the_end_of_a_zstd_stream_is_refused(tmp_path):
    bad = tmp_path / "short.dbn.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(header(1 << 20) + bytes(300)))

    run = ingest("replay", bad, "--no-publish")

    assert run.returncode == 1
    reason = source.ERR_METADATA_PAST_END.format(path=bad, length=1 << 20, size=300)
    assert failed_line(reason) in run.lines()


def test_a_file_of_records_dbn_does_not_read_fails_after_its_metadata(tmp_path, samples):
    data = plain(samples / "dbn-repo" / "test_data.ohlcv-1m.dbn")
    bad = tmp_path / "v9.dbn"
    bad.write_bytes(data[:3] + bytes([9]) + data[4:])  # a DBN version no decoder knows

    run = ingest("replay", bad, "--no-publish")

    assert run.returncode == 1
    assert run.lines()[0].startswith(failed_line(source.ERR_CORRUPT.format(path=bad, error="")))


def test_a_database_it_cannot_reach_fails_the_run(samples):
    ohlcv, _ = good_files(samples)
    db = settings.DATABASES["default"]
    nowhere = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}_does_not_exist"

    run = ingest("replay", ohlcv, "--no-publish", env={"DATABASE_URL": nowhere})

    assert run.returncode == 1
    assert "does not exist" in run.stderr.splitlines()[-1]


def test_help_documents_the_exit_codes():
    run = ingest("--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    assert "Exit status: 0" in text
    assert "1 when any input could not be read whole" in text


def test_bad_arguments_exit_two():
    run = ingest("replay", "--speed", "0", "x.dbn")
    assert run.returncode == 2
    assert "--speed must be a positive number" in run.stderr


def test_schema_skips_are_not_failures(tmp_path):
    # A file read whole whose records the store does not keep (mbo) is skipped with a count, not a failure.
    from tests.ingest.dbnfile import metadata

    orders = [
        bytes(dbn.MBOMsg(
            publisher_id=2, instrument_id=7, ts_event=1_704_186_000 * NS + i, order_id=i, price=100 * P, size=1,
            channel_id=0, action=dbn.Action.ADD, side=dbn.Side.BID, ts_recv=1_704_186_000 * NS + i, ts_in_delta=0,
            sequence=i,
        ))
        for i in range(3)
    ]  # fmt: skip
    path = tmp_path / "orders.dbn"
    path.write_bytes(metadata(symbols={"AAPL": 7}, schema=dbn.Schema.MBO) + b"".join(orders))
    run = ingest("replay", path, "--no-publish")
    assert run.returncode == 0, run.stderr
    assert read_whole_line(path, 3) in run.stdout.splitlines()
    assert "schema:MBOMsg=3" in run.stdout


def test_a_dbn_metadata_only_file_is_read_whole(tmp_path):
    from tests.ingest.dbnfile import metadata

    path = tmp_path / "nothing.dbn"
    path.write_bytes(metadata(symbols={"AAPL": 7}, schema=dbn.Schema.OHLCV_1M))

    run = ingest("replay", path, "--no-publish")

    assert run.returncode == 0, run.stderr
    assert read_whole_line(path, 0) in run.stdout.splitlines()


# -- historical: a downloaded chunk is a file too ----------------------------------------------------

KEY = "db-Hist0ricalStandInKey000000001"
TICKERS = ["AAPL", "MSFT"]
DAYS = [date(2024, 1, 2), date(2024, 1, 3), date(2024, 1, 4)]
BARS_A_DAY = 390 * len(TICKERS)


@pytest.fixture
def historical_server(tmp_path) -> Iterator[DatabentoHistoricalServer]:
    catalogue = Catalogue("XNAS.ITCH")
    daily_ids(catalogue, TICKERS, DAYS)
    minute_bars(catalogue, TICKERS, DAYS)
    with DatabentoHistoricalServer(key=KEY, catalogues=[catalogue], cert_dir=tmp_path) as server:
        yield server


def fetch(server: DatabentoHistoricalServer) -> Run:
    return ingest(
        "historical", "--dataset", "XNAS.ITCH", "--schema", "ohlcv-1m", "--symbols", ",".join(TICKERS),
        "--start", "2024-01-02T00:00:00Z", "--end", "2024-01-05T00:00:00Z", "--gateway", server.gateway,
        "--no-publish",
        env={"DATABENTO_API_KEY": KEY, "REQUESTS_CA_BUNDLE": server.ca_file, "NO_PROXY": "127.0.0.1,localhost"},
        memory_limit=MEMORY_LIMIT,
    )  # fmt: skip


def zstd_cut(body: bytes) -> bytes:
    return body[: len(body) // 2]


def dbn_cut(body: bytes) -> bytes:
    data = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return zstandard.ZstdCompressor().compress(data[:-20])


def dbn_damaged(body: bytes) -> bytes:
    data = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(body))
    first = metadata_end(data)
    data[first + data[first] * 4 * 10] = 0  # the eleventh record's length
    return zstandard.ZstdCompressor().compress(bytes(data))


def huge_metadata(body: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(header(HUGE) + bytes(100_000))


ERR_TAIL = "): run the same command again to resume from the store"


def incomplete(reason: str) -> str:
    from ingest.runs import ERR_HISTORICAL_INCOMPLETE

    return "CommandError: " + ERR_HISTORICAL_INCOMPLETE.format(reason=reason)


def test_a_whole_historical_fetch_exits_zero(historical_server):
    run = fetch(historical_server)
    assert run.returncode == 0, run.stderr
    assert Bar.objects.count() == 3 * BARS_A_DAY


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (zstd_cut, "the zstd stream ends early"),
        (dbn_cut, "file ends inside a record"),
        (dbn_damaged, "not decodable as DBN"),
        (huge_metadata, "more than a DBN file holds"),
    ],
    ids=["zstd_cut", "dbn_cut", "dbn_damaged", "huge_metadata"],
)
def test_a_historical_chunk_not_read_whole_fails_the_run_and_stops_at_it(historical_server, damage, what):
    from ingest.sources.historical import ERR_API_UNREADABLE

    historical_server.fail(body=damage, on=2)
    second_day = {"dataset": "XNAS.ITCH", "schema": "ohlcv-1m", "lo": "2024-01-03T00:00:00+00:00",
                  "hi": "2024-01-04T00:00:00+00:00"}  # fmt: skip
    prefix = incomplete(ERR_API_UNREADABLE.format(reason="", **second_day))[: -len(ERR_TAIL)]

    run = fetch(historical_server)

    assert run.returncode == 1, (run.stdout, run.stderr[-3000:])
    lines = run.lines()
    assert len(lines) == 1, run.stderr[-3000:]
    [line] = lines
    assert line.startswith(prefix)
    assert what in line
    assert len(historical_server.get_ranges) == 2  # nothing fetched past the damage
    first_day = Bar.objects.filter(ts__date=DAYS[0]).count()
    assert first_day == BARS_A_DAY
    assert not Bar.objects.filter(ts__date=DAYS[2]).exists()


def test_a_refused_historical_request_exits_one(historical_server):
    historical_server.fail(status=422, detail="symbols: too many")

    run = fetch(historical_server)

    assert run.returncode == 1
    [line] = run.lines()
    assert line.startswith(incomplete("historical API refused XNAS.ITCH ohlcv-1m ")[: -len(ERR_TAIL)])
    assert line.endswith("symbols: too many" + ERR_TAIL)


# -- live ------------------------------------------------------------------------------------------

LIVE_KEY = "db-" + "A" * 24 + "good1"
OTHER_KEY = "db-" + "B" * 24 + "good1"
LIVE_SYMBOLS = {"AAPL": 7, "MSFT": 8}


def live_bars(count: int) -> list[dbn.OHLCVMsg]:
    t0 = time.time_ns() // NS * NS - 3 * 3600 * NS
    t0 -= t0 % (60 * NS)
    return [
        dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1M), publisher_id=2, instrument_id=iid, ts_event=t0 + i * 60 * NS,
                     open=100 * P, high=101 * P, low=99 * P, close=100 * P, volume=100)
        for i in range(count) for iid in LIVE_SYMBOLS.values()
    ]  # fmt: skip


def live_args(gateway: LiveGateway) -> list[str]:
    return ["live", "--dataset", "XNAS.ITCH", "--schema", "ohlcv-1m", "--symbols", ",".join(LIVE_SYMBOLS),
            "--gateway", gateway.address, "--no-publish"]  # fmt: skip


def test_a_live_key_the_gateway_refuses_exits_one():
    with LiveGateway(keys=[LIVE_KEY], symbols=LIVE_SYMBOLS, records=live_bars(3)) as gateway:
        run = ingest(*live_args(gateway), env={"DATABENTO_API_KEY": OTHER_KEY})

    assert run.returncode == 1
    [line] = run.lines()
    assert line.startswith("CommandError: ")
    assert "rejected the API key" in line
    assert not Bar.objects.exists()


def test_a_live_run_stopped_by_sigterm_exits_zero_with_what_it_received_stored():
    records = live_bars(5)
    with LiveGateway(keys=[LIVE_KEY], symbols=LIVE_SYMBOLS, records=records, heartbeat_s=0.2) as gateway:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "ingest", *live_args(gateway)], cwd=ROOT,
            env={**subprocess_env(), "DATABENTO_API_KEY": LIVE_KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while Bar.objects.count() < len(records) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err[-3000:]
    assert Bar.objects.count() == len(records)
