"""Reserved endpoints on a cluster: rented on one core (its replicas come from that core's
pool), called with the OpenAI SDK through the edge whichever core the edge tries first, listed,
shown and deleted from the other core, billed by the period in PostgreSQL, suspended at $0 and
resumed by a top-up made on the other core, started again after a kill -9 of its core without
billing a period twice, and billed on after PostgreSQL was restarted.

The cores run with one-second billing periods (the product's is a minute). Waits poll for a
state with a deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest

from corvex.money import NANO_PER_CENT
from corvex.v1 import accounts_pb2, inference_pb2, inference_pb2_grpc
from corvex_core.pg import server as pg
from corvex_core.pg.server import PgServer
from corvex_ops.admin import AdminError, Client
from corvex_ops.stack import Cluster, running_cluster
from gateway.errors import details_of
from tests.e2e.cluster import cluster_config, cluster_database, fetch, new_workspace
from tests.e2e.reserved import FLASH, balance, endpoint, wait_for

pytestmark = pytest.mark.e2e

pb = accounts_pb2


def reserved_cluster_config() -> dict[str, Any]:
    config = cluster_config()
    config["core"]["reserved"] = {
        "period_s": 1,
        "tick_s": 0.1,
        "pools": {FLASH: {"replicas": 2}},
    }
    return config


@pytest.fixture(scope="module")
def cluster(pg_server: PgServer) -> Iterator[Cluster]:
    with (
        cluster_database(pg_server) as dsn,
        running_cluster(dsn=dsn, config=reserved_cluster_config()) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def admins(cluster: Cluster) -> Iterator[list[Client]]:
    clients = [Client(address, cluster.admin_token or "") for address in cluster.grpc_addresses]
    yield clients
    for client in clients:
        client.close()


def rent(admin: Client, workspace_id: str, name: str, replicas: int = 1) -> pb.Endpoint:
    created: pb.Endpoint = admin.CreateEndpoint(
        pb.CreateEndpointRequest(
            workspace_id=workspace_id, offering=FLASH, replicas=replicas, name=name
        )
    )
    return created


def ask(cluster: Cluster, secret: str, model: str) -> Any:
    with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=secret, max_retries=0) as sdk:
        return sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )


def answered(cluster: Cluster, secret: str, model: str) -> bool:
    try:
        return bool(ask(cluster, secret, model).choices[0].message.content)
    except openai.InternalServerError:
        return False


def grpc_chat(address: str, secret: str, model: str) -> grpc.aio.AioRpcError | None:
    """One chat straight to a core: None if it answered, else its refusal."""

    async def call() -> grpc.aio.AioRpcError | None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.ChatRequest(
                model=model,
                messages=[inference_pb2.ChatMessage(role="user", content="Hello")],
                max_tokens=4,
            )
            try:
                async for _ in stub.Chat(
                    request, metadata=[("authorization", f"Bearer {secret}")], timeout=30
                ):
                    pass
            except grpc.aio.AioRpcError as error:
                return error
            return None

    return asyncio.run(call())


def charges_of(cluster: Cluster, endpoint_id: str) -> list[Any]:
    return asyncio.run(
        fetch(
            cluster.dsn,
            "SELECT charge_id, cost_nano, replica_seconds FROM endpoint_charges"
            " WHERE endpoint_id = $1 ORDER BY at",
            endpoint_id,
        )
    )


def test_rented_on_one_core_served_through_the_edge_and_managed_from_the_other(
    cluster: Cluster, admins: list[Client]
) -> None:
    home, other = admins
    ws, _, secret = new_workspace(home, credits_cents=1000)
    stranger_ws, _, stranger = new_workspace(home, credits_cents=1000)
    created = rent(home, ws, "prod", replicas=2)
    assert created.status == pb.ENDPOINT_STATUS_RUNNING and created.periods_billed == 1
    model = created.model

    # Through the edge, whichever core it tries first: the other core names the home one.
    for _ in range(6):
        reply = ask(cluster, secret, model)
        assert reply.model == model and reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.model_extra["cost_nano_usd"] == 0
    with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=secret, max_retries=0) as sdk:
        assert model in [m.id for m in sdk.models.list()]
    with pytest.raises(openai.NotFoundError) as hidden:
        ask(cluster, stranger, model)
    assert hidden.value.code == "model_not_found"

    # Straight to the other core: refused before admission, naming where it runs.
    refused = grpc_chat(cluster.grpc_addresses[1], secret, model)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    details = details_of(refused)
    assert details is not None
    assert details.metadata["core"] == cluster.grpc_addresses[0]
    assert details.metadata["admitted"] == "false"
    assert grpc_chat(cluster.grpc_addresses[0], secret, model) is None
    assert grpc_chat(cluster.grpc_addresses[1], stranger, model) is not None  # not found there

    # The other core lists and shows it as its home core runs it, and refuses to resize it.
    wait_for(
        lambda: endpoint(other, created.id).status == pb.ENDPOINT_STATUS_RUNNING,
        "the other core sees it running",
    )
    listed = other.ListEndpoints(pb.ListEndpointsRequest(workspace_id=ws)).endpoints
    assert [e.id for e in listed] == [created.id]
    assert other.ListEndpoints(pb.ListEndpointsRequest(workspace_id=stranger_ws)).endpoints == []
    with pytest.raises(AdminError) as elsewhere:
        other.ResizeEndpoint(pb.ResizeEndpointRequest(endpoint_id=created.id, replicas=1))
    assert str(elsewhere.value).startswith("INVALID_ARGUMENT")
    assert f"runs on the core at {cluster.grpc_addresses[0]}" in str(elsewhere.value)
    resized = home.ResizeEndpoint(pb.ResizeEndpointRequest(endpoint_id=created.id, replicas=1))
    assert resized.replicas == 1

    wait_for(lambda: endpoint(other, created.id).periods_billed >= 4, "four periods billed")
    deleted: pb.Endpoint = other.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))
    assert deleted.status == pb.ENDPOINT_STATUS_DELETED
    # Its home core hears of it and stops serving it; nothing more is billed.
    wait_for(
        lambda: (
            (refusal := grpc_chat(cluster.grpc_addresses[0], secret, model)) is not None
            and refusal.code() == grpc.StatusCode.NOT_FOUND
        ),
        "the home core stops serving it",
    )
    final = endpoint(home, created.id)
    time.sleep(1.5)  # more than a period: a core still billing it would charge one here
    assert endpoint(other, created.id).charged_nano_usd == final.charged_nano_usd
    charges = charges_of(cluster, created.id)
    assert sum(c["cost_nano"] for c in charges) == final.charged_nano_usd
    assert len([c for c in charges if c["charge_id"].startswith(f"{created.id}:p")]) == (
        final.periods_billed
    )
    # Every nano-dollar the workspace paid is its endpoint's (its tokens cost nothing).
    assert balance(other, ws) == 1000 * NANO_PER_CENT - final.charged_nano_usd
    usage = other.GetUsage(pb.GetUsageRequest(workspace_id=ws)).rows
    reserved_rows = [row for row in usage if row.endpoint_id == created.id]
    assert sum(row.replica_seconds for row in reserved_rows) == sum(
        c["replica_seconds"] for c in charges
    )
    assert sum(int(row.cost_nano_usd) for row in reserved_rows) == final.charged_nano_usd


def test_suspended_at_zero_and_resumed_by_a_top_up_on_the_other_core(
    cluster: Cluster, admins: list[Client]
) -> None:
    home, other = admins
    # $0.01: the first period ($0.0007) and 13 more, then less than a period is left.
    ws, _, secret = new_workspace(home, credits_cents=1)
    created = rent(home, ws, "brief")
    wait_for(
        lambda: endpoint(other, created.id).status == pb.ENDPOINT_STATUS_SUSPENDED,
        "suspended once the balance cannot pay a period",
    )
    suspended = endpoint(other, created.id)
    assert suspended.suspended_by == "balance"
    assert balance(other, ws) < 700_000
    assert balance(other, ws) == 1 * NANO_PER_CENT - suspended.charged_nano_usd
    with pytest.raises(openai.APIStatusError) as refused:
        ask(cluster, secret, created.model)
    assert refused.value.status_code == 402

    other.AddCredits(
        pb.AddCreditsRequest(workspace_id=ws, amount_cents=100, idempotency_key="resume-1")
    )
    wait_for(
        lambda: endpoint(other, created.id).status == pb.ENDPOINT_STATUS_RUNNING,
        "resumed by the top-up",
    )
    assert ask(cluster, secret, created.model).choices[0].message.content
    other.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))


def test_kill_9_of_its_core_bills_no_period_twice_and_it_starts_again(
    cluster: Cluster, admins: list[Client]
) -> None:
    home, other = admins
    ws, _, secret = new_workspace(home, credits_cents=1000)
    created = rent(home, ws, "sturdy")
    wait_for(lambda: endpoint(other, created.id).periods_billed >= 2, "two periods billed")
    cluster.cores[0].signal(signal.SIGKILL)
    cluster.cores[0].stop()
    billed = endpoint(other, created.id).periods_billed
    time.sleep(1.5)  # its core is gone: nobody bills it
    assert endpoint(other, created.id).periods_billed == billed

    cluster.restart_core(0)
    restarted = Client(cluster.grpc_addresses[0], cluster.admin_token or "")
    try:
        wait_for(
            lambda: endpoint(restarted, created.id).periods_billed >= billed + 2,
            "billed again once its core is back",
        )
        # Through the edge once it has reconnected to the restarted core (until then its
        # requests are refused with a retryable 503, as the SDK's retries expect).
        wait_for(lambda: answered(cluster, secret, created.model), "served through the edge")
        restarted.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))
    finally:
        restarted.close()
    charges = charges_of(cluster, created.id)
    ids = [c["charge_id"] for c in charges]
    assert len(ids) == len(set(ids))
    final = endpoint(other, created.id)
    assert sum(c["cost_nano"] for c in charges) == final.charged_nano_usd
    assert balance(other, ws) == 1000 * NANO_PER_CENT - final.charged_nano_usd


def test_postgres_restarted_bills_nothing_twice_and_the_endpoint_goes_on(
    pg_server: PgServer, cluster: Cluster, admins: list[Client]
) -> None:
    home, other = admins
    ws, _, secret = new_workspace(home, credits_cents=1000)
    created = rent(home, ws, "steady")
    wait_for(lambda: endpoint(other, created.id).periods_billed >= 2, "two periods billed")
    pg.pause(pg_server)
    try:
        time.sleep(2.5)  # past the paid period: its charge cannot be made meanwhile
        refused = grpc_chat(cluster.grpc_addresses[0], secret, created.model)
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        pg.resume(pg_server)
    billed = endpoint(home, created.id).periods_billed
    wait_for(lambda: endpoint(other, created.id).periods_billed >= billed + 2, "billed again after")
    wait_for(lambda: answered(cluster, secret, created.model), "served through the edge again")
    after = endpoint(other, created.id)
    assert after.status == pb.ENDPOINT_STATUS_RUNNING
    other.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))
    final = endpoint(other, created.id)
    charges = charges_of(cluster, created.id)
    periods = [c for c in charges if c["charge_id"].startswith(f"{created.id}:p")]
    assert len(periods) == final.periods_billed == len({c["charge_id"] for c in periods})
    assert sum(c["cost_nano"] for c in charges) == final.charged_nano_usd
    assert balance(other, ws) == 1000 * NANO_PER_CENT - final.charged_nano_usd
    # The outage was a warning ("billing paused"), never a failed tick.
    assert not [
        line
        for core in cluster.cores
        for line in core.log_text().splitlines()
        if "reserved billing tick failed" in line
    ]
