"""The core's small HTTP port for operators: Prometheus `/metrics`, and `/health` with the
details gRPC health cannot carry (why the core is not serving, the rate card in force and the
last reload error, each engine's state and load, the journal). Read-only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corvex_core.telemetry import Telemetry


def create_app(telemetry: Telemetry, health: Callable[[], dict[str, Any]]) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        telemetry.refresh()
        return web.Response(
            body=generate_latest(telemetry.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def health_details(request: web.Request) -> web.Response:
        details = health()
        return web.json_response(details, status=200 if details["serving"] else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health_details)
    return app


async def start(
    telemetry: Telemetry, health: Callable[[], dict[str, Any]], host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Serves the app; returns its runner (to clean up) and the bound port."""
    runner = web.AppRunner(create_app(telemetry, health), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
