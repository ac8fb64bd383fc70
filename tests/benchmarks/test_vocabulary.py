"""TTFT, ITL, TPOT and goodput from per-request figures made up here: no load, no timing."""

from __future__ import annotations

import math

import pytest

from benchmarks.vocabulary import RequestTable, Slo, goodput, request_itl_s, request_tpot_s


def test_tpot_spreads_decode_time_over_the_tokens_after_the_first() -> None:
    # 1 s end to end, first token at 0.1 s, 10 tokens: 9 more tokens in 0.9 s.
    assert request_tpot_s(1.0, 0.1, 10) == pytest.approx(0.1)
    assert math.isnan(request_tpot_s(1.0, 0.1, 1))


def test_itl_of_a_request_is_its_mean_gap() -> None:
    assert request_itl_s([0.02, 0.04]) == pytest.approx(0.03)
    assert math.isnan(request_itl_s([]))


def _table() -> RequestTable:
    table = RequestTable()
    table.add(0.010, 1.000, [0.020] * 49, 50)  # fast
    table.add(0.300, 1.300, [0.020] * 49, 50)  # slow first token
    table.add(0.010, 2.500, [0.050] * 49, 50)  # slow decode
    table.add(None, 0.500, [], 16)  # non-streamed: TTFT is E2E, no ITL or TPOT
    return table


def test_goodput_counts_requests_meeting_every_objective() -> None:
    result = goodput(_table(), Slo(ttft_ms=100, itl_ms=25), failed=0, duration_s=2.0)
    # the fast one, and the non-streamed one (TTFT 500 ms misses: not good)
    assert result.good_requests == 1
    assert result.requests_per_s == pytest.approx(0.5)
    assert result.output_tokens_per_s == pytest.approx(25)
    assert result.share == pytest.approx(1 / 4)


def test_a_metric_a_request_lacks_cannot_miss_its_objective() -> None:
    result = goodput(_table(), Slo(tpot_ms=25, e2e_ms=1500), failed=0, duration_s=1.0)
    assert result.good_requests == 3  # fast, slow first token, non-streamed
    assert result.output_tokens_per_s == pytest.approx(50 + 50 + 16)


def test_failed_requests_are_never_good() -> None:
    result = goodput(_table(), Slo(e2e_ms=10_000), failed=4, duration_s=1.0)
    assert (result.good_requests, result.share) == (4, 0.5)


def test_slo_description_names_what_is_set() -> None:
    assert Slo().describe() == "none" and not Slo().is_set()
    assert Slo(ttft_ms=200, tpot_ms=25).describe() == "TTFT ≤ 200 ms, TPOT ≤ 25 ms"
