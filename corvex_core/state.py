"""The ledger's durable state, and the one way it changes: applying a journal record.

What a snapshot holds and recovery rebuilds: workspaces (balance, cap, month spend, auto-reload),
keys, invoices, idempotency keys, usage totals, and reserved endpoints with their billing.
`apply` is a pure state transition, the same live and during recovery; it asserts the money
invariants of every workspace (and endpoint) it touches. It knows nothing of holds, validation
or the journal: that is the ledger's.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any

import msgspec

from corvex_core.records import (
    AlertsSet,
    AutoReloadFailed,
    AutoReloadSet,
    Charged,
    CreditsAdded,
    EndpointCreated,
    EndpointDeleted,
    EndpointPeriodCharged,
    EndpointResized,
    EndpointResumed,
    EndpointSuspended,
    KeyCreated,
    KeyLimits,
    KeyLimitsSet,
    KeyRevoked,
    Record,
    SessionEnded,
    SessionStarted,
    SpendCapSet,
    StarterClaimed,
    SuspendedBy,
    TopUpMethod,
    UserSignedUp,
    WorkspaceCreated,
)


def month_of(at_ms: int) -> str:
    """The UTC calendar month of a time, "YYYY-MM"."""
    tm = time.gmtime(at_ms // 1000)
    return f"{tm.tm_year:04d}-{tm.tm_mon:02d}"


def day_of(at_ms: int) -> str:
    """The UTC day of a time, "YYYY-MM-DD"."""
    tm = time.gmtime(at_ms // 1000)
    return f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}"


class AutoReload(msgspec.Struct):
    threshold_nano: int
    amount_nano: int


class Alerts(msgspec.Struct, frozen=True):
    """A workspace's alert settings (see corvex_core.alerts)."""

    balance_below_nano: int | None = None
    webhook_url: str = ""
    webhook_secret: str = ""


class Workspace(msgspec.Struct):
    """A workspace's durable money state plus `held_nano`, the in-memory sum of its holds."""

    id: str
    name: str
    created_ms: int
    balance_nano: int = 0
    spend_cap_nano: int | None = None
    # Spend of `month` ("YYYY-MM"); a new month starts at zero (see `_roll_month`).
    month: str = ""
    month_spend_nano: int = 0
    auto_reload: AutoReload | None = None
    auto_reload_error: str = ""
    key_ids: list[str] = msgspec.field(default_factory=list)
    invoice_numbers: list[int] = msgspec.field(default_factory=list)
    held_nano: int = 0
    # The user who signed up with it; "" for a workspace an operator made.
    owner_user_id: str = ""
    alerts: Alerts = Alerts()

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.held_nano


class ApiKey(msgspec.Struct):
    id: str
    workspace_id: str
    name: str
    prefix: str
    secret_sha256: bytes
    created_ms: int
    limits: KeyLimits = KeyLimits()
    revoked: bool = False
    # Tokens charged in `month` ("YYYY-MM"), for the monthly token limit.
    month: str = ""
    month_tokens: int = 0
    # When it last authenticated a request: set in memory on every request (no record), and
    # from its charges when the journal is replayed. 0: never.
    last_used_ms: int = 0


class Invoice(msgspec.Struct, frozen=True):
    number: int
    workspace_id: str
    created_ms: int
    amount_nano: int
    method: TopUpMethod
    balance_after_nano: int
    idempotency_key: str

    @property
    def label(self) -> str:
        return f"INV-{self.number:06d}"


class UsageTotals(msgspec.Struct):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano: int = 0


class EndpointStatus(enum.StrEnum):
    """The durable part of a reserved endpoint's life (running or starting is the core's)."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    DELETED = "deleted"


class Endpoint(msgspec.Struct):
    """A reserved endpoint: what it rents, and how far it is billed."""

    id: str
    workspace_id: str
    name: str
    model_id: str
    offering_id: str
    base_model: str
    replicas: int
    created_ms: int
    status: EndpointStatus = EndpointStatus.ACTIVE
    suspended_by: SuspendedBy | None = None
    # The last period charged (0: none yet) and where it ends.
    period: int = 0
    paid_until_ms: int = 0
    charged_nano: int = 0


class EndpointUsage(msgspec.Struct):
    replica_s: int = 0
    cost_nano: int = 0


class User(msgspec.Struct):
    id: str
    email: str
    password_hash: str
    created_ms: int
    workspace_ids: list[str] = msgspec.field(default_factory=list)
    # The invoice of the starter claim; 0: not claimed.
    starter_invoice: int = 0
    # Its sessions, oldest first (at most ledger.MAX_SESSIONS_PER_USER live ones).
    session_ids: list[str] = msgspec.field(default_factory=list)


class Session(msgspec.Struct, frozen=True):
    id: str
    user_id: str
    token_sha256: bytes
    created_ms: int
    expires_ms: int


class LedgerState(msgspec.Struct):
    """Everything durable: what a snapshot holds. Holds are not part of it."""

    workspaces: dict[str, Workspace] = msgspec.field(default_factory=dict)
    keys: dict[str, ApiKey] = msgspec.field(default_factory=dict)
    invoices: dict[int, Invoice] = msgspec.field(default_factory=dict)
    # (workspace id, idempotency key) → invoice number.
    idempotency: dict[str, int] = msgspec.field(default_factory=dict)
    # workspace id → "day|key id|model" → totals.
    usage: dict[str, dict[str, UsageTotals]] = msgspec.field(default_factory=dict)
    next_invoice: int = 1
    charges: int = 0
    # Reserved endpoints by id, in creation order, and their replica time:
    # workspace id → "day|endpoint id" → totals.
    endpoints: dict[str, Endpoint] = msgspec.field(default_factory=dict)
    endpoint_usage: dict[str, dict[str, EndpointUsage]] = msgspec.field(default_factory=dict)
    # Customers (issue 16): user id → user, email → user id, session id → session.
    users: dict[str, User] = msgspec.field(default_factory=dict)
    user_by_email: dict[str, str] = msgspec.field(default_factory=dict)
    sessions: dict[str, Session] = msgspec.field(default_factory=dict)


def idempotency_slot(workspace_id: str, key: str) -> str:
    """Where `LedgerState.idempotency` keeps a workspace's idempotency key."""
    return f"{workspace_id}\x00{key}"


def roll_month(ws: Workspace, at_ms: int) -> None:
    """Starts a new month's spend at zero when the calendar month (UTC) has changed."""
    month = month_of(at_ms)
    if month > ws.month:
        ws.month = month
        ws.month_spend_nano = 0


def roll_key_month(key: ApiKey, at_ms: int) -> None:
    month = month_of(at_ms)
    if month > key.month:
        key.month = month
        key.month_tokens = 0


def check(ws: Workspace) -> None:
    """The invariants of DESIGN.md principle 4. A failure here is a bug, never user error."""
    assert ws.balance_nano >= 0, f"{ws.id}: balance below zero"
    assert ws.held_nano >= 0, f"{ws.id}: negative holds"
    assert ws.held_nano <= ws.balance_nano, f"{ws.id}: holds exceed the balance"
    assert ws.month_spend_nano >= 0, f"{ws.id}: negative spend"


def apply(state: LedgerState, record: Record) -> None:
    """Applies one journal record to the state and checks the workspace it touched."""
    _APPLY[type(record)](state, record)
    workspace_id = getattr(record, "workspace_id", None)
    if workspace_id is not None:
        check(state.workspaces[workspace_id])


def _charged(state: LedgerState, record: Charged) -> None:
    ws = state.workspaces[record.workspace_id]
    roll_month(ws, record.at_ms)
    assert record.cost_nano <= ws.balance_nano, "a charge would overdraw"
    ws.balance_nano -= record.cost_nano
    ws.month_spend_nano += record.cost_nano
    key = state.keys[record.key_id]
    roll_key_month(key, record.at_ms)
    key.month_tokens += record.prompt_tokens + record.completion_tokens
    key.last_used_ms = max(key.last_used_ms, record.at_ms)
    bucket = f"{day_of(record.at_ms)}|{record.key_id}|{record.model}"
    totals = state.usage.setdefault(ws.id, {}).setdefault(bucket, UsageTotals())
    totals.requests += 1
    totals.prompt_tokens += record.prompt_tokens
    totals.completion_tokens += record.completion_tokens
    totals.cost_nano += record.cost_nano
    state.charges += 1


def _credits_added(state: LedgerState, record: CreditsAdded) -> None:
    _credit(state, record.at_ms, record.workspace_id, record.invoice_number, record.amount_nano,
            record.method, record.idempotency_key)  # fmt: skip


def _credit(
    state: LedgerState,
    at_ms: int,
    workspace_id: str,
    number: int,
    amount_nano: int,
    method: TopUpMethod,
    idempotency_key: str,
) -> None:
    """A top-up and its invoice (CreditsAdded and StarterClaimed)."""
    ws = state.workspaces[workspace_id]
    ws.balance_nano += amount_nano
    assert number == state.next_invoice, "invoice numbers have a gap"
    state.invoices[number] = Invoice(
        number=number,
        workspace_id=ws.id,
        created_ms=at_ms,
        amount_nano=amount_nano,
        method=method,
        balance_after_nano=ws.balance_nano,
        idempotency_key=idempotency_key,
    )
    state.next_invoice += 1
    state.idempotency[idempotency_slot(ws.id, idempotency_key)] = number
    ws.invoice_numbers.append(number)
    if method is TopUpMethod.AUTO_RELOAD:
        ws.auto_reload_error = ""


def _workspace_created(state: LedgerState, record: WorkspaceCreated) -> None:
    assert record.workspace_id not in state.workspaces
    state.workspaces[record.workspace_id] = Workspace(
        id=record.workspace_id, name=record.name, created_ms=record.at_ms
    )


def _spend_cap_set(state: LedgerState, record: SpendCapSet) -> None:
    state.workspaces[record.workspace_id].spend_cap_nano = record.cap_nano


def _auto_reload_set(state: LedgerState, record: AutoReloadSet) -> None:
    ws = state.workspaces[record.workspace_id]
    enabled = record.enabled
    ws.auto_reload = AutoReload(record.threshold_nano, record.amount_nano) if enabled else None
    ws.auto_reload_error = ""


def _auto_reload_failed(state: LedgerState, record: AutoReloadFailed) -> None:
    state.workspaces[record.workspace_id].auto_reload_error = record.error


def _key_created(state: LedgerState, record: KeyCreated) -> None:
    assert record.key_id not in state.keys
    state.keys[record.key_id] = ApiKey(
        id=record.key_id,
        workspace_id=record.workspace_id,
        name=record.name,
        prefix=record.prefix,
        secret_sha256=record.secret_sha256,
        created_ms=record.at_ms,
        limits=record.limits,
    )
    state.workspaces[record.workspace_id].key_ids.append(record.key_id)


def _key_revoked(state: LedgerState, record: KeyRevoked) -> None:
    state.keys[record.key_id].revoked = True


def _key_limits_set(state: LedgerState, record: KeyLimitsSet) -> None:
    state.keys[record.key_id].limits = record.limits


# ---- reserved endpoints (issue 17) -----------------------------------------------------------


def _spend(
    state: LedgerState, endpoint: Endpoint, at_ms: int, cost_nano: int, replica_s: int
) -> None:
    """Takes an endpoint's charge from its workspace, into the month's spend and its usage."""
    ws = state.workspaces[endpoint.workspace_id]
    roll_month(ws, at_ms)
    assert 0 <= cost_nano <= ws.balance_nano, "an endpoint charge would overdraw"
    assert replica_s >= 0
    ws.balance_nano -= cost_nano
    ws.month_spend_nano += cost_nano
    endpoint.charged_nano += cost_nano
    cost = cost_nano
    bucket = f"{day_of(at_ms)}|{endpoint.id}"
    totals = state.endpoint_usage.setdefault(ws.id, {}).setdefault(bucket, EndpointUsage())
    totals.replica_s += replica_s
    totals.cost_nano += cost


def _endpoint_created(state: LedgerState, record: EndpointCreated) -> None:
    assert record.endpoint_id not in state.endpoints
    assert record.workspace_id in state.workspaces
    assert record.replicas >= 1
    assert not any(
        e.workspace_id == record.workspace_id
        and e.model_id == record.model_id
        and e.status is not EndpointStatus.DELETED
        for e in state.endpoints.values()
    ), "two live endpoints of one workspace share a model id"
    state.endpoints[record.endpoint_id] = Endpoint(
        id=record.endpoint_id,
        workspace_id=record.workspace_id,
        name=record.name,
        model_id=record.model_id,
        offering_id=record.offering_id,
        base_model=record.base_model,
        replicas=record.replicas,
        created_ms=record.at_ms,
    )


def _endpoint_period_charged(state: LedgerState, record: EndpointPeriodCharged) -> None:
    endpoint = state.endpoints[record.endpoint_id]
    assert endpoint.workspace_id == record.workspace_id
    assert endpoint.status is EndpointStatus.ACTIVE, "a period charged while not active"
    assert record.period == endpoint.period + 1, "a period charged twice or skipped"
    assert record.start_ms >= endpoint.paid_until_ms, "periods overlap"
    assert record.end_ms > record.start_ms and record.replicas == endpoint.replicas
    replica_s = record.replicas * (record.end_ms - record.start_ms) // 1000
    _spend(state, endpoint, record.at_ms, record.cost_nano, replica_s)
    endpoint.period = record.period
    endpoint.paid_until_ms = record.end_ms


def _endpoint_resized(state: LedgerState, record: EndpointResized) -> None:
    endpoint = state.endpoints[record.endpoint_id]
    assert endpoint.workspace_id == record.workspace_id
    assert endpoint.status is not EndpointStatus.DELETED and record.replicas >= 1
    assert record.charge_nano == 0 or record.replicas > endpoint.replicas
    _spend(state, endpoint, record.at_ms, record.charge_nano, record.charged_replica_s)
    endpoint.replicas = record.replicas


def _endpoint_suspended(state: LedgerState, record: EndpointSuspended) -> None:
    endpoint = state.endpoints[record.endpoint_id]
    assert endpoint.status is EndpointStatus.ACTIVE, "suspended while not active"
    endpoint.status, endpoint.suspended_by = EndpointStatus.SUSPENDED, record.by


def _endpoint_resumed(state: LedgerState, record: EndpointResumed) -> None:
    endpoint = state.endpoints[record.endpoint_id]
    assert endpoint.status is EndpointStatus.SUSPENDED, "resumed while not suspended"
    endpoint.status, endpoint.suspended_by = EndpointStatus.ACTIVE, None


def _endpoint_deleted(state: LedgerState, record: EndpointDeleted) -> None:
    endpoint = state.endpoints[record.endpoint_id]
    assert endpoint.status is not EndpointStatus.DELETED, "deleted twice"
    endpoint.status, endpoint.suspended_by = EndpointStatus.DELETED, None


# ---- Customers (issue 16) -------------------------------------------------------------------


def starter_idempotency_key(user_id: str) -> str:
    """The idempotency key of a user's starter claim (one per user)."""
    return f"starter-claim:{user_id}"


def _user_signed_up(state: LedgerState, record: UserSignedUp) -> None:
    assert record.user_id not in state.users and record.email not in state.user_by_email
    _workspace_created(
        state,
        WorkspaceCreated(
            at_ms=record.at_ms, workspace_id=record.workspace_id, name=record.workspace_name
        ),
    )
    state.workspaces[record.workspace_id].owner_user_id = record.user_id
    state.users[record.user_id] = User(
        id=record.user_id,
        email=record.email,
        password_hash=record.password_hash,
        created_ms=record.at_ms,
        workspace_ids=[record.workspace_id],
    )
    state.user_by_email[record.email] = record.user_id


def expired_sessions(state: LedgerState, user_id: str, at_ms: int) -> list[Session]:
    """The user's sessions that have expired by `at_ms`: a sign-in then removes them."""
    sessions = (state.sessions[s] for s in state.users[user_id].session_ids)
    return [s for s in sessions if s.expires_ms <= at_ms]


def _session_started(state: LedgerState, record: SessionStarted) -> None:
    assert record.user_id in state.users and record.session_id not in state.sessions
    user = state.users[record.user_id]
    # Expired sessions go when their user signs in again, so they cannot pile up.
    for expired in expired_sessions(state, user.id, record.at_ms):
        del state.sessions[expired.id]
        user.session_ids.remove(expired.id)
    user.session_ids.append(record.session_id)
    state.sessions[record.session_id] = Session(
        id=record.session_id,
        user_id=record.user_id,
        token_sha256=record.token_sha256,
        created_ms=record.at_ms,
        expires_ms=record.expires_ms,
    )


def _session_ended(state: LedgerState, record: SessionEnded) -> None:
    session = state.sessions.pop(record.session_id, None)
    if session is not None:
        state.users[session.user_id].session_ids.remove(session.id)


def _starter_claimed(state: LedgerState, record: StarterClaimed) -> None:
    user = state.users[record.user_id]
    assert user.starter_invoice == 0, "starter credits claimed twice"
    assert record.workspace_id in user.workspace_ids
    _credit(state, record.at_ms, record.workspace_id, record.invoice_number, record.amount_nano,
            TopUpMethod.STARTER, starter_idempotency_key(user.id))  # fmt: skip
    user.starter_invoice = record.invoice_number


def _alerts_set(state: LedgerState, record: AlertsSet) -> None:
    state.workspaces[record.workspace_id].alerts = Alerts(
        record.balance_below_nano, record.webhook_url, record.webhook_secret
    )


# ---- end of Customers (issue 16) --------------------------------------------------------------


_APPLY: dict[type[Any], Callable[[LedgerState, Any], None]] = {
    Charged: _charged,
    CreditsAdded: _credits_added,
    WorkspaceCreated: _workspace_created,
    SpendCapSet: _spend_cap_set,
    AutoReloadSet: _auto_reload_set,
    AutoReloadFailed: _auto_reload_failed,
    KeyCreated: _key_created,
    KeyRevoked: _key_revoked,
    KeyLimitsSet: _key_limits_set,
    EndpointCreated: _endpoint_created,
    EndpointPeriodCharged: _endpoint_period_charged,
    EndpointResized: _endpoint_resized,
    EndpointSuspended: _endpoint_suspended,
    EndpointResumed: _endpoint_resumed,
    EndpointDeleted: _endpoint_deleted,
    UserSignedUp: _user_signed_up,
    SessionStarted: _session_started,
    SessionEnded: _session_ended,
    StarterClaimed: _starter_claimed,
    AlertsSet: _alerts_set,
}
assert set(_APPLY) == set(Record.__args__), "every record type needs its transition"
