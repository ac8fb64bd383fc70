"""The edge's aiohttp application: routes, middlewares (telemetry outside, errors inside), the
gRPC channel's life (opened and closed with the app), and `serve` to run it as a process with
its connection policy (`gateway.protocol`) and its ops port (`gateway.ops_http`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corvex import readyfile
from corvex.v1 import inference_pb2_grpc
from gateway import ops_http, telemetry, upstream
from gateway.chat import chat_completions
from gateway.completions import completions
from gateway.config import EdgeConfig
from gateway.dashboard import mount as mount_dashboard
from gateway.embeddings import embeddings
from gateway.error_middleware import handle_errors
from gateway.models import list_models, retrieve_model
from gateway.multiplex import Multiplexer
from gateway.protocol import EdgeRunner
from gateway.state import EDGE, Edge

log = logging.getLogger(__name__)


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
        client_max_size=config.max_body_bytes, middlewares=[telemetry.observe, handle_errors]
    )

    async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
        channel = upstream.open_channel(config)
        stub = inference_pb2_grpc.InferenceStub(channel)
        app[EDGE] = Edge(config, channel, stub, Multiplexer(stub))
        yield
        await app[EDGE].streams.close()
        await channel.close()

    app.cleanup_ctx.append(channel_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    # The customers' web app (its own sub-application and middleware: gateway/dashboard).
    mount_dashboard(app, config.dashboard)
    return app


async def serve(config: EdgeConfig, *, ready_file: str | None = None) -> None:
    """Runs the edge until SIGTERM/SIGINT, then lets in-flight responses finish."""
    runner = EdgeRunner(create_app(config), config)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    log.info("edge listening on http://%s:%d, core at %s", config.host, port, config.core)
    ops: web.AppRunner | None = None
    metrics_port = 0
    if config.metrics_port >= 0:
        ops, metrics_port = await ops_http.start(config.metrics_host, config.metrics_port)
        log.info("edge metrics on http://%s:%d/metrics", config.metrics_host, metrics_port)
    if ready_file:
        readyfile.write(ready_file, http_port=port, metrics_port=metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("edge stopping")
    await runner.cleanup()
    if ops is not None:
        await ops.cleanup()
