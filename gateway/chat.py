"""POST /v1/chat/completions: OpenAI chat → one server-streaming gRPC call → JSON or SSE.

Non-streaming requests get the whole answer from the core in one message (`final_only`) and
send one `chat.completion`. Streaming requests are framed by `gateway.sse`. The response status
is chosen only after the core admitted the request, so every refusal is a proper HTTP error,
never a broken stream. A call is always read to its status: cancelled only when the client went
away (the core then aborts the request and settles what was produced), never after it finished.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import grpc
import msgspec
from aiohttp import web

from corvex.v1 import inference_pb2
from gateway import decoding, sse, upstream
from gateway.errors import ApiError, BadRequest
from gateway.openai_types import ChatCompletionRequest, chat_decoder
from gateway.state import EDGE, OPEN_STREAM, REQUEST_ID
from gateway.telemetry import ACTIVE_STREAMS, first_token
from gateway.usage import usage_json

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
    parsed = await decoding.decode(request, chat_decoder)
    rpc_request = to_rpc(parsed)
    options = upstream.call_options(request)
    call = request.app[EDGE].inference.Chat(rpc_request, **options)
    request_id = request[REQUEST_ID]
    try:
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            framer = sse.ChunkFramer(
                "chatcmpl-" + request_id, int(time.time()), parsed.model, include_usage
            )
            return await _stream(request, call, framer, include_usage)
        return await _answer(call, request_id, parsed.model)
    finally:
        # Both paths read the call to its status, so it is only still running here when the
        # handler was cancelled (the client went away) or failed: the core then aborts.
        if not call.done():
            call.cancel()


def to_rpc(parsed: ChatCompletionRequest) -> inference_pb2.ChatRequest:
    """Checks what the wire types cannot express and builds the gRPC request."""
    if parsed.n is not None and parsed.n != 1:
        raise BadRequest("Only n=1 is supported.", param="n")
    if parsed.max_tokens is not None and parsed.max_completion_tokens is not None:
        raise BadRequest("Set max_tokens or max_completion_tokens, not both.", param="max_tokens")
    max_tokens = parsed.max_completion_tokens if parsed.max_tokens is None else parsed.max_tokens
    param = "max_tokens" if parsed.max_completion_tokens is None else "max_completion_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"{param} must be a positive integer.", param=param)
    if parsed.stream_options is not None and not parsed.stream:
        raise BadRequest(
            "stream_options is only allowed when stream is true.", param="stream_options"
        )
    if not parsed.model:
        raise BadRequest("model must not be empty.", param="model")
    if parsed.seed is not None and not -(2**63) <= parsed.seed < 2**63:
        raise BadRequest("seed must fit in 64 bits.", param="seed")
    stop = [parsed.stop] if isinstance(parsed.stop, str) else (parsed.stop or [])
    sampling: dict[str, Any] = {"stop": stop, "ignore_eos": parsed.ignore_eos}
    for name, value in (
        ("temperature", parsed.temperature),
        ("top_p", parsed.top_p),
        ("presence_penalty", parsed.presence_penalty),
        ("frequency_penalty", parsed.frequency_penalty),
        ("seed", parsed.seed),
    ):
        if value is not None:
            sampling[name] = value
    fields: dict[str, Any] = {
        "model": parsed.model,
        "messages": [
            inference_pb2.ChatMessage(role=m.role, content=m.text(), name=m.name)
            for m in parsed.messages
        ],
        "user": parsed.user or "",
        "sampling": inference_pb2.Sampling(**sampling),
        # The edge sends a non-streaming answer in one piece, so the core folds it too.
        "final_only": not parsed.stream,
    }
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return inference_pb2.ChatRequest(**fields)


async def _answer(call: Any, request_id: str, model: str) -> web.StreamResponse:
    """A non-streaming answer: the core sends it as one final chunk (`final_only`)."""
    final = await call.read()
    trailing = await call.trailing_metadata()  # the call's status is in
    if final is grpc.aio.EOF or not final.finish_reason:
        raise ApiError(502, "The inference service ended the answer without finishing.")
    body = {
        "id": "chatcmpl-" + request_id,
        "object": "chat.completion",
        "created": int(time.time()),
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
        headers=upstream.response_headers(trailing, request_id),
    )


async def _stream(
    request: web.Request, call: Any, framer: sse.ChunkFramer, include_usage: bool
) -> web.StreamResponse:
    """SSE: the status is chosen once the core has admitted the request (its first chunk or
    its error is in); then each gRPC chunk becomes its events, written in one go. The events
    that end the stream are written only after the call's status arrived, so a client that
    hangs up on `[DONE]` cannot cancel a call that already finished."""
    initial = await call.initial_metadata()
    chunk = await call.read()
    response = web.StreamResponse(
        headers={
            **upstream.response_headers(initial, request[REQUEST_ID]),
            "Content-Type": sse.CONTENT_TYPE,
            "Cache-Control": "no-cache",
        }
    )
    await response.prepare(request)
    request[OPEN_STREAM] = response
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
                if await call.read() is not grpc.aio.EOF:
                    log.error("chat stream from the core went on after its final chunk")
                events.append(sse.DONE)
                await response.write(b"".join(events))
                break
            await response.write(b"".join(events))
            events = []
            chunk = await call.read()
        else:
            log.error("chat stream from the core ended without a final chunk")
            raise ApiError(502, "The inference service ended the answer without finishing.")
    finally:
        ACTIVE_STREAMS.dec()
    await response.write_eof()
    return response
