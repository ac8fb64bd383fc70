"""Races against a real PostgreSQL: many connections at once can never overdraw anything.

Every test here starts its operations together on separate pooled connections (the pool is
warmed first, so none waits for a connection to open) and then checks the money to the unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random

from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.leases import Lease, LeaseExceeded, LeaseGone, LeaseStore, TokenLease
from tests.core.pg.conftest import CENT, CheckLedger, FakeClock, MakeWorkspace, charge

RACERS = 50
GRANT_NANO = 3 * CENT


async def warm(pool: db.Pool, connections: int) -> None:
    """Opens `connections` pool connections up front, so a race is not staggered by connects."""
    held = [await pool.acquire() for _ in range(connections)]
    pids = {conn.get_server_pid() for conn in held}
    for conn in held:
        await pool.release(conn)
    assert len(pids) == connections


async def test_fifty_acquires_at_once_lease_exactly_what_the_balance_holds(
    pool: db.Pool,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    # Enough for 20 grants and a bit: the 21st cannot have its minimum, so exactly 20 win.
    ws = await make_workspace(20 * GRANT_NANO + GRANT_NANO - 1)
    await warm(pool, RACERS)
    got = await asyncio.gather(
        *(leases.acquire(ws, f"core-{i}", GRANT_NANO, GRANT_NANO, 30) for i in range(RACERS))
    )
    granted = [lease.credit_nano for lease in got if lease is not None]
    assert granted == [GRANT_NANO] * 20
    row = await accounts.workspace(ws)
    assert row.leased_nano == sum(granted) <= row.balance_nano
    await check_ledger()


async def test_fifty_acquires_that_take_what_is_left_lease_the_balance_to_the_unit(
    pool: db.Pool,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    balance_nano = 20 * GRANT_NANO + 12_345
    ws = await make_workspace(balance_nano)
    await warm(pool, RACERS)
    got = await asyncio.gather(
        *(leases.acquire(ws, f"core-{i}", GRANT_NANO, 1, 30) for i in range(RACERS))
    )
    granted = [lease.credit_nano for lease in got if lease is not None]
    assert sum(granted) == balance_nano and len(granted) == 21
    assert (await accounts.workspace(ws)).leased_nano == balance_nano
    await check_ledger()


async def test_fifty_acquires_at_once_never_pass_the_cap(
    pool: db.Pool,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    cap_nano = 20 * GRANT_NANO + 7
    ws = await make_workspace(1000 * CENT, cap_nano=cap_nano)
    await warm(pool, RACERS)
    got = await asyncio.gather(
        *(leases.acquire(ws, f"core-{i}", GRANT_NANO, 1, 30) for i in range(RACERS))
    )
    granted = sum(lease.credit_nano for lease in got if lease is not None)
    row = await accounts.workspace(ws)
    assert granted == row.leased_nano == cap_nano
    assert row.month_spend_nano + row.leased_nano <= cap_nano
    await check_ledger()


async def test_fifty_token_acquires_at_once_never_pass_the_keys_limit(
    pool: db.Pool,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(CENT, monthly_tokens=2_000)
    await warm(pool, RACERS)
    got = await asyncio.gather(
        *(leases.acquire_tokens(f"{ws}-key", f"core-{i}", 100, 100, 30) for i in range(RACERS))
    )
    assert sum(lease.tokens for lease in got if lease is not None) == 2_000
    assert (await accounts.key(f"{ws}-key")).tokens_leased == 2_000
    await check_ledger()


async def test_one_batch_sent_by_ten_connections_at_once_is_charged_once(
    pool: db.Pool,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 5 * CENT, 1, 30)
    assert lease is not None
    batch = [charge(ws, CENT // 10) for _ in range(20)]
    await warm(pool, 10)
    results = await asyncio.gather(*(leases.charge(lease.id, batch) for _ in range(10)))
    new = sorted(charge_id for result in results for charge_id in result)
    assert new == sorted(c.charge_id for c in batch)
    assert (await accounts.workspace(ws)).balance_nano == 10 * CENT - 2 * CENT
    await check_ledger()


async def test_charges_releases_renewals_and_sweeps_racing_keep_every_invariant(
    pool: db.Pool,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    clock: FakeClock,
    check_ledger: CheckLedger,
) -> None:
    """Four cores spend two workspaces (credit and key tokens) while two sweepers expire
    leases under them: whatever interleaves, nothing goes negative, no deadlock occurs, and
    every unit charged or still leased is accounted for."""
    rng = random.Random(15)
    cap_nano, monthly_tokens = CENT + 3, 400
    workspaces = [
        await make_workspace(2 * CENT, cap_nano=cap_nano, monthly_tokens=monthly_tokens)
        for _ in range(2)
    ]
    await warm(pool, 40)

    async def spend(ws: str, lease: Lease, tokens: TokenLease) -> None:
        spent_nano = spent_tokens = 0
        for _ in range(rng.randint(0, 3)):
            if tokens.tokens - spent_tokens < 20:
                return
            cost = rng.randint(0, (lease.credit_nano - spent_nano) // 3)  # Within the lease.
            batch = [charge(ws, c, token_lease_id=tokens.id) for c in (cost, cost // 2)]
            try:
                await leases.charge(lease.id, batch)
            except LeaseGone:
                return  # A sweep took a lease: its credit went back, as it should.
            spent_nano += cost + cost // 2
            spent_tokens += 20
            await asyncio.sleep(0)

    async def core(name: str) -> None:
        for _ in range(6):
            ws = rng.choice(workspaces)
            ttl_s = rng.choice([5, 50])
            lease = await leases.acquire(ws, name, rng.randint(1, CENT // 4), 1, ttl_s)
            tokens = await leases.acquire_tokens(f"{ws}-key", name, 60, 1, ttl_s)
            if lease is not None and tokens is not None:
                await spend(ws, lease, tokens)
            with contextlib.suppress(LeaseGone):
                if lease is not None and rng.random() < 0.5:
                    await leases.renew(lease.id, 5, top_up_nano=rng.randint(0, CENT // 4))
                elif lease is not None:
                    await leases.release(lease.id)
            with contextlib.suppress(LeaseGone):
                if tokens is not None and rng.random() < 0.5:
                    await leases.renew_tokens(tokens.id, 5, top_up_tokens=20)
                elif tokens is not None:
                    await leases.release_tokens(tokens.id)

    async def sweeper() -> None:
        for step in range(10):
            await leases.expire(clock.now + dt.timedelta(seconds=step))
            await asyncio.sleep(0)

    await asyncio.gather(*(core(f"core-{i}") for i in range(4)), sweeper(), sweeper())
    await check_ledger()
    for ws in workspaces:
        row = await accounts.workspace(ws)
        assert row.month_spend_nano + row.leased_nano <= cap_nano
        key = await accounts.key(f"{ws}-key")
        assert key.month_tokens + key.tokens_leased <= monthly_tokens
    await leases.expire(clock.now + dt.timedelta(seconds=3600))
    await check_ledger()
    for ws in workspaces:
        assert (await accounts.workspace(ws)).leased_nano == 0
        assert (await accounts.key(f"{ws}-key")).tokens_leased == 0


async def test_concurrent_charges_past_a_lease_let_through_only_what_it_holds(
    pool: db.Pool, leases: LeaseStore, make_workspace: MakeWorkspace, check_ledger: CheckLedger
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", CENT, 1, 30)
    assert lease is not None
    await warm(pool, 20)

    async def one() -> int:
        try:
            await leases.charge(lease.id, [charge(ws, CENT // 8)])
        except LeaseExceeded:
            return 0
        return CENT // 8

    paid = await asyncio.gather(*(one() for _ in range(20)))
    assert sum(paid) == 8 * (CENT // 8)
    await check_ledger()


async def test_top_ups_racing_with_one_idempotency_key_land_once(
    pool: db.Pool,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(0)
    await warm(pool, 20)
    results = await asyncio.gather(
        *(accounts.top_up(ws, 5 * CENT, "manual", "same-key") for _ in range(10)),
        *(accounts.top_up(ws, CENT, "manual", f"key-{i}") for i in range(10)),
    )
    replays = [replayed for _, replayed in results[:10]]
    assert sorted(replays) == [False] + [True] * 9
    assert len({invoice.number for invoice, _ in results[:10]}) == 1
    assert (await accounts.workspace(ws)).balance_nano == 15 * CENT
    numbers = [invoice.number for invoice in await accounts.invoices(ws)]
    assert numbers == list(range(numbers[0], numbers[0] + 11))  # No gaps.
    await check_ledger()
