"""Leases in a core: the credit (per workspace) and tokens (per limited key) this core lends
itself from PostgreSQL, so that admission stays a synchronous step against the mirror.

One credit lease per workspace and one token lease per key with a monthly limit, each in a
`_Slot`. Admission asks `shortfall` first (synchronous): when the lease covers the most the
request could cost, it is admitted with no round trip. When it does not, what the lease has
free is set aside for that request (so that no other request takes it meanwhile), serving
awaits `replenish` (one transaction: a new lease or a top-up of the current one) and admits
once more with `apply`. Grants follow `Want`: ahead of need while the workspace has plenty,
exactly the request's need near $0, where each settlement also gives back what its request
did not use, so no credit waits on an idle core. Leases are renewed (and topped up ahead of
need) every `renew_every_s`, released once idle, and never used past `expires_at` less a
margin: a lease this core could not renew lapses, and its holds' leftovers never become
spendable again. Each hold is bound to the lease it was admitted on, and its charge is paid
from that lease.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import msgspec

from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.cluster.link import Link, unavailable
from corvex_core.cluster.mirror import MirrorLedger, Money
from corvex_core.cluster.shipper import MAX_BACKLOG, ChargeShipper
from corvex_core.limits import RateLimiter
from corvex_core.pg import db
from corvex_core.pg.leases import CreditGrant, LeaseGone, LeaseStore, TokenGrant, Want
from corvex_core.records import Charged
from corvex_core.state import ApiKey

GrantT = TypeVar("GrantT", CreditGrant, TokenGrant)

log = logging.getLogger(__name__)

# A lease with nothing in flight that no admission used for this long is released.
IDLE_RELEASE_S: Final = 60.0
# Attempts of one replenishment: waiting for another request's acquire, a grant, and once
# more if the lease turned out to be gone.
MAX_FILL_ROUNDS: Final = 3


class Policy(msgspec.Struct, frozen=True):
    core_id: str
    ahead_nano: int
    exact_below_nano: int
    ahead_tokens: int
    exact_below_tokens: int
    ttl_s: float
    renew_every_s: float

    @property
    def margin_s(self) -> float:
        """A lease is not used this close to its expiry (cores' clocks may differ this much
        and a sweep on another core may take it then)."""
        return min(5.0, self.ttl_s / 4)


class _Slot:
    """One lease of this core: the credit of a workspace or the tokens of a key."""

    __slots__ = ("acquiring", "exact", "expires_at", "generation", "holds", "last_used",
                 "lease_id", "owner", "refused", "topping")  # fmt: skip

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.lease_id: int | None = None
        self.expires_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        # Advanced whenever the lease is lost or released: holds and set-asides of an older
        # generation belong to a lease this core no longer spends from.
        self.generation = 0
        # The workspace (key) had less than `exact_below` spendable at the last grant.
        self.exact = False
        self.acquiring: asyncio.Future[None] | None = None
        # The least the last acquire asked for and what PostgreSQL said (the workspace's money
        # or the key's tokens), when it got nothing: requests that waited for it and need as
        # much are refused alike, without asking.
        self.refused: tuple[int, Any] | None = None
        self.topping = False
        self.holds = 0
        self.last_used = time.monotonic()


class Shortfall:
    """What this core's leases lack for one request, and what was set aside for it meanwhile
    (outside the mirror, so no other request can take it). `refusal` is set when PostgreSQL
    could not grant even the request's least."""

    __slots__ = ("choices", "credit_generation", "credit_least", "credit_most", "explicit",
                 "key", "max_total", "prompt_tokens", "rate", "refusal", "set_aside_nano",
                 "set_aside_tokens", "token_generation", "tokens_least", "tokens_most")  # fmt: skip

    def __init__(
        self,
        key: ApiKey,
        rate: ModelRate,
        prompt_tokens: int,
        max_total: int,
        *,
        explicit: bool,
        choices: int,
    ) -> None:
        self.key = key
        self.rate = rate
        self.prompt_tokens = prompt_tokens
        self.max_total = max_total
        self.explicit = explicit
        self.choices = choices
        least_total = max_total if explicit else min(choices, max_total)
        # A free request (a reserved endpoint's tokens cost nothing) still needs a lease: its
        # usage record is shipped with one. It asks for a single nano-dollar.
        self.credit_most = max(rate.cost_nano(prompt_tokens, max_total), 1)
        self.credit_least = max(rate.cost_nano(prompt_tokens, least_total), 1)
        self.tokens_most = prompt_tokens + max_total
        self.tokens_least = prompt_tokens + least_total
        self.set_aside_nano = 0
        self.set_aside_tokens = 0
        self.credit_generation = 0
        self.token_generation = 0
        self.refusal: errors.CorvexError | None = None


class _Binding(msgspec.Struct):
    """The leases a hold was admitted on."""

    credit: _Slot
    credit_generation: int
    lease_id: int | None
    tokens: _Slot | None = None
    token_generation: int = 0
    token_lease_id: int | None = None


class LeaseSupply:
    """See the module docstring. `run()` renews; `close()` gives everything back."""

    def __init__(
        self,
        store: LeaseStore,
        ledger: MirrorLedger,
        limiter: RateLimiter,
        shipper: ChargeShipper,
        link: Link,
        policy: Policy,
        *,
        clock: db.Clock = db.utc_now,
        gate: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._limiter = limiter
        self._shipper = shipper
        self._link = link
        self._policy = policy
        self._clock = clock
        # Raises when the core must not admit (its mirror is behind, the ledger is away).
        self._gate = gate
        self._credit: dict[str, _Slot] = {}
        self._tokens: dict[str, _Slot] = {}
        self._holds: dict[str, _Binding] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.round_trips_on_admission = 0
        self.grants = {"granted": 0, "refused": 0}

    # ---- admission (synchronous) -------------------------------------------------------------

    def shortfall(
        self,
        key: ApiKey,
        rate: ModelRate,
        prompt_tokens: int,
        max_total: int,
        *,
        explicit: bool,
        choices: int,
    ) -> Shortfall | None:
        """None when this core's leases cover the most the request could take (it is admitted
        with no round trip); else its Shortfall, with what is free set aside for it."""
        self._gate()
        if self._shipper.backlog >= MAX_BACKLOG:
            raise unavailable("The ledger database is behind on charges; retry shortly.")
        short = Shortfall(key, rate, prompt_tokens, max_total, explicit=explicit, choices=choices)
        credit = self._credit_slot(key.workspace_id)
        tokens = self._token_slot(key)
        credit.last_used = time.monotonic()
        free_nano = self._free_nano(credit)
        free_tokens = self._free_tokens(tokens, key) if tokens is not None else None
        covered = free_nano >= short.credit_most and (
            free_tokens is None or free_tokens >= short.tokens_most
        )
        if covered and credit.lease_id is not None:
            return None
        self._set_aside(short, credit, tokens)
        return short

    def apply(self, short: Shortfall) -> None:
        """Puts what was set aside and granted for `short` into the mirror (only what still
        belongs to a lease this core spends from). Idempotent."""
        credit = self._credit_slot(short.key.workspace_id)
        if short.set_aside_nano and short.credit_generation == credit.generation:
            self._ledger.lend(short.key.workspace_id, short.set_aside_nano)
        short.set_aside_nano = 0
        tokens = self._token_slot(short.key)
        current = tokens is not None and short.token_generation == tokens.generation
        if short.set_aside_tokens and current:
            self._ledger.lend_tokens(short.key, short.set_aside_tokens)
        short.set_aside_tokens = 0

    def covers(self, short: Shortfall) -> bool:
        """After `apply`: whether the leases now cover at least the request's least."""
        credit = self._credit_slot(short.key.workspace_id)
        tokens = self._token_slot(short.key)
        if credit.lease_id is None or self._free_nano(credit) < short.credit_least:
            return False
        return tokens is None or self._free_tokens(tokens, short.key) >= short.tokens_least

    def refusal(self, short: Shortfall) -> errors.CorvexError:
        if short.refusal is not None:
            return short.refusal
        return unavailable("The ledger could not lend this request its credit; retry shortly.")

    def admitted(self, hold_id: str, key: ApiKey) -> None:
        """Binds a new hold to the leases it was admitted on."""
        credit = self._credit_slot(key.workspace_id)
        tokens = self._token_slot(key)
        binding = _Binding(credit, credit.generation, credit.lease_id)
        if tokens is not None:
            binding.tokens, binding.token_generation = tokens, tokens.generation
            binding.token_lease_id = tokens.lease_id
            tokens.holds += 1
            tokens.last_used = time.monotonic()
        self._holds[hold_id] = binding
        credit.holds += 1
        credit.last_used = time.monotonic()
        self._maybe_top_up(credit)

    def settled(
        self,
        hold_id: str,
        key: ApiKey,
        leftover_nano: int,
        leftover_tokens: int,
        charge: Charged | None,
    ) -> None:
        """After the ledger settled a hold: routes its charge to the lease that paid for it;
        what it did not use goes back to a lease this core still spends from, or nowhere."""
        binding = self._holds.pop(hold_id)
        credit, tokens = binding.credit, binding.tokens
        credit.holds -= 1
        if binding.credit_generation != credit.generation:
            self._ledger.call_back(key.workspace_id, leftover_nano)
        if tokens is not None:
            tokens.holds -= 1
            current = self._ledger.mirrored_key(key.id)
            stale = binding.token_generation != tokens.generation
            if stale and current is not None and current.limits.monthly_tokens is not None:
                self._ledger.call_back_tokens(
                    current, leftover_tokens, self._limiter.month_reserved(key.id)
                )
        if charge is not None:
            assert binding.lease_id is not None, "a charge without a lease"
            self._shipper.append(key.workspace_id, charge, binding.lease_id, binding.token_lease_id)
        self._give_back_if_exact(credit)
        if tokens is not None:
            self._give_back_tokens_if_exact(tokens, key)

    # ---- replenishing (one round trip) -------------------------------------------------------

    async def replenish(self, short: Shortfall) -> None:
        """Grants what `short` lacks (or records why not in `short.refusal`). Whatever happens
        to the caller, what was set aside and granted is accounted for: if it is cancelled,
        `apply` runs once the grant is in."""
        self.round_trips_on_admission += 1
        task = asyncio.ensure_future(self._fill(short))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._abandoned(done, short))
            raise
        except BaseException:
            self.apply(short)
            raise

    def _abandoned(self, task: asyncio.Future[None], short: Shortfall) -> None:
        if not task.cancelled():
            task.exception()  # retrieved; the grant (if any) is applied either way
        self.apply(short)

    async def _fill(self, short: Shortfall) -> None:
        with db.purpose("admit"):
            fills: list[Coroutine[Any, Any, None]] = [self._fill_credit(short)]
            if self._token_slot(short.key) is not None:
                fills.append(self._fill_tokens(short))
            await asyncio.gather(*fills)

    async def _fill_credit(self, short: Shortfall) -> None:
        workspace_id = short.key.workspace_id
        slot = self._credit_slot(workspace_id)
        policy = self._policy
        for _ in range(MAX_FILL_ROUNDS):
            if slot.acquiring is not None:
                await asyncio.shield(slot.acquiring)
                self._set_aside(short, slot, None)
                said = self._refused_alike(short, slot, short.credit_least - short.set_aside_nano)
                if said is not None:
                    short.refusal = short.refusal or self._unaffordable(short, said)
                    return
                continue
            self._drop_stale(short, slot)
            need_most = short.credit_most - short.set_aside_nano
            if need_most <= 0 and slot.lease_id is not None:
                return
            need_least = max(short.credit_least - short.set_aside_nano, 0)
            free = self._free_nano(slot)
            ahead = need_most if slot.exact else max(need_most, policy.ahead_nano - free)
            want = Want(need_least, max(need_most, 0), max(ahead, 0), policy.exact_below_nano)
            generation = slot.generation
            try:
                grant = await self._grant(slot, want, self._store.lease_credit)
            except LeaseGone:
                if slot.generation == generation:
                    self._lose_credit(slot)
                continue
            if slot.generation != generation:
                continue  # lost meanwhile: the grant went to a lease no longer spent from
            self._take_credit(short, slot, grant, max(need_most, 0))
            if grant.granted_nano < need_least or (slot.lease_id is None and need_least == 0):
                self.grants["refused"] += 1
                short.refusal = self._unaffordable(short, grant.money)
                if slot.lease_id is None:
                    slot.refused = (need_least, grant.money)
            else:
                self.grants["granted"] += 1
                slot.refused = None
            return

    async def _grant(
        self,
        slot: _Slot,
        want: Want,
        lease: Callable[[str, str, int | None, Want, float], Awaitable[GrantT]],
    ) -> GrantT:
        """One grant from the store (`lease_credit` or `lease_tokens`) into the slot's lease;
        while a slot has none, the first acquiring it makes the others wait (`acquiring`)."""
        policy = self._policy
        if slot.lease_id is not None:
            return await self._link.call(
                lease(slot.owner, policy.core_id, slot.lease_id, want, policy.ttl_s)
            )
        future = asyncio.get_running_loop().create_future()
        slot.acquiring = future
        try:
            grant = await self._link.call(
                lease(slot.owner, policy.core_id, None, want, policy.ttl_s)
            )
            if grant.lease is not None:
                slot.lease_id = grant.lease.id
        finally:
            slot.acquiring = None
            future.set_result(None)
        return grant

    def _take_credit(self, short: Shortfall, slot: _Slot, grant: CreditGrant, mine: int) -> None:
        """This request's part of a grant is set aside for it; the rest is lent at once."""
        if grant.lease is not None:
            slot.expires_at = grant.lease.expires_at
        granted = grant.granted_nano
        own = min(granted, mine)
        if granted > own:
            self._ledger.lend(slot.owner, granted - own)
        short.set_aside_nano += own
        short.credit_generation = slot.generation
        slot.exact = grant.money.room.spendable_nano + granted < self._policy.exact_below_nano

    async def _fill_tokens(self, short: Shortfall) -> None:
        slot = self._token_slot(short.key)
        assert slot is not None
        policy = self._policy
        for _ in range(MAX_FILL_ROUNDS):
            if slot.acquiring is not None:
                await asyncio.shield(slot.acquiring)
                self._set_aside(short, None, slot)
                said = self._refused_alike(short, slot, short.tokens_least - short.set_aside_tokens)
                if said is not None:
                    short.refusal = short.refusal or self._token_limit(short, said)
                    return
                continue
            if short.token_generation != slot.generation:
                short.set_aside_tokens = 0
                short.token_generation = slot.generation
            need_most = short.tokens_most - short.set_aside_tokens
            if need_most <= 0 and slot.lease_id is not None:
                return
            need_least = max(short.tokens_least - short.set_aside_tokens, 0)
            free = self._free_tokens(slot, short.key)
            ahead = need_most if slot.exact else max(need_most, policy.ahead_tokens - free)
            want = Want(need_least, max(need_most, 0), max(ahead, 0), policy.exact_below_tokens)
            generation = slot.generation
            try:
                grant = await self._grant(slot, want, self._store.lease_tokens)
            except LeaseGone:
                if slot.generation == generation:
                    self._lose_tokens(slot)
                continue
            if slot.generation != generation:
                continue
            self._take_tokens(short, slot, grant, max(need_most, 0))
            if grant.granted_tokens < need_least or (slot.lease_id is None and need_least == 0):
                short.refusal = short.refusal or self._token_limit(short, grant)
                if slot.lease_id is None:
                    slot.refused = (need_least, grant)
            else:
                slot.refused = None
            return

    def _take_tokens(self, short: Shortfall, slot: _Slot, grant: TokenGrant, mine: int) -> None:
        if grant.lease is not None:
            slot.expires_at = grant.lease.expires_at
        granted = grant.granted_tokens
        own = min(granted, mine)
        key = self._ledger.mirrored_key(slot.owner)
        if granted > own and key is not None and key.limits.monthly_tokens is not None:
            self._ledger.lend_tokens(key, granted - own)
        short.set_aside_tokens += own
        short.token_generation = slot.generation
        tokens = grant.tokens
        if tokens.limit is not None:
            room = tokens.limit - tokens.month_tokens - tokens.tokens_leased
            slot.exact = room + granted < self._policy.exact_below_tokens

    @staticmethod
    def _refused_alike(short: Shortfall, slot: _Slot, need_least: int) -> Any:
        """After waiting for another request's acquire that got nothing: what PostgreSQL said
        then, if this request needs at least as much (it is refused alike, with no round trip
        of its own); else None."""
        if slot.lease_id is not None or slot.refused is None or need_least < slot.refused[0]:
            return None
        return slot.refused[1]

    # ---- what PostgreSQL's numbers say -------------------------------------------------------

    def _unaffordable(self, short: Shortfall, money: Any) -> errors.CorvexError:
        view = Money(
            balance_nano=money.balance_nano,
            leased_nano=money.leased_nano,
            month=money.month,
            month_spend_nano=money.month_spend_nano,
            spend_cap_nano=money.spend_cap_nano,
        )
        return self._ledger.unaffordable(
            view, short.rate, short.prompt_tokens, short.max_total if short.explicit else 1
        )

    def _token_limit(self, short: Shortfall, grant: TokenGrant) -> errors.CorvexError:
        tokens = grant.tokens
        if tokens.revoked:
            return errors.InvalidApiKey(
                "Incorrect, unknown or revoked API key. Create a key with "
                "`corvex admin key create` and send it as `Authorization: Bearer <key>`."
            )
        used = tokens.month_tokens + tokens.tokens_leased
        requested = short.tokens_most if short.explicit else short.tokens_least
        return errors.TokenLimitExceeded(
            f"Monthly token limit reached on key {short.key.id}: limit {tokens.limit}, used "
            f"{used} (including tokens held by requests in flight on every core), requested "
            f"{requested}. The limit resets at the start of the next calendar month (UTC), or "
            "can be raised by an admin.",
            metadata={"limit": "monthly_tokens"},
        )

    # ---- slots ---------------------------------------------------------------------------

    def _credit_slot(self, workspace_id: str) -> _Slot:
        slot = self._credit.get(workspace_id)
        if slot is None:
            slot = self._credit[workspace_id] = _Slot(workspace_id)
        return slot

    def _token_slot(self, key: ApiKey) -> _Slot | None:
        """The key's token slot, None for a key without a monthly limit."""
        if key.limits.monthly_tokens is None:
            return None
        slot = self._tokens.get(key.id)
        if slot is None:
            slot = self._tokens[key.id] = _Slot(key.id)
        return slot

    def _usable(self, slot: _Slot) -> bool:
        if slot.lease_id is None:
            return False
        margin = dt.timedelta(seconds=self._policy.margin_s)
        return self._clock() < slot.expires_at - margin

    def _free_nano(self, slot: _Slot) -> int:
        if slot.lease_id is not None and not self._usable(slot):
            self._lose_credit(slot)
        return self._ledger.free_nano(slot.owner)

    def _free_tokens(self, slot: _Slot, key: ApiKey) -> int:
        if slot.lease_id is not None and not self._usable(slot):
            self._lose_tokens(slot)
        free = self._ledger.free_tokens(key, self._limiter.month_reserved(key.id))
        return free or 0

    def _set_aside(self, short: Shortfall, credit: _Slot | None, tokens: _Slot | None) -> None:
        """Takes what is free (up to the request's most) out of the mirror, for `short`."""
        if credit is not None:
            self._drop_stale(short, credit)
            take = min(self._free_nano(credit), max(short.credit_most - short.set_aside_nano, 0))
            if take:
                self._ledger.call_back(credit.owner, take)
                short.set_aside_nano += take
        if tokens is not None:
            if short.token_generation != tokens.generation:
                short.set_aside_tokens, short.token_generation = 0, tokens.generation
            free = self._free_tokens(tokens, short.key)
            take = min(free, max(short.tokens_most - short.set_aside_tokens, 0))
            if take:
                reserved = self._limiter.month_reserved(short.key.id)
                self._ledger.call_back_tokens(short.key, take, reserved)
                short.set_aside_tokens += take

    @staticmethod
    def _drop_stale(short: Shortfall, slot: _Slot) -> None:
        """What was set aside from a lease since lost is not this core's any more."""
        if short.credit_generation != slot.generation:
            short.set_aside_nano, short.credit_generation = 0, slot.generation

    def _lose_credit(self, slot: _Slot) -> None:
        """The lease lapsed or is gone: its free credit is no longer spendable here (its holds
        still settle against it, and their leftovers go nowhere)."""
        self._ledger.call_back(slot.owner, self._ledger.free_nano(slot.owner))
        slot.lease_id = None
        slot.generation += 1
        slot.exact = False

    def _lose_tokens(self, slot: _Slot) -> None:
        key = self._ledger.mirrored_key(slot.owner)
        if key is not None and key.limits.monthly_tokens is not None:
            reserved = self._limiter.month_reserved(key.id)
            free = self._ledger.free_tokens(key, reserved) or 0
            self._ledger.call_back_tokens(key, free, reserved)
        slot.lease_id = None
        slot.generation += 1
        slot.exact = False

    # ---- giving back -----------------------------------------------------------------------

    def _give_back_if_exact(self, slot: _Slot) -> None:
        if not slot.exact or slot.lease_id is None:
            return
        free = self._ledger.free_nano(slot.owner)
        if free:
            self._ledger.call_back(slot.owner, free)
            self._shipper.give_back(slot.lease_id, free)

    def _give_back_tokens_if_exact(self, slot: _Slot, key: ApiKey) -> None:
        if not slot.exact or slot.lease_id is None:
            return
        current = self._ledger.mirrored_key(key.id)
        if current is None or current.limits.monthly_tokens is None:
            return
        reserved = self._limiter.month_reserved(key.id)
        free = self._ledger.free_tokens(current, reserved) or 0
        if free:
            self._ledger.call_back_tokens(current, free, reserved)
            self._shipper.give_back_tokens(slot.lease_id, free)

    def give_back_free(self, workspace_id: str) -> None:
        """Gives back the free credit of a workspace's lease (its cap was changed: a lower
        cap applies to what this core has not yet admitted)."""
        slot = self._credit.get(workspace_id)
        if slot is None or slot.lease_id is None:
            return
        free = self._ledger.free_nano(workspace_id)
        if free:
            self._ledger.call_back(workspace_id, free)
            self._shipper.give_back(slot.lease_id, free)

    def key_changed(self, key: ApiKey, *, monthly_limited: bool) -> None:
        """A key's limits or revocation changed: free lease tokens go back (a lower limit
        applies to what was not yet admitted); a key without a limit keeps no token lease."""
        slot = self._tokens.get(key.id)
        if slot is None or slot.lease_id is None:
            return
        if key.limits.monthly_tokens is not None:
            reserved = self._limiter.month_reserved(key.id)
            free = self._ledger.free_tokens(key, reserved) or 0
            if free:
                self._ledger.call_back_tokens(key, free, reserved)
                self._shipper.give_back_tokens(slot.lease_id, free)
        if not monthly_limited or key.revoked:
            slot.generation += 1
            slot.lease_id = None

    # ---- renewal ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Renews every lease each `renew_every_s` (topping it up ahead of need), and releases
        idle ones. Returns only when cancelled."""
        while True:
            await asyncio.sleep(self._policy.renew_every_s)
            try:
                await self.renew_all()
            except errors.ServiceUnavailable:
                continue  # the link is down; leases lapse on their own if it stays down
            except Exception:
                log.exception("renewing leases failed; trying again next round")

    async def renew_all(self) -> None:
        with db.purpose("renew"):
            limit = asyncio.Semaphore(4)
            await asyncio.gather(
                *(self._renew_credit(slot, limit) for slot in list(self._credit.values())),
                *(self._renew_tokens(slot, limit) for slot in list(self._tokens.values())),
            )

    def _idle(self, slot: _Slot) -> bool:
        return slot.holds == 0 and time.monotonic() - slot.last_used >= IDLE_RELEASE_S

    async def _renew_credit(self, slot: _Slot, limit: asyncio.Semaphore) -> None:
        if slot.lease_id is None:
            if self._idle(slot) and slot.acquiring is None:
                self._credit.pop(slot.owner, None)
            return
        lease_id, generation = slot.lease_id, slot.generation
        async with limit:
            if self._idle(slot) and not self._shipper.busy(lease_id):
                self._release_credit(slot)
                await self._link.call(self._store.release(lease_id))
                return
            free = self._free_nano(slot)
            ahead = 0 if slot.exact else max(0, self._policy.ahead_nano - free)
            want = Want(0, 0, ahead, self._policy.exact_below_nano)
            try:
                grant = await self._link.call(
                    self._store.lease_credit(
                        slot.owner, self._policy.core_id, lease_id, want, self._policy.ttl_s
                    )
                )
            except LeaseGone:
                if slot.generation == generation:
                    self._lose_credit(slot)
                return
        if slot.generation != generation:
            return
        if grant.lease is not None:
            slot.expires_at = grant.lease.expires_at
        self._ledger.lend(slot.owner, grant.granted_nano)
        slot.exact = grant.money.room.spendable_nano + grant.granted_nano < (
            self._policy.exact_below_nano
        )
        self._give_back_if_exact(slot)

    def _release_credit(self, slot: _Slot) -> None:
        self._ledger.call_back(slot.owner, self._ledger.free_nano(slot.owner))
        slot.lease_id = None
        slot.generation += 1

    async def _renew_tokens(self, slot: _Slot, limit: asyncio.Semaphore) -> None:
        if slot.lease_id is None:
            if self._idle(slot) and slot.acquiring is None:
                self._tokens.pop(slot.owner, None)
            return
        lease_id, generation = slot.lease_id, slot.generation
        key = self._ledger.mirrored_key(slot.owner)
        async with limit:
            if key is None or key.limits.monthly_tokens is None:
                return
            if self._idle(slot) and not self._shipper.busy_tokens(lease_id):
                self._lose_tokens(slot)
                await self._link.call(self._store.release_tokens(lease_id))
                return
            free = self._free_tokens(slot, key)
            ahead = 0 if slot.exact else max(0, self._policy.ahead_tokens - free)
            want = Want(0, 0, ahead, self._policy.exact_below_tokens)
            try:
                grant = await self._link.call(
                    self._store.lease_tokens(
                        slot.owner, self._policy.core_id, lease_id, want, self._policy.ttl_s
                    )
                )
            except LeaseGone:
                if slot.generation == generation:
                    self._lose_tokens(slot)
                return
        if slot.generation != generation or key.limits.monthly_tokens is None:
            return
        if grant.lease is not None:
            slot.expires_at = grant.lease.expires_at
        self._ledger.lend_tokens(key, grant.granted_tokens)
        tokens = grant.tokens
        if tokens.limit is not None:
            room = tokens.limit - tokens.month_tokens - tokens.tokens_leased
            slot.exact = room + grant.granted_tokens < self._policy.exact_below_tokens
        self._give_back_tokens_if_exact(slot, key)

    def _maybe_top_up(self, slot: _Slot) -> None:
        """Tops the lease up in the background once less than half the target is free, so
        that admissions rarely wait for PostgreSQL."""
        if slot.exact or slot.topping or slot.lease_id is None:
            return
        if self._ledger.free_nano(slot.owner) * 2 >= self._policy.ahead_nano:
            return
        slot.topping = True
        self._spawn(self._top_up(slot))

    async def _top_up(self, slot: _Slot) -> None:
        try:
            with db.purpose("renew"):
                await self._renew_credit(slot, asyncio.Semaphore(1))
        except errors.ServiceUnavailable:
            pass
        except Exception:
            log.exception("topping up the lease of %s failed", slot.owner)
        finally:
            slot.topping = False

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the end ---------------------------------------------------------------------------

    async def close(self, *, release: bool) -> None:
        """Stops background top-ups; with `release`, ends every lease of this core in
        PostgreSQL (once its charges are all committed), so their credit returns at once."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if release:
            await self._store.release_core(self._policy.core_id)

    # ---- what an operator watches ------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        credit = held = free = 0
        for workspace_id, slot in self._credit.items():
            ws = self._ledger.mirrored_workspace(workspace_id)
            if ws is None or slot.lease_id is None:
                continue
            credit += ws.balance_nano
            held += ws.held_nano
            free += ws.available_nano
        return {
            "leases": sum(1 for s in self._credit.values() if s.lease_id is not None),
            "token_leases": sum(1 for s in self._tokens.values() if s.lease_id is not None),
            "credit_nano": credit,
            "held_nano": held,
            "free_nano": free,
            "exact": sum(1 for s in self._credit.values() if s.exact and s.lease_id is not None),
        }
