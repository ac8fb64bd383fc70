"""Sign-up, sign-in and sign-out pages. The core hashes and checks passwords and owns the
sessions; this sets and clears the cookie that carries one, and limits attempts per address."""

from __future__ import annotations

import time

import grpc
from aiohttp import web

from corvex.v1 import accounts_pb2 as pb
from gateway.dashboard.sessions import (
    FORM,
    PREFIX,
    SESSION_COOKIE,
    VISITOR,
    accounts,
    allow_sign_in,
    metadata,
    render_page,
    see_other,
    set_cookie,
)
from gateway.errors import from_rpc

_MAX_FIELD_CHARS = 300


async def sign_up_page(request: web.Request) -> web.StreamResponse:
    if request[VISITOR].token:
        return see_other(f"{PREFIX}/")
    return render_page(request, "signup.html", email="", error=None)


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    if request[VISITOR].token:
        return see_other(f"{PREFIX}/")
    return render_page(request, "signin.html", email="", error=None)


def _posted(request: web.Request) -> dict[str, str]:
    fields: dict[str, str] = request.get(FORM, {})
    return fields


async def sign_up(request: web.Request) -> web.StreamResponse:
    fields = _posted(request)
    email = fields.get("email", "")[:_MAX_FIELD_CHARS]
    if not allow_sign_in(request):
        return render_page(request, "signup.html", status=429, email=email,
                           error="Too many attempts from your address; wait a minute.")  # fmt: skip
    if fields.get("password", "") != fields.get("confirm", ""):
        return render_page(request, "signup.html", status=400, email=email,
                           error="The two passwords differ.")  # fmt: skip
    request_pb = pb.SignUpRequest(
        email=email,
        password=fields.get("password", "")[:_MAX_FIELD_CHARS],
        workspace_name=fields.get("workspace", "")[:_MAX_FIELD_CHARS],
    )
    try:
        reply = await accounts(request).SignUp(request_pb, metadata=metadata(request))
    except grpc.aio.AioRpcError as exc:
        mapped = from_rpc(exc)
        return render_page(request, "signup.html", status=mapped.status, email=email,
                           error=mapped.body.message)  # fmt: skip
    return _signed_in(request, reply)


async def sign_in(request: web.Request) -> web.StreamResponse:
    fields = _posted(request)
    email = fields.get("email", "")[:_MAX_FIELD_CHARS]
    if not allow_sign_in(request):
        return render_page(request, "signin.html", status=429, email=email,
                           error="Too many attempts from your address; wait a minute.")  # fmt: skip
    request_pb = pb.SignInRequest(
        email=email, password=fields.get("password", "")[:_MAX_FIELD_CHARS]
    )
    try:
        reply = await accounts(request).SignIn(request_pb, metadata=metadata(request))
    except grpc.aio.AioRpcError as exc:
        mapped = from_rpc(exc)
        return render_page(request, "signin.html", status=mapped.status, email=email,
                           error=mapped.body.message)  # fmt: skip
    return _signed_in(request, reply)


def _signed_in(request: web.Request, reply: pb.SignInResponse) -> web.Response:
    response = see_other(f"{PREFIX}/")
    max_age = max(0, reply.session.expires.seconds - int(time.time()))
    set_cookie(request, response, SESSION_COOKIE, reply.session.token, max_age=max_age)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    if request[VISITOR].token:
        try:
            await accounts(request).SignOut(pb.SignOutRequest(), metadata=metadata(request))
        except grpc.aio.AioRpcError as exc:
            if from_rpc(exc).body.code != "invalid_session":
                raise
    response = see_other(f"{PREFIX}/signin")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
