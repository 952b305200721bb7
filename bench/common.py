"""Shared helpers of the benchmarks: timing statistics, tables, peak memory."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import psutil


@dataclass
class Timing:
    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """(10th, 90th) percentile: robust to the odd stall of a shared machine."""
        ordered = sorted(self.samples)
        lo = ordered[int(0.1 * (len(ordered) - 1))]
        hi = ordered[int(round(0.9 * (len(ordered) - 1)))]
        return lo, hi


def interleave(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, Timing]:
    """Calls each run once per round, in alternating order, collecting the seconds each returns.

    Interleaving makes both sides see the same machine load, so their ratio is
    meaningful even when absolute times drift.
    """
    results = {name: Timing(name, []) for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].samples.append(runs[name]())
    return results


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**30
