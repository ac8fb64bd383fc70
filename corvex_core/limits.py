"""Per-key limits: requests and tokens per minute, and tokens per calendar month.

Per-minute limits are token buckets in GCRA form, kept in exact integer arithmetic: a bucket
holds `limit` units, refills continuously at `limit` per 60 s, and a request takes what it may
use (prompt + max completion tokens) at admission; its settlement gives back what it did not
use. Consequently, for a limit L:

  * a burst, however concurrent, is admitted at most L (requests or tokens);
  * in any interval of length t, admissions total at most L + L·t/60 s, so at most 2·L in any
    60-second window and L per minute on average over long runs.

The monthly limit counts charged tokens (durable, on the ledger's key) plus tokens held by
requests in flight, and never admits past the limit. Everything here is synchronous and
O(1) per request; a key whose buckets are full again costs no memory after `sweep`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from corvex_core import errors
from corvex_core.ledger import ApiKey

WINDOW_NS: Final = 60 * 1_000_000_000
_NS_PER_S: Final = 1_000_000_000


class Bucket:
    """A GCRA bucket of `limit` units per 60 s.

    State is the theoretical arrival time scaled by the limit (`tat_scaled` = tat_ns × limit),
    so one unit costs exactly WINDOW_NS scaled units and no division ever rounds.
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
        return (self.limit * WINDOW_NS - self._used_scaled(now_ns)) // WINDOW_NS

    def take(self, units: int, now_ns: int) -> None:
        assert 0 <= units <= self.available(now_ns), "took more than the bucket holds"
        self.tat_scaled = max(self.tat_scaled, now_ns * self.limit) + units * WINDOW_NS

    def give_back(self, units: int, now_ns: int) -> None:
        """Returns units that an admitted request did not use; never beyond a full bucket."""
        assert units >= 0
        self.tat_scaled = max(self.tat_scaled - units * WINDOW_NS, now_ns * self.limit)

    def wait_ns(self, units: int, now_ns: int) -> int:
        """Time until `units` can be taken (0 if now). `units` must be at most `limit`."""
        assert units <= self.limit
        excess = self._used_scaled(now_ns) - (self.limit - units) * WINDOW_NS
        return max(0, -(-excess // self.limit))

    def reset_ns(self, now_ns: int) -> int:
        """Time until the bucket is full again."""
        return -(-self._used_scaled(now_ns) // self.limit)

    def is_full(self, now_ns: int) -> bool:
        return self._used_scaled(now_ns) == 0

    def set_limit(self, limit: int, now_ns: int) -> None:
        """Changes the limit, keeping the time the bucket needs to become full."""
        assert limit >= 1
        used_ns = -(-self._used_scaled(now_ns) // self.limit)
        self.limit = limit
        self.tat_scaled = (now_ns + used_ns) * limit


class _KeyState:
    __slots__ = ("month_reserved", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None
        self.month_reserved = 0


class LimitTicket:
    """What an admitted request took from its key's limits, returned at settlement."""

    __slots__ = ("bucket_tokens", "key_id", "month_tokens", "settled")

    def __init__(self, key_id: str, bucket_tokens: int, month_tokens: int) -> None:
        self.key_id = key_id
        # Tokens taken from the per-minute bucket and held against the monthly limit; zero for
        # a limit the key did not have at admission, so a limit added later is not credited.
        self.bucket_tokens = bucket_tokens
        self.month_tokens = month_tokens
        self.settled = False


class RateLimiter:
    """The per-key limits of every key. See the module docstring for the algorithm."""

    def __init__(self, *, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock_ns = clock_ns
        self._keys: dict[str, _KeyState] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def completion_bound(
        self, key: ApiKey, prompt_tokens: int, completion_tokens: int, *, explicit: bool
    ) -> int:
        """The most completion tokens the key's limits admit now, at most `completion_tokens`.

        With `explicit` (the caller set max_tokens) the whole amount must fit or this raises;
        otherwise it returns the smaller bound, raising only if not even one token fits.
        """
        limits = key.limits
        now = self._clock_ns()
        state = self._state(key, now)
        if state.requests is not None and state.requests.available(now) < 1:
            wait = state.requests.wait_ns(1, now)
            raise errors.RateLimitExceeded(
                f"Rate limit reached for requests per minute on key {key.id}: limit "
                f"{state.requests.limit}, used {state.requests.limit}, requested 1. "
                f"Please try again in {_seconds(wait)}.",
                metadata={"limit": "requests_per_minute"},
                retry_after_s=wait / _NS_PER_S,
            )
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

    def admit(self, key: ApiKey, tokens: int) -> LimitTicket:
        """Takes one request and `tokens` (prompt + completion bound) from the key's limits.

        Call only after `completion_bound` allowed them, with no await in between.
        """
        now = self._clock_ns()
        state = self._state(key, now)
        if state.requests is not None:
            state.requests.take(1, now)
        bucket_tokens = month_tokens = 0
        if state.tokens is not None:
            state.tokens.take(tokens, now)
            bucket_tokens = tokens
        if key.limits.monthly_tokens is not None:
            state.month_reserved += tokens
            month_tokens = tokens
        return LimitTicket(key.id, bucket_tokens, month_tokens)

    def settle(self, ticket: LimitTicket, used_tokens: int) -> None:
        """Gives back the tokens an admitted request did not use. Exactly once per ticket.

        The used tokens stay taken from the bucket; the monthly count of them moves from
        "held" here to "charged" on the ledger's key, which the caller records.
        """
        assert not ticket.settled, "limit ticket settled twice"
        assert used_tokens >= 0
        ticket.settled = True
        state = self._keys.get(ticket.key_id)
        if state is None:
            return
        if state.tokens is not None and ticket.bucket_tokens > used_tokens:
            state.tokens.give_back(ticket.bucket_tokens - used_tokens, self._clock_ns())
        state.month_reserved -= ticket.month_tokens
        assert state.month_reserved >= 0

    def headers(self, key: ApiKey) -> dict[str, str]:
        """OpenAI's x-ratelimit-* values for the limits this key has."""
        now = self._clock_ns()
        state = self._keys.get(key.id)
        result: dict[str, str] = {}
        for kind, limit, bucket in (
            ("requests", key.limits.requests_per_minute, state.requests if state else None),
            ("tokens", key.limits.tokens_per_minute, state.tokens if state else None),
        ):
            if limit is None:
                continue
            remaining = bucket.available(now) if bucket else limit
            reset = bucket.reset_ns(now) if bucket else 0
            result[f"x-ratelimit-limit-{kind}"] = str(limit)
            result[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            result[f"x-ratelimit-reset-{kind}"] = format_duration(reset)
        return result

    def sweep(self) -> int:
        """Forgets keys whose buckets are full and that hold nothing. Returns how many."""
        now = self._clock_ns()
        idle = [
            key_id
            for key_id, state in self._keys.items()
            if state.month_reserved == 0
            and (state.requests is None or state.requests.is_full(now))
            and (state.tokens is None or state.tokens.is_full(now))
        ]
        for key_id in idle:
            del self._keys[key_id]
        return len(idle)

    def _state(self, key: ApiKey, now: int) -> _KeyState:
        """The key's buckets, created or resized to its current limits."""
        state = self._keys.get(key.id)
        if state is None:
            state = self._keys[key.id] = _KeyState()
        state.requests = _resized(state.requests, key.limits.requests_per_minute, now)
        state.tokens = _resized(state.tokens, key.limits.tokens_per_minute, now)
        return state

    def _tokens_bound(
        self, key: ApiKey, bucket: Bucket, now: int, prompt_tokens: int, bound: int, explicit: bool
    ) -> int:
        needed = prompt_tokens + (bound if explicit else 1)
        available = bucket.available(now)
        if needed <= available:
            return min(bound, available - prompt_tokens)
        used = bucket.limit - available
        message = (
            f"Rate limit reached for tokens per minute on key {key.id}: limit {bucket.limit}, "
            f"used {used}, requested {needed}."
        )
        if needed > bucket.limit:
            raise errors.RateLimitExceeded(
                message + " The request is larger than the limit allows in a minute; "
                "shorten the prompt or lower max_tokens.",
                metadata={"limit": "tokens_per_minute"},
            )
        wait = bucket.wait_ns(needed, now)
        raise errors.RateLimitExceeded(
            message + f" Please try again in {_seconds(wait)}.",
            metadata={"limit": "tokens_per_minute"},
            retry_after_s=wait / _NS_PER_S,
        )


def _resized(bucket: Bucket | None, limit: int | None, now: int) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(limit, now)
    if bucket.limit != limit:
        bucket.set_limit(limit, now)
    return bucket


def _seconds(ns: int) -> str:
    return f"{ns / _NS_PER_S:.3f}s"


def format_duration(ns: int) -> str:
    """A duration as OpenAI's reset headers write it: "20ms", "1s", "6m0s", "1.5s"."""
    ms = -(-ns // 1_000_000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
