"""POST /v1/chat/completions: OpenAI chat → one server-streaming gRPC call → JSON or SSE.

Non-streaming requests get the whole answer from the core in one message per choice
(`final_only`) and send one `chat.completion`. Streaming requests are framed by `gateway.sse`.
The response status is chosen only after the core admitted the request, so every refusal is a
proper HTTP error, never a broken stream. A call is always read to its status: cancelled only
when the client went away (the core then aborts the request and settles what was produced),
never after it finished.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec
from aiohttp import web

from corvex.api_params import Endpoint
from corvex.v1 import inference_pb2
from gateway import choices, decoding, sse, upstream
from gateway.errors import BadRequest
from gateway.openai_types import (
    MAX_LOGPROBS,
    ChatCompletionRequest,
    GenerationRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    chat_decoder,
    check_refused,
)
from gateway.state import REQUEST_ID
from gateway.usage import usage_json

MAX_TOKENS_LIMIT: Final = 2**31 - 1
_TOOL_CHOICE: Final = {
    "none": inference_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": inference_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": inference_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
_encoder = msgspec.json.Encoder()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    parsed = await decoding.decode(request, chat_decoder)
    rpc_request = to_rpc(parsed)
    call = upstream.generate(request, rpc_request)
    request_id = request[REQUEST_ID]
    try:
        if parsed.stream:
            include_usage, continuous = stream_usage(parsed.stream_options)
            framer = sse.ChatFramer(
                "chatcmpl-" + request_id,
                int(time.time()),
                parsed.model,
                include_usage=include_usage,
                continuous_usage=continuous,
            )
            return await sse.relay(request, call, framer)
        return await _answer(call, request_id, parsed)
    finally:
        # Both paths read the call to its status, so it is only still running here when the
        # handler was cancelled (the client went away) or failed: the core then aborts.
        if not call.done():
            call.cancel()


def to_rpc(parsed: ChatCompletionRequest) -> inference_pb2.ChatRequest:
    """Checks what the wire types cannot express and builds the gRPC request."""
    check_refused(parsed, Endpoint.CHAT)
    if parsed.max_tokens is not None and parsed.max_completion_tokens is not None:
        raise BadRequest("Set max_tokens or max_completion_tokens, not both.", param="max_tokens")
    max_tokens = parsed.max_completion_tokens if parsed.max_tokens is None else parsed.max_tokens
    param = "max_tokens" if parsed.max_completion_tokens is None else "max_completion_tokens"
    check_max_tokens(max_tokens, param)
    sampling = sampling_of(parsed)
    if parsed.top_logprobs is not None and not parsed.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
    if parsed.logprobs:
        check_logprobs(parsed.top_logprobs or 0, "top_logprobs")
        sampling.logprobs = parsed.top_logprobs or 0
    fields: dict[str, Any] = {
        "model": parsed.model,
        "messages": [_message(m) for m in parsed.messages],
        "user": parsed.user or "",
        "sampling": sampling,
        # The edge sends a non-streaming answer in one piece, so the core folds it too.
        "final_only": not parsed.stream,
    }
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    rpc = inference_pb2.ChatRequest(**fields)
    _tools(parsed, rpc)
    if parsed.reasoning_effort is not None:
        rpc.reasoning_effort = parsed.reasoning_effort
    if parsed.chat_template_kwargs is not None:
        rpc.chat_template_kwargs_json = _encoder.encode(parsed.chat_template_kwargs).decode()
    if parsed.include_reasoning is not None:
        rpc.include_reasoning = parsed.include_reasoning
    return rpc


def check_max_tokens(max_tokens: int | None, param: str) -> None:
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(
            f"{param} must be an integer from 1 to {MAX_TOKENS_LIMIT} (the model's context "
            "length bounds it further).",
            param=param,
        )


def stream_usage(options: StreamOptions | None) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a stream."""
    if options is None:
        return False, False
    return bool(options.include_usage), bool(options.continuous_usage_stats)


def sampling_of(parsed: GenerationRequest) -> inference_pb2.Sampling:
    """The sampling settings chat and completions share, checked for what the wire cannot
    carry and for combinations that ask for something the stream cannot give."""
    if not parsed.model:
        raise BadRequest("model must not be empty.", param="model")
    if parsed.stream_options is not None and not parsed.stream:
        raise BadRequest(
            "stream_options is only allowed when stream is true.", param="stream_options"
        )
    include_usage, continuous = stream_usage(parsed.stream_options)
    if continuous and not include_usage:
        # vLLM sends no usage at all then; asking for it per chunk and not at all is refused.
        raise BadRequest(
            "stream_options.continuous_usage_stats needs stream_options.include_usage: true.",
            param="stream_options",
        )
    if parsed.seed is not None and not -(2**63) <= parsed.seed < 2**63:
        raise BadRequest("seed must fit in 64 bits.", param="seed")
    if parsed.prompt_logprobs is not None:
        if parsed.stream:
            raise BadRequest(
                "prompt_logprobs is not available with stream: true (as in vLLM).",
                param="prompt_logprobs",
            )
        check_logprobs(parsed.prompt_logprobs, "prompt_logprobs")
    stop = [parsed.stop] if isinstance(parsed.stop, str) else (parsed.stop or [])
    sampling = inference_pb2.Sampling(
        stop=stop,
        ignore_eos=bool(parsed.ignore_eos),
        include_stop_str_in_output=bool(parsed.include_stop_str_in_output),
        stop_token_ids=parsed.stop_token_ids or [],
        logit_bias=_logit_bias(parsed.logit_bias),
    )
    for name in (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "n",
        "top_k",
        "min_p",
        "repetition_penalty",
        "prompt_logprobs",
    ):
        value = getattr(parsed, name)
        if value is not None:
            setattr(sampling, name, value)
    if parsed.response_format is not None:
        sampling.response_format.CopyFrom(_response_format(parsed.response_format))
    return sampling


def check_logprobs(value: int, param: str) -> None:
    if value > MAX_LOGPROBS:
        raise BadRequest(f"{param} must be between 0 and {MAX_LOGPROBS}.", param=param)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """JSON's text keys as token ids; the vocabulary and the values are the core's checks."""
    result: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < 2**32):
            raise BadRequest(
                "logit_bias maps token ids (non-negative integers) to a bias from -100 to 100.",
                param="logit_bias",
            )
        result[int(key)] = value
    return result


def _response_format(value: ResponseFormat) -> inference_pb2.ResponseFormat:
    if isinstance(value, JsonObjectFormat):
        return inference_pb2.ResponseFormat(type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    if isinstance(value, JsonSchemaFormat):
        spec = value.json_schema
        if spec.schema is None:
            raise BadRequest(
                "response_format.json_schema needs its schema.",
                param="response_format.json_schema.schema",
            )
        return inference_pb2.ResponseFormat(
            type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            schema_json=_encoder.encode(spec.schema).decode(),
            name=spec.name,
            strict=bool(spec.strict),
        )
    return inference_pb2.ResponseFormat(type=inference_pb2.RESPONSE_FORMAT_TYPE_TEXT)


def _message(message: Message) -> inference_pb2.ChatMessage:
    wire = inference_pb2.ChatMessage(role=message.role, content=message.text(), name=message.name)
    for call in message.tool_calls or ():
        wire.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
    if message.tool_call_id is not None:
        wire.tool_call_id = message.tool_call_id
    reasoning = message.reasoning if message.reasoning is not None else message.reasoning_content
    if reasoning is not None:
        wire.reasoning = reasoning
    return wire


def _tools(parsed: ChatCompletionRequest, rpc: inference_pb2.ChatRequest) -> None:
    """tools, tool_choice and parallel_tool_calls; whether the choice fits the tools (a named
    function that is defined, tools to require) is the core's check."""
    for tool in parsed.tools or ():
        function = tool.function
        wire = rpc.tools.add(name=function.name, strict=bool(function.strict))
        if function.description is not None:
            wire.description = function.description
        if function.parameters is not None:
            wire.parameters_json = _encoder.encode(function.parameters).decode()
    choice = parsed.tool_choice
    if isinstance(choice, NamedToolChoice):
        rpc.tool_choice.mode = inference_pb2.TOOL_CHOICE_MODE_NAMED
        rpc.tool_choice.name = choice.function.name
    elif choice is not None:
        rpc.tool_choice.mode = _TOOL_CHOICE[choice]
    if parsed.parallel_tool_calls is not None:
        rpc.parallel_tool_calls = parsed.parallel_tool_calls


async def _answer(call: Any, request_id: str, parsed: ChatCompletionRequest) -> web.Response:
    """A non-streaming answer: the core sends one final chunk per choice (`final_only`)."""
    chunks, usage = await choices.read_whole(call)
    trailing = await call.trailing_metadata()  # the call's status is in
    body: dict[str, Any] = {
        "id": "chatcmpl-" + request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": parsed.model,
        "system_fingerprint": None,
        "choices": [_choice(chunk, bool(parsed.logprobs)) for chunk in chunks],
        "usage": usage_json(usage),
    }
    if parsed.prompt_logprobs is not None:
        prompt = next((list(c.prompt_logprobs) for c in chunks if c.prompt_logprobs), [])
        body["prompt_logprobs"] = choices.prompt_logprobs(prompt)
    return web.Response(
        body=_encoder.encode(body),
        content_type="application/json",
        headers=upstream.response_headers(trailing, request_id),
    )


def _choice(chunk: inference_pb2.ChatChunk, logprobs: bool) -> dict[str, Any]:
    calls = choices.tool_calls([chunk])
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI's content is null beside tool calls when the model wrote no text.
        "content": chunk.text or (None if calls else ""),
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    if chunk.reasoning:
        message["reasoning"] = chunk.reasoning
    return {
        "index": chunk.index,
        "message": message,
        "logprobs": (
            {"content": choices.chat_logprobs(chunk.logprobs), "refusal": None}
            if logprobs
            else None
        ),
        "finish_reason": choices.finish_reason(chunk),
        "stop_reason": choices.stop_reason(chunk),
    }
