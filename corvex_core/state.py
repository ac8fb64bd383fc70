"""The ledger's durable state, and the one way it changes: applying a journal record.

What a snapshot holds and recovery rebuilds: workspaces (balance, cap, month spend, auto-reload),
keys, invoices, idempotency keys and usage totals. `apply` is a pure state transition, the
same live and during recovery; it asserts the money invariants of every workspace it touches.
It knows nothing of holds, validation or the journal: that is the ledger's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from corvex_core.records import (
    AutoReloadFailed,
    AutoReloadSet,
    Charged,
    CreditsAdded,
    KeyCreated,
    KeyLimits,
    KeyLimitsSet,
    KeyRevoked,
    Record,
    SpendCapSet,
    TopUpMethod,
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
    bucket = f"{day_of(record.at_ms)}|{record.key_id}|{record.model}"
    totals = state.usage.setdefault(ws.id, {}).setdefault(bucket, UsageTotals())
    totals.requests += 1
    totals.prompt_tokens += record.prompt_tokens
    totals.completion_tokens += record.completion_tokens
    totals.cost_nano += record.cost_nano
    state.charges += 1


def _credits_added(state: LedgerState, record: CreditsAdded) -> None:
    ws = state.workspaces[record.workspace_id]
    ws.balance_nano += record.amount_nano
    assert record.invoice_number == state.next_invoice, "invoice numbers have a gap"
    state.invoices[record.invoice_number] = Invoice(
        number=record.invoice_number,
        workspace_id=ws.id,
        created_ms=record.at_ms,
        amount_nano=record.amount_nano,
        method=record.method,
        balance_after_nano=ws.balance_nano,
        idempotency_key=record.idempotency_key,
    )
    state.next_invoice += 1
    state.idempotency[idempotency_slot(ws.id, record.idempotency_key)] = record.invoice_number
    ws.invoice_numbers.append(record.invoice_number)
    if record.method is TopUpMethod.AUTO_RELOAD:
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
}
assert set(_APPLY) == set(Record.__args__), "every record type needs its transition"
