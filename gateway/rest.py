"""REST plumbing shared by the handlers: bad-request errors, request ids, the metadata sent to
the core, and the headers returned to the client."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from corvex import request_ids
from gateway.errors import error_response
from gateway.state import EDGE, REQUEST_ID

T = TypeVar("T")

log = logging.getLogger(__name__)

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


async def decode(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    """The JSON body as the decoder's type; BadRequest if it is not JSON or not that type."""
    body = await request.read()
    try:
        parsed = decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_RE.search(text)
        param = match.group("path") if match else None
        message = _PATH_RE.sub("", text)
        raise BadRequest(
            f"Invalid value for `{param}`: {message}" if param else message, param=param or None
        ) from None
    except msgspec.DecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request. The body must be a JSON "
            "object (see the API reference)."
        ) from None
    _log_unknown_fields(body, type(parsed))
    return parsed


def _log_unknown_fields(body: bytes, struct_type: Any) -> None:
    """At debug level, names the top-level fields the edge ignored."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    keys = msgspec.json.decode(body, type=dict[str, Any]).keys()
    unknown = sorted(set(keys) - set(struct_type.__struct_fields__))
    if unknown:
        log.debug("ignored unknown request fields: %s", ", ".join(unknown))


def call_options(request: web.Request) -> dict[str, Any]:
    """What every call to the core carries: the caller's key and request id, and a deadline."""
    edge = request.app[EDGE]
    return {
        "metadata": metadata(request, request[REQUEST_ID]),
        "timeout": edge.config.request_timeout_s,
    }


def request_id(request: web.Request) -> str:
    """The client's x-request-id when it is sane, else a new one."""
    return request_ids.request_id(request.headers.get("x-request-id"))


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
