"""Error mapping of the edge: gRPC status (with its ErrorInfo) → HTTP status and OpenAI body.

The body is always `{"error": {"message", "type", "param", "code"}}` (DESIGN.md error table).
Details that help a client act travel as headers: Retry-After where waiting helps, and
`x-should-retry: false` where it cannot (the OpenAI SDKs honour it). Nothing internal (no
stack trace, no core address) reaches a client.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import grpc
import msgspec
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger(__name__)

DETAILS_KEY: Final = "grpc-status-details-bin"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _Envelope(msgspec.Struct):
    error: ErrorBody


_encoder = msgspec.json.Encoder()

# reason → (HTTP status, OpenAI type, OpenAI code)
_BY_REASON: Final[dict[str, tuple[int, str, str | None]]] = {
    "INVALID_API_KEY": (401, "invalid_request_error", "invalid_api_key"),
    "MODEL_NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "INVALID_REQUEST": (400, "invalid_request_error", None),
    "CONTEXT_LENGTH_EXCEEDED": (400, "invalid_request_error", "context_length_exceeded"),
    "INSUFFICIENT_CREDITS": (402, "insufficient_credits", "insufficient_credits"),
    "RATE_LIMIT_EXCEEDED": (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    "TOKEN_LIMIT_EXCEEDED": (429, "rate_limit_exceeded", "token_limit_exceeded"),
    "ENGINE_UNAVAILABLE": (503, "server_error", "engine_unavailable"),
    "SERVICE_UNAVAILABLE": (503, "server_error", "service_unavailable"),
    "NOT_FOUND": (404, "invalid_request_error", None),
}
_NO_RETRY: Final = frozenset({"TOKEN_LIMIT_EXCEEDED", "INSUFFICIENT_CREDITS"})


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if kind is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
    return web.Response(
        status=status,
        body=_encoder.encode(_Envelope(ErrorBody(message, kind, param, code))),
        content_type="application/json",
        headers=headers,
    )


class MappedError(msgspec.Struct):
    """An RPC failure, ready to be sent as a response or as an SSE error event."""

    status: int
    body: ErrorBody
    headers: dict[str, str]

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=_encoder.encode(_Envelope(self.body)),
            content_type="application/json",
            headers=self.headers,
        )

    def sse_event(self) -> bytes:
        return b"data: " + _encoder.encode(_Envelope(self.body)) + b"\n\n"


def map_rpc_error(error: grpc.aio.AioRpcError) -> MappedError:
    """Maps a failed call to the error table, by its ErrorInfo reason where it has one."""
    status, info, retry_s = _details(error)
    headers: dict[str, str] = {}
    if info is not None and info.reason in _BY_REASON:
        http, kind, code = _BY_REASON[info.reason]
        param = info.metadata.get("param") or ("model" if code == "model_not_found" else None)
        message = status.message if status is not None else (error.details() or "")
        if retry_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(retry_s * 1000)))
        if info.reason in _NO_RETRY:
            headers["x-should-retry"] = "false"
        return MappedError(http, ErrorBody(message, kind, param, code), headers)
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return MappedError(
            503,
            ErrorBody(
                "The inference service is unreachable right now; retry shortly.",
                "server_error",
                None,
                None,
            ),
            {"retry-after": "1"},
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return MappedError(
            504, ErrorBody("The request took too long.", "server_error", None, None), {}
        )
    if code != grpc.StatusCode.INTERNAL:
        log.error("unmapped error from the core: %s %s", code, error.details())
    return MappedError(500, ErrorBody("Internal server error.", "server_error", None, None), {})


def _details(
    error: grpc.aio.AioRpcError,
) -> tuple[status_pb2.Status | None, error_details_pb2.ErrorInfo | None, float | None]:
    raw = next(
        (
            v
            for k, v in (error.trailing_metadata() or ())
            if k == DETAILS_KEY and isinstance(v, bytes)
        ),
        None,
    )
    if raw is None:
        return None, None, None
    status = status_pb2.Status.FromString(raw)
    info = None
    retry_s = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_s = retry.retry_delay.ToNanoseconds() / 1e9
    return status, info, retry_s
