"""Resident memory of the server processes: VmRSS from /proc/<pid>/status, summed over a
process tree (an edge with workers counts as one server), sampled while load runs; and the
figures made of the samples: RSS per 1,000 concurrent streams, and whether RSS stays flat over
a soak (a least-squares slope). It only reads /proc; it never signals a process."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from benchmarks import cpu

MIB = 1024 * 1024
# A soak is flat when the fitted growth over its length is below both of these: the larger
# absorbs allocator noise on a small process, the share scales with a large one.
FLAT_GROWTH_MIB = 4.0
FLAT_GROWTH_SHARE = 0.02


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes; 0 if it is gone (or a kernel thread, which has none)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0


def tree_pids(root: int) -> list[int]:
    return [root, *cpu.descendants(root)]


def tree_rss_bytes(pids: Sequence[int]) -> int:
    return sum(rss_bytes(pid) for pid in pids)


class RssTrace(msgspec.Struct):
    """RSS of named process trees: once before any load (`before_bytes`), then every
    `interval_s` while the measured part of a run went on (`times_s` from its start)."""

    interval_s: float
    before_bytes: dict[str, int]
    times_s: list[float] = []
    samples_bytes: dict[str, list[int]] = {}

    def peak_bytes(self, name: str) -> int:
        return max(self.samples_bytes.get(name) or [self.before_bytes.get(name, 0)])

    def median_bytes(self, name: str) -> float:
        values = self.samples_bytes.get(name)
        return statistics.median(values) if values else float(self.before_bytes.get(name, 0))


class RssSampler:
    """Samples the trees of `pids` every `interval_s` on the running event loop until
    stopped. The trees' members are looked up once, at the start (scanning /proc is slow)."""

    def __init__(self, pids: Mapping[str, int], interval_s: float) -> None:
        self._trees = {name: tree_pids(pid) for name, pid in pids.items()}
        self.trace = RssTrace(
            interval_s,
            {name: tree_rss_bytes(members) for name, members in self._trees.items()},
            samples_bytes={name: [] for name in pids},
        )
        self._task: asyncio.Task[None] | None = None

    def _sample(self, start: float) -> None:
        self.trace.times_s.append(time.perf_counter() - start)
        for name, members in self._trees.items():
            self.trace.samples_bytes[name].append(tree_rss_bytes(members))

    async def _run(self) -> None:
        start = time.perf_counter()
        while True:
            self._sample(start)
            await asyncio.sleep(self.trace.interval_s)

    def start(self) -> None:
        if self._trees:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> RssTrace:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.trace


def per_thousand_streams_mib(before_bytes: float, during_bytes: float, streams: int) -> float:
    """MiB of RSS that 1,000 concurrent streams add, from RSS before the load and during it."""
    if streams <= 0:
        return math.nan
    return (during_bytes - before_bytes) / streams * 1000 / MIB


def slope_per_s(times_s: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of `values` over `times_s` (units of values per second)."""
    if len(times_s) < 2:
        return 0.0
    mean_t, mean_v = statistics.fmean(times_s), statistics.fmean(values)
    var = math.fsum((t - mean_t) ** 2 for t in times_s)
    if var == 0:
        return 0.0
    pairs = zip(times_s, values, strict=True)
    return math.fsum((t - mean_t) * (v - mean_v) for t, v in pairs) / var


class Flatness(msgspec.Struct):
    """RSS over a soak: where it started and ended, the fitted slope, the growth that slope
    makes over the soak's length, and whether that growth is within the tolerance."""

    start_mib: float
    end_mib: float
    peak_mib: float
    slope_mib_per_min: float
    fitted_growth_mib: float
    flat: bool


def flatness(times_s: Sequence[float], values_bytes: Sequence[int]) -> Flatness:
    """Whether RSS stayed flat: growth ≤ max(FLAT_GROWTH_MIB, FLAT_GROWTH_SHARE × start)."""
    assert times_s and len(times_s) == len(values_bytes), "a trace needs aligned samples"
    mib = [v / MIB for v in values_bytes]
    slope = slope_per_s(times_s, mib)
    growth = slope * (times_s[-1] - times_s[0])
    limit = max(FLAT_GROWTH_MIB, FLAT_GROWTH_SHARE * mib[0])
    return Flatness(mib[0], mib[-1], max(mib), slope * 60, growth, growth <= limit)
