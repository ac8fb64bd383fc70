"""The PNG charts of a suite: latency percentiles against load (open loop, and closed loop
by concurrency) and throughput against concurrency, Corvex beside the skeleton ceiling."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG files
import matplotlib.pyplot as plt

from benchmarks.loadgen import LoadResult
from benchmarks.scenarios import SWEEP_CONCURRENCY, THROUGHPUT_CONCURRENCY, CaseResult

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
