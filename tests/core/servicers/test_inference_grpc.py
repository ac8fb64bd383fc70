"""The Inference and Accounts services over a real gRPC channel to a core on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2, inference_pb2_grpc
from corvex_core.server import Core
from tests.conftest import ADMIN_TOKEN, MODEL, core_config

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


async def make_key(channel: grpc.aio.Channel, cents: int = 1000, **limits: int) -> str:
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    ws = await accounts.CreateWorkspace(
        accounts_pb2.CreateWorkspaceRequest(name="t", starter_credits_cents=cents), metadata=ADMIN
    )
    created = await accounts.CreateKey(
        accounts_pb2.CreateKeyRequest(
            workspace_id=ws.id, name="k", limits=accounts_pb2.KeyLimits(**limits)
        ),
        metadata=ADMIN,
    )
    return created.secret


def auth(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"), ("x-request-id", "req-test-1"))


SAMPLING_FIELDS = frozenset(inference_pb2.Sampling.DESCRIPTOR.fields_by_name)


def chat(prompt: str = "hello", **fields: Any) -> inference_pb2.ChatRequest:
    """A chat request; sampling fields (temperature, ignore_eos, n, ...) go in `sampling`."""
    sampling = {k: fields.pop(k) for k in list(fields) if k in SAMPLING_FIELDS}
    return inference_pb2.ChatRequest(
        model=fields.pop("model", MODEL),
        messages=[inference_pb2.ChatMessage(role="user", content=prompt)],
        sampling=inference_pb2.Sampling(**sampling),
        **fields,
    )


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(exc.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def test_chat_stream_counts_and_usage(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    call = stub.Chat(chat(max_tokens=10, ignore_eos=True), metadata=auth(secret))
    chunks = [chunk async for chunk in call]
    assert dict(await call.initial_metadata())["x-request-id"] == "req-test-1"
    final = chunks[-1]
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert all(c.finish_reason == 0 for c in chunks[:-1])
    # Per-chunk counts add up to the cumulative usage of the final chunk.
    assert sum(c.completion_tokens for c in chunks) == final.usage.completion_tokens == 10
    usage = final.usage
    assert usage.total_tokens == usage.prompt_tokens + 10
    assert usage.cost_nano_usd == usage.prompt_tokens * 350 + 10 * 1400
    assert usage.rate_card_version == "2026-11-01"


@pytest.mark.parametrize(
    ("request_fields", "code", "reason", "param"),
    [
        ({"model": "no/such"}, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", None),
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "max_tokens"),
        ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "temperature"),
        ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "top_p"),
        ({"stop": ["a"] * 5}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "stop"),
        (
            {"max_tokens": 10**6},
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONTEXT_LENGTH_EXCEEDED",
            "messages",
        ),
    ],
)
async def test_chat_errors_carry_error_info(
    channel: grpc.aio.Channel,
    request_fields: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
    param: str | None,
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Chat(chat(**request_fields), metadata=auth(secret)):
            pass
    assert exc.value.code() == code
    info = error_info(exc.value)
    assert info.reason == reason and info.domain == "corvex.ai"
    if param:
        assert info.metadata["param"] == param


async def test_unauthenticated_and_insufficient_credits(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        async for _ in stub.Chat(chat()):
            pass
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(missing.value).reason == "INVALID_API_KEY"
    broke = await make_key(channel, cents=0)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Chat(chat(), metadata=auth(broke)):
            pass
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(exc.value)
    assert info.reason == "INSUFFICIENT_CREDITS" and info.metadata["limit"] == "balance"


async def test_rate_limit_carries_retry_info(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel, requests_per_minute=1)
    stub = inference_pb2_grpc.InferenceStub(channel)
    async for _ in stub.Chat(chat(max_tokens=1), metadata=auth(secret)):
        pass
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Chat(chat(max_tokens=1), metadata=auth(secret)):
            pass
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(exc.value.trailing_metadata())
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert 50 < retry.retry_delay.seconds <= 60
    # Where the key's limits stand, as on an answer.
    assert trailing["x-ratelimit-limit-requests"] == "1"
    assert trailing["x-ratelimit-remaining-requests"] == "0"
    assert trailing["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.parametrize("first", [True, False])
async def test_two_authorization_values_are_refused(channel: grpc.aio.Channel, first: bool) -> None:
    secret = await make_key(channel)
    pair = [("authorization", f"Bearer {secret}"), ("authorization", "Bearer corvex-bad")]
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Chat(chat(max_tokens=1), metadata=pair if first else pair[::-1]):
            pass
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one authorization" in (exc.value.details() or "")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": inference_pb2.ResponseFormat(type=99)}, "response_format.type"),  # type: ignore[arg-type]
        ({"tool_choice": inference_pb2.ToolChoice(mode=99)}, "tool_choice.mode"),  # type: ignore[arg-type]
    ],
)
async def test_an_enum_value_this_core_does_not_know_is_invalid_argument(
    channel: grpc.aio.Channel, fields: dict[str, Any], param: str
) -> None:
    # proto3 enums are open: a client built from a newer proto may send any number.
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Chat(chat(max_tokens=1, **fields), metadata=auth(secret)):
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(exc.value)
    assert (info.reason, info.metadata["param"]) == ("INVALID_REQUEST", param)


async def test_embed_models_tokenize(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    result = await stub.Embed(
        inference_pb2.EmbedRequest(
            model=MODEL, inputs=[inference_pb2.EmbedInput(text="a b c")], dimensions=16
        ),
        metadata=auth(secret),
    )
    assert len(result.embeddings[0].values) == 16
    assert result.usage.prompt_tokens == 3 and result.usage.cost_nano_usd == 3 * 350
    models = await stub.ListModels(inference_pb2.ListModelsRequest())
    assert models.rate_card_version == "2026-11-01"
    assert [m.id for m in models.models][-1] == MODEL
    assert models.models[-1].engine == "simulated"
    tokens = await stub.Tokenize(
        inference_pb2.TokenizeRequest(model=MODEL, text="a b, c"), metadata=auth(secret)
    )
    assert tokens.token_count == 4
    with pytest.raises(grpc.aio.AioRpcError) as nothing:  # neither messages nor text
        await stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL), metadata=auth(secret))
    assert nothing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(nothing.value).metadata["param"] == "text"


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "corvex.v1.Inference", "corvex.v1.Accounts"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [r async for r in reflection.ServerReflectionInfo(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"corvex.v1.Inference", "corvex.v1.Accounts", "grpc.health.v1.Health"} <= names


async def test_accounts_need_the_admin_token(channel: grpc.aio.Channel) -> None:
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await accounts.ListWorkspaces(accounts_pb2.ListWorkspacesRequest(), metadata=metadata)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(exc.value).reason == "INVALID_ADMIN_TOKEN"


async def test_cancelled_call_aborts_engine_request_and_charges_what_was_produced(
    tmp_path: Path,
) -> None:
    core = Core(core_config(tmp_path / "data", tpot_ms=20))
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            secret = await make_key(channel)
            engine = core.catalogue.lookup(MODEL).engine
            stub = inference_pb2_grpc.InferenceStub(channel)
            call = stub.Chat(chat(max_tokens=5000, ignore_eos=True), metadata=auth(secret))
            received = 0
            async for chunk in call:
                received += chunk.completion_tokens
                if received >= 3:
                    break
            assert engine.stats().running == 1
            call.cancel()
            for _ in range(100):
                if engine.stats().running == 0 and core.ledger.held_total_nano() == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().running == 0
            assert core.ledger.held_total_nano() == 0
            ws = core.ledger.workspaces()[0]
            [row] = core.ledger.usage(ws.id)
            # Charged for what the engine produced before the abort: far less than held.
            assert received <= row.completion_tokens < 50
            assert ws.balance_nano == 1000 * 10**7 - row.cost_nano
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_slow_consumer_gets_coalesced_chunks(channel: grpc.aio.Channel) -> None:
    """A reader that falls behind receives several tokens per message once gRPC flow control
    pushes back, instead of one message per token."""
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    call = stub.Chat(chat(max_tokens=20_000, ignore_eos=True), metadata=auth(secret))
    sizes = [(await call.read()).completion_tokens]
    await asyncio.sleep(1.0)
    while (chunk := await call.read()) is not grpc.aio.EOF:
        sizes.append(chunk.completion_tokens)
    assert sum(sizes) == 20_000
    assert len(sizes) < 15_000 and max(sizes) > 10


async def test_a_core_serves_only_the_models_it_has_engines_for(tmp_path: Path) -> None:
    config = core_config(tmp_path / "data")
    only = msgspec.structs.replace(
        config.engines, default=None, models={"zai-org/GLM-5.1-FP8": config.engines.default}
    )
    core = Core(msgspec.structs.replace(config, engines=only))
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            models = await stub.ListModels(inference_pb2.ListModelsRequest())
            assert [m.id for m in models.models] == ["zai-org/GLM-5.1-FP8"]
            secret = await make_key(channel)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in stub.Chat(chat(), metadata=auth(secret)):
                    pass
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_unexpected_failures_are_internal_without_details(
    core: Core, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    secret = await make_key(channel)
    engine = core.catalogue.lookup(MODEL).engine

    async def broken(messages: object, context: object = None) -> None:
        raise RuntimeError("template cache at /srv/secret/path is corrupt")

    engine.render_chat = broken  # type: ignore[method-assign, assignment]
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Chat(chat(), metadata=auth(secret)):
            pass
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (exc.value.details() or "")
    assert "req-test-1" in (exc.value.details() or "")  # the request id, to find the log line
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert logged and "/srv/secret/path" in (logged[0].exc_text or str(logged[0].exc_info))
    assert core.ledger.held_total_nano() == 0


async def test_final_only_sends_the_whole_answer_in_one_chunk(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel, requests_per_minute=100)
    stub = inference_pb2_grpc.InferenceStub(channel)
    streamed = [
        c async for c in stub.Chat(chat(max_tokens=12, temperature=0), metadata=auth(secret))
    ]
    call = stub.Chat(chat(max_tokens=12, temperature=0, final_only=True), metadata=auth(secret))
    [only] = [c async for c in call]
    assert only.text == "".join(c.text for c in streamed)
    assert only.completion_tokens == only.usage.completion_tokens == 12
    assert only.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "req-test-1"
    assert trailing["x-ratelimit-remaining-requests"] == "98"


async def test_without_max_tokens_the_answer_stops_at_what_the_balance_pays_for(
    tmp_path: Path,
) -> None:
    endless = core_config(tmp_path / "data", min_answer_tokens=10**6, max_answer_tokens=10**6)
    core = Core(endless)
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            secret = await make_key(channel, cents=1)  # $0.01
            stub = inference_pb2_grpc.InferenceStub(channel)
            chunks = [c async for c in stub.Chat(chat(final_only=True), metadata=auth(secret))]
        usage = chunks[-1].usage
        assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        # Every token the cent could buy, and not one more: $0.01 = 10,000,000 nano-USD.
        affordable = (10**7 - usage.prompt_tokens * 350) // 1400
        assert usage.completion_tokens == affordable
        assert core.ledger.workspaces()[0].balance_nano == 10**7 - usage.cost_nano_usd >= 0
    finally:
        await core.server.stop(grace=0)
        await core.close()
