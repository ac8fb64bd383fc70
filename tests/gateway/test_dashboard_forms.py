"""How the web app reads a posted form, against the real edge and core: a field that is not
UTF-8 (a percent-escape or a raw byte UTF-8 does not decode) is refused with 400 before
anything is done, not read with U+FFFD in its place; UTF-8 text beyond ASCII is read as sent."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator

import aiohttp
import pytest

from corvex_ops.stack import Stack

PASSWORD = "a long enough password"
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')
_ERROR = re.compile(r'<p class="error" id="error-message">([^<]*)</p>')
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def csrf_of(http: aiohttp.ClientSession, url: str) -> str:
    """The CSRF token of the page at `url` (its cookie stays in the session's jar)."""
    async with http.get(url) as response:
        found = _CSRF.search(await response.text())
    assert found is not None
    return found.group(1)


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str]:
    """POSTs `body` as it is: bytes a form encoder would never produce."""
    async with http.post(url, data=body, headers=_FORM) as response:
        return response.status, (await response.read()).decode(errors="replace")


async def sign_in_status(http: aiohttp.ClientSession, base: str, email: str, password: str) -> int:
    csrf = await csrf_of(http, base + "/dashboard/signin")
    form = {"csrf": csrf, "email": email, "password": password}
    async with http.post(base + "/dashboard/signin", data=form, allow_redirects=False) as response:
        return response.status


@pytest.mark.parametrize(
    ("email", "password"),
    [
        (b"%ff%fe@b.co", b"%ff" * 10),  # escapes of bytes UTF-8 does not decode
        (b"fine@example.com", b"%c3%28" + b"x" * 20),  # a lead byte without its continuation
        (b"\xff\xfe@b.co", PASSWORD.encode()),  # raw bytes, not escaped
    ],
    ids=["escaped-email-and-password", "escaped-password", "raw-email"],
)
async def test_a_sign_up_whose_fields_are_not_utf8_is_refused(
    stack: Stack, http: aiohttp.ClientSession, email: bytes, password: bytes
) -> None:
    url = stack.http_url + "/dashboard/signup"
    csrf = (await csrf_of(http, url)).encode()
    body = b"csrf=" + csrf + b"&email=" + email + b"&password=" + password
    status, text = await post(http, url, body + b"&confirm=" + password)
    assert status == 400
    message = _ERROR.search(text)
    assert message is not None and "not valid UTF-8" in message.group(1), text
    assert "corvex_session" not in {cookie.key for cookie in http.cookie_jar}
    # What aiohttp would have read instead (U+FFFD for each bad byte) is no account either.
    collapsed = urllib.parse.unquote(email.decode("latin-1"), errors="replace")
    typed = urllib.parse.unquote(password.decode("latin-1"), errors="replace")
    assert await sign_in_status(http, stack.http_url, collapsed, typed) == 401


async def test_a_multipart_field_that_is_not_utf8_is_refused(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    url = stack.http_url + "/dashboard/signup"
    csrf = (await csrf_of(http, url)).encode()
    part = b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
    body = part % (b"csrf", csrf) + part % (b"email", b"\xff@b.co") + b"--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    async with http.post(url, data=body, headers=headers) as response:
        assert response.status == 400
        assert "not valid UTF-8" in await response.text()


async def test_a_csrf_token_beyond_ascii_is_refused_as_expired(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    url = stack.http_url + "/dashboard/signup"
    await csrf_of(http, url)
    form = {"csrf": "é" * 32, "email": "csrf-e@example.com", "password": PASSWORD}
    async with http.post(url, data=form) as response:
        assert response.status == 403
        assert "This form has expired" in await response.text()
        # With the headers of every page.
        assert response.headers["Cache-Control"] == "no-store"
        assert "Content-Security-Policy" in response.headers


async def test_utf8_beyond_ascii_is_read_as_sent(stack: Stack, http: aiohttp.ClientSession) -> None:
    url = stack.http_url + "/dashboard/signup"
    form = {
        "csrf": await csrf_of(http, url),
        "email": "utf8@example.com",
        "password": PASSWORD + " é",
        "confirm": PASSWORD + " é",
        "workspace": "Café Zoë",
    }
    async with http.post(url, data=form) as response:
        assert response.status == 200
        assert "<h1>Café Zoë " in await response.text()
    assert await sign_in_status(http, stack.http_url, "utf8@example.com", PASSWORD + " é") == 303
