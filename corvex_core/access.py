"""Who may call what on the Accounts service: principals, the access rule of each call, and
the one authorization function that every call passes before its servicer method runs.

A caller is a principal: the operator (the admin token) or a user (a live session). The admin
reaches everything. A user reaches only the workspaces it owns, and the keys, invoices and
reserved endpoints of those; anything else is NOT_FOUND with the very message an unknown id
gets, so a session learns nothing about other workspaces, not even that they exist. A call
whose request names no resource this module knows is refused to users (deny by default): a
new RPC is reachable by sessions only once its resources are named here. It never sees the
wire: the interceptor hands it the resource ids it read from the request.
"""

from __future__ import annotations

import collections
import contextvars
import enum
import hmac
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from corvex.quoting import quote
from corvex_core import errors
from corvex_core.invoices import parse_invoice_number
from corvex_core.ledger import SESSION_PREFIX, Ledger
from corvex_core.state import Session


class Access(enum.Enum):
    """The access rule of one call."""

    PUBLIC = "public"  # no credential (SignUp, SignIn)
    ADMIN = "admin"  # the operator only (CreateWorkspace, ListWorkspaces)
    OWNER = "owner"  # the operator, or a user owning every resource the request names
    USER = "user"  # a user's session only, owning what it names (SignOut, claims)


class Resource(enum.Enum):
    """What a request field names. The interceptor maps field names to these."""

    WORKSPACE = "workspace"
    KEY = "key"
    INVOICE = "invoice"
    ENDPOINT = "endpoint"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one call. `session` is None for the admin and for public calls."""

    admin: bool
    session: Session | None = None

    @property
    def user_id(self) -> str | None:
        return self.session.user_id if self.session is not None else None


ANONYMOUS: Final = Principal(admin=False)
ADMIN: Final = Principal(admin=True)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "corvex_principal", default=ANONYMOUS
)


def current() -> Principal:
    """The principal of the Accounts call this task serves (set by the interceptor)."""
    return _current.get()


def set_current(principal: Principal) -> None:
    _current.set(principal)


class Directory(Protocol):
    """Where the access rules read who is who: a single core's ledger (`LedgerDirectory`) or,
    in a cluster, PostgreSQL (cluster/customers.py). The rules themselves are this module's."""

    async def session(self, token: str) -> Session:
        """The live session with this token; InvalidSession for anything else."""
        ...

    async def owned_workspaces(self, user_id: str) -> Collection[str]:
        """The workspaces the user owns."""
        ...

    async def workspace_of(self, kind: Resource, resource_id: str) -> str | None:
        """The workspace a resource belongs to; None if there is no such resource."""
        ...


class LedgerDirectory:
    """A single core's directory: its in-memory ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def session(self, token: str) -> Session:
        return self._ledger.session(token)

    async def owned_workspaces(self, user_id: str) -> Collection[str]:
        return self._ledger.user(user_id).workspace_ids

    async def workspace_of(self, kind: Resource, resource_id: str) -> str | None:
        ledger = self._ledger
        try:
            if kind is Resource.WORKSPACE:
                return ledger.workspace(resource_id).id
            if kind is Resource.KEY:
                return ledger.key(resource_id).workspace_id
            if kind is Resource.ENDPOINT:
                return ledger.endpoint(resource_id).workspace_id
            return ledger.invoice(parse_invoice_number(resource_id)).workspace_id
        except errors.NotFound:
            return None


async def resolve(
    directory: Directory, secret: str | None, admin_token: str, access: Access
) -> Principal:
    """The principal behind `authorization: Bearer <secret>`, for a call with this rule.

    Raises InvalidAdminToken (no credential, or a wrong admin token) or InvalidSession (a
    session token that is unknown, expired or signed out)."""
    if access is Access.PUBLIC:
        return ANONYMOUS
    supplied = secret or ""
    if hmac.compare_digest(supplied.encode(), admin_token.encode()):
        return ADMIN
    if supplied.startswith(SESSION_PREFIX) and access is not Access.ADMIN:
        return Principal(admin=False, session=await directory.session(supplied))
    if access is Access.USER and not supplied:
        raise errors.InvalidSession("This call needs a signed-in user's session.")
    raise errors.InvalidAdminToken(
        "The admin credential is missing or wrong. Send it as `authorization: Bearer "
        "<admin token>` (see core.admin_token)"
        + ("." if access is Access.ADMIN else ", or a signed-in user's session.")
    )


async def authorize(
    directory: Directory,
    principal: Principal,
    access: Access,
    resources: Mapping[Resource, str],
) -> None:
    """Raises unless `principal` may make a call with rule `access` on `resources` (the ids
    the request names, empty ones left out). The one authorization check of every call."""
    if access is Access.PUBLIC:
        return
    if access is Access.USER and principal.session is None:
        raise errors.InvalidSession("This call needs a signed-in user's session, not the admin's.")
    if principal.admin:
        return
    user_id = principal.user_id
    if user_id is None or access is Access.ADMIN:
        raise errors.InvalidAdminToken("This call needs the admin credential.")
    if access is Access.OWNER and not resources:
        raise errors.InvalidAdminToken("This call needs the admin credential.")
    owned = await directory.owned_workspaces(user_id)
    for kind, resource_id in resources.items():
        if kind is Resource.INVOICE:
            parse_invoice_number(resource_id)  # a malformed number says so, to anyone
        workspace_id = await directory.workspace_of(kind, resource_id)
        if workspace_id is None or workspace_id not in owned:
            raise _not_found(kind, resource_id)


def _not_found(kind: Resource, resource_id: str) -> errors.NotFound:
    """What an unknown id of this kind gets from the ledger, word for word."""
    if kind is Resource.WORKSPACE:
        return errors.NotFound(f"No workspace {resource_id}.")
    if kind is Resource.KEY:
        return errors.NotFound(f"No API key {resource_id}.")
    if kind is Resource.ENDPOINT:
        return errors.NotFound(f"No reserved endpoint {quote(resource_id)}.")
    return errors.NotFound(f"No invoice INV-{parse_invoice_number(resource_id):06d}.")


def check_sign_in(
    failures_ms: Sequence[int], max_failures: int, window_ms: int, now_ms: int
) -> None:
    """The attempt limit: RATE_LIMIT_EXCEEDED once an email has `max_failures` failed
    sign-ins (their times, oldest first, all within the window) until the oldest leaves it."""
    if len(failures_ms) >= max_failures:
        wait_s = (failures_ms[-max_failures] + window_ms - now_ms) / 1000
        raise errors.RateLimitExceeded(
            "Too many failed sign-ins for this email; wait and try again.",
            metadata={"limit": "sign_in"},
            retry_after_s=max(wait_s, 1.0),
        )


class SignInThrottle:
    """Failed sign-ins per email in a sliding window. Beyond the limit, sign-in for that email
    waits (RATE_LIMIT_EXCEEDED with a retry time) whatever the password: guessing is slowed to
    `max_failures` per window. Bounded: at most MAX_EMAILS emails are tracked."""

    MAX_EMAILS: Final = 100_000

    def __init__(self, *, max_failures: int, window_ms: int) -> None:
        assert max_failures >= 1 and window_ms >= 1
        self._max = max_failures
        self._window_ms = window_ms
        self._failures: dict[str, collections.deque[int]] = {}

    def check(self, email: str, now_ms: int) -> None:
        check_sign_in(self._recent(email, now_ms) or (), self._max, self._window_ms, now_ms)

    def failed(self, email: str, now_ms: int) -> None:
        failures = self._recent(email, now_ms)
        if failures is None:
            if len(self._failures) >= self.MAX_EMAILS:
                self._sweep(now_ms)
            failures = self._failures[email] = collections.deque(maxlen=self._max)
        failures.append(now_ms)

    def succeeded(self, email: str) -> None:
        self._failures.pop(email, None)

    def _recent(self, email: str, now_ms: int) -> collections.deque[int] | None:
        failures = self._failures.get(email)
        while failures and failures[0] <= now_ms - self._window_ms:
            failures.popleft()
        return failures

    def _sweep(self, now_ms: int) -> None:
        for email in list(self._failures):
            if not self._recent(email, now_ms):
                del self._failures[email]
        while len(self._failures) >= self.MAX_EMAILS:  # all recent: drop the oldest emails
            del self._failures[next(iter(self._failures))]
