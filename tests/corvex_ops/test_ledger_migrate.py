"""`corvex ledger migrate --to`: a journal made under traffic (with a snapshot in the middle)
copied into PostgreSQL once. Every balance, cap, setting, key, invoice and usage row equals
the single core's; a second run is refused; a cluster core then serves the migrated keys,
replays the migrated idempotency keys, and the customer who signed up on the single core is
still signed in there."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgspec
import openai
import pytest

from corvex.v1 import accounts_pb2, accounts_pb2_grpc
from corvex_core.cluster.importer import read_journal
from corvex_core.journal import Journal
from corvex_core.ledger import Ledger
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.server import PgServer
from corvex_ops.admin import Client
from corvex_ops.stack import running_cluster, running_stack
from tests.conftest import ADMIN_TOKEN, MODEL, STACK_CONFIG
from tests.e2e.cluster import cluster_config, cluster_database

pytestmark = pytest.mark.e2e


PASSWORD = "a long enough password"


def customer(grpc_address: str) -> str:
    """A customer who signed up, claimed the starter credits and set alerts: its session."""
    pb = accounts_pb2
    with grpc.insecure_channel(grpc_address) as channel:
        stub = accounts_pb2_grpc.AccountsStub(channel)
        signed = stub.SignUp(pb.SignUpRequest(email="ada@example.com", password=PASSWORD))
        auth = (("authorization", f"Bearer {signed.session.token}"),)
        ws_id = signed.user.workspace_ids[0]
        stub.ClaimStarterCredits(pb.ClaimStarterCreditsRequest(workspace_id=ws_id), metadata=auth)
        alerts = pb.SetAlertsRequest(workspace_id=ws_id, balance_below_cents=700)
        stub.SetAlerts(alerts, metadata=auth)
    return signed.session.token


def traffic(http_url: str, admin: Client, round_: int) -> None:
    """Workspaces, keys (limited, revoked), top-ups, a cap, auto-reload, and requests."""
    pb = accounts_pb2
    for index in range(3):
        ws = admin.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=f"w{round_}-{index}", starter_credits_cents=500)
        )
        limits = pb.KeyLimits(requests_per_minute=600, monthly_tokens=1_000_000)
        key = admin.CreateKey(pb.CreateKeyRequest(workspace_id=ws.id, name="k", limits=limits))
        spare = admin.CreateKey(pb.CreateKeyRequest(workspace_id=ws.id, name="spare"))
        admin.RevokeKey(pb.RevokeKeyRequest(key_id=spare.key.id))
        admin.AddCredits(
            pb.AddCreditsRequest(
                workspace_id=ws.id, amount_cents=250, idempotency_key=f"order-{round_}-{index}"
            )
        )
        admin.SetSpendCap(pb.SetSpendCapRequest(workspace_id=ws.id, cap_cents=10_000))
        if index == 0:
            admin.SetAutoReload(
                pb.SetAutoReloadRequest(
                    workspace_id=ws.id, enabled=True, threshold_cents=100, amount_cents=1000
                )
            )
        with openai.OpenAI(base_url=http_url + "/v1", api_key=key.secret, max_retries=0) as client:
            for n in range(4):
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"m{n}"}], max_tokens=7 + n
                )


class Journaled(msgspec.Struct):
    data_dir: Path
    session: str  # the customer's


@pytest.fixture
def journaled(tmp_path: Path) -> Iterator[Journaled]:
    data = tmp_path / "data"
    session = ""
    for round_ in (1, 2):
        with running_stack(config=STACK_CONFIG, data_dir=data) as stack:
            admin = Client(stack.grpc_address, ADMIN_TOKEN)
            traffic(stack.http_url, admin, round_)
            admin.close()
            if round_ == 1:
                session = customer(stack.grpc_address)
        if round_ == 1:
            # A snapshot between the rounds: usage before it survives only as daily totals.
            asyncio.run(_snapshot(data))
    yield Journaled(data, session)


async def _snapshot(data: Path) -> None:
    journal = Journal(data)
    recovery = journal.recover()
    ledger = Ledger()
    for record in recovery.records:
        ledger.apply(record)
    journal.start()
    journal.snapshot(ledger.state)
    await journal.close()


def migrate(data_dir: Path, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corvex_cli", "ledger", "migrate", "--data-dir", str(data_dir)],
        env={"CORVEX_LEDGER_DSN": dsn, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_journal_migrates_once_and_whole(pg_server: PgServer, journaled: Journaled) -> None:
    journal_dir = journaled.data_dir
    single = read_journal(journal_dir)
    assert single.snapshot_state is not None and single.charges
    with cluster_database(pg_server) as dsn:
        done = migrate(journal_dir, dsn)
        assert done.returncode == 0, done.stderr
        assert '"workspaces":7' in done.stdout and '"users":1' in done.stdout

        async def compare() -> None:
            pool = await db.open_pool(dsn)
            try:
                store = AccountStore(pool)
                state = single.state
                for ws in state.workspaces.values():
                    row = await store.workspace(ws.id)
                    assert (row.balance_nano, row.month_spend_nano, row.spend_cap_nano) == (
                        ws.balance_nano, ws.month_spend_nano, ws.spend_cap_nano,
                    )  # fmt: skip
                    assert row.auto_reload == ws.auto_reload and row.leased_nano == 0
                    invoices = await store.invoices(ws.id)
                    assert invoices == [state.invoices[n] for n in ws.invoice_numbers]
                    usage = await store.usage(ws.id)
                    expected = Ledger(state=state).usage(ws.id)
                    assert [tuple(msgspec_row) for msgspec_row in _rows(usage)] == [
                        tuple(r) for r in _rows(expected)
                    ]
                for key in state.keys.values():
                    row = await store.key(key.id)
                    assert (row.secret_sha256, row.limits, row.month_tokens) == (
                        key.secret_sha256, key.limits, key.month_tokens,
                    )  # fmt: skip
                    assert (row.revoked_at is not None) == key.revoked
                assert await pool.fetchval("SELECT next_number FROM invoice_counter") == (
                    state.next_invoice
                )
            finally:
                await pool.close()

        asyncio.run(compare())
        again = migrate(journal_dir, dsn)
        assert again.returncode == 1 and "already holds accounts" in again.stderr

        # A cluster on the migrated ledger: old keys work, old idempotency keys replay.
        with running_cluster(dsn=dsn, config=cluster_config(), cores=1, edge_port=None) as c:
            admin = Client(c.grpc_address, c.admin_token or "")
            ws_id = next(iter(single.state.workspaces))
            replay = admin.AddCredits(
                accounts_pb2.AddCreditsRequest(
                    workspace_id=ws_id, amount_cents=250, idempotency_key="order-1-0"
                )
            )
            assert replay.replayed
            before = admin.GetWorkspace(accounts_pb2.GetWorkspaceRequest(workspace_id=ws_id))
            assert before.balance_nano_usd == single.state.workspaces[ws_id].balance_nano
            admin.close()
            # The customer: still signed in, can sign in again, claimed already, alerts kept.
            pb = accounts_pb2
            with grpc.insecure_channel(c.grpc_address) as channel:
                stub = accounts_pb2_grpc.AccountsStub(channel)
                auth = (("authorization", f"Bearer {journaled.session}"),)
                me = stub.WhoAmI(pb.WhoAmIRequest(), metadata=auth)
                assert me.email == "ada@example.com" and me.starter_claimed
                own = me.workspace_ids[0]
                offer = stub.GetStarterOffer(
                    pb.GetStarterOfferRequest(workspace_id=own), metadata=auth
                )
                assert offer.claimed and not offer.claimable
                alerts = stub.GetAlerts(pb.GetAlertsRequest(workspace_id=own), metadata=auth)
                assert alerts.balance_below_nano_usd == 700 * 10**7
                assert [a.kind for a in alerts.active] == ["balance_low"]
                again = stub.SignIn(pb.SignInRequest(email="ada@example.com", password=PASSWORD))
                assert again.user.id == me.id


def _rows(rows: object) -> list[tuple[object, ...]]:
    return [
        (r.day, r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.cost_nano)
        for r in rows  # type: ignore[attr-defined]
    ]
