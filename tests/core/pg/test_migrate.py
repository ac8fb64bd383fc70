"""Schema migrations against a real PostgreSQL: once each, in order, atomically, race-free."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from corvex_core.pg.migrate import Migration, MigrationError, migrate, migrations

_TABLES = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"


def test_the_shipped_migrations_are_numbered_from_one() -> None:
    shipped = migrations()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    assert shipped[0].name == "0001_ledger.sql"


async def test_migrate_applies_each_migration_once(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await migrate(conn) == [m.version for m in migrations()]
        assert await migrate(conn) == []
        tables = {r["tablename"] for r in await conn.fetch(_TABLES)}
        wanted = {"workspaces", "keys", "invoices", "charges", "leases", "token_leases", "cores"}
        assert wanted <= tables
    finally:
        await conn.close()


async def test_two_cores_migrating_at_once_apply_it_once(empty_dsn: str) -> None:
    conns = [await asyncpg.connect(empty_dsn) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(results) == [[], [m.version for m in migrations()]]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(migrations())
    finally:
        for conn in conns:
            await conn.close()


async def test_a_failing_migration_leaves_the_schema_as_it_was(empty_dsn: str) -> None:
    broken = [
        Migration(1, "0001_one.sql", "CREATE TABLE one (id INT)"),
        Migration(2, "0002_broken.sql", "CREATE TABLE two (id INT); SELECT 1/0"),
    ]
    conn = await asyncpg.connect(empty_dsn)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conn, broken)
        tables = {r["tablename"] for r in await conn.fetch(_TABLES)}
        assert not tables & {"one", "two", "schema_migrations"}
    finally:
        await conn.close()


async def test_an_applied_migration_that_changed_is_refused(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await migrate(conn, [Migration(1, "0001_one.sql", "CREATE TABLE one (id INT)")])
        edited = [Migration(1, "0001_one.sql", "CREATE TABLE one (id BIGINT)")]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, edited)
    finally:
        await conn.close()


async def test_a_database_from_a_newer_build_is_refused(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        newer = [
            Migration(1, "0001_one.sql", "CREATE TABLE one (id INT)"),
            Migration(2, "0002_two.sql", "CREATE TABLE two (id INT)"),
        ]
        await migrate(conn, newer)
        with pytest.raises(MigrationError, match="newer corvex"):
            await migrate(conn, newer[:1])
    finally:
        await conn.close()
