"""Per-key limits: the bucket and the window against exact references, the documented bounds,
the limiter.

Requests per minute are a GCRA bucket. Its reference is the textbook continuous token bucket in
`Fraction`s: capacity L, refilled at L per 60 s, never above L. `limits.Bucket` (scaled
integers) must agree with it to the nanosecond and the unit.

Tokens per minute are a sliding window of 60 one-second slots. Its reference is a plain list of
admissions, one [second, units] entry each, a refund lowering its own entry; "used" at a time is
the sum of the entries whose second is in (now_second - 60, now_second]. `limits.Window` (a
ring of slots and a running total) must agree with it exactly.

The limiter is checked by examples and, over random runs, against both references and the
monthly rule written out plainly. Time is always injected; nothing here sleeps.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from fractions import Fraction

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from corvex_core import errors
from corvex_core.limits import (
    SLOTS,
    WINDOW_NS,
    Bucket,
    LimitTicket,
    RateLimiter,
    Window,
)
from corvex_core.records import KeyLimits
from corvex_core.servicers.metadata import format_duration, response_metadata
from corvex_core.state import ApiKey

S = 1_000_000_000  # ns per second
T0 = 1_000 * WINDOW_NS  # an arbitrary monotonic start, far from zero and on a whole second
S0 = T0 // S  # the whole second T0 is in

PROPERTY = settings(max_examples=200, deadline=None, print_blob=True)


# ---- the reference bucket --------------------------------------------------------------------


class RefBucket:
    """A continuous token bucket: `level` units, refilled at limit/WINDOW_NS per ns.

    A lowered limit can leave `level` below zero: the units used stay used.
    """

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
        return max(0, math.floor(self.level))

    def used(self, now_ns: int) -> int:
        self._refill(now_ns)
        return math.ceil(self.limit - self.level)

    def take(self, units: int, now_ns: int) -> bool:
        """Takes `units` if that many whole units are there; says whether it did."""
        if units > self.available(now_ns):
            return False
        self.level -= units
        return True

    def wait_ns(self, units: int, now_ns: int) -> int:
        """The least whole ns after which `units` are available."""
        self._refill(now_ns)
        if self.level >= units:
            return 0
        return math.ceil((units - self.level) * WINDOW_NS / self.limit)

    def reset_ns(self, now_ns: int) -> int:
        self._refill(now_ns)
        return math.ceil((self.limit - self.level) * WINDOW_NS / self.limit)

    def set_limit(self, limit: int, now_ns: int) -> None:
        """Keeps the units used (limit - level), so the level moves by the change."""
        self._refill(now_ns)
        self.level += limit - self.limit
        self.limit = limit


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
                st.sampled_from(["take", "take", "take", "wait", "set_limit"]),
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
        assert bucket.used(now) == ref.used(now)
        assert bucket.reset_ns(now) == ref.reset_ns(now)
        assert bucket.is_empty(now) == (ref.reset_ns(now) == 0)
        if op == "take":
            admitted = units <= bucket.available(now)
            assert ref.take(units, now) == admitted
            if admitted:
                bucket.take(units, now)
            else:
                with pytest.raises(AssertionError):
                    bucket.take(units, now)
        elif op == "wait":
            units = min(units, bucket.limit)
            wait = bucket.wait_ns(units, now)
            assert wait == ref.wait_ns(units, now)
            # The wait is the least: a nanosecond earlier the units are not there yet.
            assert bucket.available(now + wait) >= units
            if wait > 0 and units > 0:
                assert bucket.available(now + wait - 1) < units
        else:
            bucket.set_limit(max(1, units), now)
            ref.set_limit(max(1, units), now)
        assert bucket.available(now) == ref.available(now)
        assert bucket.used(now) == ref.used(now)
        assert 0 <= bucket.available(now) <= bucket.limit


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
    assert bucket.is_empty(T0)
    bucket.take(60, T0)

    assert bucket.available(T0) == 0
    assert bucket.used(T0) == 60
    assert not bucket.is_empty(T0)
    assert bucket.available(T0 + S - 1) == 0
    assert bucket.used(T0 + S - 1) == 60  # a unit not wholly refilled is still used
    assert bucket.available(T0 + S) == 1
    assert bucket.used(T0 + S) == 59
    assert bucket.wait_ns(30, T0) == 30 * S
    assert bucket.reset_ns(T0) == WINDOW_NS
    assert not bucket.is_empty(T0 + WINDOW_NS - 1)
    assert bucket.is_empty(T0 + WINDOW_NS)
    assert bucket.available(T0 + 10 * WINDOW_NS) == 60


def test_a_raised_bucket_limit_admits_the_difference_at_once() -> None:
    bucket = Bucket(1, T0)
    bucket.take(1, T0)
    assert bucket.available(T0) == 0

    bucket.set_limit(10, T0)

    # One of ten is used: nine more now, not one more in six seconds.
    assert bucket.used(T0) == 1
    assert bucket.available(T0) == 9
    bucket.take(9, T0)
    assert bucket.available(T0) == 0
    assert bucket.wait_ns(1, T0) == 6 * S  # and from now on it refills at 10 per minute


def test_a_lowered_bucket_limit_admits_nothing_until_the_used_units_refill_below_it() -> None:
    bucket = Bucket(10, T0)
    bucket.take(8, T0)
    assert bucket.available(T0) == 2

    bucket.set_limit(5, T0)

    # Eight used against five: one unit fits again once four are left, that is once four
    # units refilled at the new 5 per minute, 48 s.
    assert bucket.used(T0) == 8
    assert bucket.available(T0) == 0
    assert bucket.wait_ns(1, T0) == 48 * S
    assert bucket.available(T0 + 48 * S - 1) == 0
    assert bucket.available(T0 + 48 * S) == 1
    assert bucket.reset_ns(T0) == 96 * S


# ---- the reference window --------------------------------------------------------------------


class RefWindow:
    """Every admission as a [second, units] entry; a refund lowers its own entry."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admissions: list[list[int]] = []

    def used(self, now_ns: int) -> int:
        """Units counted in the whole seconds (now_second - 60, now_second]."""
        now_second = now_ns // S
        return sum(
            units for second, units in self.admissions if now_second - 60 < second <= now_second
        )

    def available(self, now_ns: int) -> int:
        return max(0, self.limit - self.used(now_ns))

    def take(self, units: int, now_ns: int) -> int | None:
        """Takes `units` if they fit; returns the admission's index, or None."""
        if units > self.available(now_ns):
            return None
        self.admissions.append([now_ns // S, units])
        return len(self.admissions) - 1

    def give_back(self, admission: int, units: int) -> None:
        # Applied even after the second has left the window: it no longer counts there anyway.
        assert 0 <= units <= self.admissions[admission][1]
        self.admissions[admission][1] -= units

    def _first_ns(self, now_ns: int, holds: Callable[[int], bool]) -> int:
        """The least wait after which `holds(used)`: used only falls when a second leaves."""
        now_second = now_ns // S
        for ahead in range(61):
            at = now_ns if ahead == 0 else (now_second + ahead) * S
            if holds(self.used(at)):
                return at - now_ns
        raise AssertionError("a minute on, the window is empty")

    def wait_ns(self, units: int, now_ns: int) -> int:
        return self._first_ns(now_ns, lambda used: used + units <= self.limit)

    def reset_ns(self, now_ns: int) -> int:
        return self._first_ns(now_ns, lambda used: used == 0)


WINDOW_ADVANCES = (
    st.integers(0, 1_000)
    | st.integers(0, 3 * S)
    | st.integers(0, 2 * WINDOW_NS)
    | st.sampled_from([0, 1, S - 1, S, WINDOW_NS - S, WINDOW_NS - 1, WINDOW_NS])
)


@st.composite
def window_programs(draw: st.DrawFn) -> tuple[int, list[tuple[int, str, int, int]]]:
    limit = draw(LIMITS)
    steps = draw(
        st.lists(
            st.tuples(
                WINDOW_ADVANCES,
                st.sampled_from(
                    ["take", "take", "take_all", "give_back", "give_back", "wait", "set_limit"]
                ),
                _units(limit) | st.integers(0, 2 * limit),
                _units(limit) | st.sampled_from([0, 10**13]),
            ),
            max_size=60,
        )
    )
    return limit, steps


def _assert_window_is(window: Window, ref: RefWindow, now: int) -> None:
    assert window.used(now) == ref.used(now)
    assert window.available(now) == ref.available(now)
    assert window.reset_ns(now) == ref.reset_ns(now)
    assert window.is_empty(now) == (ref.used(now) == 0)


@PROPERTY
@given(window_programs())
def test_window_matches_the_reference_exactly(
    program: tuple[int, list[tuple[int, str, int, int]]],
) -> None:
    limit, steps = program
    now = T0
    window, ref = Window(limit, now), RefWindow(limit)
    tickets: list[tuple[int, int]] = []  # (reference admission, second taken in)
    for advance, op, a, b in steps:
        now += advance
        _assert_window_is(window, ref, now)
        if op in ("take", "take_all"):
            units = window.available(now) if op == "take_all" else a
            admission = ref.take(units, now)
            if admission is None:
                with pytest.raises(AssertionError):
                    window.take(units, now)
            else:
                assert window.take(units, now) == now // S
                tickets.append((admission, now // S))
        elif op == "give_back" and tickets:
            admission, second = tickets[a % len(tickets)]
            units = min(b, ref.admissions[admission][1])
            window.give_back(units, second, now)
            ref.give_back(admission, units)
        elif op == "wait":
            units = min(a, window.limit)
            wait = window.wait_ns(units, now)
            assert wait == ref.wait_ns(units, now)
            # The wait is the least: a nanosecond earlier the units do not fit yet. The probes
            # run on copies, as a window only moves forwards.
            assert copy.deepcopy(window).available(now + wait) >= units
            if wait > 0 and units > 0:
                assert copy.deepcopy(window).available(now + wait - 1) < units
        elif op == "set_limit":
            window.set_limit(max(1, a))
            ref.limit = max(1, a)
        _assert_window_is(window, ref, now)


@st.composite
def window_traffic(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int, int]]]:
    """A limit and requests: (time advance ns, units wanted, quarters of them used, how many
    requests later it settles: 0 at once, beyond the end never)."""
    limit = draw(LIMITS)
    requests = draw(
        st.lists(
            st.tuples(
                # Often whole seconds and a whole minute, so late refunds meet reused slots.
                st.sampled_from([0, S // 2, S, 20 * S, 59 * S, WINDOW_NS]) | WINDOW_ADVANCES,
                st.integers(1, limit) | st.sampled_from([1, limit]),
                st.sampled_from([0, 4]) | st.integers(0, 4),
                st.integers(0, 3) | st.integers(0, 8) | st.just(1_000),
            ),
            min_size=1,
            max_size=80,
        )
    )
    return limit, requests


@settings(PROPERTY, max_examples=600)  # the bound is the point of the window: search harder
@given(window_traffic())
def test_tokens_used_stay_within_the_documented_bounds(
    program: tuple[int, list[tuple[int, int, int, int]]],
) -> None:
    """Tokens used (admitted minus given back) by greedy requests that settle in any order,
    some at once, some after their second left the window, some never: a burst is at most L;
    any 60 consecutive whole seconds hold at most L; an interval of length t holds at most
    L·⌈(t + 1 s)/60 s⌉ (so at most L when t ≤ 59 s)."""
    limit, requests = program
    now = T0
    window = Window(limit, now)
    pending: list[tuple[int, int, int]] = []  # (settles at request number, unused, second)
    admitted: list[tuple[int, int]] = []  # (time, tokens used)
    for number, (advance, wanted, used_quarters, settle_after) in enumerate(requests):
        now += advance
        for _due, unused, second in [p for p in pending if p[0] <= number]:
            window.give_back(unused, second, now)
        pending = [p for p in pending if p[0] > number]
        units = min(wanted, window.available(now))  # greedy: take whatever there is room for
        if units == 0:
            continue
        second = window.take(units, now)
        used = units * used_quarters // 4
        admitted.append((now, used))
        if settle_after == 0:
            window.give_back(units - used, second, now)
        else:
            pending.append((number + settle_after, units - used, second))
        assert window.used(now) <= limit
    # The worst intervals start and end at admissions; check every such pair.
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, used in admitted[i:]:
            total += used
            assert total <= limit * -(-(end - start + S) // WINDOW_NS), (start, end, total)
            if end // S - start // S < SLOTS:  # within 60 consecutive whole seconds
                assert total <= limit, (start, end, total)
            if end == start:
                assert total <= limit


@PROPERTY
@given(
    limit=LIMITS,
    sizes=st.lists(st.integers(1, 10**6), min_size=1, max_size=200),
    taken_before_s=st.integers(0, 120),
)
def test_a_window_burst_at_one_instant_admits_at_most_the_limit(
    limit: int, sizes: list[int], taken_before_s: int
) -> None:
    # A burst taking what is free, some seconds after someone took the whole limit.
    window = Window(limit, T0)
    window.take(limit, T0)
    now = T0 + taken_before_s * S + S // 2
    free = window.available(now)
    assert free == (limit if taken_before_s >= SLOTS else 0)
    admitted = 0
    for size in sizes:
        if size <= window.available(now):
            window.take(size, now)
            admitted += size
    assert admitted <= free
    assert admitted + window.available(now) == free


def test_window_capacity_comes_back_when_a_second_leaves_it() -> None:
    window = Window(1_000, T0)
    assert window.take(600, T0 + S // 2) == S0
    assert window.take(400, T0 + 20 * S + S // 2) == S0 + 20
    now = T0 + 30 * S

    assert window.available(now) == 0
    assert window.used(now) == 1_000
    # Second S0 (600) leaves at T0 + 60 s; second S0 + 20 (400) at T0 + 80 s.
    assert window.wait_ns(1, now) == 30 * S
    assert window.wait_ns(600, now) == 30 * S
    assert window.wait_ns(601, now) == 50 * S
    assert window.wait_ns(1_000, now) == 50 * S
    assert window.reset_ns(now) == 50 * S
    assert window.available(T0 + WINDOW_NS - 1) == 0
    assert window.available(T0 + WINDOW_NS) == 600
    assert not window.is_empty(T0 + 80 * S - 1)
    assert window.is_empty(T0 + 80 * S)
    assert window.reset_ns(T0 + 80 * S) == 0


# Four requests against a limit of 1,000, two taken in second S0 and one each in S0 + 1 and
# S0 + 2: (time taken, units taken, units given back).
REQUESTS = [
    (T0, 300, 100),
    (T0 + 400_000_000, 200, 200),
    (T0 + 1_500_000_000, 100, 50),
    (T0 + 2_200_000_000, 250, 250),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(REQUESTS)))))
def test_give_back_returns_each_refund_to_its_own_second_in_any_order(
    order: tuple[int, ...],
) -> None:
    window, ref = Window(1_000, T0), RefWindow(1_000)
    seconds: list[int] = []
    for at, units, _ in REQUESTS:
        seconds.append(window.take(units, at))
        assert ref.take(units, at) == len(seconds) - 1
    assert seconds == [S0, S0, S0 + 1, S0 + 2]
    now = T0 + 3 * S
    assert window.available(now) == 150

    for request in order:
        window.give_back(REQUESTS[request][2], seconds[request], now)
        ref.give_back(request, REQUESTS[request][2])
        _assert_window_is(window, ref, now)

    # Left: 200 in S0 (300 less 100, and 200 all given back), 50 in S0 + 1, none in S0 + 2.
    assert window.used(now) == 250
    assert window.wait_ns(800, now) == 57 * S  # S0 leaves at T0 + 60 s
    assert window.wait_ns(1_000, now) == 58 * S  # and S0 + 1 at T0 + 61 s
    assert window.reset_ns(now) == 58 * S  # S0 + 2 was given back whole
    assert window.available(T0 + WINDOW_NS) == 950
    assert window.available(T0 + WINDOW_NS + S) == 1_000


def test_give_back_after_the_second_left_the_window_returns_nothing() -> None:
    window = Window(1_000, T0)
    early = window.take(500, T0)
    late = window.take(500, T0 + 59 * S)
    assert window.available(T0 + WINDOW_NS) == 500

    # The early request's second left the window: its refund must not lower what the late
    # request took, nor what is taken now in the ring slot that second used to have.
    window.give_back(500, early, T0 + WINDOW_NS)
    assert window.available(T0 + WINDOW_NS) == 500
    window.take(500, T0 + WINDOW_NS)
    window.give_back(500, early, T0 + WINDOW_NS)
    assert window.available(T0 + WINDOW_NS) == 0
    # A refund whose second is still in the window is exact, a minute after it was taken.
    window.give_back(200, late, T0 + 59 * S + WINDOW_NS - 1)
    assert window.available(T0 + 59 * S + WINDOW_NS - 1) == 200


def test_window_set_limit_keeps_what_was_used() -> None:
    window = Window(1_000, T0)
    window.take(800, T0)

    window.set_limit(2_000)
    assert window.available(T0) == 1_200

    window.set_limit(500)
    assert window.used(T0) == 800
    assert window.available(T0) == 0
    assert window.wait_ns(1, T0) == WINDOW_NS
    assert window.available(T0 + WINDOW_NS - 1) == 0
    assert window.available(T0 + WINDOW_NS) == 500


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


def _remaining(limiter: RateLimiter, key: ApiKey, kind: str) -> int:
    standing = getattr(limiter.state(key), kind)
    assert standing is not None
    return int(standing.remaining)


def _headers(limiter: RateLimiter, key: ApiKey) -> dict[str, str]:
    """The key's limits as the core's response metadata writes them (OpenAI's headers)."""
    return dict(response_metadata("r", limiter.state(key))[1:])


def _request(
    limiter: RateLimiter, key: ApiKey, prompt: int, completion: int, *, explicit: bool = True
) -> tuple[int, LimitTicket]:
    """Admits a request as the meter does: (completion bound, ticket)."""
    bound = limiter.completion_bound(key, prompt, completion, explicit=explicit)
    return bound, limiter.admit(key, prompt + bound)


def test_explicit_max_tokens_must_fit_the_tokens_window(
    limiter: RateLimiter, clock: NsClock
) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    assert _request(limiter, key, 100, 300)[0] == 300
    clock.advance(10 * S)
    assert _request(limiter, key, 100, 300)[0] == 300
    clock.advance(5 * S)

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 50, 500, explicit=True)

    error = refused.value
    assert error.reason is errors.Reason.RATE_LIMIT_EXCEEDED
    assert error.metadata["limit"] == "tokens_per_minute"
    assert "limit 1000" in error.message
    assert "used 800" in error.message
    assert "requested 550" in error.message
    # 350 too many: the first second (400 tokens) leaves the window 60 s after it, 45 s on.
    assert error.retry_after_s == 45.0
    assert "try again in 45.000s" in error.message
    # 450 too many needs the second one (T0 + 10 s) to leave too: 55 s on.
    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 50, 600, explicit=True)
    assert refused.value.retry_after_s == 55.0

    clock.advance(45 * S - 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 50, 500, explicit=True)
    clock.advance(1)
    assert _request(limiter, key, 50, 500)[0] == 500


def test_implicit_max_tokens_shrinks_to_the_window(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _request(limiter, key, 100, 700)
    clock.advance(250_000_000)

    assert limiter.completion_bound(key, 50, 10_000, explicit=False) == 150
    assert limiter.completion_bound(key, 50, 100, explicit=False) == 100
    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 200, 10_000, explicit=False)
    # 201 tokens needed (the prompt and one output token), 200 there: the 800 come back when
    # their second leaves the window, 60 s after T0, 59.75 s from now.
    assert refused.value.retry_after_s == 59.75
    assert "requested 201" in refused.value.message


def test_a_request_larger_than_the_limit_gets_no_retry_after(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 600, 401, explicit=True)

    assert refused.value.retry_after_s is None
    assert "larger than the limit" in refused.value.message
    assert "requested 1001" in refused.value.message


def test_requests_per_minute(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(requests_per_minute=3))
    for _ in range(3):
        _request(limiter, key, 10, 10)

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 10, 10, explicit=True)
    error = refused.value
    assert error.metadata["limit"] == "requests_per_minute"
    assert "limit 3" in error.message
    assert "used 3" in error.message
    assert "requested 1" in error.message
    # GCRA: one request refills every 20 s.
    assert error.retry_after_s == 20.0
    assert "try again in 20.000s" in error.message

    clock.advance(20 * S - 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 10, 10, explicit=True)
    clock.advance(1)
    _request(limiter, key, 10, 10)


def test_a_settled_request_is_not_given_back_to_requests_per_minute(
    limiter: RateLimiter,
) -> None:
    key = _key(KeyLimits(requests_per_minute=1, tokens_per_minute=1_000))
    _, ticket = _request(limiter, key, 10, 10)

    limiter.settle(ticket, 0)

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 10, 10, explicit=True)
    assert refused.value.metadata["limit"] == "requests_per_minute"
    assert _remaining(limiter, key, "tokens") == 1000


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
    assert _remaining(limiter, key, "tokens") == 0

    limiter.settle(ticket, 300)

    assert _remaining(limiter, key, "tokens") == 700
    with pytest.raises(AssertionError):
        limiter.settle(ticket, 0)
    assert _remaining(limiter, key, "tokens") == 700
    # The monthly hold is gone; what was used is the ledger's to count (key.month_tokens).
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 700


def test_tokens_given_back_at_settle_are_available_again_at_once(
    limiter: RateLimiter, clock: NsClock
) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _, long_request = _request(limiter, key, 0, 1_000)
    clock.advance(30 * S)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 0, 900, explicit=True)

    limiter.settle(long_request, 100)

    # Not after a refill: now, half a minute after the tokens were taken.
    assert _request(limiter, key, 0, 900)[0] == 900
    assert _remaining(limiter, key, "tokens") == 0
    # The 100 used count in T0's second, so they come back when it leaves, not later.
    clock.advance(30 * S)
    assert _remaining(limiter, key, "tokens") == 100


def test_a_limit_added_after_admission_is_not_credited_on_settle(limiter: RateLimiter) -> None:
    key = _key(KeyLimits())
    _, ticket = _request(limiter, key, 100, 400)

    key.limits = KeyLimits(tokens_per_minute=1_000, monthly_tokens=2_000)
    _, second = _request(limiter, key, 100, 300)
    limiter.settle(ticket, 0)

    assert _remaining(limiter, key, "tokens") == 600
    # The monthly hold of the second request alone counts: 2,000 - 400 = 1,600 room.
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 600
    limiter.settle(second, 400)
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 600


def test_a_limit_removed_and_added_again_is_not_credited_by_an_older_request(
    limiter: RateLimiter,
) -> None:
    # Regression: removing tokens_per_minute drops the key's Window and setting it again makes
    # a new one. A ticket from the old window used to give back into the new one by second
    # number, so A's unused 1,000 came off B's second and C got 1,000 more at the same instant.
    # A ticket now gives back only into the window it took from.
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _, a = _request(limiter, key, 0, 1_000)
    key.limits = KeyLimits()
    _request(limiter, key, 0, 10)  # the limit is gone, and with it the window
    key.limits = KeyLimits(tokens_per_minute=1_000)
    assert _request(limiter, key, 0, 1_000)[0] == 1_000  # B

    limiter.settle(a, 0)

    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 0, 1, explicit=True)  # C


def test_headers_report_the_limits_the_key_has(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(requests_per_minute=60, tokens_per_minute=1_000))
    assert _headers(limiter, key) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "60",
        "x-ratelimit-reset-requests": "0ms",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "0ms",
    }

    _request(limiter, key, 50, 200)

    # A request refills in 1 s; the tokens come back when their second leaves the window.
    assert _headers(limiter, key) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    clock.advance(14_500_000_000)
    assert _headers(limiter, key)["x-ratelimit-reset-requests"] == "0ms"
    assert _headers(limiter, key)["x-ratelimit-reset-tokens"] == "45.5s"
    _request(limiter, key, 100, 100)
    assert _remaining(limiter, key, "tokens") == 550
    # The window is empty when T0 + 14 s leaves it, at T0 + 74 s.
    assert _headers(limiter, key)["x-ratelimit-reset-tokens"] == "59.5s"
    clock.advance(45_500_000_000)
    assert _remaining(limiter, key, "tokens") == 800
    assert _headers(limiter, key)["x-ratelimit-reset-tokens"] == "14s"


def test_headers_of_a_fast_limit_and_of_no_limit(limiter: RateLimiter) -> None:
    fast = _key(KeyLimits(requests_per_minute=3_000), "fast")
    _request(limiter, fast, 1, 1)

    assert _headers(limiter, fast) == {
        "x-ratelimit-limit-requests": "3000",
        "x-ratelimit-remaining-requests": "2999",
        "x-ratelimit-reset-requests": "20ms",
    }
    assert _headers(limiter, _key(KeyLimits(monthly_tokens=10), "monthly")) == {}
    assert _headers(limiter, _key(KeyLimits(), "none")) == {}


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
    # A forgotten key starts again with a full bucket and an empty window.
    assert _headers(limiter, keys[0])["x-ratelimit-remaining-requests"] == "10"
    assert _headers(limiter, keys[0])["x-ratelimit-remaining-tokens"] == "1000"
    _request(limiter, keys[0], 10, 10)


def test_sweep_keeps_keys_still_refilling(limiter: RateLimiter, clock: NsClock) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _request(limiter, key, 0, 1_000)

    clock.advance(WINDOW_NS - 1)
    assert limiter.sweep() == 0
    clock.advance(1)
    assert limiter.sweep() == 1


def test_sweep_forgets_a_key_whose_tokens_were_all_given_back(
    limiter: RateLimiter, clock: NsClock
) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _, ticket = _request(limiter, key, 0, 1_000)
    assert limiter.sweep() == 0

    limiter.settle(ticket, 0)

    assert limiter.sweep() == 1
    assert len(limiter) == 0


def test_a_removed_limit_applies_to_the_next_request(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(requests_per_minute=1))
    _request(limiter, key, 1, 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 1, 1, explicit=True)

    key.limits = KeyLimits()

    _request(limiter, key, 1, 1)


def test_a_raised_requests_limit_applies_to_the_next_request(limiter: RateLimiter) -> None:
    # Regression: set_limit used to keep the time the bucket needed to become full, so after 1
    # of 1 request per minute a limit raised to 10 still refused the next request for 6 s.
    key = _key(KeyLimits(requests_per_minute=1))
    _request(limiter, key, 1, 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 1, 1, explicit=True)

    key.limits = KeyLimits(requests_per_minute=10)

    for _ in range(9):  # one of ten used: nine more at once
        _request(limiter, key, 1, 1)
    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 1, 1, explicit=True)
    assert "limit 10, used 10" in refused.value.message
    assert refused.value.retry_after_s == 6.0


def test_a_raised_tokens_limit_applies_to_the_next_request(limiter: RateLimiter) -> None:
    key = _key(KeyLimits(tokens_per_minute=1_000))
    _request(limiter, key, 200, 800)

    key.limits = KeyLimits(tokens_per_minute=3_000)

    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 2_000


def test_a_lowered_tokens_limit_applies_to_the_next_request(
    limiter: RateLimiter, clock: NsClock
) -> None:
    # Regression: set_limit used to scale the used units by new/old limit, so after 6,000 of
    # 10,000 tokens a limit lowered to 5,000 still admitted 2,000 more at the same instant.
    key = _key(KeyLimits(tokens_per_minute=10_000))
    _request(limiter, key, 1_000, 5_000)

    key.limits = KeyLimits(tokens_per_minute=5_000)

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 100, 100, explicit=True)
    assert "limit 5000, used 6000, requested 200" in refused.value.message
    assert refused.value.retry_after_s == 60.0  # when the 6,000 leave the window
    clock.advance(WINDOW_NS - 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 100, 100, explicit=True)
    clock.advance(1)
    assert limiter.completion_bound(key, 0, 10_000, explicit=False) == 5_000


def test_a_lowered_requests_limit_applies_to_the_next_request(
    limiter: RateLimiter, clock: NsClock
) -> None:
    key = _key(KeyLimits(requests_per_minute=10))
    for _ in range(6):
        _request(limiter, key, 1, 1)

    key.limits = KeyLimits(requests_per_minute=5)

    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.completion_bound(key, 1, 1, explicit=True)
    assert "limit 5, used 6" in refused.value.message
    # Six used against five: one fits again when two have refilled at 5 per minute, 24 s.
    assert refused.value.retry_after_s == 24.0
    clock.advance(24 * S - 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 1, 1, explicit=True)
    clock.advance(1)
    _request(limiter, key, 1, 1)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 1, 1, explicit=True)


def test_unused_tokens_given_back_after_the_window_moved_on_keep_the_bound(
    limiter: RateLimiter, clock: NsClock
) -> None:
    # Regression: the tokens used to be a bucket, and settle gave a long request's unused
    # tokens back to a bucket that had already refilled them. Request A reserves the whole
    # limit (100 tokens) and stays in flight for 60 s; B then uses 100; A ends having used
    # nothing and returns 100, which let C take another 100 at the same instant and D 100 more
    # a minute later: 300 tokens used in one minute against tokens_per_minute=100 (and 200 at
    # one instant). A's second has left the window, so its refund must now change nothing.
    key = _key(KeyLimits(tokens_per_minute=100))
    _, a = _request(limiter, key, 0, 100)
    clock.advance(WINDOW_NS)
    window_start = clock.now_ns
    used_in_window = 0

    def request_using_everything() -> int:
        nonlocal used_in_window
        try:
            bound, ticket = _request(limiter, key, 0, 100, explicit=False)
        except errors.RateLimitExceeded:
            return 0
        limiter.settle(ticket, bound)
        used_in_window += bound
        return bound

    assert request_using_everything() == 100  # B
    limiter.settle(a, 0)
    assert request_using_everything() == 0  # C
    burst = used_in_window
    clock.advance(WINDOW_NS)
    assert request_using_everything() == 100  # D
    assert clock.now_ns - window_start == WINDOW_NS

    assert burst <= 100 and used_in_window <= 2 * 100, (burst, used_in_window)


def test_unused_tokens_given_back_late_within_the_window_are_exact(
    limiter: RateLimiter, clock: NsClock
) -> None:
    # The same as above, but A settles 59.5 s after it was admitted, while its second is
    # still in the window: its refund is exact, and the tokens come back only once.
    key = _key(KeyLimits(tokens_per_minute=100))
    _, a = _request(limiter, key, 0, 100)
    clock.advance(59 * S + S // 2)
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 0, 1, explicit=True)

    limiter.settle(a, 30)

    assert _request(limiter, key, 0, 100, explicit=False)[0] == 70
    clock.advance(S // 2)  # A's second leaves: its 30 used come back, nothing more
    assert _remaining(limiter, key, "tokens") == 30


def test_tokens_used_in_59_seconds_are_at_most_the_limit_and_the_bound_is_tight(
    limiter: RateLimiter, clock: NsClock
) -> None:
    """The docstring's sharpest claims: any interval of at most 59 s holds at most L; one
    nanosecond longer, two requests at the edges of their seconds can hold 2·L."""
    key = _key(KeyLimits(tokens_per_minute=1_000))
    clock.advance(S - 1)  # the last nanosecond of a second
    first, ticket = _request(limiter, key, 0, 1_000)
    limiter.settle(ticket, first)
    clock.advance(59 * S)  # an interval of exactly 59 s
    with pytest.raises(errors.RateLimitExceeded):
        limiter.completion_bound(key, 0, 1, explicit=True)
    clock.advance(1)  # 59 s + 1 ns: the first second has left the window
    second, ticket = _request(limiter, key, 0, 1_000)
    limiter.settle(ticket, second)
    assert first + second == 2_000


# ---- the limiter against the references ------------------------------------------------------


Op = tuple[int, str, int, int, int]


@st.composite
def limiter_programs(draw: st.DrawFn) -> tuple[KeyLimits, list[Op]]:
    """Limits (each kind on or off for the whole run) and steps (time advance ns, op, three
    numbers). Removing and setting a limit again is covered by its own test above."""
    limits = KeyLimits(
        requests_per_minute=draw(st.none() | st.integers(1, 20)),
        tokens_per_minute=draw(st.none() | st.integers(1, 3_000)),
        monthly_tokens=draw(st.none() | st.integers(1, 20_000)),
    )
    steps = draw(
        st.lists(
            st.tuples(
                WINDOW_ADVANCES,
                st.sampled_from(["request", "request", "request", "settle", "limits", "sweep"]),
                st.integers(0, 3_000),
                st.integers(0, 3_000),
                st.integers(0, 10**6),
            ),
            max_size=50,
        )
    )
    return limits, steps


def _expected_bound(
    key: ApiKey,
    now: int,
    requests: RefBucket | None,
    tokens: RefWindow | None,
    held: int,
    request: tuple[int, int, bool],
) -> int | tuple[str, int | None]:
    """The completion bound the rules give, or the limit that refuses and its wait in ns."""
    prompt, completion, explicit = request
    if requests is not None and requests.available(now) < 1:
        return "requests_per_minute", requests.wait_ns(1, now)
    bound = completion
    if tokens is not None:
        needed = prompt + (bound if explicit else 1)
        if needed > tokens.available(now):
            wait = tokens.wait_ns(needed, now) if needed <= tokens.limit else None
            return "tokens_per_minute", wait
        bound = min(bound, tokens.available(now) - prompt)
    monthly = key.limits.monthly_tokens
    if monthly is not None:
        room = monthly - key.month_tokens - held - prompt
        if room < (bound if explicit else 1):
            return "monthly_tokens", None
        bound = min(bound, room)
    return bound


@PROPERTY
@given(limiter_programs())
def test_limiter_matches_the_references(program: tuple[KeyLimits, list[Op]]) -> None:
    """Bounds, refusals and their retry_after_s, headers after admission, over requests that
    settle in any order, live limit changes, sweeps; the ledger's part is played by adding the
    tokens used to key.month_tokens at settlement."""
    limits, steps = program
    clock = NsClock()
    limiter = RateLimiter(clock_ns=clock)
    key = _key(limits)
    requests: RefBucket | None = None
    tokens: RefWindow | None = None
    held = 0  # tokens held against the monthly limit by requests in flight
    # (ticket, reference admission or None, tokens taken, tokens held, tokens used)
    pending: list[tuple[LimitTicket, int | None, int, int, int]] = []
    for advance, op, x, y, z in steps:
        clock.advance(advance)
        now = clock.now_ns
        if op == "request":
            # The limits apply from this request on, as in the limiter.
            if key.limits.requests_per_minute is not None:
                if requests is None:
                    requests = RefBucket(key.limits.requests_per_minute, now)
                requests.set_limit(key.limits.requests_per_minute, now)
            if key.limits.tokens_per_minute is not None:
                if tokens is None:
                    tokens = RefWindow(key.limits.tokens_per_minute)
                tokens.limit = key.limits.tokens_per_minute
            prompt, completion, explicit = x % 500, y, z % 2 == 1
            expected = _expected_bound(
                key, now, requests, tokens, held, (prompt, completion, explicit)
            )
            try:
                bound = limiter.completion_bound(key, prompt, completion, explicit=explicit)
            except (errors.RateLimitExceeded, errors.TokenLimitExceeded) as refused:
                assert isinstance(expected, tuple), (expected, refused.message)
                limit, wait = expected
                assert refused.metadata["limit"] == limit
                assert refused.retry_after_s == (None if wait is None else wait / S)
                continue
            assert bound == expected
            taken = prompt + bound
            ticket = limiter.admit(key, taken)
            if requests is not None:
                assert requests.take(1, now)
            admission = None
            if tokens is not None:
                admission = tokens.take(taken, now)
                assert admission is not None
            month = 0 if key.limits.monthly_tokens is None else taken
            held += month
            state = limiter.state(key)
            if requests is not None:
                assert state.requests is not None
                assert state.requests.remaining == requests.available(now)
                assert state.requests.reset_ns == requests.reset_ns(now)
            if tokens is not None:
                assert state.tokens is not None
                assert state.tokens.remaining == tokens.available(now)
                assert state.tokens.reset_ns == tokens.reset_ns(now)
            pending.append((ticket, admission, taken, month, taken * (z % 5) // 4))
        elif op == "settle" and pending:
            ticket, admission, taken, month, used = pending.pop(x % len(pending))
            limiter.settle(ticket, used)
            if tokens is not None and admission is not None:
                tokens.give_back(admission, taken - used)
            held -= month
            key.month_tokens += used
        elif op == "limits":
            # A new value for each limit the key has; see limiter_programs for why no more.
            key.limits = KeyLimits(
                requests_per_minute=None if limits.requests_per_minute is None else 1 + x % 20,
                tokens_per_minute=None if limits.tokens_per_minute is None else 1 + y % 3_000,
                monthly_tokens=None if limits.monthly_tokens is None else 1 + z % 20_000,
            )
        elif op == "sweep":
            # The key is forgotten exactly when it is idle, and that changes nothing it would
            # decide later: its bucket was full, its window empty and nothing was held.
            idle = (
                held == 0
                and (requests is None or requests.used(now) == 0)
                and (tokens is None or tokens.used(now) == 0)
            )
            limiter.sweep()
            assert len(limiter) == (0 if idle else 1)
