"""The meter: admission and settlement against a real ledger and a real limiter.

No journal: these tests are about what is admitted, held and charged, all synchronous. Prices
are the catalogue's DeepSeek prices written as nano-USD per token.
"""

from __future__ import annotations

import calendar

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from corvex.money import NANO_PER_CENT, NANO_PER_USD
from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.ledger import Ledger
from corvex_core.limits import RateLimiter
from corvex_core.metering import Meter
from corvex_core.records import Charged, KeyLimits
from corvex_core.servicers.credentials import bearer_secret
from corvex_core.state import ApiKey, Workspace

VERSION = "2026-11-01"
S = 1_000_000_000


def _rate(context: int) -> ModelRate:
    return ModelRate(
        id="deepseek-ai/DeepSeek-V4-Flash",
        name="DeepSeek V4 Flash",
        card_path="/models/deepseek-ai/DeepSeek-V4-Flash",
        input_usd_per_million="0.35",
        output_usd_per_million="1.40",
        input_nano_per_token=350,
        output_nano_per_token=1_400,
        context_length=context,
        listed_unix_s=0,
    )


DEEPSEEK = _rate(131_072)
SMALL = _rate(1_000)
NO_LIMITS = KeyLimits()


class Clocks:
    """One time source for both: wall seconds for the ledger, ns for the limiter."""

    def __init__(self) -> None:
        self.now_ns = calendar.timegm((2026, 11, 14, 12, 0, 0, 0, 0, 0)) * S

    def wall(self) -> float:
        return self.now_ns / S

    def monotonic_ns(self) -> int:
        return self.now_ns


class World:
    def __init__(self) -> None:
        self.clocks = Clocks()
        self.charges: list[Charged] = []
        self.ledger = Ledger(clock=self.clocks.wall, sink=self._sink)
        self.limiter = RateLimiter(clock_ns=self.clocks.monotonic_ns)
        self.meter = Meter(self.ledger, self.limiter)

    def _sink(self, record: object) -> None:
        if isinstance(record, Charged):
            self.charges.append(record)

    def key(self, cents: int, limits: KeyLimits = NO_LIMITS) -> tuple[ApiKey, str]:
        ws, _ = self.ledger.create_workspace("acme", cents * NANO_PER_CENT)
        return self.ledger.create_key(ws.id, "ci", limits)

    def workspace(self, key: ApiKey) -> Workspace:
        return self.ledger.workspace(key.workspace_id)


def remaining(world: World, key: ApiKey, kind: str) -> int:
    standing = getattr(world.limiter.state(key), kind)
    assert standing is not None
    return int(standing.remaining)


@pytest.fixture
def world() -> World:
    return World()


def test_admit_and_settle(world: World) -> None:
    key, _ = world.key(100, KeyLimits(requests_per_minute=10, tokens_per_minute=10_000))

    ticket = world.meter.admit(key, DEEPSEEK, VERSION, "r1", prompt_tokens=100, max_tokens=200)

    assert ticket.max_tokens == 200
    assert ticket.hold.amount_nano == 100 * 350 + 200 * 1_400
    assert world.workspace(key).held_nano == ticket.hold.amount_nano
    assert ticket.limit_state.requests is not None and ticket.limit_state.tokens is not None
    assert ticket.limit_state.requests.remaining == 9
    assert ticket.limit_state.tokens.remaining == 9700

    charge = world.meter.settle(ticket, request_id="r1", prompt_tokens=100, completion_tokens=50)

    cost = 100 * 350 + 50 * 1_400
    assert charge is not None
    assert charge.cost_nano == cost
    assert world.charges == [charge]
    ws = world.workspace(key)
    assert (ws.balance_nano, ws.held_nano) == (NANO_PER_USD - cost, 0)
    assert remaining(world, key, "tokens") == 9850  # the 150 unused came back
    assert remaining(world, key, "requests") == 9  # a request stays counted
    assert world.ledger.key(key.id).month_tokens == 150
    with pytest.raises(AssertionError):
        world.meter.settle(ticket, request_id="r1", prompt_tokens=100, completion_tokens=50)
    assert world.workspace(key).balance_nano == NANO_PER_USD - cost


def test_settle_returns_the_rest_to_the_hold_and_the_tokens_bucket(world: World) -> None:
    key, _ = world.key(100, KeyLimits(tokens_per_minute=5_000, monthly_tokens=100_000))
    first = world.meter.admit(key, DEEPSEEK, VERSION, "r1", prompt_tokens=500, max_tokens=4_000)
    with pytest.raises(errors.RateLimitExceeded):
        world.meter.admit(key, DEEPSEEK, VERSION, "r2", prompt_tokens=500, max_tokens=100)

    world.meter.settle(first, request_id="r1", prompt_tokens=500, completion_tokens=1_000)

    assert world.workspace(key).held_nano == 0
    assert remaining(world, key, "tokens") == 3500
    second = world.meter.admit(key, DEEPSEEK, VERSION, "r2", prompt_tokens=500, max_tokens=None)
    assert second.max_tokens == 3_000
    assert world.workspace(key).held_nano == 500 * 350 + 3_000 * 1_400


def test_settle_counts_no_more_than_was_admitted(world: World) -> None:
    key, _ = world.key(100, KeyLimits(tokens_per_minute=1_000))
    ticket = world.meter.admit(key, DEEPSEEK, VERSION, "r1", prompt_tokens=10, max_tokens=20)

    charge = world.meter.settle(ticket, request_id="r1", prompt_tokens=99, completion_tokens=99)

    assert charge is not None
    assert (charge.prompt_tokens, charge.completion_tokens) == (10, 20)
    assert charge.cost_nano == 10 * 350 + 20 * 1_400
    assert remaining(world, key, "tokens") == 970


# ---- the bound without max_tokens -------------------------------------------------------------


def test_implicit_bound_is_the_context_room(world: World) -> None:
    key, _ = world.key(10_000)

    ticket = world.meter.admit(key, SMALL, VERSION, "r", prompt_tokens=100, max_tokens=None)

    assert ticket.max_tokens == 900


def test_implicit_bound_is_the_tokens_per_minute_room(world: World) -> None:
    key, _ = world.key(10_000, KeyLimits(tokens_per_minute=500))

    ticket = world.meter.admit(key, SMALL, VERSION, "r", prompt_tokens=100, max_tokens=None)

    assert ticket.max_tokens == 400


def test_implicit_bound_is_the_monthly_token_room(world: World) -> None:
    key, _ = world.key(10_000, KeyLimits(tokens_per_minute=500, monthly_tokens=300))

    ticket = world.meter.admit(key, SMALL, VERSION, "r", prompt_tokens=100, max_tokens=None)

    assert ticket.max_tokens == 200


def test_implicit_bound_is_what_the_balance_affords(world: World) -> None:
    key, _ = world.key(1, KeyLimits(tokens_per_minute=100_000))

    ticket = world.meter.admit(key, DEEPSEEK, VERSION, "r", prompt_tokens=100, max_tokens=None)

    # (10,000,000 - 100 x 350) // 1,400
    assert ticket.max_tokens == 7_117
    assert world.workspace(key).available_nano == 10_000_000 - ticket.hold.amount_nano < 1_400


def test_implicit_bound_is_what_the_spend_cap_allows(world: World) -> None:
    key, _ = world.key(100)
    world.ledger.set_spend_cap(key.workspace_id, NANO_PER_CENT // 2)

    ticket = world.meter.admit(key, DEEPSEEK, VERSION, "r", prompt_tokens=100, max_tokens=None)

    assert ticket.max_tokens == (5_000_000 - 100 * 350) // 1_400


def test_implicit_request_at_zero_balance_is_refused(world: World) -> None:
    key, _ = world.key(0)

    with pytest.raises(errors.InsufficientCredits):
        world.meter.admit(key, DEEPSEEK, VERSION, "r", prompt_tokens=100, max_tokens=None)

    assert world.ledger.held_total_nano() == 0


def test_explicit_max_tokens_beyond_the_context_is_refused(world: World) -> None:
    key, _ = world.key(100, KeyLimits(requests_per_minute=5))

    with pytest.raises(errors.ContextLengthExceeded) as refused:
        world.meter.admit(key, SMALL, VERSION, "r", prompt_tokens=100, max_tokens=901)

    assert refused.value.reason is errors.Reason.CONTEXT_LENGTH_EXCEEDED
    assert refused.value.metadata["context_length"] == "1000"
    assert "maximum context length is 1000 tokens" in refused.value.message
    assert world.ledger.held_total_nano() == 0
    assert remaining(world, key, "requests") == 5
    assert world.meter.admit(key, SMALL, VERSION, "r", prompt_tokens=100, max_tokens=900)


def test_a_prompt_that_fills_the_context_is_refused(world: World) -> None:
    key, _ = world.key(100)

    with pytest.raises(errors.ContextLengthExceeded):
        world.meter.admit(key, SMALL, VERSION, "r", prompt_tokens=1_000, max_tokens=None)


# ---- all or nothing ---------------------------------------------------------------------------


def test_a_money_refusal_takes_nothing_from_the_limits(world: World) -> None:
    key, _ = world.key(1, KeyLimits(requests_per_minute=2, tokens_per_minute=10_000))
    before = world.limiter.state(key)

    with pytest.raises(errors.InsufficientCredits):
        # 100 x 350 + 9,000 x 1,400 = $0.012635 > $0.01, but within every per-key limit.
        world.meter.admit(key, DEEPSEEK, VERSION, "r0", prompt_tokens=100, max_tokens=9_000)

    assert world.limiter.state(key) == before
    assert world.ledger.held_total_nano() == 0
    # The whole request budget is still there: two requests, then the third is limited.
    world.meter.admit(key, DEEPSEEK, VERSION, "r1", prompt_tokens=10, max_tokens=10)
    world.meter.admit(key, DEEPSEEK, VERSION, "r2", prompt_tokens=10, max_tokens=10)
    with pytest.raises(errors.RateLimitExceeded):
        world.meter.admit(key, DEEPSEEK, VERSION, "r3", prompt_tokens=10, max_tokens=10)


def test_a_limit_refusal_holds_no_money(world: World) -> None:
    key, _ = world.key(100, KeyLimits(monthly_tokens=1_000))

    with pytest.raises(errors.TokenLimitExceeded):
        world.meter.admit(key, DEEPSEEK, VERSION, "r", prompt_tokens=500, max_tokens=501)

    assert world.workspace(key).held_nano == 0
    assert world.ledger.held_total_nano() == 0


def test_monthly_tokens_count_what_was_charged(world: World) -> None:
    key, _ = world.key(100, KeyLimits(monthly_tokens=1_000))
    ticket = world.meter.admit(key, DEEPSEEK, VERSION, "r1", prompt_tokens=100, max_tokens=None)
    assert ticket.max_tokens == 900

    world.meter.settle(ticket, request_id="r1", prompt_tokens=100, completion_tokens=50)

    again = world.meter.admit(key, DEEPSEEK, VERSION, "r2", prompt_tokens=100, max_tokens=None)
    assert again.max_tokens == 1_000 - 150 - 100


def test_a_limit_changed_live_applies_to_the_next_admission(world: World) -> None:
    key, _ = world.key(100)
    world.meter.admit(key, DEEPSEEK, VERSION, "r1", prompt_tokens=100, max_tokens=100)

    world.ledger.set_key_limits(key.id, KeyLimits(tokens_per_minute=150))

    with pytest.raises(errors.RateLimitExceeded):
        world.meter.admit(key, DEEPSEEK, VERSION, "r2", prompt_tokens=100, max_tokens=100)
    ticket = world.meter.admit(key, DEEPSEEK, VERSION, "r3", prompt_tokens=100, max_tokens=None)
    assert ticket.max_tokens == 50


@settings(max_examples=60, deadline=None, print_blob=True)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, 600), st.integers(0, 1_500) | st.none()),
        min_size=1,
        max_size=150,
    )
)
def test_a_burst_never_admits_more_than_tokens_per_minute(
    requests: list[tuple[int, int | None]],
) -> None:
    world = World()
    key, _ = world.key(100_000, KeyLimits(tokens_per_minute=5_000))
    admitted = 0
    for i, (prompt, max_tokens) in enumerate(requests):
        try:
            ticket = world.meter.admit(
                key, DEEPSEEK, VERSION, f"r{i}", prompt_tokens=prompt, max_tokens=max_tokens
            )
        except errors.RateLimitExceeded:
            continue
        assert max_tokens is None or ticket.max_tokens == max_tokens
        admitted += ticket.prompt_tokens + ticket.max_tokens
        assert admitted <= 5_000
    assert world.workspace(key).held_nano == world.ledger.held_total_nano()


def test_many_implicit_requests_fill_the_window_exactly(world: World) -> None:
    key, _ = world.key(100_000, KeyLimits(tokens_per_minute=5_000))
    admitted = 0
    for i in range(300):
        try:
            ticket = world.meter.admit(
                key, DEEPSEEK, VERSION, f"r{i}", prompt_tokens=37, max_tokens=None
            )
        except errors.RateLimitExceeded:
            continue
        admitted += ticket.prompt_tokens + ticket.max_tokens
    assert admitted == 5_000


# ---- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_authenticate_reads_bearer_in_any_case(world: World, scheme: str) -> None:
    key, secret = world.key(0)

    assert world.meter.authenticate(bearer_secret(f"{scheme} {secret}")) is key
    assert world.meter.authenticate(bearer_secret(f"{scheme} {secret}  ")) is key


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "corvex-abc", "Token corvex-abc"],
)
def test_authenticate_rejects_missing_or_malformed_headers(
    world: World, header: str | None
) -> None:
    world.key(0)

    with pytest.raises(errors.InvalidApiKey) as refused:
        world.meter.authenticate(bearer_secret(header))

    assert refused.value.reason is errors.Reason.INVALID_API_KEY


def test_authenticate_rejects_a_bare_secret_and_a_revoked_key(world: World) -> None:
    key, secret = world.key(0)

    with pytest.raises(errors.InvalidApiKey):
        world.meter.authenticate(bearer_secret(secret))
    world.ledger.revoke_key(key.id)
    with pytest.raises(errors.InvalidApiKey):
        world.meter.authenticate(bearer_secret(f"Bearer {secret}"))
