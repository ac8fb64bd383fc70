"""The edge's side of Inference.Streams: every generation request to one core on one call.

A `Multiplexer` keeps one Streams call open to its core and hands out a `StreamCall` per
request, which reads exactly like the grpc.aio call of a Chat or Complete (`initial_metadata`,
`read` to EOF, `trailing_metadata`, `code`, `details`, `done`, `add_done_callback`, `cancel`,
and a failure raised as the AioRpcError,
rich status included, that the call would have raised), so the handlers and the error mapping
are the same whichever transport carries a request. One reader task sorts the core's batched
events into the requests. A request whose reader falls behind (a slow client) has its chunks
merged rather than queued without bound. If the call breaks, every request on it fails as
UNAVAILABLE and the next request opens a new call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc

from corvex.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

# Chunks a request may have waiting for its reader before the next ones are merged into the
# last (per choice): what a client that reads slowly costs the edge stays bounded.
MAX_QUEUED_CHUNKS: Final = 64
_DETAILS_KEY: Final = "grpc-status-details-bin"
# The core's Streams initial metadata when it takes several actions in one message.
_ACTIONS_METADATA: Final = ("corvex-streams-actions", "1")
_Event = inference_pb2.StreamEvent


class StreamCall:
    """One request on a Streams call, read as its own grpc.aio call would be."""

    def __init__(self, multiplexer: Multiplexer, stream_id: int, timeout_s: float | None) -> None:
        self._multiplexer = multiplexer
        self._id = stream_id
        self._deadline = (
            asyncio.get_running_loop().call_later(timeout_s, self._expire)
            if timeout_s is not None
            else None
        )
        self._chunks: collections.deque[inference_pb2.ChatChunk] = collections.deque()
        self._arrived = asyncio.Event()
        self._initial: tuple[tuple[str, str], ...] | None = None
        self._trailing: tuple[tuple[str, str], ...] = ()
        self._status: inference_pb2.StreamStatus | None = None
        self._cancelled = False
        self._done_callbacks: list[Callable[[StreamCall], None]] = []

    # ---- what the reader task delivers ---------------------------------------------------------

    def deliver(self, event: _Event) -> None:
        which = event.WhichOneof("event")
        if which == "chunk":
            if self._initial is None:
                self._initial = ()
            self._queue(event.chunk)
        elif which == "metadata":
            entries = tuple((e.key, e.value) for e in event.metadata.entries)
            if self._initial is None and not self._chunks:
                self._initial = entries
            else:
                self._trailing = entries
        elif which == "status":
            self._end(event.status)
        self._arrived.set()

    def fail(self, status: inference_pb2.StreamStatus) -> None:
        if self._status is None:
            self._end(status)
            self._arrived.set()

    def _end(self, status: inference_pb2.StreamStatus) -> None:
        self._status = status
        if self._deadline is not None:
            self._deadline.cancel()
        self._run_done_callbacks()

    def _run_done_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            callback(self)

    def _expire(self) -> None:
        """The request's deadline passed: the core aborts it, the handler gets
        DEADLINE_EXCEEDED, as from a call with a timeout."""
        if not self.done():
            self._multiplexer.cancel(self._id)
            self.fail(_DEADLINE)

    def _queue(self, chunk: inference_pb2.ChatChunk) -> None:
        if len(self._chunks) >= MAX_QUEUED_CHUNKS:
            last = self._chunks[-1]
            if last.index == chunk.index and not last.finish_reason and not last.HasField("usage"):
                _merge(last, chunk)
                return
        self._chunks.append(chunk)

    # ---- what a handler calls (grpc.aio's call interface) --------------------------------------

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        while self._initial is None and self._status is None:
            await self._wait()
        return self._initial or ()

    async def read(self) -> Any:
        while not self._chunks:
            if self._status is not None:
                self._raise_for_status()
                return grpc.aio.EOF
            await self._wait()
        return self._chunks.popleft()

    async def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        while self._status is None:
            await self._wait()
        return self._trailing

    async def code(self) -> grpc.StatusCode:
        while self._status is None and not self._cancelled:
            await self._wait()
        if self._status is None:
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode(_CODES[self._status.code])

    async def details(self) -> str:
        await self.code()
        return self._status.message if self._status is not None else "Locally cancelled"

    def done(self) -> bool:
        return self._status is not None or self._cancelled

    def add_done_callback(self, callback: Callable[[StreamCall], None]) -> None:
        """`callback(call)` once the call ends (at once if it has)."""
        if self.done():
            callback(self)
        else:
            self._done_callbacks.append(callback)

    def cancel(self) -> bool:
        if self.done():
            return False
        self._cancelled = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._multiplexer.cancel(self._id)
        self._arrived.set()
        self._run_done_callbacks()
        return True

    async def _wait(self) -> None:
        if self._cancelled:
            raise asyncio.CancelledError  # what a cancelled grpc.aio call raises to its reader
        self._arrived.clear()
        await self._arrived.wait()

    def _raise_for_status(self) -> None:
        status = self._status
        assert status is not None
        if status.code == 0:
            return
        trailing = grpc.aio.Metadata(*self._trailing)
        if status.details:
            trailing.add(_DETAILS_KEY, status.details)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode(_CODES[status.code]),
            initial_metadata=grpc.aio.Metadata(*(self._initial or ())),
            trailing_metadata=trailing,
            details=status.message,
        )


_CODES: Final = {code.value[0]: code.value for code in grpc.StatusCode}


def _merge(into: inference_pb2.ChatChunk, chunk: inference_pb2.ChatChunk) -> None:
    """`chunk` appended to `into`, a chunk of the same choice not yet read."""
    into.text += chunk.text
    into.reasoning += chunk.reasoning
    into.completion_tokens += chunk.completion_tokens
    into.tool_calls.extend(chunk.tool_calls)
    into.logprobs.extend(chunk.logprobs)
    if chunk.finish_reason:
        into.finish_reason = chunk.finish_reason
    if chunk.HasField("usage"):
        into.usage.CopyFrom(chunk.usage)
    which = chunk.WhichOneof("stop_reason")
    if which is not None:
        setattr(into, which, getattr(chunk, which))


_DEADLINE: Final = inference_pb2.StreamStatus(
    code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message="Deadline Exceeded"
)
_UNREACHABLE: Final = inference_pb2.StreamStatus(
    code=grpc.StatusCode.UNAVAILABLE.value[0], message="The connection to the core broke."
)


class Multiplexer:
    """Every generation request the edge sends one core, on one Streams call."""

    def __init__(self, stub: inference_pb2_grpc.InferenceStub) -> None:
        self._stub = stub
        self._ids = itertools.count(1)
        self._calls: dict[int, StreamCall] = {}
        self._outbox: asyncio.Queue[inference_pb2.StreamsRequest] | None = None
        self._reader: asyncio.Task[None] | None = None

    def open(
        self,
        request: inference_pb2.ChatRequest | inference_pb2.CompleteRequest,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None = None,
    ) -> StreamCall:
        """Starts a request; `metadata` is what its own call would carry (authorization,
        x-request-id) and `timeout` its deadline, seconds."""
        stream_id = next(self._ids)
        values = dict(metadata)
        opened = inference_pb2.OpenStream(
            id=stream_id,
            authorization=values.get("authorization", ""),
            request_id=values.get("x-request-id", ""),
        )
        if isinstance(request, inference_pb2.ChatRequest):
            opened.chat.CopyFrom(request)
        else:
            opened.complete.CopyFrom(request)
        call = self._calls[stream_id] = StreamCall(self, stream_id, timeout)
        self._send(inference_pb2.StreamsRequest(open=opened))
        return call

    def cancel(self, stream_id: int) -> None:
        if self._calls.pop(stream_id, None) is not None:
            self._send(inference_pb2.StreamsRequest(cancel=stream_id))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def _send(self, action: inference_pb2.StreamsRequest) -> None:
        if self._outbox is None or self._reader is None or self._reader.done():
            self._outbox = asyncio.Queue()
            self._reader = asyncio.create_task(self._run(self._outbox))
        self._outbox.put_nowait(action)

    async def _run(self, outbox: asyncio.Queue[inference_pb2.StreamsRequest]) -> None:
        batches = False  # whether the core takes several actions per message

        async def actions() -> AsyncIterator[inference_pb2.StreamsRequest]:
            while True:
                action = await outbox.get()
                if not batches or outbox.empty():
                    yield action
                    continue
                # Every action queued meanwhile (requests started in the same turns of the
                # loop) in one message: one write for all of them.
                batch = [action]
                while not outbox.empty():
                    batch.append(outbox.get_nowait())
                yield inference_pb2.StreamsRequest(actions=batch)

        calls = self._calls
        try:
            streams = self._stub.Streams(actions())
            # A core older than `actions` would take a batch for one empty action: until its
            # initial metadata says otherwise, one action per message.
            batches = _ACTIONS_METADATA in tuple(await streams.initial_metadata() or ())
            async for response in streams:
                for event in response.events:
                    call = calls.get(event.id)
                    if call is None:
                        continue  # cancelled by the edge: what was still on its way
                    call.deliver(event)
                    if event.WhichOneof("event") == "status":
                        del calls[event.id]
        except grpc.aio.AioRpcError as exc:
            log.warning("the Streams call to the core broke: %s", exc.code().name)
        finally:
            # Requests still open on this call can no longer end: they fail, and the next
            # request opens a new call.
            for call in list(calls.values()):
                call.fail(_UNREACHABLE)
            calls.clear()
