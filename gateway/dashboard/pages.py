"""The signed-in pages: overview, credits (checkout, auto-reload, invoices), limits, keys,
usage (charts, table, request log, CSV), alerts and the playground.

Each handler converts a form or a page view into Accounts calls made with the visitor's
session and renders the answer; the core decides everything (what the session reaches, what
a cap or a key may be). Forms post, then redirect (303) to a page that shows the outcome.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import secrets
from typing import Any, Final

import msgspec
from aiohttp import web

from corvex.money import MoneyError, cents_from_usd, format_usd
from corvex.v1 import accounts_pb2 as pb
from corvex.v1 import inference_pb2
from gateway.dashboard.sessions import (
    PREFIX,
    FormInvalid,
    Visitor,
    accounts,
    flash,
    form,
    metadata,
    page,
    render_page,
    see_other,
    set_cookie,
)
from gateway.errors import http_status_of
from gateway.state import EDGE

# The key the playground calls /v1/chat/completions with; the dashboard creates and rotates
# it, and the keys page labels it as the dashboard's.
PLAYGROUND_KEY_NAME: Final = "Playground (managed by the dashboard)"
PLAYGROUND_COOKIE: Final = "corvex_playground"
NEW_KEY_COOKIE: Final = "corvex_new_key"
USAGE_DAYS: Final = (7, 30, 90)
MAX_LIMIT: Final = 10**12
_encoder = msgspec.json.Encoder()


def _cents(text: str, label: str, *, optional: bool = False) -> int | None:
    """Whole cents of a dollar amount typed in a form ("25", "25.50", "$25.50")."""
    text = text.strip()
    if not text:
        if optional:
            return None
        raise FormInvalid(f"Enter {label}.")
    if len(text) > 20:
        raise FormInvalid(f"{label.capitalize()} is too long.")
    try:
        return cents_from_usd(text)
    except MoneyError:
        raise FormInvalid(
            f"{label.capitalize()} must be a dollar amount in whole cents, like 25 or 25.50."
        ) from None


def _limit(text: str, label: str) -> int | None:
    text = text.strip().replace(",", "").replace("_", "")
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise FormInvalid(f"{label} must be a whole number from 1 to 10^12, or empty for none.")
    return int(text)


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


# ---- overview ------------------------------------------------------------------------------


@page
async def overview(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    stub, meta, ws_id = accounts(request), metadata(request), visitor.workspace_id
    ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(workspace_id=ws_id), metadata=meta)
    offer = await stub.GetStarterOffer(pb.GetStarterOfferRequest(workspace_id=ws_id), metadata=meta)
    recent = await stub.ListRecentRequests(
        pb.ListRecentRequestsRequest(workspace_id=ws_id, limit=10), metadata=meta
    )
    return render_page(
        request,
        "overview.html",
        ws=ws,
        offer=offer,
        recent=recent.requests,
        spend_percent=_spend_percent(ws),
        http_status=http_status_of,
    )


def _spend_percent(ws: pb.Workspace) -> int | None:
    if not ws.HasField("spend_cap_nano_usd"):
        return None
    if ws.spend_cap_nano_usd == 0:
        return 100
    return min(100, ws.month_spend_nano_usd * 100 // ws.spend_cap_nano_usd)


@page
async def claim(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    form(request, f"{PREFIX}/")
    reply = await accounts(request).ClaimStarterCredits(
        pb.ClaimStarterCreditsRequest(workspace_id=visitor.workspace_id),
        metadata=metadata(request),
    )
    response = see_other(f"{PREFIX}/")
    amount = format_usd(reply.invoice.amount_nano_usd)
    flash(request, response, "ok", f"${amount} of starter credits added ({reply.invoice.number}).")
    return response


# ---- credits -------------------------------------------------------------------------------


@page
async def credits(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    stub, meta, ws_id = accounts(request), metadata(request), visitor.workspace_id
    ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(workspace_id=ws_id), metadata=meta)
    invoices = await stub.ListInvoices(pb.ListInvoicesRequest(workspace_id=ws_id), metadata=meta)
    return render_page(
        request,
        "credits.html",
        ws=ws,
        invoices=list(reversed(invoices.invoices)),
        methods={
            pb.TOP_UP_METHOD_MANUAL: "Top-up",
            pb.TOP_UP_METHOD_STARTER: "Starter credits",
            pb.TOP_UP_METHOD_AUTO_RELOAD: "Auto-reload",
        },
        # One per rendering of the form: submitting it twice opens one checkout.
        idempotency_key="buy-" + secrets.token_hex(12),
    )


@page
async def start_checkout(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    fields = form(request, f"{PREFIX}/credits")
    cents = _cents(fields.get("amount", ""), "an amount")
    key = fields.get("idempotency_key", "")[:200] or "buy-" + secrets.token_hex(12)
    checkout = await accounts(request).StartCheckout(
        pb.StartCheckoutRequest(
            workspace_id=visitor.workspace_id, amount_cents=cents or 0, idempotency_key=key
        ),
        metadata=metadata(request),
    )
    if checkout.approve_url:  # a real provider's own page
        return see_other(checkout.approve_url)
    return see_other(f"{PREFIX}/credits/checkout/{checkout.id}")


@page
async def checkout_page(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    checkout = await accounts(request).GetCheckout(
        pb.GetCheckoutRequest(
            workspace_id=visitor.workspace_id, checkout_id=request.match_info["checkout"]
        ),
        metadata=metadata(request),
    )
    return render_page(request, "checkout.html", checkout=checkout)


@page
async def approve_checkout(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    form(request, f"{PREFIX}/credits")
    reply = await accounts(request).CompleteCheckout(
        pb.CompleteCheckoutRequest(
            workspace_id=visitor.workspace_id, checkout_id=request.match_info["checkout"]
        ),
        metadata=metadata(request),
    )
    response = see_other(f"{PREFIX}/credits")
    amount = format_usd(reply.invoice.amount_nano_usd)
    if reply.replayed:
        text = f"That payment was credited already: ${amount} ({reply.invoice.number})."
    else:
        text = f"${amount} added to your balance ({reply.invoice.number})."
    flash(request, response, "ok", text)
    return response


@page
async def auto_reload(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    fields = form(request, f"{PREFIX}/credits")
    enabled = fields.get("enabled") == "on"
    threshold = _cents(fields.get("threshold", ""), "a threshold", optional=not enabled) or 0
    amount = _cents(fields.get("amount", ""), "a reload amount", optional=not enabled) or 0
    await accounts(request).SetAutoReload(
        pb.SetAutoReloadRequest(
            workspace_id=visitor.workspace_id,
            enabled=enabled,
            threshold_cents=threshold,
            amount_cents=amount,
        ),
        metadata=metadata(request),
    )
    response = see_other(f"{PREFIX}/credits")
    flash(request, response, "ok", "Auto-reload is " + ("on." if enabled else "off."))
    return response


_INVOICE_FORMATS: Final = {
    "pdf": pb.INVOICE_FORMAT_PDF,
    "html": pb.INVOICE_FORMAT_HTML,
    "json": pb.INVOICE_FORMAT_JSON,
}


@page
async def invoice(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    kind = request.match_info["format"]
    if kind not in _INVOICE_FORMATS:
        raise web.HTTPNotFound(reason="Invoices download as .pdf, .html or .json.")
    number = request.match_info["number"]
    document = await accounts(request).GetInvoice(
        pb.GetInvoiceRequest(number=number, format=_INVOICE_FORMATS[kind]),
        metadata=metadata(request),
    )
    disposition = "attachment" if kind == "pdf" else "inline"
    return web.Response(
        body=document.document,
        headers={
            "Content-Type": document.content_type,
            "Content-Disposition": f'{disposition}; filename="{document.invoice.number}.{kind}"',
        },
    )


# ---- limits --------------------------------------------------------------------------------


@page
async def limits(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    ws = await accounts(request).GetWorkspace(
        pb.GetWorkspaceRequest(workspace_id=visitor.workspace_id), metadata=metadata(request)
    )
    return render_page(request, "limits.html", ws=ws, spend_percent=_spend_percent(ws))


@page
async def set_cap(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    fields = form(request, f"{PREFIX}/limits")
    remove = fields.get("action") == "remove"
    cap = None if remove else _cents(fields.get("cap", ""), "a monthly cap")
    await accounts(request).SetSpendCap(
        pb.SetSpendCapRequest(workspace_id=visitor.workspace_id, cap_cents=cap),
        metadata=metadata(request),
    )
    response = see_other(f"{PREFIX}/limits")
    text = "The spend cap is removed." if cap is None else f"The spend cap is ${cap / 100:.2f}."
    flash(request, response, "ok", text + " It applies from the next request.")
    return response


# ---- keys ----------------------------------------------------------------------------------


async def _keys_page(request: web.Request, visitor: Visitor, **extra: Any) -> web.Response:
    listed = await accounts(request).ListKeys(
        pb.ListKeysRequest(workspace_id=visitor.workspace_id), metadata=metadata(request)
    )
    keys = sorted(listed.keys, key=lambda k: (k.revoked, -k.created.ToMilliseconds()))
    new_key = next((k for k in keys if k.id == extra.pop("new_key_id", None)), None)
    if new_key is None:
        extra.pop("new_secret", None)
    return render_page(
        request, "keys.html", keys=keys, managed=PLAYGROUND_KEY_NAME, new_key=new_key, **extra
    )


@page
async def keys(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    created = request.cookies.get(NEW_KEY_COOKIE, "")
    key_id, _, secret = created.partition(":")
    if not secret:
        return await _keys_page(request, visitor)
    response = await _keys_page(request, visitor, new_key_id=key_id, new_secret=secret)
    response.del_cookie(NEW_KEY_COOKIE, path=f"{PREFIX}/keys")
    return response


def _key_limits(fields: dict[str, str]) -> pb.KeyLimits:
    return pb.KeyLimits(
        requests_per_minute=_limit(fields.get("rpm", ""), "Requests per minute"),
        tokens_per_minute=_limit(fields.get("tpm", ""), "Tokens per minute"),
        monthly_tokens=_limit(fields.get("monthly_tokens", ""), "Monthly tokens"),
    )


@page
async def create_key(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    fields = form(request, f"{PREFIX}/keys")
    name = fields.get("name", "").strip()
    if not 1 <= len(name) <= 100:
        raise FormInvalid("Give the key a name of 1 to 100 characters.")
    if name == PLAYGROUND_KEY_NAME:
        raise FormInvalid("That name is the playground's; choose another.")
    created = await accounts(request).CreateKey(
        pb.CreateKeyRequest(
            workspace_id=visitor.workspace_id, name=name, limits=_key_limits(fields)
        ),
        metadata=metadata(request),
    )
    # Post, redirect, get: the secret rides once in a short-lived HttpOnly cookie scoped to
    # the keys page, which shows it and deletes it, so a reload neither shows it again nor
    # creates a second key. It is never in a URL or a log.
    response = see_other(f"{PREFIX}/keys")
    set_cookie(request, response, NEW_KEY_COOKIE, f"{created.key.id}:{created.secret}",
               max_age=120, path=f"{PREFIX}/keys")  # fmt: skip
    return response


@page
async def revoke_key(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    form(request, f"{PREFIX}/keys")
    key = await accounts(request).RevokeKey(
        pb.RevokeKeyRequest(key_id=request.match_info["key"]), metadata=metadata(request)
    )
    response = see_other(f"{PREFIX}/keys")
    flash(request, response, "ok", f"Key {key.name} ({key.prefix}…) is revoked.")
    return response


@page
async def key_limits(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    fields = form(request, f"{PREFIX}/keys")
    key = await accounts(request).SetKeyLimits(
        pb.SetKeyLimitsRequest(key_id=request.match_info["key"], limits=_key_limits(fields)),
        metadata=metadata(request),
    )
    response = see_other(f"{PREFIX}/keys")
    flash(request, response, "ok", f"Limits of {key.name} saved.")
    return response


# ---- usage ---------------------------------------------------------------------------------


class _UsageView(msgspec.Struct):
    key_id: str
    days: int
    since: str
    rows: list[pb.UsageRow]
    keys: list[pb.ApiKey]


async def _usage(request: web.Request, visitor: Visitor) -> _UsageView:
    key_id = request.query.get("key", "")[:100]
    try:
        days = int(request.query.get("days", "30"))
    except ValueError:
        days = 30
    if days not in USAGE_DAYS:
        days = 30
    since = (_today() - dt.timedelta(days=days - 1)).isoformat()
    stub, meta, ws_id = accounts(request), metadata(request), visitor.workspace_id
    usage = await stub.GetUsage(
        pb.GetUsageRequest(workspace_id=ws_id, key_id=key_id, since=since), metadata=meta
    )
    listed = await stub.ListKeys(pb.ListKeysRequest(workspace_id=ws_id), metadata=meta)
    return _UsageView(key_id, days, since, list(usage.rows), list(listed.keys))


def _chart_data(view: _UsageView) -> dict[str, Any]:
    """Cost (USD) and tokens per day × model, every day of the range present (zeros)."""
    start = dt.date.fromisoformat(view.since)
    days = [(start + dt.timedelta(days=i)).isoformat() for i in range(view.days)]
    models = sorted({r.model for r in view.rows})
    cost = {m: [0.0] * len(days) for m in models}
    tokens = {m: [0] * len(days) for m in models}
    index = {d: i for i, d in enumerate(days)}
    for row in view.rows:
        i = index.get(row.day)
        if i is None:
            continue
        # Floats only for drawing: the table and the CSV carry the exact amounts.
        cost[row.model][i] += row.cost_nano_usd / 1e9
        tokens[row.model][i] += row.prompt_tokens + row.completion_tokens
    return {"days": days, "models": models, "cost": cost, "tokens": tokens}


@page
async def usage(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    view = await _usage(request, visitor)
    recent = await accounts(request).ListRecentRequests(
        pb.ListRecentRequestsRequest(workspace_id=visitor.workspace_id, key_id=view.key_id),
        metadata=metadata(request),
    )
    names = {k.id: k.name for k in view.keys}
    return render_page(
        request,
        "usage.html",
        view=view,
        names=names,
        recent=recent.requests,
        chart=_encoder.encode(_chart_data(view)).decode(),
        day_choices=USAGE_DAYS,
        http_status=http_status_of,
        total_cost=sum(r.cost_nano_usd for r in view.rows),
        total_tokens=sum(r.prompt_tokens + r.completion_tokens for r in view.rows),
    )


@page
async def usage_csv(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    view = await _usage(request, visitor)
    names = {k.id: k.name for k in view.keys}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["day", "key_id", "key_name", "model", "requests", "prompt_tokens",
         "completion_tokens", "cost_usd"]
    )  # fmt: skip
    for r in view.rows:
        writer.writerow(
            [r.day, r.key_id, names.get(r.key_id, ""), r.model, r.requests, r.prompt_tokens,
             r.completion_tokens, format_usd(r.cost_nano_usd)]
        )  # fmt: skip
    filename = f"corvex-usage-{view.since}-{view.days}d.csv"
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# ---- alerts --------------------------------------------------------------------------------


@page
async def alerts(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    settings = await accounts(request).GetAlerts(
        pb.GetAlertsRequest(workspace_id=visitor.workspace_id), metadata=metadata(request)
    )
    return render_page(request, "alerts.html", settings=settings)


@page
async def set_alerts(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    fields = form(request, f"{PREFIX}/alerts")
    below = _cents(fields.get("balance_below", ""), "a balance threshold", optional=True)
    url = fields.get("webhook_url", "").strip()
    if len(url) > 2000:
        raise FormInvalid("The webhook URL is too long.")
    await accounts(request).SetAlerts(
        pb.SetAlertsRequest(
            workspace_id=visitor.workspace_id,
            balance_below_cents=below,
            webhook_url=url,
            rotate_secret=fields.get("rotate") == "on",
        ),
        metadata=metadata(request),
    )
    response = see_other(f"{PREFIX}/alerts")
    flash(request, response, "ok", "Alert settings saved.")
    return response


# ---- playground ----------------------------------------------------------------------------


async def _playground_key(request: web.Request, visitor: Visitor) -> tuple[str, str, bool]:
    """(key id, secret, new) of the workspace's playground key. The secret lives only in this
    browser's cookie; without it (another browser, a cleared cookie) the key is replaced."""
    stub, meta, ws_id = accounts(request), metadata(request), visitor.workspace_id
    listed = await stub.ListKeys(pb.ListKeysRequest(workspace_id=ws_id), metadata=meta)
    live = [k for k in listed.keys if k.name == PLAYGROUND_KEY_NAME and not k.revoked]
    key_id, _, secret = request.cookies.get(PLAYGROUND_COOKIE, "").partition(":")
    if secret and any(k.id == key_id for k in live):
        return key_id, secret, False
    for old in live:
        await stub.RevokeKey(pb.RevokeKeyRequest(key_id=old.id), metadata=meta)
    created = await stub.CreateKey(
        pb.CreateKeyRequest(workspace_id=ws_id, name=PLAYGROUND_KEY_NAME), metadata=meta
    )
    return created.key.id, created.secret, True


@page
async def playground(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    key_id, secret, new = await _playground_key(request, visitor)
    edge = request.config_dict[EDGE]
    catalogue = await edge.inference.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    ws = await accounts(request).GetWorkspace(
        pb.GetWorkspaceRequest(workspace_id=visitor.workspace_id), metadata=metadata(request)
    )
    response = render_page(
        request,
        "playground.html",
        models=list(catalogue.models),
        ws=ws,
        key_id=key_id,
        secret=secret,
    )
    if new:
        set_cookie(request, response, PLAYGROUND_COOKIE, f"{key_id}:{secret}", path=PREFIX)
    return response


@page
async def workspace_json(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    """The balance the playground shows after each turn."""
    ws = await accounts(request).GetWorkspace(
        pb.GetWorkspaceRequest(workspace_id=visitor.workspace_id), metadata=metadata(request)
    )
    body = {
        "balance_usd": format_usd(ws.balance_nano_usd),
        "month_spend_usd": format_usd(ws.month_spend_nano_usd),
        "spend_cap_usd": (
            format_usd(ws.spend_cap_nano_usd) if ws.HasField("spend_cap_nano_usd") else None
        ),
    }
    return web.Response(body=_encoder.encode(body), content_type="application/json")
