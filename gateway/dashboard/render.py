"""Rendering the web app's pages: one Jinja2 environment (autoescaped), its filters, and the
security headers every page carries. Templates and static files live beside this module."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Final

import jinja2
from aiohttp import web

from corvex.money import NANO_PER_CENT, format_usd

HERE: Final = Path(__file__).parent
STATIC_DIR: Final = HERE / "static"
# Scripts and styles come only from our own /static/ (no inline script, no CDN).
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def usd(nano: int, places: int = 2) -> str:
    """$1.50, or every significant digit of small amounts ($0.0000242)."""
    return "$" + format_usd(nano, min_places=places)


def usd_cents(nano: int) -> str:
    """Rounded down to the cent, for balances: $4.99."""
    return "$" + format_usd(nano - nano % NANO_PER_CENT)


def when(at: Any) -> str:
    """A protobuf Timestamp (or Unix milliseconds) as "2026-12-01 10:02 UTC"; "" if unset."""
    millis = at if isinstance(at, int) else at.ToMilliseconds()
    if not millis:
        return ""
    moment = dt.datetime.fromtimestamp(millis / 1000, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["usd"] = usd
    env.filters["usd_cents"] = usd_cents
    env.filters["when"] = when
    return env


def page(
    env: jinja2.Environment, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    response = web.Response(
        text=env.get_template(template).render(**context),
        status=status,
        content_type="text/html",
        charset="utf-8",
    )
    secure(response)
    return response


def secure(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
