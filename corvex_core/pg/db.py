"""What every store of the cluster ledger shares: its pool, its clock, and row look-ups.

It owns how a core connects (pool bounds, timeouts) and nothing about what is stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from corvex_core import errors

# A pool connection and a plain one answer the same calls.
Connection = asyncpg.Connection | PoolConnectionProxy
Pool = asyncpg.Pool
Clock = Callable[[], dt.datetime]

POOL_MAX_SIZE: Final = 10
# A statement that has not finished by then is cancelled: a stuck database must turn into a
# clean refusal in the core, not a request that hangs.
COMMAND_TIMEOUT_S: Final = 10.0


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def utc_month(at: dt.datetime) -> str:
    """The UTC calendar month of an aware time, "YYYY-MM" (the ledger's month_of)."""
    assert at.tzinfo is not None, "naive datetime"
    utc = at.astimezone(dt.UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


async def open_pool(dsn: str, *, max_size: int = POOL_MAX_SIZE) -> Pool:
    """A pool of up to `max_size` connections; close it with `await pool.close()`."""
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, command_timeout=COMMAND_TIMEOUT_S
    )


async def require_workspace(conn: Connection, workspace_id: str) -> None:
    if await conn.fetchval("SELECT 1 FROM workspaces WHERE id = $1", workspace_id) is None:
        raise no_workspace(workspace_id)


async def require_key(conn: Connection, key_id: str) -> None:
    if await conn.fetchval("SELECT 1 FROM keys WHERE id = $1", key_id) is None:
        raise no_key(key_id)


def no_workspace(workspace_id: str) -> errors.NotFound:
    return errors.NotFound(f"no workspace {workspace_id}", metadata={"workspace_id": workspace_id})


def no_key(key_id: str) -> errors.NotFound:
    return errors.NotFound(f"no key {key_id}", metadata={"key_id": key_id})
