"""Our results in the vocabulary of the load harnesses users bring (guidellm, aiperf, vLLM's
benchmark_serving): TTFT, ITL, TPOT and E2E latency, output tok/s, requests/s, and goodput
under a service-level objective. Pure functions of per-request measurements; nothing here
sends load or reads a clock.

Per request (streamed), with `n` output tokens in `k` content events:

  TTFT   first content event − request sent
  ITL    the gaps between consecutive content events (all requests pooled: vLLM's ITL,
         aiperf's "inter chunk latency"); a request's own ITL is the mean of its gaps
  TPOT   (E2E − TTFT) / (n − 1): vLLM's TPOT, and what aiperf and guidellm call inter-token
         latency; equal to the request's ITL when every event carries one token
  E2E    last byte − request sent

A request is *good* when it succeeded and meets every objective set; goodput is good
requests (and their output tokens) per second of the run.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import msgspec


class Slo(msgspec.Struct, frozen=True, omit_defaults=True):
    """Service-level objectives, in milliseconds; None: not an objective."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.itl_ms, self.tpot_ms, self.e2e_ms))

    def describe(self) -> str:
        parts = [
            f"{name} ≤ {value:g} ms"
            for name, value in (
                ("TTFT", self.ttft_ms),
                ("ITL", self.itl_ms),
                ("TPOT", self.tpot_ms),
                ("E2E", self.e2e_ms),
            )
            if value is not None
        ]
        return ", ".join(parts) or "none"


class Goodput(msgspec.Struct):
    """Requests that met the SLO: how many, per second, their output tokens per second, and
    their share of the requests that ended (successful or not)."""

    slo: Slo
    good_requests: int
    requests_per_s: float
    output_tokens_per_s: float
    share: float


def request_tpot_s(e2e_s: float, ttft_s: float, tokens: int) -> float:
    """(E2E − TTFT) / (tokens − 1); NaN when a request has fewer than two tokens."""
    return (e2e_s - ttft_s) / (tokens - 1) if tokens > 1 else math.nan


def request_itl_s(gaps_s: Sequence[float]) -> float:
    """A request's mean gap between content events; NaN with fewer than two events."""
    return math.fsum(gaps_s) / len(gaps_s) if gaps_s else math.nan


def _meets(value_s: float, limit_ms: float | None) -> bool:
    # A metric a request does not have (TPOT of a one-token answer) cannot miss its objective.
    return limit_ms is None or math.isnan(value_s) or value_s * 1000 <= limit_ms


class RequestTable:
    """Per-request figures of a run's successful requests, in flat arrays (seconds)."""

    def __init__(self) -> None:
        self.ttft_s = array("d")
        self.e2e_s = array("d")
        self.itl_s = array("d")
        self.tpot_s = array("d")
        self.tokens = array("q")

    def add(self, ttft_s: float | None, e2e_s: float, gaps_s: Sequence[float], tokens: int) -> None:
        first = e2e_s if ttft_s is None else ttft_s
        self.ttft_s.append(first)
        self.e2e_s.append(e2e_s)
        self.itl_s.append(request_itl_s(gaps_s))
        self.tpot_s.append(request_tpot_s(e2e_s, first, tokens))
        self.tokens.append(tokens)

    def __len__(self) -> int:
        return len(self.e2e_s)

    def good(self, slo: Slo) -> tuple[int, int]:
        """(requests, output tokens) of the requests that meet every objective of `slo`."""
        requests = tokens = 0
        for i in range(len(self)):
            if (
                _meets(self.ttft_s[i], slo.ttft_ms)
                and _meets(self.itl_s[i], slo.itl_ms)
                and _meets(self.tpot_s[i], slo.tpot_ms)
                and _meets(self.e2e_s[i], slo.e2e_ms)
            ):
                requests += 1
                tokens += self.tokens[i]
        return requests, tokens

    def finite_tpot_s(self) -> list[float]:
        return [v for v in self.tpot_s if not math.isnan(v)]


def goodput(table: RequestTable, slo: Slo, failed: int, duration_s: float) -> Goodput:
    """Goodput of a run: `failed` requests ended without an answer and are never good."""
    requests, tokens = table.good(slo)
    ended = len(table) + failed
    return Goodput(
        slo=slo,
        good_requests=requests,
        requests_per_s=requests / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=tokens / duration_s if duration_s > 0 else 0.0,
        share=requests / ended if ended else 0.0,
    )
