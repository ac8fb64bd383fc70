"""Metering: admission and settlement of one request against a key's money and limits.

It joins the ledger (balance, spend cap, holds), the limiter (per-key request and token
limits) and the journal. `admit` is all-or-nothing and synchronous: it resolves how many
completion tokens a request may produce (bounded by the context, the key's token limits and
what the workspace can pay for), then takes them from every limit and holds their cost, with
no `await` in between. `settle` returns what was not used and charges what was, exactly once.
"""

from __future__ import annotations

import asyncio

from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.journal import Journal
from corvex_core.ledger import ApiKey, Hold, Ledger
from corvex_core.limits import LimitTicket, RateLimiter
from corvex_core.payments import AutoReloader
from corvex_core.records import Charged


class Ticket:
    """An admitted request: what it holds and the completion tokens it may produce."""

    __slots__ = ("headers", "hold", "key", "limits", "max_tokens", "prompt_tokens", "rate")

    def __init__(
        self,
        key: ApiKey,
        rate: ModelRate,
        hold: Hold,
        limits: LimitTicket,
        prompt_tokens: int,
        max_tokens: int,
        headers: dict[str, str],
    ) -> None:
        self.key = key
        self.rate = rate
        self.hold = hold
        self.limits = limits
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        # x-ratelimit-* values after this request's admission.
        self.headers = headers


class Meter:
    """Admission and settlement. One per core; every method but `durable` is synchronous."""

    def __init__(
        self,
        ledger: Ledger,
        limiter: RateLimiter,
        *,
        journal: Journal | None = None,
        reloader: AutoReloader | None = None,
    ) -> None:
        self.ledger = ledger
        self.limiter = limiter
        self._journal = journal
        self._reloader = reloader

    def authenticate(self, secret: str | None) -> ApiKey:
        """The live key with this secret (from `authorization: Bearer <secret>`)."""
        if not secret:
            raise errors.InvalidApiKey(
                "No API key provided. Send it as `Authorization: Bearer <key>`; "
                "`corvex admin key create` makes one."
            )
        return self.ledger.authenticate(secret)

    def admit(
        self,
        key: ApiKey,
        rate: ModelRate,
        rate_card_version: str,
        request_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        context_checked: bool = True,
    ) -> Ticket:
        """Admits a request or raises the error of the first limit it breaks.

        `max_tokens` None means "as many as allowed": the bound becomes the smallest of the
        context, the token limits and the affordable tokens, and the engine stops there with
        finish_reason "length". `context_checked` False skips the context (embeddings, whose
        inputs are each bounded by the engine).
        """
        explicit = max_tokens is not None
        want = self._context_bound(rate, prompt_tokens, max_tokens, context_checked)
        bound = self.limiter.completion_bound(key, prompt_tokens, want, explicit=explicit)
        ws = self.ledger.workspace(key.workspace_id)
        if not explicit:
            affordable = self.ledger.affordable_completion_tokens(ws, rate, prompt_tokens)
            bound = min(bound, max(affordable, 1))  # 1 so that an unaffordable request fails below
        self.ledger.check_affordable(ws, rate, prompt_tokens, bound)
        # Every check passed: take from each limit. Nothing below may raise a user error.
        limit_ticket = self.limiter.admit(key, prompt_tokens + bound)
        hold = self.ledger.reserve(request_id, key, rate, rate_card_version, prompt_tokens, bound)
        headers = self.limiter.headers(key)
        return Ticket(key, rate, hold, limit_ticket, prompt_tokens, bound, headers)

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
    ) -> Charged | None:
        """Charges what the request used, returns the rest to every limit. Exactly once."""
        prompt_tokens = min(prompt_tokens, ticket.prompt_tokens)
        completion_tokens = min(completion_tokens, ticket.max_tokens)
        # The limits are given back first: a charge the journal refuses still ends the request.
        self.limiter.settle(ticket.limits, prompt_tokens + completion_tokens)
        charge = self.ledger.settle(
            ticket.hold,
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )
        if charge is not None and self._reloader is not None:
            self._reloader.check(ticket.key.workspace_id)
        return charge

    async def durable(self) -> None:
        """Returns once every change made so far is on disk."""
        if self._journal is not None:
            await self._journal.sync_point()
        else:
            await asyncio.sleep(0)

    @staticmethod
    def _context_bound(
        rate: ModelRate, prompt_tokens: int, max_tokens: int | None, checked: bool
    ) -> int:
        if not checked:
            return max_tokens or 0
        room = rate.context_length - prompt_tokens
        if (max_tokens is not None and max_tokens > room) or room < 1:
            raise errors.ContextLengthExceeded(
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens if max_tokens is not None else 1,
                context_length=rate.context_length,
            )
        return room if max_tokens is None else max_tokens


class UnmeteredMeter(Meter):
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

    def __init__(self) -> None:
        pass

    def authenticate(self, secret: str | None) -> ApiKey:
        return self._KEY

    def count_call(self, key: ApiKey) -> None:
        pass

    def admit(
        self,
        key: ApiKey,
        rate: ModelRate,
        rate_card_version: str,
        request_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        context_checked: bool = True,
    ) -> Ticket:
        bound = self._context_bound(rate, prompt_tokens, max_tokens, context_checked)
        hold = Hold(
            id=request_id,
            workspace_id=key.workspace_id,
            key_id=key.id,
            rate=rate,
            rate_card_version=rate_card_version,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=bound,
            amount_nano=rate.cost_nano(prompt_tokens, bound),
        )
        return Ticket(key, rate, hold, LimitTicket(key.id, 0, 0, 0), prompt_tokens, bound, {})

    def settle(
        self,
        ticket: Ticket,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
    ) -> Charged | None:
        if prompt_tokens == 0 and completion_tokens == 0:
            return None
        return Charged(
            at_ms=0,
            charge_id="",
            request_id=request_id,
            workspace_id=ticket.key.workspace_id,
            key_id=ticket.key.id,
            model=ticket.rate.id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
            cost_nano=ticket.rate.cost_nano(prompt_tokens, completion_tokens),
            rate_card_version=ticket.hold.rate_card_version,
        )

    async def durable(self) -> None:
        return None
