"""Moving from one core to a cluster: a single core's journal, copied into PostgreSQL once.

It reads the journal as recovery does (the latest snapshot and every record after it) without
writing to it, rebuilds the ledger from them, and copies workspaces (balance, month spend,
cap, auto-reload), keys (hashes, limits, revocation, month tokens), invoices with their
idempotency keys and numbering, and usage into an empty ledger in ONE transaction, so it lands
whole or not at all. Charges after the snapshot become one row each (their ids kept, so
usage and request ids survive); usage the journal keeps only as daily totals (before its
snapshot) becomes one row per day, key and model with its request count. Before committing it
checks, per workspace, that top-ups minus charges equal the balance, to the nano-dollar. A
target that holds any workspace, invoice or charge is refused: a second run changes nothing.
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
from corvex_core.state import LedgerState

MIGRATED_CORE: Final = "migrated"
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ImportRefused(Exception):
    """The journal or the target cannot be migrated; the message says why."""


class Imported(msgspec.Struct, frozen=True):
    workspaces: int
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


async def import_journal(
    conn: asyncpg.Connection, contents: JournalContents, now: dt.datetime
) -> Imported:
    """Copies `contents` into the (migrated, empty) ledger `conn` reaches, in one transaction."""
    await migrate(conn)
    state = contents.state
    current = db.utc_month(now)
    async with conn.transaction():
        await conn.execute("LOCK TABLE workspaces, invoices, charges IN EXCLUSIVE MODE")
        taken = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM workspaces) OR EXISTS (SELECT 1 FROM invoices)"
            " OR EXISTS (SELECT 1 FROM charges)"
        )
        if taken:
            raise ImportRefused(
                "the target ledger already holds accounts: a journal is migrated into an empty "
                "one, once"
            )
        await conn.copy_records_to_table(
            "workspaces",
            columns=[
                "id",
                "name",
                "created_at",
                "balance_nano",
                "leased_nano",
                "month",
                "month_spend_nano",
                "spend_cap_nano",
                "auto_reload_threshold_nano",
                "auto_reload_amount_nano",
                "auto_reload_error",
            ],
            records=[
                (
                    ws.id,
                    ws.name,
                    _at(ws.created_ms),
                    ws.balance_nano,
                    0,
                    ws.month or current,
                    ws.month_spend_nano,
                    ws.spend_cap_nano,
                    ws.auto_reload.threshold_nano if ws.auto_reload else None,
                    ws.auto_reload.amount_nano if ws.auto_reload else None,
                    ws.auto_reload_error,
                )
                for ws in state.workspaces.values()
            ],
        )
        await conn.copy_records_to_table(
            "keys",
            columns=[
                "id",
                "workspace_id",
                "name",
                "prefix",
                "secret_sha256",
                "created_at",
                "revoked_at",
                "limit_rpm",
                "limit_tpm",
                "limit_monthly_tokens",
                "month",
                "month_tokens",
            ],
            records=[
                (
                    k.id,
                    k.workspace_id,
                    k.name,
                    k.prefix,
                    k.secret_sha256,
                    _at(k.created_ms),
                    now if k.revoked else None,
                    k.limits.requests_per_minute,
                    k.limits.tokens_per_minute,
                    k.limits.monthly_tokens,
                    k.month or current,
                    k.month_tokens,
                )
                for k in state.keys.values()
            ],
        )
        await conn.copy_records_to_table(
            "invoices",
            columns=[
                "number",
                "workspace_id",
                "created_at",
                "amount_nano",
                "method",
                "balance_after_nano",
                "idempotency_key",
            ],
            records=[
                (
                    i.number,
                    i.workspace_id,
                    _at(i.created_ms),
                    i.amount_nano,
                    i.method.value,
                    i.balance_after_nano,
                    i.idempotency_key,
                )
                for i in sorted(state.invoices.values(), key=lambda i: i.number)
            ],
        )
        await conn.execute("UPDATE invoice_counter SET next_number = $1", state.next_invoice)
        usage_rows = _usage_rows(contents.snapshot_state)
        charge_rows = [
            (c.charge_id, c.request_id, c.workspace_id, c.key_id, MIGRATED_CORE, c.model,
             c.prompt_tokens, c.completion_tokens, c.cached_prompt_tokens, c.cost_nano,
             c.rate_card_version, _at(c.at_ms), 1)
            for c in contents.charges
        ]  # fmt: skip
        await conn.copy_records_to_table(
            "charges",
            columns=[
                "charge_id",
                "request_id",
                "workspace_id",
                "key_id",
                "core_id",
                "model",
                "prompt_tokens",
                "completion_tokens",
                "cached_prompt_tokens",
                "cost_nano",
                "rate_card_version",
                "at",
                "requests",
            ],
            records=[*usage_rows, *charge_rows],
        )
        await _check_balances(conn)
    return Imported(
        workspaces=len(state.workspaces),
        keys=len(state.keys),
        invoices=len(state.invoices),
        charges=len(charge_rows),
        usage_rows=len(usage_rows),
        balance_nano=sum(ws.balance_nano for ws in state.workspaces.values()),
    )


def _usage_rows(snapshot: LedgerState | None) -> list[tuple[object, ...]]:
    """The usage a snapshot keeps only as totals: one row per (day, key, model)."""
    if snapshot is None:
        return []
    rows: list[tuple[object, ...]] = []
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
