"""Measuring time and peak memory side by side, for the benchmark scripts (never for tests).

Peak memory on CPU: the kernel's high-water mark of resident memory (VmHWM) can be reset through
/proc/self/clear_refs, so `peak_rss_increase` reports how far above the memory already in use a
call went. Run each variant in a fresh process (see `eval/speed.py`) so one does not inherit the
other's freed-but-kept heap.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_increase(fn: Callable[[], object]) -> tuple[float, object]:
    """(MiB by which the resident-memory peak during `fn()` exceeded the memory in use before, result)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = fn()
    return (_status_kib("VmHWM") - before) / 1024, result


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
