"""The edge's HTTP/1.1 connections: what happens before a request reaches a route.

aiohttp answers a request it cannot parse (a bad chunk size, too many headers, a line over
8,190 bytes, a control character in a header, Content-Length with chunked, an unsupported
Content-Encoding, ...) by itself, in `RequestHandler.handle_error`: a text/plain 400 that
quotes the offending bytes, logged with them. With a control character after an API key, the
key is echoed to the client and written to the log. Neither aiohttp 3.14 nor its master branch
has a hook for these answers (aio-libs/aiohttp#3287 asks for one), and middlewares never see
them, so `EdgeProtocol` subclasses `web.RequestHandler` and overrides that public method: the
answer is an OpenAI error that names only the kind of fault, counted and logged like every
request (route "unparsed"). The connection is then closed, as HTTP requires once a message's
framing is lost.

It also bounds connections: aiohttp's keep-alive timeout (`idle_timeout_s`) closes one that
carries no request, including one that never sends any; a request's head must arrive within
`header_timeout_s` of its first byte (else 408, closed: slow-loris); a request whose body
stopped arriving (`gateway.decoding`, `body_timeout_s`) is closed as soon as its 408 is written;
and beyond `max_connections` a new connection is answered 503 and closed without being read.

`EdgeRunner` installs it: an `AppRunner` whose `_make_server` (the factory method every
`BaseRunner` implements) returns an `EdgeServer` serving the same application.
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from corvex import request_ids
from gateway import telemetry
from gateway.config import EdgeConfig
from gateway.errors import ApiError
from gateway.state import BODY_ABANDONED

log = logging.getLogger(__name__)

# aiohttp's parser limits (its defaults), named in the messages below.
MAX_LINE_BYTES: Final = 8190
MAX_HEADERS: Final = 128

_OVER_CAPACITY: Final = ApiError(
    503, "The server has too many open connections; retry shortly.", headers={"Retry-After": "1"}
)
_HEAD_TIMEOUT: Final = ApiError(408, "The request's line and headers did not arrive in time.")
# The kind of fault, by parser exception (most specific first). Their own messages quote the
# request's bytes, so none of them is ever shown.
_FAULTS: Final[tuple[tuple[type[HttpProcessingError], str], ...]] = (
    (BadHttpMethod, "The request method is not a valid HTTP method."),
    (BadStatusLine, "The request line is not valid HTTP/1.1."),
    (LineTooLong, f"The request line or a header is longer than {MAX_LINE_BYTES} bytes."),
    (InvalidURLError, "The request target is not a valid URL path (it must be ASCII)."),
    (InvalidHeader, "A request header is malformed."),
    (
        ContentEncodingError,
        "The request body's Content-Encoding is not supported: send it uncompressed, as gzip "
        "or as deflate.",
    ),
    (TransferEncodingError, "The chunked request body is malformed."),
    (ContentLengthError, "The request body does not match its Content-Length."),
)
# llhttp's own reasons ("Invalid header value char: <bytes>") start with a fixed phrase of its
# own, and aiohttp's fixed messages ("Too many headers received") quote nothing: both are
# shown; anything else gets the generic sentence.
_LLHTTP_REASON: Final = re.compile(r"([A-Za-z][A-Za-z '-]{2,60}):\n\n")
_FIXED_MESSAGES: Final = frozenset(
    {
        "Too many headers received",
        "Too many trailers received",
        "Missing 'Host' header in request.",
        "Bad line ending, expected CRLF",
        "Data after `Connection: close`",
        "Request has invalid `Transfer-Encoding`",
        "Received HTTPS traffic on an HTTP port",
    }
)


def describe(exc: HttpProcessingError) -> str:
    """What is wrong with an unparsable request, in words that quote none of its bytes."""
    if exc.message in _FIXED_MESSAGES:
        return f"The HTTP request is malformed: {exc.message}."
    for kind, sentence in _FAULTS:
        if isinstance(exc, kind):
            return sentence
    reason = _LLHTTP_REASON.match(exc.message)
    if reason:
        return f"The HTTP request is malformed: {reason.group(1)}."
    return "The HTTP request is malformed."


def raw_response(error: ApiError) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for when no request exists."""
    body = error.encode()
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class EdgeProtocol(web.RequestHandler):
    """One client connection (see the module docstring)."""

    def __init__(self, server: EdgeServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._edge = server
        self._admitted = False
        # Between requests (and before the first), until a request's head is complete.
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._edge.open_connections >= self._edge.config.max_connections:
            writer = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
            writer.write(raw_response(_OVER_CAPACITY))
            writer.close()
            telemetry.record("-", telemetry.UNPARSED_ROUTE, 503, 0.0, request_ids.request_id(None))
            return
        self._edge.open_connections += 1
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._admitted:
            self._admitted = False
            self._edge.open_connections -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if data and self._awaiting_head and self._head_timer is None:
            self._head_timer = asyncio.get_running_loop().call_later(
                self._edge.config.header_timeout_s, self._head_timed_out
            )
        super().data_received(data)

    def head_received(self) -> None:
        """A request's line and headers are parsed (called by the server's request factory)."""
        self._awaiting_head = False
        self._stop_head_timer()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            finished = await super().finish_response(request, resp, start_time)
        finally:
            self._awaiting_head = True
        if request.get(BODY_ABANDONED):
            # Else aiohttp drains the unread body for `lingering_time` (10 s) before closing.
            # The drain is for a client still sending (a 413's): closing under it would reset
            # the connection, which can lose the answer. This client sent nothing for
            # `body_timeout_s`, and a slow-loris would hold the connection 10 s past its 408.
            self.force_close()
        return finished

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400), or to an exception that
        escaped every middleware (500, 504): an OpenAI error, never the request's bytes."""
        if request.writer.output_size > 0:
            # As aiohttp does: part of an answer is out, so no other can follow.
            raise ConnectionError("a response was partly sent; no error response can follow")
        if isinstance(exc, HttpProcessingError):
            error = ApiError(400, describe(exc), close=True)
            telemetry.record(
                "-",
                telemetry.UNPARSED_ROUTE,
                error.status,
                0.0,
                request_ids.request_id(None),
                error=type(exc).__name__,
            )
        elif status == 504:
            error = ApiError(504, "The request took too long.")
        else:
            log.error("unexpected error outside the error middleware", exc_info=exc)
            error = ApiError(500, "Internal server error.")
        return error.response()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and self.transport is not None:
            self.transport.write(raw_response(_HEAD_TIMEOUT))
            telemetry.record("-", telemetry.UNPARSED_ROUTE, 408, 0.0, request_ids.request_id(None))
            self.force_close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class EdgeServer(web.Server):
    """aiohttp's server of one application, whose connections are `EdgeProtocol`s."""

    def __init__(self, app_server: web.Server, config: EdgeConfig) -> None:
        inner_factory = app_server.request_factory

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            if isinstance(protocol, EdgeProtocol):
                protocol.head_received()
            return inner_factory(message, payload, protocol, writer, task)

        super().__init__(
            app_server.request_handler,
            request_factory=request_factory,
            handler_cancellation=True,
        )
        self.config = config
        self.open_connections = 0

    def __call__(self) -> web.RequestHandler:
        return EdgeProtocol(
            self,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.config.idle_timeout_s,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            access_log=None,
        )


class EdgeRunner(web.AppRunner):
    """Runs the edge's application on `EdgeServer` (and so on `EdgeProtocol` connections)."""

    def __init__(self, app: web.Application, config: EdgeConfig) -> None:
        super().__init__(app, access_log=None)
        self._config = config

    async def _make_server(self) -> web.Server:
        # The application's own server: it starts the application (cleanup contexts, ...)
        # and supplies the handler and request factory the edge's server serves.
        return EdgeServer(await super()._make_server(), self._config)
