"""Measurement helpers shared by the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["peak_cpu_memory"]


def peak_cpu_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak bytes of CPU memory that PyTorch allocated while ``fn(*args, **kwargs)`` ran, relative to the
    start: the running sum of the torch profiler's allocation / free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args, **kwargs)
    timeline = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, change in timeline:
        current += change
        peak = max(peak, current)
    return peak
