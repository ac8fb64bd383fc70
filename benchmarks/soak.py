"""The soak (`make bench-soak`, never part of `make bench`): paced streams at a fraction (75%)
of the measured node capacity for ten minutes after a warm-up (two minutes of the same load),
the RSS of core and edge read every few seconds, and whether it stayed flat over the ten
minutes (the least-squares slope, and the growth it makes over them). The warm-up is where a
process fills its caches and its allocator its arenas, which are bounded; a leak is what keeps
growing after it. What RSS did during the warm-up is reported beside the verdict.
The capacity comes from `capacity.json` of an earlier `python -m benchmarks capacity` with the
same step and answer length, else from a short search on the soak's own stack first."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from benchmarks import capacity, loadgen, memory, systems
from benchmarks.capacity import Capacity, Settings
from benchmarks.loadgen import LoadResult
from benchmarks.memory import Flatness
from benchmarks.workload import Lengths, Workload

DEFAULT_MINUTES = 10.0
DEFAULT_WARMUP_MINUTES = 2.0
DEFAULT_FRACTION = 0.75
# About 120 samples whatever the length, never more often than twice a second.
SAMPLES = 120


class SoakResult(msgspec.Struct):
    started_utc: str
    minutes: float
    fraction: float
    warmup_minutes: float
    streams: int
    capacity_streams: int | None
    capacity_source: str
    step_ms: float
    tokens: int
    run: LoadResult  # its memory trace spans the warm-up too
    flatness: dict[str, Flatness]  # over the soak after the warm-up
    # RSS at the end of the warm-up less RSS at the start of the load, MiB, per process.
    warmup_rise_mib: dict[str, float]


def _load_capacity(path: Path, settings: Settings) -> Capacity | None:
    """The first shape's capacity from an earlier run with the same step and length."""
    if not path.exists():
        return None
    try:
        found = msgspec.json.decode(path.read_bytes(), type=list[Capacity])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not found or found[0].capacity is None:
        return None
    if (found[0].step_ms, found[0].tokens) != (settings.step_ms, settings.tokens):
        return None
    return found[0]


def streams_for(capacity_streams: int, fraction: float) -> int:
    """Concurrent streams at `fraction` of the capacity's (paced streams: tok/s ∝ streams)."""
    return max(1, math.floor(capacity_streams * fraction))


def run(
    *,
    minutes: float,
    fraction: float,
    warmup_minutes: float = DEFAULT_WARMUP_MINUTES,
    settings: Settings,
    streams: int | None,
    capacity_json: Path,
    say: Callable[[str], None],
) -> SoakResult:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    capacity_streams: int | None = None
    source = "given (--streams)"
    if streams is None:
        found = _load_capacity(capacity_json, settings)
        if found is None:
            say("no matching capacity.json: a short capacity search first")
            short = msgspec.structs.replace(settings, duration_s=min(settings.duration_s, 5.0))
            found = capacity.measure_stack(capacity.SHAPES[0], short, say)
            source = "a short search before the soak"
        else:
            source = str(capacity_json)
        if found.capacity is None:
            raise SystemExit(capacity.describe(found))
        capacity_streams = found.capacity.concurrency
        streams = streams_for(capacity_streams, fraction)
    duration_s = (warmup_minutes + minutes) * 60
    interval_s = max(0.5, minutes * 60 / SAMPLES)
    spec = msgspec.structs.replace(settings, duration_s=duration_s).load(streams)
    workload = Workload(stream=True, max_tokens=Lengths.fixed(settings.tokens))
    variant = capacity.variant(settings.step_ms, (streams,), capacity.SHAPES[0])
    say(f"soak: {streams} streams for {warmup_minutes:g} min of warm-up, then {minutes:g} min, "
        f"RSS every {interval_s:g} s")  # fmt: skip
    with systems.corvex("soak", variant) as stack:
        result = loadgen.run(
            stack.endpoint("rest"),
            msgspec.structs.replace(workload, api_keys=stack.api_keys),
            spec,
            watch=stack.processes,
            label=f"soak, {streams} streams",
            progress=settings.progress,
            rss_interval_s=interval_s,
        )
    trace = result.memory
    assert trace is not None, "the soak watches core and edge"
    soaked = [i for i, t in enumerate(trace.times_s) if t >= warmup_minutes * 60]
    assert len(soaked) >= 2, "the soak outlasts its warm-up by several samples"
    times = [trace.times_s[i] for i in soaked]
    flat, rise = {}, {}
    for name, samples in trace.samples_bytes.items():
        if samples:
            flat[name] = memory.flatness(times, [samples[i] for i in soaked])
            rise[name] = (samples[soaked[0]] - samples[0]) / memory.MIB
    return SoakResult(started, minutes, fraction, warmup_minutes, streams, capacity_streams,
                      source, settings.step_ms, settings.tokens, result, flat, rise)  # fmt: skip


def describe(result: SoakResult) -> str:
    run = result.run
    of = (f"{result.fraction:.0%} of {result.capacity_streams} ({result.capacity_source})"
          if result.capacity_streams else result.capacity_source)  # fmt: skip
    lines = [
        f"soak {result.started_utc}: {result.streams} paced streams ({of}), {result.tokens} "
        f"tokens at {result.step_ms:g} ms, {result.warmup_minutes:g} min of warm-up, then "
        f"{result.minutes:g} min soaked",
        f"  {run.output_tokens_per_s:,.0f} output tok/s, ITL p50 {run.itl.p50_ms:.2f} ms, "
        f"p99 {run.itl.p99_ms:.2f} ms, errors {run.errors or 'none'}",
    ]
    for name, f in result.flatness.items():
        verdict = "flat" if f.flat else "NOT flat"
        lines.append(
            f"  rss {name:5} {f.start_mib:,.1f} → {f.end_mib:,.1f} MiB (peak {f.peak_mib:,.1f}); "
            f"slope {f.slope_mib_per_min:+.3f} MiB/min, fitted growth "
            f"{f.fitted_growth_mib:+.1f} MiB: {verdict} (the warm-up before: "
            f"{result.warmup_rise_mib.get(name, 0.0):+.1f} MiB)"
        )
    return "\n".join(lines)
