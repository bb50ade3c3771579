"""What a source yields to the pipeline's driver (``ingest.pipeline.run``), besides decoded records.

Every source (replay, historical, live) is an object with a ``name`` and
``records(stopping)``: a generator of these items and of decoded DBN records (one by one,
in lists, or as ``RawRecords``). It ends itself once ``stopping`` is set, after handing
over what it already holds, and it imports nothing of the pipeline: the driver depends on
the sources' items, never the other way round.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .stats import Stats


@dataclass(frozen=True, slots=True)
class FeedStart:
    """The records that follow belong to (dataset, schema), with this symbology; taken under the feed's lock."""

    dataset: str
    schema: str
    mappings: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Mappings:
    """A source's symbology update: Databento metadata mappings {raw_symbol: [intervals]}."""

    mappings: dict[str, list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Shift:
    """Shift the time of the records that follow by ``ns`` (a looped replay's pass)."""

    ns: int


@dataclass(frozen=True, slots=True)
class SourceErrors:
    """The source's own errors (a file it could not read whole), for ``dataset``'s stats (None: no feed)."""

    stats: Stats
    dataset: str | None


class Source(Protocol):
    """What the pipeline's driver iterates."""

    name: str  # "replay", "historical", "live": the feed status's source

    def records(self, stopping: threading.Event) -> Generator[object, None, None]: ...
