"""Reserved endpoints in the cluster ledger: their rows, and the money their time costs.

Each change is one transaction that sends an `endpoint_changed` notice. A charge (a period,
or added replicas for the rest of one) comes straight out of the workspace's balance that no
lease holds, within its spend cap less what is leased (as a lease is granted, pg/leases.py),
and is refused whole, with InsufficientCredits saying by what, when it does not fit. Its
charge id makes a retry count once; a period is charged only while the endpoint is not
deleted and only as the period after the last one. Lock order: the endpoint, then its
workspace (a lease locks only workspaces, so nothing here waits on itself in a cycle).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import msgspec

from corvex.quoting import quote
from corvex_core import errors
from corvex_core.ledger import check_fixed_affordable
from corvex_core.pg import db, notify
from corvex_core.pg.db import Connection
from corvex_core.records import SuspendedBy
from corvex_core.state import Endpoint, EndpointStatus, Workspace

_SELECT: Final = (
    "SELECT e.*, coalesce(c.address, '') AS address"
    " FROM endpoints AS e LEFT JOIN cores AS c ON c.core_id = e.core_id"
)
# Takes `amount` from the balance no lease holds and within the cap less what is leased; a row
# comes back only if it fit. $3 is the month of the charge (a later month resets the spend).
_TAKE: Final = """
UPDATE workspaces SET
    balance_nano = balance_nano - $2,
    month_spend_nano = CASE WHEN $3 > month THEN 0 ELSE month_spend_nano END + $2,
    month = GREATEST(month, $3)
WHERE id = $1 AND balance_nano - leased_nano >= $2
  AND (spend_cap_nano IS NULL OR spend_cap_nano
       - CASE WHEN $3 > month THEN 0 ELSE month_spend_nano END - leased_nano >= $2)
RETURNING id
"""


class EndpointRow(msgspec.Struct, frozen=True):
    """An endpoint as the ledger has it, with its home core and what that core said of it."""

    endpoint: Endpoint
    core_id: str
    # Where the home core serves (its last heartbeat's address; "" before its first).
    address: str
    phase: str
    reason: str
    resizes: int


class EndpointGone(Exception):
    """The endpoint was deleted, or billed by someone else meanwhile: nothing was changed."""


class EndpointStore:
    """See the module docstring. Times come from `clock` (injectable for tests)."""

    def __init__(self, pool: db.Pool, *, clock: db.Clock = db.utc_now) -> None:
        self._pool = pool
        self._clock = clock

    # ---- reads -----------------------------------------------------------------------------

    async def get(self, endpoint_id: str) -> EndpointRow | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_SELECT + " WHERE e.id = $1", endpoint_id)
        return None if row is None else _row(row)

    async def live(self) -> list[EndpointRow]:
        """Every endpoint not deleted, oldest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _SELECT + " WHERE e.status <> 'deleted' ORDER BY e.created_at, e.id"
            )
        return [_row(row) for row in rows]

    async def workspace_of(self, endpoint_id: str) -> str | None:
        async with self._pool.acquire() as conn:
            found: str | None = await conn.fetchval(
                "SELECT workspace_id FROM endpoints WHERE id = $1", endpoint_id
            )
        return found

    # ---- changes ---------------------------------------------------------------------------

    async def create(
        self, endpoint: Endpoint, core_id: str, *, first_nano: int, what: str, most: int
    ) -> EndpointRow:
        """Stores a new endpoint of `core_id` if its workspace has fewer than `most` and can
        afford its first period (`first_nano`, checked, not taken: it is charged when the
        replicas are ready). Raises InsufficientCredits or InvalidRequest, storing nothing."""
        async with self._pool.acquire() as conn, conn.transaction():
            ws = await conn.fetchrow(
                "SELECT * FROM workspaces WHERE id = $1 FOR NO KEY UPDATE", endpoint.workspace_id
            )
            if ws is None:
                raise db.no_workspace(endpoint.workspace_id)
            live = await conn.fetch(
                "SELECT model_id FROM endpoints WHERE workspace_id = $1 AND status <> 'deleted'",
                endpoint.workspace_id,
            )
            if any(row["model_id"] == endpoint.model_id for row in live):
                raise errors.InvalidRequest(
                    f"The workspace already has an endpoint named {quote(endpoint.name)}.",
                    param="name",
                )
            if len(live) >= most:
                raise errors.InvalidRequest(
                    f"A workspace may have at most {most} reserved endpoints; delete one first.",
                    param="workspace_id",
                )
            _check_affordable(ws, first_nano, what, db.utc_month(self._clock()))
            await conn.execute(
                "INSERT INTO endpoints (id, workspace_id, name, model_id, offering_id,"
                " base_model, replicas, created_at, core_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                endpoint.id, endpoint.workspace_id, endpoint.name, endpoint.model_id,
                endpoint.offering_id, endpoint.base_model, endpoint.replicas,
                _at(endpoint.created_ms), core_id,
            )  # fmt: skip
            return await self._changed(conn, endpoint.id)

    async def charge_period(
        self,
        endpoint_id: str,
        *,
        period: int,
        start_ms: int,
        end_ms: int,
        replicas: int,
        cost_nano: int,
        rate_card_version: str,
        core_id: str,
        what: str,
    ) -> EndpointRow:
        """Charges period `period` ([start_ms, end_ms) of `replicas`), which must follow the
        last one charged, and resumes the endpoint if it was suspended. Raises
        InsufficientCredits or EndpointGone, changing nothing."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._lock(conn, endpoint_id)
            if row["status"] == "deleted" or row["period"] != period - 1:
                raise EndpointGone(endpoint_id)
            assert row["replicas"] == replicas, "a period charged for another replica count"
            await self._take(
                conn, row, f"{endpoint_id}:p{period}", cost_nano, replicas * (end_ms - start_ms)
                // 1000, rate_card_version, core_id, what,
            )  # fmt: skip
            await conn.execute(
                "UPDATE endpoints SET period = $2, paid_until = $3,"
                " charged_nano = charged_nano + $4, status = 'active', suspended_by = NULL"
                " WHERE id = $1",
                endpoint_id, period, _at(end_ms), cost_nano,
            )  # fmt: skip
            return await self._changed(conn, endpoint_id)

    async def resize(
        self,
        endpoint_id: str,
        replicas: int,
        *,
        charge_nano: int,
        charged_replica_s: int,
        rate_card_version: str,
        core_id: str,
        what: str,
    ) -> EndpointRow:
        """A new replica count, charging `charge_nano` for added replicas (the rest of this
        period). Raises InsufficientCredits or EndpointGone, changing nothing."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._lock(conn, endpoint_id)
            if row["status"] == "deleted":
                raise EndpointGone(endpoint_id)
            resizes = row["resizes"]
            if charge_nano > 0:
                resizes += 1
                await self._take(
                    conn, row, f"{endpoint_id}:r{resizes}", charge_nano, charged_replica_s,
                    rate_card_version, core_id, what,
                )  # fmt: skip
            await conn.execute(
                "UPDATE endpoints SET replicas = $2, resizes = $3,"
                " charged_nano = charged_nano + $4 WHERE id = $1",
                endpoint_id, replicas, resizes, charge_nano,
            )  # fmt: skip
            return await self._changed(conn, endpoint_id)

    async def suspend(self, endpoint_id: str, by: SuspendedBy) -> EndpointRow:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE endpoints SET status = 'suspended', suspended_by = $2"
                " WHERE id = $1 AND status = 'active'",
                endpoint_id,
                by.value,
            )
            return await self._changed(conn, endpoint_id)

    async def affordable(self, workspace_id: str, amount_nano: int, what: str) -> None:
        """Raises InsufficientCredits unless the workspace could be charged `amount_nano` now
        (nothing is taken)."""
        async with self._pool.acquire() as conn:
            ws = await conn.fetchrow("SELECT * FROM workspaces WHERE id = $1", workspace_id)
        if ws is None:
            raise db.no_workspace(workspace_id)
        _check_affordable(ws, amount_nano, what, db.utc_month(self._clock()))

    async def delete(self, endpoint_id: str) -> EndpointRow:
        """Deletes it (once; deleting again changes nothing). Its billing stops at once on
        every core; its home core stops its replicas when it hears."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE endpoints SET status = 'deleted', suspended_by = NULL, phase = 'deleted',"
                " reason = '' WHERE id = $1 AND status <> 'deleted'",
                endpoint_id,
            )
            return await self._changed(conn, endpoint_id)

    async def publish(self, endpoint_id: str, phase: str, reason: str) -> None:
        """What the home core says of its replicas now, for the other cores' lists."""
        async with self._pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchval(
                "UPDATE endpoints SET phase = $2, reason = $3"
                " WHERE id = $1 AND status <> 'deleted' AND (phase, reason) <> ($2, $3)"
                " RETURNING workspace_id",
                endpoint_id, phase, reason,
            )  # fmt: skip
            if updated is not None:
                await notify.send(conn, notify.AccountChange("endpoint_changed", updated))

    # ---- steps -----------------------------------------------------------------------------

    async def _lock(self, conn: Connection, endpoint_id: str) -> Any:
        row = await conn.fetchrow("SELECT * FROM endpoints WHERE id = $1 FOR UPDATE", endpoint_id)
        if row is None:
            raise errors.NotFound(f"No reserved endpoint {quote(endpoint_id)}.")
        return row

    async def _take(
        self,
        conn: Connection,
        endpoint: Any,
        charge_id: str,
        cost_nano: int,
        replica_s: int,
        rate_card_version: str,
        core_id: str,
        what: str,
    ) -> None:
        now = self._clock()
        inserted = await conn.fetchval(
            "INSERT INTO endpoint_charges (charge_id, endpoint_id, workspace_id, core_id,"
            " replica_seconds, cost_nano, rate_card_version, at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (charge_id) DO NOTHING"
            " RETURNING charge_id",
            charge_id, endpoint["id"], endpoint["workspace_id"], core_id, replica_s, cost_nano,
            rate_card_version, now,
        )  # fmt: skip
        assert inserted is not None, f"charge {charge_id} made twice"
        month = db.utc_month(now)
        if await conn.fetchval(_TAKE, endpoint["workspace_id"], cost_nano, month) is None:
            ws = await conn.fetchrow(
                "SELECT * FROM workspaces WHERE id = $1", endpoint["workspace_id"]
            )
            _check_affordable(ws, cost_nano, what, month)
            raise AssertionError("a charge that fits was not taken")

    async def _changed(self, conn: Connection, endpoint_id: str) -> EndpointRow:
        row = await conn.fetchrow(_SELECT + " WHERE e.id = $1", endpoint_id)
        if row is None:
            raise errors.NotFound(f"No reserved endpoint {quote(endpoint_id)}.")
        await notify.send(conn, notify.AccountChange("endpoint_changed", row["workspace_id"]))
        return _row(row)


def _check_affordable(ws: Any, amount_nano: int, what: str, month: str) -> None:
    """Raises InsufficientCredits, worded as the single-core ledger words it, unless
    `amount_nano` fits the balance no lease holds and the spend cap less what is spent and
    leased: the workspace row seen as a single core's workspace whose leases are held."""
    rolled = month > ws["month"]
    view = Workspace(
        id=ws["id"],
        name=ws["name"],
        created_ms=0,
        balance_nano=ws["balance_nano"],
        spend_cap_nano=ws["spend_cap_nano"],
        month=month if rolled else ws["month"],
        month_spend_nano=0 if rolled else ws["month_spend_nano"],
        held_nano=ws["leased_nano"],
    )
    check_fixed_affordable(view, amount_nano, what)


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _ms(at: dt.datetime | None) -> int:
    return 0 if at is None else round(at.timestamp() * 1000)


def _row(row: Any) -> EndpointRow:
    suspended_by = row["suspended_by"]
    return EndpointRow(
        endpoint=Endpoint(
            id=row["id"],
            workspace_id=row["workspace_id"],
            name=row["name"],
            model_id=row["model_id"],
            offering_id=row["offering_id"],
            base_model=row["base_model"],
            replicas=row["replicas"],
            created_ms=_ms(row["created_at"]),
            status=EndpointStatus(row["status"]),
            suspended_by=None if suspended_by is None else SuspendedBy(suspended_by),
            period=row["period"],
            paid_until_ms=_ms(row["paid_until"]),
            charged_nano=row["charged_nano"],
        ),
        core_id=row["core_id"],
        address=row["address"],
        phase=row["phase"],
        reason=row["reason"],
        resizes=row["resizes"],
    )
