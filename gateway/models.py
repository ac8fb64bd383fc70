"""GET /v1/models and /v1/models/{id}: OpenAI's model list, with Corvex's prices on each entry
and the routes that serve it (`routes`: /v1/chat/completions, /v1/completions, and
/v1/embeddings for the models that embed), all metered at the same rates.

Read from the core on every call, so a rate-card reload shows in the very next response. Each
entry lists the model's reserved offerings; with an API key, the key's workspace also sees its
own reserved endpoints (the core decides which: the key travels as on every other call).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import web

from corvex import model_ids
from corvex.v1 import errors_pb2, inference_pb2
from gateway import upstream
from gateway.errors import BY_REASON, ApiError
from gateway.state import EDGE, REQUEST_ID

_GENERATION_ROUTES: Final = ("/v1/chat/completions", "/v1/completions")
_encoder = msgspec.json.Encoder()


def routes(model: inference_pb2.Model) -> list[str]:
    """The API routes of this edge that serve `model` (not to be confused with reserved
    endpoints, which are rented engines)."""
    embeds = ["/v1/embeddings"] if model.supports_embeddings else []
    return [*_GENERATION_ROUTES, *embeds]


def model_json(model: inference_pb2.Model, version: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "name": model.display_name,
        "card": model.card_path,
        "context_length": model.context_length,
        "engine": model.engine,
        "supports_embeddings": model.supports_embeddings,
        "routes": routes(model),
        "pricing": {
            "currency": model.currency,
            "unit": "per 1M tokens",
            "input": model.input_usd_per_million,
            "output": model.output_usd_per_million,
        },
        "reserved": [
            {
                "id": offering.id,
                "model": offering.model,
                "gpus_per_replica": offering.gpus_per_replica,
                "usd_per_replica_hour": offering.usd_per_replica_hour,
                "minimum_hours": offering.minimum_hours,
                "accrual": "per minute",
            }
            for offering in model.reserved_offerings
        ],
        "rate_card_version": version,
    }
    if model.HasField("reserved_endpoint"):
        endpoint = model.reserved_endpoint
        body["reserved_endpoint"] = {
            "id": endpoint.endpoint_id,
            "offering": endpoint.offering,
            "base_model": endpoint.base_model,
            "replicas": endpoint.replicas,
            "status": endpoint.status,
        }
    return body


async def _catalogue(request: web.Request) -> inference_pb2.ListModelsResponse:
    edge = request.app[EDGE]
    result: inference_pb2.ListModelsResponse = await edge.inference.ListModels(
        inference_pb2.ListModelsRequest(),
        metadata=upstream.metadata(upstream.authorization(request), request[REQUEST_ID]),
        timeout=10,
    )
    return result


async def list_models(request: web.Request) -> web.Response:
    catalogue = await _catalogue(request)
    body = {
        "object": "list",
        "data": [model_json(m, catalogue.rate_card_version) for m in catalogue.models],
        "rate_card_version": catalogue.rate_card_version,
    }
    return web.Response(body=_encoder.encode(body), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    catalogue = await _catalogue(request)
    for model in catalogue.models:
        if model.id == model_id:
            body = model_json(model, catalogue.rate_card_version)
            return web.Response(body=_encoder.encode(body), content_type="application/json")
    # The core's own refusal of an unknown model, in the words and row it uses for it.
    status, kind, code = BY_REASON[errors_pb2.MODEL_NOT_FOUND]
    raise ApiError(status, model_ids.not_served(model_id), param="model", code=code, kind=kind)
