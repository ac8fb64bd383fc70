"""Errors as OpenAI clients see them, and the mapping of the core's gRPC status onto them.

An `ApiError` is one HTTP status, one OpenAI body `{"error": {"message", "type", "param",
"code"}}` (DESIGN.md error table) and the headers that help a client act: Retry-After where
waiting helps, `x-should-retry: false` where it cannot (the OpenAI SDKs honour both). Handlers
raise it; `gateway.error_middleware` is the one place that sends it. Nothing internal (no stack
trace, no core address) goes into a message, and client text only through `corvex.quoting`.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import grpc
import msgspec
from aiohttp import web
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from corvex.quoting import quote
from corvex.v1 import errors_pb2

log = logging.getLogger(__name__)


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _Envelope(msgspec.Struct):
    error: ErrorBody


_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error response: raised by handlers, sent by the error middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        if kind is None:
            kind = "server_error" if status >= 500 else "invalid_request_error"
        self.status = status
        self.body = ErrorBody(message, kind, param, code)
        self.headers = headers or {}
        # Close the connection after the answer: the request's framing cannot be trusted.
        self.close = close

    def encode(self) -> bytes:
        """The OpenAI error body, as JSON."""
        return _encoder.encode(_Envelope(self.body))

    def response(self) -> web.Response:
        response = web.Response(
            status=self.status,
            body=self.encode(),
            content_type="application/json",
            headers=self.headers,
        )
        if self.close:
            response.force_close()
        return response


class BadRequest(ApiError):
    """A request the edge rejects before calling the core: a 400 naming `param`."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(400, message, param=param, code=code)


# Every ErrorReason of proto/corvex/v1/errors.proto → (HTTP status, OpenAI type, OpenAI code).
# tests/gateway/test_errors.py fails when the proto gains a reason that is not mapped here.
BY_REASON: Final[dict[int, tuple[int, str, str | None]]] = {
    errors_pb2.INVALID_API_KEY: (401, "invalid_request_error", "invalid_api_key"),
    errors_pb2.MODEL_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    errors_pb2.INVALID_REQUEST: (400, "invalid_request_error", None),
    errors_pb2.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    errors_pb2.INSUFFICIENT_CREDITS: (402, "insufficient_credits", "insufficient_credits"),
    errors_pb2.RATE_LIMIT_EXCEEDED: (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    errors_pb2.TOKEN_LIMIT_EXCEEDED: (429, "rate_limit_exceeded", "token_limit_exceeded"),
    errors_pb2.ENGINE_UNAVAILABLE: (503, "server_error", "engine_unavailable"),
    # The Accounts service's reasons: the edge never calls it, but a row keeps the map total.
    errors_pb2.INVALID_ADMIN_TOKEN: (403, "invalid_request_error", "invalid_admin_token"),
    errors_pb2.NOT_FOUND: (404, "invalid_request_error", None),
    errors_pb2.SERVICE_UNAVAILABLE: (503, "server_error", "service_unavailable"),
    errors_pb2.CAPACITY_UNAVAILABLE: (503, "server_error", "capacity_unavailable"),
    # The customers' reasons (sessions, sign-in, the starter claim): the web app's pages.
    errors_pb2.INVALID_SESSION: (401, "invalid_request_error", "invalid_session"),
    errors_pb2.INVALID_CREDENTIALS: (401, "invalid_request_error", "invalid_credentials"),
    errors_pb2.EMAIL_TAKEN: (409, "invalid_request_error", "email_taken"),
    errors_pb2.STARTER_CREDITS_UNAVAILABLE: (409, "invalid_request_error", "starter_unavailable"),
}
_REASONS: Final = {name: int(value) for name, value in errors_pb2.ErrorReason.items()}
_NO_RETRY: Final = frozenset({errors_pb2.TOKEN_LIMIT_EXCEEDED, errors_pb2.INSUFFICIENT_CREDITS})


class _Details(msgspec.Struct):
    """What the edge reads from a rich status (google.rpc.Status details)."""

    message: str
    reason: int | None = None
    metadata: dict[str, str] = {}
    field: str | None = None
    retry_s: float | None = None


def from_rpc(error: grpc.aio.AioRpcError) -> ApiError:
    """Maps a failed call to the error table, by its ErrorInfo reason where it has one."""
    details = _details(error)
    if details is not None and details.reason in BY_REASON:
        status, kind, code = BY_REASON[details.reason]
        param = details.metadata.get("param") or details.field
        if param is None and details.reason == errors_pb2.MODEL_NOT_FOUND:
            param = "model"
        headers: dict[str, str] = {}
        if details.retry_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(details.retry_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(details.retry_s * 1000)))
        if details.reason in _NO_RETRY:
            headers["x-should-retry"] = "false"
        return ApiError(status, details.message, param=param, code=code, kind=kind, headers=headers)
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(
            503,
            "The inference service is unreachable right now; retry shortly.",
            headers={"retry-after": "1"},
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, "The request took too long.")
    if code != grpc.StatusCode.INTERNAL:
        log.error("unmapped error from the core: %s %s", code, quote(error.details() or ""))
    return ApiError(500, "Internal server error.")


def details_of(error: grpc.aio.AioRpcError) -> _Details | None:
    """The reason, metadata and hints of a failed call's rich status, if it has one."""
    return _details(error)


def _details(error: grpc.aio.AioRpcError) -> _Details | None:
    """The rich status of a failed call. grpcio-status' synchronous `from_call` reads an
    AioRpcError as it is (its `code()`, `details()` and `trailing_metadata()` are plain
    methods); the `rpc_status.aio` variant awaits them and is for live `aio.Call`s."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except (ValueError, DecodeError):
        # The details disagree with the status line (or do not parse): trust neither.
        log.error("the core sent inconsistent status details for %s", error.code())
        return None
    if status is None:
        return None
    found = _Details(status.message)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason = _REASONS.get(info.reason)
            found.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found.retry_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                found.field = bad.field_violations[0].field
    return found


def http_status_of(reason: str) -> int:
    """The HTTP status of an ErrorInfo reason by name ("OK": 200; unknown reasons: 500)."""
    if reason == "OK":
        return 200
    value = _REASONS.get(reason)
    return BY_REASON[value][0] if value in BY_REASON else 500
