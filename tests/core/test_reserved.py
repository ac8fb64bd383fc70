"""Reserved endpoints in the domain, with an injected clock: hours of billing without sleeping.

A real Ledger, rate card, capacity pool and simulated engines; only the clock is ours. Every
scenario checks the one rule of the money: the sum of what was charged is the change of the
balance, to the nano-dollar, and no period is charged twice or skipped.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import itertools
import random
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from corvex.money import NANO_PER_CENT, NANO_PER_USD
from corvex.ratecard import load_rate_card
from corvex_core import errors
from corvex_core.capacity import CapacityPool
from corvex_core.catalogue import Catalogue
from corvex_core.config import SimulatedEngineConfig
from corvex_core.engines.base import EngineState
from corvex_core.engines.simulated import SimulatedEngine
from corvex_core.ledger import Ledger
from corvex_core.payments import AutoReloader, SimulatedProvider
from corvex_core.records import (
    CreditsAdded,
    EndpointPeriodCharged,
    EndpointResized,
    EndpointResumed,
    EndpointSuspended,
    Record,
    SuspendedBy,
    TopUpMethod,
)
from corvex_core.reserved import ReservedEndpoints, Status, workspace_slug
from corvex_core.state import LedgerState, apply

CARD = load_rate_card(Path("infrastructure/metronome/config.yaml"))
FLASH = "deepseek-v4-flash-1gpu"  # $2.52 per replica-hour: $0.042 a minute
GLM = "glm-5.1-fp8-8gpu"  # $20.16 per replica-hour, a minimum term of one hour
FLASH_MINUTE = 42_000_000
GLM_MINUTE = 336_000_000
FAST = SimulatedEngineConfig(ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0)
START_MS = calendar.timegm((2026, 11, 20, 9, 0, 0, 0, 0, 0)) * 1000


class Clock:
    def __init__(self) -> None:
        self.ms = START_MS

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


class World:
    """A ledger and its reserved endpoints, with every record it commits kept in order."""

    def __init__(self, *, glm_replicas: int = 1, records: list[Record] | None = None) -> None:
        self.clock = Clock()
        self.records: list[Record] = []
        state = LedgerState()
        for record in records or []:
            apply(state, record)
        self.ledger = Ledger(clock=self.clock, state=state, sink=self._sink)
        self.records.extend(records or [])
        self.pool = CapacityPool({FLASH: [FAST] * 3, GLM: [FAST] * glm_replicas})
        self.reloader = AutoReloader(
            self.ledger, None, SimulatedProvider(), retry_initial_s=0.01, retry_max_s=0.01
        )
        self.reserved = ReservedEndpoints(
            self.ledger,
            Catalogue(CARD, []),
            self.pool,
            period_s=60,
            engine_factory=lambda model, config, context: SimulatedEngine(model, config),
            after_charge=self.reloader.check,
        )

    def _sink(self, record: Record) -> None:
        self.records.append(record)
        self.reserved.on_record(record)

    def workspace(self, usd_cents: int, name: str = "acme") -> str:
        ws, _ = self.ledger.create_workspace(name, usd_cents * NANO_PER_CENT)
        return ws.id

    async def run_for(self, seconds: int, *, step_s: float = 10.0, seed: int = 0) -> None:
        """Moves the clock `seconds` ahead in uneven steps, ticking and letting engines
        start and stop after each, as the billing loop does."""
        rng = random.Random(seed)
        end = self.clock.ms + seconds * 1000
        while self.clock.ms < end:
            step = min(rng.uniform(0.5, 2 * step_s), (end - self.clock.ms) / 1000)
            self.clock.advance(step)
            self.reserved.tick()
            await self.reserved.wait_background()
            await asyncio.sleep(0)

    def charged(self, workspace_id: str) -> int:
        """Everything charged to the workspace, from its records."""
        total = 0
        for r in self.records:
            if isinstance(r, EndpointPeriodCharged) and r.workspace_id == workspace_id:
                total += r.cost_nano
            elif isinstance(r, EndpointResized) and r.workspace_id == workspace_id:
                total += r.charge_nano
        return total

    def credited(self, workspace_id: str) -> int:
        return sum(
            r.amount_nano
            for r in self.records
            if isinstance(r, CreditsAdded) and r.workspace_id == workspace_id
        )

    def periods(self, endpoint_id: str) -> list[EndpointPeriodCharged]:
        return [
            r
            for r in self.records
            if isinstance(r, EndpointPeriodCharged) and r.endpoint_id == endpoint_id
        ]

    def balance(self, workspace_id: str) -> int:
        return self.ledger.workspace(workspace_id).balance_nano

    def assert_exact(self, workspace_id: str) -> None:
        """Σ charges = Δ balance, and the holds left are the next periods' and nothing else."""
        ws = self.ledger.workspace(workspace_id)
        assert self.credited(workspace_id) - self.charged(workspace_id) == ws.balance_nano
        held = sum(v.held_nano for v in self.reserved.views(workspace_id))
        assert ws.held_nano == held


@pytest.fixture
async def world() -> AsyncIterator[World]:
    instance = World()
    yield instance
    await instance.reserved.close()
    await instance.reloader.close()


async def create(world: World, workspace_id: str, offering: str = FLASH, replicas: int = 1) -> str:
    view = world.reserved.create(workspace_id, offering, replicas, "prod")
    await world.reserved.wait_started(view.endpoint.id, 5)
    await world.reserved.wait_background()
    return view.endpoint.id


def assert_contiguous(periods: list[EndpointPeriodCharged]) -> None:
    assert [p.period for p in periods] == list(range(1, len(periods) + 1))
    for before, after in itertools.pairwise(periods):
        assert after.start_ms >= before.end_ms


async def test_three_simulated_hours_bill_to_the_nano_dollar(world: World) -> None:
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws, replicas=2)
    assert world.reserved.view(endpoint_id).status is Status.RUNNING
    first = world.periods(endpoint_id)
    assert len(first) == 1 and first[0].cost_nano == 2 * FLASH_MINUTE

    await world.run_for(3 * 3600, seed=1)

    periods = world.periods(endpoint_id)
    assert_contiguous(periods)
    # Running continuously, periods are back to back: 3 hours are 180 minutes, plus the one
    # that started at the last tick.
    assert all(after.start_ms == before.end_ms for before, after in itertools.pairwise(periods))
    assert len(periods) == 181
    assert {p.cost_nano for p in periods} == {2 * FLASH_MINUTE}
    assert world.charged(ws) == 181 * 2 * FLASH_MINUTE == 15_204_000_000  # $15.204
    world.assert_exact(ws)
    rows = [r for r in world.ledger.usage(ws) if r.endpoint_id == endpoint_id]
    assert sum(r.replica_seconds for r in rows) == 181 * 2 * 60
    assert sum(r.cost_nano for r in rows) == world.charged(ws)


async def test_tick_timing_does_not_change_the_bill() -> None:
    bills = []
    for seed, step_s in ((1, 1.0), (2, 25.0), (3, 55.0)):
        world = World()
        ws = world.workspace(10_000)
        endpoint_id = await create(world, ws)
        await world.run_for(3600, step_s=step_s, seed=seed)
        # Whatever the ticks, the periods charged cover the time run, back to back.
        periods = world.periods(endpoint_id)
        assert_contiguous(periods)
        assert periods[-1].end_ms > world.clock.ms >= periods[-1].start_ms
        bills.append(len(periods))
        world.assert_exact(ws)
        await world.reserved.close()
    assert bills == [61, 61, 61]


async def test_suspends_at_zero_and_resumes_on_top_up(world: World) -> None:
    ws = world.workspace(10)  # $0.10: two minutes of one replica and a bit
    endpoint_id = await create(world, ws)
    model = world.reserved.view(endpoint_id).endpoint.model_id
    assert world.reserved.lookup(ws, model) is not None

    await world.run_for(180)

    view = world.reserved.view(endpoint_id)
    assert view.status is Status.SUSPENDED
    assert len(world.periods(endpoint_id)) == 2
    assert world.balance(ws) == 10 * NANO_PER_CENT - 2 * FLASH_MINUTE  # $0.016 left, never < 0
    assert [r.by for r in world.records if isinstance(r, EndpointSuspended)] == [
        SuspendedBy.BALANCE
    ]
    with pytest.raises(errors.InsufficientCredits) as refused:
        world.reserved.lookup(ws, model)
    assert "is suspended" in refused.value.message and "balance" in refused.value.message
    assert refused.value.metadata["limit"] == "balance"
    # Its engines are released, and their capacity is back in the pool.
    assert world.reserved.engines()[endpoint_id] == []
    assert world.pool.free(FLASH) == 3

    suspended_at = world.clock.ms
    world.clock.advance(600)  # ten minutes suspended: not billed
    world.ledger.add_credits(ws, 100 * NANO_PER_CENT, TopUpMethod.MANUAL, "top-up-1")
    world.reserved.tick()
    await world.reserved.wait_background()

    assert world.reserved.view(endpoint_id).status is Status.RUNNING
    assert any(isinstance(r, EndpointResumed) for r in world.records)
    third = world.periods(endpoint_id)[2]
    assert third.start_ms >= suspended_at + 600_000  # the suspended time is not billed
    assert world.reserved.lookup(ws, model) is not None
    world.assert_exact(ws)


async def test_suspends_at_the_spend_cap_and_resumes_when_it_is_raised(world: World) -> None:
    ws = world.workspace(10_000)
    world.ledger.set_spend_cap(ws, 10 * NANO_PER_CENT)
    endpoint_id = await create(world, ws)
    model = world.reserved.view(endpoint_id).endpoint.model_id

    await world.run_for(180)

    assert world.reserved.view(endpoint_id).status is Status.SUSPENDED
    assert world.ledger.workspace(ws).month_spend_nano == 2 * FLASH_MINUTE <= 10 * NANO_PER_CENT
    with pytest.raises(errors.InsufficientCredits) as refused:
        world.reserved.lookup(ws, model)
    assert refused.value.metadata["limit"] == "spend_cap"
    assert "spend cap" in refused.value.message and "is suspended" in refused.value.message

    world.ledger.set_spend_cap(ws, 500 * NANO_PER_CENT)
    await world.run_for(60)

    assert world.reserved.view(endpoint_id).status is Status.RUNNING
    world.assert_exact(ws)


async def test_a_top_up_wakes_the_billing_loop(world: World) -> None:
    ws = world.workspace(5)
    endpoint_id = await create(world, ws)
    await world.run_for(120)
    assert world.reserved.view(endpoint_id).status is Status.SUSPENDED

    task = asyncio.create_task(world.reserved.run(tick_s=3600))  # would not tick for an hour
    world.ledger.add_credits(ws, 100 * NANO_PER_CENT, TopUpMethod.MANUAL, "wake")
    for _ in range(100):
        await asyncio.sleep(0)
        if world.reserved.view(endpoint_id).status is Status.RUNNING:
            break
    task.cancel()
    assert world.reserved.view(endpoint_id).status is Status.RUNNING


async def test_auto_reload_keeps_it_running(world: World) -> None:
    ws = world.workspace(10)
    world.ledger.set_auto_reload(
        ws, enabled=True, threshold_nano=NANO_PER_USD, amount_nano=5 * NANO_PER_USD
    )
    endpoint_id = await create(world, ws)

    await world.run_for(1800)

    assert world.reserved.view(endpoint_id).status is Status.RUNNING
    assert not any(isinstance(r, EndpointSuspended) for r in world.records)
    reloads = [r for r in world.records if isinstance(r, CreditsAdded)][1:]
    assert reloads and {r.method for r in reloads} == {TopUpMethod.AUTO_RELOAD}
    world.assert_exact(ws)


async def test_no_capacity_is_a_clean_error_and_bills_nothing(world: World) -> None:
    ws = world.workspace(10_000)
    await create(world, ws, replicas=3)
    before = len(world.records)

    with pytest.raises(errors.CapacityUnavailable, match="has 0 of 3 free"):
        world.reserved.create(ws, FLASH, 1, "second")
    with pytest.raises(errors.CapacityUnavailable, match="not offered on this core"):
        world.reserved.create(ws, "kimi-k2.6-8gpu", 1, "kimi")

    assert len(world.records) == before
    world.assert_exact(ws)


async def test_no_money_is_a_clean_error_and_keeps_the_capacity(world: World) -> None:
    ws = world.workspace(1)
    with pytest.raises(errors.InsufficientCredits, match=r"first minute .* costs \$0\.042"):
        world.reserved.create(ws, FLASH, 1, "prod")
    # GLM's first period is its minimum term: an hour, $20.16.
    with pytest.raises(errors.InsufficientCredits, match=r"first hour .* costs \$20\.16"):
        world.reserved.create(ws, GLM, 1, "glm")
    assert world.pool.free(FLASH) == 3 and world.pool.free(GLM) == 1
    assert world.reserved.views(ws) == []
    assert world.balance(ws) == NANO_PER_CENT


async def test_minimum_term_is_the_first_period_and_resize_bills_the_rest() -> None:
    world = World(glm_replicas=2)
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws, offering=GLM)
    first = world.periods(endpoint_id)[0]
    assert (first.end_ms - first.start_ms, first.cost_nano) == (3600_000, 60 * GLM_MINUTE)

    world.clock.advance(30 * 60 + 20)  # 29 minutes 40 seconds of the term left: 30 billed
    world.reserved.resize(endpoint_id, 2)
    await world.reserved.wait_background()

    resized = [r for r in world.records if isinstance(r, EndpointResized)]
    assert [(r.replicas, r.charge_nano, r.charged_replica_s) for r in resized] == [
        (2, 30 * GLM_MINUTE, 30 * 60)
    ]
    assert len(world.reserved.engines()[endpoint_id]) == 2
    await world.run_for(3600)
    after_term = world.periods(endpoint_id)[1:]
    assert after_term and {p.cost_nano for p in after_term} == {2 * GLM_MINUTE}

    world.reserved.resize(endpoint_id, 1)  # fewer replicas: at once, no refund
    await world.reserved.wait_background()
    assert len(world.reserved.engines()[endpoint_id]) == 1 and world.pool.free(GLM) == 1
    await world.run_for(120)
    assert world.periods(endpoint_id)[-1].cost_nano == GLM_MINUTE
    world.assert_exact(ws)
    await world.reserved.close()


async def test_a_resize_the_balance_cannot_pay_changes_nothing(world: World) -> None:
    ws = world.workspace(10)
    endpoint_id = await create(world, ws)
    await world.run_for(10)
    before = (len(world.records), world.pool.free(FLASH), world.ledger.workspace(ws).held_nano)

    with pytest.raises(errors.InsufficientCredits, match="Resizing"):
        world.reserved.resize(endpoint_id, 3)

    assert (len(world.records), world.pool.free(FLASH), world.ledger.workspace(ws).held_nano) == (
        before
    )
    assert world.reserved.view(endpoint_id).endpoint.replicas == 1
    world.assert_exact(ws)


async def test_delete_stops_billing_and_frees_capacity(world: World) -> None:
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws, replicas=2)
    await world.run_for(300)
    billed = len(world.periods(endpoint_id))

    view = world.reserved.delete(endpoint_id)
    await world.reserved.wait_background()
    await world.run_for(600)

    assert view.status is Status.DELETED
    assert len(world.periods(endpoint_id)) == billed
    assert world.pool.free(FLASH) == 3 and world.ledger.workspace(ws).held_nano == 0
    assert world.reserved.lookup(ws, view.endpoint.model_id) is None
    # The name can be used again.
    await create(world, ws)
    world.assert_exact(ws)


async def test_an_endpoint_serves_its_own_workspace_only(world: World) -> None:
    owner, other = world.workspace(10_000, "Acme, Inc."), world.workspace(10_000, "Other")
    endpoint_id = await create(world, owner)
    model = world.reserved.view(endpoint_id).endpoint.model_id
    assert model == f"{workspace_slug('Acme, Inc.', owner)}/prod"

    served = world.reserved.lookup(owner, model)
    assert served is not None and served.endpoint_id == endpoint_id
    assert served.engine in world.reserved.engines()[endpoint_id]
    assert served.rate.output_nano_per_token == served.rate.input_nano_per_token == 0
    # Anyone else, and any catalogue id, is not found here (the shared fleet is asked).
    assert world.reserved.lookup(other, model) is None
    assert world.reserved.lookup(owner, "deepseek-ai/DeepSeek-V4-Flash") is None
    assert [v.endpoint.id for v in world.reserved.views(other)] == []


def test_the_slug_rule() -> None:
    assert workspace_slug("Acme, Inc.", "ws_bb343abbd17f2d46") == "acme-inc-bb343abb"
    assert workspace_slug("dev", "ws_0123456789abcdef") == "dev-01234567"
    assert workspace_slug("日本", "ws_0123456789abcdef") == "ws-01234567"
    long = workspace_slug("A very long workspace name indeed, truly", "ws_0123456789abcdef")
    assert long == "a-very-long-workspace-na-01234567"


async def test_names_are_checked(world: World) -> None:
    ws = world.workspace(10_000)
    for bad in ("", "Prod", "-x", "x-", "a" * 41, "a/b"):
        with pytest.raises(errors.InvalidRequest, match="endpoint name"):
            world.reserved.create(ws, FLASH, 1, bad)
    await create(world, ws)
    with pytest.raises(errors.InvalidRequest, match="already has an endpoint named"):
        world.reserved.create(ws, FLASH, 1, "prod")
    assert world.pool.free(FLASH) == 2


@pytest.mark.parametrize("restart_after_s", [20, 200])
async def test_recovery_bills_no_period_twice_and_loses_none(
    world: World, restart_after_s: int
) -> None:
    """A crash mid-period: the new process rebuilds the ledger from the records, and the
    period that was running stays charged once; billing goes on from where it was."""
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws)
    await world.run_for(150)
    crashed_at = world.clock.ms
    paid_until = world.periods(endpoint_id)[-1].end_ms
    assert paid_until > crashed_at  # mid-period

    # The crash: memory (holds, engines) is gone; only the records survive.
    await world.reserved.close()
    after = World(records=world.records)
    after.clock.ms = crashed_at + restart_after_s * 1000
    after.reserved.recover()
    after.reserved.tick()
    await after.reserved.wait_background()
    await after.run_for(300)

    periods = after.periods(endpoint_id)
    assert_contiguous(periods)
    before_crash = [p for p in periods if p.at_ms <= crashed_at]
    assert before_crash == world.periods(endpoint_id)
    first_after = periods[len(before_crash)]
    if restart_after_s * 1000 < paid_until - crashed_at:
        # Back within the paid minute: it serves to its end, and the next follows it.
        assert first_after.start_ms == paid_until
    else:
        # Back after it: the time it was down is not billed.
        assert first_after.start_ms >= crashed_at + restart_after_s * 1000
    after.assert_exact(ws)
    await after.reserved.close()


async def test_a_period_record_applies_once_only(world: World) -> None:
    """The state refuses a journal that charges a period twice, skips one or overlaps two: a
    recovery from such a journal stops instead of billing wrongly."""
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws)
    await world.run_for(120)
    last = world.periods(endpoint_id)[-1]
    state = LedgerState()
    for record in world.records:
        apply(state, record)
    for wrong, words in (
        (last, "charged twice or skipped"),
        (msgspec.structs.replace(last, period=last.period + 2), "charged twice or skipped"),
        (
            msgspec.structs.replace(last, period=last.period + 1, start_ms=last.start_ms),
            "periods overlap",
        ),
    ):
        with pytest.raises(AssertionError, match=words):
            apply(copy.deepcopy(state), wrong)


async def test_engines_stop_with_their_endpoint(world: World) -> None:
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws)
    engine = world.reserved.engines()[endpoint_id][0]
    assert engine.state is EngineState.READY
    world.reserved.delete(endpoint_id)
    await world.reserved.wait_background()
    assert engine.state is EngineState.STOPPED


async def test_a_snapshot_keeps_the_endpoints(world: World) -> None:
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws)
    await world.run_for(120)
    encoded = msgspec.msgpack.encode(world.ledger.state)
    restored = msgspec.msgpack.decode(encoded, type=LedgerState)
    assert restored.endpoints == world.ledger.state.endpoints
    assert restored.endpoints[endpoint_id].period == len(world.periods(endpoint_id))
    assert restored.endpoint_usage == world.ledger.state.endpoint_usage


async def test_a_request_after_the_period_ends_is_served_in_a_charged_period(world: World) -> None:
    ws = world.workspace(10_000)
    endpoint_id = await create(world, ws)
    model = world.reserved.view(endpoint_id).endpoint.model_id
    world.clock.advance(61)  # the first minute is over, and no tick has come yet

    assert world.reserved.lookup(ws, model) is not None

    periods = world.periods(endpoint_id)
    assert len(periods) == 2 and periods[1].start_ms <= world.clock.ms < periods[1].end_ms
    world.assert_exact(ws)
