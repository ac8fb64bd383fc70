"""The public pages: /pricing and a model card at each rate-card `card` path.

Both are rendered from the catalogue the core serves (ListModels, the rate card in force), and
the pricing table through corvex.pricing_docs, the generator of docs/pricing.md's table, so
the drift gate can read it back from the live edge and compare it with the rate card.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from corvex import pricing_docs
from corvex.v1 import inference_pb2
from gateway import models
from gateway.dashboard import render
from gateway.dashboard.sessions import DASHBOARD
from gateway.errors import from_rpc
from gateway.state import EDGE


async def _catalogue(request: web.Request) -> inference_pb2.ListModelsResponse:
    reply: inference_pb2.ListModelsResponse = await request.app[EDGE].inference.ListModels(
        inference_pb2.ListModelsRequest(), timeout=10
    )
    return reply


def _page(
    request: web.Request, template: str, *, status: int = 200, **values: object
) -> web.Response:
    return render.page(
        request.app[DASHBOARD].env, template, status=status, visitor=None, path=request.path,
        **values,
    )  # fmt: skip


async def pricing(request: web.Request) -> web.StreamResponse:
    try:
        catalogue = await _catalogue(request)
    except grpc.aio.AioRpcError as exc:
        mapped = from_rpc(exc)
        return _page(request, "error.html", status=mapped.status, status_code=mapped.status,
                     message=mapped.body.message)  # fmt: skip
    rows = [
        pricing_docs.PageRow(
            m.display_name, m.input_usd_per_million, m.output_usd_per_million, m.card_path
        )
        for m in catalogue.models
    ]
    names = {m.id: m.display_name for m in catalogue.models}
    reserved = [
        pricing_docs.ReservedRow(
            o.id, names.get(o.model, o.model), o.gpus_per_replica, o.usd_per_replica_hour,
            o.minimum_hours,
        )
        for m in catalogue.models
        for o in m.reserved_offerings
    ]  # fmt: skip
    table = pricing_docs.render_html(catalogue.rate_card_version, rows, reserved)
    return _page(request, "pricing.html", table=table)


async def model_card(request: web.Request) -> web.StreamResponse:
    try:
        catalogue = await _catalogue(request)
    except grpc.aio.AioRpcError as exc:
        mapped = from_rpc(exc)
        return _page(request, "error.html", status=mapped.status, status_code=mapped.status,
                     message=mapped.body.message)  # fmt: skip
    model = next((m for m in catalogue.models if m.card_path == request.path), None)
    if model is None:
        return _page(request, "error.html", status=404, status_code=404,
                     message="No model has a card here; /pricing lists them all.")  # fmt: skip
    base = f"{request.scheme}://{request.host}"
    return _page(
        request,
        "model.html",
        model=model,
        version=catalogue.rate_card_version,
        base=base,
        routes=models.routes(model),
    )
