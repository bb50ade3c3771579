"""Fuzz the DBN reader (ingest.sources.replay.file_records) with random, truncated and corrupted files.

Both ways a file is read: by the decoder, and raw (a file of one layout as its bytes, as
the replay at full speed reads). Whatever the bytes, reading a file never raises: a cut or corrupt file is counted as an
error by cause, and every whole record before the damage is still delivered, unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ingest.records import RAW_SIZES, RawRecords
from ingest.sources.replay import FileStart, file_records
from ingest.stats import Stats
from tests.conftest import SAMPLES

# Real files: bars and trades in DBN v1-v3, definitions (large records), and a live session.
SAMPLE_FILES = sorted(p for p in SAMPLES.glob("*/*.dbn*") if "ohlcv-1m" in p.name or "trades" in p.name
                      or "definition" in p.name)  # fmt: skip
FUZZ = hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plain(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".zst":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def read(data: bytes, suffix: str = ".dbn", *, raw: bool = False) -> tuple[list[bytes], Stats, bool]:
    """Records (as bytes) file_records delivers for ``data``, its stats, and whether metadata came.

    With ``raw``, as the replay at full speed reads: files of one layout as their bytes (RawRecords).
    """
    stats = Stats()
    records: list[bytes] = []
    started = False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(data)
        for item in file_records(path, stats, raw=raw):
            if isinstance(item, FileStart):
                started = True
            elif isinstance(item, RawRecords):
                size = RAW_SIZES[item.kind]
                records.extend(item.data[at : at + size] for at in range(0, len(item.data), size))
            else:
                records.extend(bytes(r) for r in item)  # type: ignore[call-overload]
    return records, stats, started


def boundaries(data: bytes) -> list[int]:
    """Offsets where the metadata ends and where each record ends (a record's first byte is its length / 4)."""
    pos = 8 + int.from_bytes(data[4:8], "little")
    out = [pos]
    while pos < len(data):
        pos += data[pos] * 4
        out.append(pos)
    return out


@pytest.fixture(scope="module")
def originals() -> dict[Path, tuple[bytes, list[bytes]]]:
    if not SAMPLE_FILES:
        pytest.fail(f"Databento samples not found at {SAMPLES}")
    out = {}
    for path in SAMPLE_FILES:
        data = plain(path)
        records, stats, _ = read(data)
        assert not stats.errors, (path, stats.errors)
        assert read(data, raw=True)[0] == records  # the raw reader delivers the same records
        out[path] = (data, records)
    return out


@pytest.mark.parametrize("raw_mode", [False, True], ids=["decoder", "raw"])
@FUZZ
@given(st.binary(min_size=1, max_size=2000))
def test_random_bytes_are_an_error_never_a_crash(raw_mode, data):
    records, stats, _ = read(data, raw=raw_mode)
    assert stats.errors or not records or data.startswith(b"DBN")
    assert sum(stats.errors.values()) <= 1


@pytest.mark.parametrize("raw_mode", [False, True], ids=["decoder", "raw"])
@FUZZ
@given(st.binary(min_size=1, max_size=2000))
def test_random_zstd_input_is_an_error_never_a_crash(raw_mode, data):
    _, stats, _ = read(data, ".dbn.zst", raw=raw_mode)
    assert stats.errors


@pytest.mark.parametrize("raw_mode", [False, True], ids=["decoder", "raw"])
@FUZZ
@given(st.data())
def test_a_truncated_file_delivers_every_whole_record_before_the_cut_and_counts_the_cut(raw_mode, originals, data):
    path = data.draw(st.sampled_from(SAMPLE_FILES), label="file")
    raw, full = originals[path]
    cut = data.draw(st.integers(1, len(raw) - 1), label="cut")
    records, stats, _ = read(raw[:cut], raw=raw_mode)
    ends = boundaries(raw)
    whole = sum(1 for end in ends[1:] if end <= cut)
    assert records == full[:whole]  # nothing lost before the cut, nothing made up
    if cut not in ends:
        assert stats.errors["truncated_file"] + stats.errors["corrupt_file"] == 1


@pytest.mark.parametrize("raw_mode", [False, True], ids=["decoder", "raw"])
@FUZZ
@given(st.data())
def test_a_truncated_zstd_file_delivers_a_prefix_of_its_records(raw_mode, originals, data):
    path = data.draw(st.sampled_from(SAMPLE_FILES), label="file")
    raw, full = originals[path]
    packed = zstandard.ZstdCompressor().compress(raw)
    cut = data.draw(st.integers(1, len(packed) - 1), label="cut")
    records, stats, _ = read(packed[:cut], ".dbn.zst", raw=raw_mode)
    assert records == full[: len(records)]
    assert sum(stats.errors.values()) == 1  # a cut zstd stream is always reported, even between records


@pytest.mark.parametrize("raw_mode", [False, True], ids=["decoder", "raw"])
@FUZZ
@given(st.data())
def test_a_corrupted_file_delivers_every_record_before_the_damage(raw_mode, originals, data):
    path = data.draw(st.sampled_from(SAMPLE_FILES), label="file")
    raw, full = originals[path]
    ends = boundaries(raw)
    at = data.draw(st.integers(ends[0], len(raw) - 1), label="at")
    junk = data.draw(st.binary(min_size=1, max_size=16), label="junk")
    damaged = raw[:at] + junk + raw[at + len(junk) :]
    records, stats, _ = read(damaged, raw=raw_mode)
    before = sum(1 for end in ends[1:] if end <= at)
    assert records[:before] == full[:before]
    assert sum(stats.errors.values()) <= 1
