"""The Redis hot cache: versioned entries, so a read never returns data older than the database.

Every writer bumps a symbol's version after its commit. An entry holds the version it
was computed at in front of its body (``b"<version>|<base>|<hi>|<body>"``), and a reader
fetches the symbol's version, its change log and the entry in one round trip (MGET): an
entry of another version is a miss unless the log shows that no bump since touched what
it depends on (its bars all open before ``hi``). A reader reads the version before it
queries the database, so what it stores under that version is at least as new as every
commit that version covers; a slower reader overwriting a newer entry with an older one
only costs the next reader a miss. When Redis is unreachable, reads go to the database
and stay correct.

Also here: background prefetches (the entry a reader will likely ask for next, filled
after a miss, bounded and never waited for), the process-local caches of the API's hot
path (token and symbol look-ups, a few seconds each) and the epoch that empties them in
every process at once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Generic, NamedTuple, TypeVar

import redis
import structlog
from django.conf import settings
from django.db import close_old_connections
from prometheus_client import Counter

from ops import metrics

from .columns import micros

log = structlog.get_logger(__name__)

VERSION_KEY = "md:ver:{symbol_id}"
ENTRY_KEY = "md:cache:{symbol_id}:{what}"
ENTRY_TTL_S = 300
# Replaced (random text) after each commit that changes tokens, entitlements, users or
# symbols; every request reads it in its one round trip, so no process trusts its local
# caches past such a change.
EPOCH_KEY = "md:epoch"
_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()
# Rate-limit counts of a request that the event loop's fast path (marketdata.api.hot) has
# already made, handed to the Django view it falls back to: an ASGI scope and WSGI environ
# key that config.asgi copies from one to the other (a client's headers cannot set it).
COUNTED_KEY = "marketdata.counted"


def client() -> redis.Redis:
    """A process-wide client for the configured Redis (short timeouts: the cache is optional).

    Made once under a lock: the gateway's first requests arrive together in many threads,
    and a client made twice is a client dropped, whose finaliser disconnects its pool,
    connections in use by other threads included (a pipeline holds the pool, not the
    client). redis-py then fails those requests with a ValueError from a closed buffer,
    not a RedisError: the one 500 bench/history.py ever showed.
    """
    url = settings.REDIS_URL
    found = _clients.get(url)
    if found is None:
        with _clients_lock:
            found = _clients.get(url)
            if found is None:
                found = _clients[url] = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
    return found


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


def round_trip(*, incr: Sequence[tuple[str, int]] = (), get: Sequence[str] = ()) -> tuple[list[int], list[Any]] | None:
    """One Redis round trip: INCR (with an expiry) each counter, then MGET the keys; None if Redis is down."""
    try:
        pipe = client().pipeline(transaction=False)
        for key, expire in incr:
            pipe.incr(key)
            pipe.expire(key, expire)
        if get:
            pipe.mget(list(get))
        out = pipe.execute()
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("get").inc()
        return None
    return out[0 : 2 * len(incr) : 2], (out[-1] if get else [])


def mget(keys: Sequence[str]) -> list[Any] | None:
    """MGET, or None if Redis is down."""
    result = round_trip(get=keys)
    return None if result is None else result[1]


def cached_set(*, key: str | None, version: int, value: bytes, base: str | None = None, hi: int | None = None) -> None:
    """Store a computed body under ``key`` at the version read before computing it (no-op without a key)."""
    if key is None:
        return
    try:
        client().set(key, entry_value(version=version, body=value, base=base, hi=hi), ex=ENTRY_TTL_S)
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("set").inc()


# PREFETCH
#
# After a miss, the entry the same reader will likely want next (a chart scrolls back: the
# page before the one it just loaded) is filled in the background by the function that
# fills misses, under the version read before its query, like any entry. At most
# PREFETCH_IN_FLIGHT run at once per process, in threads of their own; one more is dropped,
# not queued (a burst of misses would otherwise queue work nobody waits for behind it).
# A prefetch schedules none itself; the first request that reads a prefetched entry
# schedules the next (a chart scrolling back keeps finding its pages). They are not lookups: cache_requests_total and
# api_cache_answers_total do not count them; cache_prefetches_total does, by outcome.

PREFETCH_IN_FLIGHT = 4
PREFETCHES = Counter(
    "cache_prefetches_total",
    "Background fills of the hot-cache entry likely asked for next, by outcome: filled, cached (already held), "
    "busy (a fill of it in flight), dropped (too many in flight), unavailable (Redis down), failed.",
    ["outcome"],
    registry=metrics.REGISTRY,
)
_prefetch_lock = threading.Lock()
_prefetch_pool: ThreadPoolExecutor | None = None
# What is being filled now, by key: real misses (a count) and prefetches (their future).
_filling: dict[Hashable, int] = {}
_prefetching: dict[Hashable, Future[Any]] = {}
_in_prefetch = threading.local()
# Prefetched entries no request has read yet: the first that does schedules the next prefetch.
_unread: set[Hashable] = set()
UNREAD_MAX = 10_000


def prefetch_enabled() -> bool:
    """Prefetches are on: the hot cache and API_HOT_CACHE_PREFETCH (default on)."""
    return bool(getattr(settings, "API_HOT_CACHE", True)) and bool(getattr(settings, "API_HOT_CACHE_PREFETCH", True))


@contextmanager
def filling(key: Hashable) -> Iterator[None]:
    """Note a fill of ``key`` (a miss being computed) for its duration: no prefetch of it starts meanwhile."""
    with _prefetch_lock:
        _filling[key] = _filling.get(key, 0) + 1
    try:
        yield
    finally:
        with _prefetch_lock:
            left = _filling.pop(key) - 1
            if left:
                _filling[key] = left


def prefetch(key: Hashable, fill: Callable[[], str]) -> Future[Any] | None:
    """Run ``fill`` in the background unless ``key`` is being filled or PREFETCH_IN_FLIGHT prefetches are running.

    Never waits. ``fill`` returns its outcome (a PREFETCHES label) and may return the body
    it stored as ``(outcome, (version, body))``; its errors are logged and swallowed. None
    when nothing was started (off, from a prefetch, busy, dropped).
    """
    global _prefetch_pool
    if getattr(_in_prefetch, "active", False) or not prefetch_enabled():
        return None
    with _prefetch_lock:
        if key in _filling or key in _prefetching:
            outcome = "busy"
        elif len(_prefetching) >= PREFETCH_IN_FLIGHT:
            outcome = "dropped"
        else:
            if _prefetch_pool is None:
                _prefetch_pool = ThreadPoolExecutor(PREFETCH_IN_FLIGHT, thread_name_prefix="cache-prefetch")
            future = _prefetching[key] = _prefetch_pool.submit(_prefetch_run, key, fill)
            return future
    PREFETCHES.labels(outcome).inc()
    return None


def _prefetch_run(key: Hashable, fill: Callable[[], Any]) -> Any:
    _in_prefetch.active = True
    # As Django's request_started and request_finished do for the thread's database connection.
    close_old_connections()
    result: Any = None
    try:
        outcome = fill()
        if isinstance(outcome, tuple):
            outcome, result = outcome
        PREFETCHES.labels(outcome).inc()
    except Exception:
        PREFETCHES.labels("failed").inc()
        log.exception("cache prefetch failed", key=str(key))
    finally:
        close_old_connections()
        _in_prefetch.active = False
        with _prefetch_lock:
            del _prefetching[key]
    return result


def prefetched_note(key: Hashable) -> None:
    """Note an entry a prefetch filled, until a request reads it (``prefetched_take``)."""
    with _prefetch_lock:
        if len(_unread) >= UNREAD_MAX:
            _unread.clear()
        _unread.add(key)


def prefetched_take(key: Hashable) -> bool:
    """True (once) when ``key`` is a prefetched entry no request of this process has read yet."""
    if key not in _unread:
        return False
    with _prefetch_lock:
        try:
            _unread.remove(key)
        except KeyError:
            return False
    return True


def prefetch_pending(key: Hashable) -> Future[Any] | None:
    """The prefetch of ``key`` in flight, if any: its result is ``(version, body)`` once filled, else None."""
    return _prefetching.get(key)


def prefetches_wait(timeout: float = 10.0) -> bool:
    """Wait until no prefetch is in flight; False if some still are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while _prefetching:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


# PROCESS-LOCAL CACHES

LOCAL_TTL_S = 5.0
K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


def _now() -> float:
    return time.monotonic()


class LocalCache(Generic[K, V]):
    """A bounded dict whose entries live LOCAL_TTL_S seconds; emptied by local_caches_clear.

    ``generation()`` before a database read and ``put(..., generation=)`` after it: a
    value read before a clear is not stored after it.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._items: dict[K, tuple[float, V]] = {}
        self._generation = 0
        _LOCAL_CACHES.append(self)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] <= _now():
            return None
        return item[1]

    def generation(self) -> int:
        return self._generation

    def put(self, key: K, value: V, *, generation: int) -> None:
        ttl = float(getattr(settings, "API_LOCAL_CACHE_SECONDS", LOCAL_TTL_S))
        if ttl <= 0 or generation != self._generation:
            return
        if len(self._items) >= self.maxsize:
            self._items.clear()
        self._items[key] = (_now() + ttl, value)

    def clear(self) -> None:
        self._generation += 1
        self._items.clear()


_LOCAL_CACHES: list[LocalCache[Any, Any]] = []
_epoch_lock = threading.Lock()
_epoch_seen: object = _MISSING


def local_caches_clear() -> None:
    """Forget every process-local look-up (tokens, symbols)."""
    for local in _LOCAL_CACHES:
        local.clear()


def epoch_note(value: bytes | None) -> bool:
    """Note the epoch a request read; True (after emptying the local caches) when it changed since the last."""
    global _epoch_seen
    with _epoch_lock:
        if value == _epoch_seen:
            return False
        first = _epoch_seen is _MISSING
        _epoch_seen = value
    if not first:
        local_caches_clear()
    return not first


def epoch_bump() -> None:
    """Tell every process to drop its local caches; call after the commit that changed what they hold."""
    local_caches_clear()
    try:
        client().set(EPOCH_KEY, uuid.uuid4().hex)
    except redis.RedisError as exc:
        # The local caches of other processes then hold for at most LOCAL_TTL_S.
        metrics.CACHE_ERRORS.labels("epoch").inc()
        log.warning("cache epoch bump failed", error=str(exc))


# LEADERBOARDS
#
# Per timeframe, the leaderboard statement's row of every symbol, kept by whoever changed
# the symbol (the ingester, after its commit) and read by /v1/leaderboard:
#   md:lb:<tf>:v            hash  symbol id -> the symbol's version the row was computed at
#   md:lb:<tf>:e            hash  symbol id -> "<version>|<row as JSON>"
#   md:lb:<tf>:volume       zset  symbol id -> the latest bar's volume
#   md:lb:<tf>:change_pct   zset  symbol id -> change_pct (symbols with a previous close)
# A row is good while its version is the symbol's current one; a reader that finds a
# candidate's row missing or older computes those rows itself (the same statement) and
# stores them, so the sets fill themselves and a lost update costs one slower answer.

LB_KEY = "md:lb:{tf}:{part}"
LB_CHUNK = 100
LB_REFRESH_EVERY_S = 1.0
# The ingester refreshes a symbol's rows once it has been this quiet (LeaderboardRefresher).
LB_QUIET_S = 0.25


def _lb(tf: str, part: str) -> str:
    return LB_KEY.format(tf=tf, part=part)


def _lb_encode(entry: Any) -> bytes:
    import orjson

    from .timeframes import ORIGIN

    micros = (entry.bucket - ORIGIN) // timedelta(microseconds=1)
    change = None if entry.change_pct is None else str(entry.change_pct)
    return orjson.dumps([entry.base, micros, entry.open, entry.high, entry.low, entry.close, entry.volume,
                         entry.anomalies, entry.prev_close, change])  # fmt: skip


def _lb_decode(symbol_id: int, raw: bytes) -> Any:
    import orjson

    from .selectors.leaderboard import LeaderboardEntry
    from .timeframes import ORIGIN

    base, micros, o, h, low, c, v, a, prev, change = orjson.loads(raw)
    bucket = ORIGIN + timedelta(microseconds=micros)
    return LeaderboardEntry(
        symbol_id, base, bucket, o, h, low, c, v, a, prev, None if change is None else Decimal(change)
    )


def leaderboard_refresh(*, symbol_ids: Iterable[int], tfs: Sequence[str] | None = None) -> None:
    """Recompute these symbols' leaderboard rows from the database and store them (after the commit)."""
    from .selectors.leaderboard import leaderboard_entries
    from .timeframes import SERVED_TIMEFRAMES

    ids = sorted(set(symbol_ids))
    if not ids:
        return
    r = client()
    # The versions first: what the statement then reads is at least as new as they are.
    versions = [int(v or 0) for v in r.mget([version_key(i) for i in ids])]
    members = [str(i) for i in ids]
    for tf in tfs or SERVED_TIMEFRAMES:
        entries = {e.symbol_id: e for e in leaderboard_entries(symbol_ids=ids, tf=tf)}
        rows: dict[Any, bytes] = {}  # (Any: redis-py types mapping keys as an invariant union)
        volumes: dict[str, float] = {}
        changes: dict[str, float] = {}
        gone: list[str] = []  # no row in this timeframe
        unchanged: list[str] = []  # a row, but no previous close to change from
        for symbol_id, member, version in zip(ids, members, versions, strict=True):
            entry = entries.get(symbol_id)
            if entry is None:
                gone.append(member)
                continue
            rows[member] = b"%d|" % version + _lb_encode(entry)
            volumes[member] = entry.volume
            if entry.change_pct is None:
                unchanged.append(member)
            else:
                changes[member] = float(entry.change_pct)
        # One command per key, not per symbol (1,600 commands for 50 symbols took a quarter of a
        # refresh), in one transaction: a reader sees a symbol's row, stamp and scores change together.
        pipe = r.pipeline(transaction=True)
        pipe.hset(_lb(tf, "v"), mapping=dict(zip(members, versions, strict=True)))
        if rows:
            pipe.hset(_lb(tf, "e"), mapping=rows)
            pipe.zadd(_lb(tf, "volume"), volumes)
        if changes:
            pipe.zadd(_lb(tf, "change_pct"), changes)
        if gone:
            pipe.hdel(_lb(tf, "e"), *gone)
            pipe.zrem(_lb(tf, "volume"), *gone)
        if gone or unchanged:
            pipe.zrem(_lb(tf, "change_pct"), *gone, *unchanged)
        pipe.execute()


class LeaderboardStale(Exception):
    """Rows changed between the round trips of one read."""


def leaderboard_read(*, metric: str, tf: str, limit: int, candidates: Sequence[int]) -> list[Any] | None:
    """The top ``limit`` rows among ``candidates`` by ``metric`` (descending), or None when Redis cannot say.

    Rows come back as selectors.leaderboard.LeaderboardEntry, over-fetched past ties and past symbols
    that are not candidates, for the caller to order exactly (Decimal, then ticker).
    Candidates whose rows are missing or older than their version are recomputed first.
    """
    if not candidates:
        return []
    ids = [str(i) for i in candidates]
    r = client()
    for attempt in range(2):
        pipe = r.pipeline(transaction=True)
        pipe.hmget(_lb(tf, "v"), ids)
        pipe.mget([version_key(int(i)) for i in ids])
        pipe.zrevrange(_lb(tf, metric), 0, max(LB_CHUNK, 2 * limit) - 1, withscores=True)
        stamps, versions, top = pipe.execute()
        current = [int(v or 0) for v in versions]
        stale = [int(i) for i, s, v in zip(ids, stamps, current, strict=True) if s is None or int(s) != v]
        if stale:
            if attempt:
                return None
            leaderboard_refresh(symbol_ids=stale, tfs=[tf])
            continue
        wanted = set(ids)
        chosen: list[tuple[str, float]] = []
        start, chunk = 0, max(LB_CHUNK, 2 * limit)
        while True:
            chosen += [(m.decode(), score) for m, score in top if m.decode() in wanted]
            exhausted = len(top) < chunk
            # Every candidate scoring at least the limit-th one may rank above it once ties are broken.
            if exhausted or (len(chosen) >= limit and top[-1][1] < chosen[limit - 1][1]):
                break
            start += chunk
            top = r.zrevrange(_lb(tf, metric), start, start + chunk - 1, withscores=True)
        if len(chosen) >= limit:
            threshold = chosen[limit - 1][1]
            chosen = [(m, score) for m, score in chosen if score >= threshold]
        pipe = r.pipeline(transaction=True)
        pipe.hmget(_lb(tf, "v"), ids)
        pipe.hmget(_lb(tf, "e"), [m for m, _ in chosen] or ["-"])
        stamps_after, raws = pipe.execute()
        if stamps_after != stamps:
            continue  # rows changed meanwhile: read again
        by_id = dict(zip(ids, current, strict=True))
        out = []
        for (member, _), raw in zip(chosen, raws, strict=False):
            head, _, body = (raw or b"").partition(b"|")
            if raw is None or int(head) != by_id[member]:
                return None
            out.append(_lb_decode(int(member), body))
        return out
    return None


class LeaderboardRefresher:
    """An ingester's side of the leaderboards: rows of the symbols it changed.

    Readers never depend on it for correctness: they recompute the rows older than their
    symbol's version. In the caller's thread it refreshes what changed at most every
    ``every_s``. With ``background=True`` (the ingester) a thread of its own refreshes,
    at most every ``every_s``, the changed symbols that have been quiet for ``quiet_s``:
    a row refreshed while its symbol changes batch after batch is stale at the next
    version bump, so that work bought no reader a hit (a refresh is a statement per
    served timeframe, 200 ms for 50 symbols on the benchmark machine; once a second it
    took a fifth of PostgreSQL's time in a replay), while a symbol that changes once a
    second is quiet most of the time and keeps its rows fresh. The writer never waits
    for it; ``close`` refreshes whatever is pending and stops it.
    """

    def __init__(
        self,
        every_s: float = LB_REFRESH_EVERY_S,
        *,
        background: bool = False,
        quiet_s: float = LB_QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s = every_s
        self.quiet_s = quiet_s
        self.dirty: set[int] = set()
        self.last = 0.0
        self._clock = clock
        self._changed_at: dict[int, float] = {}  # background: symbol id -> when it last changed
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="leaderboard-refresh", daemon=True)
            self._thread.start()

    def changed(self, symbol_ids: Iterable[int]) -> None:
        """Note symbols whose data was committed (after their version bump); refresh when due."""
        if self._thread is not None:
            now = self._clock()
            with self._cond:
                idle = not self._changed_at
                self._changed_at.update(dict.fromkeys(symbol_ids, now))
                if idle and self._changed_at:
                    self._cond.notify()  # the thread waits without a timeout while nothing is pending
            return
        self.dirty.update(symbol_ids)
        if self.dirty and time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Refresh every symbol noted in the caller's thread now (failures are logged: readers recompute)."""
        with self._cond:
            ids, self.dirty, self.last = self.dirty, set(), time.monotonic()
        self._refresh(ids)

    def close(self) -> None:
        """Refresh what is pending, then stop the thread (in the background) or return (in the caller's)."""
        if self._thread is None:
            self.flush()
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        from django.db import connections

        try:
            while True:
                with self._cond:
                    if not self._closed:  # looks once per every_s while anything is pending
                        self._cond.wait(self.every_s if self._changed_at else None)
                    closed = self._closed
                    now = self._clock()
                    due = {i for i, at in self._changed_at.items() if closed or now - at >= self.quiet_s}
                    for symbol_id in due:
                        del self._changed_at[symbol_id]
                self._refresh(due)
                if closed:
                    return
        except Exception:
            log.exception("leaderboard refresher stopped")
        finally:
            connections.close_all()

    @staticmethod
    def _refresh(ids: set[int]) -> None:
        from django.db import DatabaseError

        if not ids:
            return
        try:
            leaderboard_refresh(symbol_ids=ids)
        except (redis.RedisError, DatabaseError) as exc:
            metrics.CACHE_ERRORS.labels("leaderboard").inc()
            log.warning("leaderboard refresh failed", error=str(exc), symbols=len(ids))
