"""What the runs mean: ratios measured in the same suite (per repeat where the runs were
interleaved), the derived figures each goal of issue 8 is judged by, and the goals' status.
Pure functions of the results; nothing here runs load."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import msgspec

from benchmarks.capacity import Capacity
from benchmarks.loadgen import LoadResult
from benchmarks.micro import MicroResult
from benchmarks.stats import Spread, spread

Runs = Mapping[str, Sequence[LoadResult]]
Metric = Callable[[LoadResult], float]


class Goal(msgspec.Struct):
    """One goal of the issue and where it stands."""

    goal: str
    target: str
    measured: str
    status: Literal["met", "missed", "not measured", "measured"]
    gap: str


def rps(run: LoadResult) -> float:
    return run.requests_per_s


def server_cpu(run: LoadResult) -> float:
    return run.server_cpu_per_request_us


def core_cpu(run: LoadResult) -> float:
    return run.cpu["core"].per_request_us if "core" in run.cpu else math.nan


def p50(run: LoadResult) -> float:
    return run.e2e.p50_ms


def paired(
    runs: Runs, a: str, b: str, metric: Metric, combine: Callable[[float, float], float]
) -> Spread:
    """combine(metric(a), metric(b)) for each repeat, a's i-th run with b's i-th run."""
    if a not in runs or b not in runs:
        return spread([])
    return spread(combine(metric(x), metric(y)) for x, y in zip(runs[a], runs[b], strict=False))


def _ratio(x: float, y: float) -> float:
    return x / y if y else math.nan


def _share_saved(with_it: float, without: float) -> float:
    """The share of `with_it` that goes away without the feature."""
    return (with_it - without) / with_it if with_it else math.nan


def _of(runs: Runs, name: str, metric: Metric) -> Spread:
    return spread(metric(run) for run in runs.get(name, ()))


def _throughput(runs: Runs) -> dict[str, Spread]:
    return {
        "rest_vs_skeleton_throughput": paired(runs, "corvex.rest", "ceiling.skeleton", rps, _ratio),
        "rest_vs_skeleton_fold_throughput": paired(
            runs, "corvex.rest", "ceiling.skeleton-fold", rps, _ratio
        ),
        "rest_vs_aiohttp_throughput": paired(runs, "corvex.rest", "ceiling.aiohttp", rps, _ratio),
        "rest_vs_litellm_1w_throughput": paired(
            runs, "peer.corvex-vs-1w", "peer.litellm-1w", rps, _ratio
        ),
        "rest_vs_litellm_2w_throughput": paired(
            runs, "peer.corvex-vs-2w", "peer.litellm-2w", rps, _ratio
        ),
        "grpc_vs_rest_throughput": paired(runs, "corvex.grpc", "corvex.rest", rps, _ratio),
    }


def _latency(runs: Runs, micro: MicroResult) -> dict[str, Spread]:
    engine_ms = micro.engine_call.p50_ms
    return {
        "engine_in_process_p50_ms": spread([engine_ms]),
        "added_latency_p50_ms": _of(runs, "latency.corvex-rest", lambda r: p50(r) - engine_ms),
        "added_latency_grpc_p50_ms": _of(runs, "latency.corvex-grpc", lambda r: p50(r) - engine_ms),
        "added_latency_unmetered_p50_ms": _of(
            runs, "latency.unmetered", lambda r: p50(r) - engine_ms
        ),
        "added_latency_nojournal_p50_ms": _of(
            runs, "latency.nojournal", lambda r: p50(r) - engine_ms
        ),
        "skeleton_latency_p50_ms": _of(runs, "latency.skeleton", p50),
        "skeleton_fold_latency_p50_ms": _of(runs, "latency.skeleton-fold", p50),
    }


EQ_ON, EQ_OFF = "equal.corvex.rest", "equal.corvex-unmetered.rest"
EQ_GRPC_ON, EQ_GRPC_OFF = "equal.corvex.grpc", "equal.corvex-unmetered.grpc"
EQ_NOFSYNC, EQ_NOJOURNAL = "equal.corvex-nofsync.rest", "equal.corvex-nojournal.rest"


def _metering(runs: Runs, micro: MicroResult) -> dict[str, Spread]:
    """Metering on vs off at equal load (same arrival rate), plus the closed-loop
    throughput ratio and the in-process cost of the accounting calls."""
    ops = micro.ns_per_op
    accounting_ns = ops["Meter.admit + settle"].median + ops["authenticate (Bearer → key)"].median
    core_us = _of(runs, EQ_ON, core_cpu).median
    return {
        "metering_cpu_share_rest": paired(runs, EQ_ON, EQ_OFF, server_cpu, _share_saved),
        "metering_cpu_share_rest_core": paired(runs, EQ_ON, EQ_OFF, core_cpu, _share_saved),
        "metering_cpu_share_grpc": paired(runs, EQ_GRPC_ON, EQ_GRPC_OFF, core_cpu, _share_saved),
        "metering_logic_cpu_share_rest": paired(
            runs, EQ_NOJOURNAL, EQ_OFF, server_cpu, _share_saved
        ),
        "metering_latency_ratio_rest_p50": paired(runs, EQ_ON, EQ_OFF, p50, _ratio),
        "metering_latency_ratio_grpc_p50": paired(runs, EQ_GRPC_ON, EQ_GRPC_OFF, p50, _ratio),
        "metering_throughput_ratio_rest": paired(
            runs, "corvex.rest", "unmetered.rest", rps, _ratio
        ),
        "accounting_ns_per_request": spread([accounting_ns]),
        "accounting_share_of_core_cpu": spread([accounting_ns / 1000 / core_us])
        if core_us
        else spread([]),
    }


def _durability(runs: Runs) -> dict[str, Spread]:
    """Journal with fsync vs without vs disabled, at equal load."""
    return {
        "journal_fsync_core_cpu_us": _of(runs, EQ_ON, core_cpu),
        "journal_nofsync_core_cpu_us": _of(runs, EQ_NOFSYNC, core_cpu),
        "journal_off_core_cpu_us": _of(runs, EQ_NOJOURNAL, core_cpu),
        "journal_fsync_cpu_share": paired(runs, EQ_ON, EQ_NOJOURNAL, server_cpu, _share_saved),
        "journal_nofsync_cpu_share": paired(
            runs, EQ_NOFSYNC, EQ_NOJOURNAL, server_cpu, _share_saved
        ),
        "journal_fsync_latency_ratio_p50": paired(runs, EQ_ON, EQ_NOJOURNAL, p50, _ratio),
        "journal_nofsync_latency_ratio_p50": paired(runs, EQ_NOFSYNC, EQ_NOJOURNAL, p50, _ratio),
    }


def _streaming(runs: Runs) -> dict[str, Spread]:
    name = "streaming.per-token"
    per_token = _of(runs, name, lambda r: r.server_cpu_per_token_us)
    return {
        "stream_cpu_per_token_us": per_token,
        "stream_chunks_per_token": _of(
            runs, name, lambda r: r.chunks / r.completion_tokens if r.completion_tokens else 0
        ),
        "stream_tokens_per_s_per_core": _of(
            runs, name, lambda r: _ratio(1e6, r.server_cpu_per_token_us)
        ),
        "stream_coalesced_cpu_per_token_us": _of(
            runs, "corvex.rest-stream", lambda r: r.server_cpu_per_token_us
        ),
        "skeleton_stream_cpu_per_token_us": _of(
            runs, "ceiling.skeleton-stream", lambda r: r.server_cpu_per_token_us
        ),
        "grpc_stream_cpu_per_message_us": _of(
            runs, "ceiling.grpc-stream", lambda r: r.server_cpu_per_token_us
        ),
    }


P_CORVEX, P_CORVEX_GRPC = "paced.corvex", "paced.corvex-grpc"
P_SKELETON, P_ECHO = "paced.skeleton", "paced.grpc-echo"
P_CORVEX_CALLS = "paced.corvex-calls"


def cpu_per_token(process: str) -> Metric:
    def metric(run: LoadResult) -> float:
        return run.cpu[process].per_token_us if process in run.cpu else math.nan

    return metric


def server_cpu_per_token(run: LoadResult) -> float:
    return run.server_cpu_per_token_us


def tokens_per_s(run: LoadResult) -> float:
    return run.output_tokens_per_s


def itl_p50(run: LoadResult) -> float:
    return run.itl.p50_ms


def node_load(runs: Runs) -> dict[str, Spread]:
    """Paced streams at node load: CPU per token of each process, against the paced
    ceilings round by round."""
    core, edge, server = cpu_per_token("core"), cpu_per_token("edge"), cpu_per_token("server")
    return {
        "paced_core_cpu_per_token_us": _of(runs, P_CORVEX, core),
        "paced_edge_cpu_per_token_us": _of(runs, P_CORVEX, edge),
        "paced_cpu_per_token_us": _of(runs, P_CORVEX, server_cpu_per_token),
        "paced_skeleton_core_cpu_per_token_us": _of(runs, P_SKELETON, core),
        "paced_skeleton_edge_cpu_per_token_us": _of(runs, P_SKELETON, edge),
        "paced_skeleton_cpu_per_token_us": _of(runs, P_SKELETON, server_cpu_per_token),
        "paced_vs_ceiling_cpu_per_token": paired(
            runs, P_CORVEX, P_SKELETON, server_cpu_per_token, _ratio
        ),
        "paced_core_vs_ceiling_cpu_per_token": paired(runs, P_CORVEX, P_SKELETON, core, _ratio),
        "paced_edge_vs_ceiling_cpu_per_token": paired(runs, P_CORVEX, P_SKELETON, edge, _ratio),
        "paced_grpc_core_cpu_per_token_us": _of(runs, P_CORVEX_GRPC, core),
        "paced_echo_cpu_per_token_us": _of(runs, P_ECHO, server),
        "paced_grpc_vs_echo_cpu_per_token": paired(
            runs,
            P_CORVEX_GRPC,
            P_ECHO,
            lambda r: core(r) if "core" in r.cpu else server(r),
            _ratio,
        ),
        "paced_calls_core_cpu_per_token_us": _of(runs, P_CORVEX_CALLS, core),
        "paced_calls_edge_cpu_per_token_us": _of(runs, P_CORVEX_CALLS, edge),
        "paced_streams_vs_calls_cpu_per_token": paired(
            runs, P_CORVEX, P_CORVEX_CALLS, server_cpu_per_token, _ratio
        ),
        "paced_vs_ceiling_throughput": paired(runs, P_CORVEX, P_SKELETON, tokens_per_s, _ratio),
        "paced_tokens_per_s": _of(runs, P_CORVEX, tokens_per_s),
        "paced_itl_p50_ms": _of(runs, P_CORVEX, itl_p50),
        "paced_skeleton_itl_p50_ms": _of(runs, P_SKELETON, itl_p50),
        "paced_events_per_token": _of(
            runs, P_CORVEX, lambda r: r.chunks / r.completion_tokens if r.completion_tokens else 0
        ),
    }


def capacity_figures(found: Sequence[Capacity]) -> dict[str, Spread]:
    """The first shape's capacity, CPU per token on its grid, RSS per 1,000 streams at the
    grid's largest concurrency."""
    if not found:
        return {}
    first = found[0]
    result: dict[str, Spread] = {}
    if first.capacity is not None:
        result["capacity_tokens_per_s"] = spread([first.capacity.output_tokens_per_s])
        result["capacity_streams"] = spread([float(first.capacity.concurrency)])
    for probe in first.grid_probes():
        result[f"capacity_cpu_per_token_us_c{probe.concurrency}"] = spread(
            [probe.cpu_total_per_token_us()]
        )
    # The largest concurrency of the grid: the most streams, the least extrapolated noise.
    for probe in first.grid_probes()[-1:]:
        for process in probe.rss_peak_bytes:
            result[f"rss_{process}_per_1000_streams_mib"] = spread(
                [probe.rss_per_thousand_streams_mib(process)]
            )
    return result


def derive(runs: Runs, micro: MicroResult, capacity: Sequence[Capacity] = ()) -> dict[str, Spread]:
    """Every derived figure, keyed by a name the report and the README use."""
    return {
        **_throughput(runs),
        **_latency(runs, micro),
        **_metering(runs, micro),
        **_durability(runs),
        **_streaming(runs),
        **node_load(runs),
        **capacity_figures(capacity),
    }


def _fmt(value: Spread, unit: str, digits: int = 2) -> str:
    return f"{value.median:.{digits}f}{unit} ({value.min:.{digits}f}–{value.max:.{digits}f})"


def _goal(
    name: str,
    target: str,
    value: Spread,
    unit: str,
    limit: float,
    *,
    at_least: bool,
    digits: int = 2,
) -> Goal:
    if not value.n:
        return Goal(name, target, "—", "not measured", "")
    met = value.median >= limit if at_least else value.median <= limit
    factor = limit / value.median if at_least else value.median / limit
    if met:
        gap = f"headroom {abs(1 / factor - 1):.0%}" if factor else ""
    else:
        gap = f"{factor:.2f}× short of the target"
    return Goal(name, target, _fmt(value, unit, digits), "met" if met else "missed", gap)


def goals(derived: Mapping[str, Spread]) -> list[Goal]:
    """The goals of issue 8, judged on the medians."""
    return [
        _goal("Full-stack non-streaming throughput vs the aiohttp→grpc skeleton", "≥ 0.80×",
              derived["rest_vs_skeleton_throughput"], "×", 0.8, at_least=True),
        _goal("Full-stack non-streaming throughput vs LiteLLM, 1 worker", "≥ 20×",
              derived["rest_vs_litellm_1w_throughput"], "×", 20, at_least=True, digits=1),
        _goal("Added latency at concurrency 1 (p50, minus the engine in-process)", "≤ 1 ms",
              derived["added_latency_p50_ms"], " ms", 1.0, at_least=False),
        # Scenario 3 of the issue: accounting on vs off, the journal off in both; what the
        # journal adds is scenario 4's figure, reported in the next row.
        _goal("Metering, auth and limits: share of server CPU per request", "≤ 10%",
              _percent(derived["metering_logic_cpu_share_rest"]), "%", 10, at_least=False,
              digits=1),
        Goal("Durability (journal, fsync per commit): share of server CPU per request",
             "report", _fmt(_percent(derived["journal_fsync_cpu_share"]), "%", 1),
             "measured", ""),
        _goal("Streaming: edge + core CPU per output token, one SSE event per token", "≤ 25 µs",
              derived["stream_cpu_per_token_us"], " µs", 25, at_least=False, digits=1),
        # Issue 18: 256 paced streams, 20 ms step, one token per SSE event.
        _goal("Node load (256 paced streams, 20 ms): core CPU per streamed token", "≤ 30 µs",
              derived.get("paced_core_cpu_per_token_us", spread([])), " µs", 30,
              at_least=False, digits=1),
        _goal("Node load (256 paced streams, 20 ms): edge CPU per streamed token", "≤ 30 µs",
              derived.get("paced_edge_cpu_per_token_us", spread([])), " µs", 30,
              at_least=False, digits=1),
        _goal("Node load: Corvex ÷ paced SSE skeleton, server CPU per token", "≤ 1.5×",
              derived.get("paced_vs_ceiling_cpu_per_token", spread([])), "×", 1.5,
              at_least=False),
        _measured("Node capacity, 1 core + 1 edge: output tok/s, ITL p50 within 10% of the step",
                  derived.get("capacity_tokens_per_s"), " tok/s", 0),
        _measured("Memory: core RSS per 1,000 concurrent streams",
                  derived.get("rss_core_per_1000_streams_mib"), " MiB", 1),
        _measured("Memory: edge RSS per 1,000 concurrent streams",
                  derived.get("rss_edge_per_1000_streams_mib"), " MiB", 1),
    ]  # fmt: skip


def _measured(name: str, value: Spread | None, unit: str, digits: int) -> Goal:
    if value is None or not value.n:
        return Goal(name, "report", "—", "not measured", "")
    return Goal(name, "report", _fmt(value, unit, digits), "measured", "")


def _percent(value: Spread) -> Spread:
    return Spread(value.median * 100, value.min * 100, value.max * 100, value.n)
