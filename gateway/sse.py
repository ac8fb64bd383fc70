"""Server-sent events of streamed chat and text completions, framed exactly as OpenAI frames
them, and the relay that writes a gRPC stream of ChatChunks as those events.

A chat stream: for each choice (`index`), in index order, a first chunk with the role (which,
when the choice opens with a tool call, carries that call's index, id, type and name, as
OpenAI's does), then content, `reasoning` (vLLM's field) and tool-call argument chunks, a chunk
with the finish_reason and an empty delta; choices interleave as the core sends them. With
include_usage every chunk has `"usage": null` and one last chunk with `choices: []` has the
usage and cost; with vLLM's continuous_usage_stats every chunk's usage counts the prompt and its
choice's tokens so far. Then `data: [DONE]`. A text completion stream is the same with
`text_completion` chunks (the finish_reason on the chunk with the last text, as vLLM's). An
error after the response has started is one `data: {"error": ...}` event (the OpenAI SDKs raise
an APIError for it); this module is the only place any of these bytes are written.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Protocol

import grpc
import msgspec
from aiohttp import web

from corvex.v1 import inference_pb2
from gateway import choices, upstream
from gateway.errors import ApiError
from gateway.state import OPEN_STREAM, REQUEST_ID
from gateway.telemetry import ACTIVE_STREAMS, first_token
from gateway.usage import running_usage, usage_json

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"
DONE: Final = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def error_event(error: ApiError) -> bytes:
    """The event that ends a stream whose status line has already been sent."""
    return b"data: " + error.encode() + b"\n\n"


class Framer(Protocol):
    def chunk(self, chunk: inference_pb2.ChatChunk) -> list[bytes]:
        """The events of one chunk of the core's stream."""
        ...

    def end(self, usage: inference_pb2.Usage) -> list[bytes]:
        """The events after the request's last chunk (the usage), before [DONE]."""
        ...


class _Events:
    """What every event of one stream shares: its pre-encoded head, and `usage` as the stream
    options ask (null on every chunk, a running count, or absent)."""

    def __init__(
        self,
        head: dict[str, Any],
        *,
        include_usage: bool,
        continuous_usage: bool,
        completion_details: bool,
    ) -> None:
        self._head = b"data: " + _encoder.encode(head)[:-1] + b',"choices":['
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._include_usage = include_usage
        self._continuous = continuous_usage
        self._completion_details = completion_details
        self.prompt_tokens = 0
        # Tokens each choice has produced so far (for continuous usage).
        self.tokens: dict[int, int] = {}

    def event(self, index: int, choice: bytes) -> bytes:
        """A chunk of one choice; `choice` is the choice's JSON object."""
        if self._continuous:
            usage = running_usage(self.prompt_tokens, self.tokens.get(index, 0))
            return self._head + choice + b'],"usage":' + _encoder.encode(usage) + b"}\n\n"
        return self._head + choice + self._tail

    def count(self, chunk: inference_pb2.ChatChunk) -> None:
        if chunk.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens
        self.tokens[chunk.index] = self.tokens.get(chunk.index, 0) + chunk.completion_tokens

    def end(self, usage: inference_pb2.Usage) -> list[bytes]:
        if not self._include_usage:
            return []
        body = usage_json(usage, completion_details=self._completion_details)
        return [self._head + b'],"usage":' + _encoder.encode(body) + b"}\n\n"]


class ChatFramer:
    """The events of a chat completion stream (see the module doc)."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        *,
        include_usage: bool = False,
        continuous_usage: bool = False,
    ) -> None:
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._events = _Events(
            head,
            include_usage=include_usage,
            continuous_usage=continuous_usage,
            completion_details=True,
        )
        # Choices 0 .. started - 1 have had their role chunk. The SDKs' stream helpers file a
        # choice by its position in the list, so choices open in index order.
        self._started = 0

    def chunk(self, chunk: inference_pb2.ChatChunk) -> list[bytes]:
        self._events.count(chunk)
        index = chunk.index
        pieces = list(chunk.tool_calls)
        events = self._open(index, pieces, opens_with_call=not (chunk.reasoning or chunk.text))
        logprobs = (
            {"content": choices.chat_logprobs(chunk.logprobs), "refusal": None}
            if chunk.logprobs
            else None
        )
        # The chunk's log probabilities go with its content, else with its first event.
        if chunk.reasoning:
            carry = logprobs if not chunk.text else None
            events.append(self._delta(index, {"reasoning": chunk.reasoning}, carry))
            logprobs = None if carry is not None else logprobs
        if chunk.text:
            events.append(self._content(index, chunk.text, logprobs))
            logprobs = None
        for piece in pieces:
            if choices.is_head(piece):
                events.append(
                    self._delta(index, {"tool_calls": [choices.tool_call_head(piece)]}, logprobs)
                )
                logprobs = None
            if piece.arguments:
                fragment = {"index": piece.index, "function": {"arguments": piece.arguments}}
                events.append(self._delta(index, {"tool_calls": [fragment]}, logprobs))
                logprobs = None
        if logprobs is not None:  # tokens that made no text (a call's opening)
            events.append(self._delta(index, {}, logprobs))
        if chunk.finish_reason:
            choice = {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": choices.finish_reason(chunk),
                "stop_reason": choices.stop_reason(chunk),
            }
            events.append(self._events.event(index, _encoder.encode(choice)))
        return events

    def end(self, usage: inference_pb2.Usage) -> list[bytes]:
        return self._events.end(usage)

    def _open(
        self, index: int, pieces: list[inference_pb2.ToolCallDelta], *, opens_with_call: bool
    ) -> list[bytes]:
        """Role chunks for the choices up to `index` that have none yet. The choice of this
        chunk takes its first call's head into it when its answer opens with a call (which is
        then not sent again)."""
        events = []
        while self._started <= index:
            started = self._started
            self._started += 1
            delta: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
            if started == index and opens_with_call and pieces and choices.is_head(pieces[0]):
                head = pieces[0]
                delta = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [choices.tool_call_head(head)],
                    "refusal": None,
                }
                pieces[0] = inference_pb2.ToolCallDelta(index=head.index, arguments=head.arguments)
            events.append(self._delta(started, delta, None))
        return events

    def _delta(self, index: int, delta: dict[str, Any], logprobs: Any) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        return self._events.event(index, _encoder.encode(choice))

    def _content(self, index: int, text: str, logprobs: Any) -> bytes:
        # The hot path: a token of text costs one string encode.
        if logprobs is not None:
            return self._delta(index, {"content": text}, logprobs)
        return self._events.event(
            index,
            b'{"index":%d,"delta":{"content":%b},"logprobs":null,"finish_reason":null}'
            % (index, _encoder.encode(text)),
        )


class CompletionFramer:
    """The events of a text completion stream: each choice's text (after the prompt, with
    echo), its legacy logprobs, and the finish_reason on its last chunk."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        *,
        echo: bool,
        logprobs: bool,
        include_usage: bool = False,
        continuous_usage: bool = False,
    ) -> None:
        head = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._events = _Events(
            head,
            include_usage=include_usage,
            continuous_usage=continuous_usage,
            completion_details=False,
        )
        self._echo = echo
        self._logprobs = logprobs
        self._prompt_text = ""
        self._prompt_logprobs: list[inference_pb2.TokenLogprob] = []
        self._choices: dict[int, choices.LegacyLogprobs] = {}

    def chunk(self, chunk: inference_pb2.ChatChunk) -> list[bytes]:
        self._events.count(chunk)
        if chunk.prompt_text:
            self._prompt_text = chunk.prompt_text
            self._prompt_logprobs = list(chunk.prompt_logprobs)
        index = chunk.index
        text, tokens = chunk.text, list(chunk.logprobs)
        legacy = self._choices.get(index)
        if legacy is None:  # the choice's first chunk
            legacy = self._choices[index] = choices.LegacyLogprobs()
            if self._echo:
                text = self._prompt_text + text
                tokens = self._prompt_logprobs + tokens
        if not (text or tokens or chunk.finish_reason):
            return []
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": legacy.add(tokens) if self._logprobs else None,
            "finish_reason": choices.finish_reason(chunk) if chunk.finish_reason else None,
        }
        if chunk.finish_reason:
            choice["stop_reason"] = choices.stop_reason(chunk)
        return [self._events.event(index, _encoder.encode(choice))]

    def end(self, usage: inference_pb2.Usage) -> list[bytes]:
        return self._events.end(usage)


async def relay(request: web.Request, call: Any, framer: Framer) -> web.StreamResponse:
    """Writes a streamed call as SSE. The status is chosen once the core has admitted the
    request (its first chunk or its error is in); then each gRPC chunk becomes its events,
    written in one go. The events that end the stream are written only after the call's status
    arrived, so a client that hangs up on `[DONE]` cannot cancel a call that already finished.
    """
    initial = await call.initial_metadata()
    chunk = await call.read()
    response = web.StreamResponse(
        headers={
            **upstream.response_headers(initial, request[REQUEST_ID]),
            "Content-Type": CONTENT_TYPE,
            "Cache-Control": "no-cache",
        }
    )
    await response.prepare(request)
    request[OPEN_STREAM] = response
    ACTIVE_STREAMS.inc()
    try:
        while chunk is not grpc.aio.EOF:
            if chunk.completion_tokens:
                first_token(request)
            events = framer.chunk(chunk)
            if chunk.HasField("usage"):  # the request's last chunk
                events += framer.end(chunk.usage)
                if await call.read() is not grpc.aio.EOF:
                    log.error("stream from the core went on after its final chunk")
                events.append(DONE)
                await response.write(b"".join(events))
                break
            if events:
                await response.write(b"".join(events))
            chunk = await call.read()
        else:
            log.error("stream from the core ended without a final chunk")
            raise ApiError(502, "The inference service ended the answer without finishing.")
    finally:
        ACTIVE_STREAMS.dec()
    await response.write_eof()
    return response
