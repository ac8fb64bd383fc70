"""Who is browsing, and the rules of every dashboard request: the session cookie, forms (UTF-8
only) and their CSRF tokens, sign-in attempt limits, flash messages, and errors as pages (one
middleware).

The session cookie holds the core's session token (HttpOnly, SameSite=Lax, Secure when
`edge.dashboard.secure_cookies` is set); the core decides what it reaches, this module only
carries it. Every form carries a CSRF token: for a signed-in visitor an HMAC of its session
token (so it cannot be fixed by anyone who does not hold the cookie), before sign-in a random
value also kept in an HttpOnly cookie (double submit). Nothing secret is logged: passwords,
tokens and key secrets never leave the request that carries them.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import jinja2
from aiohttp import web

from corvex.v1 import accounts_pb2, accounts_pb2_grpc
from gateway.config import DashboardConfig
from gateway.dashboard import render
from gateway.errors import from_rpc
from gateway.state import BODY_ABANDONED, EDGE, REQUEST_ID

log = logging.getLogger(__name__)

SESSION_COOKIE: Final = "corvex_session"
CSRF_COOKIE: Final = "corvex_csrf"
FLASH_COOKIE: Final = "corvex_flash"
PREFIX: Final = "/dashboard"
_MAX_TRACKED_ADDRESSES: Final = 10_000
_MAX_FLASH_CHARS: Final = 500
# The media types aiohttp reads as `name=value&...` (no Content-Type is read as this too).
_URLENCODED: Final = frozenset({"", "application/x-www-form-urlencoded"})
_NOT_UTF8: Final = (
    "A field of this form is not valid UTF-8 text, so the form was not read. "
    "Go back, reload the page and try again."
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FormInvalid(Exception):
    """A form field the edge refuses before calling the core; shown on the form's page."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AttemptLimiter:
    """Attempts per client address in the last minute (a sliding window), bounded."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._attempts: dict[str, collections.deque[float]] = {}

    def allow(self, address: str, now: float) -> bool:
        attempts = self._attempts.get(address)
        if attempts is None:
            if len(self._attempts) >= _MAX_TRACKED_ADDRESSES:
                self._attempts.clear()  # a flood of addresses: start over rather than grow
            attempts = self._attempts[address] = collections.deque()
        while attempts and attempts[0] <= now - 60:
            attempts.popleft()
        if len(attempts) >= self._per_minute:
            return False
        attempts.append(now)
        return True


@dataclass
class Dashboard:
    config: DashboardConfig
    env: jinja2.Environment
    sign_ins: AttemptLimiter
    _stubs: dict[int, accounts_pb2_grpc.AccountsStub] = field(default_factory=dict)

    def accounts(self, request: web.Request) -> accounts_pb2_grpc.AccountsStub:
        channel = request.config_dict[EDGE].channel
        stub = self._stubs.get(id(channel))
        if stub is None:
            stub = self._stubs[id(channel)] = accounts_pb2_grpc.AccountsStub(channel)
        return stub


DASHBOARD: Final = web.AppKey("dashboard", Dashboard)


@dataclass
class Visitor:
    """The browser behind a request: its session token (if any), its user once checked, the
    CSRF token its forms carry, and the flash message to show."""

    token: str | None
    csrf: str
    new_csrf_cookie: bool
    flash: dict[str, str] | None
    user: accounts_pb2.User | None = None
    alerts: list[accounts_pb2.Alert] = field(default_factory=list)

    @property
    def workspace_id(self) -> str:
        assert self.user is not None, "signed_in() first"
        return self.user.workspace_ids[0]


VISITOR: Final = web.RequestKey("visitor", Visitor)
# Where a failed form goes back to (set by `form`); the failure is shown there.
BACK: Final = web.RequestKey("back", str)
FORM: Final = web.RequestKey("form", dict)


def dashboard(request: web.Request) -> Dashboard:
    return request.config_dict[DASHBOARD]


def accounts(request: web.Request) -> accounts_pb2_grpc.AccountsStub:
    return dashboard(request).accounts(request)


def metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """What a call to the core carries for this visitor: its session, and the request id."""
    visitor = request[VISITOR]
    result = [("x-request-id", request[REQUEST_ID])]
    if visitor.token:
        result.append(("authorization", f"Bearer {visitor.token}"))
    return tuple(result)


def _session_csrf(token: str) -> str:
    return hmac.new(token.encode(), b"corvex-dashboard-csrf", hashlib.sha256).hexdigest()[:32]


def _visitor(request: web.Request) -> Visitor:
    token = request.cookies.get(SESSION_COOKIE) or None
    flash = None
    raw_flash = request.cookies.get(FLASH_COOKIE)
    if raw_flash:
        try:
            decoded = json.loads(urllib.parse.unquote(raw_flash))
            if isinstance(decoded, dict) and decoded.get("kind") in ("ok", "error"):
                flash = {"kind": str(decoded["kind"]), "text": str(decoded.get("text", ""))}
        except ValueError:
            flash = None
    if token is not None:
        return Visitor(token, _session_csrf(token), False, flash)
    seed = request.cookies.get(CSRF_COOKIE, "")
    if len(seed) == 32 and seed.isalnum():
        return Visitor(None, seed, False, flash)
    return Visitor(None, secrets.token_hex(16), True, flash)


def set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str,
               *, max_age: int | None = None, path: str = "/") -> None:  # fmt: skip
    response.set_cookie(
        name,
        value,
        httponly=True,
        samesite="Lax",
        secure=dashboard(request).config.secure_cookies,
        path=path,
        max_age=max_age,
    )


def flash(request: web.Request, response: web.StreamResponse, kind: str, text: str) -> None:
    """A message for the next page this visitor sees."""
    value = urllib.parse.quote(json.dumps({"kind": kind, "text": text[:_MAX_FLASH_CHARS]}))
    set_cookie(request, response, FLASH_COOKIE, value, max_age=120, path=PREFIX)


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def sign_in_page(request: web.Request) -> web.Response:
    response = see_other(f"{PREFIX}/signin")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return render.page(
        dashboard(request).env,
        "error.html",
        status=status,
        visitor=request.get(VISITOR),
        path=request.path,
        status_code=status,
        message=message,
    )


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every dashboard request: the visitor, the reading and CSRF check of forms, errors as
    pages or as a message on the page the form came from, and the headers of every page."""
    visitor = request[VISITOR] = _visitor(request)
    try:
        if request.method == "POST":
            form = await _read_form(request)
            given = form.get("csrf", "").encode()  # compare_digest takes only ASCII str
            if not hmac.compare_digest(given, visitor.csrf.encode()):
                # Raised, so that the page gets the headers of every page (below).
                raise web.HTTPForbidden(
                    reason="This form has expired. Go back, reload the page and try again."
                )
            request[FORM] = form
        response = await handler(request)
    except grpc.aio.AioRpcError as exc:
        response = _rpc_failure(request, exc)
    except FormInvalid as exc:
        response = see_other(request.get(BACK) or PREFIX + "/")
        flash(request, response, "error", exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_page(request, exc.status, exc.reason)
        if request.get(BODY_ABANDONED):
            response.force_close()  # says `Connection: close`; gateway.protocol closes it
    if visitor.new_csrf_cookie:
        set_cookie(request, response, CSRF_COOKIE, visitor.csrf)
    if visitor.flash is not None and request.method == "GET" and response.status == 200:
        response.del_cookie(FLASH_COOKIE, path=PREFIX)
    render.secure(response)
    response.headers["Cache-Control"] = "no-store"
    return response


async def _read_form(request: web.Request) -> dict[str, str]:
    """The posted form's text fields, within `body_timeout_s` (else 408, closed, as the API's
    bodies); 400 if one is not UTF-8.

    The dashboard's pages are UTF-8, and so are the forms they post. aiohttp decodes a
    percent-escape that is not UTF-8 to U+FFFD, so different bytes would become one email or
    one password: such a form is refused instead. The check runs on the whole body: `&`, `=`
    and `+` are ASCII, which UTF-8 never uses inside a character, so the body decodes if and
    only if every name and value does. A multipart form's text parts aiohttp decodes strictly.
    """
    timeout_s = request.config_dict[EDGE].config.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            if request.content_type in _URLENCODED:
                urllib.parse.unquote_to_bytes(await request.read()).decode()
            posted = await request.post()
    except TimeoutError:
        request[BODY_ABANDONED] = True
        raise web.HTTPRequestTimeout(
            reason=f"The form did not arrive within {timeout_s:g} s. Go back and try again."
        ) from None
    except (UnicodeDecodeError, LookupError):  # LookupError: a charset Python does not know
        raise web.HTTPBadRequest(reason=_NOT_UTF8) from None
    return {name: value for name, value in posted.items() if isinstance(value, str)}


def _rpc_failure(request: web.Request, exc: grpc.aio.AioRpcError) -> web.Response:
    mapped = from_rpc(exc)
    if mapped.body.code == "invalid_session":
        return sign_in_page(request)
    back = request.get(BACK)
    if request.method == "POST" and back is not None and mapped.status < 500:
        response = see_other(back)
        flash(request, response, "error", mapped.body.message)
        return response
    return error_page(request, mapped.status, mapped.body.message)


async def signed_in(request: web.Request) -> Visitor:
    """The visitor with its user and the alerts in force, or a redirect to sign-in."""
    visitor = request[VISITOR]
    if visitor.token is None:
        raise _Redirect(sign_in_page(request))
    stub = accounts(request)
    try:
        visitor.user = await stub.WhoAmI(accounts_pb2.WhoAmIRequest(), metadata=metadata(request))
    except grpc.aio.AioRpcError as exc:
        if from_rpc(exc).body.code == "invalid_session":
            raise _Redirect(sign_in_page(request)) from None
        raise
    settings = await stub.GetAlerts(
        accounts_pb2.GetAlertsRequest(workspace_id=visitor.workspace_id),
        metadata=metadata(request),
    )
    visitor.alerts = list(settings.active)
    return visitor


class _Redirect(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__()
        self.response = response


def page(handler: Callable[[web.Request, Visitor], Awaitable[web.StreamResponse]]) -> Handler:
    """A signed-in page or action: the visitor is checked first."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            visitor = await signed_in(request)
        except _Redirect as redirect:
            return redirect.response
        return await handler(request, visitor)

    return wrapped


def form(request: web.Request, back: str) -> dict[str, str]:
    """The posted fields (CSRF already checked); a failure of the action shows on `back`."""
    request[BACK] = back
    fields: dict[str, str] = request.get(FORM, {})
    return fields


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def allow_sign_in(request: web.Request) -> bool:
    return dashboard(request).sign_ins.allow(client_address(request), time.monotonic())


def context(request: web.Request, **values: Any) -> dict[str, Any]:
    """What every template gets."""
    return {"visitor": request[VISITOR], "path": request.path, **values}


def render_page(
    request: web.Request, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    return render.page(
        dashboard(request).env, template, status=status, **context(request, **values)
    )
