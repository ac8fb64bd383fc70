"""The edge's shared state: its configuration and the cores it routes to (`gateway.routing`),
and the keys of what a request carries between the middlewares and its handler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc
from aiohttp import web

from gateway.config import EdgeConfig
from gateway.routing import RoutedInference, Router


@dataclass(slots=True)
class Edge:
    config: EdgeConfig
    router: Router
    # The Inference stub's methods, each call sent to the core `router` picks.
    inference: RoutedInference

    @property
    def channel(self) -> grpc.aio.Channel:
        """A channel for calls any core answers alike (the dashboard's Accounts calls)."""
        return self.router.any_channel()


EDGE: Final = web.AppKey("edge", Edge)
# The request id of the request being served (the client's x-request-id, or a new one).
REQUEST_ID: Final = web.RequestKey("request_id", str)
# A streamed response whose status line is sent: an error after that point is reported in it,
# as an SSE `error` event, instead of as a response of its own.
OPEN_STREAM: Final = web.RequestKey("open_stream", web.StreamResponse)
# The HTTP status of the error that ended an open stream (what telemetry counts it as).
STREAM_ERROR_STATUS: Final = web.RequestKey("stream_error_status", int)
# Set when a request's body stopped arriving (`body_timeout_s`): its answer closes the
# connection at once, without draining the rest of the body first (`gateway.protocol`).
BODY_ABANDONED: Final = web.RequestKey("body_abandoned", bool)
