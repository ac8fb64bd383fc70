"""POST /v1/chat/completions: OpenAI chat → one server-streaming gRPC call → JSON or SSE.

Non-streaming requests fold the stream into one `chat.completion`. Streaming requests are
framed exactly as OpenAI frames them: a first chunk with the role, content chunks, a chunk
with the finish_reason and an empty delta, then (with include_usage) one chunk with
`choices: []` and the usage, then `data: [DONE]`. The response status is chosen only after the
core admitted the request, so every refusal is a proper HTTP error, never a broken stream.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import grpc
import msgspec
from aiohttp import web

from corvex.money import format_usd
from corvex.v1 import inference_pb2
from gateway import rest
from gateway.errors import error_response, map_rpc_error
from gateway.openai_types import ChatCompletionRequest, chat_decoder
from gateway.state import EDGE, REQUEST_ID
from gateway.telemetry import ACTIVE_STREAMS, first_token

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT: Final = 2**31 - 1
_FINISH: Final = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    # Not one of OpenAI's values: the core was draining and cut the answer short. vLLM's
    # OpenAI server reports the same value.
    inference_pb2.FINISH_REASON_ABORT: "abort",
}
_encoder = msgspec.json.Encoder()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        parsed = await rest.decode(request, chat_decoder)
        rpc_request = to_rpc(parsed)
    except rest.BadRequest as exc:
        return exc.response()
    request_id = request[REQUEST_ID]
    call = request.app[EDGE].inference.Chat(rpc_request, **rest.call_options(request))
    completion_id = "chatcmpl-" + request_id
    created = int(time.time())
    try:
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return await _stream(
                request, call, request_id, completion_id, created, parsed.model, include_usage
            )
        return await _answer(call, request_id, completion_id, created, parsed.model)
    finally:
        # A client that went away cancels this handler; the core then aborts the request.
        if not call.done():
            call.cancel()


def to_rpc(parsed: ChatCompletionRequest) -> inference_pb2.ChatRequest:
    """Checks what the wire types cannot express and builds the gRPC request."""
    if parsed.n is not None and parsed.n != 1:
        raise rest.BadRequest("Only n=1 is supported.", param="n")
    if parsed.max_tokens is not None and parsed.max_completion_tokens is not None:
        raise rest.BadRequest(
            "Set max_tokens or max_completion_tokens, not both.", param="max_tokens"
        )
    max_tokens = parsed.max_completion_tokens if parsed.max_tokens is None else parsed.max_tokens
    param = "max_tokens" if parsed.max_completion_tokens is None else "max_completion_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise rest.BadRequest(f"{param} must be a positive integer.", param=param)
    if parsed.stream_options is not None and not parsed.stream:
        raise rest.BadRequest(
            "stream_options is only allowed when stream is true.", param="stream_options"
        )
    if not parsed.model:
        raise rest.BadRequest("model must not be empty.", param="model")
    stop = [parsed.stop] if isinstance(parsed.stop, str) else (parsed.stop or [])
    fields: dict[str, Any] = {
        "model": parsed.model,
        "messages": [
            inference_pb2.ChatMessage(role=m.role, content=m.text(), name=m.name)
            for m in parsed.messages
        ],
        "stop": stop,
        "user": parsed.user or "",
        "ignore_eos": parsed.ignore_eos,
        # The edge sends a non-streaming answer in one piece, so the core folds it too.
        "final_only": not parsed.stream,
    }
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", parsed.temperature),
        ("top_p", parsed.top_p),
        ("presence_penalty", parsed.presence_penalty),
        ("frequency_penalty", parsed.frequency_penalty),
        ("seed", parsed.seed),
    ):
        if value is not None:
            fields[name] = value
    if parsed.seed is not None and not -(2**63) <= parsed.seed < 2**63:
        raise rest.BadRequest("seed must fit in 64 bits.", param="seed")
    return inference_pb2.ChatRequest(**fields)


def usage_json(usage: inference_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        # Corvex: what the request cost, exact, in USD, and the rate card it was priced with.
        "cost": format_usd(usage.cost_nano_usd),
        "rate_card_version": usage.rate_card_version,
    }


async def _answer(
    call: Any, request_id: str, completion_id: str, created: int, model: str
) -> web.StreamResponse:
    """A non-streaming answer: the core sends it as one final chunk (`final_only`)."""
    try:
        final = await call.read()
        trailing = await call.trailing_metadata()
    except grpc.aio.AioRpcError as exc:
        return map_rpc_error(exc).response()
    if final is grpc.aio.EOF or not final.finish_reason:
        return error_response(502, "The inference service ended the answer without finishing.")
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": final.text, "refusal": None},
                "logprobs": None,
                "finish_reason": _FINISH.get(final.finish_reason, "stop"),
            }
        ],
        "usage": usage_json(final.usage),
    }
    return web.Response(
        body=_encoder.encode(body),
        content_type="application/json",
        headers=rest.response_headers(trailing, request_id),
    )


class _Framer:
    """Pre-encodes what every chunk of one stream shares, so a token costs one string encode."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        head = _encoder.encode(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
            }
        )[:-1]
        usage = b',"usage":null' if include_usage else b""
        self._content_head = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
        self._content_tail = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
        self._head = b"data: " + head
        self._usage_tail = usage

    def role(self) -> bytes:
        return (
            self._head
            + b',"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
            + b'"logprobs":null,"finish_reason":null}]'
            + self._usage_tail
            + b"}\n\n"
        )

    def content(self, text: str) -> bytes:
        return self._content_head + _encoder.encode(text) + self._content_tail

    def finish(self, reason: str) -> bytes:
        return (
            self._head
            + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + _encoder.encode(reason)
            + b"}]"
            + self._usage_tail
            + b"}\n\n"
        )

    def usage(self, usage: inference_pb2.Usage) -> bytes:
        return (
            self._head + b',"choices":[],"usage":' + _encoder.encode(usage_json(usage)) + b"}\n\n"
        )


async def _stream(
    request: web.Request,
    call: Any,
    request_id: str,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> web.StreamResponse:
    """SSE: the status is chosen once the core has admitted the request (its first chunk or
    its error is in); then each gRPC chunk becomes its events, written in one go."""
    try:
        initial = await call.initial_metadata()
        chunk = await call.read()
    except grpc.aio.AioRpcError as exc:
        return map_rpc_error(exc).response()
    response = web.StreamResponse(
        headers={
            **rest.response_headers(initial, request_id),
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        }
    )
    await response.prepare(request)
    framer = _Framer(completion_id, created, model, include_usage)
    events = [framer.role()]
    ACTIVE_STREAMS.inc()
    try:
        while chunk is not grpc.aio.EOF:
            if chunk.text:
                first_token(request)
                events.append(framer.content(chunk.text))
            if chunk.finish_reason:
                events.append(framer.finish(_FINISH.get(chunk.finish_reason, "stop")))
                if include_usage:
                    events.append(framer.usage(chunk.usage))
                events.append(b"data: [DONE]\n\n")
                await response.write(b"".join(events))
                break
            await response.write(b"".join(events))
            events = []
            chunk = await call.read()
        else:
            log.error("chat stream from the core ended without a final chunk")
    except grpc.aio.AioRpcError as exc:
        # Headers are gone; the OpenAI SDKs raise an APIError for an `error` event.
        await response.write(b"".join(events) + map_rpc_error(exc).sse_event())
    finally:
        ACTIVE_STREAMS.dec()
    await response.write_eof()
    return response
