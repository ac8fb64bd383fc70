"""Sessions and authorization on the Accounts service, over a real channel to a core on port 0.

The rule under test (corvex_core.access): a session reaches only its own user's workspaces and
their keys, invoices and checkouts; anything else answers exactly what an unknown id answers.
Every Accounts RPC is listed here, so a new one fails this test until its access is checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from corvex.v1 import accounts_pb2 as pb
from corvex.v1 import accounts_pb2_grpc
from corvex_core.config import CoreConfig, ReservedConfig, ReservedPoolConfig
from corvex_core.server import Core
from tests.conftest import ADMIN_TOKEN, core_config
from tests.core.servicers.test_inference_grpc import error_info

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
FLASH = "deepseek-v4-flash-1gpu"
PASSWORD = "correct horse battery"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Customer(msgspec.Struct):
    token: str
    user_id: str
    workspace_id: str
    key_id: str = ""
    invoice: str = ""
    checkout_id: str = ""
    endpoint_id: str = ""


async def sign_up(stub: accounts_pb2_grpc.AccountsStub, email: str) -> Customer:
    reply = await stub.SignUp(pb.SignUpRequest(email=email, password=PASSWORD))
    return Customer(reply.session.token, reply.user.id, reply.user.workspace_ids[0])


async def furnished(stub: accounts_pb2_grpc.AccountsStub, email: str) -> Customer:
    """A customer with a key, an invoice (its starter claim) and a pending checkout."""
    customer = await sign_up(stub, email)
    auth = bearer(customer.token)
    ws = customer.workspace_id
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
    endpoint = await stub.CreateEndpoint(
        pb.CreateEndpointRequest(workspace_id=ws, offering=FLASH, replicas=1, name="prod"),
        metadata=auth,
    )
    customer.endpoint_id = endpoint.id
    return customer


def config_with_pool(data_dir: Path) -> CoreConfig:
    """The test core's configuration, with a capacity pool for reserved endpoints."""
    config = core_config(data_dir)
    pools = {FLASH: ReservedPoolConfig(replicas=4)}
    return msgspec.structs.replace(config, reserved=ReservedConfig(pools=pools))


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    instance = Core(config_with_pool(tmp_path / "data"))
    await instance.start()
    try:
        yield instance
    finally:
        await stop(instance)


@pytest.fixture
async def channel(core: Core) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as chan:
        yield chan


async def start(tmp_path: Path, **customers: Any) -> Core:
    config = config_with_pool(tmp_path / "data")
    if customers:
        config = msgspec.structs.replace(
            config, customers=msgspec.structs.replace(config.customers, **customers)
        )
    core = Core(config)
    await core.start()
    return core


async def stop(core: Core) -> None:
    await core.server.stop(grace=0)
    await core.close()


@pytest.fixture
async def stub(
    core: Core, channel: grpc.aio.Channel
) -> AsyncIterator[accounts_pb2_grpc.AccountsStub]:
    yield accounts_pb2_grpc.AccountsStub(channel)


# Each resource-naming call, as a request naming the resources of `c` (a Customer). The ids of
# another customer must be as unreachable as ids that do not exist.
Build = Callable[[Customer], Any]
OWNER_CALLS: dict[str, Build] = {
    "GetWorkspace": lambda c: pb.GetWorkspaceRequest(workspace_id=c.workspace_id),
    "SetSpendCap": lambda c: pb.SetSpendCapRequest(workspace_id=c.workspace_id, cap_cents=100),
    "SetAutoReload": lambda c: pb.SetAutoReloadRequest(workspace_id=c.workspace_id),
    "CreateKey": lambda c: pb.CreateKeyRequest(workspace_id=c.workspace_id, name="x"),
    "ListKeys": lambda c: pb.ListKeysRequest(workspace_id=c.workspace_id),
    "RevokeKey": lambda c: pb.RevokeKeyRequest(key_id=c.key_id),
    "SetKeyLimits": lambda c: pb.SetKeyLimitsRequest(key_id=c.key_id),
    "GetUsage": lambda c: pb.GetUsageRequest(workspace_id=c.workspace_id),
    "ListInvoices": lambda c: pb.ListInvoicesRequest(workspace_id=c.workspace_id),
    "GetInvoice": lambda c: pb.GetInvoiceRequest(number=c.invoice),
    "GetStarterOffer": lambda c: pb.GetStarterOfferRequest(workspace_id=c.workspace_id),
    "ClaimStarterCredits": lambda c: pb.ClaimStarterCreditsRequest(workspace_id=c.workspace_id),
    "StartCheckout": lambda c: pb.StartCheckoutRequest(
        workspace_id=c.workspace_id, amount_cents=500, idempotency_key="x"
    ),
    "GetCheckout": lambda c: pb.GetCheckoutRequest(
        workspace_id=c.workspace_id, checkout_id=c.checkout_id
    ),
    "CompleteCheckout": lambda c: pb.CompleteCheckoutRequest(
        workspace_id=c.workspace_id, checkout_id=c.checkout_id
    ),
    "GetAlerts": lambda c: pb.GetAlertsRequest(workspace_id=c.workspace_id),
    "SetAlerts": lambda c: pb.SetAlertsRequest(workspace_id=c.workspace_id),
    "ListRecentRequests": lambda c: pb.ListRecentRequestsRequest(workspace_id=c.workspace_id),
    # Reserved endpoints (issue 17): by the workspace, or by the endpoint.
    "CreateEndpoint": lambda c: pb.CreateEndpointRequest(
        workspace_id=c.workspace_id, offering=FLASH, replicas=1, name="other"
    ),
    "ListEndpoints": lambda c: pb.ListEndpointsRequest(workspace_id=c.workspace_id),
    "GetEndpoint": lambda c: pb.GetEndpointRequest(endpoint_id=c.endpoint_id),
    "ResizeEndpoint": lambda c: pb.ResizeEndpointRequest(endpoint_id=c.endpoint_id, replicas=2),
    "DeleteEndpoint": lambda c: pb.DeleteEndpointRequest(endpoint_id=c.endpoint_id),
}
# Calls that name a key as well as a workspace: the key of another workspace is refused even
# with the caller's own workspace.
MIXED_CALLS: dict[str, Callable[[Customer, Customer], Any]] = {
    "GetUsage": lambda own, other: pb.GetUsageRequest(
        workspace_id=own.workspace_id, key_id=other.key_id
    ),
    "ListRecentRequests": lambda own, other: pb.ListRecentRequestsRequest(
        workspace_id=own.workspace_id, key_id=other.key_id
    ),
    "GetCheckout": lambda own, other: pb.GetCheckoutRequest(
        workspace_id=own.workspace_id, checkout_id=other.checkout_id
    ),
    "CompleteCheckout": lambda own, other: pb.CompleteCheckoutRequest(
        workspace_id=own.workspace_id, checkout_id=other.checkout_id
    ),
}
ADMIN_CALLS: dict[str, Any] = {
    "CreateWorkspace": pb.CreateWorkspaceRequest(name="x"),
    "ListWorkspaces": pb.ListWorkspacesRequest(),
    "AddCredits": None,  # names a workspace: built per test
    "ListReservedCapacity": pb.ListReservedCapacityRequest(),
}
# An empty workspace means every workspace: the admin's alone.
ADMIN_ONLY_FORMS: dict[str, Any] = {"ListEndpoints": pb.ListEndpointsRequest()}
SELF_CALLS = {"SignUp", "SignIn", "SignOut", "WhoAmI"}
GHOST = Customer(
    token="",
    user_id="usr_0000000000000000",
    workspace_id="ws_0000000000000000",
    key_id="key_0000000000000000",
    invoice="INV-999999",
    checkout_id="chk_000000000000000000000000",
    endpoint_id="ep_0000000000000000",
)


def test_every_accounts_rpc_has_a_case() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["Accounts"].methods_by_name)
    assert methods == set(OWNER_CALLS) | set(ADMIN_CALLS) | SELF_CALLS


async def call(stub: Any, rpc: str, request: Any, token: str) -> Any:
    return await getattr(stub, rpc)(request, metadata=bearer(token))


async def refusal(stub: Any, rpc: str, request: Any, token: str) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub, rpc, request, token)
    return error_info(caught.value).reason, caught.value.details() or ""


async def test_a_session_reaches_no_other_workspace(stub: accounts_pb2_grpc.AccountsStub) -> None:
    alice = await furnished(stub, "alice@example.com")
    bob = await furnished(stub, "bob@example.com")
    for rpc, build in OWNER_CALLS.items():
        ghost = await refusal(stub, rpc, build(GHOST), alice.token)
        foreign = await refusal(stub, rpc, build(bob), alice.token)
        assert foreign[0] == "NOT_FOUND", rpc
        # Word for word what an id that does not exist gets, but for the id itself.
        expected = ghost[1]
        for field in ("workspace_id", "key_id", "invoice", "checkout_id", "endpoint_id"):
            expected = expected.replace(getattr(GHOST, field), getattr(bob, field))
        assert foreign[1] == expected, rpc
    for rpc, mixed in MIXED_CALLS.items():
        reason, _ = await refusal(stub, rpc, mixed(alice, bob), alice.token)
        assert reason == "NOT_FOUND", rpc
    # Nothing of Bob's changed: his key lives, his endpoint runs, no cap was set.
    ws = await stub.GetWorkspace(
        pb.GetWorkspaceRequest(workspace_id=bob.workspace_id), metadata=ADMIN
    )
    assert not ws.HasField("spend_cap_nano_usd")
    # Nothing was credited: the starter claim, less what his own endpoint cost.
    assert ws.balance_nano_usd + ws.month_spend_nano_usd == 500 * 10**7
    keys = await stub.ListKeys(pb.ListKeysRequest(workspace_id=bob.workspace_id), metadata=ADMIN)
    assert [k.revoked for k in keys.keys] == [False]
    endpoint = await stub.GetEndpoint(
        pb.GetEndpointRequest(endpoint_id=bob.endpoint_id), metadata=ADMIN
    )
    assert endpoint.replicas == 1 and endpoint.status != pb.ENDPOINT_STATUS_DELETED


async def test_a_session_reaches_its_own_workspace(stub: accounts_pb2_grpc.AccountsStub) -> None:
    alice = await furnished(stub, "alice@example.com")
    for rpc, build in OWNER_CALLS.items():
        if rpc == "ClaimStarterCredits":
            assert (await refusal(stub, rpc, build(alice), alice.token))[0] == (
                "STARTER_CREDITS_UNAVAILABLE"
            )
            continue
        await call(stub, rpc, build(alice), alice.token)
    me = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(alice.token))
    assert me.email == "alice@example.com" and me.starter_claimed


async def test_admin_calls_refuse_sessions(stub: accounts_pb2_grpc.AccountsStub) -> None:
    alice = await sign_up(stub, "alice@example.com")
    requests = {
        **ADMIN_CALLS,
        "AddCredits": pb.AddCreditsRequest(
            workspace_id=alice.workspace_id, amount_cents=100, idempotency_key="free money"
        ),
    }
    for rpc, request in {**requests, **ADMIN_ONLY_FORMS}.items():
        assert (await refusal(stub, rpc, request, alice.token))[0] == "INVALID_ADMIN_TOKEN", rpc
    # And the user-only calls refuse the admin: there is no user to act for.
    assert (await refusal(stub, "WhoAmI", pb.WhoAmIRequest(), ADMIN_TOKEN))[0] == (
        "INVALID_SESSION"
    )
    claim = pb.ClaimStarterCreditsRequest(workspace_id=alice.workspace_id)
    assert (await refusal(stub, "ClaimStarterCredits", claim, ADMIN_TOKEN))[0] == (
        "INVALID_SESSION"
    )


async def test_unknown_signed_out_and_missing_credentials(
    stub: accounts_pb2_grpc.AccountsStub,
) -> None:
    alice = await sign_up(stub, "alice@example.com")
    request = pb.GetWorkspaceRequest(workspace_id=alice.workspace_id)
    await call(stub, "GetWorkspace", request, alice.token)
    await call(stub, "SignOut", pb.SignOutRequest(), alice.token)
    assert (await refusal(stub, "GetWorkspace", request, alice.token))[0] == "INVALID_SESSION"
    forged = "corvex-session-" + "A" * 43
    assert (await refusal(stub, "GetWorkspace", request, forged))[0] == "INVALID_SESSION"
    assert (await refusal(stub, "GetWorkspace", request, ""))[0] == "INVALID_ADMIN_TOKEN"


async def test_sign_up_gives_nothing_until_the_claim_which_is_once(
    stub: accounts_pb2_grpc.AccountsStub,
) -> None:
    alice = await sign_up(stub, "Alice@Example.com")
    auth = bearer(alice.token)
    ws = await stub.GetWorkspace(
        pb.GetWorkspaceRequest(workspace_id=alice.workspace_id), metadata=auth
    )
    assert ws.balance_nano_usd == 0
    offer = await stub.GetStarterOffer(
        pb.GetStarterOfferRequest(workspace_id=alice.workspace_id), metadata=auth
    )
    assert offer.claimable and offer.amount_nano_usd == 500 * 10**7
    claim = pb.ClaimStarterCreditsRequest(workspace_id=alice.workspace_id)
    first = await stub.ClaimStarterCredits(claim, metadata=auth)
    assert first.invoice.method == pb.TOP_UP_METHOD_STARTER
    assert first.workspace.balance_nano_usd == 500 * 10**7
    reason, message = await refusal(stub, "ClaimStarterCredits", claim, alice.token)
    assert reason == "STARTER_CREDITS_UNAVAILABLE" and first.invoice.number in message
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await stub.SignUp(pb.SignUpRequest(email="alice@example.COM", password=PASSWORD))
    assert error_info(taken.value).reason == "EMAIL_TAKEN"


async def test_sign_up_validates_its_fields(stub: accounts_pb2_grpc.AccountsStub) -> None:
    for email, password, param in (
        ("not-an-email", PASSWORD, "email"),
        ("a@b", PASSWORD, "email"),
        ("a@example.com", "short", "password"),
        ("a@example.com", "x" * 201, "password"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SignUp(pb.SignUpRequest(email=email, password=password))
        info = error_info(caught.value)
        assert (info.reason, info.metadata["param"]) == ("INVALID_REQUEST", param)
        assert password not in (caught.value.details() or "")


async def test_checkout_credits_once(stub: accounts_pb2_grpc.AccountsStub) -> None:
    alice = await sign_up(stub, "alice@example.com")
    auth, ws = bearer(alice.token), alice.workspace_id
    start = pb.StartCheckoutRequest(workspace_id=ws, amount_cents=1234, idempotency_key="form-1")
    first = await stub.StartCheckout(start, metadata=auth)
    assert (await stub.StartCheckout(start, metadata=auth)).id == first.id
    done = pb.CompleteCheckoutRequest(workspace_id=ws, checkout_id=first.id)
    credited = await stub.CompleteCheckout(done, metadata=auth)
    again = await stub.CompleteCheckout(done, metadata=auth)
    assert not credited.replayed and again.replayed
    assert again.invoice.number == credited.invoice.number
    assert again.workspace.balance_nano_usd == 1234 * 10**7
    small = pb.StartCheckoutRequest(workspace_id=ws, amount_cents=0, idempotency_key="form-2")
    assert (await refusal(stub, "StartCheckout", small, alice.token))[0] == "INVALID_REQUEST"


async def test_sign_in_failures_are_limited_per_email(tmp_path: Path) -> None:
    core = await start(tmp_path, sign_in_failures=2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            await sign_up(stub, "alice@example.com")
            wrong = pb.SignInRequest(email="alice@example.com", password="wrong password!")
            for _ in range(2):
                assert (await refusal(stub, "SignIn", wrong, ""))[0] == "INVALID_CREDENTIALS"
            right = pb.SignInRequest(email="alice@example.com", password=PASSWORD)
            assert (await refusal(stub, "SignIn", right, ""))[0] == "RATE_LIMIT_EXCEEDED"
            # Another email is not held up by Alice's.
            ghost = pb.SignInRequest(email="nobody@example.com", password=PASSWORD)
            assert (await refusal(stub, "SignIn", ghost, ""))[0] == "INVALID_CREDENTIALS"
    finally:
        await stop(core)


async def test_users_sessions_and_claims_survive_a_restart(tmp_path: Path) -> None:
    core = await start(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            alice = await furnished(stub, "alice@example.com")
            ended = await sign_up(stub, "bob@example.com")
            await call(stub, "SignOut", pb.SignOutRequest(), ended.token)
    finally:
        await stop(core)
    core = await start(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            me = await call(stub, "WhoAmI", pb.WhoAmIRequest(), alice.token)
            assert me.starter_claimed and me.workspace_ids == [alice.workspace_id]
            claim = pb.ClaimStarterCreditsRequest(workspace_id=alice.workspace_id)
            assert (await refusal(stub, "ClaimStarterCredits", claim, alice.token))[0] == (
                "STARTER_CREDITS_UNAVAILABLE"
            )
            assert (await refusal(stub, "WhoAmI", pb.WhoAmIRequest(), ended.token))[0] == (
                "INVALID_SESSION"
            )
            signed_in = await stub.SignIn(
                pb.SignInRequest(email="bob@example.com", password=PASSWORD)
            )
            assert signed_in.user.id == ended.user_id
    finally:
        await stop(core)


async def test_sessions_expire(tmp_path: Path) -> None:
    core = await start(tmp_path, session_ttl_hours=0.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            alice = await sign_up(stub, "alice@example.com")
            assert (await refusal(stub, "WhoAmI", pb.WhoAmIRequest(), alice.token))[0] == (
                "INVALID_SESSION"
            )
    finally:
        await stop(core)


async def test_a_promotion_that_ended_cannot_be_claimed(tmp_path: Path) -> None:
    from corvex_core.config import StarterPromotionConfig

    core = await start(tmp_path, starter=StarterPromotionConfig(ends="2020-01-31"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            alice = await sign_up(stub, "alice@example.com")
            claim = pb.ClaimStarterCreditsRequest(workspace_id=alice.workspace_id)
            reason, message = await refusal(stub, "ClaimStarterCredits", claim, alice.token)
            assert reason == "STARTER_CREDITS_UNAVAILABLE" and "2020-01-31" in message
    finally:
        await stop(core)
