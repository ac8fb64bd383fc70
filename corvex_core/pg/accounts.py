"""Account changes in the cluster ledger: workspaces, top-ups and invoices, caps, auto-reload,
keys and their limits.

Each change is one transaction that also sends its notice (`notify.send`), so every core
hears of exactly the changes that committed. Money only ever grows here (top-ups); spending is
`leases.LeaseStore.charge`. Input rules (name lengths, whole cents) are the Accounts service's
to check, as for the single-core ledger; what this module guarantees is the database's side:
a top-up lands once per idempotency key, and its invoice number follows the last one.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import msgspec

from corvex.money import format_usd
from corvex_core import errors
from corvex_core.ledger import UsageRow, check_balance_room
from corvex_core.pg import db, notify
from corvex_core.pg.db import Clock, Connection, Pool, utc_month, utc_now
from corvex_core.records import KeyLimits, TopUpMethod
from corvex_core.state import Alerts, AutoReload, Invoice

TOPUP_METHODS: Final = ("manual", "starter", "auto_reload")
# The most rows one listing returns (workspaces, keys): a cluster's core mirrors them all.
MAX_LISTED: Final = 1_000_000
MAX_ERROR_CHARS: Final = 500
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class WorkspaceRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    created_at: dt.datetime
    balance_nano: int
    leased_nano: int
    month: str
    month_spend_nano: int
    spend_cap_nano: int | None
    auto_reload: AutoReload | None
    auto_reload_error: str
    # The customers' columns (migration 0005): its owner and alert settings.
    owner_user_id: str = ""
    alerts: Alerts = Alerts()


# Requests by (day, key, model), then reserved time by (day, endpoint): as the single core
# reports them. $2 (a key) leaves reserved time out: it is the workspace's, not a key's.
_USAGE = """
SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, key_id, model,
       sum(requests)::bigint AS requests, sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens, sum(cost_nano)::bigint AS cost_nano,
       '' AS endpoint_id, 0::bigint AS replica_seconds
FROM charges
WHERE workspace_id = $1 AND ($2 = '' OR key_id = $2)
  AND ($3 = '' OR at >= ($3 || ' 00:00:00+00')::timestamptz)
  AND ($4 = '' OR at < ($4 || ' 00:00:00+00')::timestamptz + interval '1 day')
GROUP BY 1, 2, 3
UNION ALL
SELECT to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), '', e.model_id, 0, 0, 0,
       sum(c.cost_nano)::bigint, c.endpoint_id, sum(c.replica_seconds)::bigint
FROM endpoint_charges AS c JOIN endpoints AS e ON e.id = c.endpoint_id
WHERE c.workspace_id = $1 AND $2 = ''
  AND ($3 = '' OR c.at >= ($3 || ' 00:00:00+00')::timestamptz)
  AND ($4 = '' OR c.at < ($4 || ' 00:00:00+00')::timestamptz + interval '1 day')
GROUP BY 1, 3, c.endpoint_id
ORDER BY 1, 2, 3, 8
"""


class KeyRow(msgspec.Struct, frozen=True):
    id: str
    workspace_id: str
    name: str
    prefix: str
    secret_sha256: bytes
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    limits: KeyLimits
    month: str
    month_tokens: int
    tokens_leased: int


class AccountStore:
    """The account changes and reads of the Accounts service, each one transaction."""

    def __init__(self, pool: Pool, *, clock: Clock = utc_now) -> None:
        self._pool = pool
        self._clock = clock

    # ---- workspaces and money --------------------------------------------------------------

    async def create_workspace(
        self, workspace_id: str, name: str, *, starter_nano: int = 0
    ) -> WorkspaceRow:
        """Makes a workspace, with `starter_nano` of starter credits (and their invoice,
        idempotency key `starter:<id>`) in the same transaction."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO workspaces (id, name, created_at, month) VALUES ($1, $2, $3, $4)"
                " RETURNING *",
                *(workspace_id, name, now, utc_month(now)),
            )
            await notify.send(conn, notify.AccountChange("workspace_created", workspace_id))
            if starter_nano:
                key = f"starter:{workspace_id}"
                await _issue(conn, workspace_id, starter_nano, "starter", key, now)
                await notify.send(conn, notify.AccountChange("credits_added", workspace_id))
                row = await conn.fetchrow("SELECT * FROM workspaces WHERE id = $1", workspace_id)
        return _workspace(row)

    async def top_up(
        self, workspace_id: str, amount_nano: int, method: str, idempotency_key: str
    ) -> tuple[Invoice, bool]:
        """Adds credits and issues their invoice, once per (workspace, idempotency key).

        Returns (invoice, replayed): a replay with the same amount returns the first invoice
        and changes nothing; the same key with another amount is refused (InvalidRequest).
        """
        assert amount_nano > 0 and method in TOPUP_METHODS, (amount_nano, method)
        async with self._pool.acquire() as conn, conn.transaction():
            # The workspace lock orders top-ups with the same key: the second sees the first.
            balance_nano = await conn.fetchval(
                "SELECT balance_nano FROM workspaces WHERE id = $1 FOR NO KEY UPDATE",
                workspace_id,
            )
            if balance_nano is None:
                raise db.no_workspace(workspace_id)
            prior = await conn.fetchrow(
                "SELECT * FROM invoices WHERE workspace_id = $1 AND idempotency_key = $2",
                workspace_id,
                idempotency_key,
            )
            if prior is not None:
                return _replay(_invoice(prior), amount_nano), True
            check_balance_room(balance_nano, amount_nano)
            invoice = await _issue(
                conn, workspace_id, amount_nano, method, idempotency_key, self._clock()
            )
            assert invoice.balance_after_nano == balance_nano + amount_nano
            await notify.send(conn, notify.AccountChange("credits_added", workspace_id))
        return invoice, False

    async def set_spend_cap(self, workspace_id: str, cap_nano: int | None) -> WorkspaceRow:
        """Sets (or with None removes) the monthly spend cap. A cap below what this month has
        spent and leased is allowed: it only stops further leases."""
        assert cap_nano is None or cap_nano >= 0, cap_nano
        sql = "UPDATE workspaces SET spend_cap_nano = $2 WHERE id = $1 RETURNING *"
        return await self._change_workspace("spend_cap_set", workspace_id, sql, cap_nano)

    async def set_auto_reload(self, workspace_id: str, setting: AutoReload | None) -> WorkspaceRow:
        """Turns auto-reload on with `setting`, or off with None; clears its last error."""
        threshold, amount = (None, None) if setting is None else msgspec.structs.astuple(setting)
        sql = (
            "UPDATE workspaces SET auto_reload_threshold_nano = $2, auto_reload_amount_nano = $3,"
            " auto_reload_error = '' WHERE id = $1 RETURNING *"
        )
        return await self._change_workspace("auto_reload_set", workspace_id, sql, threshold, amount)

    async def record_auto_reload_failure(self, workspace_id: str, error: str) -> WorkspaceRow:
        sql = "UPDATE workspaces SET auto_reload_error = $2 WHERE id = $1 RETURNING *"
        args = (error[:MAX_ERROR_CHARS],)
        return await self._change_workspace("auto_reload_failed", workspace_id, sql, *args)

    async def workspace(self, workspace_id: str) -> WorkspaceRow:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM workspaces WHERE id = $1", workspace_id)
        if row is None:
            raise db.no_workspace(workspace_id)
        return _workspace(row)

    async def invoices(self, workspace_id: str) -> list[Invoice]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM invoices WHERE workspace_id = $1 ORDER BY number", workspace_id
            )
        return [_invoice(row) for row in rows]

    async def workspaces(self) -> list[WorkspaceRow]:
        """Every workspace, by id (bounded by MAX_LISTED)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM workspaces ORDER BY created_at, id LIMIT $1", MAX_LISTED
            )
        return [_workspace(row) for row in rows]

    async def last_invoice_number(self, workspace_id: str) -> int:
        """The number of the workspace's latest invoice, 0 if it has none."""
        async with self._pool.acquire() as conn:
            number = await conn.fetchval(
                "SELECT coalesce(max(number), 0) FROM invoices WHERE workspace_id = $1",
                workspace_id,
            )
        return int(number)

    async def invoice(self, number: int) -> Invoice | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM invoices WHERE number = $1", number)
        return None if row is None else _invoice(row)

    async def usage(
        self, workspace_id: str, *, key_id: str = "", since: str = "", until: str = ""
    ) -> list[UsageRow]:
        """Usage of a workspace by UTC day, key and model between two days (inclusive), as
        the single-core ledger reports it."""
        async with self._pool.acquire() as conn:
            await db.require_workspace(conn, workspace_id)
            rows = await conn.fetch(_USAGE, workspace_id, key_id, since, until)
        return [UsageRow(**dict(row)) for row in rows]

    # ---- keys ------------------------------------------------------------------------------

    async def create_key(
        self,
        key_id: str,
        workspace_id: str,
        *,
        name: str,
        prefix: str,
        secret_sha256: bytes,
        limits: KeyLimits,
    ) -> KeyRow:
        """Stores a new key; the caller made its id and secret and passes the secret's hash."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            await db.require_workspace(conn, workspace_id)
            row = await conn.fetchrow(
                "INSERT INTO keys (id, workspace_id, name, prefix, secret_sha256, created_at,"
                " limit_rpm, limit_tpm, limit_monthly_tokens, month)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
                *(key_id, workspace_id, name, prefix, secret_sha256, now),
                *msgspec.structs.astuple(limits),
                utc_month(now),
            )
            await notify.send(conn, notify.AccountChange("key_created", workspace_id, key_id))
        return _key(row)

    async def revoke_key(self, key_id: str) -> KeyRow:
        """Revokes a key (once: revoking again keeps the first time and sends no notice)."""
        sql = "UPDATE keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING *"
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql, key_id, self._clock())
            if row is None:
                return await self._key(conn, key_id)
            change = notify.AccountChange("key_revoked", row["workspace_id"], key_id)
            await notify.send(conn, change)
        return _key(row)

    async def set_key_limits(self, key_id: str, limits: KeyLimits) -> KeyRow:
        """Replaces a key's limits. A monthly token limit below what the key has used and
        leased is allowed: it only stops further token leases."""
        sql = (
            "UPDATE keys SET limit_rpm = $2, limit_tpm = $3, limit_monthly_tokens = $4"
            " WHERE id = $1 RETURNING *"
        )
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql, key_id, *msgspec.structs.astuple(limits))
            if row is None:
                raise db.no_key(key_id)
            change = notify.AccountChange("key_limits_set", row["workspace_id"], key_id)
            await notify.send(conn, change)
        return _key(row)

    async def keys(self, workspace_id: str | None = None) -> list[KeyRow]:
        """The keys of a workspace (of every workspace with None), by id (bounded by
        MAX_LISTED)."""
        async with self._pool.acquire() as conn:
            if workspace_id is None:
                rows = await conn.fetch(
                    "SELECT * FROM keys ORDER BY created_at, id LIMIT $1", MAX_LISTED
                )
            else:
                await db.require_workspace(conn, workspace_id)
                rows = await conn.fetch(
                    "SELECT * FROM keys WHERE workspace_id = $1 ORDER BY created_at, id LIMIT $2",
                    workspace_id,
                    MAX_LISTED,
                )
        return [_key(row) for row in rows]

    async def key(self, key_id: str) -> KeyRow:
        async with self._pool.acquire() as conn:
            return await self._key(conn, key_id)

    async def key_by_secret(self, secret_sha256: bytes) -> KeyRow | None:
        """The key whose secret hashes to `secret_sha256` (revoked or not), if any."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM keys WHERE secret_sha256 = $1", secret_sha256)
        return None if row is None else _key(row)

    # ---- helpers ---------------------------------------------------------------------------

    async def _change_workspace(
        self, what: notify.What, workspace_id: str, sql: str, *args: object
    ) -> WorkspaceRow:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql, workspace_id, *args)
            if row is None:
                raise db.no_workspace(workspace_id)
            await notify.send(conn, notify.AccountChange(what, workspace_id))
        return _workspace(row)

    @staticmethod
    async def _key(conn: Connection, key_id: str) -> KeyRow:
        row = await conn.fetchrow("SELECT * FROM keys WHERE id = $1", key_id)
        if row is None:
            raise db.no_key(key_id)
        return _key(row)


async def _issue(
    conn: Connection,
    workspace_id: str,
    amount_nano: int,
    method: str,
    idempotency_key: str,
    now: dt.datetime,
) -> Invoice:
    """Credits the (locked) workspace and writes the invoice under the next number."""
    number = await conn.fetchval(
        "UPDATE invoice_counter SET next_number = next_number + 1 RETURNING next_number - 1"
    )
    balance_after = await conn.fetchval(
        "UPDATE workspaces SET balance_nano = balance_nano + $2,"
        " auto_reload_error = CASE WHEN $3 = 'auto_reload' THEN '' ELSE auto_reload_error END"
        " WHERE id = $1 RETURNING balance_nano",
        *(workspace_id, amount_nano, method),
    )
    row = await conn.fetchrow(
        "INSERT INTO invoices (number, workspace_id, created_at, amount_nano, method,"
        " balance_after_nano, idempotency_key) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        *(number, workspace_id, now, amount_nano, method, balance_after, idempotency_key),
    )
    return _invoice(row)


def _replay(invoice: Invoice, amount_nano: int) -> Invoice:
    if invoice.amount_nano != amount_nano:
        raise errors.InvalidRequest(
            f"idempotency_key {invoice.idempotency_key!r} was used for a top-up of "
            f"${format_usd(invoice.amount_nano)}; use a new key for a different amount",
            param="idempotency_key",
        )
    return invoice


def _workspace(row: Any) -> WorkspaceRow:
    threshold, amount = row["auto_reload_threshold_nano"], row["auto_reload_amount_nano"]
    return WorkspaceRow(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        balance_nano=row["balance_nano"],
        leased_nano=row["leased_nano"],
        month=row["month"],
        month_spend_nano=row["month_spend_nano"],
        spend_cap_nano=row["spend_cap_nano"],
        auto_reload=None if amount is None else AutoReload(threshold, amount),
        auto_reload_error=row["auto_reload_error"],
        owner_user_id=row["owner_user_id"] or "",
        alerts=Alerts(
            row["alert_below_nano"], row["alert_webhook_url"], row["alert_webhook_secret"]
        ),
    )


def _key(row: Any) -> KeyRow:
    return KeyRow(
        id=row["id"],
        workspace_id=row["workspace_id"],
        name=row["name"],
        prefix=row["prefix"],
        secret_sha256=bytes(row["secret_sha256"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        limits=KeyLimits(row["limit_rpm"], row["limit_tpm"], row["limit_monthly_tokens"]),
        month=row["month"],
        month_tokens=row["month_tokens"],
        tokens_leased=row["tokens_leased"],
    )


def _invoice(row: Any) -> Invoice:
    return Invoice(
        number=row["number"],
        workspace_id=row["workspace_id"],
        created_ms=(row["created_at"] - _EPOCH) // dt.timedelta(milliseconds=1),
        amount_nano=row["amount_nano"],
        method=TopUpMethod(row["method"]),
        balance_after_nano=row["balance_after_nano"],
        idempotency_key=row["idempotency_key"],
    )
