"""The edge's ops port: Prometheus `/metrics`, apart from the public API port (as the core's).

`/health` and `/ready` stay on the API port, where load balancers look for them.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def start(host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serves the app; returns its runner (to clean up) and the bound port."""
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
