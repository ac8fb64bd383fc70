"""The scenarios of `make bench` and how they run: which systems start, which loads are sent
to them, in what order. Every system of the main phase is up at once and the repeats are
interleaved (repeat 1 of every case, then repeat 2, ...), so that ratios compare runs made
minutes, not hours, apart. What the numbers mean is `benchmarks.analysis`'s business."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import msgspec

from benchmarks import capacity, loadgen, machine, micro, peer, systems
from benchmarks.analysis import Goal, derive, goals
from benchmarks.capacity import Capacity
from benchmarks.loadgen import LoadResult, LoadSpec
from benchmarks.stats import Spread, spread
from benchmarks.systems import CorvexVariant, System
from benchmarks.workload import Lengths, Workload

EndpointKind = Literal["rest", "grpc", "grpc-unary", "grpc-stream"]
NON_STREAM = Workload(max_tokens=Lengths.fixed(16))
STREAM_256 = Workload(stream=True, max_tokens=Lengths.fixed(256))
THROUGHPUT_CONCURRENCY = 32
STREAM_CONCURRENCY = 8
SWEEP_CONCURRENCY = (4, 16, 64)
OPEN_LOOP_FRACTIONS = (0.25, 0.5, 0.75, 0.9)
PEER_WORKERS = (1, 2)
# Below this much CPU in a run, a process was idle (the edge, when the load went to gRPC).
MIN_CPU_S = 0.05
# Streaming at node load: a GPU node's decode step, one token per stream per step, as many
# streams as a node runs at once, and answers long enough for the step to dominate.
PACED_STEP_MS = 20.0
PACED_STREAMS = 256
PACED_TOKENS = 256
PACED_STREAM = Workload(stream=True, max_tokens=Lengths.fixed(PACED_TOKENS))


class SuiteOptions(msgspec.Struct, frozen=True):
    quick: bool = False
    repeats: int = 3
    duration_s: float = 3.0
    open_loop_s: float = 5.0
    peer: bool = True
    progress: bool | None = None
    # Measured part of each paced case and capacity probe (after a warm-up of about 1.5
    # answers' length, 256 × 20 ms each).
    paced_s: float = 10.0
    capacity: bool = True
    # Each equal-load case: the shares of metering and of durability are differences of two
    # of them, so they need longer than the closed-loop cases (3 s swung them by 2×).
    equal_load_s: float = 10.0

    @classmethod
    def make(
        cls,
        *,
        quick: bool,
        repeats: int | None,
        peer: bool,
        progress: bool | None,
        capacity: bool = True,
    ) -> SuiteOptions:
        return cls(
            quick=quick,
            repeats=repeats or (1 if quick else 3),
            duration_s=1.5 if quick else 3.0,
            open_loop_s=2.5 if quick else 5.0,
            peer=peer,
            progress=progress,
            paced_s=4.0 if quick else 10.0,
            capacity=capacity,
            equal_load_s=3.0 if quick else 10.0,
        )


class Case(msgspec.Struct, frozen=True):
    """One load against one system. `group` is the scenario it belongs to."""

    name: str
    title: str
    group: str
    system: str
    endpoint: EndpointKind
    workload: Workload
    load: LoadSpec


class CaseResult(msgspec.Struct):
    case: Case
    runs: list[LoadResult]
    summary: dict[str, Spread]


class SuiteResult(msgspec.Struct):
    started_utc: str
    elapsed_s: float
    options: SuiteOptions
    machine: dict[str, str]
    cases: dict[str, CaseResult]
    micro: micro.MicroResult
    derived: dict[str, Spread]
    goals: list[Goal]
    notes: list[str]
    capacity: list[Capacity] = []


# ---- the cases ---------------------------------------------------------------------------


def _load(options: SuiteOptions, concurrency: int, *, stream: bool = False) -> LoadSpec:
    warmup = 2 * concurrency if stream else max(50, 4 * concurrency)
    return LoadSpec(
        concurrency=concurrency,
        requests=10**7,
        duration_s=options.duration_s,
        warmup_requests=warmup,
    )


def main_cases(options: SuiteOptions) -> list[Case]:
    """Scenarios 1-4 and the added-latency and per-token cases: one repeat of each per round."""
    c, s = THROUGHPUT_CONCURRENCY, STREAM_CONCURRENCY
    tput, stream, one = _load(options, c), _load(options, s, stream=True), _load(options, 1)
    return [
        Case("ceiling.aiohttp", "bare aiohttp, canned completion", "ceilings",
             "aiohttp-canned", "rest", NON_STREAM, tput),
        Case("ceiling.grpc-unary", "bare grpc.aio unary echo", "ceilings",
             "grpc-echo", "grpc-unary", NON_STREAM, tput),
        Case("ceiling.grpc-stream", "bare grpc.aio streaming echo, 256 tokens", "ceilings",
             "grpc-echo", "grpc-stream", STREAM_256, stream),
        Case("ceiling.skeleton", "aiohttp→grpc skeleton (unary hop)", "ceilings",
             "skeleton-unary", "rest", NON_STREAM, tput),
        Case("ceiling.skeleton-fold", "aiohttp→grpc skeleton (16-message streaming hop)",
             "ceilings", "skeleton-stream", "rest", NON_STREAM, tput),
        Case("ceiling.skeleton-stream", "aiohttp→grpc skeleton, SSE 256 tokens", "ceilings",
             "skeleton-unary", "rest", STREAM_256, stream),
        Case("corvex.rest", "Corvex REST non-streaming", "corvex",
             "corvex", "rest", NON_STREAM, tput),
        Case("corvex.rest-stream", "Corvex REST streaming, 256 tokens", "corvex",
             "corvex", "rest", STREAM_256, stream),
        Case("corvex.grpc", "Corvex gRPC direct", "corvex", "corvex", "grpc", NON_STREAM, tput),
        Case("unmetered.rest", "Corvex REST, metering off", "metering",
             "corvex-unmetered", "rest", NON_STREAM, tput),
        Case("latency.corvex-rest", "Corvex REST, concurrency 1", "latency",
             "corvex", "rest", NON_STREAM, one),
        Case("latency.corvex-grpc", "Corvex gRPC, concurrency 1", "latency",
             "corvex", "grpc", NON_STREAM, one),
        Case("latency.unmetered", "Corvex REST, metering off, concurrency 1", "latency",
             "corvex-unmetered", "rest", NON_STREAM, one),
        Case("latency.nojournal", "Corvex REST, journal disabled, concurrency 1", "latency",
             "corvex-nojournal", "rest", NON_STREAM, one),
        Case("latency.skeleton", "skeleton (unary hop), concurrency 1", "latency",
             "skeleton-unary", "rest", NON_STREAM, one),
        Case("latency.skeleton-fold", "skeleton (16-message hop), concurrency 1", "latency",
             "skeleton-stream", "rest", NON_STREAM, one),
        Case("streaming.per-token", "Corvex REST streaming, 1 ms/token engine", "streaming",
             "corvex-tpot1", "rest", STREAM_256, stream),
    ]  # fmt: skip


EQUAL_LOAD_FRACTION = 0.4
EQUAL_LOAD: tuple[tuple[str, EndpointKind, str], ...] = (
    ("corvex", "rest", "Corvex REST (metered, journal with fsync)"),
    ("corvex-unmetered", "rest", "Corvex REST, metering off"),
    ("corvex-nofsync", "rest", "Corvex REST, journal without fsync"),
    ("corvex-nojournal", "rest", "Corvex REST, journal disabled"),
    ("corvex", "grpc", "Corvex gRPC (metered, journal with fsync)"),
    ("corvex-unmetered", "grpc", "Corvex gRPC, metering off"),
)


def equal_load_cases(options: SuiteOptions, capacity_rps: float) -> list[Case]:
    """Scenarios 3 and 4 at equal load: the same Poisson arrival rate (a fraction of the
    capacity measured in the main phase) for every variant, so CPU per request compares like
    with like (CPU per request falls as load rises, so closed loops at different throughputs
    would not)."""
    rate = EQUAL_LOAD_FRACTION * capacity_rps
    return [
        Case(f"equal.{system}.{kind}", f"{title}, {rate:.0f} req/s", "equal-load", system,
             kind, NON_STREAM,
             LoadSpec(concurrency=loadgen.DEFAULT_OPEN_LOOP_IN_FLIGHT, rate_rps=rate,
                      requests=10**7, duration_s=options.equal_load_s, seed=7))
        for system, kind, title in EQUAL_LOAD
    ]  # fmt: skip


def open_loop_cases(options: SuiteOptions, capacity_rps: float) -> list[Case]:
    """Scenario 6: Poisson arrivals at fractions of the measured closed-loop capacity."""
    fractions = (0.5, 0.9) if options.quick else OPEN_LOOP_FRACTIONS
    return [
        Case(
            f"open.{int(fraction * 100)}",
            f"Corvex REST, open loop at {fraction:.0%} of capacity",
            "open-loop",
            "corvex",
            "rest",
            NON_STREAM,
            LoadSpec(
                concurrency=loadgen.DEFAULT_OPEN_LOOP_IN_FLIGHT,
                rate_rps=fraction * capacity_rps,
                requests=10**7,
                duration_s=options.open_loop_s,
                seed=int(fraction * 100),
            ),
        )
        for fraction in fractions
    ]


def sweep_cases(options: SuiteOptions) -> list[Case]:
    """Throughput against concurrency (1 and 32 come from the main phase)."""
    return [
        Case(f"sweep.{system}.c{c}", f"{title}, concurrency {c}", "sweep", system, "rest",
             NON_STREAM, _load(options, c))
        for system, title in (("corvex", "Corvex REST"), ("skeleton-unary", "skeleton"))
        for c in SWEEP_CONCURRENCY
    ]  # fmt: skip


def paced_settings(options: SuiteOptions) -> capacity.Settings:
    return capacity.Settings(step_ms=PACED_STEP_MS, tokens=PACED_TOKENS,
                             duration_s=options.paced_s, progress=options.progress)  # fmt: skip


def paced_cases(options: SuiteOptions, streams: int = PACED_STREAMS) -> list[Case]:
    """Streaming at node load: `streams` paced streams (one token per stream per 20 ms step,
    one SSE event per token) against Corvex and against the ceilings paced the same way."""
    load = paced_settings(options).load(streams)
    tail = f"{streams} streams × {PACED_TOKENS} tokens, {PACED_STEP_MS:g} ms step"
    return [
        Case("paced.grpc-echo", f"bare grpc.aio echo, paced, {tail}", "node-load",
             "grpc-echo-paced", "grpc-stream", PACED_STREAM, load),
        Case("paced.skeleton", f"aiohttp→grpc SSE skeleton, paced, {tail}", "node-load",
             "skeleton-paced", "rest", PACED_STREAM, load),
        Case("paced.corvex", f"Corvex REST streaming, {tail}", "node-load",
             "corvex-paced", "rest", PACED_STREAM, load),
        Case("paced.corvex-grpc", f"Corvex gRPC streaming, {tail}", "node-load",
             "corvex-paced", "grpc", PACED_STREAM, load),
        Case("paced.corvex-calls", f"Corvex REST streaming, a call per request, {tail}",
             "node-load", "corvex-paced-calls", "rest", PACED_STREAM, load),
    ]  # fmt: skip


@contextlib.contextmanager
def paced_systems(workdir: Path, streams: int = PACED_STREAMS) -> Iterator[dict[str, System]]:
    """The paced ceilings and a Corvex whose engine steps every 20 ms whatever the batch."""
    variant = capacity.variant(PACED_STEP_MS, (streams,), capacity.SHAPES[0])
    calls = capacity.variant(
        PACED_STEP_MS, (streams,), capacity.Shape("calls", {"core_transport": "calls"})
    )
    with contextlib.ExitStack() as stack:
        yield {
            "grpc-echo-paced": stack.enter_context(systems.grpc_echo(workdir, PACED_STEP_MS)),
            "skeleton-paced": stack.enter_context(
                systems.skeleton(workdir, "unary", PACED_STEP_MS)
            ),
            "corvex-paced": stack.enter_context(systems.corvex("corvex-paced", variant)),
            # The edge's other transport (edge.core_transport: calls), for what Streams saves.
            "corvex-paced-calls": stack.enter_context(systems.corvex("corvex-paced-calls", calls)),
        }


def run_paced(
    options: SuiteOptions, workdir: Path, results: dict[str, CaseResult], streams: int
) -> None:
    """The node-load cases, `options.repeats` interleaved rounds, on their own systems."""
    with paced_systems(workdir, streams) as running:
        run_cases(paced_cases(options, streams), running, options.repeats, options, results)


def run_capacity(options: SuiteOptions) -> list[Capacity]:
    """Node capacity of each stack shape, each on a fresh stack."""
    settings = paced_settings(options)
    if options.quick:
        settings = msgspec.structs.replace(settings, max_search=2)
    return [capacity.measure_stack(shape, settings, _say) for shape in capacity.SHAPES]


def peer_cases(options: SuiteOptions, workers: int) -> list[Case]:
    """Scenario 5 for one LiteLLM size, paired with Corvex REST under the same load so the
    ratio compares runs made moments apart. ignore_eos is not sent to LiteLLM: the canned
    backend answers max_tokens tokens anyway."""
    load = _load(options, THROUGHPUT_CONCURRENCY)
    plural = "s" if workers > 1 else ""
    return [
        Case(f"peer.corvex-vs-{workers}w", f"Corvex REST (paired with LiteLLM {workers}w)",
             "peer", "corvex", "rest", NON_STREAM, load),
        Case(f"peer.litellm-{workers}w", f"LiteLLM proxy, {workers} worker{plural}", "peer",
             f"litellm-{workers}w", "rest", msgspec.structs.replace(NON_STREAM, ignore_eos=False),
             load),
    ]  # fmt: skip


# ---- running them ------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _summary(runs: list[LoadResult]) -> dict[str, Spread]:
    def over(metric: str) -> Spread:
        return spread(float(getattr(run, metric)) for run in runs)

    result = {
        "requests_per_s": over("requests_per_s"),
        "output_tokens_per_s": over("output_tokens_per_s"),
        "server_cpu_per_request_us": over("server_cpu_per_request_us"),
        "server_cpu_per_token_us": over("server_cpu_per_token_us"),
        "e2e_p50_ms": spread(r.e2e.p50_ms for r in runs),
        "e2e_p90_ms": spread(r.e2e.p90_ms for r in runs),
        "e2e_p99_ms": spread(r.e2e.p99_ms for r in runs),
        "ttft_p50_ms": spread(r.ttft.p50_ms for r in runs),
        "itl_p50_ms": spread(r.itl.p50_ms for r in runs),
        "chunks_per_token": spread(r.chunks / r.completion_tokens for r in runs
                                   if r.completion_tokens),
        "errors": spread(float(sum(r.errors.values()) + r.dropped) for r in runs),
        "loadgen_cpu_per_request_us": spread(r.loadgen_cpu_s / r.ok * 1e6 for r in runs if r.ok),
    }  # fmt: skip
    for process in runs[0].cpu if runs else {}:
        result[f"cpu_{process}_per_request_us"] = spread(
            r.cpu[process].per_request_us for r in runs
        )
        result[f"cpu_{process}_per_token_us"] = spread(r.cpu[process].per_token_us for r in runs)
        result[f"cpu_{process}_system_share"] = spread(
            r.cpu[process].system_s / r.cpu[process].cpu_s
            for r in runs
            if r.cpu[process].cpu_s >= MIN_CPU_S
        )
    return result


def run_one(case: Case, system: System, progress: bool | None, label: str) -> LoadResult:
    workload = msgspec.structs.replace(case.workload, api_keys=system.api_keys)
    result = loadgen.run(
        system.endpoint(case.endpoint),
        workload,
        case.load,
        watch=system.processes,
        label=label,
        progress=progress,
    )
    errors = f"  errors {result.errors}" if result.errors or result.dropped else ""
    _say(
        f"{label}: {result.requests_per_s:,.0f} req/s  {result.output_tokens_per_s:,.0f} tok/s  "
        f"p50 {result.e2e.p50_ms:.2f} ms  server CPU {result.server_cpu_per_request_us:,.0f} "
        f"µs/req{errors}"
    )
    return result


def run_cases(
    cases: list[Case],
    running: Mapping[str, System],
    repeats: int,
    options: SuiteOptions,
    results: dict[str, CaseResult],
) -> None:
    """Runs every case `repeats` times, interleaved; adds their results to `results`."""
    runs: dict[str, list[LoadResult]] = {case.name: [] for case in cases}
    for repeat in range(repeats):
        for index, case in enumerate(cases, 1):
            label = f"[{repeat + 1}/{repeats} {index}/{len(cases)}] {case.title}"
            runs[case.name].append(run_one(case, running[case.system], options.progress, label))
    for case in cases:
        results[case.name] = CaseResult(case, runs[case.name], _summary(runs[case.name]))


CORVEX_VARIANTS = {
    "corvex": CorvexVariant(),
    "corvex-unmetered": CorvexVariant(metered=False),
    "corvex-nofsync": CorvexVariant(journal="nofsync"),
    "corvex-nojournal": CorvexVariant(journal="off"),
    "corvex-tpot1": CorvexVariant(tpot_ms=1.0),
}


@contextlib.contextmanager
def main_systems(workdir: Path) -> Iterator[dict[str, System]]:
    """Every system of the main phase, all up at once."""
    with contextlib.ExitStack() as stack:
        running = {
            "aiohttp-canned": stack.enter_context(systems.aiohttp_canned(workdir)),
            "grpc-echo": stack.enter_context(systems.grpc_echo(workdir)),
            "skeleton-unary": stack.enter_context(systems.skeleton(workdir, "unary")),
            "skeleton-stream": stack.enter_context(systems.skeleton(workdir, "stream")),
        }
        for name, variant in CORVEX_VARIANTS.items():
            running[name] = stack.enter_context(systems.corvex(name, variant))
        _say(f"started {len(running)} systems: {', '.join(running)}")
        yield running


def _run_peer(
    options: SuiteOptions, corvex: System, workdir: Path, results: dict[str, CaseResult]
) -> str:
    """Scenario 5: each LiteLLM size in turn (it is heavy), interleaved with Corvex REST;
    returns a note for the report."""
    try:
        version = peer.ensure_installed()
    except peer.PeerUnavailable as exc:
        return f"LiteLLM peer skipped: {exc}"
    with systems.aiohttp_canned(workdir) as backend:
        assert backend.http_url
        for workers in PEER_WORKERS:
            try:
                with peer.litellm(backend.http_url, workers, workdir) as proxy:
                    running = {"corvex": corvex, proxy.name: proxy}
                    cases = peer_cases(options, workers)
                    run_cases(cases, running, options.repeats, options, results)
            except peer.PeerUnavailable as exc:
                return f"LiteLLM {version} peer incomplete: {exc}"
    return (
        f"LiteLLM {version} proxy (uvicorn workers) in front of the canned aiohttp backend, "
        "each run paired with a Corvex REST run under the same load"
    )


def run_suite(options: SuiteOptions) -> SuiteResult:
    """The whole suite. See the module docstring for the order."""
    started = time.time()
    results: dict[str, CaseResult] = {}
    notes: list[str] = []
    _say("microbenchmarks ...")
    iterations = 5_000 if options.quick else 20_000
    micro_result = micro.run(iterations=iterations, repeats=max(options.repeats, 3))
    with tempfile.TemporaryDirectory(prefix="corvex-bench-") as tmp:
        workdir = Path(tmp)
        with main_systems(workdir) as running:
            run_cases(main_cases(options), running, options.repeats, options, results)
            capacity_rps = results["corvex.rest"].summary["requests_per_s"].median
            equal = equal_load_cases(options, capacity_rps)
            run_cases(equal, running, options.repeats, options, results)
            run_cases(open_loop_cases(options, capacity_rps), running, 1, options, results)
            run_cases(sweep_cases(options), running, 1, options, results)
            if options.peer:
                notes.append(_run_peer(options, running["corvex"], workdir, results))
        run_paced(options, workdir, results, PACED_STREAMS)
    found = run_capacity(options) if options.capacity else []
    notes += [capacity.describe(c) for c in found]
    derived = derive({name: r.runs for name, r in results.items()}, micro_result, found)
    return SuiteResult(
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        elapsed_s=time.time() - started,
        options=options,
        machine=machine.describe(),
        cases=results,
        micro=micro_result,
        derived=derived,
        goals=goals(derived),
        notes=notes,
        capacity=found,
    )
