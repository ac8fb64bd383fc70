"""The multiplexed stream (Inference.Streams): many Chat and Complete requests on one call.

Each request runs through exactly the code its own Chat or Complete call would (the
interceptor's guard, then the servicer's method) against `_RequestContext`, a stand-in for the
call context that turns `send_initial_metadata`, `write` and `abort_with_status` into events of
that request. A `_Batcher` writes every event produced since its previous write as one message:
when an engine step advances 256 streams together, their 256 chunks cost one gRPC message
instead of 256, which is most of what a streamed token costs the core (benchmarks/README.md).
Each event is serialized once, when it is made, and a batch is their concatenation (protobuf's
encoding of a repeated field), so the call writes StreamsResponse bytes without building one.
The client may send several actions as one message (`StreamsRequest.actions`), which the
call's initial metadata says this core takes (`ACTIONS_METADATA`): an edge's requests that
start together cost one message too. Nothing about a request changes but its transport: its
admission, metering, errors (the status event carries the google.rpc.Status its call would end
with) and chunks are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc

from corvex.v1 import inference_pb2
from corvex_core import errors
from corvex_core.servicers import status
from corvex_core.servicers.interceptor import Undecodable

# Requests in flight on one call; an open beyond it ends at once with RESOURCE_EXHAUSTED.
MAX_REQUESTS_PER_CALL: Final = 4096
# Sent as the call's initial metadata: this core takes several actions in one message (the
# proto's StreamsRequest.actions; the edge's multiplexer reads it).
ACTIONS_METADATA: Final = ("corvex-streams-actions", "1")
# Events waiting for the call's writer beyond which a request's next event waits its turn (the
# client is not reading): requests then slow down and their engines coalesce tokens.
MAX_PENDING_EVENTS: Final = 16_384

Method = Callable[[Any, Any], Awaitable[Any]]
# Field tags of the wire format (field number << 3 | wire type).
_EVENTS_TAG: Final = b"\x0a"  # StreamsResponse.events = 1, length-delimited
_ID_TAG: Final = b"\x08"  # StreamEvent.id = 1, a varint
_CHUNK_TAG: Final = b"\x1a"  # StreamEvent.chunk = 3, length-delimited


_ONE_BYTE_VARINTS: Final = tuple(bytes((n,)) for n in range(0x80))


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint (ids and lengths; lengths of a byte are most)."""
    if n < 0x80:
        return _ONE_BYTE_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(event: bytes) -> bytes:
    """A serialized StreamEvent as one element of StreamsResponse.events."""
    return _EVENTS_TAG + _varint(len(event)) + event


class _Batcher:
    """Writes the events of every request on a call, as few messages as the client reads."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._pending: list[bytes] = []  # StreamsResponse.events elements, serialized
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._done = False

    async def put(self, event: bytes) -> None:
        """Queues an event serialized by `_field`, once there is room."""
        while not self.put_nowait(event):
            self._room.clear()
            await self._room.wait()

    def put_nowait(self, event: bytes) -> bool:
        """Queues the event if there is room (the common case, without a coroutine)."""
        if len(self._pending) >= MAX_PENDING_EVENTS:
            return False
        self._pending.append(event)
        self._ready.set()
        return True

    def finish(self) -> None:
        """No more events will come: `run` writes what is pending and returns."""
        self._done = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            # Let every request woken with this one (one engine step) add its events first.
            await asyncio.sleep(0)
            events, self._pending = self._pending, []
            self._room.set()
            if events:
                # StreamsResponse bytes: the call's serializer passes bytes through.
                await self._context.write(b"".join(events))
            if self._done and not self._pending:
                return


class _RequestContext:
    """What a Chat or Complete method sees of its call, for one request of a Streams call."""

    def __init__(self, opened: inference_pb2.OpenStream, batcher: _Batcher) -> None:
        self._id = opened.id
        self._batcher = batcher
        metadata = [("authorization", opened.authorization)] if opened.authorization else []
        if opened.request_id:
            metadata.append(("x-request-id", opened.request_id))
        self._metadata = tuple(metadata)
        self._trailing: tuple[tuple[str, str], ...] = ()
        self._chunk_head = _ID_TAG + _varint(opened.id) + _CHUNK_TAG
        self.status: inference_pb2.StreamStatus | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def cancelled(self) -> bool:
        return False  # a cancelled request's task is cancelled: it never gets to ask

    async def send_initial_metadata(self, metadata: Any) -> None:
        await self._batcher.put(_field(self._metadata_event(metadata).SerializeToString()))

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailing = tuple(metadata)

    async def write(self, chunk: inference_pb2.ChatChunk) -> None:
        body = chunk.SerializeToString()
        head = self._chunk_head + _varint(len(body))
        # _field(head + body), with the body copied once: this is every token's path.
        event = b"".join((_EVENTS_TAG, _varint(len(head) + len(body)), head, body))
        if not self._batcher.put_nowait(event):
            await self._batcher.put(event)

    async def abort_with_status(self, status: grpc.Status) -> None:
        details = next((v for k, v in status.trailing_metadata if k.endswith("-bin")), b"")
        # The rest (a limit's standing) is trailing metadata, sent before the status event.
        self._trailing = tuple(
            (k, v) for k, v in status.trailing_metadata if not k.endswith("-bin")
        )
        self.status = inference_pb2.StreamStatus(
            code=status.code.value[0], message=status.details or "", details=details
        )
        raise grpc.aio.AbortError()

    async def end(self, status: inference_pb2.StreamStatus) -> None:
        if self._trailing:
            await self._batcher.put(
                _field(self._metadata_event(self._trailing).SerializeToString())
            )
        ended = inference_pb2.StreamEvent(id=self._id, status=status)
        await self._batcher.put(_field(ended.SerializeToString()))

    def _metadata_event(self, metadata: Any) -> inference_pb2.StreamEvent:
        entries = [inference_pb2.MetadataEntry(key=k, value=v) for k, v in metadata]
        return inference_pb2.StreamEvent(
            id=self._id, metadata=inference_pb2.StreamMetadata(entries=entries)
        )


def _refused(error: errors.CorvexError) -> inference_pb2.StreamStatus:
    """A request's end with the rich status its own call would end with."""
    rich = status.rich_status(error)
    return inference_pb2.StreamStatus(
        code=rich.code, message=rich.message, details=rich.SerializeToString()
    )


_OK: Final = inference_pb2.StreamStatus(code=0)
_NO_REQUEST: Final = _refused(
    errors.InvalidRequest("An OpenStream needs a chat or a complete request.", param="open")
)
_BUSY: Final = inference_pb2.StreamStatus(
    code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    message=f"At most {MAX_REQUESTS_PER_CALL} requests may be in flight on one Streams call.",
)


def _duplicate(stream_id: int) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"OpenStream id {stream_id} is already in flight on this call; ids must be unique "
        "among the call's requests in flight.",
        param="open.id",
    )


class Multiplexer:
    """Runs the requests of Streams calls. `chat` and `complete` are the guarded methods (the
    interceptor's guard around the servicer's Chat and Complete)."""

    def __init__(self, chat: Method, complete: Method) -> None:
        self._methods = {"chat": chat, "complete": complete}

    async def serve(
        self,
        requests: AsyncIterator[inference_pb2.StreamsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        batcher = _Batcher(context)
        writer = asyncio.create_task(batcher.run())
        running: dict[int, asyncio.Task[None]] = {}
        refusals: set[asyncio.Task[None]] = set()
        try:
            await context.send_initial_metadata((ACTIONS_METADATA,))
            async for message in requests:
                if isinstance(message, Undecodable):
                    await status.abort(
                        context,
                        errors.InvalidRequest(
                            "A StreamsRequest message could not be decoded (malformed protobuf)."
                        ),
                    )
                if not message.actions:
                    if not self._act(message, batcher, running, refusals):
                        await status.abort(context, _duplicate(message.open.id))
                    continue
                if message.WhichOneof("action") is not None or any(
                    action.actions for action in message.actions
                ):
                    await status.abort(
                        context,
                        errors.InvalidRequest(
                            "A StreamsRequest sets one action or a list of actions, each a "
                            "StreamsRequest with one action of its own."
                        ),
                    )
                for action in message.actions:
                    if not self._act(action, batcher, running, refusals):
                        await status.abort(context, _duplicate(action.open.id))
            # The client half-closed: the requests it opened run to their ends.
            await asyncio.gather(*running.values(), *refusals, return_exceptions=True)
        finally:
            tasks = [*running.values(), *refusals]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            batcher.finish()
            with contextlib.suppress(Exception):
                await writer

    def _act(
        self,
        action: inference_pb2.StreamsRequest,
        batcher: _Batcher,
        running: dict[int, asyncio.Task[None]],
        refusals: set[asyncio.Task[None]],
    ) -> bool:
        """Takes one action. False: it opens an id already in flight, which no event could
        answer without being read as that request's (the call ends)."""
        if action.WhichOneof("action") == "cancel":
            task = running.get(action.cancel)
            if task is not None:
                task.cancel()
            return True
        opened = action.open
        if opened.id in running:
            return False
        if len(running) >= MAX_REQUESTS_PER_CALL:
            refusal = asyncio.create_task(_RequestContext(opened, batcher).end(_BUSY))
            refusals.add(refusal)
            refusal.add_done_callback(refusals.discard)
            return True
        task = asyncio.create_task(self._run(opened, batcher))
        running[opened.id] = task
        task.add_done_callback(lambda _: running.pop(opened.id, None))
        return True

    async def _run(self, opened: inference_pb2.OpenStream, batcher: _Batcher) -> None:
        context = _RequestContext(opened, batcher)
        kind = opened.WhichOneof("request")
        if kind is None:
            ended = _NO_REQUEST
        else:
            try:
                await self._methods[kind](getattr(opened, kind), context)
                ended = _OK
            except grpc.aio.AbortError:
                assert context.status is not None
                ended = context.status
        await context.end(ended)
