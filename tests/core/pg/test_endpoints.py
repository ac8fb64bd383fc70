"""Reserved endpoints in the cluster ledger (pg/endpoints.py): a period is charged once, only
as the next one, never for a deleted endpoint, and only from the balance no lease holds and
within the spend cap less what is leased; a refusal changes nothing. And `corvex ledger
migrate` of a journal with endpoints."""

from __future__ import annotations

import asyncpg
import pytest

from corvex_core import errors
from corvex_core.cluster.importer import ImportRefused, JournalContents, import_journal
from corvex_core.ledger import Ledger
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.endpoints import EndpointGone, EndpointStore
from corvex_core.pg.leases import LeaseStore
from corvex_core.records import SuspendedBy
from corvex_core.state import Endpoint, EndpointStatus
from tests.core.pg.conftest import CENT, CheckLedger, FakeClock, MakeWorkspace

TTL_S = 30.0


@pytest.fixture
def store(pool: db.Pool, clock: FakeClock) -> EndpointStore:
    return EndpointStore(pool, clock=clock)


async def new_endpoint(store: EndpointStore, workspace_id: str, name: str = "prod") -> str:
    endpoint = Endpoint(
        id=f"ep_{workspace_id}_{name}",
        workspace_id=workspace_id,
        name=name,
        model_id=f"test-{workspace_id}/{name}",
        offering_id="flash-1gpu",
        base_model="deepseek-ai/DeepSeek-V4-Flash",
        replicas=2,
        created_ms=0,
    )
    row = await store.create(endpoint, "core-a", first_nano=CENT, what="The first minute", most=2)
    assert row.core_id == "core-a" and row.endpoint.status is EndpointStatus.ACTIVE
    return endpoint.id


async def charge(store: EndpointStore, endpoint_id: str, period: int, cost: int) -> int:
    row = await store.charge_period(
        endpoint_id, period=period, start_ms=period * 60_000, end_ms=(period + 1) * 60_000,
        replicas=2, cost_nano=cost, rate_card_version="v1", core_id="core-a",
        what=f"Period {period}",
    )  # fmt: skip
    return row.endpoint.charged_nano


async def test_each_period_is_charged_once_and_only_as_the_next(
    store: EndpointStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(100 * CENT)
    ep = await new_endpoint(store, ws)
    assert await charge(store, ep, 1, 3 * CENT) == 3 * CENT
    with pytest.raises(EndpointGone):
        await charge(store, ep, 1, 3 * CENT)  # a retry of a committed charge: nothing more
    with pytest.raises(EndpointGone):
        await charge(store, ep, 3, 3 * CENT)  # a period skipped
    assert await charge(store, ep, 2, 3 * CENT) == 6 * CENT
    row = await accounts.workspace(ws)
    assert (row.balance_nano, row.month_spend_nano) == (94 * CENT, 6 * CENT)
    await store.delete(ep)
    with pytest.raises(EndpointGone):
        await charge(store, ep, 3, 3 * CENT)
    assert (await accounts.workspace(ws)).balance_nano == 94 * CENT
    await check_ledger()


async def test_what_cores_hold_on_lease_is_not_spendable_by_a_period(
    store: EndpointStore,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
    check_ledger: CheckLedger,
) -> None:
    ws = await make_workspace(10 * CENT)
    ep = await new_endpoint(store, ws)
    assert await leases.acquire(ws, "core-b", 8 * CENT, 1, TTL_S) is not None
    with pytest.raises(errors.InsufficientCredits) as refused:
        await charge(store, ep, 1, 3 * CENT)
    assert refused.value.metadata["limit"] == "balance"
    assert refused.value.metadata["available_nano_usd"] == str(2 * CENT)
    assert "$0.08 of it held" in refused.value.message
    assert await charge(store, ep, 1, 2 * CENT) == 2 * CENT  # exactly what is not leased
    row = await accounts.workspace(ws)
    assert (row.balance_nano, row.leased_nano) == (8 * CENT, 8 * CENT)
    await check_ledger()


async def test_the_spend_cap_counts_what_is_leased(
    store: EndpointStore,
    leases: LeaseStore,
    accounts: AccountStore,
    make_workspace: MakeWorkspace,
) -> None:
    ws = await make_workspace(100 * CENT, cap_nano=10 * CENT)
    ep = await new_endpoint(store, ws)
    assert await leases.acquire(ws, "core-b", 6 * CENT, 1, TTL_S) is not None
    with pytest.raises(errors.InsufficientCredits) as refused:
        await charge(store, ep, 1, 5 * CENT)
    assert refused.value.metadata["limit"] == "spend_cap"
    assert (await accounts.workspace(ws)).balance_nano == 100 * CENT
    assert await charge(store, ep, 1, 4 * CENT) == 4 * CENT
    suspended = await store.suspend(ep, SuspendedBy.SPEND_CAP)
    assert suspended.endpoint.status is EndpointStatus.SUSPENDED
    await accounts.set_spend_cap(ws, None)
    # A period charged while suspended resumes it.
    assert await charge(store, ep, 2, 5 * CENT) == 9 * CENT
    assert (await store.get(ep)) is not None
    row = await store.get(ep)
    assert row is not None and row.endpoint.status is EndpointStatus.ACTIVE


async def test_names_are_unique_among_live_endpoints_and_creation_checks_the_money(
    store: EndpointStore, make_workspace: MakeWorkspace
) -> None:
    ws = await make_workspace(5 * CENT)
    ep = await new_endpoint(store, ws)
    with pytest.raises(errors.InvalidRequest, match="already has an endpoint named"):
        await new_endpoint(store, ws)
    await store.delete(ep)
    again = await new_endpoint(store, ws, "prod2")
    assert again != ep
    poor = await make_workspace(CENT // 2)
    with pytest.raises(errors.InsufficientCredits):
        await new_endpoint(store, poor)
    assert await store.workspace_of(again) == ws
    assert [r.endpoint.id for r in await store.live()] == [again]


def _journal_with_endpoints() -> tuple[Ledger, str, str]:
    """A single core's ledger with a deleted endpoint (billed one period) and a live one."""
    ledger = Ledger()
    ws, _ = ledger.create_workspace("Acme", 100 * CENT)
    endpoints = []
    for name in ("old", "live"):
        endpoint, hold = ledger.create_endpoint(
            ws.id, name=name, model_id=f"acme/{name}", offering_id="flash-1gpu",
            base_model="deepseek-ai/DeepSeek-V4-Flash", replicas=1, hold_nano=CENT,
            hold_periods=1, rate_card_version="v1", what="The first minute",
        )  # fmt: skip
        ledger.charge_period(hold, start_ms=ledger.now_ms(), period_ms=60_000)
        endpoints.append(endpoint.id)
    ledger.delete_endpoint(endpoints[0])
    return ledger, endpoints[0], endpoints[1]


async def test_ledger_migrate_copies_deleted_endpoints_and_refuses_live_ones(
    empty_dsn: str, clock: FakeClock
) -> None:
    ledger, old, live = _journal_with_endpoints()
    conn = await asyncpg.connect(empty_dsn)
    try:
        contents = JournalContents(ledger.state, None, [])
        with pytest.raises(ImportRefused, match=f"reserved endpoints not deleted \\(first: {live}"):
            await import_journal(conn, contents, clock())
        ledger.delete_endpoint(live)
        imported = await import_journal(conn, contents, clock())
        assert imported.balance_nano == 98 * CENT
        rows = await conn.fetch("SELECT id, status, period, charged_nano FROM endpoints")
        assert sorted(tuple(r) for r in rows) == sorted(
            [(old, "deleted", 1, CENT), (live, "deleted", 1, CENT)]
        )
        billed = await conn.fetchval("SELECT sum(cost_nano) FROM endpoint_charges")
        assert billed == 2 * CENT  # and the balance check (top-ups − charges) passed
    finally:
        await conn.close()
