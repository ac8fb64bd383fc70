"""The ledger against a plain reference model, over random sequences of everything it does.

Hypothesis drives top-ups (idempotency keys sometimes repeated), reserves, settles, releases,
spend-cap changes, clock advances across UTC month boundaries and key revocations on two
workspaces with one key each. The reference below is ints and dicts written from the pricing
page's promises, sharing no code with the ledger. After every step the two must agree on
balance, holds and month spend, and the money invariants must hold.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.ledger import Hold, Ledger
from corvex_core.records import Charged, CreditsAdded, KeyLimits, Record

CENT = 10_000_000  # nano-USD
VERSION = "2026-11-01"
WORKSPACES = 2
# Two minutes before a month (and year) boundary, so rollovers come early in a run.
START_MS = calendar.timegm((2026, 12, 31, 23, 58, 0, 0, 0, 0)) * 1000


def _rate(model_id: str, input_nano: int, output_nano: int) -> ModelRate:
    return ModelRate(
        id=model_id,
        name=model_id,
        card_path=f"/models/{model_id}",
        input_usd_per_million="0",
        output_usd_per_million="0",
        input_nano_per_token=input_nano,
        output_nano_per_token=output_nano,
        context_length=1_000_000,
        listed_unix_s=0,
    )


# (input, output) nano-USD per token: the catalogue's four models and two odd ones.
PRICES = [(350, 1_400), (450, 1_800), (500, 2_000), (550, 2_200), (1, 3), (7, 0)]
RATES = [_rate(f"org/m{i}", inp, out) for i, (inp, out) in enumerate(PRICES)]


def _month(at_ms: int) -> tuple[int, int]:
    """UTC (year, month) of a time, computed without floats."""
    day = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=at_ms)
    return day.year, day.month


def _next_month_ms(at_ms: int) -> int:
    year, month = _month(at_ms)
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) * 1000


# ---- the reference model ---------------------------------------------------------------------


@dataclass
class RefHold:
    workspace: int
    input_nano: int
    output_nano: int
    prompt_tokens: int
    max_tokens: int

    @property
    def amount(self) -> int:
        return self.prompt_tokens * self.input_nano + self.max_tokens * self.output_nano


@dataclass
class RefWorkspace:
    balance: int = 0
    cap: int | None = None
    topped_up: int = 0
    charged: int = 0
    # (year, month) → spend charged in it.
    spend: dict[tuple[int, int], int] = field(default_factory=dict)
    # idempotency key → amount.
    topups: dict[str, int] = field(default_factory=dict)


@dataclass
class Reference:
    now_ms: int
    workspaces: list[RefWorkspace]
    holds: dict[str, RefHold] = field(default_factory=dict)
    revoked: set[int] = field(default_factory=set)

    def held(self, ws: int) -> int:
        return sum(h.amount for h in self.holds.values() if h.workspace == ws)

    def month_spend(self, ws: int) -> int:
        return self.workspaces[ws].spend.get(_month(self.now_ms), 0)

    def cap_room(self, ws: int) -> int | None:
        cap = self.workspaces[ws].cap
        return None if cap is None else cap - self.month_spend(ws) - self.held(ws)

    def available(self, ws: int) -> int:
        return self.workspaces[ws].balance - self.held(ws)

    def affordable(self, ws: int, cost: int) -> bool:
        room = self.cap_room(ws)
        return cost <= self.available(ws) and (room is None or cost <= room)


# ---- the machine -----------------------------------------------------------------------------


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


IDEMPOTENCY_KEYS = st.sampled_from(["a", "b", "c"]) | st.uuids().map(str)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(START_MS)
        self.records: list[Record] = []
        self.ledger = Ledger(clock=self.clock, sink=self.records.append)
        self.ref = Reference(START_MS, [RefWorkspace() for _ in range(WORKSPACES)])
        self.ws_ids: list[str] = []
        self.secrets: list[str] = []
        self.holds: dict[str, Hold] = {}
        self.next_hold = 0
        self.steps = 0

    @initialize(starters=st.lists(st.integers(0, 200), min_size=WORKSPACES, max_size=WORKSPACES))
    def create(self, starters: list[int]) -> None:
        for i, cents in enumerate(starters):
            ws, invoice = self.ledger.create_workspace(f"ws{i}", cents * CENT)
            assert (invoice is None) == (cents == 0)
            self.ws_ids.append(ws.id)
            ref = self.ref.workspaces[i]
            ref.balance = ref.topped_up = cents * CENT
            _, secret = self.ledger.create_key(ws.id, f"key{i}", KeyLimits())
            self.secrets.append(secret)

    # ---- money in ----------------------------------------------------------------------------

    @rule(
        ws=st.integers(0, WORKSPACES - 1),
        cents=st.integers(1, 300),
        idem=IDEMPOTENCY_KEYS,
        repeat_amount=st.booleans(),
        odd_nano=st.sampled_from([0, 0, 0, 0, 1, CENT // 2]),
    )
    def top_up(self, ws: int, cents: int, idem: str, repeat_amount: bool, odd_nano: int) -> None:
        self.steps += 1
        ref = self.ref.workspaces[ws]
        amount = cents * CENT + odd_nano
        previous = ref.topups.get(idem)
        if previous is not None and repeat_amount:
            amount = previous
        expect_invalid = (previous is not None and previous != amount) or (
            previous is None and amount % CENT != 0
        )
        if expect_invalid:
            with pytest.raises(errors.InvalidRequest):
                self.ledger.add_credits(self.ws_ids[ws], amount, "manual", idem)
            event("top-up refused")
            return
        invoice, replayed = self.ledger.add_credits(self.ws_ids[ws], amount, "manual", idem)
        assert replayed == (previous is not None)
        assert invoice.amount_nano == amount
        event("top-up replayed" if replayed else "top-up credited")
        if not replayed:
            ref.topups[idem] = amount
            ref.balance += amount
            ref.topped_up += amount
            assert invoice.balance_after_nano == ref.balance

    # ---- holds ---------------------------------------------------------------------------------

    @rule(
        ws=st.integers(0, WORKSPACES - 1),
        rate=st.integers(0, len(RATES) - 1),
        prompt=st.integers(0, 5_000),
        max_tokens=st.integers(0, 30_000) | st.sampled_from([0, 1]),
    )
    def reserve(self, ws: int, rate: int, prompt: int, max_tokens: int) -> None:
        self._reserve(ws, rate, prompt, max_tokens)

    @rule(
        ws=st.integers(0, WORKSPACES - 1),
        rate=st.integers(0, len(RATES) - 2),  # priced output: a finite affordable bound
        prompt=st.integers(0, 2_000),
        delta=st.sampled_from([-1, 0, 0, 1]),
    )
    def reserve_at_the_edge(self, ws: int, rate: int, prompt: int, delta: int) -> None:
        """A reserve for one token less, exactly, or one more than the reference affords."""
        room = self.ref.cap_room(ws)
        spendable = self.ref.available(ws) if room is None else min(room, self.ref.available(ws))
        inp, out = PRICES[rate]
        left = spendable - prompt * inp
        if left < 0:
            prompt, left = 0, spendable
        self._reserve(ws, rate, prompt, max(0, left // out + delta))

    def _reserve(self, ws: int, rate: int, prompt: int, max_tokens: int) -> None:
        self.steps += 1
        if ws in self.ref.revoked:
            with pytest.raises(errors.InvalidApiKey):
                self.ledger.authenticate(self.secrets[ws])
            return
        key = self.ledger.authenticate(self.secrets[ws])
        inp, out = PRICES[rate]
        hold_ref = RefHold(ws, inp, out, prompt, max_tokens)
        hold_id = f"h{self.next_hold}"
        self.next_hold += 1
        if not self.ref.affordable(ws, hold_ref.amount):
            room = self.ref.cap_room(ws)
            by_cap = room is not None and room < self.ref.available(ws)
            with pytest.raises(errors.InsufficientCredits) as refused:
                self.ledger.reserve(hold_id, key, RATES[rate], VERSION, prompt, max_tokens)
            assert refused.value.metadata["limit"] == ("spend_cap" if by_cap else "balance")
            event(f"reserve refused by {'cap' if by_cap else 'balance'}")
            spendable = (
                self.ref.available(ws) if room is None else min(room, self.ref.available(ws))
            )
            left = spendable - prompt * inp
            # A refusal with room left for the prompt means output costs something (out > 0).
            affordable = 0 if left < 0 else left // out
            assert refused.value.metadata["affordable_completion_tokens"] == str(affordable)
            return
        hold = self.ledger.reserve(hold_id, key, RATES[rate], VERSION, prompt, max_tokens)
        assert hold.amount_nano == hold_ref.amount
        self.ref.holds[hold_id] = hold_ref
        event("reserve admitted" + (" under a cap" if self.ref.cap_room(ws) is not None else ""))
        self.holds[hold_id] = hold
        # The promise of a successful reserve: spend + holds within the cap, holds within the
        # balance, at this very moment.
        ledger_ws = self.ledger.workspace(self.ws_ids[ws])
        if ledger_ws.spend_cap_nano is not None:
            assert ledger_ws.month_spend_nano + ledger_ws.held_nano <= ledger_ws.spend_cap_nano
        assert ledger_ws.held_nano <= ledger_ws.balance_nano

    def _pick_hold(self, pick: int) -> str:
        ids = sorted(self.ref.holds, key=lambda h: int(h[1:]))
        return ids[pick % len(ids)]

    @precondition(lambda self: self.ref.holds)
    @rule(pick=st.integers(0, 1_000), prompt_part=st.integers(0, 100), out_part=st.integers(0, 100))
    def settle(self, pick: int, prompt_part: int, out_part: int) -> None:
        self.steps += 1
        hold_id = self._pick_hold(pick)
        ref_hold = self.ref.holds.pop(hold_id)
        used_prompt = ref_hold.prompt_tokens * prompt_part // 100
        used_out = ref_hold.max_tokens * out_part // 100
        charge = self.ledger.settle(
            self.holds.pop(hold_id),
            request_id=hold_id,
            prompt_tokens=used_prompt,
            completion_tokens=used_out,
        )
        cost = used_prompt * ref_hold.input_nano + used_out * ref_hold.output_nano
        if used_prompt == used_out == 0:
            assert charge is None
            return
        assert charge is not None
        assert charge.cost_nano == cost
        ref = self.ref.workspaces[ref_hold.workspace]
        ref.balance -= cost
        ref.charged += cost
        month = _month(self.ref.now_ms)
        ref.spend[month] = ref.spend.get(month, 0) + cost

    @precondition(lambda self: self.ref.holds)
    @rule(pick=st.integers(0, 1_000))
    def release(self, pick: int) -> None:
        self.steps += 1
        hold_id = self._pick_hold(pick)
        del self.ref.holds[hold_id]
        released = self.ledger.settle(
            self.holds.pop(hold_id), request_id="", prompt_tokens=0, completion_tokens=0
        )
        assert released is None

    # ---- caps ----------------------------------------------------------------------------------

    @rule(ws=st.integers(0, WORKSPACES - 1), cap_cents=st.integers(0, 100), extra=st.integers(0, 9))
    def set_cap(self, ws: int, cap_cents: int, extra: int) -> None:
        self.steps += 1
        cap = cap_cents * CENT + extra * 123_457
        self.ledger.set_spend_cap(self.ws_ids[ws], cap)
        self.ref.workspaces[ws].cap = cap

    @precondition(lambda self: any(w.cap is not None for w in self.ref.workspaces))
    @rule(ws=st.integers(0, WORKSPACES - 1), raise_by=st.integers(1, 50 * CENT))
    def raise_cap(self, ws: int, raise_by: int) -> None:
        self.steps += 1
        current = self.ref.workspaces[ws].cap
        if current is None:
            return
        self.ledger.set_spend_cap(self.ws_ids[ws], current + raise_by)
        self.ref.workspaces[ws].cap = current + raise_by

    @rule(ws=st.integers(0, WORKSPACES - 1))
    def remove_cap(self, ws: int) -> None:
        self.steps += 1
        self.ledger.set_spend_cap(self.ws_ids[ws], None)
        self.ref.workspaces[ws].cap = None

    # ---- time and keys -------------------------------------------------------------------------

    def _set_time(self, now_ms: int) -> None:
        assert now_ms >= self.ref.now_ms
        if _month(now_ms) != _month(self.ref.now_ms):
            event("month rolled over" + (" with holds open" if self.ref.holds else ""))
        self.ref.now_ms = self.clock.now_ms = now_ms

    @rule(ms=st.integers(0, 90_000) | st.integers(0, 40 * 86_400_000))
    def advance(self, ms: int) -> None:
        self.steps += 1
        self._set_time(self.ref.now_ms + ms)

    @rule(offset_ms=st.sampled_from([-1, 0, 1, 59_999]))
    def advance_to_month_boundary(self, offset_ms: int) -> None:
        self.steps += 1
        self._set_time(max(self.ref.now_ms, _next_month_ms(self.ref.now_ms) + offset_ms))

    @precondition(lambda self: self.steps >= 15)
    @rule(ws=st.integers(0, WORKSPACES - 1))
    def revoke(self, ws: int) -> None:
        self.steps += 1
        self.ledger.revoke_key(self._key_id(ws))
        self.ref.revoked.add(ws)
        with pytest.raises(errors.InvalidApiKey):
            self.ledger.authenticate(self.secrets[ws])

    def _key_id(self, ws: int) -> str:
        return self.ledger.workspace(self.ws_ids[ws]).key_ids[0]

    # ---- after every step ----------------------------------------------------------------------

    @invariant()
    def agrees_with_the_reference(self) -> None:
        if not self.ws_ids:
            return
        assert self.ledger.held_total_nano() == sum(h.amount for h in self.ref.holds.values())
        for i, ws_id in enumerate(self.ws_ids):
            ws = self.ledger.workspace(ws_id)
            ref = self.ref.workspaces[i]
            assert ws.balance_nano == ref.balance
            assert ws.held_nano == self.ref.held(i)
            assert ws.month_spend_nano == self.ref.month_spend(i)
            assert ws.spend_cap_nano == ref.cap
            year, month = _month(self.ref.now_ms)
            assert ws.month == f"{year:04d}-{month:02d}"

    @invariant()
    def money_invariants(self) -> None:
        for i, ws_id in enumerate(self.ws_ids):
            ws = self.ledger.workspace(ws_id)
            assert ws.balance_nano >= 0
            assert 0 <= ws.held_nano <= ws.balance_nano
            # The sum of the charges is the balance's decrease, to the nano-USD: by the
            # ledger's own records, by its usage rows and by the reference.
            charges = sum(
                r.cost_nano
                for r in self.records
                if isinstance(r, Charged) and r.workspace_id == ws_id
            )
            credits = sum(
                r.amount_nano
                for r in self.records
                if isinstance(r, CreditsAdded) and r.workspace_id == ws_id
            )
            assert charges == credits - ws.balance_nano
            assert charges == self.ref.workspaces[i].charged
            assert credits == self.ref.workspaces[i].topped_up
            assert sum(row.cost_nano for row in self.ledger.usage(ws_id)) == charges


LedgerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerAgainstReference = LedgerMachine.TestCase
