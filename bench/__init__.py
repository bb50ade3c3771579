"""Benchmarks: each file runs as a script and prints its figures (SPEC section 8)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine() -> str:
    """One line on the machine a benchmark ran on: cores, CPU model, Python."""
    usable = len(os.sched_getaffinity(0))
    return f"{os.cpu_count()} cores ({usable} usable), {cpu_model()}, Python {platform.python_version()}"
