"""Credentials as they arrive in call metadata: `authorization: Bearer <secret>`, as on REST.

It only reads them: API keys are looked up by the meter, the admin token and sessions by
corvex_core.access. Secrets are compared in constant time and never logged or quoted in an
error.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from corvex_core import errors

_BEARER: Final = "bearer "


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The `authorization` metadata value, if the call sent one as text. Two values are not
    one credential: InvalidApiKey, whichever of them is valid."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    if len(values) > 1:
        raise errors.InvalidApiKey(
            "The call carries more than one authorization value; send exactly one."
        )
    return values[0] if values and isinstance(values[0], str) else None


def bearer_secret(authorization_value: str | None) -> str | None:
    """The secret of a `Bearer <secret>` value (scheme case-insensitive), else None."""
    if not authorization_value or authorization_value[: len(_BEARER)].lower() != _BEARER:
        return None
    return authorization_value[len(_BEARER) :].strip()
