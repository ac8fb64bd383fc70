"""The edge's Streams client against a real core: each request reads as its own Chat call
would (metadata, chunks, EOF, rich errors), cancels and deadlines reach the core, and a
broken call fails its requests as UNAVAILABLE and the next request opens a new one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core.server import Core
from gateway import errors
from gateway.multiplex import Multiplexer
from tests.conftest import MODEL, core_config
from tests.core.servicers.test_inference_grpc import auth, chat, make_key


async def read_all(call: object) -> list[inference_pb2.ChatChunk]:
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        chunks.append(chunk)
    return chunks


async def test_requests_read_as_their_own_calls(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    mux = Multiplexer(stub)
    try:
        direct = stub.Chat(chat("same", max_tokens=6, temperature=0), metadata=auth(secret))
        expected = [c async for c in direct]
        calls = [
            mux.open(chat("same", max_tokens=6, temperature=0), auth(secret)) for _ in range(10)
        ]
        for call in calls:
            metadata = dict(await call.initial_metadata())
            assert metadata["x-request-id"] == "req-test-1"
            chunks = await read_all(call)
            # The same answer (chunk boundaries follow how fast each side reads).
            assert "".join(c.text for c in chunks) == "".join(c.text for c in expected)
            assert chunks[-1].usage == expected[-1].usage
            assert call.done()
        whole = mux.open(chat("same", max_tokens=6, temperature=0, final_only=True), auth(secret))
        (answer,) = await read_all(whole)
        assert answer.text == "".join(c.text for c in expected)
        assert dict(await whole.trailing_metadata())["x-request-id"] == "req-test-1"
    finally:
        await mux.close()


async def test_a_refusal_raises_the_calls_error_with_its_rich_status(
    channel: grpc.aio.Channel,
) -> None:
    secret = await make_key(channel, cents=0)
    mux = Multiplexer(inference_pb2_grpc.InferenceStub(channel))
    try:
        call = mux.open(chat("x", max_tokens=50), auth(secret))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read_all(call)
        mapped = errors.from_rpc(refused.value)
        assert (mapped.status, mapped.body.code) == (402, "insufficient_credits")
        assert "top up" in mapped.body.message
    finally:
        await mux.close()


async def test_cancel_and_deadline_abort_the_request_in_the_core(tmp_path: Path) -> None:
    core = Core(core_config(tmp_path / "data", tpot_ms=10))
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            secret = await make_key(channel)
            mux = Multiplexer(inference_pb2_grpc.InferenceStub(channel))
            engine = core.catalogue.lookup(MODEL).engine
            cancelled = mux.open(chat("a", max_tokens=5000, ignore_eos=True), auth(secret))
            expiring = mux.open(chat("b", max_tokens=5000, ignore_eos=True), auth(secret), 0.5)
            await cancelled.read()
            assert cancelled.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await read_all(expiring)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(300):
                if engine.stats().running == 0 and core.ledger.held_total_nano() == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().running == 0 and core.ledger.held_total_nano() == 0
            await mux.close()
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_a_broken_call_fails_its_requests_and_the_next_one_reconnects(
    tmp_path: Path,
) -> None:
    core = Core(core_config(tmp_path / "data", tpot_ms=10))
    await core.start()
    port = core.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        secret = await make_key(channel)
        mux = Multiplexer(inference_pb2_grpc.InferenceStub(channel))
        running = mux.open(chat("a", max_tokens=5000, ignore_eos=True), auth(secret))
        await running.read()
        await core.server.stop(grace=0)
        await core.close()
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await read_all(running)
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        assert errors.from_rpc(broken.value).status == 503
        await mux.close()


class _RecordingCore(inference_pb2_grpc.InferenceServicer):
    """A Streams servicer that records the messages it reads and ends each opened request
    at once; `takes_actions` is whether it says it takes several actions per message (a core
    older than `StreamsRequest.actions` does not)."""

    def __init__(self, takes_actions: bool) -> None:
        self.takes_actions = takes_actions
        self.messages: list[inference_pb2.StreamsRequest] = []

    async def Streams(self, request_iterator, context):  # type: ignore[no-untyped-def,override]
        if self.takes_actions:
            await context.send_initial_metadata((("corvex-streams-actions", "1"),))
        async for message in request_iterator:
            self.messages.append(message)
            for action in message.actions or [message]:
                ended = inference_pb2.StreamEvent(
                    id=action.open.id, status=inference_pb2.StreamStatus(code=0)
                )
                yield inference_pb2.StreamsResponse(events=[ended])


@pytest.mark.parametrize("takes_actions", [True, False])
async def test_requests_started_together_share_a_message_only_with_a_core_that_takes_it(
    takes_actions: bool,
) -> None:
    recorder = _RecordingCore(takes_actions)
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            mux = Multiplexer(inference_pb2_grpc.InferenceStub(channel))
            try:
                # The first request opens the call; the core's initial metadata comes with it.
                await read_all(mux.open(chat("first", max_tokens=4), auth("k")))
                calls = [mux.open(chat(str(i), max_tokens=4), auth("k")) for i in range(10)]
                for call in calls:
                    assert await read_all(call) == [] and await call.code() == grpc.StatusCode.OK
            finally:
                await mux.close()
    finally:
        await server.stop(grace=0)
    singles = [m for m in recorder.messages if not m.actions]
    assert all(m.WhichOneof("action") == "open" for m in singles)
    opens = [a.open for m in recorder.messages for a in (m.actions or [m])]
    assert [o.chat.messages[0].content for o in opens] == ["first", *map(str, range(10))]
    if takes_actions:
        # Ten opens queued in one turn of the loop: one message, in order.
        assert len(recorder.messages) == 2 and len(recorder.messages[1].actions) == 10
    else:
        assert len(recorder.messages) == 11 and len(singles) == 11
