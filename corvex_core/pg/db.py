"""What every store of the cluster ledger shares: its pool, its clock, and row look-ups.

It owns how a core connects (pool bounds, timeouts) and nothing about what is stored.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import ssl as ssl_module
from collections.abc import Callable, Iterator
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


# What the statements run in this context are for (a core counts its round trips by it).
PURPOSE: Final[contextvars.ContextVar[str]] = contextvars.ContextVar("pg_purpose", default="other")
StatementCounter = Callable[[str], None]


@contextlib.contextmanager
def purpose(name: str) -> Iterator[None]:
    """Statements run inside (in this task and the tasks it starts) count as `name`."""
    token = PURPOSE.set(name)
    try:
        yield
    finally:
        PURPOSE.reset(token)


async def open_pool(
    dsn: str,
    *,
    max_size: int = POOL_MAX_SIZE,
    ssl: ssl_module.SSLContext | None = None,
    on_statement: StatementCounter | None = None,
) -> Pool:
    """A pool of up to `max_size` connections; close it with `await pool.close()`.
    `on_statement` is told the purpose (see `purpose`) of every statement sent: one round trip
    each (BEGIN and COMMIT included)."""
    pool = make_pool(dsn, max_size=max_size, ssl=ssl, on_statement=on_statement)
    await pool
    return pool


def make_pool(
    dsn: str,
    *,
    max_size: int = POOL_MAX_SIZE,
    ssl: ssl_module.SSLContext | None = None,
    on_statement: StatementCounter | None = None,
) -> Pool:
    """As `open_pool`, not yet connected: `await` it (on the running loop) before use. Lets a
    core wire its stores before it starts."""

    async def init(conn: asyncpg.Connection) -> None:
        if on_statement is not None:
            conn.add_query_logger(lambda record: on_statement(PURPOSE.get()))

    pool: Pool = asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT_S,
        ssl=ssl,
        init=init,
    )
    return pool


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


# What "the database cannot be reached right now" looks like: refused or dropped connections,
# a server shutting down or starting up, a statement cancelled by COMMAND_TIMEOUT_S, no free
# connection slot, and the driver's own confusion on a connection that broke under it
# (InternalClientError "another operation is in progress", seen when a server restarts). A
# core turns these into clean refusals (UNAVAILABLE) and retries; anything else is a bug or a
# constraint doing its job.
UNREACHABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.InternalClientError,
)
