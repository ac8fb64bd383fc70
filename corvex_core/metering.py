"""Metering: admission and settlement of one request against a key's money and limits.

It joins the ledger (balance, spend cap, holds) and the limiter (per-key request and token
limits). `admit` is all-or-nothing and synchronous: it resolves how many completion tokens a
request may produce (bounded by the context, the key's token limits and what the workspace
can pay for), holds their cost (the one affordability check), then takes them from the limits,
with no `await` in between and one reading of the clock. `settle` decides what is billable,
returns what was not used and charges what was, exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.cluster.mirror import UnknownKey
from corvex_core.cluster.supply import LeaseSupply, Shortfall
from corvex_core.ledger import Hold, Ledger
from corvex_core.limits import LimitState, LimitTicket, RateLimiter
from corvex_core.payments import AutoReloader
from corvex_core.records import Charged
from corvex_core.state import ApiKey


class Ticket:
    """An admitted request: its hold (price, prompt, and the completion bound of all its
    choices), what it took from the key's limits, and where those limits stood after it was
    admitted."""

    __slots__ = ("choices", "hold", "key", "limit_state", "limits")

    def __init__(
        self,
        key: ApiKey,
        hold: Hold,
        limits: LimitTicket,
        limit_state: LimitState,
        choices: int = 1,
    ) -> None:
        assert choices >= 1 and hold.max_completion_tokens % choices == 0
        self.key = key
        self.hold = hold
        self.limits = limits
        self.limit_state = limit_state
        self.choices = choices

    @property
    def rate(self) -> ModelRate:
        return self.hold.rate

    @property
    def prompt_tokens(self) -> int:
        return self.hold.prompt_tokens

    @property
    def max_tokens(self) -> int:
        """The completion tokens each choice may produce."""
        return self.hold.max_completion_tokens // self.choices


class NeedsLease(Exception):
    """This core's leases cannot cover a request (postgres mode): serving awaits
    `Metering.replenish` with the shortfall (one round trip) and admits once more with it."""

    def __init__(self, shortfall: Shortfall) -> None:
        super().__init__("the core's leases do not cover this request")
        self.shortfall = shortfall


class Metering(Protocol):
    """What serving needs from metering (the Meter, or the benchmarks' UnmeteredMeter)."""

    def authenticate(self, secret: str | None) -> ApiKey: ...

    async def find_key(self, refused: errors.InvalidApiKey) -> bool:
        """After `authenticate` refused a key: whether it was found elsewhere (postgres mode:
        made on another core a moment ago), so that authenticating again may succeed."""
        ...

    async def replenish(self, shortfall: Shortfall) -> None: ...

    def admit(
        self,
        key: ApiKey,
        rate: ModelRate,
        rate_card_version: str,
        hold_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        choices: int = 1,
        context_param: str | None = "messages",
        shortfall: Shortfall | None = None,
    ) -> Ticket: ...

    def count_call(self, key: ApiKey) -> None: ...

    def settle(
        self,
        ticket: Ticket,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        finished: bool = True,
    ) -> Charged | None: ...


def context_bound(
    rate: ModelRate, prompt_tokens: int, max_tokens: int | None, param: str = "messages"
) -> int:
    """The completion tokens the context leaves: `max_tokens` if it fits, all the room if None.
    Raises ContextLengthExceeded, naming the prompt's field `param`, if it does not fit (or
    nothing fits)."""
    room = rate.context_length - prompt_tokens
    if (max_tokens is not None and max_tokens > room) or room < 1:
        raise errors.ContextLengthExceeded(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens if max_tokens is not None else 1,
            context_length=rate.context_length,
            param=param,
        )
    return room if max_tokens is None else max_tokens


def billable(
    ticket: Ticket, prompt_tokens: int, completion_tokens: int, *, finished: bool
) -> tuple[int, int]:
    """What a request is charged for: its prompt (once, whatever n) once it finished or
    produced a token (one that ended before producing anything, refused or aborted in a queue,
    costs nothing), and the tokens all its choices produced. Counts beyond the hold are an
    engine's bug; they are cut to the hold, so a customer never pays more than the hold they
    were admitted with."""
    completion = min(completion_tokens, ticket.hold.max_completion_tokens)
    if not finished and completion == 0:
        return 0, 0
    return min(prompt_tokens, ticket.prompt_tokens), completion


class Meter:
    """Admission and settlement. One per core; every method is synchronous."""

    def __init__(
        self,
        ledger: Ledger,
        limiter: RateLimiter,
        *,
        reloader: AutoReloader | None = None,
        on_charge: Callable[[str], None] | None = None,
        supply: LeaseSupply | None = None,
        key_lookup: Callable[[bytes], Awaitable[bool]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.limiter = limiter
        self._reloader = reloader
        # Told the workspace id after every charge (the alerts), synchronously and cheaply.
        self._on_charge = on_charge
        # Postgres mode: the leases admission spends from, and how an unknown key is looked up.
        self._supply = supply
        self._key_lookup = key_lookup

    def authenticate(self, secret: str | None) -> ApiKey:
        """The live key with this secret (from `authorization: Bearer <secret>`)."""
        if not secret:
            raise errors.InvalidApiKey(
                "No API key provided. Send it as `Authorization: Bearer <key>`; "
                "`corvex admin key create` makes one."
            )
        return self.ledger.authenticate(secret)

    async def find_key(self, refused: errors.InvalidApiKey) -> bool:
        if not isinstance(refused, UnknownKey) or self._key_lookup is None:
            return False
        return await self._key_lookup(refused.secret_sha256)

    async def replenish(self, shortfall: Shortfall) -> None:
        assert self._supply is not None
        await self._supply.replenish(shortfall)

    def admit(
        self,
        key: ApiKey,
        rate: ModelRate,
        rate_card_version: str,
        hold_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        choices: int = 1,
        context_param: str | None = "messages",
        shortfall: Shortfall | None = None,
    ) -> Ticket:
        """Admits a request or raises the error of the first limit it breaks.

        `max_tokens` is per choice; the request holds its prompt once and `choices` times the
        bound. None means "as many as allowed": the bound becomes the smallest of the context,
        the token limits and the affordable tokens (shared by the choices), and the engine
        stops there with finish_reason "length". `context_param` is the request's field whose
        tokens the context bounds (named by the error if they do not fit); None skips the
        context (embeddings, whose inputs are each bounded by the engine).

        In postgres mode the leases must cover the request first: if they do not, this raises
        NeedsLease, and the caller admits again with the `shortfall` once it is replenished.
        """
        explicit = max_tokens is not None
        want = (
            context_bound(rate, prompt_tokens, max_tokens, context_param)
            if context_param is not None
            else max_tokens
        )
        if self._supply is not None:
            self._leased(key, rate, prompt_tokens, (want or 0) * choices, explicit, choices,
                         shortfall)  # fmt: skip
        now = self.limiter.now_ns()
        total = self.limiter.completion_bound(
            key, prompt_tokens, (want or 0) * choices, explicit=explicit, now_ns=now
        )
        if not explicit:
            ws = self.ledger.workspace(key.workspace_id)
            affordable = self.ledger.affordable_completion_tokens(ws, rate, prompt_tokens)
            total = min(total, max(affordable, choices))  # so that an unaffordable one fails
        # A whole number of tokens for every choice (at least one each, when some are wanted).
        bound = max(total // choices, 1 if want else 0)
        if bound * choices > total:
            # Fewer tokens fit than there are choices: the limits must refuse it by name.
            self.limiter.completion_bound(
                key, prompt_tokens, bound * choices, explicit=True, now_ns=now
            )
        # The hold is the one affordability check; after it nothing may raise a user error.
        hold = self.ledger.reserve(
            hold_id, key, rate, rate_card_version, prompt_tokens, bound * choices
        )
        limit_ticket = self.limiter.admit(key, prompt_tokens + bound * choices, now_ns=now)
        if self._supply is not None:
            self._supply.admitted(hold_id, key)
        return Ticket(key, hold, limit_ticket, self.limiter.state(key, now_ns=now), choices)

    def _leased(
        self,
        key: ApiKey,
        rate: ModelRate,
        prompt_tokens: int,
        max_total: int,
        explicit: bool,
        choices: int,
        shortfall: Shortfall | None,
    ) -> None:
        """Postgres mode: raises NeedsLease unless the leases cover the request; after a
        replenishment, puts what it brought into the mirror or raises the refusal."""
        assert self._supply is not None
        if shortfall is None:
            short = self._supply.shortfall(
                key, rate, prompt_tokens, max_total, explicit=explicit, choices=choices
            )
            if short is not None:
                raise NeedsLease(short)
            return
        self._supply.apply(shortfall)
        if not self._supply.covers(shortfall):
            raise self._supply.refusal(shortfall)

    def count_call(self, key: ApiKey) -> None:
        """A call that is not metered (Tokenize) still counts against requests per minute."""
        self.limiter.count_request(key)

    def settle(
        self,
        ticket: Ticket,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        finished: bool = True,
    ) -> Charged | None:
        """Charges what the request used (see `billable`) and returns the rest to every limit.
        Exactly once per ticket. `request_id` is the caller's x-request-id, kept on the charge.
        """
        prompt, completion = billable(ticket, prompt_tokens, completion_tokens, finished=finished)
        # The limits are given back first: a charge the journal refuses still ends the request.
        self.limiter.settle(ticket.limits, prompt + completion)
        charge = self.ledger.settle(
            ticket.hold,
            request_id=request_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_prompt_tokens=min(cached_prompt_tokens, prompt),
        )
        if self._supply is not None:
            used = charge.prompt_tokens + charge.completion_tokens if charge is not None else 0
            self._supply.settled(
                ticket.hold.id,
                ticket.key,
                ticket.hold.amount_nano - (charge.cost_nano if charge is not None else 0),
                max(ticket.limits.month_tokens - used, 0),
                charge,
            )
        if charge is not None and self._reloader is not None:
            self._reloader.check(ticket.key.workspace_id)
        if charge is not None and self._on_charge is not None:
            self._on_charge(ticket.key.workspace_id)
        return charge


class UnmeteredMeter:
    """Benchmark-only: admits every request without a key, limit or charge, and writes nothing.

    It exists so that a benchmark can measure what metering costs by switching it off; the
    core logs a warning when it is on. Usage is still computed (at the rate card's prices) so
    responses keep their shape.
    """

    _KEY = ApiKey(
        id="key_unmetered",
        workspace_id="ws_unmetered",
        name="unmetered",
        prefix="",
        secret_sha256=b"",
        created_ms=0,
    )
    _NO_LIMITS = LimitState(requests=None, tokens=None)

    def authenticate(self, secret: str | None) -> ApiKey:
        return self._KEY

    async def find_key(self, refused: errors.InvalidApiKey) -> bool:
        return False

    async def replenish(self, shortfall: Shortfall) -> None:
        raise AssertionError("the unmetered meter never needs a lease")

    def count_call(self, key: ApiKey) -> None:
        pass

    def admit(
        self,
        key: ApiKey,
        rate: ModelRate,
        rate_card_version: str,
        hold_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        choices: int = 1,
        context_param: str | None = "messages",
        shortfall: Shortfall | None = None,
    ) -> Ticket:
        bound = (
            context_bound(rate, prompt_tokens, max_tokens, context_param)
            if context_param is not None
            else max_tokens or 0
        )
        hold = Hold(
            id=hold_id,
            workspace_id=key.workspace_id,
            key_id=key.id,
            rate=rate,
            rate_card_version=rate_card_version,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=bound * choices,
            amount_nano=rate.cost_nano(prompt_tokens, bound * choices),
        )
        return Ticket(key, hold, LimitTicket(key.id, 0, 0, 0), self._NO_LIMITS, choices)

    def settle(
        self,
        ticket: Ticket,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        finished: bool = True,
    ) -> Charged | None:
        prompt, completion = billable(ticket, prompt_tokens, completion_tokens, finished=finished)
        if prompt == 0 and completion == 0:
            return None
        return Charged(
            at_ms=0,
            charge_id="",
            request_id=request_id,
            workspace_id=ticket.key.workspace_id,
            key_id=ticket.key.id,
            model=ticket.rate.id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_prompt_tokens=min(cached_prompt_tokens, prompt),
            cost_nano=ticket.rate.cost_nano(prompt, completion),
            rate_card_version=ticket.hold.rate_card_version,
        )
