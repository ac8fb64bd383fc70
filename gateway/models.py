"""GET /v1/models and /v1/models/{id}: OpenAI's model list, with Corvex's prices on each entry.

Read from the core on every call, so a rate-card reload shows in the very next response.
"""

from __future__ import annotations

from typing import Any

import grpc
import msgspec
from aiohttp import web

from corvex.v1 import inference_pb2
from gateway.errors import error_response, map_rpc_error
from gateway.state import EDGE

_encoder = msgspec.json.Encoder()


def model_json(model: inference_pb2.Model, version: str) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "name": model.display_name,
        "card": model.card_path,
        "context_length": model.context_length,
        "engine": model.engine,
        "supports_embeddings": model.supports_embeddings,
        "pricing": {
            "currency": model.currency,
            "unit": "per 1M tokens",
            "input": model.input_usd_per_million,
            "output": model.output_usd_per_million,
        },
        "rate_card_version": version,
    }


async def _catalogue(request: web.Request) -> inference_pb2.ListModelsResponse:
    edge = request.app[EDGE]
    result: inference_pb2.ListModelsResponse = await edge.inference.ListModels(
        inference_pb2.ListModelsRequest(), timeout=10
    )
    return result


async def list_models(request: web.Request) -> web.Response:
    try:
        catalogue = await _catalogue(request)
    except grpc.aio.AioRpcError as exc:
        return map_rpc_error(exc).response()
    body = {
        "object": "list",
        "data": [model_json(m, catalogue.rate_card_version) for m in catalogue.models],
        "rate_card_version": catalogue.rate_card_version,
    }
    return web.Response(body=_encoder.encode(body), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    try:
        catalogue = await _catalogue(request)
    except grpc.aio.AioRpcError as exc:
        return map_rpc_error(exc).response()
    for model in catalogue.models:
        if model.id == model_id:
            body = model_json(model, catalogue.rate_card_version)
            return web.Response(body=_encoder.encode(body), content_type="application/json")
    return error_response(
        404,
        f"The model `{model_id}` does not exist or is not served here.",
        param="model",
        code="model_not_found",
    )
