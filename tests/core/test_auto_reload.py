"""Auto-reload through a real core: one reload however many charges race past the threshold,
and a declining payment provider is recorded and retried with backoff."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import msgspec

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2_grpc
from corvex_core import records
from corvex_core.journal import Journal
from corvex_core.payments import SimulatedProvider
from corvex_core.server import Core
from tests.conftest import core_config
from tests.core.servicers.test_inference_grpc import ADMIN, auth, chat


async def run_reload_scenario(tmp_path: Path, *, declines: int) -> tuple[Core, str]:
    config = core_config(tmp_path / "data")
    accounts = msgspec.structs.replace(config.accounts, auto_reload_retry_initial_s=0.05)
    core = Core(msgspec.structs.replace(config, accounts=accounts))
    provider = core.reloader._provider
    assert isinstance(provider, SimulatedProvider)
    provider.fail_next = declines
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
    return core, ws.id


async def test_concurrent_charges_trigger_one_reload(tmp_path: Path) -> None:
    core, ws_id = await run_reload_scenario(tmp_path, declines=0)
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
    core, ws_id = await run_reload_scenario(tmp_path, declines=2)
    provider = core.reloader._provider
    assert isinstance(provider, SimulatedProvider)
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
    assert [f.error for f in failures] == ["simulated provider declined the payment"] * 2
