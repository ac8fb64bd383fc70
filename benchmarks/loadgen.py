"""The load generator: sends a workload to a target in a closed loop (N concurrent clients)
or an open loop (Poisson arrivals at a rate, so queueing shows), bounded by a request count
and a time limit, and measures each request (TTFT, inter-token gaps, end-to-end, tokens) and
the CPU every watched server process spent on the run. Usable by any harness:

    result = loadgen.run(Endpoint("rest", url), Workload(stream=True), LoadSpec(concurrency=8),
                         watch={"edge": edge_pid, "core": core_pid})
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator, Mapping

import msgspec
import uvloop

from benchmarks import cpu
from benchmarks.memory import RssSampler, RssTrace
from benchmarks.progress import Progress
from benchmarks.stats import Distribution, distribution
from benchmarks.targets import OK, Endpoint, Sample, Target, open_target
from benchmarks.vocabulary import Goodput, RequestTable, Slo, goodput
from benchmarks.workload import RequestSpec, Workload, requests

# Open loop: arrivals beyond this many requests in flight are dropped (and counted), so an
# overloaded server cannot make the generator grow without bound.
DEFAULT_OPEN_LOOP_IN_FLIGHT = 2048
# How often the servers' RSS is read while a run goes on.
DEFAULT_RSS_INTERVAL_S = 0.5


class LoadSpec(msgspec.Struct, frozen=True):
    """How much load, and for how long. `rate_rps` set: open loop, `concurrency` bounds the
    requests in flight; unset: closed loop with `concurrency` clients."""

    concurrency: int = 32
    rate_rps: float | None = None
    requests: int = 1000
    duration_s: float = 60.0
    # Sent before the measured part (same concurrency, closed loop), then forgotten.
    warmup_requests: int = 0
    seed: int = 0
    # Closed loop: client i starts i/concurrency of this later, so paced streams of one
    # length do not all begin and end in the same engine step.
    ramp_s: float = 0.0
    # Closed loop: the measured part begins once the warm-up requests have ended, while every
    # client keeps going (no drain and restart between the two), so it sees the steady state.
    continuous: bool = False

    @property
    def mode(self) -> str:
        return "open" if self.rate_rps else "closed"


class ProcessCpu(msgspec.Struct):
    """CPU one server process (tree) spent during the measured part of a run: user + system
    (`cpu_s`), of which system (the kernel, on the process's behalf: syscalls, fsync)."""

    cpu_s: float
    system_s: float
    per_request_us: float
    per_token_us: float


class LoadResult(msgspec.Struct):
    """One run. Latencies cover successful requests; rates use the measured wall time."""

    label: str
    target: str
    workload: str
    mode: str
    concurrency: int
    rate_rps: float | None
    sent: int
    ok: int
    errors: dict[str, int]
    dropped: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens: int
    completion_tokens: int
    chunks: int
    e2e: Distribution
    ttft: Distribution
    itl: Distribution
    cpu: dict[str, ProcessCpu]
    server_cpu_per_request_us: float
    server_cpu_per_token_us: float
    loadgen_cpu_s: float
    # Per request (E2E − TTFT) / (tokens − 1), over streamed requests of two tokens or more.
    tpot: Distribution = msgspec.field(default_factory=Distribution)
    # Under the SLO the run was given; None without one.
    goodput: Goodput | None = None
    # RSS of the watched processes before any load and during the measured part.
    memory: RssTrace | None = None
    # Continuous runs: the output tokens that arrived within the measured window (requests
    # running across its edges count for their part inside), which the rates, CPU per token
    # and `duration_s` are of; 0 for other runs, whose rates count whole requests.
    window_tokens: float = 0.0


class _Collector:
    """Accumulates samples into flat arrays (a streaming run yields millions of gaps)."""

    def __init__(self) -> None:
        self.sent = 0
        self.done = 0
        self.dropped = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.e2e = array("d")
        self.ttft = array("d")
        self.gaps = array("d")
        self.per_request = RequestTable()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.chunks = 0
        self.last_done = 0.0

    def add(self, sample: Sample) -> None:
        self.done += 1
        self.last_done = time.perf_counter()
        if sample.status != OK:
            self.errors[sample.status] += 1
            return
        self.e2e.append(sample.e2e_s)
        if sample.ttft_s is not None:
            self.ttft.append(sample.ttft_s)
        self.gaps.extend(sample.gaps_s)
        self.per_request.add(sample.ttft_s, sample.e2e_s, sample.gaps_s, sample.completion_tokens)
        self.prompt_tokens += sample.prompt_tokens
        self.completion_tokens += sample.completion_tokens
        self.chunks += sample.chunks


class Window:
    """A fixed stretch of time [start, end) on the perf_counter clock and what arrived in it:
    output tokens (a request's tokens spread evenly over its content events) and requests
    that ended. A continuous run counts these, so that the CPU measured over exactly this
    stretch is divided by exactly the work done in it."""

    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf
        self.tokens = 0.0
        self.requests = 0

    def add(self, sample: Sample, sent_at: float) -> None:
        """Counts the part of a finished request inside the window; `sent_at` is when it
        was sent."""
        if sample.status != OK:
            return
        if self.start <= sent_at + sample.e2e_s < self.end:
            self.requests += 1
        if sample.ttft_s is None or not sample.chunks or not sample.completion_tokens:
            return
        at = sent_at + sample.ttft_s
        inside = int(self.start <= at < self.end)
        for gap in sample.gaps_s:
            at += gap
            inside += self.start <= at < self.end
        self.tokens += inside * sample.completion_tokens / sample.chunks


Send = Callable[[RequestSpec], Awaitable[Sample]]


async def _closed_loop(
    send: Send,
    plan: Iterator[RequestSpec],
    spec: LoadSpec,
    out: _Collector,
    tick: Callable[[], None],
) -> None:
    deadline = time.monotonic() + spec.duration_s

    async def client(index: int) -> None:
        if spec.ramp_s > 0:
            await asyncio.sleep(spec.ramp_s * index / spec.concurrency)
        while out.sent < spec.requests and time.monotonic() < deadline:
            out.sent += 1
            out.add(await send(next(plan)))
            tick()

    await asyncio.gather(*(client(i) for i in range(spec.concurrency)))


async def _steady_closed_loop(
    send: Send,
    plan: Iterator[RequestSpec],
    spec: LoadSpec,
    out: _Collector,
    tick: Callable[[], None],
    window: Window,
    begin: Callable[[], None],
    end: Callable[[], None],
) -> None:
    """A closed loop whose first `warmup_requests` requests (or `duration_s`, if sooner) warm
    up; then `begin` opens the window and `end` closes it `duration_s` later, while every
    client keeps going. Requests begun inside the window go to `out` (latencies); what every
    request delivered inside the window goes to `window` (rates, CPU per token)."""
    warm = _Collector()
    started = time.monotonic()
    deadline = math.inf
    loop = asyncio.get_running_loop()

    def measuring() -> bool:
        return deadline < math.inf

    async def counted(request: RequestSpec) -> Sample:
        sent_at = time.perf_counter()
        sample = await send(request)
        window.add(sample, sent_at)
        return sample

    async def client(index: int) -> None:
        nonlocal deadline
        if spec.ramp_s > 0:
            await asyncio.sleep(spec.ramp_s * index / spec.concurrency)
        while not measuring():
            warm.sent += 1
            warm.add(await counted(next(plan)))
            now = time.monotonic()
            ready = warm.done >= spec.warmup_requests or now - started >= spec.duration_s
            if ready and not measuring():
                deadline = now + spec.duration_s
                begin()
                loop.call_at(loop.time() + spec.duration_s, end)
        while out.sent < spec.requests and time.monotonic() < deadline:
            out.sent += 1
            out.add(await counted(next(plan)))
            tick()

    await asyncio.gather(*(client(i) for i in range(spec.concurrency)))
    if window.end == math.inf:  # every client stopped before the timer (request count)
        end()


async def _open_loop(
    send: Send,
    plan: Iterator[RequestSpec],
    spec: LoadSpec,
    out: _Collector,
    tick: Callable[[], None],
) -> None:
    assert spec.rate_rps, "open loop needs a rate"
    rng = random.Random(spec.seed)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(request: RequestSpec) -> None:
        out.add(await send(request))
        tick()

    start = time.monotonic()
    arrival = start
    while out.sent + out.dropped < spec.requests:
        arrival += rng.expovariate(spec.rate_rps)
        if arrival - start >= spec.duration_s:
            break
        delay = arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= spec.concurrency:
            out.dropped += 1
            continue
        out.sent += 1
        task = asyncio.create_task(one(next(plan)))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


def _per(total: float, count: float) -> float:
    """Microseconds of `total` seconds per item; 0 when there were none (JSON has no NaN)."""
    return total / count * 1e6 if count else 0.0


def _process_cpu(times: tuple[float, float], requests: int, tokens: float) -> ProcessCpu:
    user, system = times
    return ProcessCpu(
        user + system, system, _per(user + system, requests), _per(user + system, tokens)
    )


async def run_load(
    endpoint: Endpoint,
    workload: Workload,
    spec: LoadSpec,
    *,
    watch: Mapping[str, int] | None = None,
    label: str = "",
    progress: bool | None = None,
    slo: Slo | None = None,
    rss_interval_s: float = DEFAULT_RSS_INTERVAL_S,
) -> LoadResult:
    """Runs one load (after its warm-up) and measures it. See the module docstring. With
    `slo`, the result holds the goodput under it; the watched processes' RSS is read before
    the warm-up and every `rss_interval_s` of the measured part."""
    plan = requests(workload)
    rss = RssSampler(watch or {}, rss_interval_s)
    async with open_target(endpoint) as target:
        if spec.warmup_requests and not spec.continuous:
            warmup = LoadSpec(
                concurrency=spec.concurrency,
                requests=spec.warmup_requests,
                duration_s=spec.duration_s,
                ramp_s=spec.ramp_s,
            )
            await _closed_loop(target.send, plan, warmup, _Collector(), lambda: None)
        try:
            result = await _measure(target, plan, workload, spec, watch or {}, label, progress,
                                    slo, rss)  # fmt: skip
        finally:
            trace = await rss.stop()
    if watch:
        result.memory = trace
    return result


async def _measure(
    target: Target,
    plan: Iterator[RequestSpec],
    workload: Workload,
    spec: LoadSpec,
    watch: Mapping[str, int],
    label: str,
    progress: bool | None,
    slo: Slo | None,
    rss: RssSampler,
) -> LoadResult:
    out = _Collector()
    bar = Progress(label or target.name, enabled=progress)
    before: dict[str, tuple[float, float]] = {}
    after: dict[str, tuple[float, float]] = {}
    marks = {"start": 0.0, "self": 0.0, "self_end": 0.0}
    window = Window()

    def tick() -> None:
        bar.update(out.done, spec.requests, sum(out.errors.values()), spec.duration_s)

    def begin() -> None:
        """The measured part starts: CPU so far, the clock, the RSS samples."""
        before.update(cpu.snapshot(watch))
        marks["self"] = cpu.self_cpu_s()
        marks["start"] = out.last_done = window.start = time.perf_counter()
        rss.start()

    def end() -> None:
        """The measured part ends (a continuous run's window closes): CPU so far."""
        if window.end == math.inf:
            window.end = time.perf_counter()
            after.update(cpu.snapshot(watch))
            marks["self_end"] = cpu.self_cpu_s()

    steady = spec.mode == "closed" and spec.continuous and spec.warmup_requests > 0
    try:
        if spec.mode == "open":
            begin()
            await _open_loop(target.send, plan, spec, out, tick)
        elif steady:
            await _steady_closed_loop(target.send, plan, spec, out, tick, window, begin, end)
        else:
            begin()
            await _closed_loop(target.send, plan, spec, out, tick)
    finally:
        bar.close()
    end()
    used = {
        name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in watch
    }
    loadgen_cpu_s = marks["self_end"] - marks["self"]
    if steady:
        return summarize(label, target.name, workload, spec, out, window.end - window.start,
                         used, loadgen_cpu_s, slo, window)  # fmt: skip
    duration = out.last_done - marks["start"]
    return summarize(label, target.name, workload, spec, out, duration, used, loadgen_cpu_s, slo)


def summarize(
    label: str,
    target: str,
    workload: Workload,
    spec: LoadSpec,
    out: _Collector,
    duration_s: float,
    cpu_used: Mapping[str, tuple[float, float]],
    loadgen_cpu_s: float,
    slo: Slo | None = None,
    window: Window | None = None,
) -> LoadResult:
    """The result of a run from what was collected and measured; `cpu_used` holds each
    watched process's (user, system) CPU seconds. With a `window`, rates and CPU per request
    and token are of what arrived within it (`duration_s` long); latencies are always of the
    requests in `out`."""
    ok = len(out.e2e)
    tokens = out.completion_tokens
    done, counted = (window.requests, window.tokens) if window else (ok, float(tokens))
    total_cpu = sum(user + system for user, system in cpu_used.values())
    return LoadResult(
        label=label,
        target=target,
        workload=workload.describe(),
        mode=spec.mode,
        concurrency=spec.concurrency,
        rate_rps=spec.rate_rps,
        sent=out.sent,
        ok=ok,
        errors=dict(out.errors),
        dropped=out.dropped,
        duration_s=duration_s,
        requests_per_s=done / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=counted / duration_s if duration_s > 0 else 0.0,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=tokens,
        chunks=out.chunks,
        e2e=distribution(out.e2e),
        ttft=distribution(out.ttft),
        itl=distribution(out.gaps),
        cpu={name: _process_cpu(times, done, counted) for name, times in cpu_used.items()},
        server_cpu_per_request_us=_per(total_cpu, done),
        server_cpu_per_token_us=_per(total_cpu, counted),
        loadgen_cpu_s=loadgen_cpu_s,
        tpot=distribution(out.per_request.finite_tpot_s()) if workload.stream else Distribution(),
        goodput=goodput(out.per_request, slo, sum(out.errors.values()), duration_s)
        if slo is not None and slo.is_set()
        else None,
        window_tokens=window.tokens if window else 0.0,
    )


def run(
    endpoint: Endpoint,
    workload: Workload,
    spec: LoadSpec,
    *,
    watch: Mapping[str, int] | None = None,
    label: str = "",
    progress: bool | None = None,
    slo: Slo | None = None,
    rss_interval_s: float = DEFAULT_RSS_INTERVAL_S,
) -> LoadResult:
    """`run_load` on a fresh uvloop event loop, for synchronous callers."""
    result: LoadResult = uvloop.run(
        run_load(endpoint, workload, spec, watch=watch, label=label, progress=progress,
                 slo=slo, rss_interval_s=rss_interval_s)
    )  # fmt: skip
    return result
