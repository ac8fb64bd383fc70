"""The web app's rules over HTTP, against the real edge and core: CSRF tokens on every form,
cookie flags, attempt limits, form validation, another user's things unreachable from a
session, and no secret in any log. (The journey in a browser is tests/e2e.)"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from corvex.v1 import accounts_pb2 as pb
from corvex_ops.admin import Client
from corvex_ops.stack import Stack, running_stack
from tests.conftest import ADMIN_TOKEN, STACK_CONFIG

PASSWORD = "a long enough password"
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')
_FLASH = re.compile(r'<p class="flash (ok|error)" role="status">([^<]*)</p>')


class Visitor:
    """A browser without a browser: a cookie jar, and the CSRF token of the last page."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.base + path) as response:
            text = (await response.read()).decode(errors="replace")
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response.status, text

    async def post(self, path: str, csrf: str | None = None, **fields: str) -> tuple[int, str]:
        data = {"csrf": self.csrf if csrf is None else csrf, **fields}
        async with self.http.post(self.base + path, data=data) as response:
            text = await response.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response.status, text

    async def sign_up(self, email: str) -> None:
        await self.get("/dashboard/signup")
        status, text = await self.post(
            "/dashboard/signup", email=email, password=PASSWORD, confirm=PASSWORD
        )
        assert status == 200 and "Overview" in text, text

    def flash(self, text: str) -> tuple[str, str]:
        found = _FLASH.search(text)
        assert found is not None, text
        return found.group(1), found.group(2)

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def visitor(stack: Stack) -> AsyncIterator[Visitor]:
    client = Visitor(stack.http_url)
    yield client
    await client.close()


async def test_every_form_needs_its_csrf_token(visitor: Visitor) -> None:
    await visitor.get("/dashboard/signup")
    for token in ("", "0" * 32):
        status, text = await visitor.post(
            "/dashboard/signup", csrf=token, email="csrf@example.com", password=PASSWORD,
            confirm=PASSWORD,
        )  # fmt: skip
        assert status == 403 and "This form has expired" in text
    await visitor.sign_up("csrf@example.com")
    # Signed in, the token is the session's: the anonymous one no longer works.
    status, _ = await visitor.post("/dashboard/limits", csrf="0" * 32, cap="1")
    assert status == 403


async def test_cookies_and_headers(stack: Stack) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(stack.http_url + "/dashboard/signup") as response:
            csrf = _CSRF.search(await response.text())
            assert csrf is not None
            headers = response.headers
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
        form = {"csrf": csrf.group(1), "email": "flags@example.com", "password": PASSWORD,
                "confirm": PASSWORD}  # fmt: skip
        async with http.post(
            stack.http_url + "/dashboard/signup", data=form, allow_redirects=False
        ) as response:
            assert response.status == 303
            cookie = next(
                v for k, v in response.headers.items() if k == "Set-Cookie" and "session" in v
            )
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # not configured for TLS here (see the next test)


async def test_another_users_invoice_and_keys_are_unreachable(stack: Stack, admin: Client) -> None:
    ada, bob = Visitor(stack.http_url), Visitor(stack.http_url)
    try:
        await ada.sign_up("ada.cross@example.com")
        await ada.get("/dashboard/")
        await ada.post("/dashboard/claim")
        _, keys_page = await ada.post("/dashboard/keys", name="ada-key")
        key_id = re.search(r'data-key="(key_[0-9a-f]+)"', keys_page)
        assert key_id is not None
        _, credits_page = await ada.get("/dashboard/credits")
        invoice = re.search(r"/dashboard/invoices/(INV-\d+)\.pdf", credits_page)
        assert invoice is not None
        status, _ = await ada.get(f"/dashboard/invoices/{invoice.group(1)}.pdf")
        assert status == 200

        await bob.sign_up("bob.cross@example.com")
        await bob.get("/dashboard/keys")
        for fmt in ("pdf", "html", "json"):
            status, text = await bob.get(f"/dashboard/invoices/{invoice.group(1)}.{fmt}")
            assert status == 404 and f"No invoice {invoice.group(1)}." in text
        _, text = await bob.post(f"/dashboard/keys/{key_id.group(1)}/revoke")
        assert bob.flash(text) == ("error", f"No API key {key_id.group(1)}.")
        _, text = await bob.post(f"/dashboard/keys/{key_id.group(1)}/limits", rpm="1")
        assert bob.flash(text)[0] == "error"
    finally:
        await ada.close()
        await bob.close()
    listed = [
        k
        for ws in admin.ListWorkspaces(pb.ListWorkspacesRequest()).workspaces
        for k in admin.ListKeys(pb.ListKeysRequest(workspace_id=ws.id)).keys
        if k.id == key_id.group(1)
    ]
    assert [(k.revoked, k.limits.HasField("requests_per_minute")) for k in listed] == [
        (False, False)
    ]


async def test_forms_are_validated(visitor: Visitor) -> None:
    await visitor.sign_up("forms@example.com")
    await visitor.get("/dashboard/credits")
    for amount, words in (
        ("12.345", "whole cents"),
        ("twelve", "whole cents"),
        ("0", "The smallest top-up is $0.01."),
        ("", "Enter an amount."),
    ):
        _, text = await visitor.post("/dashboard/credits/checkout", amount=amount)
        kind, message = visitor.flash(text)
        assert kind == "error" and words in message, message
    await visitor.get("/dashboard/keys")
    for fields, words in (
        ({"name": ""}, "name of 1 to 100"),
        ({"name": "k", "rpm": "-1"}, "Requests per minute must be a whole number"),
        ({"name": "k", "tpm": "1e9"}, "Tokens per minute must be a whole number"),
    ):
        _, text = await visitor.post("/dashboard/keys", **fields)
        assert visitor.flash(text) == ("error", visitor.flash(text)[1])
        assert words in visitor.flash(text)[1]
    await visitor.get("/dashboard/alerts")
    _, text = await visitor.post("/dashboard/alerts", webhook_url="ftp://example.com/x")
    assert "webhook_url must be an http:// or https:// URL" in visitor.flash(text)[1]


@pytest.fixture(scope="module")
def strict_stack() -> Iterator[Stack]:
    config: dict[str, Any] = {
        **STACK_CONFIG,
        "edge": {"dashboard": {"sign_in_per_minute": 3, "secure_cookies": True}},
    }
    with running_stack(config=config) as running:
        yield running


async def test_sign_in_attempts_are_limited_and_cookies_secure(strict_stack: Stack) -> None:
    base = strict_stack.http_url
    # Cookies by hand: Secure cookies are not sent back over plain HTTP by a cookie jar.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/dashboard/signin") as response:
            set_cookie = response.headers["Set-Cookie"]
            csrf = _CSRF.search(await response.text())
        assert csrf is not None
        assert "corvex_csrf=" in set_cookie and "Secure" in set_cookie and "HttpOnly" in set_cookie
        statuses = []
        for _ in range(4):
            async with http.post(
                base + "/dashboard/signin",
                data={"csrf": csrf.group(1), "email": "nobody@example.com", "password": "wrong!"},
                headers={"Cookie": f"corvex_csrf={csrf.group(1)}"},
            ) as response:
                statuses.append(response.status)
                text = await response.text()
    assert statuses == [401, 401, 401, 429]
    assert "Too many attempts" in text


async def test_no_secret_reaches_a_log(stack: Stack) -> None:
    visitor = Visitor(stack.http_url)
    try:
        await visitor.sign_up("logs@example.com")
        _, keys_page = await visitor.post("/dashboard/keys", name="logged")
        secret = re.search(r'<code id="new-secret">([^<]+)</code>', keys_page)
        assert secret is not None
        session = next(c.value for c in visitor.http.cookie_jar if c.key == "corvex_session")
    finally:
        await visitor.close()
    logs = stack.core.log_text() + (stack.edge.log_text() if stack.edge else "")
    for secret_text in (PASSWORD, session, secret.group(1)):
        assert secret_text not in logs
    assert ADMIN_TOKEN not in logs
