"""Alerts: the banner's conditions, and signed webhooks retried against a local receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import msgspec
import pytest
from aiohttp import web

from corvex.v1 import accounts_pb2 as pb
from corvex.v1 import accounts_pb2_grpc, inference_pb2_grpc
from corvex_core.alerts import AlertKind, active, signature
from corvex_core.payments import NoProvider
from corvex_core.server import Core
from corvex_core.state import Alerts, Workspace
from tests.conftest import ADMIN_TOKEN, core_config
from tests.core.servicers.test_inference_grpc import auth, chat

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
CENT = 10**7


def test_conditions() -> None:
    ws = Workspace(id="ws", name="w", created_ms=0, balance_nano=50 * CENT)
    assert active(ws) == []
    ws.alerts = Alerts(balance_below_nano=100 * CENT)
    assert [a.kind for a in active(ws)] == [AlertKind.BALANCE_LOW]
    ws.alerts = Alerts()
    ws.spend_cap_nano, ws.month_spend_nano = 100 * CENT, 79 * CENT
    assert active(ws) == []
    ws.month_spend_nano = 80 * CENT
    assert [a.kind for a in active(ws)] == [AlertKind.SPEND_CAP_80]
    ws.month_spend_nano = 100 * CENT
    assert [a.kind for a in active(ws)] == [AlertKind.SPEND_CAP_100]
    ws.auto_reload_error = "card declined"
    assert [a.kind for a in active(ws)] == [AlertKind.SPEND_CAP_100, AlertKind.AUTO_RELOAD_FAILED]
    assert "card declined" in active(ws)[-1].message


class Receiver:
    """A local webhook receiver that fails its first `failures` deliveries with HTTP 500."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[tuple[bytes, str]] = []
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts.append((body, request.headers["Corvex-Signature"]))
        if len(self.attempts) <= self.failures:
            return web.Response(status=500)
        self.received.put_nowait(body)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hook = Receiver(failures=2)
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield hook, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def test_webhook_is_signed_and_retried(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    config = core_config(tmp_path / "data")
    config = msgspec.structs.replace(
        config,
        customers=msgspec.structs.replace(
            config.customers, webhook_retry_initial_s=0.01, webhook_allow_private_addresses=True
        ),
    )
    core = Core(config)
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            accounts = accounts_pb2_grpc.AccountsStub(channel)
            ws = await accounts.CreateWorkspace(
                pb.CreateWorkspaceRequest(name="w", starter_credits_cents=100), metadata=ADMIN
            )
            settings = await accounts.SetAlerts(
                pb.SetAlertsRequest(workspace_id=ws.id, webhook_url=url, balance_below_cents=50),
                metadata=ADMIN,
            )
            secret = settings.webhook_secret
            assert secret.startswith("whsec_") and not settings.active
            key = await accounts.CreateKey(
                pb.CreateKeyRequest(workspace_id=ws.id, name="k"), metadata=ADMIN
            )
            inference = inference_pb2_grpc.InferenceStub(channel)
            async for _ in inference.Chat(chat(max_tokens=8), metadata=auth(key.secret)):
                pass
            # A cap below what the month spent: the cap is reached at once.
            await accounts.SetSpendCap(
                pb.SetSpendCapRequest(workspace_id=ws.id, cap_cents=0), metadata=ADMIN
            )
            body = await asyncio.wait_for(hook.received.get(), 30)
            delivered = msgspec.json.decode(body)
            assert delivered["kind"] == "spend_cap_100" and delivered["workspace_id"] == ws.id
            assert len(hook.attempts) == 3  # two 500s, then delivered
            for sent, header in hook.attempts:
                timestamp = int(header.split(",")[0].removeprefix("t="))
                assert header == signature(secret, timestamp, sent)
                expected = hmac.new(
                    secret.encode(), f"{timestamp}.".encode() + sent, hashlib.sha256
                )
                assert header.endswith("v1=" + expected.hexdigest())
            now = await accounts.GetAlerts(pb.GetAlertsRequest(workspace_id=ws.id), metadata=ADMIN)
            assert [a.kind for a in now.active] == ["spend_cap_100"]
            assert now.last_delivery_error == ""
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_webhooks_to_our_own_network_are_refused(
    core: Core, channel: grpc.aio.Channel, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    ws = await accounts.CreateWorkspace(
        pb.CreateWorkspaceRequest(name="w", starter_credits_cents=100), metadata=ADMIN
    )
    await accounts.SetAlerts(
        pb.SetAlertsRequest(workspace_id=ws.id, webhook_url=url, balance_below_cents=500),
        metadata=ADMIN,
    )
    for _ in range(100):
        settings = await accounts.GetAlerts(pb.GetAlertsRequest(workspace_id=ws.id), metadata=ADMIN)
        if settings.last_delivery_error:
            break
        await asyncio.sleep(0.05)
    assert "127.0.0.1, a non-public address" in settings.last_delivery_error
    assert [a.kind for a in settings.active] == ["balance_low"]
    assert hook.attempts == []


async def test_a_failed_auto_reload_is_sent(tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.failures = 0
    config = core_config(tmp_path / "data")
    config = msgspec.structs.replace(
        config,
        accounts=msgspec.structs.replace(config.accounts, auto_reload_retry_initial_s=60.0),
        customers=msgspec.structs.replace(config.customers, webhook_allow_private_addresses=True),
    )
    core = Core(config, payment_provider=NoProvider())
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            accounts = accounts_pb2_grpc.AccountsStub(channel)
            ws = await accounts.CreateWorkspace(
                pb.CreateWorkspaceRequest(name="w", starter_credits_cents=100), metadata=ADMIN
            )
            await accounts.SetAlerts(
                pb.SetAlertsRequest(workspace_id=ws.id, webhook_url=url), metadata=ADMIN
            )
            await accounts.SetAutoReload(
                pb.SetAutoReloadRequest(
                    workspace_id=ws.id, enabled=True, threshold_cents=500, amount_cents=1000
                ),
                metadata=ADMIN,
            )
            key = await accounts.CreateKey(
                pb.CreateKeyRequest(workspace_id=ws.id, name="k"), metadata=ADMIN
            )
            inference = inference_pb2_grpc.InferenceStub(channel)
            async for _ in inference.Chat(chat(max_tokens=4), metadata=auth(key.secret)):
                pass
            delivered = msgspec.json.decode(await asyncio.wait_for(hook.received.get(), 30))
            assert delivered["kind"] == "auto_reload_failed"
            assert "no payment provider" in delivered["message"]
    finally:
        await core.server.stop(grace=0)
        await core.close()
