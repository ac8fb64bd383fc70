"""Credentials as they arrive in call metadata: `authorization: Bearer <secret>`, as on REST.

It reads them and checks the admin token; API keys are looked up by the meter. Secrets are
compared in constant time and never logged or quoted in an error.
"""

from __future__ import annotations

import hmac
from typing import Any, Final

import grpc

from corvex_core import errors

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


def check_admin(context: grpc.aio.ServicerContext[Any, Any], admin_token: str) -> None:
    """Raises InvalidAdminToken unless the call carries the admin token."""
    supplied = bearer_secret(authorization(context)) or ""
    if not hmac.compare_digest(supplied.encode(), admin_token.encode()):
        raise errors.InvalidAdminToken(
            "The admin credential is missing or wrong. Send it as `authorization: Bearer "
            "<admin token>` (see core.admin_token)."
        )
