"""Moving from one core to a cluster: a single core's journal, copied into PostgreSQL once.

It reads the journal as recovery does (the latest snapshot and every record after it) without
writing to it, rebuilds the ledger from them, and copies workspaces (balance, month spend,
cap, auto-reload, alert settings), keys (hashes, limits, revocation, month tokens), invoices
with their idempotency keys and numbering, the customers (users with their password hashes
and starter claims, live sessions by their hashes, so nobody has to sign in again), deleted
reserved endpoints with their billed time, and usage into an empty ledger in ONE transaction,
so it lands
whole or not at all. Charges after the snapshot become one row each (their ids kept, so
usage and request ids survive); usage the journal keeps only as daily totals (before its
snapshot) becomes one row per day, key and model with its request count. Before committing it
checks, per workspace, that top-ups minus charges equal the balance, to the nano-dollar. A
target that holds any workspace, invoice or charge is refused: a second run changes nothing.
A journal with reserved endpoints not deleted is refused: their replicas run on that core and
cannot move with its journal (delete them there first; rent them again on a cluster core).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Final

import asyncpg
import msgspec

from corvex_core.journal import DB_NAME, Journal
from corvex_core.ledger import Ledger
from corvex_core.pg import db
from corvex_core.pg.migrate import migrate
from corvex_core.records import Charged
from corvex_core.state import ApiKey, EndpointStatus, Invoice, LedgerState, Workspace

MIGRATED_CORE: Final = "migrated"
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ImportRefused(Exception):
    """The journal or the target cannot be migrated; the message says why."""


class Imported(msgspec.Struct, frozen=True):
    workspaces: int
    users: int
    keys: int
    invoices: int
    charges: int
    usage_rows: int
    balance_nano: int


class JournalContents(msgspec.Struct):
    state: LedgerState
    # Usage before the snapshot (daily totals) and each charge after it.
    snapshot_state: LedgerState | None
    charges: list[Charged]


def read_journal(data_dir: Path) -> JournalContents:
    """The ledger a core on `data_dir` would recover, and its charges. Writes nothing."""
    if not (data_dir / DB_NAME).is_file():
        raise ImportRefused(f"{data_dir} has no journal ({DB_NAME})")
    recovery = Journal(data_dir).read_durable()
    ledger = Ledger()
    if recovery.state is not None:
        ledger.restore(msgspec.convert(msgspec.to_builtins(recovery.state), LedgerState))
    for record in recovery.records:
        ledger.apply(record)
    charges = [r for r in recovery.records if isinstance(r, Charged)]
    return JournalContents(ledger.state, recovery.state, charges)


def _at(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


_WORKSPACE_COLUMNS: Final = (
    "id", "name", "created_at", "balance_nano", "leased_nano", "month", "month_spend_nano",
    "spend_cap_nano", "auto_reload_threshold_nano", "auto_reload_amount_nano",
    "auto_reload_error", "owner_user_id", "alert_below_nano", "alert_webhook_url",
    "alert_webhook_secret",
)  # fmt: skip
_USER_COLUMNS: Final = ("id", "email", "password_hash", "created_at")
_SESSION_COLUMNS: Final = ("id", "user_id", "token_sha256", "created_at", "expires_at")
_KEY_COLUMNS: Final = (
    "id", "workspace_id", "name", "prefix", "secret_sha256", "created_at", "revoked_at",
    "limit_rpm", "limit_tpm", "limit_monthly_tokens", "month", "month_tokens",
)  # fmt: skip
_INVOICE_COLUMNS: Final = (
    "number", "workspace_id", "created_at", "amount_nano", "method", "balance_after_nano",
    "idempotency_key",
)  # fmt: skip
_ENDPOINT_COLUMNS: Final = (
    "id", "workspace_id", "name", "model_id", "offering_id", "base_model", "replicas",
    "created_at", "core_id", "status", "period", "paid_until", "charged_nano", "phase",
)  # fmt: skip
_ENDPOINT_CHARGE_COLUMNS: Final = (
    "charge_id", "endpoint_id", "workspace_id", "core_id", "replica_seconds", "cost_nano",
    "rate_card_version", "at",
)  # fmt: skip
_CHARGE_COLUMNS: Final = (
    "charge_id", "request_id", "workspace_id", "key_id", "core_id", "model", "prompt_tokens",
    "completion_tokens", "cached_prompt_tokens", "cost_nano", "rate_card_version", "at",
    "requests",
)  # fmt: skip
Row = tuple[object, ...]


async def import_journal(
    conn: asyncpg.Connection, contents: JournalContents, now: dt.datetime
) -> Imported:
    """Copies `contents` into the (migrated, empty) ledger `conn` reaches, in one transaction."""
    await migrate(conn)
    state = contents.state
    current = db.utc_month(now)
    usage_rows = _usage_rows(contents.snapshot_state)
    charge_rows = [_charge_row(c) for c in contents.charges]
    live = [e.id for e in state.endpoints.values() if e.status is not EndpointStatus.DELETED]
    if live:
        raise ImportRefused(
            f"the journal has {len(live)} reserved endpoints not deleted (first: {live[0]}): "
            "their replicas run on that core and cannot move with its journal; delete them "
            "there first (nothing was migrated)"
        )
    async with conn.transaction():
        await _refuse_unless_empty(conn)
        await _copy(conn, "users", _USER_COLUMNS,
                    [(u.id, u.email, u.password_hash, _at(u.created_ms))
                     for u in state.users.values()])  # fmt: skip
        await _copy(conn, "workspaces", _WORKSPACE_COLUMNS,
                    [_workspace_row(ws, current) for ws in state.workspaces.values()])  # fmt: skip
        await _copy(conn, "keys", _KEY_COLUMNS,
                    [_key_row(k, current, now) for k in state.keys.values()])  # fmt: skip
        invoices = sorted(state.invoices.values(), key=lambda i: i.number)
        await _copy(conn, "invoices", _INVOICE_COLUMNS, [_invoice_row(i) for i in invoices])
        await conn.execute("UPDATE invoice_counter SET next_number = $1", state.next_invoice)
        await _copy_customers(conn, state, now)
        await _copy(conn, "charges", _CHARGE_COLUMNS, [*usage_rows, *charge_rows])
        await _copy_endpoints(conn, state)
        await _check_balances(conn)
    return Imported(
        workspaces=len(state.workspaces),
        users=len(state.users),
        keys=len(state.keys),
        invoices=len(state.invoices),
        charges=len(charge_rows),
        usage_rows=len(usage_rows),
        balance_nano=sum(ws.balance_nano for ws in state.workspaces.values()),
    )


async def _copy_customers(conn: asyncpg.Connection, state: LedgerState, now: dt.datetime) -> None:
    """The users' starter claims (their invoices are in) and the sessions still live."""
    await conn.executemany(
        "UPDATE users SET starter_invoice = $2 WHERE id = $1",
        [(u.id, u.starter_invoice) for u in state.users.values() if u.starter_invoice],
    )
    live_after = (now - _EPOCH) // dt.timedelta(milliseconds=1)
    sessions: list[Row] = [
        (s.id, s.user_id, s.token_sha256, _at(s.created_ms), _at(s.expires_ms))
        for s in state.sessions.values()
        if s.expires_ms > live_after
    ]
    await _copy(conn, "sessions", _SESSION_COLUMNS, sessions)


async def _copy_endpoints(conn: asyncpg.Connection, state: LedgerState) -> None:
    """Deleted endpoints, and the time they were billed for as one charge per day."""
    await _copy(conn, "endpoints", _ENDPOINT_COLUMNS, [
        (e.id, e.workspace_id, e.name, e.model_id, e.offering_id, e.base_model, e.replicas,
         _at(e.created_ms), MIGRATED_CORE, "deleted", e.period,
         _at(e.paid_until_ms) if e.period else None, e.charged_nano, "deleted")
        for e in state.endpoints.values()
    ])  # fmt: skip
    rows: list[Row] = []
    for workspace_id, buckets in state.endpoint_usage.items():
        for bucket, used in buckets.items():
            day, endpoint_id = bucket.split("|", 1)
            at = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
            rows.append((f"migrated:{endpoint_id}:{day}", endpoint_id, workspace_id,
                         MIGRATED_CORE, used.replica_s, used.cost_nano, "", at))  # fmt: skip
    await _copy(conn, "endpoint_charges", _ENDPOINT_CHARGE_COLUMNS, rows)


async def _refuse_unless_empty(conn: asyncpg.Connection) -> None:
    await conn.execute("LOCK TABLE workspaces, invoices, charges IN EXCLUSIVE MODE")
    taken = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM workspaces) OR EXISTS (SELECT 1 FROM invoices)"
        " OR EXISTS (SELECT 1 FROM charges)"
    )
    if taken:
        raise ImportRefused(
            "the target ledger already holds accounts: a journal is migrated into an empty one, "
            "once"
        )


async def _copy(
    conn: asyncpg.Connection, table: str, columns: tuple[str, ...], rows: list[Row]
) -> None:
    await conn.copy_records_to_table(table, columns=list(columns), records=rows)


def _workspace_row(ws: Workspace, current_month: str) -> Row:
    reload = ws.auto_reload
    return (
        ws.id, ws.name, _at(ws.created_ms), ws.balance_nano, 0, ws.month or current_month,
        ws.month_spend_nano, ws.spend_cap_nano, reload.threshold_nano if reload else None,
        reload.amount_nano if reload else None, ws.auto_reload_error, ws.owner_user_id or None,
        ws.alerts.balance_below_nano, ws.alerts.webhook_url, ws.alerts.webhook_secret,
    )  # fmt: skip


def _key_row(key: ApiKey, current_month: str, now: dt.datetime) -> Row:
    limits = key.limits
    return (
        key.id, key.workspace_id, key.name, key.prefix, key.secret_sha256, _at(key.created_ms),
        now if key.revoked else None, limits.requests_per_minute, limits.tokens_per_minute,
        limits.monthly_tokens, key.month or current_month, key.month_tokens,
    )  # fmt: skip


def _invoice_row(invoice: Invoice) -> Row:
    return (
        invoice.number, invoice.workspace_id, _at(invoice.created_ms), invoice.amount_nano,
        invoice.method.value, invoice.balance_after_nano, invoice.idempotency_key,
    )  # fmt: skip


def _charge_row(c: Charged) -> Row:
    return (
        c.charge_id, c.request_id, c.workspace_id, c.key_id, MIGRATED_CORE, c.model,
        c.prompt_tokens, c.completion_tokens, c.cached_prompt_tokens, c.cost_nano,
        c.rate_card_version, _at(c.at_ms), 1,
    )  # fmt: skip


def _usage_rows(snapshot: LedgerState | None) -> list[Row]:
    """The usage a snapshot keeps only as totals: one row per (day, key, model)."""
    if snapshot is None:
        return []
    rows: list[Row] = []
    for workspace_id, buckets in snapshot.usage.items():
        for bucket, totals in buckets.items():
            day, key_id, model = bucket.split("|", 2)
            at = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
            rows.append(
                (f"migrated:{workspace_id}:{bucket}", "", workspace_id, key_id, MIGRATED_CORE,
                 model, totals.prompt_tokens, totals.completion_tokens, 0, totals.cost_nano, "",
                 at, max(totals.requests, 1))
            )  # fmt: skip
    return rows


async def _check_balances(conn: asyncpg.Connection) -> None:
    wrong = await conn.fetch(
        """
        SELECT w.id, w.balance_nano,
               (SELECT coalesce(sum(amount_nano), 0) FROM invoices i WHERE i.workspace_id = w.id)
             - (SELECT coalesce(sum(cost_nano), 0) FROM charges c WHERE c.workspace_id = w.id)
             - (SELECT coalesce(sum(cost_nano), 0) FROM endpoint_charges e
                WHERE e.workspace_id = w.id)
               AS expected_nano
        FROM workspaces w
        """
    )
    bad = [dict(r) for r in wrong if r["balance_nano"] != r["expected_nano"]]
    if bad:
        raise ImportRefused(
            f"top-ups minus charges do not equal the balance for {len(bad)} workspaces "
            f"(first: {bad[0]}); nothing was migrated"
        )
