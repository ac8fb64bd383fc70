"""Telemetry of the edge: Prometheus metrics (served on the ops port, `gateway.ops_http`) and
one JSON log line per request.

Labels are the route template and the status code only: never a model name (clients can send
anything there), a key or a request id. The Authorization header is never logged. The status
is the one the client got: a stream that ended with an error event counts as that error's
status, and 499 (nginx's convention) means the client went away before its answer, nothing
else. Requests that never reached a route (aiohttp could not parse them, their head came too
slowly, or the edge was at its connection bound) are counted under the route "unparsed".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from corvex import request_ids
from gateway.state import REQUEST_ID, STREAM_ERROR_STATUS

log = logging.getLogger("corvex.edge.requests")
disable_created_metrics()  # type: ignore[no-untyped-call]

_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REQUESTS: Final = Counter(
    "corvex_edge_requests", "HTTP requests by route and status.", ["route", "status"]
)
DURATION: Final = Histogram(
    "corvex_edge_request_duration_seconds", "HTTP request latency.", ["route"], buckets=_BUCKETS
)
TTFT: Final = Histogram(
    "corvex_edge_time_to_first_token_seconds",
    "Time to the first streamed content chunk.",
    buckets=_BUCKETS,
)
ACTIVE_STREAMS: Final = Gauge("corvex_edge_active_streams", "SSE streams being sent.")
FIRST_TOKEN_AT: Final = web.RequestKey("first_token_at", float)
STARTED_AT: Final = web.RequestKey("started_at", float)
_QUIET_ROUTES: Final = frozenset({"/health", "/ready"})
# What a request that never reached a route (unparsable, too slow, over capacity) counts as.
UNPARSED_ROUTE: Final = "unparsed"
CLIENT_WENT_AWAY: Final = 499


@functools.cache
def _route_metrics(route: str, status: int) -> tuple[Counter, Histogram]:
    """Labelled children, looked up once per route and status (both bounded sets)."""
    return REQUESTS.labels(route, str(status)), DURATION.labels(route)


def first_token(request: web.Request) -> None:
    """Marks the first content chunk of a stream (once)."""
    if FIRST_TOKEN_AT not in request:
        now = time.perf_counter()
        request[FIRST_TOKEN_AT] = now
        TTFT.observe(now - request[STARTED_AT])


@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request[STARTED_AT] = started = time.perf_counter()
    request[REQUEST_ID] = request_id = request_ids.request_id(request.headers.get("x-request-id"))
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    # What escapes the error middleware: the client went away (cancelled, or its connection
    # broke while we wrote), or a bug in the middlewares themselves (aiohttp answers 500).
    status = 500
    try:
        response = await handler(request)
        status = request.get(STREAM_ERROR_STATUS, response.status)
        if not response.prepared:
            response.headers.setdefault("x-request-id", request_id)
        return response
    except web.HTTPException as exc:
        status = exc.status  # an answer raised past the error middleware (a redirect)
        raise
    except (asyncio.CancelledError, ConnectionError):
        status = CLIENT_WENT_AWAY
        raise
    finally:
        record(request.method, route, status, time.perf_counter() - started, request_id)


def record(
    method: str, route: str, status: int, elapsed_s: float, request_id: str, **extra: str
) -> None:
    """Counts one answered (or abandoned) request and writes its log line."""
    requests, duration = _route_metrics(route, status)
    requests.inc()
    duration.observe(elapsed_s)
    if route not in _QUIET_ROUTES and log.isEnabledFor(logging.INFO):
        log.info(
            "%s %s %d",
            method,
            route,
            status,
            extra={
                "request_id": request_id,
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed_s * 1000, 3),
                **extra,
            },
        )
