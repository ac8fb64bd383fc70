"""vLLM's exception hierarchy (vllm/exceptions.py), the classes the adapter meets."""

from http import HTTPStatus
from typing import Any


class VLLMError(Exception):
    """Base class for all vLLM-specific errors."""


class VLLMClientError(VLLMError):
    """Errors caused by the request (4xx)."""


class VLLMServerError(VLLMError):
    """Errors caused by the server (5xx)."""


class VLLMValidationError(VLLMClientError):
    """A request failed validation; `parameter` names the field when known."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        extras = []
        if self.parameter is not None:
            extras.append(f"parameter={self.parameter}")
        if self.value is not None:
            extras.append(f"value={self.value}")
        return f"{base} ({', '.join(extras)})" if extras else base


class GenerationError(VLLMServerError):
    """A request finished with finish_reason "error" (500)."""

    def __init__(self, message: str = "Internal server error") -> None:
        super().__init__(message)
        self.status_code = HTTPStatus.INTERNAL_SERVER_ERROR


class RetryableRequestError(GenerationError):
    """A transient request-level failure that is safe to retry (503)."""

    def __init__(self, message: str = "Request failed; please retry") -> None:
        super().__init__(message)
        self.status_code = HTTPStatus.SERVICE_UNAVAILABLE


class GracefulHTTPError(VLLMError):
    """An expected refusal that carries its own HTTP status (admission control)."""

    def __init__(self, message: str, http_status: HTTPStatus) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class QueueOverflowError(GracefulHTTPError):
    """Admitting the request would exceed max_num_queued_reqs."""

    def __init__(self) -> None:
        super().__init__(
            "The engine is currently busy and cannot accept new requests. "
            "Please try again later or on a different instance.",
            HTTPStatus.SERVICE_UNAVAILABLE,
        )
