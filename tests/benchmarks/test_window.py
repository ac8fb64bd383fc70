"""A continuous run's window counts the part of each request inside it: made-up samples on a
made-up clock. No load, no timing."""

from __future__ import annotations

import pytest

from benchmarks.loadgen import Window
from benchmarks.targets import OK, Sample


def _stream(tokens: int, ttft_s: float, gap_s: float, tokens_per_event: int = 1) -> Sample:
    events = tokens // tokens_per_event
    gaps = [gap_s] * (events - 1)
    return Sample(OK, ttft_s + sum(gaps) + 0.001, ttft_s, gaps, 10, tokens, events)


def _window(start: float, end: float) -> Window:
    window = Window()
    window.start, window.end = start, end
    return window


def test_a_request_across_both_edges_counts_its_inside_part() -> None:
    window = _window(10.0, 20.0)
    # Sent at 5 s, first token at 6 s, then one every second: tokens at 6, 7, ..., 25.
    window.add(_stream(20, 1.0, 1.0), sent_at=5.0)
    assert window.tokens == 10  # 10, 11, ..., 19
    assert window.requests == 0  # it ended after the window


def test_coalesced_events_spread_a_request_s_tokens_evenly() -> None:
    window = _window(0.0, 2.5)
    window.add(_stream(8, 1.0, 1.0, tokens_per_event=2), sent_at=0.0)  # events at 1, 2, 3, 4
    assert window.tokens == pytest.approx(4)  # two events of two tokens


def test_requests_that_end_inside_count_and_failures_do_not() -> None:
    window = _window(0.0, 100.0)
    window.add(_stream(4, 0.1, 0.1), sent_at=1.0)
    window.add(Sample("http_429", 0.01), sent_at=2.0)
    window.add(Sample(OK, 0.5, 0.5, [], 10, 16, 1), sent_at=3.0)  # non-streamed: one event
    assert (window.requests, window.tokens) == (2, 4 + 16)
