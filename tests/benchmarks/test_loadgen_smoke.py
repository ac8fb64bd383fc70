"""The load generator against the real stack: a handful of requests per mode, checking that
what it counts (requests, tokens, chunks, errors, keys used) is what the server did. No
timing is asserted: timings belong to the benchmarks."""

from __future__ import annotations

import pytest

from benchmarks import loadgen
from benchmarks.loadgen import LoadSpec
from benchmarks.targets import Endpoint
from benchmarks.workload import Lengths, Workload
from corvex.v1 import accounts_pb2
from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, new_account

pytestmark = pytest.mark.e2e


def _watch(stack: Stack) -> dict[str, int]:
    assert stack.edge is not None
    return {"edge": stack.edge.pid, "core": stack.core.pid}


def test_rest_non_streaming_counts_requests_and_tokens(stack: Stack, admin: Client) -> None:
    key = new_account(admin).secret
    workload = Workload(max_tokens=Lengths.fixed(8), api_keys=(key,))
    result = loadgen.run(
        Endpoint("rest", stack.http_url), workload, LoadSpec(concurrency=4, requests=20),
        watch=_watch(stack), progress=False,
    )  # fmt: skip
    assert (result.sent, result.ok, result.errors, result.dropped) == (20, 20, {}, 0)
    assert result.completion_tokens == 20 * 8
    assert result.prompt_tokens > 20 * 64  # 64 words plus the chat template, per request
    assert result.chunks == 20
    assert result.e2e.count == result.ttft.count == 20
    assert set(result.cpu) == {"edge", "core"}


def test_rest_streaming_counts_events_and_gaps(stack: Stack, admin: Client) -> None:
    key = new_account(admin).secret
    workload = Workload(stream=True, max_tokens=Lengths.fixed(12), api_keys=(key,))
    result = loadgen.run(
        Endpoint("rest", stack.http_url), workload, LoadSpec(concurrency=2, requests=10),
        progress=False,
    )  # fmt: skip
    assert (result.ok, result.errors) == (10, {})
    assert result.completion_tokens == 10 * 12
    assert 10 <= result.chunks <= 10 * 12
    assert result.ttft.count == 10
    assert result.itl.count == result.chunks - 10  # one gap between consecutive events


def test_grpc_counts_chunks_and_tokens(stack: Stack, admin: Client) -> None:
    key = new_account(admin).secret
    workload = Workload(max_tokens=Lengths.fixed(8), api_keys=(key,))
    result = loadgen.run(
        Endpoint("grpc", stack.grpc_address), workload, LoadSpec(concurrency=3, requests=9),
        progress=False,
    )  # fmt: skip
    assert (result.ok, result.errors) == (9, {})
    assert result.completion_tokens == 9 * 8
    assert 9 <= result.chunks <= 9 * 8


@pytest.mark.parametrize("kind", ["rest", "grpc"])
def test_errors_are_counted_by_status(stack: Stack, kind: str) -> None:
    address = stack.http_url if kind == "rest" else stack.grpc_address
    workload = Workload(api_keys=("corvex-not-a-key",))
    result = loadgen.run(
        Endpoint("rest" if kind == "rest" else "grpc", address), workload,
        LoadSpec(concurrency=2, requests=5), progress=False,
    )  # fmt: skip
    expected = "http_401" if kind == "rest" else "grpc_UNAUTHENTICATED"
    assert (result.sent, result.ok, result.errors) == (5, 0, {expected: 5})
    assert result.completion_tokens == 0


def test_open_loop_and_keys_in_turn(stack: Stack, admin: Client) -> None:
    accounts = [new_account(admin), new_account(admin)]
    workload = Workload(max_tokens=Lengths.fixed(4), api_keys=tuple(a.secret for a in accounts))
    spec = LoadSpec(concurrency=64, rate_rps=200.0, requests=10, duration_s=10.0)
    result = loadgen.run(Endpoint("rest", stack.http_url), workload, spec, progress=False)
    assert result.mode == "open"
    assert (result.sent, result.ok, result.dropped, result.errors) == (10, 10, 0, {})
    for account in accounts:
        usage = admin.GetUsage(accounts_pb2.GetUsageRequest(workspace_id=account.workspace_id))
        assert [(row.model, row.requests) for row in usage.rows] == [(MODEL, 5)]


def test_steady_closed_loop_measures_only_after_the_warmup(stack: Stack, admin: Client) -> None:
    account = new_account(admin)
    workload = Workload(stream=True, max_tokens=Lengths.fixed(6), api_keys=(account.secret,))
    spec = LoadSpec(concurrency=4, requests=12, warmup_requests=8, continuous=True, ramp_s=0.05)
    result = loadgen.run(
        Endpoint("rest", stack.http_url), workload, spec, watch=_watch(stack), progress=False
    )
    assert (result.sent, result.ok, result.errors) == (12, 12, {})
    assert result.completion_tokens == 12 * 6
    assert result.tpot.count == 12
    assert result.memory is not None and set(result.memory.before_bytes) == {"edge", "core"}
    usage = admin.GetUsage(accounts_pb2.GetUsageRequest(workspace_id=account.workspace_id))
    # The warm-up's 8 were sent too, and clients still warming up when the measured part
    # began finished their request.
    assert 8 + 12 <= sum(row.requests for row in usage.rows) <= 8 + 3 + 12
