"""Account changes against a real PostgreSQL, and the notices other cores hear of them."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import pytest

from corvex_core import errors
from corvex_core.ledger import MAX_AMOUNT_NANO, MAX_BALANCE_NANO, AutoReload
from corvex_core.pg import notify
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.notify import AccountChange, Subscription, SubscriptionLost
from corvex_core.records import KeyLimits
from tests.core.pg.conftest import CENT, CheckLedger, MakeWorkspace

# The promise to cores: a committed change reaches every listening core within this.
NOTICE_BOUND_S = 1.0


async def next_change(subscription: Subscription) -> AccountChange:
    return await asyncio.wait_for(subscription.get(), NOTICE_BOUND_S)


async def test_a_top_up_credits_the_balance_and_issues_the_next_invoice(
    accounts: AccountStore, make_workspace: MakeWorkspace, check_ledger: CheckLedger
) -> None:
    a = await make_workspace(0)
    b = await make_workspace(0)
    first, replayed = await accounts.top_up(a, 5 * CENT, "manual", "k1")
    second, _ = await accounts.top_up(b, 7 * CENT, "starter", "k1")  # Same key, other workspace.
    third, _ = await accounts.top_up(a, 2 * CENT, "manual", "k2")
    assert not replayed
    assert [first.number, second.number, third.number] == [1, 2, 3]
    assert (first.balance_after_nano, third.balance_after_nano) == (5 * CENT, 7 * CENT)
    assert first.label == "INV-000001"
    assert [i.number for i in await accounts.invoices(a)] == [1, 3]
    assert (await accounts.workspace(a)).balance_nano == 7 * CENT
    await check_ledger()


async def test_a_top_up_past_the_largest_balance_is_refused_and_changes_nothing(
    accounts: AccountStore, make_workspace: MakeWorkspace, check_ledger: CheckLedger
) -> None:
    a = await make_workspace(0)
    for i in range(9):
        await accounts.top_up(a, MAX_AMOUNT_NANO, "manual", f"big-{i}")
    with pytest.raises(errors.InvalidRequest) as refused:
        await accounts.top_up(a, CENT, "manual", "one-more-cent")
    assert refused.value.metadata["param"] == "amount"
    assert (await accounts.workspace(a)).balance_nano == MAX_BALANCE_NANO
    assert len(await accounts.invoices(a)) == 9
    await check_ledger()


async def test_a_replayed_top_up_returns_the_first_invoice_and_changes_nothing(
    accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(0)
    first, _ = await accounts.top_up(ws, 5 * CENT, "manual", "pay-1")
    again, replayed = await accounts.top_up(ws, 5 * CENT, "manual", "pay-1")
    assert replayed and again == first
    with pytest.raises(errors.InvalidRequest, match="was used for a top-up of"):
        await accounts.top_up(ws, 6 * CENT, "manual", "pay-1")
    assert (await accounts.workspace(ws)).balance_nano == 5 * CENT


async def test_changes_to_an_unknown_workspace_or_key_are_not_found(
    accounts: AccountStore,
) -> None:
    with pytest.raises(errors.NotFound):
        await accounts.top_up("ws_missing", CENT, "manual", "k")
    with pytest.raises(errors.NotFound):
        await accounts.set_spend_cap("ws_missing", CENT)
    with pytest.raises(errors.NotFound):
        await accounts.revoke_key("key_missing")
    with pytest.raises(errors.NotFound):
        await accounts.set_key_limits("key_missing", KeyLimits())


async def test_caps_and_auto_reload_are_stored(
    accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(CENT)
    assert (await accounts.set_spend_cap(ws, 3 * CENT)).spend_cap_nano == 3 * CENT
    assert (await accounts.set_spend_cap(ws, None)).spend_cap_nano is None
    setting = AutoReload(threshold_nano=CENT, amount_nano=10 * CENT)
    assert (await accounts.set_auto_reload(ws, setting)).auto_reload == setting
    failed = await accounts.record_auto_reload_failure(ws, "card declined")
    assert failed.auto_reload_error == "card declined"
    await accounts.top_up(ws, 10 * CENT, "auto_reload", "reload-1")
    assert (await accounts.workspace(ws)).auto_reload_error == ""
    assert (await accounts.set_auto_reload(ws, None)).auto_reload is None


async def test_a_negative_cap_is_refused_by_the_database(
    accounts: AccountStore, make_workspace: MakeWorkspace, pool: asyncpg.Pool
) -> None:
    ws = await make_workspace(CENT)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE workspaces SET spend_cap_nano = -1 WHERE id = $1", ws)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE workspaces SET leased_nano = balance_nano + 1")


async def test_keys_are_found_by_their_secrets_hash_and_revoked_once(
    accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(CENT)
    secret_sha256 = hashlib.sha256(b"corvex-secret").digest()
    limits = KeyLimits(requests_per_minute=60, tokens_per_minute=1000, monthly_tokens=10**6)
    key = await accounts.create_key(
        "key_1", ws, name="ci", prefix="corvex-abcd", secret_sha256=secret_sha256, limits=limits
    )
    assert key.limits == limits and key.revoked_at is None
    assert await accounts.key_by_secret(secret_sha256) == key
    assert await accounts.key_by_secret(hashlib.sha256(b"other").digest()) is None
    revoked = await accounts.revoke_key("key_1")
    assert revoked.revoked_at is not None
    assert (await accounts.revoke_key("key_1")).revoked_at == revoked.revoked_at
    narrowed = await accounts.set_key_limits("key_1", KeyLimits(monthly_tokens=5))
    assert narrowed.limits == KeyLimits(monthly_tokens=5)


async def test_every_committed_change_is_heard_by_another_connection_in_order(
    pg_dsn: str, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(0)
    async with await Subscription.open(pg_dsn) as subscription:
        await accounts.top_up(ws, CENT, "manual", "n1")
        await accounts.set_spend_cap(ws, 2 * CENT)
        await accounts.set_auto_reload(ws, AutoReload(CENT, 5 * CENT))
        await accounts.record_auto_reload_failure(ws, "declined")
        await accounts.set_key_limits(f"{ws}-key", KeyLimits(monthly_tokens=9))
        await accounts.revoke_key(f"{ws}-key")
        await accounts.revoke_key(f"{ws}-key")  # Already revoked: no change, no notice.
        await accounts.create_workspace("ws_new", "new")
        heard = [await next_change(subscription) for _ in range(7)]
    key = f"{ws}-key"
    assert heard == [
        AccountChange("credits_added", ws),
        AccountChange("spend_cap_set", ws),
        AccountChange("auto_reload_set", ws),
        AccountChange("auto_reload_failed", ws),
        AccountChange("key_limits_set", ws, key),
        AccountChange("key_revoked", ws, key),
        AccountChange("workspace_created", "ws_new"),
    ]


async def test_a_change_that_fails_sends_no_notice(
    pg_dsn: str, accounts: AccountStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(0)
    await accounts.top_up(ws, CENT, "manual", "once")
    async with await Subscription.open(pg_dsn) as subscription:
        with pytest.raises(errors.InvalidRequest):
            await accounts.top_up(ws, 2 * CENT, "manual", "once")
        with pytest.raises(asyncpg.UniqueViolationError):
            await accounts.create_workspace(ws, "duplicate")
        await accounts.set_spend_cap(ws, CENT)
        assert await next_change(subscription) == AccountChange("spend_cap_set", ws)


async def test_a_subscription_whose_connection_ends_says_it_is_lost(
    pg_dsn: str, pool: asyncpg.Pool
) -> None:
    subscription = await Subscription.open(pg_dsn)
    try:
        async with pool.acquire() as conn:
            terminated = await conn.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        assert terminated
        with pytest.raises(SubscriptionLost):
            await asyncio.wait_for(subscription.get(), NOTICE_BOUND_S)
    finally:
        await subscription.close()


async def test_a_notice_outside_a_transaction_is_a_bug(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(AssertionError):
            await notify.send(conn, AccountChange("workspace_created", "ws"))
