"""The customers' calls of the Accounts service (issue 16), wire → domain → wire: sign-up,
sign-in and sign-out, the starter claim, checkout, alerts and the recent-request log.

Who may make each call is declared in `ACCESS` and enforced by the interceptor before any of
these methods runs (corvex_core.access); the methods only read the principal it resolved.
Password hashing runs off the event loop; every change is durable before the call returns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Iterable
from typing import Any, Final, TypeAlias

from google.protobuf import timestamp_pb2

from corvex.money import NANO_PER_CENT
from corvex.v1 import accounts_pb2
from corvex_core import access, alerts, errors, passwords
from corvex_core.access import Access, SignInThrottle
from corvex_core.activity import Activity, RecentRequest
from corvex_core.alerts import Alerter
from corvex_core.config import CustomersConfig, StarterPromotionConfig
from corvex_core.ledger import (
    Ledger,
    check_email,
    check_webhook_url,
    email_taken,
    normalize_email,
)
from corvex_core.ledger import (
    _check_amount as check_amount,
)
from corvex_core.lifecycle import CallKind
from corvex_core.payments import Checkout, Checkouts
from corvex_core.state import Alerts, Invoice, Session, User, Workspace

Context: TypeAlias = Any

CALL_KINDS: Final = {
    "SignUp": CallKind.WRITE,
    "SignIn": CallKind.WRITE,
    "SignOut": CallKind.WRITE,
    "WhoAmI": CallKind.READ,
    "GetStarterOffer": CallKind.READ,
    "ClaimStarterCredits": CallKind.WRITE,
    "StartCheckout": CallKind.WRITE,
    "GetCheckout": CallKind.READ,
    "CompleteCheckout": CallKind.WRITE,
    "GetAlerts": CallKind.READ,
    "SetAlerts": CallKind.WRITE,
    "ListRecentRequests": CallKind.READ,
}
ACCESS: Final = {
    "SignUp": Access.PUBLIC,
    "SignIn": Access.PUBLIC,
    "SignOut": Access.USER,
    "WhoAmI": Access.USER,
    "GetStarterOffer": Access.OWNER,
    "ClaimStarterCredits": Access.USER,
    "StartCheckout": Access.OWNER,
    "GetCheckout": Access.OWNER,
    "CompleteCheckout": Access.OWNER,
    "GetAlerts": Access.OWNER,
    "SetAlerts": Access.OWNER,
    "ListRecentRequests": Access.OWNER,
}
MIN_PASSWORD_CHARS: Final = 10
MAX_PASSWORD_CHARS: Final = 200
MAX_RECENT: Final = 200
DEFAULT_RECENT: Final = 50
_MAX_IDEMPOTENCY_KEY_CHARS: Final = 200


class CustomerCalls:
    """Mixed into the Accounts servicer, which sets these attributes."""

    _ledger: Ledger
    _customers: CustomersConfig
    _throttle: SignInThrottle
    _checkouts: Checkouts
    _alerter: Alerter
    _activity: Activity
    _min_topup_cents: int
    _starter_nano: int

    async def _sync(self) -> None:
        raise NotImplementedError

    def _check_topup(self, cents: int, param: str) -> None:
        raise NotImplementedError

    def _credited(self, invoice: Invoice, *, replayed: bool) -> accounts_pb2.AddCreditsResponse:
        raise NotImplementedError

    # ---- users and sessions --------------------------------------------------------------

    async def SignUp(
        self, request: accounts_pb2.SignUpRequest, context: Context
    ) -> accounts_pb2.SignInResponse:
        email, name = check_sign_up(request)
        if self._ledger.user_by_email(email) is not None:
            raise email_taken()
        password_hash = await asyncio.to_thread(passwords.hash_password, request.password)
        user = self._ledger.sign_up(email, password_hash, name)
        return await self._signed_in(user)

    async def SignIn(
        self, request: accounts_pb2.SignInRequest, context: Context
    ) -> accounts_pb2.SignInResponse:
        email = sign_in_email(request)
        now = self._ledger.now_ms()
        self._throttle.check(email, now)
        user = self._ledger.user_by_email(email)
        ok = await asyncio.to_thread(
            passwords.verify_password,
            sign_in_password(request),
            user.password_hash if user else None,
        )
        if not ok or user is None:
            self._throttle.failed(email, now)
            raise errors.InvalidCredentials("Wrong email or password.")
        self._throttle.succeeded(email)
        return await self._signed_in(user)

    async def _signed_in(self, user: User) -> accounts_pb2.SignInResponse:
        ttl_ms = int(self._customers.session_ttl_hours * 3_600_000)
        session, token = self._ledger.start_session(user.id, ttl_ms)
        await self._sync()
        return accounts_pb2.SignInResponse(user=user_pb(user), session=session_pb(session, token))

    async def SignOut(
        self, request: accounts_pb2.SignOutRequest, context: Context
    ) -> accounts_pb2.SignOutResponse:
        session = access.current().session
        assert session is not None, "Access.USER: the interceptor resolved a session"
        self._ledger.end_session(session.id)
        await self._sync()
        return accounts_pb2.SignOutResponse()

    async def WhoAmI(
        self, request: accounts_pb2.WhoAmIRequest, context: Context
    ) -> accounts_pb2.User:
        return user_pb(self._ledger.user(self._user_id()))

    def _user_id(self) -> str:
        user_id = access.current().user_id
        assert user_id is not None, "Access.USER: the interceptor resolved a session"
        return user_id

    # ---- the starter claim ---------------------------------------------------------------

    async def GetStarterOffer(
        self, request: accounts_pb2.GetStarterOfferRequest, context: Context
    ) -> accounts_pb2.StarterOffer:
        ws = self._ledger.workspace(request.workspace_id)
        user = self._ledger.user(ws.owner_user_id) if ws.owner_user_id else None
        return self._offer(user)

    async def ClaimStarterCredits(
        self, request: accounts_pb2.ClaimStarterCreditsRequest, context: Context
    ) -> accounts_pb2.AddCreditsResponse:
        user = self._ledger.user(self._user_id())
        offer = self._offer(user)
        if not offer.claimable:
            raise errors.StarterCreditsUnavailable(offer.reason)
        invoice = self._ledger.claim_starter(user.id, request.workspace_id, offer.amount_nano_usd)
        await self._sync()
        return self._credited(invoice, replayed=False)

    def _offer(self, user: User | None) -> accounts_pb2.StarterOffer:
        return starter_offer(
            self._customers.starter, self._starter_nano, user, now_ms=self._ledger.now_ms()
        )

    # ---- buying credits ------------------------------------------------------------------

    async def StartCheckout(
        self, request: accounts_pb2.StartCheckoutRequest, context: Context
    ) -> accounts_pb2.Checkout:
        self._check_topup(request.amount_cents, "amount_cents")
        checkout = await self._checkouts.start(
            request.workspace_id, checkout_amount_nano(request), request.idempotency_key
        )
        return self._checkout_pb(checkout)

    async def GetCheckout(
        self, request: accounts_pb2.GetCheckoutRequest, context: Context
    ) -> accounts_pb2.Checkout:
        return self._checkout_pb(
            self._checkouts.get(request.workspace_id, request.checkout_id[:100])
        )

    async def CompleteCheckout(
        self, request: accounts_pb2.CompleteCheckoutRequest, context: Context
    ) -> accounts_pb2.AddCreditsResponse:
        invoice, replayed = await self._checkouts.complete(
            request.workspace_id, request.checkout_id[:100]
        )
        self._alerter.check(request.workspace_id)
        return self._credited(invoice, replayed=replayed)

    def _checkout_pb(self, checkout: Checkout) -> accounts_pb2.Checkout:
        return checkout_pb(
            checkout.id,
            checkout.workspace_id,
            checkout.amount_nano,
            self._checkouts.provider_name,
            checkout.provider.approve_url,
            checkout.invoice,
        )

    # ---- alerts and the request log ------------------------------------------------------

    async def GetAlerts(
        self, request: accounts_pb2.GetAlertsRequest, context: Context
    ) -> accounts_pb2.AlertSettings:
        return self._alerts_pb(self._ledger.workspace(request.workspace_id))

    async def SetAlerts(
        self, request: accounts_pb2.SetAlertsRequest, context: Context
    ) -> accounts_pb2.AlertSettings:
        ws = self._ledger.workspace(request.workspace_id)
        ws = self._ledger.set_alerts(ws.id, new_alerts(request, ws.alerts))
        await self._sync()
        self._alerter.check(ws.id)
        return self._alerts_pb(ws)

    def _alerts_pb(self, ws: Workspace) -> accounts_pb2.AlertSettings:
        return alerts_pb(ws, self._alerter.last_error(ws.id))

    async def ListRecentRequests(
        self, request: accounts_pb2.ListRecentRequestsRequest, context: Context
    ) -> accounts_pb2.ListRecentRequestsResponse:
        ws = self._ledger.workspace(request.workspace_id)
        if request.key_id and self._ledger.key(request.key_id).workspace_id != ws.id:
            raise errors.NotFound(f"Key {request.key_id} is not a key of {ws.id}.")
        entries = self._activity.recent(ws.id, key_id=request.key_id, limit=recent_limit(request))
        return recent_pb(entries)


# ---- what the single core and the cluster share: input rules and wire conversion ----------


def check_sign_up(request: accounts_pb2.SignUpRequest) -> tuple[str, str]:
    """The email as stored and the workspace name of a sign-up, or InvalidRequest."""
    email = check_email(request.email)
    if not MIN_PASSWORD_CHARS <= len(request.password) <= MAX_PASSWORD_CHARS:
        raise errors.InvalidRequest(
            f"The password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters.",
            param="password",
        )
    return email, request.workspace_name.strip() or "Default"


def sign_in_email(request: accounts_pb2.SignInRequest) -> str:
    return normalize_email(request.email)[:300]


def sign_in_password(request: accounts_pb2.SignInRequest) -> str:
    return request.password[: MAX_PASSWORD_CHARS + 1]


def starter_offer(
    starter: StarterPromotionConfig, amount: int, user: User | None, *, now_ms: int
) -> accounts_pb2.StarterOffer:
    """The starter offer of a user (None: a workspace an operator made) at `now_ms`."""
    offer = accounts_pb2.StarterOffer(amount_nano_usd=amount, ends=starter.ends)
    today = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()
    if user is None:
        offer.reason = "Starter credits are for accounts that signed up themselves."
    elif user.starter_invoice:
        offer.claimed = True
        offer.invoice_number = f"INV-{user.starter_invoice:06d}"
        offer.reason = (
            f"Starter credits were claimed already (invoice {offer.invoice_number}); "
            "they are given once per account."
        )
    elif not starter.enabled or amount == 0:
        offer.reason = "No starter-credit promotion runs now."
    elif starter.ends and today > dt.date.fromisoformat(starter.ends):
        offer.reason = f"The starter-credit promotion ended on {starter.ends}."
    else:
        offer.claimable = True
    return offer


def checkout_amount_nano(request: accounts_pb2.StartCheckoutRequest) -> int:
    """The amount of a checkout (the smallest top-up is the servicer's to check)."""
    if request.amount_cents * NANO_PER_CENT > 10**18:
        raise errors.InvalidRequest("That amount is too large.", param="amount_cents")
    if not 1 <= len(request.idempotency_key) <= _MAX_IDEMPOTENCY_KEY_CHARS:
        raise errors.InvalidRequest(
            f"idempotency_key must be 1 to {_MAX_IDEMPOTENCY_KEY_CHARS} characters",
            param="idempotency_key",
        )
    return request.amount_cents * NANO_PER_CENT


def checkout_pb(
    checkout_id: str,
    workspace_id: str,
    amount_nano: int,
    provider: str,
    approve_url: str,
    invoice: Invoice | None,
) -> accounts_pb2.Checkout:
    return accounts_pb2.Checkout(
        id=checkout_id,
        workspace_id=workspace_id,
        amount_nano_usd=amount_nano,
        provider=provider,
        approve_url=approve_url,
        completed=invoice is not None,
        invoice_number=invoice.label if invoice else "",
    )


def new_alerts(request: accounts_pb2.SetAlertsRequest, current: Alerts) -> Alerts:
    """The settings a SetAlerts asks for, checked; a new webhook secret when asked or when a
    URL first gets one, none without a URL."""
    below = None
    if request.HasField("balance_below_cents"):
        if request.balance_below_cents < 0:
            raise errors.InvalidRequest(
                "balance_below_cents must not be negative", param="balance_below_cents"
            )
        below = request.balance_below_cents * NANO_PER_CENT
        check_amount(below, allow_zero=True)
    url = request.webhook_url.strip()
    check_webhook_url(url)
    secret = current.webhook_secret
    if not url:
        secret = ""
    elif request.rotate_secret or not secret:
        secret = "whsec_" + secrets.token_urlsafe(24)
    return Alerts(below, url, secret)


def alerts_pb(ws: Workspace, last_error: str) -> accounts_pb2.AlertSettings:
    """A workspace's alert settings and the alerts in force (from its money as given)."""
    return accounts_pb2.AlertSettings(
        workspace_id=ws.id,
        balance_below_nano_usd=ws.alerts.balance_below_nano,
        webhook_url=ws.alerts.webhook_url,
        webhook_secret=ws.alerts.webhook_secret,
        active=[accounts_pb2.Alert(kind=a.kind, message=a.message) for a in alerts.active(ws)],
        last_delivery_error=last_error,
    )


def recent_limit(request: accounts_pb2.ListRecentRequestsRequest) -> int:
    if request.limit > MAX_RECENT:
        raise errors.InvalidRequest(f"limit must be at most {MAX_RECENT}", param="limit")
    return request.limit or DEFAULT_RECENT


def recent_pb(entries: Iterable[RecentRequest]) -> accounts_pb2.ListRecentRequestsResponse:
    return accounts_pb2.ListRecentRequestsResponse(
        requests=[
            accounts_pb2.RecentRequest(
                request_id=e.request_id,
                at=timestamp(e.at_ms),
                key_id=e.key_id,
                model=e.model,
                rpc=e.rpc,
                status=e.status,
                prompt_tokens=e.prompt_tokens,
                completion_tokens=e.completion_tokens,
                cost_nano_usd=e.cost_nano,
            )
            for e in entries
        ]
    )


def timestamp(at_ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(at_ms)
    return ts


def user_pb(user: User) -> accounts_pb2.User:
    return accounts_pb2.User(
        id=user.id,
        email=user.email,
        created=timestamp(user.created_ms),
        workspace_ids=user.workspace_ids,
        starter_claimed=bool(user.starter_invoice),
    )


def session_pb(session: Session, token: str) -> accounts_pb2.Session:
    return accounts_pb2.Session(id=session.id, token=token, expires=timestamp(session.expires_ms))
