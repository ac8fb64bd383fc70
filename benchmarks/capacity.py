"""Node capacity: the highest output tok/s a stack sustains while the p50 inter-token latency
stays within 10% of the engine's step (the engine's step does not grow with the batch, so any
stretch is the serving stack falling behind). Found by stepping concurrency over a grid (64,
256, 1,024 streams: the chart's points), then bisecting between the highest concurrency that
held and the lowest above it that did not. The search is a pure function of a `measure`
callable (tested on made-up data); `measure_stack` measures a real Corvex stack."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from benchmarks import loadgen, memory, systems
from benchmarks.loadgen import LoadResult, LoadSpec
from benchmarks.systems import CorvexVariant
from benchmarks.workload import Lengths, Workload

GRID: Final = (64, 256, 1024)
TOLERANCE: Final = 0.10
# Bisection stops when the bracket is this narrow (hi ÷ lo) or after MAX_SEARCH probes.
RESOLUTION: Final = 0.10
MAX_SEARCH: Final = 4


class Shape(msgspec.Struct, frozen=True):
    """A stack whose capacity is found: `edge` is merged into the edge's section of the
    configuration, `edge_workers` edge processes share its port (`corvex edge --workers N`;
    they are children of the edge's process, and CPU and RSS are read over process trees)."""

    name: str
    edge: dict[str, Any] = {}
    edge_workers: int = 1


SHAPES: Final = (Shape("1 core + 1 edge"), Shape("1 core + edge --workers 2", edge_workers=2))


class Probe(msgspec.Struct):
    """One concurrency measured: throughput, the p50 gap between tokens, failures, CPU per
    output token of each process (tree), and RSS before the first probe and at the peak of
    this one."""

    concurrency: int
    output_tokens_per_s: float
    itl_p50_ms: float
    errors: int
    cpu_per_token_us: dict[str, float] = {}
    rss_idle_bytes: dict[str, int] = {}
    rss_peak_bytes: dict[str, int] = {}

    def sustains(self, step_ms: float, tolerance: float = TOLERANCE) -> bool:
        """No errors, and tokens arrive a step apart: not later (the stack falls behind) and
        not sooner either, which only happens when a stack that fell behind delivers events in
        bursts (the gaps inside a burst are ~0)."""
        low, high = step_ms * (1 - tolerance), step_ms * (1 + tolerance)
        return self.errors == 0 and low <= self.itl_p50_ms <= high

    def cpu_total_per_token_us(self) -> float:
        return sum(self.cpu_per_token_us.values())

    def rss_per_thousand_streams_mib(self, process: str) -> float:
        return memory.per_thousand_streams_mib(
            self.rss_idle_bytes.get(process, 0),
            self.rss_peak_bytes.get(process, 0),
            self.concurrency,
        )


class Capacity(msgspec.Struct):
    """A search's outcome. `capacity` is the passing probe with the highest output tok/s (None
    if none passed); `above_grid` says the largest concurrency tried still held, so the
    capacity is at least that."""

    shape: str
    step_ms: float
    tolerance: float
    probes: list[Probe]
    capacity: Probe | None
    bracket: tuple[int, int]
    above_grid: bool
    # Output tokens of every answer (set by measure_stack; 0 when unknown).
    tokens: int = 0
    # The concurrencies always measured (the chart's points).
    grid: tuple[int, ...] = GRID

    def grid_probes(self) -> list[Probe]:
        return sorted((p for p in self.probes if p.concurrency in self.grid),
                      key=lambda p: p.concurrency)  # fmt: skip


def search(
    measure: Callable[[int], Probe],
    *,
    step_ms: float,
    shape: str = "",
    grid: Sequence[int] = GRID,
    tolerance: float = TOLERANCE,
    resolution: float = RESOLUTION,
    max_search: int = MAX_SEARCH,
) -> Capacity:
    """Measures every grid point (ascending), then bisects (geometrically) between the
    highest concurrency below the first failure and that failure."""
    assert grid and list(grid) == sorted(set(grid)) and grid[0] >= 1, "grid: ascending, ≥ 1"
    probes = [measure(c) for c in grid]
    first_fail = next((p.concurrency for p in probes if not p.sustains(step_ms, tolerance)), None)
    if first_fail is None:
        lo, hi = grid[-1], grid[-1]
    else:
        below = [p.concurrency for p in probes
                 if p.concurrency < first_fail and p.sustains(step_ms, tolerance)]  # fmt: skip
        lo, hi = (below[-1] if below else 0), first_fail
    for _ in range(max_search):
        if hi <= lo * (1 + resolution) or hi - lo <= 1:
            break
        mid = hi // 2 if lo == 0 else round(math.sqrt(lo * hi))
        if mid in (lo, hi):
            break
        probe = measure(mid)
        probes.append(probe)
        if probe.sustains(step_ms, tolerance):
            lo = mid
        else:
            hi = mid
    passing = [p for p in probes if p.sustains(step_ms, tolerance)]
    best = max(passing, key=lambda p: p.output_tokens_per_s, default=None)
    return Capacity(shape, step_ms, tolerance, probes, best, (lo, hi), first_fail is None,
                    grid=tuple(grid))  # fmt: skip


def probe_of(result: LoadResult) -> Probe:
    trace = result.memory
    return Probe(
        concurrency=result.concurrency,
        output_tokens_per_s=result.output_tokens_per_s,
        itl_p50_ms=result.itl.p50_ms,
        errors=sum(result.errors.values()) + result.dropped,
        cpu_per_token_us={name: c.per_token_us for name, c in result.cpu.items()},
        rss_peak_bytes={n: trace.peak_bytes(n) for n in trace.before_bytes} if trace else {},
    )


class Settings(msgspec.Struct, frozen=True):
    """How each probe runs: streams of exactly `tokens` tokens at one per `step_ms`, clients
    started over one answer's length, measured for `duration_s` after half of them warmed up."""

    step_ms: float = 20.0
    tokens: int = 256
    duration_s: float = 10.0
    grid: tuple[int, ...] = GRID
    max_search: int = MAX_SEARCH
    progress: bool | None = None

    def load(self, concurrency: int) -> LoadSpec:
        return LoadSpec(
            concurrency=concurrency,
            requests=10**8,
            duration_s=self.duration_s,
            warmup_requests=max(1, concurrency // 2),
            continuous=True,
            ramp_s=self.tokens * self.step_ms / 1000,
        )


def variant(step_ms: float, grid: Sequence[int], shape: Shape) -> CorvexVariant:
    """A stack whose engine never makes streams wait: a batch as large as the most streams
    tried, and a step that does not grow with it."""
    return CorvexVariant(tpot_ms=step_ms, batch_slowdown=0.0, max_batch=max(grid) * 2,
                         edge=dict(shape.edge), edge_workers=shape.edge_workers)  # fmt: skip


def measure_stack(
    shape: Shape,
    settings: Settings,
    say: Callable[[str], None] = lambda _: None,
) -> Capacity:
    """The capacity of one fresh Corvex stack (its RSS before the first probe is its idle)."""
    workload = Workload(stream=True, max_tokens=Lengths.fixed(settings.tokens))
    name = shape.name
    with systems.corvex(name, variant(settings.step_ms, settings.grid, shape)) as stack:
        idle = {name: memory.tree_rss_bytes(memory.tree_pids(pid))
                for name, pid in stack.processes.items()}  # fmt: skip

        def measure(concurrency: int) -> Probe:
            result = loadgen.run(
                stack.endpoint("rest"),
                msgspec.structs.replace(workload, api_keys=stack.api_keys),
                settings.load(concurrency),
                watch=stack.processes,
                label=f"capacity {name}, {concurrency} streams",
                progress=settings.progress,
            )
            probe = probe_of(result)
            probe.rss_idle_bytes = idle
            verdict = "holds" if probe.sustains(settings.step_ms) else "falls behind"
            cpu_us = probe.cpu_total_per_token_us()
            say(f"{name}, {concurrency} streams: {probe.output_tokens_per_s:,.0f} tok/s, ITL "
                f"p50 {probe.itl_p50_ms:.2f} ms ({verdict}), CPU {cpu_us:.1f} µs/token, "
                f"errors {probe.errors}")  # fmt: skip
            return probe

        found = search(measure, step_ms=settings.step_ms, shape=name, grid=settings.grid,
                       max_search=settings.max_search)  # fmt: skip
    found.tokens = settings.tokens
    return found


def describe(result: Capacity) -> str:
    """One line: the capacity and how it was bracketed."""
    best = result.capacity
    if best is None:
        return (f"{result.shape}: no concurrency tried kept ITL p50 within "
                f"{result.tolerance:.0%} of {result.step_ms:g} ms")  # fmt: skip
    bound = "at least " if result.above_grid else ""
    lo, hi = result.bracket
    return (f"{result.shape}: {bound}{best.output_tokens_per_s:,.0f} output tok/s at "
            f"{best.concurrency} streams (ITL p50 {best.itl_p50_ms:.2f} ms, step "
            f"{result.step_ms:g} ms; bracket {lo}–{hi} streams)")  # fmt: skip
