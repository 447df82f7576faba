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


def forward_backward(bridge, tokens, metric_rows) -> None:
    """One plain forward + backward of the mean metric, gradients from the first block's input on (weights
    frozen, as the attribution methods take them): the unit RelP's cost is compared with."""
    import torch

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    with torch.enable_grad(), bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", leaf)]):
        metric_rows(bridge(tokens)[:, -1]).mean().backward()
