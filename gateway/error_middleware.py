"""The one place where exceptions become responses (as starlette's `_exception_handler.py`).

Handlers raise; this middleware turns every exception into the OpenAI error body: an `ApiError`
as it is, a failed gRPC call by the error table (`errors.from_rpc`), aiohttp's HTTP exceptions
(404, 405, 413, ...) in OpenAI's shape, anything else into a 500 that says nothing internal
(logged with its traceback). When the stream's status line is already sent, the error ends the
stream as an SSE `error` event instead. A client that went away is not an error: its
cancellation passes through untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from corvex.quoting import quote
from gateway import errors, sse, upstream
from gateway.errors import ApiError
from gateway.state import EDGE, OPEN_STREAM, STREAM_ERROR_STATUS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def handle_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: there is nobody to answer
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not errors
        error = _from_http(request, exc)
    except ApiError as exc:
        error = exc
    except grpc.aio.AioRpcError as exc:
        error = errors.from_rpc(exc)
        # A refusal by the key's limits says where they stand, as an answer does. (A refusal
        # on the Streams call sends it before any answer metadata: as the initial.)
        metadata = (*(exc.initial_metadata() or ()), *(exc.trailing_metadata() or ()))
        error.headers.update(upstream.forwarded(metadata))
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, quote(request.path))
        error = ApiError(500, "Internal server error.")
    stream: web.StreamResponse | None = request.get(OPEN_STREAM)
    if stream is None:
        return error.response()
    request[STREAM_ERROR_STATUS] = error.status
    await stream.write(sse.error_event(error))
    await stream.write_eof()
    return stream


def _from_http(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own answers (no route, wrong method, body too large) in OpenAI's shape."""
    where = quote(request.path)
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if exc.status == 404:
        return ApiError(404, f"Unknown route {request.method} {where}.")
    if exc.status == 405:
        return ApiError(
            405, f"Method {quote(request.method)} is not allowed on {where}.", headers=headers
        )
    if exc.status == 413:
        limit = request.app[EDGE].config.max_body_bytes
        return ApiError(
            413, f"The request body is larger than this server accepts ({limit} bytes)."
        )
    return ApiError(exc.status, exc.reason, headers=headers)
