"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Run fn once to warm up (its result is returned), then `repeats` timed runs: (median, all times, result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result
