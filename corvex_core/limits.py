"""Per-key limits: requests and tokens per minute, and tokens per calendar month.

Requests per minute (limit L) are a token bucket in GCRA form (`Bucket`): it holds L, refills
continuously at L per 60 s, and each request takes 1. A request is never given back, so:

  * a burst, however concurrent, is admitted at most L;
  * an interval of length t admits at most L + L·t/60 s (2·L in any 60-second window).

Tokens per minute (limit L) are a sliding window of 60 one-second slots (`Window`). A request
takes what it may use (prompt + max completion tokens) in the current second; its settlement
gives back, into that same second, what it did not use. Placing the correction exactly is why
tokens use a window: a bucket's continuous refill cannot tell which refill a late refund
overlaps. For the tokens *used*, as for those admitted:

  * a burst, however concurrent, is admitted at most L;
  * every 60 consecutive whole seconds hold at most L, and so does any interval of at most
    59 s; an interval of length t holds at most L·⌈(t + 1 s)/60 s⌉ (so 2·L for a minute that
    does not start on a whole second). Capacity comes back when a second leaves the window.

A limit change keeps what was used and applies to the next request. One admission reads the
clock once (`now_ns()`, passed to each step), so its steps agree on the time. The monthly
limit counts charged tokens (durable, on the ledger's key) plus tokens held by requests in
flight, and never admits past the limit. Everything is synchronous and O(1) per request
(amortised); a key with nothing outstanding costs no memory after `sweep`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Final, NamedTuple

from corvex_core import errors
from corvex_core.state import ApiKey

SLOTS: Final = 60
SLOT_NS: Final = 1_000_000_000
WINDOW_NS: Final = SLOTS * SLOT_NS
_NS_PER_S: Final = 1_000_000_000


class Bucket:
    """A GCRA bucket of `limit` units per 60 s, for units that are never given back.

    State is the theoretical arrival time scaled by the limit (`tat_scaled` = tat_ns × limit):
    one unit then costs exactly WINDOW_NS whatever the limit, the debt still to refill is
    `tat_scaled - now_ns × limit`, and it drains at `limit` per ns, so no division rounds a
    decision.
    """

    __slots__ = ("limit", "tat_scaled")

    def __init__(self, limit: int, now_ns: int) -> None:
        assert limit >= 1
        self.limit = limit
        self.tat_scaled = now_ns * limit

    def _used_scaled(self, now_ns: int) -> int:
        return max(0, self.tat_scaled - now_ns * self.limit)

    def available(self, now_ns: int) -> int:
        """Whole units that can be taken now."""
        return max(0, (self.limit * WINDOW_NS - self._used_scaled(now_ns)) // WINDOW_NS)

    def used(self, now_ns: int) -> int:
        """Units not refilled yet, rounded up."""
        return -(-self._used_scaled(now_ns) // WINDOW_NS)

    def take(self, units: int, now_ns: int) -> None:
        assert 0 <= units <= self.available(now_ns), "took more than the bucket holds"
        self.tat_scaled = max(self.tat_scaled, now_ns * self.limit) + units * WINDOW_NS

    def wait_ns(self, units: int, now_ns: int) -> int:
        """Time until `units` can be taken (0 if now). `units` must be at most `limit`."""
        assert units <= self.limit
        excess = self._used_scaled(now_ns) - (self.limit - units) * WINDOW_NS
        return max(0, -(-excess // self.limit))

    def reset_ns(self, now_ns: int) -> int:
        """Time until the bucket is full again."""
        return -(-self._used_scaled(now_ns) // self.limit)

    def is_empty(self, now_ns: int) -> bool:
        """True when nothing is owed: the bucket is full."""
        return self._used_scaled(now_ns) == 0

    def set_limit(self, limit: int, now_ns: int) -> None:
        """Changes the limit; the units used stay used (so a raised limit admits at once)."""
        assert limit >= 1
        used = self._used_scaled(now_ns)
        self.limit = limit
        self.tat_scaled = now_ns * limit + used


class Window:
    """Units admitted in each of the last 60 whole seconds, against a limit of `limit`."""

    __slots__ = ("limit", "second", "slots", "total")

    def __init__(self, limit: int, now_ns: int) -> None:
        assert limit >= 1
        self.limit = limit
        self.slots = [0] * SLOTS
        self.total = 0
        self.second = now_ns // SLOT_NS

    def _advance(self, now_ns: int) -> None:
        """Drops the seconds that left the window."""
        second = now_ns // SLOT_NS
        assert second >= self.second, "the clock went backwards"
        if second - self.second >= SLOTS:
            self.slots = [0] * SLOTS
            self.total = 0
        else:
            for gone in range(self.second + 1, second + 1):
                self.total -= self.slots[gone % SLOTS]
                self.slots[gone % SLOTS] = 0
        self.second = second
        assert self.total >= 0

    def available(self, now_ns: int) -> int:
        """Units that can be taken now."""
        self._advance(now_ns)
        return max(0, self.limit - self.total)

    def used(self, now_ns: int) -> int:
        self._advance(now_ns)
        return self.total

    def take(self, units: int, now_ns: int) -> int:
        """Takes units; returns the second they were taken in, for `give_back`."""
        assert 0 <= units <= self.available(now_ns), "took more than the window allows"
        self.slots[self.second % SLOTS] += units
        self.total += units
        return self.second

    def give_back(self, units: int, taken_second: int, now_ns: int) -> None:
        """Returns units taken in `taken_second` that were not used (nothing once that second
        has left the window: they no longer count anyway)."""
        assert units >= 0
        self._advance(now_ns)
        if self.second - taken_second >= SLOTS:
            return
        slot = taken_second % SLOTS
        returned = min(units, self.slots[slot])
        self.slots[slot] -= returned
        self.total -= returned

    def wait_ns(self, units: int, now_ns: int) -> int:
        """Time until `units` can be taken (0 if now). `units` must be at most `limit`."""
        assert units <= self.limit
        self._advance(now_ns)
        excess = self.total + units - self.limit
        if excess <= 0:
            return 0
        for second in range(self.second - SLOTS + 1, self.second + 1):
            excess -= self.slots[second % SLOTS]
            if excess <= 0:
                return (second + SLOTS) * SLOT_NS - now_ns
        raise AssertionError("the window holds less than it counts")

    def reset_ns(self, now_ns: int) -> int:
        """Time until the window is empty again."""
        self._advance(now_ns)
        for second in range(self.second, self.second - SLOTS, -1):
            if self.slots[second % SLOTS]:
                return (second + SLOTS) * SLOT_NS - now_ns
        return 0

    def is_empty(self, now_ns: int) -> bool:
        self._advance(now_ns)
        return self.total == 0

    def set_limit(self, limit: int) -> None:
        """Changes the limit; what was used stays used."""
        assert limit >= 1
        self.limit = limit


class _KeyState:
    __slots__ = ("month_reserved", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: Bucket | None = None
        self.tokens: Window | None = None
        self.month_reserved = 0


class LimitTicket:
    """What an admitted request took from its key's limits, returned at settlement."""

    __slots__ = ("key_id", "month_tokens", "second", "settled", "window", "window_tokens")

    def __init__(
        self,
        key_id: str,
        window_tokens: int,
        month_tokens: int,
        second: int,
        window: Window | None = None,
    ) -> None:
        self.key_id = key_id
        # Tokens taken from `window` (in `second`) and held against the monthly limit; zero for
        # a limit the key did not have at admission, so a limit added later is not credited.
        self.window_tokens = window_tokens
        self.month_tokens = month_tokens
        self.second = second
        # The window itself: a refund goes back only into the window it was taken from, never
        # into a new one made when the limit was removed and set again.
        self.window = window
        self.settled = False


class Standing(NamedTuple):
    """One per-minute limit: its size, what is left now, and when it is whole again."""

    limit: int
    remaining: int
    reset_ns: int


class LimitState(NamedTuple):
    """The key's per-minute limits; None for a kind of limit the key does not have."""

    requests: Standing | None
    tokens: Standing | None


class RateLimiter:
    """The per-key limits of every key. See the module docstring for the algorithm."""

    def __init__(self, *, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock_ns = clock_ns
        self._keys: dict[str, _KeyState] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def now_ns(self) -> int:
        return self._clock_ns()

    def completion_bound(
        self,
        key: ApiKey,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        explicit: bool,
        now_ns: int | None = None,
    ) -> int:
        """The most completion tokens the key's limits admit now, at most `completion_tokens`.

        With `explicit` (the caller set max_tokens) the whole amount must fit or this raises;
        otherwise it returns the smaller bound, raising only if not even one token fits.
        """
        now = self._clock_ns() if now_ns is None else now_ns
        with self._reporting(key, now):
            return self._completion_bound(key, prompt_tokens, completion_tokens, explicit, now)

    def _completion_bound(
        self, key: ApiKey, prompt_tokens: int, completion_tokens: int, explicit: bool, now: int
    ) -> int:
        limits = key.limits
        state = self._state(key, now)
        _check_request(key, state.requests, now)
        bound = completion_tokens
        if state.tokens is not None:
            bound = self._tokens_bound(key, state.tokens, now, prompt_tokens, bound, explicit)
        if limits.monthly_tokens is not None:
            room = limits.monthly_tokens - key.month_tokens - state.month_reserved - prompt_tokens
            if room < (bound if explicit else 1):
                used = key.month_tokens + state.month_reserved
                raise errors.TokenLimitExceeded(
                    f"Monthly token limit reached on key {key.id}: limit "
                    f"{limits.monthly_tokens}, used {used}, requested "
                    f"{prompt_tokens + (bound if explicit else 1)}. The limit resets at the "
                    "start of the next calendar month (UTC), or can be raised by an admin.",
                    metadata={"limit": "monthly_tokens"},
                )
            bound = min(bound, room)
        return bound

    def admit(self, key: ApiKey, tokens: int, *, now_ns: int | None = None) -> LimitTicket:
        """Takes one request and `tokens` (prompt + completion bound) from the key's limits.

        Call only after `completion_bound` allowed them, with no await in between.
        """
        now = self._clock_ns() if now_ns is None else now_ns
        state = self._state(key, now)
        if state.requests is not None:
            state.requests.take(1, now)
        window_tokens = month_tokens = 0
        second = now // SLOT_NS
        if state.tokens is not None:
            second = state.tokens.take(tokens, now)
            window_tokens = tokens
        if key.limits.monthly_tokens is not None:
            state.month_reserved += tokens
            month_tokens = tokens
        return LimitTicket(key.id, window_tokens, month_tokens, second, state.tokens)

    def month_reserved(self, key_id: str) -> int:
        """Tokens that requests in flight hold against the key's monthly limit."""
        state = self._keys.get(key_id)
        return 0 if state is None else state.month_reserved

    def count_request(self, key: ApiKey) -> None:
        """Takes one request from the key's requests-per-minute limit for a call that uses no
        tokens (Tokenize), or raises RateLimitExceeded."""
        now = self._clock_ns()
        state = self._state(key, now)
        with self._reporting(key, now):
            _check_request(key, state.requests, now)
        if state.requests is not None:
            state.requests.take(1, now)

    def settle(self, ticket: LimitTicket, used_tokens: int) -> None:
        """Gives back the tokens an admitted request did not use. Exactly once per ticket.

        The used tokens stay taken from the window; the monthly count of them moves from
        "held" here to "charged" on the ledger's key, which the caller records.
        """
        assert not ticket.settled, "limit ticket settled twice"
        assert used_tokens >= 0
        ticket.settled = True
        state = self._keys.get(ticket.key_id)
        if state is None:
            return
        window = ticket.window
        if window is not None and window is state.tokens and ticket.window_tokens > used_tokens:
            window.give_back(ticket.window_tokens - used_tokens, ticket.second, self._clock_ns())
        state.month_reserved -= ticket.month_tokens
        assert state.month_reserved >= 0

    def state(self, key: ApiKey, *, now_ns: int | None = None) -> LimitState:
        """Where the key's per-minute limits stand (what OpenAI's x-ratelimit-* headers say)."""
        now = self._clock_ns() if now_ns is None else now_ns
        state = self._keys.get(key.id)
        requests = state.requests if state else None
        tokens = state.tokens if state else None
        return LimitState(
            requests=_standing(key.limits.requests_per_minute, requests, now),
            tokens=_standing(key.limits.tokens_per_minute, tokens, now),
        )

    def sweep(self) -> int:
        """Forgets keys whose windows are empty and that hold nothing. Returns how many."""
        now = self._clock_ns()
        idle = [
            key_id
            for key_id, state in self._keys.items()
            if state.month_reserved == 0
            and (state.requests is None or state.requests.is_empty(now))
            and (state.tokens is None or state.tokens.is_empty(now))
        ]
        for key_id in idle:
            del self._keys[key_id]
        return len(idle)

    @contextlib.contextmanager
    def _reporting(self, key: ApiKey, now: int) -> Iterator[None]:
        """A refusal raised inside says where the key's limits stand, as an answer would."""
        try:
            yield
        except errors.LimitExceeded as refusal:
            refusal.limit_state = self.state(key, now_ns=now)
            raise

    def _state(self, key: ApiKey, now: int) -> _KeyState:
        """The key's windows, created or resized to its current limits."""
        state = self._keys.get(key.id)
        if state is None:
            state = self._keys[key.id] = _KeyState()
        state.requests = _resized_bucket(state.requests, key.limits.requests_per_minute, now)
        state.tokens = _resized_window(state.tokens, key.limits.tokens_per_minute, now)
        return state

    def _tokens_bound(
        self, key: ApiKey, window: Window, now: int, prompt_tokens: int, bound: int, explicit: bool
    ) -> int:
        needed = prompt_tokens + (bound if explicit else 1)
        available = window.available(now)
        if needed <= available:
            return min(bound, available - prompt_tokens)
        used = window.used(now)
        message = (
            f"Rate limit reached for tokens per minute on key {key.id}: limit {window.limit}, "
            f"used {used}, requested {needed}."
        )
        if needed > window.limit:
            raise errors.RateLimitExceeded(
                message + " The request is larger than the limit allows in a minute; "
                "shorten the prompt or lower max_tokens.",
                metadata={"limit": "tokens_per_minute"},
            )
        wait = window.wait_ns(needed, now)
        raise errors.RateLimitExceeded(
            message + f" Please try again in {_seconds(wait)}.",
            metadata={"limit": "tokens_per_minute"},
            retry_after_s=wait / _NS_PER_S,
        )


def _check_request(key: ApiKey, requests: Bucket | None, now: int) -> None:
    if requests is not None and requests.available(now) < 1:
        wait = requests.wait_ns(1, now)
        raise errors.RateLimitExceeded(
            f"Rate limit reached for requests per minute on key {key.id}: limit "
            f"{requests.limit}, used {requests.used(now)}, requested 1. "
            f"Please try again in {_seconds(wait)}.",
            metadata={"limit": "requests_per_minute"},
            retry_after_s=wait / _NS_PER_S,
        )


def _standing(limit: int | None, window: Bucket | Window | None, now: int) -> Standing | None:
    if limit is None:
        return None
    if window is None:
        return Standing(limit, limit, 0)
    return Standing(limit, window.available(now), window.reset_ns(now))


def _resized_bucket(bucket: Bucket | None, limit: int | None, now: int) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(limit, now)
    if bucket.limit != limit:
        bucket.set_limit(limit, now)
    return bucket


def _resized_window(window: Window | None, limit: int | None, now: int) -> Window | None:
    if limit is None:
        return None
    if window is None:
        return Window(limit, now)
    if window.limit != limit:
        window.set_limit(limit)
    return window


def _seconds(ns: int) -> str:
    return f"{ns / _NS_PER_S:.3f}s"
