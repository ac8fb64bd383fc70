"""The edge's shared state: its configuration and its one gRPC channel to the core, and the
keys of what a request carries between the middlewares and its handler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc
from aiohttp import web

from corvex.v1 import inference_pb2_grpc
from gateway.config import EdgeConfig
from gateway.multiplex import Multiplexer


@dataclass(slots=True)
class Edge:
    config: EdgeConfig
    channel: grpc.aio.Channel
    inference: inference_pb2_grpc.InferenceStub
    # The Streams call that carries generation requests (edge.core_transport "streams").
    streams: Multiplexer


EDGE: Final = web.AppKey("edge", Edge)
# The request id of the request being served (the client's x-request-id, or a new one).
REQUEST_ID: Final = web.RequestKey("request_id", str)
# A streamed response whose status line is sent: an error after that point is reported in it,
# as an SSE `error` event, instead of as a response of its own.
OPEN_STREAM: Final = web.RequestKey("open_stream", web.StreamResponse)
# The HTTP status of the error that ended an open stream (what telemetry counts it as).
STREAM_ERROR_STATUS: Final = web.RequestKey("stream_error_status", int)
