"""The edge's aiohttp application: routes, JSON errors for everything, and the gRPC channel's
life (opened and closed with the app), plus `serve` to run it as a process."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corvex import readyfile
from corvex.v1 import inference_pb2_grpc
from gateway import telemetry
from gateway.chat import chat_completions
from gateway.config import EdgeConfig
from gateway.embeddings import embeddings
from gateway.errors import error_response
from gateway.models import list_models, retrieve_model
from gateway.state import EDGE, Edge

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error the router or aiohttp raises (404, 405, 413, ...) becomes an OpenAI body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"Unknown route {request.method} {request.path}."
        elif exc.status == 405:
            message = f"Method {request.method} is not allowed on {request.path}."
        elif exc.status == 413:
            message = (
                f"The request body is larger than this server accepts "
                f"({request.app[EDGE].config.max_body_bytes} bytes)."
            )
        else:
            message = exc.reason
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, message, headers=headers)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when the core answers its health check with SERVING."""
    stub = health_pb2_grpc.HealthStub(request.app[EDGE].channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    except grpc.aio.AioRpcError as exc:
        return web.json_response({"status": "unavailable", "core": exc.code().name}, status=503)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return web.json_response(
        {"status": "ready" if serving else "not_serving"}, status=200 if serving else 503
    )


def create_app(config: EdgeConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[telemetry.observe, json_errors]
    )

    async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
        channel = grpc.aio.insecure_channel(config.core, options=_CHANNEL_OPTIONS)
        app[EDGE] = Edge(config, channel, inference_pb2_grpc.InferenceStub(channel))
        yield
        await channel.close()

    app.cleanup_ctx.append(channel_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", telemetry.metrics)
    return app


async def serve(config: EdgeConfig, *, ready_file: str | None = None) -> None:
    """Runs the edge until SIGTERM/SIGINT, then lets in-flight responses finish."""
    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    log.info("edge listening on http://%s:%d, core at %s", config.host, port, config.core)
    if ready_file:
        readyfile.write(ready_file, http_port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("edge stopping")
    await runner.cleanup()
