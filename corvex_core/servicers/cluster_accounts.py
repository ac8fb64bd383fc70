"""The Accounts servicer of a core in a cluster (`core.ledger.backend: postgres`): the same
calls and wire conversions as `servicers.accounts`, over the ledger in PostgreSQL.

Every change is one transaction there (pg/accounts.py), acknowledged once it committed; its
notice reaches every other core, and this core applies it to its own mirror before answering,
so a change is in force here as soon as the caller hears of it. Input rules are the
single-core ledger's. Balances read here are PostgreSQL's: `held` is what cores hold on lease
(for requests in flight and ahead of need) and `available` the balance less that. A database
that cannot be reached makes a call fail with UNAVAILABLE, never half done.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, TypeAlias

from corvex.money import NANO_PER_CENT
from corvex.v1 import accounts_pb2, accounts_pb2_grpc
from corvex_core import errors
from corvex_core.cluster import mirror
from corvex_core.cluster.link import Link
from corvex_core.cluster.sync import AccountSync, ms
from corvex_core.invoices import invoice_html, invoice_json, invoice_pdf, parse_invoice_number
from corvex_core.ledger import MAX_IDEMPOTENCY_KEY_CHARS
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore, KeyRow, WorkspaceRow
from corvex_core.records import KEY_LIMIT_FIELDS, KeyLimits
from corvex_core.servicers.accounts import (
    _is_day,
    invoice_pb,
    key_pb,
    limits_from_pb,
    workspace_pb,
)
from corvex_core.state import ApiKey, AutoReload, Workspace

Context: TypeAlias = Any


def workspace_of(row: WorkspaceRow, now: dt.datetime) -> Workspace:
    """A workspace as the wire shows it, from PostgreSQL's row (as of `now`'s month)."""
    month = db.utc_month(now)
    spend = row.month_spend_nano if month <= row.month else 0
    return Workspace(
        id=row.id,
        name=row.name,
        created_ms=ms(row.created_at),
        balance_nano=row.balance_nano,
        spend_cap_nano=row.spend_cap_nano,
        month=max(month, row.month),
        month_spend_nano=spend,
        auto_reload=row.auto_reload,
        auto_reload_error=row.auto_reload_error,
        held_nano=row.leased_nano,
    )


def key_of(row: KeyRow, now: dt.datetime) -> ApiKey:
    month = db.utc_month(now)
    return ApiKey(
        id=row.id,
        workspace_id=row.workspace_id,
        name=row.name,
        prefix=row.prefix,
        secret_sha256=row.secret_sha256,
        created_ms=ms(row.created_at),
        limits=row.limits,
        revoked=row.revoked_at is not None,
        month=max(month, row.month),
        month_tokens=row.month_tokens if month <= row.month else 0,
    )


class ClusterAccountsServicer(accounts_pb2_grpc.AccountsServicer):
    def __init__(
        self,
        accounts: AccountStore,
        sync: AccountSync,
        link: Link,
        *,
        starter_credits_cents: int,
        min_topup_cents: int,
        clock: db.Clock = db.utc_now,
    ) -> None:
        self._accounts = accounts
        self._sync = sync
        self._link = link
        self._starter_cents = starter_credits_cents
        self._min_topup_cents = min_topup_cents
        self._clock = clock

    async def CreateWorkspace(
        self, request: accounts_pb2.CreateWorkspaceRequest, context: Context
    ) -> accounts_pb2.Workspace:
        starter = (
            request.starter_credits_cents
            if request.HasField("starter_credits_cents")
            else self._starter_cents
        )
        if starter < 0:
            raise errors.InvalidRequest(
                "starter_credits_cents must not be negative", param="starter_credits_cents"
            )
        mirror.check_name(request.name)
        mirror.check_amount(starter * NANO_PER_CENT, allow_zero=True)
        workspace_id = "ws_" + secrets.token_hex(8)
        with db.purpose("accounts"), self._link.watching():
            row = await self._accounts.create_workspace(
                workspace_id, request.name, starter_nano=starter * NANO_PER_CENT
            )
        self._sync.install_workspace(row)
        return self._workspace_pb(row)

    async def ListWorkspaces(
        self, request: accounts_pb2.ListWorkspacesRequest, context: Context
    ) -> accounts_pb2.ListWorkspacesResponse:
        with db.purpose("accounts"), self._link.watching():
            rows = await self._accounts.workspaces()
        return accounts_pb2.ListWorkspacesResponse(
            workspaces=[self._workspace_pb(row) for row in rows]
        )

    async def GetWorkspace(
        self, request: accounts_pb2.GetWorkspaceRequest, context: Context
    ) -> accounts_pb2.Workspace:
        return self._workspace_pb(await self._workspace(request.workspace_id))

    async def AddCredits(
        self, request: accounts_pb2.AddCreditsRequest, context: Context
    ) -> accounts_pb2.AddCreditsResponse:
        self._check_topup(request.amount_cents, "amount_cents")
        key = request.idempotency_key
        if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise errors.InvalidRequest(
                f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                param="idempotency_key",
            )
        amount = request.amount_cents * NANO_PER_CENT
        mirror.check_amount(amount)
        with db.purpose("accounts"), self._link.watching():
            invoice, replayed = await self._accounts.top_up(
                request.workspace_id, amount, "manual", key
            )
            row = await self._accounts.workspace(request.workspace_id)
        return accounts_pb2.AddCreditsResponse(
            invoice=invoice_pb(invoice), workspace=self._workspace_pb(row), replayed=replayed
        )

    async def SetSpendCap(
        self, request: accounts_pb2.SetSpendCapRequest, context: Context
    ) -> accounts_pb2.Workspace:
        cap = None
        if request.HasField("cap_cents"):
            if request.cap_cents < 0:
                raise errors.InvalidRequest("cap_cents must not be negative", param="cap_cents")
            cap = request.cap_cents * NANO_PER_CENT
            mirror.check_amount(cap, allow_zero=True)
        with db.purpose("accounts"), self._link.watching():
            row = await self._accounts.set_spend_cap(request.workspace_id, cap)
        return self._workspace_pb(row)

    async def SetAutoReload(
        self, request: accounts_pb2.SetAutoReloadRequest, context: Context
    ) -> accounts_pb2.Workspace:
        setting = None
        if request.enabled:
            self._check_topup(request.amount_cents, "amount_cents")
            if request.threshold_cents < 0:
                raise errors.InvalidRequest(
                    "threshold_cents must not be negative", param="threshold_cents"
                )
            setting = AutoReload(
                request.threshold_cents * NANO_PER_CENT, request.amount_cents * NANO_PER_CENT
            )
            mirror.check_amount(setting.threshold_nano, allow_zero=True)
            mirror.check_amount(setting.amount_nano)
        with db.purpose("accounts"), self._link.watching():
            row = await self._accounts.set_auto_reload(request.workspace_id, setting)
        self._sync.install_workspace(row)
        return self._workspace_pb(row)

    async def CreateKey(
        self, request: accounts_pb2.CreateKeyRequest, context: Context
    ) -> accounts_pb2.CreateKeyResponse:
        limits = limits_from_pb(request.limits) if request.HasField("limits") else KeyLimits()
        mirror.check_name(request.name)
        mirror.check_limits(limits)
        secret, prefix, digest = mirror.new_key_secret()
        with db.purpose("accounts"), self._link.watching():
            row = await self._accounts.create_key(
                "key_" + secrets.token_hex(8),
                request.workspace_id,
                name=request.name,
                prefix=prefix,
                secret_sha256=digest,
                limits=limits,
            )
            await self._installed(row)
        return accounts_pb2.CreateKeyResponse(key=self._key_pb(row), secret=secret)

    async def ListKeys(
        self, request: accounts_pb2.ListKeysRequest, context: Context
    ) -> accounts_pb2.ListKeysResponse:
        with db.purpose("accounts"), self._link.watching():
            rows = await self._accounts.keys(request.workspace_id)
        return accounts_pb2.ListKeysResponse(keys=[self._key_pb(row) for row in rows])

    async def RevokeKey(
        self, request: accounts_pb2.RevokeKeyRequest, context: Context
    ) -> accounts_pb2.ApiKey:
        with db.purpose("accounts"), self._link.watching():
            row = await self._accounts.revoke_key(request.key_id)
            await self._installed(row)
        return self._key_pb(row)

    async def SetKeyLimits(
        self, request: accounts_pb2.SetKeyLimitsRequest, context: Context
    ) -> accounts_pb2.ApiKey:
        given = limits_from_pb(request.limits)
        paths = list(request.update_mask.paths) or list(KEY_LIMIT_FIELDS)
        unknown = [p for p in paths if p not in KEY_LIMIT_FIELDS]
        if unknown:
            raise errors.InvalidRequest(
                f"update_mask names unknown fields: {', '.join(unknown)}", param="update_mask"
            )
        with db.purpose("accounts"), self._link.watching():
            current = (await self._accounts.key(request.key_id)).limits
            merged = KeyLimits(
                **{f: getattr(given if f in paths else current, f) for f in KEY_LIMIT_FIELDS}
            )
            mirror.check_limits(merged)
            row = await self._accounts.set_key_limits(request.key_id, merged)
            await self._installed(row)
        return self._key_pb(row)

    async def GetUsage(
        self, request: accounts_pb2.GetUsageRequest, context: Context
    ) -> accounts_pb2.GetUsageResponse:
        for name in ("since", "until"):
            value = getattr(request, name)
            if value and not _is_day(value):
                raise errors.InvalidRequest(f"{name} must be a date, YYYY-MM-DD", param=name)
        with db.purpose("accounts"), self._link.watching():
            if request.key_id:
                key = await self._accounts.key(request.key_id)
                if key.workspace_id != request.workspace_id:
                    raise errors.NotFound(
                        f"Key {request.key_id} is not a key of {request.workspace_id}."
                    )
            rows = await self._accounts.usage(
                request.workspace_id,
                key_id=request.key_id,
                since=request.since,
                until=request.until,
            )
        return accounts_pb2.GetUsageResponse(
            rows=[
                accounts_pb2.UsageRow(
                    day=r.day,
                    key_id=r.key_id,
                    model=r.model,
                    requests=r.requests,
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    cost_nano_usd=r.cost_nano,
                )
                for r in rows
            ]
        )

    async def ListInvoices(
        self, request: accounts_pb2.ListInvoicesRequest, context: Context
    ) -> accounts_pb2.ListInvoicesResponse:
        with db.purpose("accounts"), self._link.watching():
            await self._accounts.workspace(request.workspace_id)
            invoices = await self._accounts.invoices(request.workspace_id)
        return accounts_pb2.ListInvoicesResponse(invoices=[invoice_pb(i) for i in invoices])

    async def GetInvoice(
        self, request: accounts_pb2.GetInvoiceRequest, context: Context
    ) -> accounts_pb2.InvoiceDocument:
        number = parse_invoice_number(request.number)
        with db.purpose("accounts"), self._link.watching():
            invoice = await self._accounts.invoice(number)
            if invoice is None:
                raise errors.NotFound(f"No invoice INV-{number:06d}.")
            row = await self._accounts.workspace(invoice.workspace_id)
        ws = workspace_of(row, self._clock())
        if request.format == accounts_pb2.INVOICE_FORMAT_HTML:
            content_type, document = "text/html; charset=utf-8", invoice_html(invoice, ws)
        elif request.format == accounts_pb2.INVOICE_FORMAT_PDF:
            content_type, document = "application/pdf", invoice_pdf(invoice, ws)
        else:
            content_type, document = "application/json", invoice_json(invoice, ws)
        return accounts_pb2.InvoiceDocument(
            invoice=invoice_pb(invoice), content_type=content_type, document=document
        )

    # ---- what a cluster refuses -------------------------------------------------------------
    # Users, sessions, checkout, alerts and recent requests (issue 16), and reserved endpoints
    # (issue 17), live in a single core's journal and memory; a cluster's ledger does not hold
    # them yet. They are refused by name, never accepted and ignored.

    async def SignUp(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def SignIn(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def SignOut(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def WhoAmI(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def GetStarterOffer(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def ClaimStarterCredits(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def StartCheckout(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def GetCheckout(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def CompleteCheckout(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def GetAlerts(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def SetAlerts(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def ListRecentRequests(self, request: Any, context: Context) -> Any:
        raise _customers_refused()

    async def CreateEndpoint(self, request: Any, context: Context) -> Any:
        raise _endpoints_refused()

    async def ListEndpoints(self, request: Any, context: Context) -> Any:
        raise _endpoints_refused()

    async def GetEndpoint(self, request: Any, context: Context) -> Any:
        raise _endpoints_refused()

    async def ResizeEndpoint(self, request: Any, context: Context) -> Any:
        raise _endpoints_refused()

    async def DeleteEndpoint(self, request: Any, context: Context) -> Any:
        raise _endpoints_refused()

    async def ListReservedCapacity(self, request: Any, context: Context) -> Any:
        raise _endpoints_refused()

    # ---- helpers -------------------------------------------------------------------------

    async def _workspace(self, workspace_id: str) -> WorkspaceRow:
        with db.purpose("accounts"), self._link.watching():
            return await self._accounts.workspace(workspace_id)

    async def _installed(self, row: KeyRow) -> None:
        """This core applies a key change before answering (the others hear its notice)."""
        if self._sync_needs_workspace(row):
            await self._sync.refresh_workspace(row.workspace_id)
        self._sync.install_key(row)

    def _sync_needs_workspace(self, row: KeyRow) -> bool:
        return not self._sync.knows_workspace(row.workspace_id)

    def _workspace_pb(self, row: WorkspaceRow) -> accounts_pb2.Workspace:
        return workspace_pb(workspace_of(row, self._clock()))

    def _key_pb(self, row: KeyRow) -> accounts_pb2.ApiKey:
        return key_pb(key_of(row, self._clock()))

    def _check_topup(self, cents: int, param: str) -> None:
        if cents < self._min_topup_cents:
            raise errors.InvalidRequest(
                f"The smallest top-up is ${self._min_topup_cents / 100:.2f}.", param=param
            )


def _customers_refused() -> errors.InvalidRequest:
    return errors.InvalidRequest(
        "Customer accounts (sign-up and sign-in, checkout, alerts, recent requests) are not "
        "available when cores share a PostgreSQL ledger (core.ledger.backend: postgres): they "
        "live in a single core's journal. Use the admin credential, or a single core."
    )


def _endpoints_refused() -> errors.InvalidRequest:
    return errors.InvalidRequest(
        "Reserved endpoints are not available when cores share a PostgreSQL ledger "
        "(core.ledger.backend: postgres): their billing lives in a single core's journal. "
        "Run them on a core with the journal ledger."
    )
