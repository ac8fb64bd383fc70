"""The edge's error mapping: a failed call's rich status (read with grpcio-status) → the HTTP
status, OpenAI body and headers of the error table; the table covers every reason of the proto."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from corvex.v1 import errors_pb2
from gateway import errors


def failed_call(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str | None = None,
    metadata: dict[str, str] | None = None,
    retry_s: float | None = None,
    field: str | None = None,
    details: str | None = None,
) -> grpc.aio.AioRpcError:
    """An AioRpcError as grpc.aio raises it, with the details the core's interceptor sends."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if reason is not None:
        info = error_details_pb2.ErrorInfo(reason=reason, domain="corvex.ai")
        info.metadata.update(metadata or {})
        status.details.add().Pack(info)
    if retry_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description="bad")
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    rich = rpc_status.to_status(status)
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*rich.trailing_metadata),
        details=message if details is None else details,
    )


def test_every_reason_of_the_proto_has_an_http_row() -> None:
    reasons = {
        value
        for name, value in errors_pb2.ErrorReason.items()
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert set(errors.BY_REASON) == reasons


def test_the_reason_picks_the_row_and_the_message_is_the_cores() -> None:
    mapped = errors.from_rpc(
        failed_call(
            grpc.StatusCode.FAILED_PRECONDITION,
            "Balance $0.00 covers no output tokens; top up.",
            reason="INSUFFICIENT_CREDITS",
        )
    )
    assert mapped.status == 402
    assert mapped.body == errors.ErrorBody(
        "Balance $0.00 covers no output tokens; top up.",
        "insufficient_credits",
        None,
        "insufficient_credits",
    )
    assert mapped.headers == {"x-should-retry": "false"}


def test_retry_info_becomes_retry_after() -> None:
    mapped = errors.from_rpc(
        failed_call(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "slow down",
            reason="RATE_LIMIT_EXCEEDED",
            retry_s=1.2,
        )
    )
    assert (mapped.status, mapped.body.code) == (429, "rate_limit_exceeded")
    assert mapped.headers == {"retry-after": "2", "retry-after-ms": "1200"}


def test_param_comes_from_error_info_or_the_bad_request_detail() -> None:
    by_info = errors.from_rpc(
        failed_call(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad role",
            reason="INVALID_REQUEST",
            metadata={"param": "messages"},
        )
    )
    assert (by_info.status, by_info.body.param) == (400, "messages")
    by_field = errors.from_rpc(
        failed_call(
            grpc.StatusCode.INVALID_ARGUMENT, "bad", reason="INVALID_REQUEST", field="top_p"
        )
    )
    assert by_field.body.param == "top_p"
    not_found = errors.from_rpc(
        failed_call(grpc.StatusCode.NOT_FOUND, "no such model", reason="MODEL_NOT_FOUND")
    )
    assert (not_found.status, not_found.body.param) == (404, "model")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
    ],
)
def test_without_details_the_code_decides_and_nothing_internal_is_said(
    code: grpc.StatusCode, status: int
) -> None:
    mapped = errors.from_rpc(
        grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="db at 10.0.0.7"
        )
    )
    assert mapped.status == status
    assert mapped.body.type == "server_error"
    assert "10.0.0.7" not in mapped.body.message


def test_details_that_contradict_the_status_are_not_trusted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = failed_call(
        grpc.StatusCode.UNAUTHENTICATED, "bad key", reason="INVALID_API_KEY", details="other"
    )
    with caplog.at_level(logging.ERROR):
        mapped = errors.from_rpc(call)
    assert mapped.status == 500
    assert "inconsistent" in caplog.text


def test_an_unknown_reason_falls_back_to_the_code() -> None:
    mapped = errors.from_rpc(
        failed_call(grpc.StatusCode.UNAVAILABLE, "later", reason="SOMETHING_NEW")
    )
    assert mapped.status == 503


def test_the_body_is_openais() -> None:
    error = errors.BadRequest("Invalid value for `n`.", param="n")
    assert error.encode() == (
        b'{"error":{"message":"Invalid value for `n`.","type":"invalid_request_error",'
        b'"param":"n","code":null}}'
    )
    assert errors.ApiError(503, "x").body.type == "server_error"
