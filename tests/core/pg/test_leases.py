"""Each lease operation against a real PostgreSQL, one at a time (races are in test_races.py)."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from corvex_core import errors
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.leases import LeaseExceeded, LeaseGone, LeaseStore, Want
from tests.core.pg.conftest import CENT, CheckLedger, FakeClock, MakeWorkspace, charge

TTL_S = 30.0


# ---- acquire -----------------------------------------------------------------------------------


async def test_acquire_grants_what_is_asked_when_the_balance_covers_it(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(100 * CENT)
    lease = await leases.acquire(ws, "core-a", 30 * CENT, 1, TTL_S)
    assert lease is not None
    assert (lease.workspace_id, lease.core_id, lease.credit_nano) == (ws, "core-a", 30 * CENT)
    assert lease.expires_at == clock.now + dt.timedelta(seconds=TTL_S)
    row = await accounts.workspace(ws)
    assert (row.balance_nano, row.leased_nano) == (100 * CENT, 30 * CENT)


async def test_acquire_grants_less_than_asked_but_never_less_than_the_minimum(
    leases: LeaseStore, make_workspace: MakeWorkspace, check_ledger: CheckLedger
) -> None:
    ws = await make_workspace(10 * CENT)
    first = await leases.acquire(ws, "core-a", 7 * CENT, 1, TTL_S)
    assert first is not None and first.credit_nano == 7 * CENT
    second = await leases.acquire(ws, "core-b", 7 * CENT, 1, TTL_S)
    assert second is not None and second.credit_nano == 3 * CENT  # All that was left.
    assert await leases.acquire(ws, "core-c", 7 * CENT, 1, TTL_S) is None
    await check_ledger()


async def test_acquire_refuses_when_less_than_the_minimum_is_spendable(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(5 * CENT)
    assert await leases.acquire(ws, "core-a", 10 * CENT, 6 * CENT, TTL_S) is None
    assert (await accounts.workspace(ws)).leased_nano == 0
    spendable = await leases.spendable(ws)
    assert (spendable.spendable_nano, spendable.capped) == (5 * CENT, False)


async def test_acquire_refuses_an_empty_workspace(
    leases: LeaseStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(0)
    assert await leases.acquire(ws, "core-a", 1, 1, TTL_S) is None


async def test_acquire_on_an_unknown_workspace_is_not_found(leases: LeaseStore) -> None:
    with pytest.raises(errors.NotFound):
        await leases.acquire("ws_missing", "core-a", 1, 1, TTL_S)


async def test_a_lease_counts_against_the_cap_headroom(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(100 * CENT, cap_nano=20 * CENT)
    first = await leases.acquire(ws, "core-a", 15 * CENT, 1, TTL_S)
    assert first is not None and first.credit_nano == 15 * CENT
    second = await leases.acquire(ws, "core-b", 15 * CENT, 1, TTL_S)
    assert second is not None and second.credit_nano == 5 * CENT
    assert await leases.acquire(ws, "core-c", 1, 1, TTL_S) is None
    spendable = await leases.spendable(ws)
    assert (spendable.spendable_nano, spendable.capped) == (0, True)


async def test_spend_counts_against_the_cap_and_a_lowered_cap_stops_leases(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(100 * CENT, cap_nano=20 * CENT)
    lease = await leases.acquire(ws, "core-a", 10 * CENT, 1, TTL_S)
    assert lease is not None
    await leases.charge(lease.id, [charge(ws, 10 * CENT)])
    # Spent 10 of a 20 cap, nothing leased: 10 left under the cap.
    second = await leases.acquire(ws, "core-a", 50 * CENT, 1, TTL_S)
    assert second is not None and second.credit_nano == 10 * CENT
    await leases.release(second.id)
    await accounts.set_spend_cap(ws, 5 * CENT)  # Below this month's spend: allowed.
    assert await leases.acquire(ws, "core-a", 1, 1, TTL_S) is None
    assert (await leases.spendable(ws)).spendable_nano < 0


async def test_a_new_month_resets_the_spend_the_cap_counts(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(100 * CENT, cap_nano=20 * CENT)
    lease = await leases.acquire(ws, "core-a", 20 * CENT, 1, TTL_S)
    assert lease is not None
    await leases.charge(lease.id, [charge(ws, 20 * CENT)])
    assert await leases.acquire(ws, "core-a", 1, 1, TTL_S) is None
    assert (await accounts.workspace(ws)).month == "2026-12"
    clock.advance(120)  # 2027-01-01 00:00 UTC
    fresh = await leases.acquire(ws, "core-a", 50 * CENT, 1, TTL_S)
    assert fresh is not None and fresh.credit_nano == 20 * CENT
    row = await accounts.workspace(ws)
    assert (row.month, row.month_spend_nano, row.balance_nano) == ("2027-01", 0, 80 * CENT)


async def test_a_clock_that_goes_back_does_not_undo_a_month(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(100 * CENT, cap_nano=20 * CENT)
    clock.advance(120)
    lease = await leases.acquire(ws, "core-a", 20 * CENT, 1, TTL_S)
    assert lease is not None
    await leases.charge(lease.id, [charge(ws, 20 * CENT)])
    clock.advance(-120)  # Another core's clock, a little behind, back in December.
    assert await leases.acquire(ws, "core-b", 1, 1, TTL_S) is None
    assert (await accounts.workspace(ws)).month == "2027-01"


# ---- renew, release, expire --------------------------------------------------------------------


async def test_renew_extends_the_ttl_and_tops_up_with_what_fits(
    leases: LeaseStore, make_workspace: MakeWorkspace, clock: FakeClock, check_ledger: CheckLedger
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 4 * CENT, 1, TTL_S)
    assert lease is not None
    clock.advance(20)
    renewed = await leases.renew(lease.id, TTL_S, top_up_nano=100 * CENT)
    assert renewed.credit_nano == 10 * CENT
    assert renewed.expires_at == clock.now + dt.timedelta(seconds=TTL_S)
    again = await leases.renew(lease.id, TTL_S, top_up_nano=CENT)
    assert again.credit_nano == 10 * CENT  # Nothing left to add; the renewal still holds.
    await check_ledger()


async def test_a_lease_past_its_ttl_cannot_be_renewed(
    leases: LeaseStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 4 * CENT, 1, TTL_S)
    assert lease is not None
    clock.advance(TTL_S)
    with pytest.raises(LeaseGone):
        await leases.renew(lease.id, TTL_S)


async def test_release_returns_the_unused_credit_once(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 4 * CENT, 1, TTL_S)
    assert lease is not None
    await leases.charge(lease.id, [charge(ws, CENT)])
    assert await leases.release(lease.id) == 3 * CENT
    assert await leases.release(lease.id) is None
    row = await accounts.workspace(ws)
    assert (row.balance_nano, row.leased_nano) == (9 * CENT, 0)


async def test_expire_returns_the_credit_of_leases_past_their_ttl_only(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    clock: FakeClock,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT)
    dead = await leases.acquire(ws, "core-dead", 4 * CENT, 1, 10)
    live = await leases.acquire(ws, "core-live", 4 * CENT, 1, 60)
    assert dead is not None and live is not None
    assert (await leases.expire(clock.now + dt.timedelta(seconds=9))).leases == []
    expired = await leases.expire(clock.now + dt.timedelta(seconds=10))
    assert [(e.id, e.credit_nano) for e in expired.leases] == [(dead.id, 4 * CENT)]
    assert (await accounts.workspace(ws)).leased_nano == 4 * CENT
    with pytest.raises(LeaseGone):
        await leases.charge(dead.id, [charge(ws, 1)])
    await check_ledger()


async def test_charges_may_still_be_paid_from_a_lease_past_its_ttl_until_it_is_swept(
    leases: LeaseStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 4 * CENT, 1, 10)
    assert lease is not None
    clock.advance(11)
    first = charge(ws, CENT)
    assert await leases.charge(lease.id, [first]) == [first.charge_id]
    expired = await leases.expire(clock.now)
    assert [e.credit_nano for e in expired.leases] == [3 * CENT]


# ---- charges -----------------------------------------------------------------------------------


async def test_a_charge_moves_cost_out_of_lease_and_balance_and_into_the_month(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 5 * CENT, 1, TTL_S)
    assert lease is not None
    batch = [charge(ws, CENT, tokens=100), charge(ws, 2 * CENT, tokens=50)]
    assert await leases.charge(lease.id, batch) == [c.charge_id for c in batch]
    row = await accounts.workspace(ws)
    assert (row.balance_nano, row.leased_nano, row.month_spend_nano) == (
        7 * CENT,
        2 * CENT,
        3 * CENT,
    )
    assert (await accounts.key(f"{ws}-key")).month_tokens == 150
    assert await leases.release(lease.id) == 2 * CENT
    await check_ledger()


async def test_a_retried_charge_counts_once(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 5 * CENT, 1, TTL_S)
    assert lease is not None
    first = charge(ws, CENT)
    assert await leases.charge(lease.id, [first]) == [first.charge_id]
    second = charge(ws, CENT)
    assert await leases.charge(lease.id, [first, second]) == [second.charge_id]
    assert await leases.charge(lease.id, [first, second]) == []
    assert (await accounts.workspace(ws)).balance_nano == 8 * CENT
    # Once the lease has ended, a retry of what committed is still answered, not refused.
    await leases.release(lease.id)
    assert await leases.charge(lease.id, [first, second]) == []
    with pytest.raises(LeaseGone):
        await leases.charge(lease.id, [first, charge(ws, 1)])
    await check_ledger()


async def test_charges_beyond_the_lease_are_refused_and_nothing_is_stored(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    pool: db.Pool,
) -> None:
    ws = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 2 * CENT, 1, TTL_S)
    assert lease is not None
    with pytest.raises(LeaseExceeded):
        await leases.charge(lease.id, [charge(ws, CENT), charge(ws, CENT + 1)])
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM charges") == 0
    assert (await accounts.workspace(ws)).balance_nano == 10 * CENT


async def test_a_charge_for_a_key_of_another_workspace_is_refused(
    leases: LeaseStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(10 * CENT)
    other = await make_workspace(10 * CENT)
    lease = await leases.acquire(ws, "core-a", 2 * CENT, 1, TTL_S)
    assert lease is not None
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await leases.charge(lease.id, [charge(other, CENT)])


# ---- token leases ------------------------------------------------------------------------------


async def test_token_leases_share_a_keys_monthly_limit(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=1000)
    key = f"{ws}-key"
    a = await leases.acquire_tokens(key, "core-a", 600, 1, TTL_S)
    b = await leases.acquire_tokens(key, "core-b", 600, 1, TTL_S)
    assert a is not None and b is not None and (a.tokens, b.tokens) == (600, 400)
    assert await leases.acquire_tokens(key, "core-c", 1, 1, TTL_S) is None
    credit = await leases.acquire(ws, "core-a", CENT, 1, TTL_S)
    assert credit is not None
    used = charge(ws, 10, tokens=250, token_lease_id=a.id)
    await leases.charge(credit.id, [used])
    row = await accounts.key(key)
    assert (row.month_tokens, row.tokens_leased) == (250, 750)
    assert await leases.release_tokens(a.id) == 350
    again = await leases.acquire_tokens(key, "core-c", 1000, 1, TTL_S)
    assert again is not None and again.tokens == 350
    await check_ledger()


async def test_charges_beyond_a_token_lease_are_refused(
    leases: LeaseStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=1000)
    tokens = await leases.acquire_tokens(f"{ws}-key", "core-a", 100, 1, TTL_S)
    credit = await leases.acquire(ws, "core-a", CENT, 1, TTL_S)
    assert tokens is not None and credit is not None
    with pytest.raises(LeaseExceeded):
        await leases.charge(credit.id, [charge(ws, 1, tokens=101, token_lease_id=tokens.id)])


async def test_a_revoked_key_gets_no_token_lease(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=1000)
    await accounts.revoke_key(f"{ws}-key")
    assert await leases.acquire_tokens(f"{ws}-key", "core-a", 10, 1, TTL_S) is None
    with pytest.raises(errors.NotFound):
        await leases.acquire_tokens("key_missing", "core-a", 10, 1, TTL_S)


async def test_token_leases_renew_and_expire_like_credit_leases(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    clock: FakeClock,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=1000)
    key = f"{ws}-key"
    lease = await leases.acquire_tokens(key, "core-a", 100, 1, 10)
    assert lease is not None
    renewed = await leases.renew_tokens(lease.id, 10, top_up_tokens=5000)
    assert renewed.tokens == 1000
    clock.advance(10)
    with pytest.raises(LeaseGone):
        await leases.renew_tokens(lease.id, 10)
    expired = await leases.expire(clock.now)
    assert [(t.id, t.tokens) for t in expired.token_leases] == [(lease.id, 1000)]
    assert (await accounts.key(key)).tokens_leased == 0
    await check_ledger()


async def test_a_new_month_resets_a_keys_tokens(
    leases: LeaseStore, accounts: AccountStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=100)
    key = f"{ws}-key"
    tokens = await leases.acquire_tokens(key, "core-a", 100, 1, TTL_S)
    credit = await leases.acquire(ws, "core-a", CENT, 1, TTL_S)
    assert tokens is not None and credit is not None
    await leases.charge(credit.id, [charge(ws, 1, tokens=100, token_lease_id=tokens.id)])
    await leases.release_tokens(tokens.id)
    assert await leases.acquire_tokens(key, "core-a", 1, 1, TTL_S) is None
    clock.advance(120)
    fresh = await leases.acquire_tokens(key, "core-a", 500, 1, TTL_S)
    assert fresh is not None and fresh.tokens == 100
    assert (await accounts.key(key)).month == "2027-01"


# ---- grants by policy, shrinking, a core's restart ---------------------------------------------


async def test_lease_credit_grants_ahead_while_plenty_is_spendable_and_exactly_near_zero(
    leases: LeaseStore, make_workspace: MakeWorkspace, check_ledger: CheckLedger
) -> None:
    ws = await make_workspace(100 * CENT)
    want = Want(least=2 * CENT, most=3 * CENT, ahead=40 * CENT, exact_below=50 * CENT)
    first = await leases.lease_credit(ws, "core-a", None, want, TTL_S)
    assert first.lease is not None and first.granted_nano == 40 * CENT
    assert first.money.leased_nano == 40 * CENT
    # 60 cents left: still at least exact_below, so ahead again (all of it that fits).
    second = await leases.lease_credit(ws, "core-b", None, want, TTL_S)
    assert second.granted_nano == 40 * CENT
    # 20 cents left, below exact_below: only what the request could use.
    third = await leases.lease_credit(ws, "core-a", first.lease.id, want, TTL_S)
    assert third.granted_nano == 3 * CENT
    assert third.lease is not None and third.lease.credit_nano == 43 * CENT
    assert third.money.room.spendable_nano == 17 * CENT
    await check_ledger()


async def test_lease_credit_refuses_below_least_and_makes_no_lease(
    leases: LeaseStore, make_workspace: MakeWorkspace, check_ledger: CheckLedger
) -> None:
    ws = await make_workspace(5 * CENT, cap_nano=4 * CENT)
    refused = await leases.lease_credit(ws, "core-a", None, Want(5 * CENT, 5 * CENT, 5 * CENT), 9)
    assert (refused.lease, refused.granted_nano) == (None, 0)
    assert refused.money.room.spendable_nano == 4 * CENT and refused.money.room.capped
    assert (await leases.leases_of("core-a")) == ([], [])
    await check_ledger()


async def test_a_renewal_that_grants_nothing_still_extends_the_lease(
    leases: LeaseStore, make_workspace: MakeWorkspace, clock: FakeClock
) -> None:
    ws = await make_workspace(10 * CENT)
    grant = await leases.lease_credit(ws, "core-a", None, Want(1, 10 * CENT, 10 * CENT), TTL_S)
    assert grant.lease is not None
    clock.advance(TTL_S / 2)
    renewed = await leases.lease_credit(ws, "core-a", grant.lease.id, Want(0, 0, 5 * CENT), TTL_S)
    assert renewed.granted_nano == 0
    assert renewed.lease is not None
    assert renewed.lease.expires_at == clock.now + dt.timedelta(seconds=TTL_S)
    clock.advance(TTL_S + 1)
    with pytest.raises(LeaseGone):
        await leases.lease_credit(ws, "core-a", grant.lease.id, Want(0, 0, 0), TTL_S)


async def test_shrink_and_a_charge_that_gives_back_return_credit_to_the_workspace(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT)
    grant = await leases.lease_credit(ws, "core-a", None, Want(1, 8 * CENT, 8 * CENT), TTL_S)
    assert grant.lease is not None
    lease_id = grant.lease.id
    assert await leases.shrink(lease_id, 2 * CENT) == 6 * CENT
    with pytest.raises(LeaseExceeded):
        await leases.shrink(lease_id, 7 * CENT)
    assert await leases.charge(lease_id, [charge(ws, CENT)], give_back_nano=4 * CENT)
    row = await accounts.workspace(ws)
    assert (row.balance_nano, row.leased_nano) == (9 * CENT, CENT)
    await leases.release(lease_id)
    assert await leases.shrink(lease_id, 1) is None
    await check_ledger()


async def test_token_grants_follow_the_same_policy(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=1000)
    key = f"{ws}-key"
    want = Want(least=10, most=20, ahead=600, exact_below=700)
    first = await leases.lease_tokens(key, "core-a", None, want, TTL_S)
    assert first.granted_tokens == 600 and first.tokens.tokens_leased == 600
    second = await leases.lease_tokens(key, "core-b", None, want, TTL_S)
    assert second.granted_tokens == 20  # 400 left: below exact_below
    assert second.lease is not None
    assert await leases.shrink_tokens(second.lease.id, 5) == 15
    assert (await accounts.key(key)).tokens_leased == 615
    await accounts.revoke_key(key)
    revoked = await leases.lease_tokens(key, "core-a", None, want, TTL_S)
    assert revoked.granted_tokens == 0 and revoked.tokens.revoked
    await check_ledger()


async def test_release_core_ends_every_lease_of_that_core(
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT, monthly_tokens=1000)
    other = await make_workspace(10 * CENT)
    await leases.lease_credit(ws, "core-a", None, Want(1, 3 * CENT, 3 * CENT), TTL_S)
    await leases.lease_credit(other, "core-a", None, Want(1, 2 * CENT, 2 * CENT), TTL_S)
    await leases.lease_credit(other, "core-b", None, Want(1, 1 * CENT, 1 * CENT), TTL_S)
    await leases.lease_tokens(f"{ws}-key", "core-a", None, Want(1, 100, 100), TTL_S)
    assert await leases.release_core("core-a") == (5 * CENT, 100)
    credit, tokens = await leases.leases_of("core-a")
    assert (credit, tokens) == ([], [])
    assert (await accounts.workspace(other)).leased_nano == CENT
    await check_ledger()
