"""POST /v1/embeddings: OpenAI embeddings → one unary gRPC call → `list` of `embedding`s."""

from __future__ import annotations

import base64
import struct
from typing import Any

import grpc
import msgspec
from aiohttp import web

from corvex.v1 import inference_pb2
from gateway import rest
from gateway.chat import usage_json
from gateway.errors import map_rpc_error
from gateway.openai_types import EmbeddingRequest, embedding_decoder
from gateway.state import EDGE, REQUEST_ID

_encoder = msgspec.json.Encoder()


async def embeddings(request: web.Request) -> web.Response:
    try:
        parsed = await rest.decode(request, embedding_decoder)
        rpc_request = to_rpc(parsed)
    except rest.BadRequest as exc:
        return exc.response()
    request_id = request[REQUEST_ID]
    call = request.app[EDGE].inference.Embed(rpc_request, **rest.call_options(request))
    try:
        result = await call
        trailing = await call.trailing_metadata()
    except grpc.aio.AioRpcError as exc:
        return map_rpc_error(exc).response()
    encode = _base64 if parsed.encoding_format == "base64" else list
    data: list[dict[str, Any]] = [
        {"object": "embedding", "index": i, "embedding": encode(e.values)}
        for i, e in enumerate(result.embeddings)
    ]
    usage = usage_json(result.usage)
    response = {
        "object": "list",
        "data": data,
        "model": parsed.model,
        "usage": {
            "prompt_tokens": usage["prompt_tokens"],
            "total_tokens": usage["total_tokens"],
            "cost": usage["cost"],
            "rate_card_version": usage["rate_card_version"],
        },
    }
    return web.Response(
        body=_encoder.encode(response),
        content_type="application/json",
        headers=rest.response_headers(trailing, request_id),
    )


def to_rpc(parsed: EmbeddingRequest) -> inference_pb2.EmbedRequest:
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
                raise rest.BadRequest(
                    "input must be a string, a list of strings, a list of token ids, or a "
                    "list of token-id lists.",
                    param="input",
                )
    if not inputs:
        raise rest.BadRequest("input must not be empty.", param="input")
    if parsed.dimensions is not None and not 1 <= parsed.dimensions <= 65536:
        raise rest.BadRequest("dimensions must be a positive integer.", param="dimensions")
    return inference_pb2.EmbedRequest(
        model=parsed.model, inputs=inputs, dimensions=parsed.dimensions, user=parsed.user or ""
    )


def _tokens(ids: list[Any]) -> inference_pb2.EmbedInput:
    if not all(isinstance(i, int) and 0 <= i < 2**32 for i in ids):
        raise rest.BadRequest("token ids must be non-negative integers.", param="input")
    return inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=ids))


def _base64(values: Any) -> str:
    """OpenAI's base64 format: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
