"""Inference.Streams: many requests on one call behave exactly as their own Chat calls would
(chunks, metadata, errors with their rich status, metering), with their events batched."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core.server import Core
from tests.conftest import MODEL, core_config, started_core
from tests.core.servicers.test_inference_grpc import auth, chat, make_key


def opened(
    stream_id: int, secret: str, request: inference_pb2.ChatRequest
) -> inference_pb2.StreamsRequest:
    return inference_pb2.StreamsRequest(
        open=inference_pb2.OpenStream(
            id=stream_id,
            authorization=f"Bearer {secret}",
            request_id=f"mux-{stream_id}",
            chat=request,
        )
    )


async def run_streams(
    channel: grpc.aio.Channel, actions: list[inference_pb2.StreamsRequest]
) -> tuple[dict[int, list[inference_pb2.StreamEvent]], int]:
    """Sends the actions, half-closes, and returns each request's events and the messages."""
    stub = inference_pb2_grpc.InferenceStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        for action in actions:
            yield action

    events: dict[int, list[inference_pb2.StreamEvent]] = defaultdict(list)
    messages = 0
    async for response in stub.Streams(requests()):
        messages += 1
        for event in response.events:
            events[event.id].append(event)
    return events, messages


@pytest.fixture
async def paced_core(tmp_path: Path) -> AsyncIterator[Core]:
    """A core whose engine takes 10 ms a token, so a request is still running when acted on."""
    async with started_core(core_config(tmp_path / "data", tpot_ms=10)) as core:
        yield core


async def settled(core: Core) -> bool:
    """Whether every request has left the engine and its hold the ledger (waiting up to 2 s)."""
    engine = core.catalogue.lookup(MODEL).engine
    for _ in range(200):
        if engine.stats().running == 0 and core.ledger.held_total_nano() == 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_many_requests_on_one_call_are_served_and_billed_as_chats(
    core: Core, channel: grpc.aio.Channel
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    alone = [
        c async for c in stub.Chat(chat("same", max_tokens=8, temperature=0), metadata=auth(secret))
    ]
    actions = [opened(i, secret, chat("same", max_tokens=8, temperature=0)) for i in range(20)]
    events, messages = await run_streams(channel, actions)
    assert sorted(events) == list(range(20))
    for stream_id, stream in events.items():
        kinds = [e.WhichOneof("event") for e in stream]
        assert kinds[0] == "metadata" and kinds[-1] == "status" and stream[-1].status.code == 0
        metadata = {m.key: m.value for m in stream[0].metadata.entries}
        assert metadata["x-request-id"] == f"mux-{stream_id}"
        chunks = [e.chunk for e in stream if e.WhichOneof("event") == "chunk"]
        assert "".join(c.text for c in chunks) == "".join(c.text for c in alone)
        assert chunks[-1].usage == alone[-1].usage
    # Twenty streams advancing together share messages: far fewer than their events.
    assert messages < sum(len(s) for s in events.values()) / 4
    assert core.ledger.held_total_nano() == 0


async def test_a_refused_request_ends_with_its_calls_rich_status(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    actions = [
        opened(1, "corvex-wrong", chat("x", max_tokens=4)),
        opened(2, secret, chat("x", model="no/such", max_tokens=4)),
        opened(3, secret, chat("x", max_tokens=4)),
    ]
    events, _ = await run_streams(channel, actions)
    for stream_id, code, reason in ((1, grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY"),
                                    (2, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")):  # fmt: skip
        (end,) = events[stream_id]  # no metadata, no chunk: refused before admission
        assert end.status.code == code.value[0]
        info = error_details_pb2.ErrorInfo()
        assert status_pb2.Status.FromString(end.status.details).details[0].Unpack(info)
        assert info.reason == reason
    assert events[3][-1].status.code == 0
    # An open without a request gets a rich status too.
    events, _ = await run_streams(channel, [inference_pb2.StreamsRequest(open={"id": 4})])
    (end,) = events[4]
    assert end.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(end.status.details).details[0].Unpack(info)
    assert (info.reason, info.metadata["param"]) == ("INVALID_REQUEST", "open")


async def test_an_id_already_in_flight_ends_the_call(paced_core: Core) -> None:
    # No event could answer the second open without being read as the first's.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{paced_core.port}") as channel:
        secret = await make_key(channel)
        request = chat("x", max_tokens=100, ignore_eos=True)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await run_streams(channel, [opened(1, secret, request), opened(1, secret, request)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id 1 is already in flight" in (refused.value.details() or "")
    assert rich_reason(refused.value) == "INVALID_REQUEST"
    assert await settled(paced_core)  # the first was aborted with the call, and settled


def rich_reason(error: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"]
    )
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


async def test_a_cancelled_request_is_aborted_and_settled_for_what_it_produced(
    paced_core: Core,
) -> None:
    core = paced_core
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        secret = await make_key(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        queue: asyncio.Queue[inference_pb2.StreamsRequest | None] = asyncio.Queue()
        await queue.put(opened(7, secret, chat("long", max_tokens=5000, ignore_eos=True)))

        async def requests():  # type: ignore[no-untyped-def]
            while (action := await queue.get()) is not None:
                yield action

        tokens = 0
        async for response in stub.Streams(requests()):
            for event in response.events:
                if event.WhichOneof("event") == "chunk":
                    tokens += event.chunk.completion_tokens
            if tokens >= 3 and queue.empty():
                await queue.put(inference_pb2.StreamsRequest(cancel=7))
                await queue.put(None)
        assert await settled(core)
        (row,) = core.ledger.usage(core.ledger.workspaces()[0].id)
        assert 3 <= row.completion_tokens < 5000  # what it produced, not what it held


async def test_actions_in_one_message_are_taken_in_order_as_if_sent_alone(
    paced_core: Core,
) -> None:
    core = paced_core
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        secret = await make_key(channel)
        # Three opens and the cancel of the second, in one message, as an edge batches them.
        batch = inference_pb2.StreamsRequest(
            actions=[
                opened(1, secret, chat("a", max_tokens=4)),
                opened(2, secret, chat("b", max_tokens=5000, ignore_eos=True)),
                opened(3, "corvex-wrong", chat("c", max_tokens=4)),
                inference_pb2.StreamsRequest(cancel=2),
            ]
        )
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def requests():  # type: ignore[no-untyped-def]
            yield batch

        call = stub.Streams(requests())
        # The core says it takes batches, before any event.
        assert ("corvex-streams-actions", "1") in tuple(await call.initial_metadata())
        events: dict[int, list[inference_pb2.StreamEvent]] = defaultdict(list)
        async for response in call:
            for event in response.events:
                events[event.id].append(event)
        assert sorted(events) == [1, 3]  # the cancelled request sends nothing more
        assert events[1][-1].status.code == 0
        assert "".join(e.chunk.text for e in events[1]) != ""
        assert events[3][-1].status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert await settled(core)


@pytest.mark.parametrize(
    "message",
    [
        # An action beside the list, and a list inside the list: refused, never half-read.
        inference_pb2.StreamsRequest(cancel=9, actions=[inference_pb2.StreamsRequest(cancel=1)]),
        inference_pb2.StreamsRequest(
            actions=[inference_pb2.StreamsRequest(actions=[inference_pb2.StreamsRequest(cancel=1)])]
        ),
    ],
)
async def test_a_message_mixing_or_nesting_actions_ends_the_call(
    channel: grpc.aio.Channel, message: inference_pb2.StreamsRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run_streams(channel, [message])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one action or a list of actions" in (refused.value.details() or "")
    assert rich_reason(refused.value) == "INVALID_REQUEST"


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32 - 1, 2**63 - 1])
def test_the_batches_encoding_is_protobufs(n: int) -> None:
    from corvex_core.servicers import streams

    chunk = inference_pb2.ChatChunk(text="x" * (n % 500))
    body = chunk.SerializeToString()
    event = streams._ID_TAG + streams._varint(n) + streams._CHUNK_TAG
    event += streams._varint(len(body)) + body
    parsed = inference_pb2.StreamsResponse.FromString(streams._field(event) * 2)
    assert [e.id for e in parsed.events] == [n, n] and parsed.events[0].chunk == chunk
