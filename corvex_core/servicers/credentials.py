"""Credentials as they arrive in call metadata: `authorization: Bearer <secret>`, as on REST.

It only reads them: API keys are looked up by the meter, the admin token and sessions by
corvex_core.access. Secrets are compared in constant time and never logged or quoted in an
error.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

_BEARER: Final = "bearer "


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The `authorization` metadata value, if the call sent one as text."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


def bearer_secret(authorization_value: str | None) -> str | None:
    """The secret of a `Bearer <secret>` value (scheme case-insensitive), else None."""
    if not authorization_value or authorization_value[: len(_BEARER)].lower() != _BEARER:
        return None
    return authorization_value[len(_BEARER) :].strip()
