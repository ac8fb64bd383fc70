"""What the runs mean: ratios measured in the same suite (per repeat where the runs were
interleaved), the derived figures each goal of issue 8 is judged by, and the goals' status.
Pure functions of the results; nothing here runs load."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import msgspec

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


def derive(runs: Runs, micro: MicroResult) -> dict[str, Spread]:
    """Every derived figure, keyed by a name the report and the README use."""
    return {
        **_throughput(runs),
        **_latency(runs, micro),
        **_metering(runs, micro),
        **_durability(runs),
        **_streaming(runs),
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
    ]  # fmt: skip


def _percent(value: Spread) -> Spread:
    return Spread(value.median * 100, value.min * 100, value.max * 100, value.n)
