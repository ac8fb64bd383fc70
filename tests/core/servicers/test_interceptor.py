"""What every Corvex RPC goes through: the recovery gate, undecodable messages, bounded error
texts, strict identifiers, quiet cancellations. Real cores on port 0, a real channel."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import msgspec
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2, inference_pb2_grpc
from corvex_core.server import Core
from tests.conftest import core_config
from tests.core.servicers.test_inference_grpc import ADMIN, auth, chat, error_info, make_key


def retry_delay_s(exc: grpc.aio.AioRpcError) -> float | None:
    status = status_pb2.Status.FromString(dict(exc.trailing_metadata())["grpc-status-details-bin"])
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToNanoseconds()) / 1e9
    return None


async def test_nothing_is_read_or_written_before_the_ledger_is_recovered(tmp_path: Path) -> None:
    # Engines that take a second to load keep the core STARTING (port open, health
    # NOT_SERVING) for that second after the journal is replayed: a window to call into.
    data = tmp_path / "data"
    first = Core(core_config(data))
    await first.start()
    created = first.ledger.create_workspace("before", 500 * 10**7)[0]
    await first.durable()
    await first.server.stop(grace=0)
    await first.close()

    core = Core(core_config(data, load_ms=1500))
    starting = asyncio.create_task(core.start())
    try:
        while not core.port:  # noqa: ASYNC110  (the port is known once start() binds it)
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            checked = await health.Check(health_pb2.HealthCheckRequest())
            assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
            admin = accounts_pb2_grpc.AccountsStub(channel)
            inference = inference_pb2_grpc.InferenceStub(channel)
            calls = [
                admin.CreateWorkspace(
                    accounts_pb2.CreateWorkspaceRequest(name="x"), metadata=ADMIN
                ),
                admin.ListWorkspaces(accounts_pb2.ListWorkspacesRequest(), metadata=ADMIN),
                admin.GetWorkspace(
                    accounts_pb2.GetWorkspaceRequest(workspace_id=created.id), metadata=ADMIN
                ),
                inference.ListModels(inference_pb2.ListModelsRequest()),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_info(refused.value).reason == "SERVICE_UNAVAILABLE"
                assert retry_delay_s(refused.value) == 1.0
            await starting
            listed = await admin.ListWorkspaces(
                accounts_pb2.ListWorkspacesRequest(), metadata=ADMIN
            )
            # Only what the journal holds: the refused CreateWorkspace left nothing behind.
            assert [ws.name for ws in listed.workspaces] == ["before"]
            assert listed.workspaces[0].balance_nano_usd == 500 * 10**7
    finally:
        await core.server.stop(grace=0)
        await core.close()


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("/corvex.v1.Accounts/GetWorkspace", b"\xff\xff\xff\xff"),  # garbage
        ("/corvex.v1.Inference/Chat", b"\x0a\x10deepseek"),  # truncated string field
        ("/corvex.v1.Accounts/GetWorkspace", b"\x0a\x02\xff\xfe"),  # invalid UTF-8 in a string
        ("/corvex.v1.Inference/Tokenize", b"\x12"),  # a tag with no value
    ],
)
async def test_a_malformed_message_is_an_invalid_argument_counted_and_logged(
    core: Core, method: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        if method.endswith("/Chat"):
            call = channel.unary_stream(method)(body, metadata=ADMIN)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
        else:
            with (
                caplog.at_level(logging.INFO, logger="corvex.requests"),
                pytest.raises(grpc.aio.AioRpcError) as refused,
            ):
                await channel.unary_unary(method)(body, metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed protobuf" in (refused.value.details() or "")
    assert error_info(refused.value).reason == "INVALID_REQUEST"
    rpc = method.rsplit("/", 1)[-1]
    counted = core.telemetry.registry.get_sample_value(
        "corvex_requests_total", {"rpc": rpc, "model": "", "status": "INVALID_REQUEST"}
    )
    assert counted == 1


async def test_errors_quote_a_bounded_part_of_what_the_caller_sent(
    channel: grpc.aio.Channel,
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    for request, code in (
        (chat(model="m" * 9000), grpc.StatusCode.NOT_FOUND),
        (chat(model="é" * 3000), grpc.StatusCode.NOT_FOUND),
        (
            inference_pb2.ChatRequest(
                model="deepseek-ai/DeepSeek-V4-Flash",
                messages=[inference_pb2.ChatMessage(role="r" * 9000, content="hi")],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Chat(request, metadata=auth(secret)):
                pass
        assert refused.value.code() == code
        details = refused.value.details() or ""
        assert 0 < len(details) < 400
        assert sum(len(v) for _, v in refused.value.trailing_metadata()) < 2000


@pytest.mark.parametrize("number", ["²", "٣", "INV-" + "9" * 5000, "", "INV-", "3.0", "-1"])
async def test_invoice_numbers_are_ascii_digits_of_bounded_length(
    channel: grpc.aio.Channel, number: str
) -> None:
    admin = accounts_pb2_grpc.AccountsStub(channel)
    await admin.CreateWorkspace(
        accounts_pb2.CreateWorkspaceRequest(name="w", starter_credits_cents=300), metadata=ADMIN
    )  # it has invoice INV-000001 ... and "٣" must not read as 3 either
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.GetInvoice(accounts_pb2.GetInvoiceRequest(number=number), metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["param"] == "number"


async def test_an_invoice_format_this_core_does_not_know_is_refused(
    channel: grpc.aio.Channel,
) -> None:
    admin = accounts_pb2_grpc.AccountsStub(channel)
    await admin.CreateWorkspace(
        accounts_pb2.CreateWorkspaceRequest(name="w", starter_credits_cents=300), metadata=ADMIN
    )
    formats = {f: accounts_pb2.GetInvoiceRequest(number="INV-000001", format=f) for f in (0, 1, 3)}
    types = [(await admin.GetInvoice(r, metadata=ADMIN)).content_type for r in formats.values()]
    assert types == ["application/json", "application/json", "application/pdf"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        request = accounts_pb2.GetInvoiceRequest(number="INV-000001", format=99)  # type: ignore[arg-type]
        await admin.GetInvoice(request, metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["param"] == "format"


async def test_calls_cancelled_as_they_start_are_not_errors(
    core: Core, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    with caplog.at_level(logging.ERROR):
        for delay in [0.0, 0.0005, 0.001, 0.002] * 25:
            call = stub.Chat(chat(max_tokens=50), metadata=auth(secret))
            await asyncio.sleep(delay)
            call.cancel()
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    internal = core.telemetry.registry.get_sample_value(
        "corvex_requests_total",
        {"rpc": "Chat", "model": "deepseek-ai/DeepSeek-V4-Flash", "status": "INTERNAL"},
    )
    assert internal is None


async def test_tokenize_counts_against_the_keys_requests_per_minute(
    channel: grpc.aio.Channel,
) -> None:
    secret = await make_key(channel, requests_per_minute=2)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.TokenizeRequest(model="deepseek-ai/DeepSeek-V4-Flash", text="a b c")
    for _ in range(2):
        assert (await stub.Tokenize(request, metadata=auth(secret))).token_count == 3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Tokenize(request, metadata=auth(secret))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(refused.value).reason == "RATE_LIMIT_EXCEEDED"


async def test_messages_beyond_the_request_bound_are_refused_by_grpc(tmp_path: Path) -> None:
    config = msgspec.structs.replace(core_config(tmp_path / "data"), max_request_bytes=64 * 1024)
    core = Core(config)
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.TokenizeRequest(model="m", text="x" * 100_000)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Tokenize(request)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_embeddings_are_bounded_in_inputs_and_tokens(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    model = "deepseek-ai/DeepSeek-V4-Flash"
    too_many = inference_pb2.EmbedRequest(
        model=model, inputs=[inference_pb2.EmbedInput(text="a")] * 2049
    )
    # 2,048 inputs of 200 tokens each: within the count, past the 300,000-token bound.
    too_long = inference_pb2.EmbedRequest(
        model=model, inputs=[inference_pb2.EmbedInput(text="word " * 200)] * 2048
    )
    for request in (too_many, too_long):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Embed(request, metadata=auth(secret))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(refused.value).metadata["param"] == "input"
