"""The customers' calls in a cluster: two cores (in this process, each on port 0) sharing one
ledger in a real PostgreSQL, clients calling either.

The access rule is the single core's (test_sessions.py): a session reaches only its own user's
workspaces and their keys, invoices and checkouts, on whichever core it calls. And what the
cluster adds: a session made on one core works on the other at once and one signed out is
refused there at once, the starter claim and a checkout credit once however the cores race,
failed sign-ins count across cores, the request log and the alerts are the cluster's.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
from aiohttp import web

from corvex.v1 import accounts_pb2 as pb
from corvex.v1 import accounts_pb2_grpc, inference_pb2, inference_pb2_grpc
from corvex_core.config import LedgerConfig
from corvex_core.pg.server import PgServer
from corvex_core.server import Core
from tests.conftest import MODEL, core_config
from tests.core.pg.conftest import fresh_schema
from tests.core.servicers.test_sessions import (
    ADMIN,
    GHOST,
    MIXED_CALLS,
    OWNER_CALLS,
    PASSWORD,
    Customer,
    bearer,
    call,
    refusal,
    sign_up,
)

# Reserved endpoints stay a single core's (issue 17): refused by name in a cluster.
ENDPOINT_CALLS = {
    "CreateEndpoint",
    "ListEndpoints",
    "GetEndpoint",
    "ResizeEndpoint",
    "DeleteEndpoint",
    "ListReservedCapacity",
}
CUSTOMER_CALLS = {rpc: build for rpc, build in OWNER_CALLS.items() if rpc not in ENDPOINT_CALLS}
Stubs = tuple[accounts_pb2_grpc.AccountsStub, accounts_pb2_grpc.AccountsStub]


async def start(data_dir: Path, dsn: str, **customers: Any) -> Core:
    config = core_config(data_dir)
    ledger = LedgerConfig(backend="postgres", dsn=dsn, heartbeat_every_s=0.5)
    config = msgspec.structs.replace(
        config,
        ledger=ledger,
        customers=msgspec.structs.replace(
            config.customers, webhook_allow_private_addresses=True, **customers
        ),
    )
    core = Core(config)
    await core.start()
    return core


async def stop(core: Core) -> None:
    await core.server.stop(grace=0)
    await core.close()


@pytest.fixture
async def cores(pg_server: PgServer, tmp_path: Path) -> AsyncIterator[tuple[Core, Core]]:
    async with fresh_schema(pg_server, migrated=False) as dsn:
        a = await start(tmp_path / "a", dsn, sign_in_failures=2)
        b = await start(tmp_path / "b", dsn, sign_in_failures=2)
        try:
            yield a, b
        finally:
            await stop(b)
            await stop(a)


@pytest.fixture
async def stubs(cores: tuple[Core, Core]) -> AsyncIterator[Stubs]:
    a, b = cores
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as to_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as to_b,
    ):
        yield accounts_pb2_grpc.AccountsStub(to_a), accounts_pb2_grpc.AccountsStub(to_b)


async def furnished(stub: accounts_pb2_grpc.AccountsStub, email: str) -> Customer:
    """A customer with a key, an invoice (its starter claim) and a pending checkout."""
    customer = await sign_up(stub, email)
    auth, ws = bearer(customer.token), customer.workspace_id
    claimed = await stub.ClaimStarterCredits(
        pb.ClaimStarterCreditsRequest(workspace_id=ws), metadata=auth
    )
    customer.invoice = claimed.invoice.number
    key = await stub.CreateKey(pb.CreateKeyRequest(workspace_id=ws, name="k"), metadata=auth)
    customer.key_id = key.key.id
    checkout = await stub.StartCheckout(
        pb.StartCheckoutRequest(workspace_id=ws, amount_cents=500, idempotency_key="c1"),
        metadata=auth,
    )
    customer.checkout_id = checkout.id
    return customer


async def test_a_session_reaches_no_other_workspace_on_any_core(stubs: Stubs) -> None:
    a, b = stubs
    alice = await furnished(a, "alice@example.com")
    bob = await furnished(b, "bob@example.com")
    for stub in stubs:
        for rpc, build in CUSTOMER_CALLS.items():
            ghost = await refusal(stub, rpc, build(GHOST), alice.token)
            foreign = await refusal(stub, rpc, build(bob), alice.token)
            assert foreign[0] == "NOT_FOUND", rpc
            expected = ghost[1]
            for field in ("workspace_id", "key_id", "invoice", "checkout_id"):
                expected = expected.replace(getattr(GHOST, field), getattr(bob, field))
            assert foreign[1] == expected, rpc
        for rpc, mixed in MIXED_CALLS.items():
            reason, _ = await refusal(stub, rpc, mixed(alice, bob), alice.token)
            assert reason == "NOT_FOUND", rpc
    # Nothing of Bob's changed: no cap, his starter credits only, his key alive, checkout open.
    ws = await a.GetWorkspace(pb.GetWorkspaceRequest(workspace_id=bob.workspace_id), metadata=ADMIN)
    assert not ws.HasField("spend_cap_nano_usd") and ws.balance_nano_usd == 500 * 10**7
    keys = await b.ListKeys(pb.ListKeysRequest(workspace_id=bob.workspace_id), metadata=ADMIN)
    assert [k.revoked for k in keys.keys] == [False]
    checkout = await b.GetCheckout(
        pb.GetCheckoutRequest(workspace_id=bob.workspace_id, checkout_id=bob.checkout_id),
        metadata=bearer(bob.token),
    )
    assert not checkout.completed


async def test_a_session_made_on_one_core_reaches_its_own_workspace_on_the_other(
    stubs: Stubs,
) -> None:
    a, b = stubs
    alice = await furnished(a, "alice@example.com")
    for rpc, build in CUSTOMER_CALLS.items():
        if rpc == "ClaimStarterCredits":
            assert (await refusal(b, rpc, build(alice), alice.token))[0] == (
                "STARTER_CREDITS_UNAVAILABLE"
            )
            continue
        await call(b, rpc, build(alice), alice.token)
    me = await b.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(alice.token))
    assert me.email == "alice@example.com" and me.starter_claimed
    assert list(me.workspace_ids) == [alice.workspace_id]
    # Reserved endpoints are the workspace's: a session lists its own (none yet), and an
    # endpoint id it does not own is not found.
    listing = pb.ListEndpointsRequest(workspace_id=alice.workspace_id)
    listed = await b.ListEndpoints(listing, metadata=bearer(alice.token))
    assert list(listed.endpoints) == []
    unknown = pb.GetEndpointRequest(endpoint_id="ep_0123456789abcdef")
    assert (await refusal(b, "GetEndpoint", unknown, alice.token))[0] == "NOT_FOUND"


async def test_sign_up_on_one_core_sign_in_and_out_on_the_other(stubs: Stubs) -> None:
    a, b = stubs
    made = await sign_up(a, "Ada@Example.com ")
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await b.SignUp(pb.SignUpRequest(email="ada@example.com", password=PASSWORD))
    assert "exists already" in (taken.value.details() or "")
    signed_in = await b.SignIn(pb.SignInRequest(email=" ADA@example.com", password=PASSWORD))
    assert signed_in.user.id == made.user_id
    token = signed_in.session.token
    assert (await a.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token))).id == made.user_id
    # Signed out on one core: refused on the other at once (the session is looked up in
    # PostgreSQL on every call; the bound is 0, well within the cluster's 1 s).
    await a.SignOut(pb.SignOutRequest(), metadata=bearer(token))
    assert (await refusal(b, "WhoAmI", pb.WhoAmIRequest(), token))[0] == "INVALID_SESSION"
    # The first session (of the sign-up) still lives: only the one signed out ended.
    assert (await b.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(made.token))).id == made.user_id


async def test_the_starter_claim_raced_on_both_cores_credits_once(stubs: Stubs) -> None:
    a, b = stubs
    alice = await sign_up(a, "alice@example.com")
    nameless = pb.ClaimStarterCreditsRequest()
    assert (await refusal(b, "ClaimStarterCredits", nameless, alice.token))[0] == "NOT_FOUND"
    claim = pb.ClaimStarterCreditsRequest(workspace_id=alice.workspace_id)

    async def attempt(stub: accounts_pb2_grpc.AccountsStub) -> str:
        try:
            answer = await stub.ClaimStarterCredits(claim, metadata=bearer(alice.token))
        except grpc.aio.AioRpcError as exc:
            assert "claimed already" in (exc.details() or "")
            return "refused"
        assert answer.invoice.method == pb.TOP_UP_METHOD_STARTER
        return answer.invoice.number

    outcomes = await asyncio.gather(*(attempt(stub) for stub in stubs * 3))
    assert sorted(outcomes).count("refused") == 5
    invoices = await b.ListInvoices(
        pb.ListInvoicesRequest(workspace_id=alice.workspace_id), metadata=ADMIN
    )
    assert [i.amount_nano_usd for i in invoices.invoices] == [500 * 10**7]
    offer = await b.GetStarterOffer(
        pb.GetStarterOfferRequest(workspace_id=alice.workspace_id), metadata=bearer(alice.token)
    )
    assert offer.claimed and not offer.claimable


async def test_a_checkout_submitted_on_both_cores_credits_once(stubs: Stubs) -> None:
    a, b = stubs
    alice = await sign_up(a, "alice@example.com")
    auth, ws = bearer(alice.token), alice.workspace_id
    start = pb.StartCheckoutRequest(workspace_id=ws, amount_cents=1234, idempotency_key="form-1")
    first = await a.StartCheckout(start, metadata=auth)
    assert (await b.StartCheckout(start, metadata=auth)).id == first.id
    other = pb.StartCheckoutRequest(workspace_id=ws, amount_cents=999, idempotency_key="form-1")
    assert (await refusal(b, "StartCheckout", other, alice.token))[0] == "INVALID_REQUEST"
    done = pb.CompleteCheckoutRequest(workspace_id=ws, checkout_id=first.id)
    answers = await asyncio.gather(
        *(stub.CompleteCheckout(done, metadata=auth) for stub in stubs * 3)
    )
    assert sorted(x.replayed for x in answers) == [False] + [True] * 5
    assert len({x.invoice.number for x in answers}) == 1
    ws_now = await b.GetWorkspace(pb.GetWorkspaceRequest(workspace_id=ws), metadata=auth)
    assert ws_now.balance_nano_usd == 1234 * 10**7
    seen = await b.GetCheckout(
        pb.GetCheckoutRequest(workspace_id=ws, checkout_id=first.id), metadata=auth
    )
    assert seen.completed and seen.invoice_number == answers[0].invoice.number


async def test_failed_sign_ins_count_across_cores(stubs: Stubs) -> None:
    a, b = stubs
    await sign_up(a, "alice@example.com")
    wrong = pb.SignInRequest(email="alice@example.com", password="wrong password!")
    assert (await refusal(a, "SignIn", wrong, ""))[0] == "INVALID_CREDENTIALS"
    assert (await refusal(b, "SignIn", wrong, ""))[0] == "INVALID_CREDENTIALS"
    right = pb.SignInRequest(email="alice@example.com", password=PASSWORD)
    for stub in stubs:
        assert (await refusal(stub, "SignIn", right, ""))[0] == "RATE_LIMIT_EXCEEDED"
    ghost = pb.SignInRequest(email="nobody@example.com", password=PASSWORD)
    assert (await refusal(b, "SignIn", ghost, ""))[0] == "INVALID_CREDENTIALS"


async def chat(core: Core, secret: str) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ChatRequest(
            model=MODEL,
            messages=[inference_pb2.ChatMessage(role="user", content="Hi")],
            max_tokens=5,
        )
        metadata = [("authorization", f"Bearer {secret}"), ("x-request-id", "req-" + secret[-6:])]
        try:
            async for _ in stub.Chat(request, metadata=metadata, timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"


async def test_the_request_log_is_the_clusters(cores: tuple[Core, Core], stubs: Stubs) -> None:
    _, core_b = cores
    a, _ = stubs
    alice = await sign_up(a, "alice@example.com")
    auth, ws = bearer(alice.token), alice.workspace_id
    key = await a.CreateKey(pb.CreateKeyRequest(workspace_id=ws, name="k"), metadata=auth)
    assert await chat(core_b, key.secret) == "FAILED_PRECONDITION"  # $0: refused
    await a.ClaimStarterCredits(pb.ClaimStarterCreditsRequest(workspace_id=ws), metadata=auth)
    assert await chat(core_b, key.secret) == "OK"
    assert core_b.cluster is not None
    await core_b.cluster.customers.activity.written()
    log = await a.ListRecentRequests(pb.ListRecentRequestsRequest(workspace_id=ws), metadata=auth)
    assert [(r.status, r.rpc, r.key_id) for r in log.requests] == [
        ("OK", "Chat", key.key.id),
        ("INSUFFICIENT_CREDITS", "Chat", key.key.id),
    ]
    assert log.requests[0].cost_nano_usd > 0 and log.requests[1].cost_nano_usd == 0
    usage = await a.GetUsage(pb.GetUsageRequest(workspace_id=ws), metadata=auth)
    assert sum(r.cost_nano_usd for r in usage.rows) == log.requests[0].cost_nano_usd


async def test_an_alert_is_sent_once_however_many_cores_see_it(
    cores: tuple[Core, Core], stubs: Stubs
) -> None:
    a, b = stubs
    received: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await received.put((await request.read(), request.headers["Corvex-Signature"]))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        alice = await sign_up(a, "alice@example.com")
        auth, ws = bearer(alice.token), alice.workspace_id
        url = f"http://127.0.0.1:{port}/hook"
        settings = pb.SetAlertsRequest(workspace_id=ws, balance_below_cents=100, webhook_url=url)
        answer = await a.SetAlerts(settings, metadata=auth)
        assert [x.kind for x in answer.active] == ["balance_low"]
        body, signature = await asyncio.wait_for(received.get(), 10)
        assert b'"kind":"balance_low"' in body
        t = signature.split(",")[0].removeprefix("t=")
        mac = hmac.new(answer.webhook_secret.encode(), f"{t}.".encode() + body, hashlib.sha256)
        assert signature == f"t={t},v1={mac.hexdigest()}"
        # The other core sees the same alert in force, and sends nothing more.
        again = pb.SetAlertsRequest(workspace_id=ws, balance_below_cents=100, webhook_url=url)
        on_b = await b.SetAlerts(again, metadata=auth)
        assert [x.kind for x in on_b.active] == ["balance_low"]
        assert on_b.webhook_secret == answer.webhook_secret
        # Credits end the alert; a cap of $0 starts another, sent once too.
        await b.ClaimStarterCredits(pb.ClaimStarterCreditsRequest(workspace_id=ws), metadata=auth)
        read = await a.GetAlerts(pb.GetAlertsRequest(workspace_id=ws), metadata=auth)
        assert list(read.active) == []
        await b.SetSpendCap(pb.SetSpendCapRequest(workspace_id=ws, cap_cents=0), metadata=auth)
        body, _ = await asyncio.wait_for(received.get(), 10)
        assert b'"kind":"spend_cap_100"' in body
        for core in cores:
            assert core.cluster is not None
            alerter = core.cluster.customers.alerts.alerter
            await asyncio.gather(*alerter._tasks)
        assert received.empty()
    finally:
        await runner.cleanup()
