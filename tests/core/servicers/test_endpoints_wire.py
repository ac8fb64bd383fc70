"""Reserved endpoints over a real gRPC channel to an in-process core on port 0: the Accounts
calls and who may make them, the model list per key, and isolation as the engines see it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2, inference_pb2_grpc
from corvex_core.config import ReservedConfig, ReservedPoolConfig
from corvex_core.engines.base import Delta, Engine, Prompt, SamplingOptions
from corvex_core.server import Core
from tests.conftest import MODEL, core_config, started_core
from tests.core.servicers.test_inference_grpc import ADMIN, auth, chat, error_info

FLASH = "deepseek-v4-flash-1gpu"
pb = accounts_pb2


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    config = core_config(tmp_path / "data")
    pools = {FLASH: ReservedPoolConfig(replicas=2)}
    config = msgspec.structs.replace(config, reserved=ReservedConfig(pools=pools))
    async with started_core(config) as instance:
        yield instance


@pytest.fixture
async def channel(core: Core) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as chan:
        yield chan


async def workspace(channel: grpc.aio.Channel, name: str) -> tuple[str, str]:
    """A workspace with $10 and a key: (workspace id, key secret)."""
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    ws = await accounts.CreateWorkspace(
        pb.CreateWorkspaceRequest(name=name, starter_credits_cents=1000), metadata=ADMIN
    )
    key = await accounts.CreateKey(
        pb.CreateKeyRequest(workspace_id=ws.id, name="k"), metadata=ADMIN
    )
    return ws.id, key.secret


async def rent(channel: grpc.aio.Channel, workspace_id: str, **fields: Any) -> pb.Endpoint:
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    request = pb.CreateEndpointRequest(
        workspace_id=workspace_id,
        offering=fields.pop("offering", FLASH),
        replicas=fields.pop("replicas", 1),
        name=fields.pop("name", "prod"),
    )
    endpoint: pb.Endpoint = await accounts.CreateEndpoint(request, metadata=ADMIN)
    return endpoint


class Seen:
    """Which requests each engine was given, recorded at the engine seam."""

    def __init__(self) -> None:
        self.by_engine: dict[int, list[str]] = {}

    def watch(self, engine: Engine) -> None:
        generate = engine.generate
        seen = self.by_engine.setdefault(id(engine), [])

        def recording(
            request_id: str, prompt: Prompt, options: SamplingOptions
        ) -> AsyncGenerator[Delta, None]:
            seen.append(prompt.text)
            return generate(request_id, prompt, options)

        engine.generate = recording  # type: ignore[method-assign]

    def of(self, engine: Engine) -> list[str]:
        return self.by_engine[id(engine)]


async def test_rent_list_and_call_an_endpoint(core: Core, channel: grpc.aio.Channel) -> None:
    ws_id, secret = await workspace(channel, "Acme")
    endpoint = await rent(channel, ws_id, replicas=2)

    assert endpoint.status == pb.ENDPOINT_STATUS_RUNNING
    assert endpoint.model == f"acme-{ws_id[3:11]}/prod"
    assert endpoint.periods_billed == 1 and endpoint.period_seconds == 60
    assert endpoint.charged_nano_usd == 2 * 42_000_000 == endpoint.held_nano_usd
    assert endpoint.usd_per_replica_hour == "2.52"
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    ws = await accounts.GetWorkspace(pb.GetWorkspaceRequest(workspace_id=ws_id), metadata=ADMIN)
    assert ws.balance_nano_usd == 10 * 10**9 - endpoint.charged_nano_usd
    assert ws.held_nano_usd == endpoint.held_nano_usd

    stub = inference_pb2_grpc.InferenceStub(channel)
    chunks = [
        c async for c in stub.Chat(chat(model=endpoint.model, max_tokens=5), metadata=auth(secret))
    ]
    usage = chunks[-1].usage
    assert usage.completion_tokens > 0 and usage.cost_nano_usd == 0  # tokens are included

    listed = await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=auth(secret))
    mine = [m for m in listed.models if m.HasField("reserved_endpoint")]
    assert [(m.id, m.reserved_endpoint.endpoint_id) for m in mine] == [
        (endpoint.model, endpoint.id)
    ]
    assert mine[0].input_usd_per_million == mine[0].output_usd_per_million == "0.00"
    public = await stub.ListModels(inference_pb2.ListModelsRequest())
    assert not any(m.HasField("reserved_endpoint") for m in public.models)
    flash = next(m for m in public.models if m.id == MODEL)
    assert [o.id for o in flash.reserved_offerings] == [FLASH]

    rows = (await accounts.GetUsage(pb.GetUsageRequest(workspace_id=ws_id), metadata=ADMIN)).rows
    hours = [r for r in rows if r.endpoint_id]
    assert [(r.key_id, r.model, r.replica_seconds, r.cost_nano_usd) for r in hours] == [
        ("", endpoint.model, 120, endpoint.charged_nano_usd)
    ]
    tokens = [r for r in rows if r.key_id]
    assert [(r.model, r.requests, r.cost_nano_usd) for r in tokens] == [(endpoint.model, 1, 0)]

    deleted = await accounts.DeleteEndpoint(
        pb.DeleteEndpointRequest(endpoint_id=endpoint.id), metadata=ADMIN
    )
    assert deleted.status == pb.ENDPOINT_STATUS_DELETED and deleted.held_nano_usd == 0
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.Chat(chat(model=endpoint.model), metadata=auth(secret)).read()
    assert error_info(gone.value).reason == "MODEL_NOT_FOUND"


async def test_the_engine_serves_its_owner_only(core: Core, channel: grpc.aio.Channel) -> None:
    owner, owner_secret = await workspace(channel, "Owner")
    _, other_secret = await workspace(channel, "Other")
    endpoint = await rent(channel, owner)
    seen = Seen()
    (dedicated,) = core.reserved.engines()[endpoint.id]
    shared = core.catalogue.lookup(MODEL).engine
    seen.watch(dedicated)
    seen.watch(shared)
    stub = inference_pb2_grpc.InferenceStub(channel)

    async def ask(secret: str, model: str, prompt: str) -> None:
        await stub.Chat(chat(prompt, model=model, max_tokens=2), metadata=auth(secret)).read()

    await ask(owner_secret, endpoint.model, "owner to the endpoint")
    await ask(owner_secret, MODEL, "owner to the shared fleet")
    await ask(other_secret, MODEL, "other to the shared fleet")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ask(other_secret, endpoint.model, "other to the endpoint")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(refused.value).reason == "MODEL_NOT_FOUND"

    dedicated_prompts, shared_prompts = seen.of(dedicated), seen.of(shared)
    assert len(dedicated_prompts) == 1 and "owner to the endpoint" in dedicated_prompts[0]
    assert len(shared_prompts) == 2 and all("shared fleet" in p for p in shared_prompts)


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("CreateEndpoint", pb.CreateEndpointRequest(workspace_id="ws_x", offering=FLASH)),
        ("ListEndpoints", pb.ListEndpointsRequest()),
        ("GetEndpoint", pb.GetEndpointRequest(endpoint_id="ep_nope")),
        ("ResizeEndpoint", pb.ResizeEndpointRequest(endpoint_id="ep_nope", replicas=2)),
        ("DeleteEndpoint", pb.DeleteEndpointRequest(endpoint_id="ep_nope")),
        ("ListReservedCapacity", pb.ListReservedCapacityRequest()),
    ],
)
async def test_every_endpoint_call_needs_the_credential(
    channel: grpc.aio.Channel, method: str, request_message: Any
) -> None:
    """Without the admin token (or, later, the owner's session) nothing is done, and an
    unknown endpoint id is refused the same way as a known one."""
    call = getattr(accounts_pb2_grpc.AccountsStub(channel), method)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(request_message, metadata=(("authorization", "Bearer wrong"),))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).reason == "INVALID_ADMIN_TOKEN"


async def test_capacity_and_money_refusals(core: Core, channel: grpc.aio.Channel) -> None:
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    poor = await accounts.CreateWorkspace(
        pb.CreateWorkspaceRequest(name="poor", starter_credits_cents=0), metadata=ADMIN
    )
    with pytest.raises(grpc.aio.AioRpcError) as unpaid:
        await rent(channel, poor.id)
    assert unpaid.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(unpaid.value).reason == "INSUFFICIENT_CREDITS"
    assert "first minute" in (unpaid.value.details() or "")

    ws_id, _ = await workspace(channel, "Acme")
    await rent(channel, ws_id, replicas=2)

    with pytest.raises(grpc.aio.AioRpcError) as full:
        await rent(channel, ws_id, name="more")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(full.value)
    assert (info.reason, info.metadata["replicas_free"]) == ("CAPACITY_UNAVAILABLE", "0")

    with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
        await rent(channel, ws_id, offering="kimi-k2.6-8gpu", name="kimi")
    assert "not offered on this core" in (elsewhere.value.details() or "")
    capacity = await accounts.ListReservedCapacity(pb.ListReservedCapacityRequest(), metadata=ADMIN)
    by_offering = {c.offering.id: (c.replicas_total, c.replicas_free) for c in capacity.offerings}
    assert by_offering == {
        FLASH: (2, 0),
        "minimax-m2.5-2gpu": (0, 0),
        "glm-5.1-fp8-8gpu": (0, 0),
        "kimi-k2.6-8gpu": (0, 0),
    }
    listed = await accounts.ListEndpoints(pb.ListEndpointsRequest(), metadata=ADMIN)
    assert len(listed.endpoints) == 1
