"""Credit leases against a plain reference model, over random sequences of everything they do.

Hypothesis drives acquires, renewals with top-ups, charges (some retried), releases, sweeps,
top-ups, cap changes and a clock that crosses a month (and year) boundary, on one workspace
per example. The reference is ints and a dict written from the lease algebra in
docs/deploy-cluster.md, sharing no code with corvex_core.pg. After every step the database
and the reference must agree on the balance, every lease's credit and what is spendable.
Failures print a reproduction blob (print_blob).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.leases import Charge, LeaseGone, LeaseStore
from corvex_core.pg.server import PgServer
from corvex_core.records import KeyLimits
from tests.core.pg.conftest import CENT, FakeClock, fresh_schema

T = TypeVar("T")
_workspace_numbers = itertools.count(1)
_charge_numbers = itertools.count(1)


@dataclass
class RefLease:
    credit_nano: int
    expires_at: dt.datetime


@dataclass
class Reference:
    """The lease algebra as plain arithmetic."""

    balance_nano: int = 0
    cap_nano: int | None = None
    month: str = ""
    spend_nano: int = 0
    leases: dict[int, RefLease] = field(default_factory=dict)

    @property
    def leased_nano(self) -> int:
        return sum(lease.credit_nano for lease in self.leases.values())

    def spend_in(self, month: str) -> int:
        return self.spend_nano if month <= self.month else 0

    def spendable_nano(self, month: str) -> int:
        free = self.balance_nano - self.leased_nano
        if self.cap_nano is None:
            return free
        return min(free, self.cap_nano - self.spend_in(month) - self.leased_nano)

    def roll(self, month: str) -> None:
        if month > self.month:
            self.month, self.spend_nano = month, 0


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self, runner: asyncio.Runner, pool: db.Pool) -> None:
        super().__init__()
        self.runner = runner
        self.clock = FakeClock()
        self.leases = LeaseStore(pool, clock=self.clock)
        self.accounts = AccountStore(pool, clock=self.clock)
        self.ref = Reference(month=db.utc_month(self.clock.now))
        self.ws = f"ws_{next(_workspace_numbers)}"
        self.issued: list[int] = []
        self.batches: list[list[Charge]] = []
        self.run(self._create())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    async def _create(self) -> None:
        await self.accounts.create_workspace(self.ws, "stateful")
        await self.accounts.create_key(
            f"{self.ws}-key",
            self.ws,
            name="k",
            prefix="corvex-k",
            secret_sha256=hashlib.sha256(self.ws.encode()).digest(),
            limits=KeyLimits(),
        )

    @property
    def month(self) -> str:
        return db.utc_month(self.clock.now)

    # ---- money in, caps, time ----------------------------------------------------------------

    @initialize(cents=st.integers(1, 500))
    def fund(self, cents: int) -> None:
        self.top_up(cents)

    @rule(cents=st.integers(1, 300))
    def top_up(self, cents: int) -> None:
        key = f"top-{next(_charge_numbers)}"
        self.run(self.accounts.top_up(self.ws, cents * CENT // 10, "manual", key))
        self.ref.balance_nano += cents * CENT // 10

    @rule(cap=st.none() | st.integers(0, 20 * CENT))
    def set_cap(self, cap: int | None) -> None:
        self.run(self.accounts.set_spend_cap(self.ws, cap))
        self.ref.cap_nano = cap

    @rule(seconds=st.sampled_from([1, 7, 31, 125, 3600]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    # ---- leases ------------------------------------------------------------------------------

    @rule(
        want=st.integers(1, 3 * CENT),
        min_share=st.integers(1, 100),
        ttl_s=st.sampled_from([5, 30, 300]),
    )
    def acquire(self, want: int, min_share: int, ttl_s: int) -> None:
        min_nano = max(1, want * min_share // 100)
        lease = self.run(self.leases.acquire(self.ws, "core", want, min_nano, ttl_s))
        grant = min(want, self.ref.spendable_nano(self.month))
        if grant < min_nano:
            assert lease is None
            return
        assert lease is not None and lease.credit_nano == grant
        self.ref.roll(self.month)
        self.ref.leases[lease.id] = RefLease(grant, self.clock.now + dt.timedelta(seconds=ttl_s))
        self.issued.append(lease.id)

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), top_up=st.integers(0, 2 * CENT))
    def renew(self, data: st.DataObject, top_up: int) -> None:
        lease_id = data.draw(st.sampled_from(self.issued))
        ref = self.ref.leases.get(lease_id)
        if ref is None or ref.expires_at <= self.clock.now:
            try:
                self.run(self.leases.renew(lease_id, 30, top_up))
            except LeaseGone:
                return
            raise AssertionError("renewed a lease past its TTL")
        grant = min(top_up, self.ref.spendable_nano(self.month))
        grant = grant if grant >= 1 else 0
        lease = self.run(self.leases.renew(lease_id, 30, top_up))
        if grant:
            self.ref.roll(self.month)
        ref.credit_nano += grant
        ref.expires_at = self.clock.now + dt.timedelta(seconds=30)
        assert lease.credit_nano == ref.credit_nano

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), share=st.integers(0, 100), split=st.booleans())
    def charge(self, data: st.DataObject, share: int, split: bool) -> None:
        lease_id = data.draw(st.sampled_from(self.issued))
        ref = self.ref.leases.get(lease_id)
        cost = (ref.credit_nano if ref else CENT) * share // 100
        costs = [cost // 2, cost - cost // 2] if split else [cost]
        batch = [self._charge(c) for c in costs]
        if ref is None:
            try:
                self.run(self.leases.charge(lease_id, batch))
            except LeaseGone:
                return
            raise AssertionError("charged a lease that is gone")
        new = self.run(self.leases.charge(lease_id, batch))
        assert new == [c.charge_id for c in batch]
        self.ref.roll(self.month)
        ref.credit_nano -= cost
        self.ref.balance_nano -= cost
        self.ref.spend_nano += cost
        self.batches.append(batch)

    @precondition(lambda self: self.batches and self.issued)
    @rule(data=st.data())
    def retry_a_committed_batch(self, data: st.DataObject) -> None:
        batch = data.draw(st.sampled_from(self.batches))
        lease_id = data.draw(st.sampled_from(self.issued))
        if lease_id in self.ref.leases:
            assert self.run(self.leases.charge(lease_id, batch)) == []
        else:
            try:
                assert self.run(self.leases.charge(lease_id, batch)) == []
            except LeaseGone:
                raise AssertionError("a committed batch was refused on retry") from None

    @precondition(lambda self: self.issued)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(self.issued))
        ref = self.ref.leases.pop(lease_id, None)
        returned = self.run(self.leases.release(lease_id))
        assert returned == (None if ref is None else ref.credit_nano)

    @rule()
    def sweep(self) -> None:
        expired = self.run(self.leases.expire(self.clock.now))
        due = {i: r for i, r in self.ref.leases.items() if r.expires_at <= self.clock.now}
        # The sweep also ends what earlier examples left in other workspaces.
        ours = {e.id: e.credit_nano for e in expired.leases if e.workspace_id == self.ws}
        assert ours == {i: r.credit_nano for i, r in due.items()}
        for lease_id in due:
            del self.ref.leases[lease_id]

    def _charge(self, cost_nano: int) -> Charge:
        n = next(_charge_numbers)
        return Charge(
            charge_id=f"ch_{n}",
            request_id=f"req_{n}",
            key_id=f"{self.ws}-key",
            model="org/m",
            prompt_tokens=3,
            completion_tokens=4,
            cached_prompt_tokens=0,
            cost_nano=cost_nano,
            rate_card_version="v",
            at=self.clock.now,
        )

    # ---- agreement ---------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_reference(self) -> None:
        row = self.run(self._state())
        assert row["balance_nano"] == self.ref.balance_nano >= 0
        assert row["leased_nano"] == self.ref.leased_nano <= row["balance_nano"]
        assert row["spend_cap_nano"] == self.ref.cap_nano
        spend_nano = row["month_spend_nano"] if row["month"] == self.month else 0
        assert spend_nano == self.ref.spend_in(self.month)
        leases = dict(zip(row["ids"], row["credits"], strict=True))
        assert leases == {i: r.credit_nano for i, r in self.ref.leases.items()}

    async def _state(self) -> Any:
        async with self.leases._pool.acquire() as conn:
            return await conn.fetchrow(_STATE, self.ws)


_STATE = """
SELECT balance_nano, leased_nano, spend_cap_nano, month, month_spend_nano,
       ARRAY(SELECT id FROM leases WHERE workspace_id = $1 ORDER BY id) AS ids,
       ARRAY(SELECT credit_nano FROM leases WHERE workspace_id = $1 ORDER BY id) AS credits
FROM workspaces WHERE id = $1
"""


def test_leases_agree_with_the_reference_model(pg_server: PgServer) -> None:
    with asyncio.Runner() as runner:
        schema = fresh_schema(pg_server, migrated=True)
        dsn = runner.run(schema.__aenter__())
        pool = runner.run(db.open_pool(dsn))
        try:
            run_state_machine_as_test(
                lambda: LeaseMachine(runner, pool),
                settings=settings(
                    max_examples=25,
                    stateful_step_count=40,
                    deadline=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            runner.run(pool.close())
            runner.run(schema.__aexit__(None, None, None))
