"""Customers in the cluster ledger (issue 16): users, sessions, the starter claim, checkouts,
alert settings, failed sign-ins and the recent-request log, each change one transaction.

What this module guarantees is the database's side: one account per email, a session found
only by the hash of its secret and only while it lives, a starter claim once per user that
credits its invoice in the same transaction, a checkout credited once (its idempotency key),
the alert kinds in force moved by one core at a time. Input rules (email shape, password
length, amounts) are the Accounts service's, as for the single-core ledger.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import msgspec

from corvex_core import errors
from corvex_core.ledger import MAX_SESSIONS_PER_USER, email_taken
from corvex_core.pg import db, notify
from corvex_core.pg.accounts import WorkspaceRow, _invoice, _issue, _workspace
from corvex_core.pg.db import Clock, Pool, utc_month, utc_now
from corvex_core.state import Alerts, Invoice, Session, User, starter_idempotency_key

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Requests kept per workspace in the log (activity.MAX_PER_WORKSPACE).
MAX_LOGGED_PER_WORKSPACE: Final = 200
MAX_ERROR_CHARS: Final = 300


def _ms(at: dt.datetime) -> int:
    return (at - _EPOCH) // dt.timedelta(milliseconds=1)


def _at(at_ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=at_ms)


class CheckoutRow(msgspec.Struct, frozen=True):
    id: str
    workspace_id: str
    amount_nano: int
    idempotency_key: str
    provider_id: str
    approve_url: str
    created_ms: int
    invoice: Invoice | None


class AlertsRow(msgspec.Struct, frozen=True):
    """A workspace (its money and alert settings) and the delivery state of its alerts."""

    workspace: WorkspaceRow
    in_force: frozenset[str]
    delivery_error: str


class LoggedRequest(msgspec.Struct, frozen=True):
    """One ended metered call, as activity.RecentRequest has it (with its workspace)."""

    workspace_id: str
    request_id: str
    at_ms: int
    key_id: str
    model: str
    rpc: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int


class CustomerStore:
    """See the module docstring."""

    def __init__(self, pool: Pool, *, clock: Clock = utc_now) -> None:
        self._pool = pool
        self._clock = clock

    def now_ms(self) -> int:
        return _ms(self._clock())

    # ---- users ---------------------------------------------------------------------------

    async def sign_up(
        self, user_id: str, workspace_id: str, email: str, password_hash: str, name: str
    ) -> User:
        """A user and its workspace, in one transaction. EmailTaken if the email has one."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute(
                    "INSERT INTO users (id, email, password_hash, created_at)"
                    " VALUES ($1, $2, $3, $4)",
                    *(user_id, email, password_hash, now),
                )
            except asyncpg.UniqueViolationError:
                raise email_taken() from None
            await conn.execute(
                "INSERT INTO workspaces (id, name, created_at, month, owner_user_id)"
                " VALUES ($1, $2, $3, $4, $5)",
                *(workspace_id, name, now, utc_month(now), user_id),
            )
            await notify.send(conn, notify.AccountChange("workspace_created", workspace_id))
        return User(user_id, email, password_hash, _ms(now), [workspace_id])

    async def user_by_email(self, email: str) -> User | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM users WHERE email = $1", email)
            return None if row is None else await _user(conn, row)

    async def user(self, user_id: str) -> User:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
            if row is None:
                raise errors.NotFound(f"No user {user_id}.")
            return await _user(conn, row)

    async def owned_workspaces(self, user_id: str) -> list[str]:
        async with self._pool.acquire() as conn:
            return await _owned(conn, user_id)

    # ---- sessions ------------------------------------------------------------------------

    async def start_session(
        self, session_id: str, user_id: str, token_sha256: bytes, ttl_ms: int
    ) -> Session:
        """A new session (only its hash stored). Expired sessions of the user go, and the
        oldest live ones beyond MAX_SESSIONS_PER_USER - 1, as on a single core."""
        now = self._clock()
        expires = now + dt.timedelta(milliseconds=ttl_ms)
        async with self._pool.acquire() as conn, conn.transaction():
            # The user's lock orders its sign-ins: the bound holds however many race.
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
            await conn.execute(
                "DELETE FROM sessions WHERE user_id = $1 AND expires_at <= $2", user_id, now
            )
            await conn.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE user_id = $1"
                " ORDER BY created_at DESC, id OFFSET $2)",
                user_id,
                MAX_SESSIONS_PER_USER - 1,
            )
            await conn.execute(
                "INSERT INTO sessions (id, user_id, token_sha256, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                *(session_id, user_id, token_sha256, now, expires),
            )
        return Session(session_id, user_id, token_sha256, _ms(now), _ms(expires))

    async def session(self, token_sha256: bytes) -> Session | None:
        """The live session whose secret hashes to this, if any."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM sessions WHERE token_sha256 = $1 AND expires_at > $2",
                token_sha256,
                self._clock(),
            )
        if row is None:
            return None
        return Session(
            row["id"],
            row["user_id"],
            bytes(row["token_sha256"]),
            _ms(row["created_at"]),
            _ms(row["expires_at"]),
        )

    async def end_session(self, session_id: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute("DELETE FROM sessions WHERE id = $1", session_id)

    # ---- failed sign-ins -----------------------------------------------------------------

    async def sign_in_failures(self, email: str, window_ms: int) -> list[int]:
        """The times (ms) of the email's failed sign-ins within the window, oldest first."""
        since = self._clock() - dt.timedelta(milliseconds=window_ms)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT at FROM sign_in_failures WHERE email = $1 AND at > $2 ORDER BY at",
                email,
                since,
            )
        return [_ms(row["at"]) for row in rows]

    async def sign_in_failed(self, email: str, window_ms: int, keep: int) -> None:
        """Records a failure; forgets failures older than the window (every email's) and
        all but the email's last `keep`, so the table stays bounded."""
        now = self._clock()
        since = now - dt.timedelta(milliseconds=window_ms)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM sign_in_failures WHERE at <= $1", since)
            await conn.execute(
                "INSERT INTO sign_in_failures (email, at) VALUES ($1, $2)", email, now
            )
            await conn.execute(
                "DELETE FROM sign_in_failures WHERE email = $1 AND at < (SELECT at FROM"
                " sign_in_failures WHERE email = $1 ORDER BY at DESC OFFSET $2 LIMIT 1)",
                email,
                keep - 1,
            )

    async def sign_in_succeeded(self, email: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute("DELETE FROM sign_in_failures WHERE email = $1", email)

    # ---- the starter claim ---------------------------------------------------------------

    async def claim_starter(self, user_id: str, workspace_id: str, amount_nano: int) -> Invoice:
        """Credits the starter credits to the user's workspace and issues their invoice in
        one transaction, once per user: a second claim (on any core) is refused."""
        assert amount_nano > 0, amount_nano
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                "SELECT coalesce(starter_invoice, 0) FROM users WHERE id = $1 FOR UPDATE",
                user_id,
            )
            if claimed is None:
                raise errors.NotFound(f"No user {user_id}.")
            if claimed:
                raise errors.StarterCreditsUnavailable(
                    f"Starter credits were claimed already (invoice INV-{claimed:06d}); "
                    "they are given once per account."
                )
            owner = await conn.fetchval(
                "SELECT owner_user_id FROM workspaces WHERE id = $1 FOR NO KEY UPDATE",
                workspace_id,
            )
            if owner != user_id:  # only a request naming no workspace gets here (authorized)
                raise errors.NotFound(f"No workspace {workspace_id}.")
            key = starter_idempotency_key(user_id)
            invoice = await _issue(conn, workspace_id, amount_nano, "starter", key, self._clock())
            await conn.execute(
                "UPDATE users SET starter_invoice = $2 WHERE id = $1", user_id, invoice.number
            )
            await notify.send(conn, notify.AccountChange("credits_added", workspace_id))
        return invoice

    # ---- checkouts -----------------------------------------------------------------------

    async def checkout_by_key(self, workspace_id: str, idempotency_key: str) -> CheckoutRow | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM checkouts WHERE workspace_id = $1 AND idempotency_key = $2",
                workspace_id,
                idempotency_key,
            )
            return None if row is None else await _checkout(conn, row)

    async def add_checkout(self, checkout: CheckoutRow) -> CheckoutRow:
        """Stores a checkout the provider opened; if one with the same idempotency key was
        stored meanwhile (another core), that one is returned instead."""
        async with self._pool.acquire() as conn, conn.transaction():
            await db.require_workspace(conn, checkout.workspace_id)
            await conn.execute(
                "INSERT INTO checkouts (id, workspace_id, amount_nano, idempotency_key,"
                " provider_id, approve_url, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (workspace_id, idempotency_key) DO NOTHING",
                *(checkout.id, checkout.workspace_id, checkout.amount_nano),
                *(checkout.idempotency_key, checkout.provider_id, checkout.approve_url),
                _at(checkout.created_ms),
            )
            row = await conn.fetchrow(
                "SELECT * FROM checkouts WHERE workspace_id = $1 AND idempotency_key = $2",
                checkout.workspace_id,
                checkout.idempotency_key,
            )
            return await _checkout(conn, row)

    async def checkout(self, workspace_id: str, checkout_id: str) -> CheckoutRow | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM checkouts WHERE id = $1 AND workspace_id = $2",
                checkout_id,
                workspace_id,
            )
            return None if row is None else await _checkout(conn, row)

    async def credit_checkout(self, checkout: CheckoutRow) -> tuple[Invoice, bool]:
        """Credits a confirmed checkout once: (invoice, replayed). The checkout's lock orders
        double submits on any cores; the second finds the first's invoice."""
        async with self._pool.acquire() as conn, conn.transaction():
            number = await conn.fetchval(
                "SELECT coalesce(invoice_number, 0) FROM checkouts WHERE id = $1 FOR UPDATE",
                checkout.id,
            )
            if number:
                row = await conn.fetchrow("SELECT * FROM invoices WHERE number = $1", number)
                return _invoice(row), True
            await conn.execute(
                "SELECT 1 FROM workspaces WHERE id = $1 FOR NO KEY UPDATE", checkout.workspace_id
            )
            key = f"checkout:{checkout.id}"
            invoice = await _issue(
                conn, checkout.workspace_id, checkout.amount_nano, "manual", key, self._clock()
            )
            await conn.execute(
                "UPDATE checkouts SET invoice_number = $2 WHERE id = $1",
                checkout.id,
                invoice.number,
            )
            await notify.send(conn, notify.AccountChange("credits_added", checkout.workspace_id))
        return invoice, False

    # ---- alerts --------------------------------------------------------------------------

    async def alerts(self, workspace_id: str) -> AlertsRow:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM workspaces WHERE id = $1", workspace_id)
        if row is None:
            raise db.no_workspace(workspace_id)
        return _alerts(row)

    async def set_alerts(self, workspace_id: str, alerts: Alerts) -> AlertsRow:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE workspaces SET alert_below_nano = $2, alert_webhook_url = $3,"
                " alert_webhook_secret = $4 WHERE id = $1 RETURNING *",
                *(workspace_id, alerts.balance_below_nano, alerts.webhook_url),
                alerts.webhook_secret,
            )
            if row is None:
                raise db.no_workspace(workspace_id)
            await notify.send(conn, notify.AccountChange("alerts_set", workspace_id))
        return _alerts(row)

    async def move_alerts(
        self, workspace_id: str, before: frozenset[str], after: frozenset[str]
    ) -> bool:
        """Compare-and-set of the kinds in force: True for the one caller that moved them
        from `before` to `after` (it sends the webhooks of the new ones)."""
        async with self._pool.acquire() as conn:
            done = await conn.fetchval(
                "UPDATE workspaces SET alerts_in_force = $3 WHERE id = $1"
                " AND alerts_in_force = $2 RETURNING true",
                workspace_id,
                _kinds(before),
                _kinds(after),
            )
        return bool(done)

    async def set_delivery_error(self, workspace_id: str, error: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE workspaces SET alert_delivery_error = $2 WHERE id = $1",
                workspace_id,
                error[:MAX_ERROR_CHARS],
            )

    # ---- the recent-request log ----------------------------------------------------------

    async def log_requests(self, entries: Sequence[LoggedRequest]) -> None:
        """Stores ended calls (one statement) and keeps each workspace's last
        MAX_LOGGED_PER_WORKSPACE."""
        rows = [msgspec.structs.astuple(e) for e in entries]
        columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
        columns[2] = [_at(at_ms) for at_ms in columns[2]]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO request_log (workspace_id, request_id, at, key_id, model, rpc,"
                " status, prompt_tokens, completion_tokens, cost_nano)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[],"
                " $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[])",
                *columns,
            )
            await conn.execute(
                "DELETE FROM request_log r USING (SELECT w, (SELECT id FROM request_log"
                " WHERE workspace_id = w ORDER BY id DESC OFFSET $2 LIMIT 1) AS cut"
                " FROM unnest($1::text[]) AS w) c WHERE r.workspace_id = c.w AND r.id <= c.cut",
                sorted(set(columns[0])),
                MAX_LOGGED_PER_WORKSPACE,
            )

    async def recent_requests(
        self, workspace_id: str, *, key_id: str, limit: int
    ) -> list[LoggedRequest]:
        """Newest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM request_log WHERE workspace_id = $1 AND ($2 = '' OR key_id = $2)"
                " ORDER BY id DESC LIMIT $3",
                workspace_id,
                key_id,
                limit,
            )
        return [
            LoggedRequest(
                **{k: row[k] for k in ("workspace_id", "request_id", "key_id", "model", "rpc")},
                at_ms=_ms(row["at"]),
                status=row["status"],
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                cost_nano=row["cost_nano"],
            )
            for row in rows
        ]

    async def keys_last_used(self, workspace_id: str) -> dict[str, int]:
        """When each key of the workspace last made a request in the log (ms); keys not in
        its last MAX_LOGGED_PER_WORKSPACE requests are left out."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT key_id, max(at) AS at FROM request_log WHERE workspace_id = $1"
                " GROUP BY key_id",
                workspace_id,
            )
        return {row["key_id"]: _ms(row["at"]) for row in rows}

    # ---- who owns what (for access) ------------------------------------------------------

    async def workspace_of_key(self, key_id: str) -> str | None:
        async with self._pool.acquire() as conn:
            found = await conn.fetchval("SELECT workspace_id FROM keys WHERE id = $1", key_id)
        return None if found is None else str(found)

    async def workspace_of_endpoint(self, endpoint_id: str) -> str | None:
        async with self._pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT workspace_id FROM endpoints WHERE id = $1", endpoint_id
            )
        return None if found is None else str(found)

    async def workspace_of_invoice(self, number: int) -> str | None:
        async with self._pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT workspace_id FROM invoices WHERE number = $1", number
            )
        return None if found is None else str(found)

    async def workspace_exists(self, workspace_id: str) -> bool:
        async with self._pool.acquire() as conn:
            found = await conn.fetchval("SELECT 1 FROM workspaces WHERE id = $1", workspace_id)
        return found is not None


async def _owned(conn: Any, user_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM workspaces WHERE owner_user_id = $1 ORDER BY created_at, id", user_id
    )
    return [row["id"] for row in rows]


async def _user(conn: Any, row: Any) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        password_hash=row["password_hash"],
        created_ms=_ms(row["created_at"]),
        workspace_ids=await _owned(conn, row["id"]),
        starter_invoice=row["starter_invoice"] or 0,
    )


async def _checkout(conn: Any, row: Any) -> CheckoutRow:
    invoice = None
    if row["invoice_number"] is not None:
        found = await conn.fetchrow(
            "SELECT * FROM invoices WHERE number = $1", row["invoice_number"]
        )
        invoice = _invoice(found)
    return CheckoutRow(
        id=row["id"],
        workspace_id=row["workspace_id"],
        amount_nano=row["amount_nano"],
        idempotency_key=row["idempotency_key"],
        provider_id=row["provider_id"],
        approve_url=row["approve_url"],
        created_ms=_ms(row["created_at"]),
        invoice=invoice,
    )


def _kinds(kinds: frozenset[str]) -> str:
    return ",".join(sorted(kinds))


def _alerts(row: Any) -> AlertsRow:
    in_force = row["alerts_in_force"]
    return AlertsRow(
        workspace=_workspace(row),
        in_force=frozenset(in_force.split(",")) if in_force else frozenset(),
        delivery_error=row["alert_delivery_error"],
    )
