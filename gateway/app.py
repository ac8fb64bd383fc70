"""The edge's aiohttp application: routes, middlewares (telemetry outside, errors inside), the
cores' channels and their health watch (`gateway.routing`, opened and closed with the app),
and `serve` to run it as a process with its connection policy (`gateway.protocol`) and its
ops port (`gateway.ops_http`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from corvex import readyfile
from gateway import ops_http, telemetry, upstream
from gateway.chat import chat_completions
from gateway.completions import completions
from gateway.config import EdgeConfig
from gateway.dashboard import mount as mount_dashboard
from gateway.embeddings import embeddings
from gateway.error_middleware import handle_errors
from gateway.models import list_models, retrieve_model
from gateway.protocol import EdgeRunner
from gateway.routing import RoutedInference, Router
from gateway.state import EDGE, Edge

log = logging.getLogger(__name__)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when a core answers its health check with SERVING."""
    router = request.app[EDGE].router
    failure = "NOT_SERVING"
    for link in router.links:
        try:
            reply = await link.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError as exc:
            failure = exc.code().name
            continue
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return web.json_response({"status": "ready"})
    if len(router.links) == 1 and failure != "NOT_SERVING":
        return web.json_response({"status": "unavailable", "core": failure}, status=503)
    return web.json_response({"status": "not_serving"}, status=503)


def create_app(config: EdgeConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[telemetry.observe, handle_errors]
    )

    async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
        router = Router(
            config.core_addresses,
            lambda address: upstream.open_channel(config, address),
            models_refresh_s=config.models_refresh_s,
            transport=config.core_transport,
        )
        await router.start()
        app[EDGE] = Edge(config, router, RoutedInference(router))
        yield
        await router.close()

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
    upstream.check_plaintext(config)
    runner = EdgeRunner(create_app(config), config)
    await runner.setup()
    site = web.TCPSite(
        runner, config.host, config.port, backlog=1024, reuse_port=config.reuse_port or None
    )
    await site.start()
    port = runner.addresses[0][1]
    log.info("edge listening on http://%s:%d, cores at %s", config.host, port,
             ", ".join(config.core_addresses))  # fmt: skip
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
