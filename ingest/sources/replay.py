"""Replay DBN files (v1-v3, plain or zstd) as a source, as fast as possible or paced."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import databento_dbn as dbn
import zstandard

from ..records import Stats

CHUNK = 1 << 16  # compressed input expands ~20x: keep the decoded batch small
ERR_TRUNCATED = "{path}: file ends inside a record ({count} bytes after the last whole record)"
ERR_CORRUPT = "{path}: not decodable as DBN: {error}"
ERR_MISSING = "{path}: no such file"
ERR_ZSTD_CUT = "{path}: the zstd stream ends early (the file was cut): the records after it are missing"


@dataclass(frozen=True, slots=True)
class FileStart:
    """Emitted before a file's records: its metadata (dataset, schema, symbology)."""

    path: Path
    metadata: dbn.Metadata


def _is_zstd(path: Path) -> bool:
    return path.suffix == ".zst"


def dbn_decoder(path: Path) -> dbn.DBNDecoder:
    """A streaming decoder that upgrades DBN v1/v2 records to v3."""
    return dbn.DBNDecoder(
        upgrade_policy=dbn.VersionUpgradePolicy.UPGRADE_TO_V3,
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


def _decode_error(exc: BaseException) -> bool:
    """A decoder failure caused by the bytes: DBNError, zstd's RuntimeError, or a Rust panic (pyo3's
    PanicException, a BaseException) on a record shorter than its type."""
    return isinstance(exc, dbn.DBNError | RuntimeError) or type(exc).__name__ == "PanicException"


def file_records(path: Path, stats: Stats) -> Iterator[FileStart | list[object]]:
    """Yield FileStart, then the whole records of ``path`` in lists; a cut or corrupt tail is counted."""
    if not path.is_file():
        stats.error("missing_file", ERR_MISSING.format(path=path))
        return
    decoder = dbn_decoder(path)
    started = False
    delivered = 0  # data records yielded
    offset = 0  # bytes of the file decoded
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            try:
                records = decoder.write_and_decode(chunk)
            except BaseException as exc:
                if not _decode_error(exc):
                    raise
                yield from _salvage(path, offset, chunk, delivered, started)
                stats.error("corrupt_file", ERR_CORRUPT.format(path=path, error=exc))
                return
            offset += len(chunk)
            if records and isinstance(records[0], dbn.Metadata):
                started = True
                yield FileStart(path, records[0])
                records = records[1:]
            if records:
                delivered += len(records)
                yield list[object](records)
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
            if not _decode_error(exc):
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
