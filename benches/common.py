"""Shared helpers for benchmarks: machine description, timing, and the built-in corpora."""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def today() -> str:
    return datetime.date.today().isoformat()


def best_of(
    fn: Callable[[], object], repeat: int = 3, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, object]:
    """Minimum time over `repeat` runs (the least noisy estimate on a shared machine) and the result.
    `clock`: wall time by default; `time.process_time` for one-thread work on a box with more runnable
    jobs than cores, where wall time also counts the time the process waited for a core."""
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None  # free the previous result outside the timed region
        t = clock()
        result = fn()
        best = min(best, clock() - t)
    return best, result
