"""Request bodies → typed OpenAI requests: the content type, the bytes (within the size and time
bounds), then the JSON, decoded straight into the msgspec Struct of the route.

Every way a body can be wrong is an `ApiError` (mostly a 400 naming the field); none becomes a
500, and none quotes more than a few characters of what the client sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from corvex.quoting import bounded, quote
from gateway.errors import ApiError, BadRequest
from gateway.state import BODY_ABANDONED, EDGE

T = TypeVar("T")

log = logging.getLogger(__name__)

JSON_MEDIA_TYPE: Final = "application/json"
_PATH_RE: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
# msgspec's validation messages quote the offending value (an enum value, a tag): bounded.
_MAX_VALIDATION_MESSAGE_CHARS: Final = 200


async def decode(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    """The JSON body of `request` as the decoder's type."""
    check_content_type(request.headers.get("Content-Type"))
    return parse(await read_body(request), decoder)


def check_content_type(value: str | None) -> None:
    """JSON bodies only: `application/json`, with any parameters (`; charset=utf-8`, as several
    SDKs send it). OpenAI answers anything else with 400 `unsupported_content_type`, and so do
    we; this catches `curl -d`, which sends `application/x-www-form-urlencoded` unless told
    otherwise. A body without a Content-Type is read as JSON (as FastAPI does): nothing else
    is accepted, so there is no ambiguity, and the parser still refuses what is not JSON."""
    if not value:
        return
    if value.split(";", 1)[0].strip().lower() != JSON_MEDIA_TYPE:
        raise BadRequest(
            f"Unsupported content type {quote(value)}: this API accepts only "
            f"'{JSON_MEDIA_TYPE}' request bodies; send the header "
            f"`Content-Type: {JSON_MEDIA_TYPE}`.",
            code="unsupported_content_type",
        )


async def read_body(request: web.Request) -> bytes:
    """The whole body, within `max_body_bytes` and `body_timeout_s`."""
    config = request.app[EDGE].config
    try:
        async with asyncio.timeout(config.body_timeout_s):
            return await request.read()
    except TimeoutError:
        request[BODY_ABANDONED] = True
        raise ApiError(
            408,
            f"The request body did not arrive within {config.body_timeout_s:g} s.",
            close=True,
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            f"The request body is larger than this server accepts ({config.max_body_bytes} bytes).",
            close=True,
        ) from None
    except web.RequestPayloadError:
        # Its text quotes the bytes at fault; the client gets the kind of fault only.
        raise ApiError(
            400,
            "The request body could not be read: it is cut short, or its chunked or "
            "Content-Encoding framing is malformed.",
            close=True,
        ) from None


def parse(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """`body` as the decoder's type; BadRequest if it is not JSON or not that type."""
    try:
        parsed = decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_RE.search(text)
        param = match.group("path") if match else None
        message = bounded(_PATH_RE.sub("", text), _MAX_VALIDATION_MESSAGE_CHARS)
        raise BadRequest(
            f"Invalid value for `{param}`: {message}" if param else message, param=param or None
        ) from None
    except msgspec.DecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request. The body must be a JSON "
            "object (see the API reference)."
        ) from None
    except UnicodeDecodeError:
        raise BadRequest("The JSON body of your request is not valid UTF-8.") from None
    except RecursionError:
        raise BadRequest("The JSON body of your request is nested too deeply.") from None
    _log_unknown_fields(body, type(parsed))
    return parsed


def _log_unknown_fields(body: bytes, struct_type: Any) -> None:
    """At debug level, names the top-level fields the edge ignored."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    try:
        keys = msgspec.json.decode(body, type=dict[str, Any]).keys()
    except (msgspec.DecodeError, RecursionError):
        return
    unknown = sorted(set(keys) - set(struct_type.__struct_fields__))
    if unknown:
        log.debug("ignored unknown request fields: %s", quote(", ".join(unknown)))
