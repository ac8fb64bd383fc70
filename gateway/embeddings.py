"""POST /v1/embeddings: OpenAI embeddings → one unary gRPC call → `list` of `embedding`s."""

from __future__ import annotations

import base64
import struct
from typing import Any, Final

import msgspec
from aiohttp import web

from corvex.api_params import Endpoint
from corvex.v1 import inference_pb2
from gateway import decoding, upstream
from gateway.errors import BadRequest
from gateway.openai_types import EmbeddingRequest, check_refused, embedding_decoder
from gateway.state import EDGE, REQUEST_ID
from gateway.usage import priced

# The wire's bound for `dimensions` and token ids (uint32); the core owns the real bounds.
_UINT32_END: Final = 2**32
_encoder = msgspec.json.Encoder()


async def embeddings(request: web.Request) -> web.Response:
    parsed = await decoding.decode(request, embedding_decoder)
    rpc_request = to_rpc(parsed)
    call = request.app[EDGE].inference.Embed(rpc_request, **upstream.call_options(request))
    result = await call
    trailing = await call.trailing_metadata()
    encode = _base64 if parsed.encoding_format == "base64" else list
    data: list[dict[str, Any]] = [
        {"object": "embedding", "index": i, "embedding": encode(e.values)}
        for i, e in enumerate(result.embeddings)
    ]
    response = {
        "object": "list",
        "data": data,
        "model": parsed.model,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "total_tokens": result.usage.total_tokens,
            **priced(result.usage),
        },
    }
    return web.Response(
        body=_encoder.encode(response),
        content_type="application/json",
        headers=upstream.response_headers(trailing, request[REQUEST_ID]),
    )


def to_rpc(parsed: EmbeddingRequest) -> inference_pb2.EmbedRequest:
    """Checks what the wire types cannot express and builds the gRPC request."""
    check_refused(parsed, Endpoint.EMBEDDINGS)
    items = parsed.input
    inputs: list[inference_pb2.EmbedInput] = []
    if isinstance(items, str):
        inputs.append(inference_pb2.EmbedInput(text=items))
    elif items and all(isinstance(i, int) for i in items):
        inputs.append(_tokens(items))
    else:
        for item in items:
            if isinstance(item, str):
                inputs.append(inference_pb2.EmbedInput(text=item))
            elif isinstance(item, list):
                inputs.append(_tokens(item))
            else:
                raise BadRequest(
                    "input must be a string, a list of strings, a list of token ids, or a "
                    "list of token-id lists.",
                    param="input",
                )
    if not inputs:
        raise BadRequest("input must not be empty.", param="input")
    if parsed.dimensions is not None and not 0 <= parsed.dimensions < _UINT32_END:
        raise BadRequest("dimensions must be a positive integer.", param="dimensions")
    return inference_pb2.EmbedRequest(
        model=parsed.model, inputs=inputs, dimensions=parsed.dimensions, user=parsed.user or ""
    )


def _tokens(ids: list[Any]) -> inference_pb2.EmbedInput:
    if not all(isinstance(i, int) and 0 <= i < _UINT32_END for i in ids):
        raise BadRequest(
            "token ids must be integers from 0 up to the model's vocabulary size.", param="input"
        )
    return inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=ids))


def _base64(values: Any) -> str:
    """OpenAI's base64 format: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
