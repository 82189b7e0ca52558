"""Wall-clock timing helpers shared by the ``hpcfl bench`` actions.

A *sample* is one timed batch of ``number`` calls divided by ``number``; the
batch size is chosen from the warm-up so that a sample lasts at least
``min_sample_s`` (tiny tensors would otherwise be timed at the resolution of
the clock). Statistics are over ``repeat`` samples.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Stats", "pick_number", "time_calls"]


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the samples, and how they were taken."""

    min: float
    median: float
    max: float
    repeat: int
    number: int

    @classmethod
    def of(cls, samples: list[float], number: int) -> "Stats":
        return cls(min(samples), statistics.median(samples), max(samples), len(samples), number)

    @classmethod
    def nan(cls) -> "Stats":
        n = float("nan")
        return cls(n, n, n, 0, 0)


def pick_number(t_call: float, min_sample_s: float = 2e-3, cap: int = 1000) -> int:
    """Calls per sample so that one sample takes at least ``min_sample_s``."""
    if t_call <= 0:
        return cap
    return max(1, min(cap, int(min_sample_s / t_call) + 1))


def time_calls(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1,
               min_sample_s: float = 2e-3) -> Stats:
    """Time ``fn()`` (no arguments, result discarded): warm-up, then ``repeat`` samples."""
    t_first = float("inf")
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        t_first = min(t_first, time.perf_counter() - t0)
    number = pick_number(t_first, min_sample_s)
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return Stats.of(samples, number)
