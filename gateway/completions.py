"""POST /v1/completions: OpenAI's legacy text completions → one Complete gRPC call → JSON or SSE.

A plain prompt (text or token ids, no chat template), metered, limited, priced and journaled by
the core exactly as chat is. It runs like `gateway.chat`: whole answers come one chunk per
choice (`final_only`), streams are framed by `gateway.sse`, and every refusal is an HTTP error
before the first byte. One prompt per request: a batch of several (OpenAI's list of prompts) is
refused naming `prompt`, since each prompt is its own metered request with its own hold, and a
batch could be half admitted.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec
from aiohttp import web

from corvex.api_params import Endpoint
from corvex.v1 import inference_pb2
from gateway import choices, decoding, sse, upstream
from gateway.chat import check_logprobs, check_max_tokens, sampling_of, stream_usage
from gateway.errors import BadRequest
from gateway.openai_types import CompletionRequest, check_refused, completion_decoder
from gateway.state import REQUEST_ID
from gateway.usage import usage_json

# OpenAI's (and vLLM's) default for max_tokens on this endpoint.
DEFAULT_MAX_TOKENS: Final = 16
_TOKEN_ID_END: Final = 2**32
_encoder = msgspec.json.Encoder()


async def completions(request: web.Request) -> web.StreamResponse:
    parsed = await decoding.decode(request, completion_decoder)
    rpc_request = to_rpc(parsed)
    call = upstream.generate(request, rpc_request)
    request_id = request[REQUEST_ID]
    try:
        if parsed.stream:
            include_usage, continuous = stream_usage(parsed.stream_options)
            framer = sse.CompletionFramer(
                "cmpl-" + request_id,
                int(time.time()),
                parsed.model,
                echo=bool(parsed.echo),
                logprobs=parsed.logprobs is not None,
                include_usage=include_usage,
                continuous_usage=continuous,
            )
            return await sse.relay(request, call, framer)
        return await _answer(call, request_id, parsed)
    finally:
        # As in chat: still running here only when the client went away or the handler failed.
        if not call.done():
            call.cancel()


def to_rpc(parsed: CompletionRequest) -> inference_pb2.CompleteRequest:
    """Checks what the wire types cannot express and builds the gRPC request."""
    check_refused(parsed, Endpoint.COMPLETIONS)
    sampling = sampling_of(parsed)
    if parsed.logprobs is not None:
        check_logprobs(parsed.logprobs, "logprobs")
        sampling.logprobs = parsed.logprobs
        if (
            parsed.echo
            and parsed.prompt_logprobs is not None
            and parsed.prompt_logprobs != parsed.logprobs
        ):
            # Echo with logprobs gives the prompt's tokens that many alternatives too.
            raise BadRequest(
                "With echo, the prompt's tokens get `logprobs` alternatives: leave "
                "prompt_logprobs out or set it to the same number.",
                param="prompt_logprobs",
            )
    max_tokens = DEFAULT_MAX_TOKENS if parsed.max_tokens is msgspec.UNSET else parsed.max_tokens
    check_max_tokens(max_tokens, "max_tokens")
    rpc = inference_pb2.CompleteRequest(
        model=parsed.model,
        sampling=sampling,
        echo=bool(parsed.echo),
        final_only=not parsed.stream,
        user=parsed.user or "",
    )
    if max_tokens is not None:
        rpc.max_tokens = max_tokens
    prompt = _prompt(parsed.prompt)
    if isinstance(prompt, str):
        rpc.text = prompt
    else:
        rpc.tokens.ids.extend(prompt)
    return rpc


def _prompt(prompt: str | list[Any]) -> str | list[int]:
    """One prompt, as text or token ids: a string, a list of ints, or a list of one of those."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return _token_ids(prompt)
    if len(prompt) > 1:
        raise BadRequest(
            f"This server takes one prompt per request, not a batch of {len(prompt)}: send "
            "each prompt as a request of its own (each is metered on its own).",
            param="prompt",
        )
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return str(prompt[0])
    if len(prompt) == 1 and isinstance(prompt[0], list):
        return _token_ids(prompt[0])
    raise BadRequest(
        "prompt must be a string, a list of token ids, or a list holding one of those.",
        param="prompt",
    )


def _token_ids(ids: list[Any]) -> list[int]:
    if not ids or not all(isinstance(i, int) and 0 <= i < _TOKEN_ID_END for i in ids):
        raise BadRequest(
            "token ids must be integers from 0 up to the model's vocabulary size.", param="prompt"
        )
    return ids


async def _answer(call: Any, request_id: str, parsed: CompletionRequest) -> web.Response:
    """A non-streaming answer: one final chunk per choice, each with the prompt before its
    text when echoed."""
    chunks, usage = await choices.read_whole(call)
    trailing = await call.trailing_metadata()  # the call's status is in
    prompt_text = next((c.prompt_text for c in chunks if c.prompt_text), "")
    prompt_tokens = next((list(c.prompt_logprobs) for c in chunks if c.prompt_logprobs), [])
    body_choices = []
    for chunk in chunks:
        text, tokens = chunk.text, list(chunk.logprobs)
        if parsed.echo:
            text, tokens = prompt_text + text, prompt_tokens + tokens
        choice: dict[str, Any] = {
            "index": chunk.index,
            "text": text,
            "logprobs": (
                choices.LegacyLogprobs().add(tokens) if parsed.logprobs is not None else None
            ),
            "finish_reason": choices.finish_reason(chunk),
            "stop_reason": choices.stop_reason(chunk),
        }
        if parsed.prompt_logprobs is not None:
            choice["prompt_logprobs"] = choices.prompt_logprobs(prompt_tokens)
        body_choices.append(choice)
    body = {
        "id": "cmpl-" + request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": parsed.model,
        "system_fingerprint": None,
        "choices": body_choices,
        "usage": usage_json(usage, completion_details=False),
    }
    return web.Response(
        body=_encoder.encode(body),
        content_type="application/json",
        headers=upstream.response_headers(trailing, request_id),
    )
