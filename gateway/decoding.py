"""Request bodies → typed OpenAI requests: the bytes (within the size bound), then the JSON,
decoded straight into the msgspec Struct of the route; a body that is not that is a 400 naming
the field where there is one.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from gateway.errors import ApiError, BadRequest, quote
from gateway.state import EDGE

T = TypeVar("T")

log = logging.getLogger(__name__)

_PATH_RE: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


async def decode(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    """The JSON body of `request` as the decoder's type."""
    return parse(await read_body(request), decoder)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within `max_body_bytes`."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            "The request body is larger than this server accepts "
            f"({request.app[EDGE].config.max_body_bytes} bytes).",
        ) from None


def parse(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """`body` as the decoder's type; BadRequest if it is not JSON or not that type."""
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
    try:
        keys = msgspec.json.decode(body, type=dict[str, Any]).keys()
    except msgspec.DecodeError:
        return
    unknown = sorted(set(keys) - set(struct_type.__struct_fields__))
    if unknown:
        log.debug("ignored unknown request fields: %s", quote(", ".join(unknown)))
