"""The Accounts servicer: workspaces, money, keys, usage and invoices, wire → ledger → wire
(the customers' own calls are mixed in from `customers`, the reserved endpoints' from
`endpoints`).

Every change is made by one synchronous ledger call and acknowledged only after the journal
has it on disk. Who may call what (`ACCESS`) is checked by the interceptor before any of
these methods runs: a session reaches them only for its own user's workspaces.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeAlias

from corvex.money import NANO_PER_CENT
from corvex.v1 import accounts_pb2, accounts_pb2_grpc
from corvex_core import errors
from corvex_core.access import Access, SignInThrottle
from corvex_core.activity import Activity
from corvex_core.alerts import Alerter
from corvex_core.config import CustomersConfig
from corvex_core.invoices import invoice_html, invoice_json, invoice_pdf, parse_invoice_number
from corvex_core.journal import JournalError
from corvex_core.ledger import Ledger, UsageRow
from corvex_core.lifecycle import CallKind
from corvex_core.payments import Checkouts
from corvex_core.records import KEY_LIMIT_FIELDS, KeyLimits, TopUpMethod
from corvex_core.reserved import ReservedEndpoints
from corvex_core.servicers import customers
from corvex_core.servicers.customers import CustomerCalls, timestamp
from corvex_core.servicers.endpoints import EndpointRpcs
from corvex_core.serving import Durable
from corvex_core.state import ApiKey, Invoice, Workspace

# grpc ships no types; this names what the handlers receive.
Context: TypeAlias = Any

CALL_KINDS = {
    "CreateWorkspace": CallKind.WRITE,
    "ListWorkspaces": CallKind.READ,
    "GetWorkspace": CallKind.READ,
    "AddCredits": CallKind.WRITE,
    "SetSpendCap": CallKind.WRITE,
    "SetAutoReload": CallKind.WRITE,
    "CreateKey": CallKind.WRITE,
    "ListKeys": CallKind.READ,
    "RevokeKey": CallKind.WRITE,
    "SetKeyLimits": CallKind.WRITE,
    "GetUsage": CallKind.READ,
    "ListInvoices": CallKind.READ,
    "GetInvoice": CallKind.READ,
    # Reserved endpoints (issue 17).
    "CreateEndpoint": CallKind.WRITE,
    "ListEndpoints": CallKind.READ,
    "GetEndpoint": CallKind.READ,
    "ResizeEndpoint": CallKind.WRITE,
    "DeleteEndpoint": CallKind.WRITE,
    "ListReservedCapacity": CallKind.READ,
    **customers.CALL_KINDS,
}
# Who may make each call (corvex_core.access): the interceptor enforces it.
ACCESS = {
    "CreateWorkspace": Access.ADMIN,
    "ListWorkspaces": Access.ADMIN,
    "GetWorkspace": Access.OWNER,
    "AddCredits": Access.ADMIN,
    "SetSpendCap": Access.OWNER,
    "SetAutoReload": Access.OWNER,
    "CreateKey": Access.OWNER,
    "ListKeys": Access.OWNER,
    "RevokeKey": Access.OWNER,
    "SetKeyLimits": Access.OWNER,
    "GetUsage": Access.OWNER,
    "ListInvoices": Access.OWNER,
    "GetInvoice": Access.OWNER,
    # Reserved endpoints: a user names its workspace to list them (an empty one lists every
    # workspace's, the admin's alone) or the endpoint itself.
    "CreateEndpoint": Access.OWNER,
    "ListEndpoints": Access.OWNER,
    "GetEndpoint": Access.OWNER,
    "ResizeEndpoint": Access.OWNER,
    "DeleteEndpoint": Access.OWNER,
    "ListReservedCapacity": Access.ADMIN,
    **customers.ACCESS,
}
assert set(ACCESS) == set(CALL_KINDS), "every Accounts call needs its access rule"
# The wire's enum names each domain method TOP_UP_METHOD_<NAME>.
_METHODS = {m: accounts_pb2.TopUpMethod.Value(f"TOP_UP_METHOD_{m.name}") for m in TopUpMethod}


class AccountsServicer(CustomerCalls, EndpointRpcs, accounts_pb2_grpc.AccountsServicer):
    def __init__(
        self,
        ledger: Ledger,
        *,
        durable: Durable,
        starter_credits_cents: int,
        min_topup_cents: int,
        reserved: ReservedEndpoints,
        create_wait_s: float,
        customers: CustomersConfig,
        starter_promotion_cents: int,
        checkouts: Checkouts,
        alerter: Alerter,
        activity: Activity,
    ) -> None:
        self._ledger = ledger
        self._durable = durable
        self._starter_cents = starter_credits_cents
        self._min_topup_cents = min_topup_cents
        self._reserved = reserved
        self._create_wait_s = create_wait_s
        self._customers = customers
        self._starter_nano = starter_promotion_cents * NANO_PER_CENT
        self._throttle = SignInThrottle(
            max_failures=customers.sign_in_failures,
            window_ms=int(customers.sign_in_window_s * 1000),
        )
        self._checkouts = checkouts
        self._alerter = alerter
        self._activity = activity

    async def CreateWorkspace(
        self, request: accounts_pb2.CreateWorkspaceRequest, context: Context
    ) -> accounts_pb2.Workspace:
        starter = requested_starter_cents(request, self._starter_cents)
        ws, _ = self._ledger.create_workspace(request.name, starter * NANO_PER_CENT)
        await self._sync()
        return workspace_pb(ws)

    async def ListWorkspaces(
        self, request: accounts_pb2.ListWorkspacesRequest, context: Context
    ) -> accounts_pb2.ListWorkspacesResponse:
        return accounts_pb2.ListWorkspacesResponse(
            workspaces=[workspace_pb(ws) for ws in self._ledger.workspaces()]
        )

    async def GetWorkspace(
        self, request: accounts_pb2.GetWorkspaceRequest, context: Context
    ) -> accounts_pb2.Workspace:
        return workspace_pb(self._ledger.workspace(request.workspace_id))

    async def AddCredits(
        self, request: accounts_pb2.AddCreditsRequest, context: Context
    ) -> accounts_pb2.AddCreditsResponse:
        self._check_topup(request.amount_cents, "amount_cents")
        invoice, replayed = self._ledger.add_credits(
            request.workspace_id,
            request.amount_cents * NANO_PER_CENT,
            TopUpMethod.MANUAL,
            request.idempotency_key,
        )
        # A replay waits too: its first attempt may still be on its way to disk.
        await self._sync()
        self._alerter.check(request.workspace_id)
        return accounts_pb2.AddCreditsResponse(
            invoice=invoice_pb(invoice),
            workspace=workspace_pb(self._ledger.workspace(request.workspace_id)),
            replayed=replayed,
        )

    async def SetSpendCap(
        self, request: accounts_pb2.SetSpendCapRequest, context: Context
    ) -> accounts_pb2.Workspace:
        cap = None
        if request.HasField("cap_cents"):
            if request.cap_cents < 0:
                raise errors.InvalidRequest("cap_cents must not be negative", param="cap_cents")
            cap = request.cap_cents * NANO_PER_CENT
        ws = self._ledger.set_spend_cap(request.workspace_id, cap)
        await self._sync()
        self._alerter.check(ws.id)
        return workspace_pb(ws)

    async def SetAutoReload(
        self, request: accounts_pb2.SetAutoReloadRequest, context: Context
    ) -> accounts_pb2.Workspace:
        if request.enabled:
            self._check_topup(request.amount_cents, "amount_cents")
            if request.threshold_cents < 0:
                raise errors.InvalidRequest(
                    "threshold_cents must not be negative", param="threshold_cents"
                )
        ws = self._ledger.set_auto_reload(
            request.workspace_id,
            enabled=request.enabled,
            threshold_nano=request.threshold_cents * NANO_PER_CENT,
            amount_nano=request.amount_cents * NANO_PER_CENT,
        )
        await self._sync()
        return workspace_pb(ws)

    async def CreateKey(
        self, request: accounts_pb2.CreateKeyRequest, context: Context
    ) -> accounts_pb2.CreateKeyResponse:
        limits = limits_from_pb(request.limits) if request.HasField("limits") else KeyLimits()
        key, secret = self._ledger.create_key(request.workspace_id, request.name, limits)
        await self._sync()
        return accounts_pb2.CreateKeyResponse(key=key_pb(key), secret=secret)

    async def ListKeys(
        self, request: accounts_pb2.ListKeysRequest, context: Context
    ) -> accounts_pb2.ListKeysResponse:
        return accounts_pb2.ListKeysResponse(
            keys=[key_pb(k) for k in self._ledger.keys(request.workspace_id)]
        )

    async def RevokeKey(
        self, request: accounts_pb2.RevokeKeyRequest, context: Context
    ) -> accounts_pb2.ApiKey:
        key = self._ledger.revoke_key(request.key_id)
        await self._sync()
        return key_pb(key)

    async def SetKeyLimits(
        self, request: accounts_pb2.SetKeyLimitsRequest, context: Context
    ) -> accounts_pb2.ApiKey:
        current = self._ledger.key(request.key_id).limits
        given = limits_from_pb(request.limits)
        paths = list(request.update_mask.paths) or list(KEY_LIMIT_FIELDS)
        unknown = [p for p in paths if p not in KEY_LIMIT_FIELDS]
        if unknown:
            raise errors.InvalidRequest(
                f"update_mask names unknown fields: {', '.join(unknown)}", param="update_mask"
            )
        merged = KeyLimits(
            **{f: getattr(given if f in paths else current, f) for f in KEY_LIMIT_FIELDS}
        )
        key = self._ledger.set_key_limits(request.key_id, merged)
        await self._sync()
        return key_pb(key)

    async def GetUsage(
        self, request: accounts_pb2.GetUsageRequest, context: Context
    ) -> accounts_pb2.GetUsageResponse:
        for name in ("since", "until"):
            value = getattr(request, name)
            if value and not _is_day(value):
                raise errors.InvalidRequest(f"{name} must be a date, YYYY-MM-DD", param=name)
        if request.key_id:
            key = self._ledger.key(request.key_id)
            if key.workspace_id != request.workspace_id:
                raise errors.NotFound(
                    f"Key {request.key_id} is not a key of {request.workspace_id}."
                )
        rows = self._ledger.usage(
            request.workspace_id, key_id=request.key_id, since=request.since, until=request.until
        )
        return accounts_pb2.GetUsageResponse(rows=[usage_row_pb(r) for r in rows])

    async def ListInvoices(
        self, request: accounts_pb2.ListInvoicesRequest, context: Context
    ) -> accounts_pb2.ListInvoicesResponse:
        return accounts_pb2.ListInvoicesResponse(
            invoices=[invoice_pb(i) for i in self._ledger.invoices(request.workspace_id)]
        )

    async def GetInvoice(
        self, request: accounts_pb2.GetInvoiceRequest, context: Context
    ) -> accounts_pb2.InvoiceDocument:
        number = parse_invoice_number(request.number)
        invoice = self._ledger.invoice(number)
        ws = self._ledger.workspace(invoice.workspace_id)
        return invoice_document(request.format, invoice, ws)

    def _credited(self, invoice: Invoice, *, replayed: bool) -> accounts_pb2.AddCreditsResponse:
        self._alerter.check(invoice.workspace_id)
        return accounts_pb2.AddCreditsResponse(
            invoice=invoice_pb(invoice),
            workspace=workspace_pb(self._ledger.workspace(invoice.workspace_id)),
            replayed=replayed,
        )

    def _check_topup(self, cents: int, param: str) -> None:
        if cents < self._min_topup_cents:
            raise errors.InvalidRequest(
                f"The smallest top-up is ${self._min_topup_cents / 100:.2f}.", param=param
            )

    async def _sync(self) -> None:
        try:
            await self._durable()
        except JournalError as exc:
            raise errors.ServiceUnavailable(
                "The change could not be made durable; the core has stopped taking changes."
            ) from exc


def _is_day(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10


def workspace_pb(ws: Workspace) -> accounts_pb2.Workspace:
    reload = ws.auto_reload
    return accounts_pb2.Workspace(
        id=ws.id,
        name=ws.name,
        created=timestamp(ws.created_ms),
        balance_nano_usd=ws.balance_nano,
        held_nano_usd=ws.held_nano,
        available_nano_usd=ws.available_nano,
        spend_cap_nano_usd=ws.spend_cap_nano,
        month=ws.month,
        month_spend_nano_usd=ws.month_spend_nano,
        auto_reload=accounts_pb2.AutoReload(
            enabled=reload is not None,
            threshold_nano_usd=reload.threshold_nano if reload else 0,
            amount_nano_usd=reload.amount_nano if reload else 0,
            last_error=ws.auto_reload_error,
        ),
    )


def limits_from_pb(limits: accounts_pb2.KeyLimits) -> KeyLimits:
    wire: Any = limits  # its fields are named by KEY_LIMIT_FIELDS, not by literals
    return KeyLimits(
        **{f: getattr(wire, f) if wire.HasField(f) else None for f in KEY_LIMIT_FIELDS}
    )


def key_pb(key: ApiKey) -> accounts_pb2.ApiKey:
    return accounts_pb2.ApiKey(
        id=key.id,
        workspace_id=key.workspace_id,
        name=key.name,
        prefix=key.prefix,
        created=timestamp(key.created_ms),
        revoked=key.revoked,
        limits=accounts_pb2.KeyLimits(
            **{f: v for f in KEY_LIMIT_FIELDS if (v := getattr(key.limits, f)) is not None}
        ),
        month_tokens=key.month_tokens,
        last_used=timestamp(key.last_used_ms) if key.last_used_ms else None,
    )


def requested_starter_cents(request: accounts_pb2.CreateWorkspaceRequest, default: int) -> int:
    """The starter credits a CreateWorkspace asks for, or the core's default."""
    if not request.HasField("starter_credits_cents"):
        return default
    if request.starter_credits_cents < 0:
        raise errors.InvalidRequest(
            "starter_credits_cents must not be negative", param="starter_credits_cents"
        )
    return request.starter_credits_cents


def usage_row_pb(row: UsageRow) -> accounts_pb2.UsageRow:
    return accounts_pb2.UsageRow(
        day=row.day,
        key_id=row.key_id,
        model=row.model,
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        cost_nano_usd=row.cost_nano,
        endpoint_id=row.endpoint_id,
        replica_seconds=row.replica_seconds,
    )


def invoice_document(
    format: accounts_pb2.InvoiceFormat.ValueType, invoice: Invoice, ws: Workspace
) -> accounts_pb2.InvoiceDocument:
    """The invoice in the asked format (unspecified: JSON); a format this core does not know
    is the caller's error."""
    if format == accounts_pb2.INVOICE_FORMAT_HTML:
        content_type, document = "text/html; charset=utf-8", invoice_html(invoice, ws)
    elif format == accounts_pb2.INVOICE_FORMAT_PDF:
        content_type, document = "application/pdf", invoice_pdf(invoice, ws)
    elif format in (accounts_pb2.INVOICE_FORMAT_UNSPECIFIED, accounts_pb2.INVOICE_FORMAT_JSON):
        content_type, document = "application/json", invoice_json(invoice, ws)
    else:
        raise errors.InvalidRequest(
            f"format {format} is not an invoice format this server knows", param="format"
        )
    return accounts_pb2.InvoiceDocument(
        invoice=invoice_pb(invoice), content_type=content_type, document=document
    )


def invoice_pb(invoice: Invoice) -> accounts_pb2.Invoice:
    return accounts_pb2.Invoice(
        number=invoice.label,
        workspace_id=invoice.workspace_id,
        created=timestamp(invoice.created_ms),
        amount_nano_usd=invoice.amount_nano,
        method=_METHODS[invoice.method],
        balance_after_nano_usd=invoice.balance_after_nano,
        idempotency_key=invoice.idempotency_key,
    )
