"""Two cores spending one workspace through one PostgreSQL ledger, raced by clients of every
kind at once (the OpenAI SDK through the edge, gRPC straight to each core): exactly the
affordable requests succeed, the reported costs add up to the balance change to the
nano-dollar, and account changes made on one core are in force on the other within a second.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator

import grpc
import openai
import psutil
import pytest

from corvex.v1 import accounts_pb2, inference_pb2_grpc
from corvex_core.pg.server import PgServer
from corvex_ops.admin import AdminError, Client
from corvex_ops.stack import Cluster, running_cluster
from tests.conftest import MODEL
from tests.e2e.cluster import (
    Outcome,
    cluster_config,
    cluster_database,
    fetch,
    new_workspace,
    via_edge,
    via_grpc,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 1000
# The bound of docs/deploy-cluster.md: a change on one core is in force on every other within it.
PROPAGATION_BOUND_S = 1.0


@pytest.fixture(scope="module")
def cluster(pg_server: PgServer) -> Iterator[Cluster]:
    """Two cores, and an edge of two processes sharing one port (`corvex edge --workers 2`)."""
    with (
        cluster_database(pg_server) as dsn,
        running_cluster(dsn=dsn, config=cluster_config(), edge_workers=2) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def admins(cluster: Cluster) -> Iterator[list[Client]]:
    clients = [Client(address, cluster.admin_token or "") for address in cluster.grpc_addresses]
    yield clients
    for client in clients:
        client.close()


async def race(
    cluster: Cluster, secret: str, count: int, max_tokens: int = MAX_TOKENS
) -> list[Outcome]:
    """`count` requests at once: a third through the edge, a third to each core's gRPC."""
    a, b = cluster.grpc_addresses
    async with (
        openai.AsyncOpenAI(
            base_url=cluster.http_url + "/v1", api_key=secret, max_retries=0, timeout=120
        ) as client,
        grpc.aio.insecure_channel(a) as channel_a,
        grpc.aio.insecure_channel(b) as channel_b,
    ):
        stubs = [
            inference_pb2_grpc.InferenceStub(channel_a),
            inference_pb2_grpc.InferenceStub(channel_b),
        ]
        jobs = []
        for i in range(count):
            if i % 3 == 0:
                jobs.append(via_edge(client, max_tokens))
            else:
                jobs.append(via_grpc(stubs[i % 3 - 1], secret, max_tokens))
        return await asyncio.gather(*jobs)


def workspace(admin: Client, workspace_id: str) -> accounts_pb2.Workspace:
    return admin.GetWorkspace(accounts_pb2.GetWorkspaceRequest(workspace_id=workspace_id))


def leases_back(admin: Client, workspace_id: str) -> int:
    """The credit still leased to cores once no request is in flight (near $0 every core gives
    back what its requests did not use, so it reaches 0 within a renewal)."""
    deadline = time.monotonic() + 5
    while (held := workspace(admin, workspace_id).held_nano_usd) and time.monotonic() < deadline:
        time.sleep(0.1)
    return int(held)


@pytest.fixture(scope="module")
def cost_nano(cluster: Cluster, admins: list[Client]) -> int:
    """The exact cost of one race request (every one is the same: ignore_eos, max_tokens)."""
    _, _, secret = new_workspace(admins[0], credits_cents=100)
    [(status, cost, _)] = asyncio.run(race(cluster, secret, 1))
    assert status == "ok"
    return cost


def test_a_balance_race_across_both_cores_admits_exactly_the_affordable(
    cluster: Cluster, admins: list[Client], cost_nano: int
) -> None:
    workspace_id, _, secret = new_workspace(admins[1], credits_cents=3)
    start = workspace(admins[0], workspace_id).balance_nano_usd
    affordable = start // cost_nano
    assert 15 <= affordable <= 30
    results = asyncio.run(race(cluster, secret, 300))
    succeeded = [r for r in results if r[0] == "ok"]
    assert len(succeeded) == affordable
    assert {r[0] for r in results if r[0] != "ok"} == {"insufficient_credits"}
    end = workspace(admins[1], workspace_id).balance_nano_usd
    assert sum(r[1] for r in succeeded) == start - end
    assert end >= 0 and end < cost_nano
    assert leases_back(admins[0], workspace_id) == 0
    [row] = asyncio.run(
        fetch(
            cluster.dsn,
            "SELECT count(DISTINCT core_id) AS cores, sum(cost_nano) AS cost FROM charges"
            " WHERE workspace_id = $1",
            workspace_id,
        )
    )
    assert row["cores"] == 2 and row["cost"] == start - end


def test_a_spend_cap_race_across_both_cores_stops_at_the_cap(
    cluster: Cluster, admins: list[Client], cost_nano: int
) -> None:
    workspace_id, _, secret = new_workspace(admins[0], credits_cents=10_000)
    admins[1].SetSpendCap(accounts_pb2.SetSpendCapRequest(workspace_id=workspace_id, cap_cents=3))
    start = workspace(admins[0], workspace_id).balance_nano_usd
    results = asyncio.run(race(cluster, secret, 300))
    succeeded = [r for r in results if r[0] == "ok"]
    assert len(succeeded) == (3 * 10**7) // cost_nano
    assert {r[0] for r in results if r[0] != "ok"} == {"insufficient_credits"}
    after = workspace(admins[1], workspace_id)
    assert after.month_spend_nano_usd <= 3 * 10**7
    assert sum(r[1] for r in succeeded) == start - after.balance_nano_usd
    assert leases_back(admins[0], workspace_id) == 0


def test_a_monthly_token_limit_race_across_both_cores_stops_at_the_limit(
    cluster: Cluster, admins: list[Client], cost_nano: int
) -> None:
    probe = asyncio.run(race(cluster, new_workspace(admins[0], credits_cents=100)[2], 1))
    tokens = probe[0][2]
    limit = 20 * tokens + tokens // 2
    workspace_id, key_id, secret = new_workspace(
        admins[0], credits_cents=10_000, limits=accounts_pb2.KeyLimits(monthly_tokens=limit)
    )
    start = workspace(admins[1], workspace_id).balance_nano_usd
    results = asyncio.run(race(cluster, secret, 300))
    succeeded = [r for r in results if r[0] == "ok"]
    assert len(succeeded) == 20
    assert {r[0] for r in results if r[0] != "ok"} == {"token_limit_exceeded"}
    keys = admins[1].ListKeys(accounts_pb2.ListKeysRequest(workspace_id=workspace_id)).keys
    assert [k.month_tokens for k in keys if k.id == key_id] == [20 * tokens]
    assert (
        sum(r[1] for r in succeeded) == start - workspace(admins[0], workspace_id).balance_nano_usd
    )
    [row] = asyncio.run(fetch(cluster.dsn, "SELECT tokens_leased FROM keys WHERE id = $1", key_id))
    deadline = time.monotonic() + 5
    while row["tokens_leased"] and time.monotonic() < deadline:
        time.sleep(0.1)
        [row] = asyncio.run(
            fetch(cluster.dsn, "SELECT tokens_leased FROM keys WHERE id = $1", key_id)
        )
    assert row["tokens_leased"] == 0


def test_requests_per_minute_are_shared_between_the_cores(
    cluster: Cluster, admins: list[Client]
) -> None:
    _, _, secret = new_workspace(
        admins[0], credits_cents=10_000, limits=accounts_pb2.KeyLimits(requests_per_minute=10)
    )
    started = time.monotonic()
    results = asyncio.run(race(cluster, secret, 200, max_tokens=5))
    elapsed = time.monotonic() - started
    admitted = sum(1 for r in results if r[0] == "ok")
    # docs/deploy-cluster.md: with N cores agreeing on N, a key admits what one core with the
    # whole limit would: L + L·t/60 s over t. Both cores got traffic, so both used their share.
    assert 10 <= admitted <= 10 + int(10 * elapsed / 60) + 1
    assert {r[0] for r in results if r[0] != "ok"} == {"rate_limit_exceeded"}


def _until(check: object, bound_s: float) -> float:
    """Seconds until `check()` holds (polled), failing past twice the bound."""
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < 2 * bound_s + 5, "never took effect"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_key_revoked_on_one_core_is_refused_on_the_other_within_the_bound(
    cluster: Cluster, admins: list[Client]
) -> None:
    _, key_id, secret = new_workspace(admins[0], credits_cents=100)

    async def on_b() -> str:
        async with grpc.aio.insecure_channel(cluster.grpc_addresses[1]) as channel:
            return (await via_grpc(inference_pb2_grpc.InferenceStub(channel), secret, 5))[0]

    assert asyncio.run(on_b()) == "ok"
    admins[0].RevokeKey(accounts_pb2.RevokeKeyRequest(key_id=key_id))
    assert _until(lambda: asyncio.run(on_b()) == "invalid_api_key", PROPAGATION_BOUND_S) <= (
        PROPAGATION_BOUND_S
    )


def test_a_cap_raised_on_one_core_unblocks_the_other_within_the_bound(
    cluster: Cluster, admins: list[Client]
) -> None:
    workspace_id, _, secret = new_workspace(admins[0], credits_cents=100)
    admins[0].SetSpendCap(accounts_pb2.SetSpendCapRequest(workspace_id=workspace_id, cap_cents=0))

    async def on_b() -> str:
        async with grpc.aio.insecure_channel(cluster.grpc_addresses[1]) as channel:
            return (await via_grpc(inference_pb2_grpc.InferenceStub(channel), secret, 5))[0]

    assert asyncio.run(on_b()) == "insufficient_credits"
    admins[0].SetSpendCap(accounts_pb2.SetSpendCapRequest(workspace_id=workspace_id, cap_cents=50))
    assert _until(lambda: asyncio.run(on_b()) == "ok", PROPAGATION_BOUND_S) <= PROPAGATION_BOUND_S


def test_a_key_made_on_one_core_works_on_the_other_at_once(
    cluster: Cluster, admins: list[Client]
) -> None:
    _, _, secret = new_workspace(admins[0], credits_cents=100)

    async def on_b() -> str:
        async with grpc.aio.insecure_channel(cluster.grpc_addresses[1]) as channel:
            return (await via_grpc(inference_pb2_grpc.InferenceStub(channel), secret, 5))[0]

    # Whether or not its notice has arrived, an unknown key is looked up once.
    assert asyncio.run(on_b()) == "ok"


def test_the_same_top_up_sent_to_both_cores_credits_once(
    cluster: Cluster, admins: list[Client]
) -> None:
    workspace_id, _, _ = new_workspace(admins[0], credits_cents=0)
    request = accounts_pb2.AddCreditsRequest(
        workspace_id=workspace_id, amount_cents=2500, idempotency_key="order-7"
    )

    async def both() -> list[accounts_pb2.AddCreditsResponse]:
        return await asyncio.gather(
            *(asyncio.to_thread(admin.AddCredits, request) for admin in admins * 3)
        )

    answers = asyncio.run(both())
    assert sorted(a.replayed for a in answers) == [False] + [True] * 5
    assert len({a.invoice.number for a in answers}) == 1
    assert workspace(admins[1], workspace_id).balance_nano_usd == 25 * 10**9
    invoices = admins[1].ListInvoices(accounts_pb2.ListInvoicesRequest(workspace_id=workspace_id))
    assert len(invoices.invoices) == 1
    other = accounts_pb2.AddCreditsRequest(
        workspace_id=workspace_id, amount_cents=100, idempotency_key="order-7"
    )
    with pytest.raises(AdminError, match="was used for a top-up of"):
        admins[1].AddCredits(other)


def test_edge_workers_share_one_port(cluster: Cluster, admins: list[Client]) -> None:
    assert cluster.edge is not None
    workers = psutil.Process(cluster.edge.pid).children()
    assert len(workers) == 2
    _, _, secret = new_workspace(admins[0], credits_cents=1000)
    before = {w.pid: w.cpu_times().user + w.cpu_times().system for w in workers}
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    ).encode()
    # A new connection each time (urllib keeps none): the kernel spreads connections.
    for _ in range(40):
        request = urllib.request.Request(
            cluster.http_url + "/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
    time.sleep(0.2)
    after = {w.pid: w.cpu_times().user + w.cpu_times().system for w in workers}
    assert all(after[pid] > before[pid] for pid in before), (before, after)
