"""Domain errors → gRPC status (DESIGN.md principle 6): the one place that writes them.

A `CorvexError` becomes its status code and message plus rich details in the standard
`grpc-status-details-bin` trailer (`google.rpc.ErrorInfo`, and `RetryInfo` and `BadRequest`
where they apply), built with grpcio-status' `rpc_status`. Messages are bounded, so no error
can outgrow gRPC's metadata limit whatever text a caller sent.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from corvex.quoting import bounded
from corvex.v1 import errors_pb2
from corvex_core import errors
from corvex_core.errors import Reason
from corvex_core.limits import LimitState
from corvex_core.servicers.metadata import limit_metadata

DOMAIN: Final = "corvex.ai"
# A status message travels in an HTTP/2 header; gRPC refuses metadata beyond 16 KiB in all.
MAX_MESSAGE_CHARS: Final = 2000

_CODES: Final = {
    Reason.INVALID_API_KEY: code_pb2.UNAUTHENTICATED,
    Reason.MODEL_NOT_FOUND: code_pb2.NOT_FOUND,
    Reason.INVALID_REQUEST: code_pb2.INVALID_ARGUMENT,
    Reason.CONTEXT_LENGTH_EXCEEDED: code_pb2.INVALID_ARGUMENT,
    Reason.INSUFFICIENT_CREDITS: code_pb2.FAILED_PRECONDITION,
    Reason.RATE_LIMIT_EXCEEDED: code_pb2.RESOURCE_EXHAUSTED,
    Reason.TOKEN_LIMIT_EXCEEDED: code_pb2.RESOURCE_EXHAUSTED,
    Reason.ENGINE_UNAVAILABLE: code_pb2.UNAVAILABLE,
    Reason.INVALID_ADMIN_TOKEN: code_pb2.PERMISSION_DENIED,
    Reason.NOT_FOUND: code_pb2.NOT_FOUND,
    Reason.SERVICE_UNAVAILABLE: code_pb2.UNAVAILABLE,
    Reason.CAPACITY_UNAVAILABLE: code_pb2.RESOURCE_EXHAUSTED,
    Reason.INVALID_SESSION: code_pb2.UNAUTHENTICATED,
    Reason.INVALID_CREDENTIALS: code_pb2.UNAUTHENTICATED,
    Reason.EMAIL_TAKEN: code_pb2.ALREADY_EXISTS,
    Reason.STARTER_CREDITS_UNAVAILABLE: code_pb2.FAILED_PRECONDITION,
}
assert set(_CODES) == set(Reason), "every reason needs a status code"
# The proto enum is the source of the reasons; the domain's enum must name the same ones.
assert {r.value for r in Reason} == set(errors_pb2.ErrorReason.keys()) - {
    "ERROR_REASON_UNSPECIFIED"
}, "corvex_core.errors.Reason and errors.proto disagree"


def rich_status(error: errors.CorvexError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error."""
    status = status_pb2.Status(
        code=_CODES[error.reason], message=bounded(error.message, MAX_MESSAGE_CHARS)
    )
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
            field=param, description=status.message
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.CorvexError) -> NoReturn:
    status = rpc_status.to_status(rich_status(error))
    if isinstance(error, errors.LimitExceeded) and isinstance(error.limit_state, LimitState):
        # The key's standing rides with the status, as it rides with an answer.
        limits = limit_metadata(error.limit_state)
        status = status._replace(trailing_metadata=(*status.trailing_metadata, *limits))
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")


async def abort_internal(context: grpc.aio.ServicerContext[Any, Any], request_id: str) -> NoReturn:
    """INTERNAL with no internals: the request id is what the logs can be searched by."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"Internal error (request {request_id}); it has been logged.",
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")
