"""The capacity search on made-up stacks: which concurrencies it tries and what it finds.
No load, no timing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks.capacity import GRID, Probe, search

STEP_MS = 20.0


def stack(knee: int, *, errors_from: int | None = None) -> tuple[Callable[[int], Probe], list[int]]:
    """A stack that keeps the step up to `knee` streams and stretches it beyond, like a CPU
    that saturates; returns the measure function and the concurrencies it was asked for."""
    asked: list[int] = []

    def measure(concurrency: int) -> Probe:
        asked.append(concurrency)
        itl = STEP_MS * max(1.0, concurrency / knee)
        errors = 1 if errors_from is not None and concurrency >= errors_from else 0
        return Probe(concurrency, concurrency * 1000 / itl, itl, errors,
                     {"core": 50.0, "edge": 40.0})  # fmt: skip

    return measure, asked


def test_grid_first_then_bisection_between_the_last_hold_and_first_fall() -> None:
    measure, asked = stack(700)
    result = search(measure, step_ms=STEP_MS, max_search=10)
    assert asked[:3] == list(GRID)
    assert all(256 < c < 1024 for c in asked[3:])
    lo, hi = result.bracket
    assert lo <= 770 < hi and hi <= lo * 1.1 + 1  # 770: 10% over the knee still holds
    assert result.capacity is not None and result.capacity.concurrency == lo
    assert not result.above_grid


def test_the_search_is_bounded() -> None:
    measure, asked = stack(700)
    search(measure, step_ms=STEP_MS, max_search=2)
    assert len(asked) == len(GRID) + 2


def test_everything_holds_capacity_is_at_least_the_grid_top() -> None:
    measure, asked = stack(10_000)
    result = search(measure, step_ms=STEP_MS)
    assert asked == list(GRID)
    assert result.above_grid and result.capacity is not None
    assert result.capacity.concurrency == 1024


def test_nothing_holds_the_search_goes_below_the_grid() -> None:
    measure, asked = stack(20)
    result = search(measure, step_ms=STEP_MS)
    assert asked[3] == 32  # half of the first failure
    assert result.capacity is None or result.capacity.concurrency < 64


def test_errors_fail_a_probe_whatever_its_latency() -> None:
    measure, _ = stack(10_000, errors_from=256)
    result = search(measure, step_ms=STEP_MS, max_search=10)
    assert result.capacity is not None and result.capacity.concurrency < 256
    assert result.bracket[1] <= 256


def test_cpu_and_memory_figures_of_a_probe() -> None:
    probe = Probe(1000, 1.0, 20.0, 0, {"core": 50.0, "edge": 40.0},
                  {"core": 100 << 20}, {"core": 150 << 20})  # fmt: skip
    assert probe.cpu_total_per_token_us() == 90.0
    assert probe.rss_per_thousand_streams_mib("core") == 50.0


def test_capacity_figures_and_goals_from_a_search() -> None:
    from benchmarks.analysis import capacity_figures, goals
    from benchmarks.stats import spread

    measure, _ = stack(700)
    found = search(measure, step_ms=STEP_MS, max_search=10)
    for probe in found.probes:
        probe.rss_idle_bytes = {"core": 100 << 20}
        probe.rss_peak_bytes = {"core": (100 << 20) + probe.concurrency * (1 << 20) // 10}
    figures = capacity_figures([found])
    assert figures["capacity_streams"].median == found.bracket[0]
    assert figures["capacity_cpu_per_token_us_c256"].median == 90.0
    assert figures["rss_core_per_1000_streams_mib"].median == pytest.approx(100, rel=0.01)
    empty = {name: spread([]) for name in ("rest_vs_skeleton_throughput",
             "rest_vs_litellm_1w_throughput", "added_latency_p50_ms",
             "metering_logic_cpu_share_rest", "journal_fsync_cpu_share",
             "stream_cpu_per_token_us")}  # fmt: skip
    by_name = {g.goal: g for g in goals({**empty, **figures})}
    node = by_name["Node capacity, 1 core + 1 edge: output tok/s, ITL p50 within 10% of the step"]
    assert node.status == "measured"
    assert by_name["Node load (256 paced streams, 20 ms): core CPU per streamed token"].status == (
        "not measured"
    )


def test_events_that_arrive_in_bursts_do_not_hold() -> None:
    # A stack that fell behind can deliver a stream's events several at once: the p50 gap is
    # then ~0, which is not "within 10% of the step".
    bursts = Probe(1024, 12_000.0, 0.01, 0)
    assert not bursts.sustains(STEP_MS)
    assert Probe(64, 3_000.0, STEP_MS * 0.95, 0).sustains(STEP_MS)
    assert not Probe(64, 3_000.0, STEP_MS * 1.2, 0).sustains(STEP_MS)
