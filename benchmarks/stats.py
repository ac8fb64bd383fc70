"""Summary statistics: percentiles of one run's samples, and the median with min–max of a
metric over repeated runs (how every number in the results is reported)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import msgspec

PERCENTILES = (50, 90, 99)


class Distribution(msgspec.Struct, omit_defaults=True):
    """Percentiles of one quantity within one run, in milliseconds."""

    count: int = 0
    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


class Spread(msgspec.Struct):
    """One metric over repeated runs: the median and the range. `n` is how many runs had a
    value; with none, every figure is 0 (results are JSON, which has no NaN)."""

    median: float
    min: float
    max: float
    n: int


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, linearly interpolated."""
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values_s: Iterable[float]) -> Distribution:
    """Percentiles of durations given in seconds, reported in milliseconds."""
    ordered = sorted(values_s)
    if not ordered:
        return Distribution()
    p50, p90, p99 = (percentile(ordered, q) * 1000 for q in PERCENTILES)
    return Distribution(
        count=len(ordered),
        mean_ms=statistics.fmean(ordered) * 1000,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=ordered[-1] * 1000,
    )


def spread(values: Iterable[float]) -> Spread:
    """Median and min–max of a metric over repeats, ignoring NaN (a metric a run lacked)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return Spread(0.0, 0.0, 0.0, 0)
    return Spread(statistics.median(finite), min(finite), max(finite), len(finite))
