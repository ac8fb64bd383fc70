"""What a cluster loses when one of its parts fails: nothing acknowledged.

A core killed with SIGKILL mid-traffic: the other keeps serving, every acknowledged top-up and
every charge a client was shown is in the ledger once, the dead core's leases return to the
workspace after their TTL (the sweep run with a clock moved past it), and the core restarted
on its data directory reconciles without charging anything twice. PostgreSQL restarted under
load: cores refuse cleanly (503 / UNAVAILABLE) while it is away, lose nothing, and resume.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import openai
import pytest

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2_grpc
from corvex_core.pg import db
from corvex_core.pg import server as pg
from corvex_core.pg.leases import LeaseStore
from corvex_core.pg.server import PgServer
from corvex_ops.admin import Client
from corvex_ops.stack import Cluster, running_cluster
from tests.conftest import FAST_ENGINE
from tests.e2e.cluster import (
    cluster_config,
    cluster_database,
    fetch,
    new_workspace,
    via_edge,
    via_grpc,
)

pytestmark = pytest.mark.e2e

# What a client may see while a part of the cluster is away: an answer or a clean refusal.
CLEAN = {"ok", "service_unavailable", "engine_unavailable"}


def slow_config(**ledger: Any) -> dict[str, Any]:
    config = cluster_config(**ledger)
    config["core"]["engines"] = {"default": {**FAST_ENGINE, "tpot_ms": 4}}
    return config


class Traffic:
    """Streams through the edge and to each core, and top-ups to each core, until stopped;
    what every client saw."""

    def __init__(self, cluster: Cluster, secret: str, workspace_id: str) -> None:
        self.cluster = cluster
        self.secret = secret
        self.workspace_id = workspace_id
        self.shown: dict[str, int] = {}  # request id → cost the client saw
        self.outcomes: dict[str, str] = {}
        self.acknowledged: set[str] = set()
        self.cuts: list[str] = []  # what a client saw of a stream cut short
        self.stop = asyncio.Event()
        self._numbers = iter(range(10**6))

    async def answered(self, count: int, timeout_s: float = 60) -> None:
        """Waits until clients were shown `count` answers (a point in the traffic, not a time
        a loaded machine can outrun)."""
        deadline = time.monotonic() + timeout_s
        while len(self.shown) < count:
            assert time.monotonic() < deadline, f"only {len(self.shown)} answers of {count}"
            await asyncio.sleep(0.02)

    async def run(self, during: Callable[[], Any]) -> None:
        addresses = self.cluster.grpc_addresses
        async with openai.AsyncOpenAI(
            base_url=self.cluster.http_url + "/v1", api_key=self.secret, max_retries=0, timeout=60
        ) as client:
            workers = [asyncio.create_task(self._requests(client, None)) for _ in range(6)]
            for address in addresses:
                workers += [asyncio.create_task(self._requests(None, address)) for _ in range(6)]
                workers.append(asyncio.create_task(self._top_ups(address)))
            await during()
            self.stop.set()
            await asyncio.gather(*workers)

    async def _requests(self, client: openai.AsyncOpenAI | None, address: str | None) -> None:
        channel = grpc.aio.insecure_channel(address) if address else None
        stub = inference_pb2_grpc.InferenceStub(channel) if channel else None
        try:
            while not self.stop.is_set():
                rid = f"r{next(self._numbers)}"
                try:
                    if stub is not None:
                        outcome = await via_grpc(stub, self.secret, 60, request_id=rid)
                    else:
                        assert client is not None
                        outcome = await via_edge(client, 60, request_id=rid)
                except (openai.APIConnectionError, openai.APIError) as exc:
                    outcome = ("cut", 0, 0)
                    self.cuts.append(f"{type(exc).__name__}: {exc}")
                self.outcomes[rid] = outcome[0]
                if outcome[0] == "ok":
                    self.shown[rid] = outcome[1]
                elif outcome[0] not in CLEAN:
                    await asyncio.sleep(0.05)  # a core that is gone: do not spin
        finally:
            if channel is not None:
                await channel.close()

    async def _top_ups(self, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            metadata = (("authorization", f"Bearer {self.cluster.admin_token}"),)
            while not self.stop.is_set():
                key = "topup-" + secrets.token_hex(6)
                try:
                    await stub.AddCredits(
                        accounts_pb2.AddCreditsRequest(
                            workspace_id=self.workspace_id, amount_cents=100, idempotency_key=key
                        ),
                        metadata=metadata,
                        timeout=20,
                    )
                    self.acknowledged.add(key)
                except grpc.aio.AioRpcError as exc:
                    self.outcomes[key] = exc.code().name
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.02)


def nothing_lost(cluster: Cluster, traffic: Traffic) -> None:
    """Every acknowledged top-up and every shown charge is in the ledger, once, and the
    balance is the top-ups less the charges."""

    async def check() -> None:
        ws = traffic.workspace_id
        invoices = await fetch(
            cluster.dsn,
            "SELECT idempotency_key, amount_nano FROM invoices WHERE workspace_id = $1",
            ws,
        )
        charges = await fetch(
            cluster.dsn, "SELECT request_id, cost_nano FROM charges WHERE workspace_id = $1", ws
        )
        [money] = await fetch(cluster.dsn, "SELECT balance_nano FROM workspaces WHERE id = $1", ws)
        assert traffic.acknowledged <= {r["idempotency_key"] for r in invoices}
        by_request: dict[str, int] = {}
        for row in charges:
            assert row["request_id"] not in by_request, f"{row['request_id']} charged twice"
            by_request[row["request_id"]] = row["cost_nano"]
        for rid, cost in traffic.shown.items():
            assert by_request.get(rid) == cost, (
                f"{rid}: shown {cost}, charged {by_request.get(rid)}"
            )
        unshown = set(by_request) - set(traffic.shown)
        assert all(traffic.outcomes.get(rid) not in ("ok",) for rid in unshown)
        total_in = sum(r["amount_nano"] for r in invoices)
        assert money["balance_nano"] == total_in - sum(by_request.values())

    asyncio.run(check())


@pytest.fixture
def dsn(pg_server: PgServer) -> Iterator[str]:
    with cluster_database(pg_server) as made:
        yield made


def test_kill_9_of_one_core_loses_nothing_and_its_leases_return(dsn: str) -> None:
    with running_cluster(dsn=dsn, config=slow_config()) as cluster:
        admin = Client(cluster.grpc_addresses[1], cluster.admin_token or "")
        workspace_id, _, secret = new_workspace(admin, credits_cents=50_000)
        traffic = Traffic(cluster, secret, workspace_id)
        dead = cluster.cores[0]
        dead_id = (cluster.core_data_dir(0) / "core_id").read_text().strip()

        async def kill_then_keep_serving() -> None:
            await traffic.answered(15)
            dead.signal(signal.SIGKILL)
            await traffic.answered(30)  # the other core keeps serving
            await asyncio.sleep(1.2)  # and renews its leases after the kill

        asyncio.run(traffic.run(kill_then_keep_serving))
        assert dead.popen.wait(10) == -signal.SIGKILL
        nothing_lost(cluster, traffic)

        async def sweep() -> tuple[int, int, int]:
            pool = await db.open_pool(dsn)
            try:
                rows = await pool.fetch(
                    "SELECT credit_nano, expires_at FROM leases WHERE core_id = $1", dead_id
                )
                assert rows, "the dead core held leases"
                lapsed = max(r["expires_at"] for r in rows)
                # Just before its TTL nothing of the dead core's goes; just after, all of it.
                early = await LeaseStore(pool).expire(lapsed - dt.timedelta(seconds=1))
                assert not [lease for lease in early.leases if lease.core_id == dead_id]
                late = await LeaseStore(pool, clock=lambda: lapsed).expire(lapsed)
                back = sum(lease.credit_nano for lease in late.leases if lease.core_id == dead_id)
                [ws] = await pool.fetch(
                    "SELECT leased_nano, (SELECT coalesce(sum(credit_nano), 0) FROM leases"
                    " WHERE workspace_id = $1) AS held FROM workspaces WHERE id = $1",
                    workspace_id,
                )
                return back, ws["leased_nano"], ws["held"]
            finally:
                await pool.close()

        returned, leased, held = asyncio.run(sweep())
        assert returned > 0 and leased == held  # its credit is back; the survivor's is not

        # Restarted on its data directory, it takes its old id and charges nothing twice.
        cluster.restart_core(0)

        async def after_restart() -> str:
            async with grpc.aio.insecure_channel(cluster.grpc_addresses[0]) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                return (await via_grpc(stub, secret, 5, request_id="after-restart"))[0]

        assert asyncio.run(after_restart()) == "ok"
        traffic.shown["after-restart"] = asyncio.run(
            fetch(dsn, "SELECT cost_nano FROM charges WHERE request_id = 'after-restart'")
        )[0]["cost_nano"]
        traffic.outcomes["after-restart"] = "ok"
        nothing_lost(cluster, traffic)
        admin.close()


def test_postgres_restarted_under_load_means_clean_refusals_and_nothing_lost(
    pg_server: PgServer, dsn: str
) -> None:
    with running_cluster(dsn=dsn, config=slow_config()) as cluster:
        admin = Client(cluster.grpc_addresses[0], cluster.admin_token or "")
        workspace_id, _, secret = new_workspace(admin, credits_cents=50_000)
        traffic = Traffic(cluster, secret, workspace_id)
        during_outage: set[str] = set()

        async def restart_postgres() -> None:
            await traffic.answered(15)
            await asyncio.to_thread(pg.pause, pg_server)
            paused = set(traffic.outcomes)
            await asyncio.sleep(1.5)
            during_outage.update(set(traffic.outcomes) - paused)
            await asyncio.to_thread(pg.resume, pg_server)
            await traffic.answered(len(traffic.shown) + 20)  # it resumes

        asyncio.run(traffic.run(restart_postgres))
        seen = {traffic.outcomes[rid] for rid in during_outage}
        assert "service_unavailable" in seen or "UNAVAILABLE" in seen
        # Requests: an answer or a clean 503; top-ups: done or UNAVAILABLE.
        errors = [line for core in cluster.cores for line in core.log_text().splitlines()
                  if '"level":"error"' in line or '"level":"critical"' in line]  # fmt: skip
        assert {o for o in traffic.outcomes.values()} <= CLEAN | {"UNAVAILABLE"}, (
            traffic.cuts[:3],
            errors[:3],
        )
        nothing_lost(cluster, traffic)
        admin.close()


def test_a_core_with_charges_in_its_journal_ships_them_after_kill_9(
    pg_server: PgServer, dsn: str
) -> None:
    """`ledger.charges: journal`: a charge is durable on the core's disk before its client
    sees it, and shipped after. Killed while PostgreSQL is away (so charges wait unshipped),
    the core ships them on restart, paid from the leases it held."""
    with running_cluster(dsn=dsn, config=slow_config(charges="journal"), cores=1) as cluster:
        admin = Client(cluster.grpc_addresses[0], cluster.admin_token or "")
        workspace_id, _, secret = new_workspace(admin, credits_cents=50_000)
        admin.close()
        traffic = Traffic(cluster, secret, workspace_id)

        async def kill_while_postgres_is_away() -> None:
            await traffic.answered(15)
            await asyncio.to_thread(pg.pause, pg_server)
            await asyncio.sleep(0.5)  # streams in flight finish: charged on disk only
            cluster.cores[0].signal(signal.SIGKILL)
            await asyncio.to_thread(pg.resume, pg_server)

        asyncio.run(traffic.run(kill_while_postgres_is_away))
        cluster.cores[0].popen.wait(10)
        restarted = cluster.restart_core(0)
        [line] = [entry for entry in restarted.log_text().splitlines() if "reconciled" in entry]
        shipped = int(line.split("reconciled the journal: ")[1].split(" ")[0])
        assert shipped > 0 and ", 0 lost" in line
        nothing_lost(cluster, traffic)
