"""The PNG charts of a suite: latency percentiles against load (open loop, and closed loop
by concurrency) and throughput against concurrency, Corvex beside the skeleton ceiling; CPU
per streamed token and inter-token latency against concurrency at node load (the capacity
search); RSS over a soak."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG files
import matplotlib.pyplot as plt

from benchmarks.capacity import Capacity
from benchmarks.loadgen import LoadResult
from benchmarks.memory import MIB
from benchmarks.scenarios import SWEEP_CONCURRENCY, THROUGHPUT_CONCURRENCY, CaseResult

if TYPE_CHECKING:
    from benchmarks.soak import SoakResult

Points = list[tuple[int, list[LoadResult]]]


def _series(cases: Mapping[str, CaseResult], c1: str, c32: str, sweep: str) -> Points:
    """(concurrency, runs) of one system, from the latency, main and sweep cases."""
    names = {1: c1, THROUGHPUT_CONCURRENCY: c32}
    names.update({c: f"sweep.{sweep}.c{c}" for c in SWEEP_CONCURRENCY})
    return sorted((c, cases[n].runs) for c, n in names.items() if n in cases)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def throughput_vs_concurrency(cases: Mapping[str, CaseResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, series in (
        ("Corvex REST (metered)", _series(cases, "latency.corvex-rest", "corvex.rest", "corvex")),
        ("aiohttp→grpc skeleton", _series(cases, "latency.skeleton", "ceiling.skeleton",
                                          "skeleton-unary")),
    ):  # fmt: skip
        xs = [c for c, _ in series]
        values = [[r.requests_per_s for r in runs] for _, runs in series]
        mids = [_median(v) for v in values]
        low = [m - min(v) for m, v in zip(mids, values, strict=True)]
        high = [max(v) - m for m, v in zip(mids, values, strict=True)]
        ax.errorbar(xs, mids, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("requests/s (non-streaming, 16 tokens)")
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_vs_load(cases: Mapping[str, CaseResult], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    open_runs = sorted(
        (r for name, case in cases.items() if name.startswith("open.") for r in case.runs),
        key=lambda r: r.rate_rps or 0,
    )
    closed = _series(cases, "latency.corvex-rest", "corvex.rest", "corvex")
    for attr, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
        left.plot(
            [r.rate_rps or 0 for r in open_runs],
            [getattr(r.e2e, attr) for r in open_runs],
            style,
            label=attr[:3],
        )
        right.plot([c for c, _ in closed],
                   [_median([getattr(r.e2e, attr) for r in runs]) for _, runs in closed],
                   style, label=attr[:3])  # fmt: skip
    left.set_xlabel("offered load, requests/s (Poisson arrivals)")
    left.set_title("Corvex REST, open loop")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients (closed loop)")
    right.set_title("Corvex REST, closed loop")
    for ax in (left, right):
        ax.set_ylabel("end-to-end latency, ms")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(cases: Mapping[str, CaseResult], out: Path) -> list[Path]:
    paths = [out / "throughput_vs_concurrency.png", out / "latency_vs_load.png"]
    throughput_vs_concurrency(cases, paths[0])
    latency_vs_load(cases, paths[1])
    return paths


def capacity_chart(results: Sequence[Capacity], path: Path) -> Path:
    """Left: CPU per output token of core, edge and both against concurrent paced streams.
    Right: ITL p50 against the same, with the step and the 10% bound, and output tok/s."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    tok_axis = right.twinx()
    for result in results:
        probes = sorted(result.probes, key=lambda p: p.concurrency)
        xs = [p.concurrency for p in probes]
        prefix = f"{result.shape}: " if len(results) > 1 else ""
        for process in sorted({k for p in probes for k in p.cpu_per_token_us}):
            values = [p.cpu_per_token_us.get(process, float("nan")) for p in probes]
            left.plot(xs, values, "o--", label=f"{prefix}{process}")
        left.plot(xs, [p.cpu_total_per_token_us() for p in probes], "s-",
                  label=f"{prefix}core + edge")  # fmt: skip
        right.plot(xs, [p.itl_p50_ms for p in probes], "o-", label=f"{prefix}ITL p50")
        tok_axis.plot(xs, [p.output_tokens_per_s for p in probes], "^:", color="grey",
                      label=f"{prefix}output tok/s")  # fmt: skip
        right.axhline(result.step_ms, color="green", linewidth=0.8, label="engine step")
        bound = result.step_ms * (1 + result.tolerance)
        right.axhline(bound, color="red", linewidth=0.8, linestyle="--",
                      label=f"step + {result.tolerance:.0%}")  # fmt: skip
    ticks = sorted({p.concurrency for result in results for p in result.probes})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent paced streams (closed loop)")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("server CPU per output token, µs")
    left.set_title("CPU per streamed token (one SSE event per token)")
    right.set_ylabel("inter-token latency p50, ms")
    tok_axis.set_ylabel("output tok/s")
    right.set_title("Node capacity: ITL p50 against the step")
    left.legend()
    handles = right.get_legend_handles_labels()
    more = tok_axis.get_legend_handles_labels()
    right.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def soak_chart(result: SoakResult, path: Path) -> Path:
    """RSS of each process over the soak, with its least-squares line."""
    trace = result.run.memory
    assert trace is not None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    minutes = [t / 60 for t in trace.times_s]
    for name, samples in trace.samples_bytes.items():
        flat = result.flatness.get(name)
        label = name if flat is None else f"{name} ({flat.slope_mib_per_min:+.3f} MiB/min)"
        ax.plot(minutes, [v / MIB for v in samples], label=label)
    ax.axvline(result.warmup_minutes, color="grey", linestyle=":", label="end of the warm-up")
    ax.set_xlabel("minutes into the load")
    ax.set_ylabel("RSS, MiB")
    ax.set_title(f"RSS over a soak: {result.streams} paced streams")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
