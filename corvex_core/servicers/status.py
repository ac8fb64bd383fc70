"""Error mapping: the one place where domain errors become gRPC status (DESIGN.md principle 6).

A server interceptor wraps every method. A `CorvexError` ends the call with its status code,
its message, and rich details (`google.rpc.ErrorInfo`, plus `RetryInfo` and `BadRequest`
where they apply) in `grpc-status-details-bin`. Anything else is logged with the method and
returned as INTERNAL with no internals. The admin credential of the Accounts service is
checked here too, so no Accounts method can forget it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from corvex import request_ids
from corvex_core import errors
from corvex_core.errors import Reason
from corvex_core.telemetry import Telemetry

log = logging.getLogger(__name__)

DOMAIN: Final = "corvex.ai"
DETAILS_KEY: Final = "grpc-status-details-bin"
CORVEX_PREFIX: Final = "/corvex.v1."
ACCOUNTS_PREFIX: Final = "/corvex.v1.Accounts/"

_CODES: Final = {
    Reason.INVALID_API_KEY: grpc.StatusCode.UNAUTHENTICATED,
    Reason.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.CONTEXT_LENGTH_EXCEEDED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INSUFFICIENT_CREDITS: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RATE_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.TOKEN_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.ENGINE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.INVALID_ADMIN_TOKEN: grpc.StatusCode.PERMISSION_DENIED,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
assert set(_CODES) == set(Reason), "every reason needs a status code"


def status_code(error: errors.CorvexError) -> grpc.StatusCode:
    return _CODES[error.reason]


def status_details(error: errors.CorvexError) -> bytes:
    """The serialized google.rpc.Status carried in the trailing metadata."""
    code = status_code(error)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason.value, domain=DOMAIN)
    info.metadata.update(error.metadata)
    status.details.add().Pack(info)
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(error.retry_after_s * 1e9)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    param = error.metadata.get("param")
    if param:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=param, description=error.message
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    serialized: bytes = status.SerializeToString()
    return serialized


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.CorvexError) -> None:
    await context.abort(
        status_code(error),
        error.message,
        trailing_metadata=((DETAILS_KEY, status_details(error)),),
    )


_INTERNAL_STATUS: Final = status_pb2.Status(
    code=code_pb2.INTERNAL, message="Internal error."
).SerializeToString()

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _guard(
    method: str, behavior: Behavior, admin_token: str | None, telemetry: Telemetry
) -> Behavior:
    rpc = method.rsplit("/", 1)[-1]

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        record = telemetry.begin(rpc, request_id(context))
        status, failure = "OK", None
        try:
            if admin_token is not None:
                _check_admin(context, admin_token)
            return await behavior(request, context)
        except errors.CorvexError as error:
            status, failure = error.reason.value, error
            await abort(context, error)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("unexpected error in %s", method, extra={"request_id": record.request_id})
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"Internal error (request {record.request_id}); it has been logged.",
                trailing_metadata=((DETAILS_KEY, _INTERNAL_STATUS),),
            )
        finally:
            telemetry.end(record, status, failure)

    return guarded


def request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's x-request-id if it is sane, else a new one."""
    supplied = next(
        (v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None
    )
    return request_ids.request_id(supplied if isinstance(supplied, str) else None)


def _check_admin(context: grpc.aio.ServicerContext[Any, Any], admin_token: str) -> None:
    supplied = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            supplied = value.removeprefix("Bearer ").removeprefix("bearer ").strip()
    if not hmac.compare_digest(supplied.encode(), admin_token.encode()):
        raise errors.InvalidAdminToken(
            "The admin credential is missing or wrong. Send it as `authorization: Bearer "
            "<admin token>` (see core.admin_token)."
        )


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Maps errors of every method, guards the Accounts service with the admin token, and
    opens and closes each call's telemetry record."""

    def __init__(self, admin_token: str, telemetry: Telemetry) -> None:
        self._admin_token = admin_token
        self._telemetry = telemetry

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health and reflection are grpc's own services (their streaming methods are async
        # generators); only ours are wrapped.
        if handler is None or not method.startswith(CORVEX_PREFIX):
            return handler
        token = self._admin_token if method.startswith(ACCOUNTS_PREFIX) else None
        if handler.unary_unary is not None:
            return handler._replace(
                unary_unary=_guard(method, handler.unary_unary, token, self._telemetry)
            )
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=_guard(method, handler.unary_stream, token, self._telemetry)
            )
        return handler
