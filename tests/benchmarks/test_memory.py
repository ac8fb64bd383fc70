"""RSS figures: reading this process's VmRSS, streams per 1,000 and the soak's slope on made-up
traces. No load, no timing."""

from __future__ import annotations

import os

import pytest

from benchmarks import memory
from benchmarks.memory import MIB


def test_rss_of_this_process_is_read_and_a_gone_process_has_none() -> None:
    assert memory.rss_bytes(os.getpid()) > 10 * MIB
    assert memory.tree_rss_bytes(memory.tree_pids(os.getpid())) >= memory.rss_bytes(os.getpid())
    assert memory.rss_bytes(2**22 + 12345) == 0  # above pid_max's default: never a process


def test_per_thousand_streams() -> None:
    assert memory.per_thousand_streams_mib(100 * MIB, 150 * MIB, 500) == pytest.approx(100)


def test_slope_is_least_squares() -> None:
    times = [0.0, 60.0, 120.0, 180.0]
    assert memory.slope_per_s(times, [10.0, 12.0, 14.0, 16.0]) == pytest.approx(2 / 60)
    assert memory.slope_per_s([0.0], [1.0]) == 0.0


def test_a_flat_trace_with_noise_is_flat() -> None:
    times = [float(t) for t in range(0, 600, 10)]
    noisy = [int((200 + (1.5 if i % 2 else -1.5)) * MIB) for i in range(len(times))]
    result = memory.flatness(times, noisy)
    assert result.flat and abs(result.slope_mib_per_min) < 0.1


def test_a_leak_is_not_flat() -> None:
    times = [float(t) for t in range(0, 600, 10)]
    leaking = [int((200 + t / 60) * MIB) for t in times]  # 1 MiB a minute: ~10 MiB in 10 min
    result = memory.flatness(times, leaking)
    assert not result.flat
    assert result.slope_mib_per_min == pytest.approx(1.0)
    assert result.fitted_growth_mib == pytest.approx(9.83, abs=0.01)
