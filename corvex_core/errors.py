"""Domain errors of the core: one class per row of DESIGN.md's error table.

These carry what a caller needs to act (a sentence, the field at fault, when to retry) and
nothing about transport: `corvex_core.servicers.status` turns them into gRPC status, and
the edge turns that into HTTP. Raising anything else from a servicer is a bug and is
reported as INTERNAL without details.
"""

from __future__ import annotations

import enum

from corvex.model_ids import not_served
from corvex.quoting import MAX_QUOTE_CHARS, bounded


class Reason(enum.Enum):
    """ErrorInfo.reason values (documented in proto/corvex/v1/errors.proto)."""

    INVALID_API_KEY = "INVALID_API_KEY"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    INVALID_REQUEST = "INVALID_REQUEST"
    CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
    INSUFFICIENT_CREDITS = "INSUFFICIENT_CREDITS"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    TOKEN_LIMIT_EXCEEDED = "TOKEN_LIMIT_EXCEEDED"
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
    INVALID_ADMIN_TOKEN = "INVALID_ADMIN_TOKEN"
    NOT_FOUND = "NOT_FOUND"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    CAPACITY_UNAVAILABLE = "CAPACITY_UNAVAILABLE"
    INVALID_SESSION = "INVALID_SESSION"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    EMAIL_TAKEN = "EMAIL_TAKEN"
    STARTER_CREDITS_UNAVAILABLE = "STARTER_CREDITS_UNAVAILABLE"


class CorvexError(Exception):
    """A failure the caller caused or can act on. `message` is shown to the caller."""

    reason: Reason

    def __init__(
        self,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}
        self.retry_after_s = retry_after_s


class InvalidApiKey(CorvexError):
    reason = Reason.INVALID_API_KEY


class ModelNotFound(CorvexError):
    reason = Reason.MODEL_NOT_FOUND

    def __init__(self, model: str) -> None:
        super().__init__(not_served(model), metadata={"model": bounded(model, MAX_QUOTE_CHARS)})


class InvalidRequest(CorvexError):
    """A malformed request. `param` names the field at fault (OpenAI's `param`)."""

    reason = Reason.INVALID_REQUEST

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, metadata={"param": param} if param else None)
        self.param = param


class ContextLengthExceeded(CorvexError):
    reason = Reason.CONTEXT_LENGTH_EXCEEDED

    def __init__(
        self, *, prompt_tokens: int, max_tokens: int, context_length: int, param: str = "messages"
    ) -> None:
        """`param`: the field holding the prompt ("messages", "prompt"), or "input" for an
        embedding input (which asks for no completion tokens)."""
        limit = f"This model's maximum context length is {context_length} tokens"
        message = (
            f"{limit}, but an input has {prompt_tokens} tokens; shorten it."
            if param == "input"
            else f"{limit}, but the request has {prompt_tokens} prompt tokens and asks for up "
            f"to {max_tokens} completion tokens; shorten the {param} or lower max_tokens."
        )
        super().__init__(
            message,
            metadata={
                "param": param,
                "prompt_tokens": str(prompt_tokens),
                "max_tokens": str(max_tokens),
                "context_length": str(context_length),
            },
        )


class InsufficientCredits(CorvexError):
    """The balance or the monthly spend cap cannot cover the request's hold."""

    reason = Reason.INSUFFICIENT_CREDITS


class LimitExceeded(CorvexError):
    """A limit of the key refused the request. `limit_state`: where the key's per-minute
    limits stand (a `limits.LimitState`, set by the limiter, which sits above this module),
    which a refusal reports as an answer does."""

    limit_state: object = None


class RateLimitExceeded(LimitExceeded):
    """A per-minute limit of the key is used up; `retry_after_s` says when it allows more."""

    reason = Reason.RATE_LIMIT_EXCEEDED


class TokenLimitExceeded(LimitExceeded):
    """The key's monthly token limit is used up; it resets with the calendar month."""

    reason = Reason.TOKEN_LIMIT_EXCEEDED


class EngineUnavailable(CorvexError):
    reason = Reason.ENGINE_UNAVAILABLE


class InvalidAdminToken(CorvexError):
    reason = Reason.INVALID_ADMIN_TOKEN


class NotFound(CorvexError):
    """An admin call named a workspace, key or invoice that does not exist."""

    reason = Reason.NOT_FOUND


class ServiceUnavailable(CorvexError):
    """The core cannot take work: it is draining or its journal cannot write."""

    reason = Reason.SERVICE_UNAVAILABLE


class CapacityUnavailable(CorvexError):
    """A reserved offering's capacity pool cannot give an endpoint the replicas it asks for."""

    reason = Reason.CAPACITY_UNAVAILABLE


class InvalidSession(CorvexError):
    """The session credential is unknown, expired or signed out."""

    reason = Reason.INVALID_SESSION


class InvalidCredentials(CorvexError):
    """Sign-in with an email and password that do not match (which one is never said)."""

    reason = Reason.INVALID_CREDENTIALS


class EmailTaken(CorvexError):
    reason = Reason.EMAIL_TAKEN


class StarterCreditsUnavailable(CorvexError):
    """No starter credits to claim: claimed already, or no promotion runs."""

    reason = Reason.STARTER_CREDITS_UNAVAILABLE
