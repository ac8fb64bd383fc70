"""The customers' web app, served by the edge: public pricing and model cards, sign-up and
sign-in, and the dashboard with its playground (DESIGN.md, "Customers").

Server-rendered pages (Jinja2) with a little JavaScript of our own and vendored uPlot
(static/vendor, with its licence; no build step, no CDN). It calls the core's Accounts service
with the visitor's session like any other client; it decides nothing about money or access.
`mount` adds it to the edge's application: the dashboard as a sub-application under
/dashboard/ (its own middleware for sessions, CSRF and error pages), the public pages and
/static/ at the top.
"""

from __future__ import annotations

from aiohttp import web

from gateway.config import DashboardConfig
from gateway.dashboard import auth, pages, public, render
from gateway.dashboard.sessions import DASHBOARD, PREFIX, AttemptLimiter, Dashboard, middleware


async def _home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/pricing")


async def _dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PREFIX + "/")


def mount(app: web.Application, config: DashboardConfig) -> None:
    if not config.enabled:
        return
    state = Dashboard(config, render.environment(), AttemptLimiter(config.sign_in_per_minute))
    app[DASHBOARD] = state
    app.router.add_get("/", _home)
    app.router.add_get(PREFIX, _dashboard)
    app.router.add_get("/pricing", public.pricing)
    app.router.add_get("/models/{org}/{name}", public.model_card)
    app.router.add_static("/static/", render.STATIC_DIR, append_version=False)
    sub = web.Application(middlewares=[middleware])
    routes = sub.router
    routes.add_get("/signup", auth.sign_up_page)
    routes.add_post("/signup", auth.sign_up)
    routes.add_get("/signin", auth.sign_in_page)
    routes.add_post("/signin", auth.sign_in)
    routes.add_post("/signout", auth.sign_out)
    routes.add_get("/", pages.overview)
    routes.add_post("/claim", pages.claim)
    routes.add_get("/credits", pages.credits)
    routes.add_post("/credits/checkout", pages.start_checkout)
    routes.add_get("/credits/checkout/{checkout}", pages.checkout_page)
    routes.add_post("/credits/checkout/{checkout}", pages.approve_checkout)
    routes.add_post("/credits/auto-reload", pages.auto_reload)
    routes.add_get("/invoices/{number}.{format}", pages.invoice)
    routes.add_get("/limits", pages.limits)
    routes.add_post("/limits", pages.set_cap)
    routes.add_get("/keys", pages.keys)
    routes.add_post("/keys", pages.create_key)
    routes.add_post("/keys/{key}/revoke", pages.revoke_key)
    routes.add_post("/keys/{key}/limits", pages.key_limits)
    routes.add_get("/usage", pages.usage)
    routes.add_get("/usage.csv", pages.usage_csv)
    routes.add_get("/alerts", pages.alerts)
    routes.add_post("/alerts", pages.set_alerts)
    routes.add_get("/playground", pages.playground)
    routes.add_get("/api/workspace", pages.workspace_json)
    app.add_subapp(PREFIX, sub)
