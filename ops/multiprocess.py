"""prometheus_client's multiprocess mode: the files several processes share in PROMETHEUS_MULTIPROC_DIR.

When the variable is set, every process writes its metrics to ``<kind>_<pid>.db`` files
there and ``ops.metrics.render`` merges them, so any one gateway process answers
``/metrics`` for all of them. The directory must be private to one machine's (one
container's) processes: liveness is judged by pid.

This module imports neither Django nor ``ops.metrics``: ``prepare`` has to run before the
first metric is created (creating one opens its file).
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
_FILE_RE = re.compile(r"^(?:counter|histogram|summary|gauge_(?P<mode>[a-z]+))_(?P<pid>\d+)\.db$")


def directory() -> Path | None:
    """The shared directory, or None when metrics stay in this process."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _files(path: Path) -> list[tuple[Path, str | None, int]]:
    """(file, gauge mode or None, pid) of every metrics file in ``path``."""
    out = []
    for file in path.iterdir():
        match = _FILE_RE.match(file.name)
        if match:
            out.append((file, match["mode"], int(match["pid"])))
    return out


def dead_gauges_remove(path: Path) -> None:
    """Forget the live gauges (``live*`` modes: connections, queue depth) of processes that died.

    What ``prometheus_client.multiprocess.mark_process_dead`` does for one pid, done for
    every dead one: a gateway killed with -9 never calls it, and its connections would
    otherwise be counted forever. Counters and histograms of dead processes stay, so
    sums never go backwards while the others run.
    """
    for file, mode, pid in _files(path):
        if mode is not None and mode.startswith("live") and not _alive(pid):
            file.unlink(missing_ok=True)


def prepare() -> None:
    """At a server's start, before any metric exists: make the directory fit for this process.

    - No other live process uses it: wipe it (a restart; counters start again from zero,
      which Prometheus reads as a reset).
    - Siblings run (several gateway processes started one after the other, or one of them
      restarted): keep their files; drop the live gauges of dead processes and any gauge
      file left under this process's pid by an earlier process (its values are not ours).

    Registers the removal of this process's live gauges at a clean exit.
    """
    path = directory()
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    own = os.getpid()
    files = _files(path)
    siblings = any(pid != own and _alive(pid) for _, _, pid in files)
    for file, mode, pid in files:
        if not siblings or (pid == own and mode is not None):
            file.unlink(missing_ok=True)
    dead_gauges_remove(path)
    atexit.register(_exit_cleanup, path, own)


def _exit_cleanup(path: Path, pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))
