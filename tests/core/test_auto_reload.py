"""Auto-reload through a real core: one reload however many charges race past the threshold,
and a declining payment provider is recorded and retried with backoff."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import msgspec

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2_grpc
from corvex_core import payments, records
from corvex_core.journal import Journal
from corvex_core.payments import PaymentError
from corvex_core.server import Core
from tests.conftest import core_config
from tests.core.servicers.test_inference_grpc import ADMIN, auth, chat


class ScriptedProvider:
    """A payment provider that declines the first `declines` attempts, then accepts, and
    remembers what it accepted (the edge of the world: a real processor)."""

    name = "scripted"

    def __init__(self, declines: int) -> None:
        self.declines = declines
        self.charges: list[tuple[str, int, str]] = []

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        if self.declines > 0:
            self.declines -= 1
            raise PaymentError("card declined")
        self.charges.append((workspace_id, amount_nano, idempotency_key))


async def run_reload_scenario(
    tmp_path: Path, *, declines: int
) -> tuple[Core, str, ScriptedProvider]:
    config = core_config(tmp_path / "data")
    accounts = msgspec.structs.replace(config.accounts, auto_reload_retry_initial_s=0.05)
    provider = ScriptedProvider(declines)
    core = Core(msgspec.structs.replace(config, accounts=accounts), payment_provider=provider)
    await core.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        admin = accounts_pb2_grpc.AccountsStub(channel)
        ws = await admin.CreateWorkspace(
            accounts_pb2.CreateWorkspaceRequest(name="r", starter_credits_cents=100), metadata=ADMIN
        )
        await admin.SetAutoReload(
            accounts_pb2.SetAutoReloadRequest(
                workspace_id=ws.id, enabled=True, threshold_cents=100, amount_cents=500
            ),
            metadata=ADMIN,
        )
        key = await admin.CreateKey(
            accounts_pb2.CreateKeyRequest(workspace_id=ws.id, name="k"), metadata=ADMIN
        )
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one() -> None:
            async for _ in stub.Chat(chat(max_tokens=50), metadata=auth(key.secret)):
                pass

        # Every one of these charges leaves the balance under the $1.00 threshold.
        await asyncio.gather(*(one() for _ in range(30)))
        for _ in range(200):
            if core.reloader.in_flight == 0 and len(provider.charges) == 1:
                break
            await asyncio.sleep(0.02)
    return core, ws.id, provider


async def test_concurrent_charges_trigger_one_reload(tmp_path: Path) -> None:
    core, ws_id, _ = await run_reload_scenario(tmp_path, declines=0)
    try:
        invoices = core.ledger.invoices(ws_id)
        assert [i.method for i in invoices] == ["starter", "auto_reload"]
        ws = core.ledger.workspace(ws_id)
        spent = sum(row.cost_nano for row in core.ledger.usage(ws_id))
        assert ws.balance_nano == (1 + 5) * 10**9 - spent  # starter + one reload - charges
        assert ws.auto_reload_error == ""
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_declined_reloads_are_recorded_and_retried(tmp_path: Path) -> None:
    core, ws_id, provider = await run_reload_scenario(tmp_path, declines=2)
    try:
        assert len(provider.charges) == 1
        assert [i.method for i in core.ledger.invoices(ws_id)] == ["starter", "auto_reload"]
        assert core.ledger.workspace(ws_id).auto_reload_error == ""  # cleared by the success
    finally:
        await core.server.stop(grace=0)
        await core.close()
    failures = [
        r
        for r in Journal(tmp_path / "data").recover().records
        if isinstance(r, records.AutoReloadFailed)
    ]
    assert [f.error for f in failures] == ["card declined"] * 2


async def test_a_provider_that_always_declines_is_given_up_on_until_settings_change(
    tmp_path: Path,
) -> None:
    config = core_config(tmp_path / "data")
    accounts = msgspec.structs.replace(
        config.accounts, auto_reload_retry_initial_s=0.01, auto_reload_retry_max_s=0.01
    )
    provider = ScriptedProvider(declines=10**9)
    core = Core(msgspec.structs.replace(config, accounts=accounts), payment_provider=provider)
    await core.start()
    try:
        ws, _ = core.ledger.create_workspace("r", 100 * 10**7)
        core.ledger.set_auto_reload(
            ws.id, enabled=True, threshold_nano=2 * 10**9, amount_nano=10**9
        )
        core.reloader.check(ws.id)
        for _ in range(500):
            if core.reloader.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert core.reloader.in_flight == 0
        attempts = provider.declines
        assert 10**9 - attempts == payments.MAX_ATTEMPTS
        assert "gave up after" in core.ledger.workspace(ws.id).auto_reload_error
        # Charges keep coming: no new attempt while nothing changed.
        core.reloader.check(ws.id)
        assert core.reloader.in_flight == 0
        # New settings: attempts start again.
        core.ledger.set_auto_reload(
            ws.id, enabled=True, threshold_nano=2 * 10**9, amount_nano=10**9
        )
        core.reloader.check(ws.id)
        assert core.reloader.in_flight == 1
    finally:
        await core.server.stop(grace=0)
        await core.close()
