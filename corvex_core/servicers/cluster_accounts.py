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

import asyncio
import datetime as dt
import secrets
from typing import Any, TypeAlias

from corvex.money import NANO_PER_CENT
from corvex.v1 import accounts_pb2, accounts_pb2_grpc
from corvex_core import access, errors, passwords
from corvex_core.cluster import mirror
from corvex_core.cluster.customers import ClusterCustomers, workspace_of
from corvex_core.cluster.link import Link
from corvex_core.cluster.sync import AccountSync, ms
from corvex_core.config import CustomersConfig
from corvex_core.invoices import parse_invoice_number
from corvex_core.ledger import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    SESSION_PREFIX,
    email_taken,
    hash_secret,
)
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore, KeyRow, WorkspaceRow
from corvex_core.pg.customers import CheckoutRow
from corvex_core.records import KEY_LIMIT_FIELDS, KeyLimits
from corvex_core.reserved_cluster import ClusterEndpoints
from corvex_core.servicers import customers
from corvex_core.servicers.accounts import (
    _is_day,
    invoice_document,
    invoice_pb,
    key_pb,
    limits_from_pb,
    requested_starter_cents,
    usage_row_pb,
    workspace_pb,
)
from corvex_core.servicers.endpoints import ClusterEndpointRpcs
from corvex_core.state import ApiKey, AutoReload, Invoice, User

Context: TypeAlias = Any


def key_of(row: KeyRow, now: dt.datetime, last_used_ms: int = 0) -> ApiKey:
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
        last_used_ms=last_used_ms,
    )


class ClusterAccountsServicer(ClusterEndpointRpcs, accounts_pb2_grpc.AccountsServicer):
    def __init__(
        self,
        accounts: AccountStore,
        sync: AccountSync,
        link: Link,
        *,
        cluster_customers: ClusterCustomers,
        customers_config: CustomersConfig,
        starter_promotion_cents: int,
        starter_credits_cents: int,
        min_topup_cents: int,
        endpoints: ClusterEndpoints,
        create_wait_s: float,
        clock: db.Clock = db.utc_now,
    ) -> None:
        self._accounts = accounts
        self._endpoints = endpoints
        self._create_wait_s = create_wait_s
        self._sync = sync
        self._link = link
        self._customers = cluster_customers
        self._customers_config = customers_config
        self._starter_nano = starter_promotion_cents * NANO_PER_CENT
        self._starter_cents = starter_credits_cents
        self._min_topup_cents = min_topup_cents
        self._clock = clock

    async def CreateWorkspace(
        self, request: accounts_pb2.CreateWorkspaceRequest, context: Context
    ) -> accounts_pb2.Workspace:
        starter = requested_starter_cents(request, self._starter_cents)
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
        await self._alerts_changed(row.id)
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
        await self._alerts_changed(row.id)
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
            used = await self._customers.store.keys_last_used(request.workspace_id)
        return accounts_pb2.ListKeysResponse(
            keys=[key_pb(key_of(row, self._clock(), used.get(row.id, 0))) for row in rows]
        )

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
        return accounts_pb2.GetUsageResponse(rows=[usage_row_pb(r) for r in rows])

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
        return invoice_document(request.format, invoice, ws)

    # ---- the customers' calls (issue 16) ---------------------------------------------------
    # The single core's input rules and wire conversions (servicers/customers.py), over
    # PostgreSQL (pg/customers.py, cluster/customers.py).

    async def SignUp(
        self, request: accounts_pb2.SignUpRequest, context: Context
    ) -> accounts_pb2.SignInResponse:
        email, name = customers.check_sign_up(request)
        mirror.check_name(name)
        store = self._customers.store
        with db.purpose("accounts"), self._link.watching():
            taken = await store.user_by_email(email) is not None
        if taken:
            raise email_taken()
        password_hash = await asyncio.to_thread(passwords.hash_password, request.password)
        with db.purpose("accounts"), self._link.watching():
            user = await store.sign_up(
                "usr_" + secrets.token_hex(8), "ws_" + secrets.token_hex(8), email,
                password_hash, name,
            )  # fmt: skip
            await self._sync.refresh_workspace(user.workspace_ids[0])
        return await self._signed_in(user)

    async def SignIn(
        self, request: accounts_pb2.SignInRequest, context: Context
    ) -> accounts_pb2.SignInResponse:
        # The attempt limit is PostgreSQL's, so it holds across cores (not per core).
        email = customers.sign_in_email(request)
        limit = self._customers_config.sign_in_failures
        window_ms = int(self._customers_config.sign_in_window_s * 1000)
        store = self._customers.store
        with db.purpose("accounts"), self._link.watching():
            failures = await store.sign_in_failures(email, window_ms)
            access.check_sign_in(failures, limit, window_ms, store.now_ms())
            user = await store.user_by_email(email)
        ok = await asyncio.to_thread(
            passwords.verify_password,
            customers.sign_in_password(request),
            user.password_hash if user else None,
        )
        with db.purpose("accounts"), self._link.watching():
            if not ok or user is None:
                await store.sign_in_failed(email, window_ms, keep=limit)
                raise errors.InvalidCredentials("Wrong email or password.")
            await store.sign_in_succeeded(email)
        return await self._signed_in(user)

    async def _signed_in(self, user: User) -> accounts_pb2.SignInResponse:
        ttl_ms = int(self._customers_config.session_ttl_hours * 3_600_000)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        with db.purpose("accounts"), self._link.watching():
            session = await self._customers.store.start_session(
                "ses_" + secrets.token_hex(8), user.id, hash_secret(token), ttl_ms
            )
        return accounts_pb2.SignInResponse(
            user=customers.user_pb(user), session=customers.session_pb(session, token)
        )

    async def SignOut(
        self, request: accounts_pb2.SignOutRequest, context: Context
    ) -> accounts_pb2.SignOutResponse:
        session = access.current().session
        assert session is not None, "Access.USER: the interceptor resolved a session"
        with db.purpose("accounts"), self._link.watching():
            await self._customers.store.end_session(session.id)
        return accounts_pb2.SignOutResponse()

    async def WhoAmI(
        self, request: accounts_pb2.WhoAmIRequest, context: Context
    ) -> accounts_pb2.User:
        return customers.user_pb(await self._user())

    async def _user(self, user_id: str | None = None) -> User:
        user_id = user_id or access.current().user_id
        assert user_id is not None, "Access.USER: the interceptor resolved a session"
        with db.purpose("accounts"), self._link.watching():
            return await self._customers.store.user(user_id)

    async def GetStarterOffer(
        self, request: accounts_pb2.GetStarterOfferRequest, context: Context
    ) -> accounts_pb2.StarterOffer:
        row = await self._workspace(request.workspace_id)
        user = await self._user(row.owner_user_id) if row.owner_user_id else None
        return self._offer(user)

    async def ClaimStarterCredits(
        self, request: accounts_pb2.ClaimStarterCreditsRequest, context: Context
    ) -> accounts_pb2.AddCreditsResponse:
        offer = self._offer(await self._user())
        if not offer.claimable:
            raise errors.StarterCreditsUnavailable(offer.reason)
        user_id = access.current().user_id
        assert user_id is not None
        with db.purpose("accounts"), self._link.watching():
            invoice = await self._customers.store.claim_starter(
                user_id, request.workspace_id, offer.amount_nano_usd
            )
        return await self._credited(invoice, replayed=False)

    def _offer(self, user: User | None) -> accounts_pb2.StarterOffer:
        now_ms = ms(self._clock())
        return customers.starter_offer(
            self._customers_config.starter, self._starter_nano, user, now_ms=now_ms
        )

    async def StartCheckout(
        self, request: accounts_pb2.StartCheckoutRequest, context: Context
    ) -> accounts_pb2.Checkout:
        self._check_topup(request.amount_cents, "amount_cents")
        checkouts = self._customers.checkouts
        checkout = await checkouts.start(
            request.workspace_id, customers.checkout_amount_nano(request), request.idempotency_key
        )
        return self._checkout_pb(checkout)

    async def GetCheckout(
        self, request: accounts_pb2.GetCheckoutRequest, context: Context
    ) -> accounts_pb2.Checkout:
        checkouts = self._customers.checkouts
        return self._checkout_pb(
            await checkouts.get(request.workspace_id, request.checkout_id[:100])
        )

    async def CompleteCheckout(
        self, request: accounts_pb2.CompleteCheckoutRequest, context: Context
    ) -> accounts_pb2.AddCreditsResponse:
        invoice, replayed = await self._customers.checkouts.complete(
            request.workspace_id, request.checkout_id[:100]
        )
        return await self._credited(invoice, replayed=replayed)

    def _checkout_pb(self, checkout: CheckoutRow) -> accounts_pb2.Checkout:
        return customers.checkout_pb(
            checkout.id,
            checkout.workspace_id,
            checkout.amount_nano,
            self._customers.checkouts.provider_name,
            checkout.approve_url,
            checkout.invoice,
        )

    async def _credited(
        self, invoice: Invoice, *, replayed: bool
    ) -> accounts_pb2.AddCreditsResponse:
        row = await self._workspace(invoice.workspace_id)
        await self._alerts_changed(row.id)
        return accounts_pb2.AddCreditsResponse(
            invoice=invoice_pb(invoice), workspace=self._workspace_pb(row), replayed=replayed
        )

    async def _alerts_changed(self, workspace_id: str) -> None:
        """After a change made here that can start or end an alert: a workspace with a
        webhook has its alerts looked at at once (the banner is read from the row anyway)."""
        if self._sync.has_webhook(workspace_id):
            await self._customers.alerts.check_now(workspace_id)

    async def GetAlerts(
        self, request: accounts_pb2.GetAlertsRequest, context: Context
    ) -> accounts_pb2.AlertSettings:
        with db.purpose("accounts"), self._link.watching():
            row = await self._customers.store.alerts(request.workspace_id)
        ws = workspace_of(row.workspace, self._clock())
        return customers.alerts_pb(ws, row.delivery_error)

    async def SetAlerts(
        self, request: accounts_pb2.SetAlertsRequest, context: Context
    ) -> accounts_pb2.AlertSettings:
        store = self._customers.store
        with db.purpose("accounts"), self._link.watching():
            current = await store.alerts(request.workspace_id)
            settings = customers.new_alerts(request, current.workspace.alerts)
            await store.set_alerts(request.workspace_id, settings)
        await self._sync.refresh_workspace(request.workspace_id)
        await self._customers.alerts.check_now(request.workspace_id)  # set: even without one
        return await self.GetAlerts(
            accounts_pb2.GetAlertsRequest(workspace_id=request.workspace_id), context
        )

    async def ListRecentRequests(
        self, request: accounts_pb2.ListRecentRequestsRequest, context: Context
    ) -> accounts_pb2.ListRecentRequestsResponse:
        limit = customers.recent_limit(request)
        with db.purpose("accounts"), self._link.watching():
            await self._accounts.workspace(request.workspace_id)
            if request.key_id:
                key = await self._accounts.key(request.key_id)
                if key.workspace_id != request.workspace_id:
                    raise errors.NotFound(
                        f"Key {request.key_id} is not a key of {request.workspace_id}."
                    )
        entries = await self._customers.activity.recent_requests(
            request.workspace_id, key_id=request.key_id, limit=limit
        )
        return customers.recent_pb(entries)

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
