"""Per-key limits: the bucket against an exact reference, the documented bound, the limiter.

The reference is the textbook continuous token bucket in `Fraction`s: capacity L, refilled at
L per 60 s, never above L. `limits.Bucket` (GCRA in scaled integers) must agree with it to the
nanosecond and the unit. Time is always injected; nothing here sleeps.
"""

from __future__ import annotations

import math
from fractions import Fraction

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from corvex_core import errors
from corvex_core.ledger import ApiKey
from corvex_core.limits import WINDOW_NS, Bucket, LimitTicket, RateLimiter, format_duration
from corvex_core.records import KeyLimits

S = 1_000_000_000  # ns per second
T0 = 1_000 * WINDOW_NS  # an arbitrary monotonic start, far from zero

PROPERTY = settings(max_examples=200, deadline=None, print_blob=True)


# ---- the reference bucket --------------------------------------------------------------------


class RefBucket:
    """A continuous token bucket: `level` units, refilled at limit/WINDOW_NS per ns."""

    def __init__(self, limit: int, now_ns: int) -> None:
        self.limit = limit
        self.level = Fraction(limit)
        self.at_ns = now_ns

    def _refill(self, now_ns: int) -> None:
        assert now_ns >= self.at_ns
        gained = Fraction(self.limit * (now_ns - self.at_ns), WINDOW_NS)
        self.level = min(Fraction(self.limit), self.level + gained)
        self.at_ns = now_ns

    def available(self, now_ns: int) -> int:
        self._refill(now_ns)
        return math.floor(self.level)

    def take(self, units: int, now_ns: int) -> bool:
        """Takes `units` if that many whole units are there; says whether it did."""
        if units > self.available(now_ns):
            return False
        self.level -= units
        return True

    def give_back(self, units: int, now_ns: int) -> None:
        self._refill(now_ns)
        self.level = min(Fraction(self.limit), self.level + units)

    def wait_ns(self, units: int, now_ns: int) -> int:
        """The least whole ns after which `units` are available."""
        self._refill(now_ns)
        if self.level >= units:
            return 0
        return math.ceil((units - self.level) * WINDOW_NS / self.limit)

    def reset_ns(self, now_ns: int) -> int:
        self._refill(now_ns)
        return math.ceil((self.limit - self.level) * WINDOW_NS / self.limit)


LIMITS = st.integers(1, 20) | st.integers(1, 10**6) | st.sampled_from([60, 3_000, 5_000])
ADVANCES = (
    st.integers(0, 1_000)
    | st.integers(0, 10**9)
    | st.integers(0, 2 * WINDOW_NS)
    | st.sampled_from([0, 1, WINDOW_NS - 1, WINDOW_NS])
)


def _units(limit: int) -> st.SearchStrategy[int]:
    return st.integers(0, limit) | st.sampled_from([1, limit])


@st.composite
def bucket_programs(draw: st.DrawFn) -> tuple[int, list[tuple[int, str, int]]]:
    limit = draw(LIMITS)
    steps = draw(
        st.lists(
            st.tuples(
                ADVANCES,
                st.sampled_from(["take", "take", "give_back", "wait"]),
                _units(limit) | st.integers(0, 2 * limit),
            ),
            max_size=60,
        )
    )
    return limit, steps


@PROPERTY
@given(bucket_programs())
def test_bucket_matches_the_reference_exactly(
    program: tuple[int, list[tuple[int, str, int]]],
) -> None:
    limit, steps = program
    now = T0
    bucket, ref = Bucket(limit, now), RefBucket(limit, now)
    for advance, op, units in steps:
        now += advance
        assert bucket.available(now) == ref.available(now)
        assert bucket.reset_ns(now) == ref.reset_ns(now)
        assert bucket.is_full(now) == (ref.reset_ns(now) == 0)
        if op == "take":
            admitted = units <= bucket.available(now)
            assert ref.take(units, now) == admitted
            if admitted:
                bucket.take(units, now)
            else:
                with pytest.raises(AssertionError):
                    bucket.take(units, now)
        elif op == "give_back":
            bucket.give_back(units, now)
            ref.give_back(units, now)
        else:
            units = min(units, limit)
            wait = bucket.wait_ns(units, now)
            assert wait == ref.wait_ns(units, now)
            # The wait is the least: a nanosecond earlier the units are not there yet.
            assert bucket.available(now + wait) >= units
            if wait > 0:
                assert bucket.available(now + wait - 1) < units
        assert bucket.available(now) == ref.available(now)
        assert 0 <= bucket.available(now) <= limit


@st.composite
def greedy_attempts(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    """A limit and admission attempts (time advance ns, units ≤ limit), bursts included."""
    limit = draw(LIMITS)
    attempts = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0, 0, 0]) | ADVANCES | st.integers(0, WINDOW_NS // max(limit, 1)),
                st.integers(1, limit) | st.sampled_from([1, limit]),
            ),
            min_size=1,
            max_size=80,
        )
    )
    return limit, attempts


@PROPERTY
@given(greedy_attempts())
def test_admissions_in_any_interval_are_at_most_limit_plus_refill(
    program: tuple[int, list[tuple[int, int]]],
) -> None:
    """The documented bound: in any interval of length t, admitted ≤ L + L·t/60 s."""
    limit, attempts = program
    now = T0
    bucket = Bucket(limit, now)
    admitted: list[tuple[int, int]] = []  # (time, units)
    for advance, units in attempts:
        now += advance
        if bucket.available(now) >= units:  # greedy: take whenever there is room
            bucket.take(units, now)
            admitted.append((now, units))
    # The worst windows start and end at admissions; check every such pair.
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, units in admitted[i:]:
            total += units
            # total ≤ L + L·(end - start)/WINDOW, in integers.
            assert (total - limit) * WINDOW_NS <= limit * (end - start), (start, end, total)
            if end - start <= WINDOW_NS:
                assert total <= 2 * limit
            if end == start:
                assert total <= limit


@PROPERTY
@given(limit=LIMITS, sizes=st.lists(st.integers(1, 10**6), min_size=1, max_size=200))
def test_a_burst_at_one_instant_admits_at_most_the_limit(limit: int, sizes: list[int]) -> None:
    bucket = Bucket(limit, T0)
    admitted = 0
    for size in sizes:
        if size <= bucket.available(T0):
            bucket.take(size, T0)
            admitted += size
    assert admitted <= limit
    # What is left is exactly the rest: the capacity is L, not less.
    assert admitted + bucket.available(T0) == limit


def test_bucket_refills_continuously() -> None:
    bucket = Bucket(60, T0)
    bucket.take(60, T0)

    assert bucket.available(T0) == 0
    assert bucket.available(T0 + S - 1) == 0
    assert bucket.available(T0 + S) == 1
    assert bucket.wait_ns(30, T0) == 30 * S
    assert bucket.reset_ns(T0) == WINDOW_NS
    assert bucket.available(T0 + 10 * WINDOW_NS) == 60


# ---- the limiter -----------------------------------------------------------------------------


class NsClock:
    def __init__(self) -> None:
        self.now_ns = T0

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns


def _key(limits: KeyLimits, key_id: str = "key_test", month_tokens: int = 0) -> ApiKey:
    return ApiKey(
        id=key_id,
        workspace_id="ws_test",
        name="test",
        prefix="corvex-abcd",
        secret_sha256=b"\0" * 32,
        created_ms=0,
        limits=limits,
        month="2026-11",
        month_tokens=month_tokens,
    )


@pytest.fixture
def clock() -> NsClock:
    return NsClock()


@pytest.fixture
def limiter(clock: NsClock) -> RateLimiter:
    return RateLimiter(clock_ns=clock)


def _request(
    limiter: RateLimiter, key: ApiKey, prompt: int, completion: int, *, explicit: bool = True
) -> tuple[int, LimitTicket]:
    """Admits a request as the meter does: (completion bound, ticket)."""
    bound = limiter.completion_bound(key, prompt, completion, explicit=explicit)
    return bound, limiter.admit(key, prompt + bound)


def test_explicit_max_tokens_must_fit_the_tokens_window(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    assert _request(limiter, key, 100, 700)[0] == 700

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 50, 500, explicit=True)

    error = refused.value
    assert error.reason is errors.Reason.RATE_LIMIT_EXCEEDED
    assert error.metadata["limit"] == "tokens_per_minute"
    assert "limit 1000" in error.message
    assert "used 800" in error.message
    assert "requested 550" in error.message
    # 350 more tokens at 1,000 per minute: 21 s.
    assert error.retry_after_s == 21.0
    assert "try again in 21.000s" in error.message


def test_implicit_max_tokens_shrinks_to_the_window(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _request(limiter, key, 100, 700)

    assert limiter.completion_bound(key, 50, 10_000, explicit=False) == 150
    assert limiter.completion_bound(key, 50, 100, explicit=False) == 100
    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 200, 10_000, explicit=False)
    # 201 tokens needed (the prompt and one output token), 200 there: 1 more is 60 ms away.
    assert refused.value.retry_after_s == pytest.approx(0.06)


def test_a_request_larger_than_the_limit_gets_no_retry_after(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 600, 401, explicit=True)

    assert refused.value.retry_after_s is None
    assert "larger than the limit" in refused.value.message


def test_requests_per_minute(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(requests_per_minute=3))
    for _ in range(3):
        _request(limiter, key, 10, 10)

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 10, 10, explicit=True)
    error = refused.value
    assert error.metadata["limit"] == "requests_per_minute"
    assert "limit 3" in error.message
    assert "requested 1" in error.message
    assert error.retry_after_s == 20.0

    clock.advance(20 * S - 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 10, 10, explicit=True)
    clock.advance(1)
    _request(limiter, key, 10, 10)


def test_monthly_token_limit(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(monthly_tokens=1_000), month_tokens=100)
    _request(limiter, key, 100, 500)  # 600 held, 100 charged before

    with pytest.raises(errors.TokenLimitExceeded) as refused:
        limiter.completion_bound(key, 100, 201, explicit=True)

    error = refused.value
    assert error.reason is errors.Reason.TOKEN_LIMIT_EXCEEDED
    assert error.retry_after_s is None  # it resets with the month, not in seconds
    assert error.metadata["limit"] == "monthly_tokens"
    assert "limit 1000" in error.message
    assert "used 700" in error.message
    assert "requested 301" in error.message
    assert limiter.completion_bound(key, 100, 200, explicit=True) == 200
    assert limiter.completion_bound(key, 100, 10_000, explicit=False) == 200
    with pytest.raises(errors.TokenLimitExceeded):
        limiter.completion_bound(key, 300, 10_000, explicit=False)


def test_settle_gives_back_unused_tokens_exactly_once(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000, monthly_tokens=5_000))
    _, ticket = _request(limiter, key, 200, 800)
    assert limiter.headers(key)["x-ratelimit-remaining-tokens"] == "0"

    limiter.settle(ticket, 300)

    assert limiter.headers(key)["x-ratelimit-remaining-tokens"] == "700"
    with pytest.raises(AssertionError):
        limiter.settle(ticket, 0)
    assert limiter.headers(key)["x-ratelimit-remaining-tokens"] == "700"
    # The monthly hold is gone; what was used is the ledger's to count (key.month_tokens).
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 700


def test_a_limit_added_after_admission_is_not_credited_on_settle(limiter: RateLimiter) -> None:
    key = _key(KeyLimits())
    _, ticket = _request(limiter, key, 100, 400)

    key.limits = KeyLimits(tokens_per_minute=1_000, monthly_tokens=2_000)
    _, second = _request(limiter, key, 100, 300)
    limiter.settle(ticket, 0)

    assert limiter.headers(key)["x-ratelimit-remaining-tokens"] == "600"
    # The monthly hold of the second request alone counts: 2,000 - 400 = 1,600 room.
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 600
    limiter.settle(second, 400)
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 600


def test_headers_report_the_limits_the_key_has(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(requests_per_minute=60, tokens_per_minute=1_000))
    assert limiter.headers(key) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "60",
        "x-ratelimit-reset-requests": "0ms",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "0ms",
    }

    _request(limiter, key, 50, 200)

    assert limiter.headers(key) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "15s",
    }
    clock.advance(14_500_000_000)
    assert limiter.headers(key)["x-ratelimit-reset-tokens"] == "500ms"


def test_headers_of_a_fast_limit_and_of_no_limit(limiter: RateLimiter) -> None:
    fast = _key(KeyLimits(requests_per_minute=3_000), "fast")
    _request(limiter, fast, 1, 1)

    assert limiter.headers(fast) == {
        "x-ratelimit-limit-requests": "3000",
        "x-ratelimit-remaining-requests": "2999",
        "x-ratelimit-reset-requests": "20ms",
    }
    assert limiter.headers(_key(KeyLimits(monthly_tokens=10), "monthly")) == {}
    assert limiter.headers(_key(KeyLimits(), "none")) == {}


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0ms"),
        (1, "1ms"),
        (20_000_000, "20ms"),
        (999_000_000, "999ms"),
        (999_000_001, "1s"),
        (S, "1s"),
        (1_500_000_000, "1.5s"),
        (10 * S, "10s"),
        (59_999_000_000, "59.999s"),
        (60 * S, "1m0s"),
        (61_500_000_000, "1m1.5s"),
        (6 * 60 * S, "6m0s"),
        (6 * 60 * S + 20 * S, "6m20s"),
    ],
)
def test_format_duration(ns: int, text: str) -> None:
    assert format_duration(ns) == text


def test_sweep_forgets_idle_keys(limiter: RateLimiter, clock: NsClock) -> None:
    keys = [
        _key(KeyLimits(requests_per_minute=10, tokens_per_minute=1_000), f"k{i}")
        for i in range(200)
    ]
    for key in keys:
        _request(limiter, key, 10, 10)
    monthly = _key(KeyLimits(monthly_tokens=1_000), "monthly")
    _, in_flight = _request(limiter, monthly, 10, 10)
    assert len(limiter) == 201

    assert limiter.sweep() == 0  # nothing has refilled yet
    clock.advance(WINDOW_NS)
    assert limiter.sweep() == 200
    assert len(limiter) == 1  # the key with a request in flight is remembered

    limiter.settle(in_flight, 20)
    assert limiter.sweep() == 1
    assert len(limiter) == 0
    # A forgotten key starts again with full buckets.
    assert limiter.headers(keys[0])["x-ratelimit-remaining-requests"] == "10"
    _request(limiter, keys[0], 10, 10)


def test_sweep_keeps_keys_still_refilling(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _request(limiter, key, 0, 1_000)

    clock.advance(WINDOW_NS - 1)
    assert limiter.sweep() == 0
    clock.advance(1)
    assert limiter.sweep() == 1


def test_a_removed_limit_applies_to_the_next_request(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(requests_per_minute=1))
    _request(limiter, key, 1, 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 1, 1, explicit=True)

    key.limits = KeyLimits()

    _request(limiter, key, 1, 1)


def test_a_raised_limit_applies_to_the_next_request(limiter: RateLimiter) -> None:
    # BUG: Bucket.set_limit keeps the time the bucket needs to become full, not the units
    # used, so a key that used its 1 request per minute is still "full" after its limit is
    # raised to 10: the next request gets 429 (for 6 s) although 1 of 10 requests were used.
    # Issue 5: "a change applies to the next request".
    key = _key(KeyLimits(requests_per_minute=1))
    _request(limiter, key, 1, 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 1, 1, explicit=True)

    key.limits = KeyLimits(requests_per_minute=10)

    _request(limiter, key, 1, 1)


def test_a_lowered_limit_applies_to_the_next_request(limiter: RateLimiter) -> None:
    # BUG: same cause as above (set_limit scales the used units by new/old limit). The key used
    # 6,000 tokens, its limit is lowered to 5,000 per minute, and the next request is still
    # admitted: 2,000 more tokens pass at the same instant, 8,000 against a 5,000 limit.
    key = _key(KeyLimits(tokens_per_minute=10_000))
    _request(limiter, key, 1_000, 5_000)

    key.limits = KeyLimits(tokens_per_minute=5_000)

    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 100, 100, explicit=True)


def test_unused_tokens_given_back_after_a_refill_break_the_window_bound(
    limiter: RateLimiter, clock: NsClock
) -> None:
    # BUG: settle gives a long request's unused tokens back to a bucket that has already
    # refilled them (Bucket.give_back only clamps at a full bucket). Request A reserves the
    # whole minute (100 tokens) and stays in flight for 60 s; meanwhile the bucket refills.
    # B uses 100 tokens; then A ends having used nothing and returns 100, so C gets another
    # 100 at the same instant, and D 100 more a minute later: 300 tokens admitted and used in
    # one 60-second window against tokens_per_minute=100, beyond the documented 2·L bound
    # (and a burst of 2·L at one instant, beyond the documented L).
    key = _key(KeyLimits(tokens_per_minute=100))
    _, a = _request(limiter, key, 0, 100)
    clock.advance(WINDOW_NS)
    window_start = clock.now_ns
    used_in_window = 0

    def request_using_everything() -> None:
        nonlocal used_in_window
        try:
            bound, ticket = _request(limiter, key, 0, 100, explicit=False)
        except errors.RateLimitExceeded:
            return
        limiter.settle(ticket, bound)
        used_in_window += bound

    request_using_everything()  # B
    limiter.settle(a, 0)
    request_using_everything()  # C
    burst = used_in_window
    clock.advance(WINDOW_NS)
    request_using_everything()  # D
    assert clock.now_ns - window_start == WINDOW_NS

    assert burst <= 100 and used_in_window <= 2 * 100, (burst, used_in_window)
