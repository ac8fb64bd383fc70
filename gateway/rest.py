"""REST plumbing shared by the handlers: bad-request errors, request ids, the metadata sent to
the core, and the headers returned to the client."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable
from typing import Any, Final

import msgspec
from aiohttp import web

from gateway.errors import error_response

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS: Final = 128
_PATH_RE: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
# gRPC metadata from the core that is returned to clients as HTTP headers.
_FORWARDED_PREFIXES: Final = ("x-ratelimit-",)


class BadRequest(Exception):
    """A request the edge rejects before calling the core (a 400 naming `param`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(400, self.message, param=self.param)


def decode_error(exc: msgspec.MsgspecError) -> web.Response:
    """A 400 for a body that is not JSON or does not match the request type."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return error_response(
            400,
            "We could not parse the JSON body of your request. The body must be a JSON "
            "object (see the API reference).",
        )
    match = _PATH_RE.search(text)
    param = match.group("path") if match else None
    message = _PATH_RE.sub("", text)
    if param:
        message = f"Invalid value for `{param}`: {message}"
    return error_response(400, message, param=param or None)


def log_unknown_fields(body: bytes, struct_type: Any) -> None:
    """At debug level, names the top-level fields the edge ignored."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    try:
        keys = msgspec.json.decode(body, type=dict[str, Any]).keys()
    except msgspec.MsgspecError:
        return
    unknown = sorted(set(keys) - set(struct_type.__struct_fields__))
    if unknown:
        log.debug("ignored unknown request fields: %s", ", ".join(unknown))


def request_id(request: web.Request) -> str:
    """The client's x-request-id when it is sane, else a new one."""
    supplied = request.headers.get("x-request-id", "")
    if 0 < len(supplied) <= MAX_REQUEST_ID_CHARS and supplied.isascii() and supplied.isprintable():
        return supplied
    return secrets.token_hex(16)


def metadata(request: web.Request, request_id: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for the core: the caller's key (checked there) and the request id."""
    authorization = request.headers.get("Authorization")
    result = [("x-request-id", request_id)]
    if authorization:
        result.append(("authorization", authorization))
    return tuple(result)


def response_headers(initial: Iterable[tuple[str, Any]] | None, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    for key, value in initial or ():
        if key.startswith(_FORWARDED_PREFIXES) and isinstance(value, str):
            headers[key] = value
    return headers
