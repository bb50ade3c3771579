"""Symbol versions, bumped after each commit, and their change log; entries stamped with the version they hold at."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import redis
import structlog

from ops import metrics

from ..columns import micros
from .redis_client import client

log = structlog.get_logger("marketdata.cache")  # the cache's log lines keep the logger they always had

VERSION_KEY = "md:ver:{symbol_id}"
ENTRY_KEY = "md:cache:{symbol_id}:{what}"
ENTRY_TTL_S = 300


# Per symbol, what each recent version bump changed: "<base>|<version>:<tf>=<micros>,...;...",
# the earliest bar open time each bump changed per stored timeframe ("*=0": unknown,
# everything). A cached page whose bars all lie before a bump's changes outlives the bump
# (an older page of a chart survives the new bar at the end; the latest page does not).
# The log covers every bump after <base>; past CHANGES_KEEP records the two oldest merge
# into one at the older version, with the earlier time per timeframe (stricter, never
# looser). Written by the same script that bumps the version, so a reader's MGET sees both
# or neither.
CHANGES_KEY = "md:chg:{symbol_id}"
CHANGES_KEEP = 16
CHANGES_TTL_S = 3600
ANY_CHANGE = "*"
_BUMP_CHUNK = 500
_BUMP_LUA = """
local keep, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])

-- One record "<version>:<tf>=<t>,..." as its version, spans and the order of its timeframes.
local function parse(record)
  local rv, body = string.match(record, '^(%d+):(.*)$')
  if rv == nil then return nil end
  local spans, order = {}, {}
  for tf, t in string.gmatch(body, '([^,=]+)=([^,]+)') do
    if spans[tf] == nil then table.insert(order, tf) end
    spans[tf] = t
  end
  return rv, spans, order
end

-- Records a and b as one, at a's version, with the earlier time per timeframe (nil: not records).
local function merge(a, b)
  local rv, spans, order = parse(a)
  local bv, bspans, border = parse(b)
  if rv == nil or bv == nil then return nil end
  for _, tf in ipairs(border) do
    local t = bspans[tf]
    if spans[tf] == nil then spans[tf] = t; table.insert(order, tf)
    elseif tonumber(t) < tonumber(spans[tf]) then spans[tf] = t end
  end
  local items = {}
  for _, tf in ipairs(order) do items[#items + 1] = tf .. '=' .. spans[tf] end
  return rv .. ':' .. table.concat(items, ',')
end

for i = 3, #ARGV do
  local vkey, lkey = KEYS[2 * (i - 2) - 1], KEYS[2 * (i - 2)]
  local v = redis.call('INCR', vkey)
  local raw = redis.call('GET', lkey)
  local base, rest = nil, ''
  if raw then
    local bar = string.find(raw, '|', 1, true)
    local digits = bar and string.sub(raw, 1, bar - 1)
    if digits and string.find(digits, '^%d+$') then base, rest = tonumber(digits), string.sub(raw, bar + 1) end
  end
  -- The log goes on only if its newest record is the bump before this one (with no record,
  -- if its base is). Records are only ever appended, at consecutive versions, and their
  -- oldest two merged at the older version: after the first record they run from the
  -- second's version to v - 1, which counts them. Plain searches and anchored matches
  -- only: a loop or a pattern over the whole text costs Redis 5 to 40 us a symbol.
  local count, follows = 0, false
  local prev = string.format('%d', v - 1) .. ':'
  if rest == '' then
    follows = base == v - 1
  else
    local first = string.find(rest, ';', 1, true)
    if first == nil then
      count, follows = 1, string.sub(rest, 1, #prev) == prev
    else
      local at = string.find(rest, ';' .. prev, first, true)
      local second = tonumber(string.match(rest, '^(%d+):', first + 1))
      if at ~= nil and second ~= nil and second <= v - 1 and string.find(rest, ';', at + 1, true) == nil then
        count, follows = v - second + 1, true
      end
    end
  end
  -- No log, or bumps made around it (a plain INCR): the log starts at the version before this one.
  if not follows then base, rest, count = v - 1, '', 0 end
  local record = string.format('%d', v) .. ':' .. ARGV[i]
  if rest == '' then rest = record else rest = rest .. ';' .. record end
  count = count + 1
  while count > keep do
    local first = string.find(rest, ';', 1, true)
    local second = string.find(rest, ';', first + 1, true)
    local a = string.sub(rest, 1, first - 1)
    local b = second and string.sub(rest, first + 1, second - 1) or string.sub(rest, first + 1)
    -- The usual pair, one timeframe each and the same one, merged without tables.
    local merged
    local av, atf, at = string.match(a, '^(%d+):([^,=]+)=(%d+)$')
    local _, btf, bt = string.match(b, '^(%d+):([^,=]+)=(%d+)$')
    if av ~= nil and btf == atf then
      if tonumber(bt) < tonumber(at) then at = bt end
      merged = av .. ':' .. atf .. '=' .. at
    else
      merged = merge(a, b)
    end
    if merged == nil then  -- not a log this script wrote: start it again (stricter, never looser)
      base, rest, count = v - 1, record, 1
    else
      rest = merged .. (second and string.sub(rest, second) or '')
      count = count - 1
    end
  end
  redis.call('SET', lkey, string.format('%d', base) .. '|' .. rest, 'EX', ttl)
end
return 0
"""
_bump_script: Any = None


def versions_bump(*, symbol_ids: Iterable[int], changed: Mapping[int, Mapping[str, datetime]] | None = None) -> None:
    """Invalidate cached reads of these symbols; call after the commit that changed them.

    ``changed`` gives, per symbol, the earliest bar open time the commit changed in each
    stored timeframe: cached pages wholly before those times stay valid. A symbol without
    it invalidates all of its cached reads.
    """
    global _bump_script
    spans = changed or {}
    ids = sorted(set(symbol_ids) | set(spans))
    if not ids:
        return
    try:
        r = client()
        if _bump_script is None:
            _bump_script = r.register_script(_BUMP_LUA)
        for at in range(0, len(ids), _BUMP_CHUNK):
            chunk = ids[at : at + _BUMP_CHUNK]
            keys = [key for symbol_id in chunk for key in (version_key(symbol_id), changes_key(symbol_id))]
            args: list[Any] = [CHANGES_KEEP, CHANGES_TTL_S]
            for symbol_id in chunk:
                tfs = spans.get(symbol_id)
                args.append(
                    ",".join(f"{tf}={micros(ts)}" for tf, ts in sorted(tfs.items())) if tfs else f"{ANY_CHANGE}=0"
                )
            _bump_script(keys=keys, args=args, client=r)
    except redis.RedisError as exc:
        # Entries expire; until Redis is back readers cannot read entries either.
        metrics.CACHE_ERRORS.labels("bump").inc()
        log.warning("cache version bump failed", error=str(exc))


def version_key(symbol_id: int) -> str:
    return VERSION_KEY.format(symbol_id=symbol_id)


def changes_key(symbol_id: int) -> str:
    return CHANGES_KEY.format(symbol_id=symbol_id)


def entry_key(symbol_id: int, what: str) -> str:
    return ENTRY_KEY.format(symbol_id=symbol_id, what=what)


class Changes(NamedTuple):
    """A symbol's change log: every bump after ``base``, as (version, {timeframe: earliest micros})."""

    base: int
    records: list[tuple[int, dict[str, int]]]


def changes_parse(raw: bytes | None) -> Changes | None:
    """The log as the bump script wrote it; None when there is none (or it is not one)."""
    if not raw:
        return None
    try:
        head, _, rest = raw.decode().partition("|")
        records = []
        for record in rest.split(";") if rest else ():
            version, _, body = record.partition(":")
            spans = {tf: int(t) for tf, _, t in (item.partition("=") for item in body.split(","))}
            records.append((int(version), spans))
        return Changes(int(head), records)
    except ValueError:
        return None


def entry_value(*, version: int, body: bytes, base: str | None = None, hi: int | None = None) -> bytes:
    """An entry: the version it was computed at, then what may outlive a bump, then the body.

    ``base`` is the stored timeframe the answer was built from and ``hi`` (microseconds)
    the open time before which every bar it depends on lies; either None: no bump spares it.
    """
    return b"%d|%s|%s|" % (version, (base or "-").encode(), b"-" if hi is None else b"%d" % hi) + body


def entry_body(
    version: int, value: bytes | None, *, changes: bytes | None = None, candidates: Sequence[str] = ()
) -> bytes | None:
    """The body of a fetched entry if it holds at ``version``, else None (a miss).

    It holds when it was computed at ``version``, or at an older one and no bump since
    changed anything it depends on: bars of its base timeframe at or after ``hi`` only,
    and no bars of a timeframe that ``candidates`` (marketdata.timeframes.source_candidates
    of the answer's timeframe) prefers to its base.
    """
    if value is None:
        return None
    parts = value.split(b"|", 3)
    if len(parts) != 4:
        return None
    head, base, hi, body = parts
    try:
        stamped = int(head)
        upto = None if hi == b"-" else int(hi)
    except ValueError:
        return None
    if stamped == version:
        return body
    if stamped > version or not _spared(stamped, base.decode(), upto, version, changes_parse(changes), candidates):
        return None
    return body


def _spared(
    stamped: int, base: str, hi: int | None, version: int, log: Changes | None, candidates: Sequence[str]
) -> bool:
    # The log must account for every bump since the entry's version, up to the current one.
    if log is None or stamped < log.base or not log.records or log.records[-1][0] != version:
        return False
    rank = {tf: n for n, tf in enumerate(candidates)}
    base_rank = rank.get(base)
    for bumped, spans in log.records:
        if bumped <= stamped:
            continue
        for tf, since in spans.items():
            if tf == ANY_CHANGE:
                return False
            tf_rank = rank.get(tf)
            if tf_rank is None or (base_rank is not None and tf_rank > base_rank):
                continue  # not a source of this answer, nor one preferred to its source
            if tf_rank != base_rank or hi is None or since < hi:
                return False
    return True


def cached_set(*, key: str | None, version: int, value: bytes, base: str | None = None, hi: int | None = None) -> None:
    """Store a computed body under ``key`` at the version read before computing it (no-op without a key)."""
    if key is None:
        return
    try:
        client().set(key, entry_value(version=version, body=value, base=base, hi=hi), ex=ENTRY_TTL_S)
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("set").inc()
