"""Replay DBN files (v1-v3, plain or zstd) as a source, as fast as possible or paced."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import databento_dbn as dbn
import numpy as np
import zstandard

from ..pipeline import run
from ..records import RAW_SIZES, UPGRADE, RawRecords
from ..source import FeedStart, Shift, SourceErrors
from ..stats import Stats

CHUNK = 1 << 16  # compressed input expands ~20x: keep the decoded batch small
ERR_TRUNCATED = "{path}: file ends inside a record ({count} bytes after the last whole record)"
ERR_CORRUPT = "{path}: not decodable as DBN: {error}"
ERR_MISSING = "{path}: no such file"
ERR_ZSTD_CUT = "{path}: the zstd stream ends early (the file was cut): the records after it are missing"
ERR_DIRECTORY = "{path}: is a directory, not a DBN file"
ERR_NOT_FILE = "{path}: not a regular file"
ERR_UNREADABLE = "{path}: cannot be read: {error}"
ERR_EMPTY = "{path}: empty file (no DBN header)"
ERR_NOT_DBN = "{path}: not a DBN file (it does not start with DBN's header)"
ERR_HEADER_CUT = "{path}: file ends inside the DBN header ({count} bytes)"
ERR_METADATA_HUGE = (
    "{path}: the DBN header claims {length} bytes of metadata, more than a DBN file holds ({limit} at most): "
    "the header is damaged"
)
ERR_METADATA_PAST_END = (
    "{path}: the DBN header claims {length} bytes of metadata, but the file ends {size} bytes after the header"
)


@dataclass(frozen=True, slots=True)
class FileStart:
    """Emitted before a file's records: its metadata (dataset, schema, symbology)."""

    path: Path
    metadata: dbn.Metadata


@dataclass(frozen=True, slots=True)
class FileRead:
    """How one file of a replay went: read whole, failed (``error``, its one-line reason), or stopped first."""

    path: Path
    records: int  # data records delivered
    error: str = ""
    stopped: bool = False


def _is_zstd(path: Path) -> bool:
    return path.suffix == ".zst"


MAX_METADATA = 64 << 20  # the raw reader leaves larger metadata (or damage) to the decoder
# More metadata than any DBN file holds: OPRA's whole symbology (1.5M symbols, with their
# mappings) is about 350 MB in DBN v3. Only a compressed file needs it: a plain one's
# metadata must fit in the file.
METADATA_LIMIT = 1 << 30
HEADER = 8  # b"DBN", the version byte, then the metadata's length (u32, little-endian)


def dbn_decoder(path: Path) -> dbn.DBNDecoder:
    """A streaming decoder that upgrades DBN v1/v2 records to v3."""
    return dbn.DBNDecoder(
        upgrade_policy=UPGRADE,
        compression=dbn.Compression.ZSTD if _is_zstd(path) else dbn.Compression.NONE,
    )


def zstd_complete(path: Path) -> bool:
    """Whether every zstd frame of the file ends: the DBN decoder takes a cut stream for its end.

    Decompresses once more, discarding the output (about a gigabyte a second), only once
    the records are all delivered.
    """
    pending = b""
    complete = True
    with path.open("rb") as handle:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        while chunk := pending or handle.read(CHUNK * 16):
            pending = b""
            decompressor.decompress(chunk)
            complete = decompressor.eof
            if decompressor.eof:  # a frame ended: the rest (if any) is the next frame
                pending = decompressor.unused_data
                decompressor = zstandard.ZstdDecompressor().decompressobj()
    return complete


def header_error(path: Path) -> tuple[str, str] | None:
    """Why ``path`` cannot be read as DBN, judged by what it is and its header alone: (cause, message), or None.

    Runs before any decoder sees the file: the decoder reserves the metadata length the
    header claims, so a damaged length (0xFFFFFFF0) would be a 4 GiB allocation (an abort
    under a memory limit) instead of an error.
    """
    if path.is_dir():
        return "not_a_file", ERR_DIRECTORY.format(path=path)
    if not path.exists():
        return "missing_file", ERR_MISSING.format(path=path)
    if not path.is_file():
        return "not_a_file", ERR_NOT_FILE.format(path=path)
    try:
        with path.open("rb") as handle:
            if not _is_zstd(path):
                return _metadata_error(path, handle, os.fstat(handle.fileno()).st_size)
            with zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True) as stream:
                problem = _metadata_error(path, stream, None)
        # A cut zstd stream just ends (often before its first byte out): say what happened to the file.
        if problem is not None and not zstd_complete(path):
            return "truncated_file", ERR_ZSTD_CUT.format(path=path)
        return problem
    except zstandard.ZstdError as exc:
        return "corrupt_file", ERR_CORRUPT.format(path=path, error=exc)
    except OSError as exc:
        return "unreadable_file", ERR_UNREADABLE.format(path=path, error=exc.strerror or exc)


def _read_up_to(stream: BinaryIO, count: int) -> bytes:
    """Up to ``count`` bytes of ``stream``, fewer only at its end (a zstd reader may return less per read)."""
    parts: list[bytes] = []
    got = 0
    while got < count and (part := stream.read(min(count - got, CHUNK))):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _metadata_error(path: Path, stream: BinaryIO, size: int | None) -> tuple[str, str] | None:
    """The header check on the file's DBN bytes; ``size``: their length when known (plain files)."""
    head = _read_up_to(stream, HEADER)
    if not head:
        return "corrupt_file", ERR_EMPTY.format(path=path)
    if head[:3] != b"DBN"[: len(head)]:
        return "corrupt_file", ERR_NOT_DBN.format(path=path)
    if len(head) < HEADER:
        return "truncated_file", ERR_HEADER_CUT.format(path=path, count=len(head))
    length = int.from_bytes(head[4:8], "little")
    if length > METADATA_LIMIT:
        return "corrupt_file", ERR_METADATA_HUGE.format(path=path, length=length, limit=METADATA_LIMIT)
    if size is not None:
        after = size - HEADER
    else:  # a compressed stream's length is known only by reading it: as far as the metadata, kept nowhere
        after = 0
        while after < length and (part := stream.read(min(length - after, CHUNK))):
            after += len(part)
    if after < length:
        return "truncated_file", ERR_METADATA_PAST_END.format(path=path, length=length, size=after)
    return None


def decode_error(exc: BaseException) -> bool:
    """A decoder failure caused by the bytes: DBNError, zstd's RuntimeError, or a Rust panic (pyo3's
    PanicException, a BaseException) on a record shorter than its type."""
    return isinstance(exc, dbn.DBNError | RuntimeError) or type(exc).__name__ == "PanicException"


# Schemas whose every record has one fixed-size layout, which the replay can read straight
# from the file's bytes (RawRecords): the record type and the rtypes it may carry.
RAW_LAYOUTS: dict[dbn.Schema, tuple[type, frozenset[int]]] = {
    **{schema: (dbn.OHLCVMsg, frozenset({int(rtype)})) for schema, rtype in (
        (dbn.Schema.OHLCV_1S, dbn.RType.OHLCV_1S), (dbn.Schema.OHLCV_1M, dbn.RType.OHLCV_1M),
        (dbn.Schema.OHLCV_1H, dbn.RType.OHLCV_1H), (dbn.Schema.OHLCV_1D, dbn.RType.OHLCV_1D),
    )},
    dbn.Schema.TRADES: (dbn.TradeMsg, frozenset({int(dbn.RType.MBP_0)})),
}  # fmt: skip


class _Fallback(Exception):
    """The raw reader met what it does not read (another layout, damage): the decoder takes over."""


def file_records(path: Path, stats: Stats, *, raw: bool = False) -> Iterator[FileStart | list[object] | RawRecords]:
    """Yield FileStart, then the whole records of ``path`` in lists; a cut or corrupt tail is counted.

    With ``raw``, a file of one fixed-size layout (RAW_LAYOUTS) comes as RawRecords: its
    bytes, checked record by record (length and rtype) with array operations, never an
    object per record (a replay at full speed spent 0.3 us a bar of its CPU making and
    unmaking them). Bars and trades have the same layout in DBN v1, v2 and v3, so they need
    no upgrade. From the first record it does not read so (another rtype, damage) to the
    end, and for every other file, the decoder reads as it always did.
    """
    problem = header_error(path)
    if problem is not None:
        stats.error(*problem)
        return
    delivered = 0  # data records yielded
    started = False
    if raw:
        reader = _RawReader(path)
        try:
            for item in reader:
                if isinstance(item, FileStart):
                    started = True
                else:
                    delivered += len(item)
                yield item
        except _Fallback:
            pass
        else:
            if reader.leftover:
                stats.error("truncated_file", ERR_TRUNCATED.format(path=path, count=reader.leftover))
            elif not reader.complete:
                stats.error("truncated_file", ERR_ZSTD_CUT.format(path=path))
            return
    yield from _decoded(path, stats, delivered, started)


class _RawReader:
    """Iterates FileStart, then RawRecords, of a file of one fixed-size layout; raises
    _Fallback at the first record (or file) it does not read. Afterwards, ``leftover``:
    bytes after the last whole record; ``complete``: whether a zstd stream ended whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.leftover = 0
        self.complete = True

    def __iter__(self) -> Iterator[FileStart | RawRecords]:
        pending = b""
        layout: tuple[type, frozenset[int]] | None = None
        header = b""
        for chunk in self._plain():
            data = pending + chunk
            if layout is None:
                if len(data) < 8:
                    pending = data
                    continue
                end = 8 + int.from_bytes(data[4:8], "little")
                if data[:3] != b"DBN" or end > MAX_METADATA:
                    raise _Fallback
                if len(data) < end:
                    pending = data
                    continue
                header = data[:end]
                try:
                    decoded = dbn.DBNDecoder(upgrade_policy=UPGRADE).write_and_decode(header)
                except BaseException as exc:
                    if not decode_error(exc):
                        raise
                    raise _Fallback from exc
                metadata = decoded[0] if decoded else None
                if not isinstance(metadata, dbn.Metadata) or metadata.ts_out or metadata.schema is None:
                    raise _Fallback
                layout = RAW_LAYOUTS.get(dbn.Schema(metadata.schema))
                if layout is None:
                    raise _Fallback
                yield FileStart(self.path, metadata)
                data = data[end:]
            kind, rtypes = layout
            size = RAW_SIZES[kind]
            whole = len(data) - len(data) % size
            rows = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(-1, size)
            good = (rows[:, 0] == size // 4) & np.isin(rows[:, 1], list(rtypes))
            if not good.all():
                first_bad = int(np.argmin(good))
                if first_bad:
                    yield RawRecords(kind, data[: first_bad * size], header)
                raise _Fallback
            if whole:
                yield RawRecords(kind, data[:whole], header)
            pending = data[whole:]
        if layout is None:
            raise _Fallback  # a file shorter than its metadata: the decoder says what is wrong
        self.leftover = len(pending)

    def _plain(self) -> Iterator[bytes]:
        """The file's DBN bytes, decompressed as they are read when it is zstd (frame after frame)."""
        with self.path.open("rb") as handle:
            if not _is_zstd(self.path):
                while chunk := handle.read(CHUNK * 16):
                    yield chunk
                return
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            pending = b""
            while chunk := pending or handle.read(CHUNK):
                pending = b""
                try:
                    out = decompressor.decompress(chunk)
                except zstandard.ZstdError as exc:
                    raise _Fallback from exc
                if out:
                    yield out
                self.complete = decompressor.eof
                if decompressor.eof:  # a frame ended: the rest (if any) is the next frame
                    pending = decompressor.unused_data
                    decompressor = zstandard.ZstdDecompressor().decompressobj()


def _decoded(path: Path, stats: Stats, skip: int, started: bool) -> Iterator[FileStart | list[object]]:
    """file_records by the decoder: FileStart unless ``started``, then the records after the first ``skip``."""
    decoder = dbn_decoder(path)
    delivered = 0  # data records decoded (the first ``skip`` of them are not yielded)
    offset = 0  # bytes of the file decoded
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            try:
                records = decoder.write_and_decode(chunk)
            except BaseException as exc:
                if not decode_error(exc):
                    raise
                yield from _salvage(path, offset, chunk, max(delivered, skip), started)
                stats.error("corrupt_file", ERR_CORRUPT.format(path=path, error=exc))
                return
            offset += len(chunk)
            if records and isinstance(records[0], dbn.Metadata):
                if not started:
                    yield FileStart(path, records[0])
                started = True
                records = records[1:]
            if records:
                fresh = records[max(0, skip - delivered) :]
                delivered += len(records)
                if fresh:
                    yield list[object](fresh)
    leftover = len(decoder.buffer())
    if leftover:
        stats.error("truncated_file", ERR_TRUNCATED.format(path=path, count=leftover))
    elif not started:  # empty, or a compressed stream cut before its metadata
        stats.error("corrupt_file", ERR_CORRUPT.format(path=path, error="no DBN metadata"))
    elif _is_zstd(path) and not zstd_complete(path):
        stats.error("truncated_file", ERR_ZSTD_CUT.format(path=path))


def _salvage(
    path: Path, offset: int, chunk: bytes, delivered: int, started: bool
) -> Iterator[FileStart | list[object]]:
    """The whole records of a failed chunk that come before the damage (a failed chunk yields none).

    A fresh decoder reads the file up to the chunk again, then the chunk a byte at a time,
    so it fails on the very byte that completes the damaged record. Only on this error path.
    """
    decoder = dbn_decoder(path)
    seen = 0
    with path.open("rb") as handle:
        pieces = [handle.read(CHUNK) for _ in range(-(-offset // CHUNK))] if offset else []
    pieces += [chunk[i : i + 1] for i in range(len(chunk))]
    for piece in pieces:
        try:
            records = decoder.write_and_decode(piece)
        except BaseException as exc:
            if not decode_error(exc):
                raise
            return
        if records and isinstance(records[0], dbn.Metadata):
            if not started:
                yield FileStart(path, records[0])
            records = records[1:]
        fresh = records[max(0, delivered - seen) :]
        seen += len(records)
        if fresh:
            yield list[object](fresh)


class Pacer:
    """Sleeps so records go out at ``speed`` times the pace of their own timestamps."""

    def __init__(self, speed: float, stopping: threading.Event) -> None:
        self.speed = speed
        self.stopping = stopping
        self.origin: tuple[int, float] | None = None

    def wait(self, ts_ns: int) -> None:
        """Return when the record of ``ts_ns`` is due (or at once when stopping)."""
        if self.origin is None:
            self.origin = (ts_ns, time.monotonic())
            return
        first_ts, first_wall = self.origin
        due = first_wall + (ts_ns - first_ts) / 1e9 / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            self.stopping.wait(delay)

    def anchor(self, ts_ns: int, *, wall_ns: int) -> None:
        """Make the record of ``ts_ns`` due at the wall-clock time ``wall_ns`` (epoch ns)."""
        self.origin = (ts_ns, time.monotonic() + (wall_ns - time.time_ns()) / 1e9)

    def reset(self) -> None:
        self.origin = None


def _unit_ns(metadata: Any) -> int:
    """The time step a looped file is shifted by, so shifted bars stay on their bucket edges."""
    schema = str(metadata.schema or "")
    return {"ohlcv-1h": 3600, "ohlcv-1d": 86400}.get(schema, 60) * 1_000_000_000


def _record_ts(record: object) -> int | None:
    ts = getattr(record, "ts_event", None)
    return ts if isinstance(ts, int) else None


class ReplaySource:
    """DBN files as a source: each file's FeedStart, then its records (paced, or as fast as they read).

    ``on_file`` hears how each file went as its read ends (each pass, when looping): a
    failed file's records before the damage are stored all the same.
    """

    name = "replay"

    def __init__(
        self,
        paths: list[Any],
        *,
        speed: float | None,
        loop: bool,
        max_loops: int | None = None,
        on_file: Callable[[FileRead], None] | None = None,
    ) -> None:
        self.paths, self.speed, self.loop, self.max_loops, self.on_file = paths, speed, loop, max_loops, on_file

    def records(self, stopping: threading.Event) -> Generator[object, None, None]:
        """Every file's records, pass after pass when looping, until the end or ``stopping``."""
        pacer = Pacer(self.speed, stopping) if self.speed else None
        passes = 0
        while not stopping.is_set():
            passes += 1
            pass_records = 0
            shifted = not self.loop  # a pass that is not looped keeps the files' own times
            for path in self.paths:
                dataset: str | None = None
                file_stats = Stats()
                unit = 60_000_000_000
                delivered = 0
                # Paced, record by record; at full speed, a file of one layout as its bytes (RawRecords).
                for item in file_records(path, file_stats, raw=pacer is None):
                    if stopping.is_set():
                        break
                    if isinstance(item, FileStart):
                        meta = item.metadata
                        dataset = str(meta.dataset)
                        yield FeedStart(dataset, str(meta.schema or "mixed"), meta.mappings)
                        unit = _unit_ns(meta)
                        continue
                    delivered += len(item)
                    if dataset is None:
                        continue
                    if not shifted:
                        # A looped pass acts live: shifted by whole units (bars keep their bucket
                        # edges) to start at the next edge, and paced on the wall clock from there.
                        first_ts = (
                            item.first_ts()
                            if isinstance(item, RawRecords)
                            else next((ts for ts in map(_record_ts, item) if ts is not None), None)
                        )
                        shift_ns = 0
                        if first_ts is not None:
                            shifted = True
                            shift_ns = -((first_ts - time.time_ns()) // unit) * unit
                            if pacer is not None:
                                pacer.anchor(first_ts, wall_ns=first_ts + shift_ns)
                        yield Shift(shift_ns)
                    if isinstance(item, RawRecords) or pacer is None:
                        yield item
                        continue
                    for record in item:
                        if stopping.is_set():
                            break
                        ts = _record_ts(record)
                        if ts is not None:
                            pacer.wait(ts)
                        yield record
                yield SourceErrors(file_stats, dataset)
                if self.on_file is not None:
                    # Every error file_records counts is the file's own: it was not read whole.
                    self.on_file(FileRead(path, delivered, file_stats.last_error, stopping.is_set()))
                pass_records += delivered
            # A pass that read no record (every file missing or unreadable) would spin, not loop.
            if not self.loop or not pass_records or (self.max_loops is not None and passes >= self.max_loops):
                return
            if pacer is not None:
                pacer.reset()


def run_replay(
    *,
    paths: list[Any],
    speed: float | None,
    loop: bool,
    symbols: list[str] | None,
    publish: bool = True,
    progress: Callable[[Stats, float], None] | None = None,
    install_signals: bool = False,
    max_loops: int | None = None,
    on_file: Callable[[FileRead], None] | None = None,
) -> dict[str, Stats]:
    """Replay DBN files into the store (and out to clients); one pipeline per dataset (see ReplaySource)."""
    source = ReplaySource(paths, speed=speed, loop=loop, max_loops=max_loops, on_file=on_file)
    return run(source, symbols=symbols, publish=publish, progress=progress, install_signals=install_signals)
