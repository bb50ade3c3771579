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

A module per part: ``redis_client`` (the process's client and its one round trip),
``versions`` (version bumps, their change log, entries and when they hold), ``prefetch``
(background fills of the entry a reader will likely ask for next, after a miss, bounded
and never waited for), ``local`` (the process-local caches of the API's hot path, token
and symbol look-ups for a few seconds each, and the epoch that empties them in every
process at once) and ``leaderboards`` (the leaderboard's rows per symbol, kept by the
ingester after its commits).
"""
