"""The edge's shared state: its configuration and its one gRPC channel to the core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc
from aiohttp import web

from corvex.v1 import inference_pb2_grpc
from gateway.config import EdgeConfig


@dataclass(slots=True)
class Edge:
    config: EdgeConfig
    channel: grpc.aio.Channel
    inference: inference_pb2_grpc.InferenceStub


EDGE: Final = web.AppKey("edge", Edge)
# The request id of the request being served (the client's x-request-id, or a new one).
REQUEST_ID: Final = web.RequestKey("request_id", str)
